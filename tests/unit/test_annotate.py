"""petdet_tasks.annotate: records, drawing, colours, exports, summary and gallery.

Every input is built here with numpy/PIL; nothing is downloaded and no TensorFlow is needed.
"""

from __future__ import annotations

import base64
import csv
import io
import itertools
import json
import math

import numpy as np
import pytest
from PIL import Image

from petdet_tasks import annotate as A
from petdet_tasks.label_map import pets_label_map

NAMES = {1: "Abyssinian", 2: "american_bulldog", 6: "Bengal", 9: "<script>"}
GREY = (128, 128, 128)


def outputs(rows: list[tuple[list[float], float, float]], pad_to: int = 100):
    """OD-API-like outputs padded to ``pad_to`` rows (padding: zero boxes, scores and class 0)."""
    boxes = np.zeros((pad_to, 4), np.float32)
    scores = np.zeros(pad_to, np.float32)
    classes = np.zeros(pad_to, np.float32)
    for i, (box, score, cls) in enumerate(rows):
        boxes[i], scores[i], classes[i] = box, score, cls
    return boxes, scores, classes, np.float32(len(rows))


def record(key: str = "a.jpg", w: int = 400, h: int = 300, rows=None, **kw) -> dict:
    rows = rows if rows is not None else [([0.1, 0.2, 0.5, 0.6], 0.93, 6)]
    return A.image_record(key, w, h, *outputs(rows), NAMES, **kw)


# ------------------------------------------------------------------------------ image_record


def test_image_record_exact_conversion():
    rec = record(source="s3://bucket/a.jpg")
    assert rec == {
        "schema": 1,
        "image": "a.jpg",
        "source": "s3://bucket/a.jpg",
        "width": 400,
        "height": 300,
        "detections": [
            {
                "class_id": 6,
                "class_name": "Bengal",
                "score": 0.93,
                "box": {"ymin": 0.1, "xmin": 0.2, "ymax": 0.5, "xmax": 0.6},
                "box_pixels": {"xmin": 80, "ymin": 30, "xmax": 240, "ymax": 150},
            }
        ],
    }
    A.validate_record(rec)
    assert json.loads(json.dumps(rec)) == rec


def test_image_record_threshold_sorting_max_boxes_num_detections():
    rows = [
        ([0.1, 0.1, 0.2, 0.2], 0.55, 1),
        ([0.1, 0.1, 0.3, 0.3], 0.95, 2),
        ([0.1, 0.1, 0.4, 0.4], 0.49999, 6),  # below the threshold
        ([0.1, 0.1, 0.5, 0.5], 0.5, 6),  # exactly at the threshold: kept
        ([0.1, 0.1, 0.6, 0.6], 0.75, 1),
    ]
    rec = record(rows=rows)
    assert [d["score"] for d in rec["detections"]] == [0.95, 0.75, 0.55, 0.5]
    assert [d["class_name"] for d in rec["detections"]] == [
        "american_bulldog", "Abyssinian", "Abyssinian", "Bengal",
    ]  # fmt: skip
    assert [d["score"] for d in record(rows=rows, max_boxes=2)["detections"]] == [0.95, 0.75]
    assert record(rows=rows, max_boxes=0)["detections"] == []
    assert len(record(rows=rows, score_threshold=0.0)["detections"]) == 5
    assert record(rows=rows, score_threshold=0.99)["detections"] == []

    # Only the first num_detections rows count, whatever the later rows hold.
    boxes, scores, classes, _ = outputs(rows)
    scores[5], classes[5] = 0.99, 1  # a row past num_detections with a high score
    rec = A.image_record("a.jpg", 400, 300, boxes, scores, classes, 2, NAMES)
    assert [d["score"] for d in rec["detections"]] == [0.95, 0.55]
    rec = A.image_record("a.jpg", 400, 300, boxes, scores, classes, np.array([0.0]), NAMES)
    assert rec["detections"] == []


def test_image_record_ties_keep_detector_order_and_scores_round():
    rows = [([0, 0, 0.1, 0.1], 0.8, 1), ([0, 0, 0.2, 0.2], 0.8, 2), ([0, 0, 1, 1], 0.123456, 6)]
    rec = record(rows=rows, score_threshold=0.1)
    assert [d["class_id"] for d in rec["detections"]] == [1, 2, 6]
    assert rec["detections"][2]["score"] == 0.1235


def test_image_record_clips_out_of_range_boxes():
    rows = [([-0.25, 0.5, 1.5, 1.0000001], 0.9, 1), ([0.6, 0.9, 0.2, 0.1], 0.8, 2)]
    rec = record(rows=rows)
    first, second = rec["detections"]
    assert first["box"] == {"ymin": 0.0, "xmin": 0.5, "ymax": 1.0, "xmax": 1.0}
    assert first["box_pixels"] == {"xmin": 200, "ymin": 0, "xmax": 399, "ymax": 299}
    # An inverted box has its coordinates swapped.
    assert second["box"] == {"ymin": 0.2, "xmin": 0.1, "ymax": 0.6, "xmax": 0.9}
    assert second["box_pixels"] == {"xmin": 40, "ymin": 60, "xmax": 360, "ymax": 180}
    A.validate_record(rec)


def test_image_record_unknown_class_and_bad_inputs():
    with pytest.raises(ValueError, match=r"unknown class id 38"):
        record(rows=[([0, 0, 1, 1], 0.9, 1), ([0, 0, 1, 1], 0.1, 38)])
    with pytest.raises(ValueError, match=r"unknown class id 0"):
        record(rows=[([0, 0, 1, 1], 0.9, 0)])
    with pytest.raises(ValueError, match=r"whole label id"):
        record(rows=[([0, 0, 1, 1], 0.9, 1.5)])
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        A.image_record("a", 4, 3, np.zeros((1, 100, 4)), np.zeros(100), np.ones(100), 1, NAMES)
    with pytest.raises(ValueError, match=r"only 100 detection rows"):
        A.image_record("a", 4, 3, *outputs([])[:3], 101, NAMES)
    with pytest.raises(ValueError, match=r"width"):
        record(w=0)
    boxes, scores, classes, num = outputs([([0, 0, 1, 1], 0.9, 1)])
    scores[0] = np.nan
    with pytest.raises(ValueError, match=r"row 0: score"):
        A.image_record("a", 4, 3, boxes, scores, classes, num, NAMES)


def test_image_record_accepts_a_label_map():
    lm = pets_label_map()
    rec = A.image_record("a", 10, 10, *outputs([([0, 0, 1, 1], 0.9, 37)]), lm)
    assert rec["detections"][0]["class_name"] == "yorkshire_terrier"


# ------------------------------------------------------------------------------ validation


def test_validate_record_accepts_good_records():
    A.validate_record(record())
    A.validate_record(record(rows=[]))
    A.validate_record(A.failure_record("b.jpg", "cannot identify image file"))
    A.validate_record(json.loads(json.dumps(record())))


def _broken(change) -> dict:
    rec = json.loads(json.dumps(record(rows=[([0.1, 0.2, 0.5, 0.6], 0.9, 6)] * 2)))
    change(rec)
    return rec


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (lambda r: r.pop("width"), r"^width: missing"),
        (lambda r: r.update(schema=2), r"^schema: expected 1"),
        (lambda r: r.update(height=True), r"^height: expected integer, got bool"),
        (lambda r: r.update(source=3), r"^source: expected str or null"),
        (lambda r: r.update(extra=1), r"^extra: unexpected key"),
        (lambda r: r["detections"][1]["box"].update(ymin="0.1"), r"^detections\[1\]\.box\.ymin:"),
        (lambda r: r["detections"][0].update(score=1.5), r"^detections\[0\]\.score: 1\.5 is not"),
        (lambda r: r["detections"][1].update(score=0.95), r"^detections\[1\]\.score: .*sorted"),
        (lambda r: r["detections"][0]["box"].update(ymin=0.7), r"^detections\[0\]\.box\.ymin"),
        (
            lambda r: r["detections"][1]["box_pixels"].update(xmax=400),
            r"^detections\[1\]\.box_pixels\.xmax: 400 is not in \[0, 399\]",
        ),
        (lambda r: r["detections"][0].pop("class_name"), r"^detections\[0\]\.class_name: miss"),
        (lambda r: r.update(detections={}), r"^detections: expected an array"),
    ],
)
def test_validate_record_names_the_bad_field(change, path):
    with pytest.raises(ValueError, match=path) as info:
        A.validate_record(_broken(change))
    assert "'a.jpg'" in str(info.value)


def test_validate_record_failure_records_and_non_dicts():
    with pytest.raises(ValueError, match=r"^error: empty"):
        A.validate_record({"schema": 1, "image": "x", "source": None, "error": ""})
    with pytest.raises(ValueError, match=r"^width: unexpected key"):
        A.validate_record({**A.failure_record("x", "bad"), "width": 3})
    with pytest.raises(ValueError, match=r"^record: expected an object"):
        A.validate_record([1, 2])


# ------------------------------------------------------------------------------ colours


def test_class_color_is_stable_and_distinct():
    colors = [A.class_color(i) for i in range(1, 38)]
    assert colors == [A.class_color(i) for i in range(1, 38)]
    assert len(set(colors)) == 37
    for c in colors:
        assert len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
        assert max(c) - min(c) >= 60  # saturated: never grey
    assert min(math.dist(a, b) for a, b in itertools.combinations(colors, 2)) > 40
    assert A.class_color(np.int64(6)) == A.class_color(6)
    assert A.class_color(1) == (255, 0, 0)  # pinned: the palette must not drift


def test_label_text_color_contrast():
    assert A.label_text_color((255, 255, 0)) == (0, 0, 0)
    assert A.label_text_color((0, 0, 153)) == (255, 255, 255)


# ------------------------------------------------------------------------------ drawing


def _label_text_height(out: np.ndarray, color, x0: int, y0: int) -> int:
    """Check the label above the box at (x0, y0); return the height of its text pixels."""
    region = out[:y0, x0:]
    is_bg = np.all(region == color, axis=-1)
    ys, xs = np.nonzero(is_bg)
    assert ys.size, "no label background above the box"
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    assert bottom == y0 - 1 and left == 0  # sits on the box's top edge, aligned left
    label = region[top : bottom + 1, left : right + 1]
    text = ~np.all(label == color, axis=-1)
    assert text.any(), "label has no text pixels"
    text_color = np.array(A.label_text_color(color))
    near = np.all(np.abs(label.astype(int) - text_color) <= 40, axis=-1)
    assert near.any(), "no text-coloured pixels"
    rows = np.nonzero(text.any(axis=1))[0]
    return int(rows.max() - rows.min() + 1)


@pytest.mark.parametrize("size", [(200, 150), (2000, 1500)])
def test_draw_detections_draws_boxes_and_labels(size):
    w, h = size
    rec = record(w=w, h=h, rows=[([0.4, 0.2, 0.9, 0.7], 0.87, 6)])
    img = Image.new("RGB", size, GREY)
    before = img.tobytes()
    out = A.draw_detections(img, rec)
    assert img.tobytes() == before and out is not img
    assert out.mode == "RGB" and out.size == size
    arr = np.asarray(out)
    color = A.class_color(6)
    px = rec["detections"][0]["box_pixels"]
    x0, y0, x1, y1 = px["xmin"], px["ymin"], px["xmax"], px["ymax"]
    ymid, xmid = (y0 + y1) // 2, (x0 + x1) // 2
    for x, y in [(x0, ymid), (x1, ymid), (xmid, y1), (x0 + 1, ymid), (x1 - 1, ymid)]:
        assert tuple(arr[y, x]) == color
    inside = arr[y0 + h // 20 : y1 - h // 20, x0 + w // 20 : x1 - w // 20]
    assert np.all(inside == GREY)
    assert np.all(arr[:, : x0 - 1] == GREY)  # nothing left of the box
    _label_text_height(arr, color, x0, y0)


def test_label_text_grows_with_image_size():
    heights = []
    for w, h in [(200, 150), (2000, 1500)]:
        rec = record(w=w, h=h, rows=[([0.4, 0.2, 0.9, 0.7], 0.87, 6)])
        arr = np.asarray(A.draw_detections(Image.new("RGB", (w, h), GREY), rec))
        px = rec["detections"][0]["box_pixels"]
        heights.append(_label_text_height(arr, A.class_color(6), px["xmin"], px["ymin"]))
    small, large = heights
    assert small >= 8  # legible on a small image
    assert large >= 3 * small


@pytest.fixture
def bitmap_font(monkeypatch):
    """Pretend Pillow has no FreeType: the bitmap default font is used."""
    A._font.cache_clear()
    monkeypatch.setattr(A, "_HAVE_FREETYPE", False)
    yield
    A._font.cache_clear()


def test_label_scales_without_freetype(bitmap_font):
    assert isinstance(A._font(12), A.ImageFont.ImageFont)
    heights = []
    for w, h in [(200, 150), (2000, 1500)]:
        rec = record(w=w, h=h, rows=[([0.4, 0.2, 0.9, 0.7], 0.87, 6)])
        arr = np.asarray(A.draw_detections(Image.new("RGB", (w, h), GREY), rec))
        px = rec["detections"][0]["box_pixels"]
        heights.append(_label_text_height(arr, A.class_color(6), px["xmin"], px["ymin"]))
    assert heights[1] >= 3 * heights[0]


def test_label_goes_inside_when_no_room_above_and_stays_in_the_image():
    w, h = 300, 200
    rec = record(w=w, h=h, rows=[([0.0, 0.9, 0.5, 1.0], 0.9, 2)])
    arr = np.asarray(A.draw_detections(Image.new("RGB", (w, h), GREY), rec))
    color = A.class_color(2)
    px = rec["detections"][0]["box_pixels"]
    assert (px["ymin"], px["xmin"], px["xmax"]) == (0, 270, 299)
    is_bg = np.all(arr == color, axis=-1)
    text = ~is_bg & ~np.all(arr == GREY, axis=-1)
    ys, xs = np.nonzero(text)
    assert ys.size and ys.min() > 0  # text inside the top of the box
    assert xs.min() < px["xmin"]  # shifted left to stay inside the image
    label_rows = np.nonzero(is_bg[:, : px["xmin"] - 1].any(axis=1))[0]
    assert label_rows.min() == 0 and label_rows.max() < h // 2


def test_draw_detections_other_inputs():
    rgba = Image.new("RGBA", (100, 80), (0, 0, 0, 0))
    out = A.draw_detections(rgba, record(w=100, h=80, rows=[]))
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (255, 255, 255)
    grey = Image.new("L", (100, 80), 128)
    assert A.draw_detections(grey, A.failure_record("x", "bad")).getpixel((1, 1)) == GREY
    # A resized copy of the image is annotated from the normalised box.
    rec = record(w=400, h=300)
    half = np.asarray(A.draw_detections(Image.new("RGB", (200, 150), GREY), rec))
    assert tuple(half[50, 40]) == A.class_color(6)  # xmin 0.2 * 200


# ------------------------------------------------------------------------------ encoding


def test_thumbnail_and_jpeg():
    img = Image.new("RGB", (2000, 1500), (10, 200, 30))
    thumb = Image.open(io.BytesIO(A.thumbnail_jpeg(img)))
    assert thumb.format == "JPEG" and thumb.size == (320, 240)
    assert Image.open(io.BytesIO(A.thumbnail_jpeg(img, max_side=100))).size == (100, 75)
    small = Image.new("RGB", (50, 40))
    assert Image.open(io.BytesIO(A.thumbnail_jpeg(small))).size == (50, 40)  # not enlarged
    assert img.size == (2000, 1500)
    full = Image.open(io.BytesIO(A.encode_jpeg(Image.new("RGBA", (64, 48)))))
    assert full.format == "JPEG" and full.size == (64, 48) and full.mode == "RGB"
    assert A.encode_jpeg(img) == A.encode_jpeg(img)
    with pytest.raises(ValueError, match="quality"):
        A.encode_jpeg(img, quality=0)


# ------------------------------------------------------------------------------ exports


def _records() -> list[dict]:
    return [
        record("a.jpg", rows=[([0.1, 0.2, 0.5, 0.6], 0.93, 6), ([0, 0, 1, 1], 0.61, 1)]),
        A.failure_record("b.jpg", "cannot identify image file", source="s3://x/b.jpg"),
        record("c.jpg", w=64, h=48, rows=[]),
    ]


def test_records_to_csv():
    rows = list(csv.reader(io.StringIO(A.records_to_csv(_records()).decode("utf-8"))))
    assert rows == [
        [
            "image", "width", "height", "class_id", "class_name", "score",
            "ymin", "xmin", "ymax", "xmax", "xmin_px", "ymin_px", "xmax_px", "ymax_px", "error",
        ],
        ["a.jpg", "400", "300", "6", "Bengal", "0.93",
         "0.1", "0.2", "0.5", "0.6", "80", "30", "240", "150", ""],
        ["a.jpg", "400", "300", "1", "Abyssinian", "0.61",
         "0.0", "0.0", "1.0", "1.0", "0", "0", "399", "299", ""],
        ["b.jpg"] + [""] * 13 + ["cannot identify image file"],
        ["c.jpg", "64", "48"] + [""] * 12,
    ]  # fmt: skip
    assert A.records_to_csv([]).decode() == ",".join(A.CSV_COLUMNS) + "\n"


def test_records_to_jsonl_round_trips():
    recs = _records()
    data = A.records_to_jsonl(recs)
    lines = data.decode("utf-8").splitlines()
    assert len(lines) == 3 and data.endswith(b"\n")
    assert [json.loads(line) for line in lines] == recs
    assert lines[1] == json.dumps(recs[1], sort_keys=True)
    with pytest.raises(ValueError, match="schema"):
        A.records_to_jsonl([{**recs[0], "schema": 9}])


def test_summarize():
    s = A.summarize(_records(), NAMES)
    assert s == {
        "images": 3,
        "images_with_detections": 1,
        "failed": 1,
        "failures": [{"image": "b.jpg", "error": "cannot identify image file"}],
        "boxes": 2,
        "boxes_per_class": {"Abyssinian": 1, "american_bulldog": 0, "Bengal": 1, "<script>": 0},
        "mean_score": 0.77,
    }
    empty = A.summarize([], pets_label_map())
    assert empty["mean_score"] is None and len(empty["boxes_per_class"]) == 37
    with pytest.raises(ValueError, match="unknown class id 6"):
        A.summarize(_records(), {1: "Abyssinian"})


# ------------------------------------------------------------------------------ gallery


def _gallery(recs: list[dict], **kw) -> tuple[str, dict[str, bytes]]:
    thumbs = {
        r["image"]: A.thumbnail_jpeg(Image.new("RGB", (80, 60), (i * 40, 90, 200)))
        for i, r in enumerate(recs)
        if "error" not in r
    }
    page = A.gallery_html(
        recs,
        thumbs,
        title=kw.get("title", "Run <42>"),
        summary=A.summarize(recs, NAMES),
        image_href=kw.get("image_href", lambda k: f"annotated/{k}"),
        json_href=kw.get("json_href", lambda k: f"records/{k}.json"),
    )
    return page, thumbs


def test_gallery_lists_every_image():
    recs = [*_records(), record("d&e.jpg", rows=[([0.1, 0.1, 0.9, 0.9], 0.88, 9)])]
    page, thumbs = _gallery(recs)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for r in recs:
        key = A.html.escape(r["image"])
        assert page.count(f'<div class="key">{key}</div>') == 1
        assert f'href="records/{key}.json"' in page
    assert page.count('<figure class="card') == len(recs)
    for key, jpeg in thumbs.items():
        b64 = base64.b64encode(jpeg).decode()
        assert page.count(f'src="data:image/jpeg;base64,{b64}"') == 1
        assert f'href="annotated/{A.html.escape(key)}"' in page
    # Cards in record order.
    positions = [page.index(f'<div class="key">{A.html.escape(r["image"])}</div>') for r in recs]
    assert positions == sorted(positions)
    assert "Bengal 0.93" in page and "Abyssinian 0.61" in page
    # The failed image: a card with its error, no thumbnail and no image link.
    card = page[page.index('<figure class="card failed">') :]
    card = card[: card.index("</figure>")]
    assert "cannot identify image file" in card and "<img" not in card
    assert "annotated/b.jpg" not in page
    assert "no detections" in page  # c.jpg


def test_gallery_escapes_and_is_self_contained():
    recs = [
        record("<b>x</b>.jpg", rows=[([0.1, 0.1, 0.9, 0.9], 0.88, 9)]),
        A.failure_record("f.jpg", "bad <img src=x onerror=alert(1)>"),
    ]
    page, _ = _gallery(recs, title="<script>alert('t')</script>")
    assert "<script" not in page.lower()
    assert "&lt;script&gt; 0.88" in page  # the class name
    assert "&lt;script&gt;alert(&#x27;t&#x27;)&lt;/script&gt;" in page  # the title
    assert "<b>" not in page and "&lt;b&gt;x&lt;/b&gt;.jpg" in page
    assert "<img src=x" not in page and "bad &lt;img src=x onerror=alert(1)&gt;" in page
    assert 'href="annotated/&lt;b&gt;x&lt;/b&gt;.jpg"' in page
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "javascript" not in page.lower()


def test_gallery_attribute_escapes_and_refuses_absolute_hrefs():
    recs = [record('q"uote.jpg')]
    page, _ = _gallery(recs)
    assert 'href="annotated/q&quot;uote.jpg"' in page
    for bad in ("https://example.com/a.jpg", "/abs/a.jpg", "//host/a.jpg"):
        with pytest.raises(ValueError, match="relative"):
            _gallery(recs, image_href=lambda k, bad=bad: bad)


def test_records_to_csv_in_parts_equals_it_in_one():
    recs = _records()
    parts = A.records_to_csv(recs[:1]) + A.records_to_csv(recs[1:], header=False)
    assert parts == A.records_to_csv(recs)
    assert A.records_to_csv([], header=False) == b""


def test_summary_counter_counts_record_by_record_as_summarize():
    recs = [*_records(), record("d.jpg", rows=[([0.1, 0.1, 0.9, 0.9], 0.88, 9)])]
    counter = A.SummaryCounter(NAMES)
    for rec in recs:
        counter.add(rec)
    assert counter.summary() == A.summarize(recs, NAMES)
    with pytest.raises(ValueError, match="unknown class id 6"):
        A.SummaryCounter({1: "Abyssinian"}).add(recs[0])
    with pytest.raises(ValueError, match="schema"):
        A.SummaryCounter(NAMES).add({**recs[0], "schema": 9})


def test_gallery_links_to_a_failures_page_instead_of_listing_them():
    """A gallery split over pages must not repeat the failure list on each: with
    ``failures_href`` the summary links to it; the failed card itself stays."""
    recs = [*_records(), A.failure_record("z.jpg", "image too large: 100000000 pixels")]
    summary = A.summarize(recs, NAMES)
    page = A.gallery_html(recs[:1], {}, title="t", summary=summary,
                          image_href=lambda k: f"annotated/{k}",
                          json_href=lambda k: f"images/{k}.json", failures_href="failures.html")
    assert '<a href="failures.html">2 images could not be read' in page
    assert "cannot identify image file" not in page and "too large" not in page
    assert "<h2>Failures</h2>" not in page
    without = A.gallery_html(recs[:1], {}, title="t", summary=summary,
                             image_href=lambda k: f"annotated/{k}",
                             json_href=lambda k: f"images/{k}.json")
    assert "<h2>Failures</h2>" in without and "too large" in without  # as before
    ok = A.summarize(recs[:1], NAMES)
    clean = A.gallery_html(recs[:1], {}, title="t", summary=ok,
                           image_href=lambda k: f"annotated/{k}",
                           json_href=lambda k: f"images/{k}.json", failures_href="failures.html")
    assert "failures.html" not in clean  # nothing to link to
    with pytest.raises(ValueError, match="relative"):
        A.gallery_html(recs[:1], {}, title="t", summary=summary,
                       image_href=lambda k: f"annotated/{k}",
                       json_href=lambda k: f"images/{k}.json",
                       failures_href="https://example.com/f.html")


def test_failures_page_lists_each_failure_escaped_and_linked():
    failures = [{"image": "a&b", "error": "undecodable: <bad>"},
                {"image": "c", "error": "image too large: 100000000 pixels"}]
    page = A.failures_html(failures, title="2 failed <x>",
                           json_href=lambda k: f"images/{k}.json", back_href="index.html")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count("<li>") == 2
    assert '<a href="images/a&amp;b.json"><code>a&amp;b</code></a>: undecodable: &lt;bad&gt;' \
        in page
    assert "image too large" in page and 'href="index.html"' in page
    assert "<x>" not in page and "<bad>" not in page
    assert "http://" not in page and "<script" not in page
    with pytest.raises(ValueError, match="relative"):
        A.failures_html(failures, title="t", json_href=lambda k: f"/abs/{k}")


def test_module_does_not_import_tensorflow():
    source = open(A.__file__, encoding="utf-8").read()
    assert "tensorflow" not in source.replace("TensorFlow", "")
