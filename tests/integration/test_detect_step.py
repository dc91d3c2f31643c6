"""The detection step on a model trained (briefly) here: records agree with the served model,
images are really annotated, the gallery lists everything, bad inputs are reported, re-runs
and retried shards write nothing twice; on a local store and on S3 (SeaweedFS).

The model is built once for the module: the synthetic sample → download → tfrecords → a
30-step fine-tune at 64 px from a micro preset → export. Its boxes are poor, but a low score
threshold gives every image detections, which is all these tests need."""

from __future__ import annotations

import html.parser
import io
import json
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from PIL import Image

from petdet_tasks import annotate
from petdet_tasks import detect as detect_module
from petdet_tasks.detect import (
    JPEG_QUALITY,
    DetectConfig,
    InputChanged,
    NoProductionModel,
    gather,
    load_plan,
    part_key,
    plan,
    resolve_model,
    run_shards,
    safe_key,
    save_plan,
)
from petdet_tasks.detect import detect as run_detect
from petdet_tasks.errors import PermanentError
from petdet_tasks.export import export, load_exported
from petdet_tasks.layout import PLAN as PLAN_FILE
from petdet_tasks.layout import step_prefix
from petdet_tasks.manifest import load_output
from petdet_tasks.registry import promote
from petdet_tasks.store import LocalStore, S3Store, Store, StoreError
from tests.support.pipeline import build_trained

pytestmark = pytest.mark.slow
SIZE = 64
LOW = 0.05  # the export's own floor: most images get detections from this weak model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(work dir, local store, model URI, sample summary): a committed export."""
    work = tmp_path_factory.mktemp("detect")
    trained = build_trained(LocalStore(work / "store"), work, image_size=SIZE)
    model = export(trained.store, trained.training.uri, cache_dir=work / "cache")
    return work, trained.store, model.uri, trained.sample


@pytest.fixture(scope="module")
def served(setup):
    """(loaded SavedModel, label map) of the module's model."""
    import tensorflow as tf

    work, store, model_uri, _ = setup
    _, path, labels = load_exported(store, model_uri, work / "cache")
    return tf.saved_model.load(str(path)), labels


def _prefix(result) -> str:
    return step_prefix("detect", result.fingerprint)


def _records(store: Store, result) -> dict[str, dict]:
    lines = store.read_text(_prefix(result) + "detections.jsonl").splitlines()
    return {r["image"]: r for r in map(json.loads, lines)}


def _good_images(work: Path, n: int) -> list[tuple[str, bytes]]:
    """``n`` decodable JPEGs of the sample's dataset (name, bytes)."""
    import tensorflow as tf

    out = []
    for path in sorted((work / "store").glob("datasets/*/images/*.jpg")):
        data = path.read_bytes()
        try:
            tf.io.decode_jpeg(data)
        except Exception:  # noqa: BLE001 - skip the sample's defects
            continue
        if data[:2] == b"\xff\xd8":
            out.append((path.stem, data))
        if len(out) == n:
            return out
    raise AssertionError("not enough good sample images")


def _expected(model, data: bytes) -> tuple[list, int, int]:
    """The served model's raw ``serving_default`` rows for one image (decoded the way the
    step decodes it): ([(class, score, box)], width, height)."""
    import tensorflow as tf

    from petdet_tasks.export import call_signature

    image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
    out = call_signature(model, "serving_default", image[None])
    n = int(out["num_detections"][0])
    rows = [(int(out["detection_classes"][0, i]), float(out["detection_scores"][0, i]),
             np.clip(out["detection_boxes"][0, i].astype(float), 0, 1)) for i in range(n)]
    return sorted(rows, key=lambda r: -r[1]), image.shape[1], image.shape[0]


TOL_SCORE = 2e-4  # records round scores to 4 decimals; batch composition moves ~1e-6
TOL_BOX = 1e-4


def _check_record(rec: dict, model, labels, data: bytes, cfg: DetectConfig) -> None:
    """Schema, and every detection against the raw signature output of the same image
    (order-insensitive: near-tied scores may swap; a score within the tolerance of the
    threshold or of the last kept one may fall either side)."""
    annotate.validate_record(rec)
    rows, width, height = _expected(model, data)
    assert (rec["width"], rec["height"]) == (width, height)
    dets = rec["detections"]
    thr = cfg.score_threshold
    sure = [r for r in rows if r[1] > thr + TOL_SCORE]
    maybe = [r for r in rows if r[1] >= thr - TOL_SCORE]
    assert min(cfg.max_boxes, len(sure)) <= len(dets) <= min(cfg.max_boxes, len(maybe))
    names = {item.id: item.name for item in labels}
    for det in dets:
        box = det["box"]
        got = np.array([box["ymin"], box["xmin"], box["ymax"], box["xmax"]])
        assert any(r[0] == det["class_id"] and abs(r[1] - det["score"]) < TOL_SCORE
                   and np.max(np.abs(r[2] - got)) < TOL_BOX for r in maybe), (det, rows[:5])
        assert det["class_name"] == names[det["class_id"]]
        # pixel boxes: the annotate rule, floor(v * size + 1e-6) clipped to the last pixel
        px = det["box_pixels"]
        for k, size in (("xmin", width), ("xmax", width), ("ymin", height), ("ymax", height)):
            assert px[k] == min(max(int(np.floor(box[k] * size + 1e-6)), 0), size - 1)
    if dets and len(maybe) > len(dets):  # the kept ones are the best ones
        assert dets[-1]["score"] >= maybe[len(dets)][1] - TOL_SCORE


# ---------------------------------------------------------------------------------------------


def test_resolve_model_needs_a_production_model_or_a_uri(setup, tmp_path):
    work, store, model_uri, _ = setup
    empty = LocalStore(tmp_path / "empty")
    with pytest.raises(NoProductionModel, match="no production model"):
        resolve_model(empty, None)
    with pytest.raises(NoProductionModel, match="registry/production.json"):
        plan(empty, None, None, DetectConfig())
    fp = model_uri.rsplit("/", 1)[1]
    assert resolve_model(store, model_uri) == model_uri
    assert resolve_model(store, f"models/{fp}") == model_uri  # relative to the store root
    promote(store, model_uri=model_uri, model_fingerprint=fp,
            evaluation_uri=store.uri("evaluations/0123456789abcdef0123"),
            metrics={"mAP": 0.01})
    assert resolve_model(store, None) == model_uri
    assert resolve_model(store, "") == model_uri
    # a store restored under another root: the pointer still names the old one, and the
    # model is found by its fingerprint here (it failed: "... is not under the store root")
    import json

    from petdet_tasks.errors import PermanentError
    from petdet_tasks.layout import PRODUCTION_POINTER

    pointer = json.loads(store.get_bytes(PRODUCTION_POINTER)[0])
    store.put_bytes(PRODUCTION_POINTER, json.dumps(
        {**pointer, "model_uri": f"s3://old-bucket/petdet/models/{fp}"}).encode())
    assert resolve_model(store, None) == model_uri
    assert issubclass(NoProductionModel, PermanentError)  # not retried: promote one first


def test_a_model_that_does_not_lead_to_its_test_split_is_not_retried(tmp_path):
    """The default input is found through the model's pipeline.json, its records and their
    dataset, all immutable once committed: a link that is not there is permanent (pass the
    images instead). An output that is not there (yet) is retried: a forced rebuild of the
    records or the dataset removes its manifest first."""
    from types import SimpleNamespace

    from petdet_tasks.detect import NoImagesToDetect, _list_test_split

    store = LocalStore(tmp_path / "store")
    fp, records_fp, dataset_fp = "0123456789abcdef0123", "abcdef0123456789abcd", "a" * 20
    model = SimpleNamespace(fingerprint=fp, uri=store.uri(f"models/{fp}"))

    def pipeline(doc):
        store.put_bytes(f"models/{fp}/pipeline.json", json.dumps(doc).encode())

    pipeline({"tfrecords_uri": None})
    with pytest.raises(NoImagesToDetect, match="names no tfrecords output"):
        _list_test_split(store, model)
    pipeline({"tfrecords_uri": f"s3://elsewhere/root/tfrecords/{records_fp}"})
    with pytest.raises(StoreError, match=f"tfrecords/{records_fp} is incomplete or not in") as e:
        _list_test_split(store, model)
    assert not isinstance(e.value, PermanentError)
    store.put_bytes(f"tfrecords/{records_fp}/_MANIFEST.json", b'{"inputs": {}}')
    with pytest.raises(NoImagesToDetect, match="records no dataset input"):
        _list_test_split(store, model)
    store.put_bytes(f"tfrecords/{records_fp}/_MANIFEST.json",
                    json.dumps({"inputs": {"dataset": dataset_fp}}).encode())
    with pytest.raises(StoreError, match="incomplete or absent") as absent:
        _list_test_split(store, model)
    assert not isinstance(absent.value, PermanentError)


def test_test_split_records_match_the_served_model(setup, served):
    """Default inputs (the model's test split) and default model (the production pointer,
    promoted in the previous test or here)."""
    work, store, model_uri, summary = setup
    fp = model_uri.rsplit("/", 1)[1]
    promote(store, model_uri=model_uri, model_fingerprint=fp,
            evaluation_uri=store.uri("evaluations/0123456789abcdef0123"),
            metrics={"mAP": 0.01})
    model, labels = served
    cfg = DetectConfig(score_threshold=LOW, max_boxes=5, num_shards=3, batch_size=4)
    lock = work / "cache" / ".locks" / "models" / f"{fp}.lock"
    assert not lock.exists()
    result = run_detect(store, None, None, cfg, cache_dir=work / "cache")
    assert not result.cache_hit
    assert result.outputs["model_uri"] == model_uri
    assert lock.is_file(), "the model was held in the worker cache while the shards ran"

    dataset = next(store.path.glob("datasets/*"))
    test_names = [line.split()[0] for line in
                  (dataset / "annotations/test.txt").read_text().splitlines() if line.strip()]
    records = _records(store, result)
    assert sorted(records) == sorted(test_names)  # every test image, each once
    files = result.manifest["files"]
    for name in test_names:
        rec = json.loads(store.read_text(_prefix(result) + f"images/{name}.json"))
        assert rec == records[name]
        assert rec["source"] == f"datasets/{dataset.name}/images/{name}.jpg"
        assert f"images/{name}.json" in files
        if "error" in rec:  # only the sample's undecodable defect may fail
            assert summary["defects"].get(name) == "truncated_jpeg", rec
            assert rec["error"].startswith("undecodable: ")
            assert f"annotated/{name}.jpg" not in files
        else:
            assert f"annotated/{name}.jpg" in files
    checked = 0
    for name in test_names:
        rec = records[name]
        if "error" in rec:
            continue
        data = (dataset / "images" / f"{name}.jpg").read_bytes()
        _check_record(rec, model, labels, data, cfg)
        checked += 1
    assert checked >= len(test_names) - 1
    assert sum(len(r.get("detections", [])) for r in records.values()) > 0

    # merged outputs agree with the records
    csv_rows = store.read_text(_prefix(result) + "detections.csv").splitlines()
    assert csv_rows[0].split(",") == list(annotate.CSV_COLUMNS)
    expected_rows = sum(max(1, len(r.get("detections", []))) for r in records.values())
    assert len(csv_rows) - 1 == expected_rows
    summary_json = json.loads(store.read_text(_prefix(result) + "summary.json"))
    assert summary_json["images"] == len(test_names)
    assert summary_json["boxes"] == result.outputs["boxes"]
    assert sum(summary_json["boxes_per_class"].values()) == summary_json["boxes"]
    assert summary_json["failed"] == len(summary_json["failures"]) == result.outputs["failed"]
    # the manifest registers the files the shards wrote, with their checksums
    for rel in ("_parts/shard-00000.json", "_parts/shard-00002.json", "index.html",
                "detections.jsonl", "summary.json"):
        assert rel in files
    import hashlib

    some = next(k for k in files if k.startswith("annotated/"))
    data = store.get_bytes(_prefix(result) + some)[0]
    assert files[some]["sha256"] == hashlib.sha256(data).hexdigest()


def test_annotated_image_is_drawn(setup, monkeypatch):
    work, store, model_uri, _ = setup
    cfg = DetectConfig(score_threshold=LOW, max_boxes=1, num_shards=1)
    real = detect_module._ShardRunner._run_model

    def with_a_large_top_box(self, batch):
        # this briefly trained model's top box is a sliver in some runs (ymin == ymax), and
        # some runs find nothing above the export's floor in an image: the drawing is checked
        # on a box of known size, with the model's own class and score where it has one
        out = real(self, batch)
        boxes = out["detection_boxes"].copy()
        boxes[:, 0] = [0.2, 0.15, 0.8, 0.85]
        n, scores, classes = (out[k].copy() for k in (
            "num_detections", "detection_scores", "detection_classes"))
        none = n == 0
        n[none], scores[none, 0], classes[none, 0] = 1, 0.5, 1
        return {**out, "detection_boxes": boxes, "num_detections": n,
                "detection_scores": scores, "detection_classes": classes}

    monkeypatch.setattr(detect_module._ShardRunner, "_run_model", with_a_large_top_box)
    folder = work / "draw"
    folder.mkdir(exist_ok=True)
    for name, data in _good_images(work, 4):
        (folder / f"{name}.jpg").write_bytes(data)
    result = run_detect(store, model_uri, str(folder), cfg, cache_dir=work / "cache")
    records = _records(store, result)
    drawn_any = 0
    for key, rec in records.items():
        if not rec["detections"]:
            continue
        det = rec["detections"][0]
        px = det["box_pixels"]
        if px["xmax"] - px["xmin"] < 16 or px["ymax"] - px["ymin"] < 16:
            continue
        original = np.asarray(Image.open(folder / f"{key}.jpg").convert("RGB"), np.int16)
        annotated_bytes = store.get_bytes(_prefix(result) + f"annotated/{key}.jpg")[0]
        annotated = np.asarray(Image.open(io.BytesIO(annotated_bytes)).convert("RGB"), np.int16)
        assert annotated.shape == original.shape
        # the step's JPEG is what annotate draws for the record, encoded the same way (the
        # step decodes with TensorFlow, this with Pillow: a few levels apart on some pixels)
        raw = annotate.draw_detections(Image.open(folder / f"{key}.jpg"), rec)
        redrawn = np.asarray(Image.open(io.BytesIO(annotate.encode_jpeg(raw, JPEG_QUALITY))),
                             np.int16)
        assert np.mean(np.abs(redrawn - annotated)) < 1.5
        # pixels changed along the box outline (bottom edge) in the step's own output
        bottom = annotated[px["ymax"], px["xmin"] + 4:px["xmax"] - 4]
        orig_bottom = original[px["ymax"], px["xmin"] + 4:px["xmax"] - 4]
        assert np.mean(np.abs(bottom - orig_bottom)) > 20, "outline did not change pixels"
        # exact checks on the lossless drawing: outline in the class colour, and the label
        # "name 0.xx" — a filled box of the class colour holding text pixels of the
        # contrasting colour, on or above the box's top edge, at the left of the box
        raw = np.asarray(raw, np.int16)
        color = np.array(annotate.class_color(det["class_id"]))
        assert np.all(raw[px["ymax"], px["xmin"] + 4:px["xmax"] - 4] == color)
        line, font_size, pad = annotate._sizes(rec["width"], rec["height"])
        mask = annotate._text_mask(f"{det['class_name']} {det['score']:.2f}", font_size)
        lw, lh = mask.width + 2 * pad, mask.height + 2 * pad
        top = px["ymin"] - lh if px["ymin"] - lh >= 0 else px["ymin"]
        top = max(0, min(top, rec["height"] - lh))
        left_x = max(0, min(px["xmin"], rec["width"] - lw))
        label = raw[top:top + lh, left_x:left_x + lw].reshape(-1, 3)
        text = np.array(annotate.label_text_color(tuple(int(c) for c in color)))
        near_fill = np.mean(np.all(label == color, axis=1))
        near_text = np.mean(np.abs(label - text).mean(axis=1) < 60)
        assert near_fill > 0.3 and near_text > 0.03, (near_fill, near_text)
        drawn_any += 1
    assert drawn_any == len(records) == 4, "every image has its top box drawn"


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs, self.srcs, self.keys, self._in_key = [], [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "href" in a:
            self.hrefs.append(a["href"])
        if "src" in a:
            self.srcs.append(a["src"])
        self._in_key = tag == "div" and a.get("class") == "key"

    def handle_data(self, data):
        if self._in_key:
            self.keys.append(data)
            self._in_key = False


def _parse(page: str) -> _Links:
    p = _Links()
    p.feed(page)
    return p


def test_gallery_lists_every_image_once_and_works_from_a_local_copy(setup, tmp_path):
    work, store, model_uri, _ = setup
    folder = tmp_path / "gallery in"
    (folder / "sub dir").mkdir(parents=True)
    good = _good_images(work, 5)
    for i, (name, data) in enumerate(good):
        target = folder / "sub dir" if i % 2 else folder
        (target / f"{name} #{i}.jpg").write_bytes(data)
    (folder / "broken.jpg").write_bytes(b"not a picture")
    cfg = DetectConfig(score_threshold=LOW, max_boxes=3, num_shards=2)
    result = run_detect(store, model_uri, str(folder), cfg, cache_dir=work / "cache")
    records = _records(store, result)
    assert len(records) == 6
    for key in records:
        assert key == safe_key(key) and "#" not in key and " " not in key
    # a local copy of the output folder, opened from disk
    copy = tmp_path / "copy"
    prefix = _prefix(result)
    for obj in store.list(prefix):
        target = copy / obj.key[len(prefix):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.get_bytes(obj.key)[0])
    page = (copy / "index.html").read_text()
    links = _parse(page)
    assert sorted(links.keys) == sorted(records)  # every image, once
    assert len(links.srcs) == 5 and all(s.startswith("data:image/jpeg;base64,")
                                        for s in links.srcs)
    assert "broken" in page and "undecodable" in page
    for href in links.hrefs:
        parts = urlsplit(href)
        assert not parts.scheme and not parts.netloc and not href.startswith("/"), href
        assert (copy / unquote(parts.path)).is_file(), href
    assert "<script" not in page and "http://" not in page and "https://" not in page
    # the failure list is on failures.html, linked from the page
    assert "failures.html" in links.hrefs and (copy / "failures.html").is_file()
    failures = _parse((copy / "failures.html").read_text())
    assert "images/broken.json" in failures.hrefs and "index.html" in failures.hrefs


def test_gallery_is_built_one_page_at_a_time_and_lists_the_failures_once(setup, tmp_path,
                                                                         monkeypatch):
    """More images than a page holds: each page is built from its own images' thumbnails
    only (the gather's memory does not grow with the image count), every page links every
    other and failures.html, which alone lists the failures (they were on every page: the
    HTML grew with pages x failures); every file is registered in the manifest."""
    work, store, model_uri, _ = setup
    folder = tmp_path / "paged"
    folder.mkdir()
    for name, data in _good_images(work, 5):
        (folder / f"{name}.jpg").write_bytes(data)
    (folder / "bad-text.jpg").write_bytes(b"not a picture")
    (folder / "bad-empty.jpg").write_bytes(b"")
    monkeypatch.setattr(detect_module, "PAGE_SIZE", 2)
    calls = []
    real = annotate.gallery_html

    def spy(records, thumbnails, **kw):
        calls.append((len(records), len(thumbnails)))
        return real(records, thumbnails, **kw)

    monkeypatch.setattr(annotate, "gallery_html", spy)
    cfg = DetectConfig(score_threshold=LOW, max_boxes=2, num_shards=3)
    result = run_detect(store, model_uri, str(folder), cfg, cache_dir=work / "cache")
    names = ["index.html", "gallery-002.html", "gallery-003.html", "gallery-004.html"]
    assert result.outputs["pages"] == 4 and result.outputs["failed"] == 2
    assert len(calls) == 4 and all(n <= 2 and t <= 2 for n, t in calls), calls
    prefix = _prefix(result)
    files = result.manifest["files"]
    assert {o.key[len(prefix):] for o in store.list(prefix)} == set(files) | {"_MANIFEST.json"}
    summary = json.loads(store.read_text(prefix + "summary.json"))
    assert summary["pages"] == names and summary["failures_page"] == "failures.html"
    assert [f["image"] for f in summary["failures"]] == ["bad-empty", "bad-text"]
    records = _records(store, result)
    assert list(records) == sorted(records) and len(records) == 7  # jsonl in key order
    csv_rows = store.read_text(prefix + "detections.csv").splitlines()
    assert csv_rows.count(",".join(annotate.CSV_COLUMNS)) == 1
    assert len(csv_rows) - 1 == sum(max(1, len(r.get("detections", [])))
                                    for r in records.values())
    seen = []
    for name in names:
        page = store.read_text(prefix + name)
        parsed = _parse(page)
        seen += parsed.keys
        assert set(names) - {name} <= set(parsed.hrefs) and "failures.html" in parsed.hrefs
        assert "<h2>Failures</h2>" not in page
        for f in summary["failures"]:  # a failure appears only on its own card's page
            assert (f["image"] in page) == (f["image"] in parsed.keys)
    assert seen == list(records)  # every image once, in order
    failures = store.read_text(prefix + "failures.html")
    assert "bad-text" in failures and "bad-empty" in failures
    assert "Unknown image file format" in failures


def test_corrupt_inputs_are_reported_and_the_shards_commit(setup, served, tmp_path):
    work, store, model_uri, _ = setup
    model, labels = served
    folder = tmp_path / "in"
    folder.mkdir()
    good = _good_images(work, 3)
    for name, data in good:
        (folder / f"{name}.jpg").write_bytes(data)
    png = io.BytesIO()
    Image.open(io.BytesIO(good[0][1])).save(png, "PNG")
    (folder / "as_png.PNG").write_bytes(png.getvalue())
    (folder / "truncated.jpg").write_bytes(good[1][1][: len(good[1][1]) // 2])
    (folder / "text.jpg").write_bytes(b"this is a text file, not a JPEG\n")
    (folder / "empty.jpeg").write_bytes(b"")
    # 10000x10000 claimed by its frame header: refused before decoding (a real one, 1.5 MB,
    # took a detect run to 3.65 GB)
    (folder / "huge.jpg").write_bytes(_claiming_size(good[2][1], 10000, 10000))
    (folder / "notes.txt").write_text("not listed: not an image extension")
    cfg = DetectConfig(score_threshold=LOW, max_boxes=4, num_shards=2, batch_size=3)
    result = run_detect(store, model_uri, str(folder), cfg, cache_dir=work / "cache")
    records = _records(store, result)
    assert sorted(records) == sorted([n for n, _ in good] + ["as_png", "truncated", "text",
                                                              "empty", "huge"])
    errors = {k: r["error"] for k, r in records.items() if "error" in r}
    assert set(errors) == {"truncated", "text", "empty", "huge"}
    assert "Invalid JPEG data" in errors["truncated"]
    assert "Unknown image file format" in errors["text"]
    assert "empty" in errors["empty"].lower()
    assert errors.pop("huge") == ("image too large: 100000000 pixels (10000x10000), over the "
                                  "limit of 50000000 (decompression-bomb guard)")
    assert all(e.startswith("undecodable: ") for e in errors.values())
    for name, data in good:
        _check_record(records[name], model, labels, data, cfg)
    _check_record(records["as_png"], model, labels, png.getvalue(), cfg)
    summary = json.loads(store.read_text(_prefix(result) + "summary.json"))
    assert summary["failed"] == 4
    assert summary["failure_reasons"] == {"image too large": 1, "undecodable": 3}
    assert {f["image"] for f in summary["failures"]} == set(errors) | {"huge"}
    assert result.outputs["failed"] == 4 and result.outputs["images"] == 8
    # the file not taken is reported, not dropped silently
    assert summary["not_images"] == {"count": 1, "examples": ["notes.txt"]}
    assert result.outputs["not_images"] == 1
    csv = store.read_text(_prefix(result) + "detections.csv")
    assert "Invalid JPEG data" in csv


def _claiming_size(jpeg: bytes, w: int, h: int) -> bytes:
    """``jpeg`` with its frame header (SOF0) patched to claim ``w`` x ``h``."""
    at = jpeg.index(b"\xff\xc0") + 2
    return jpeg[:at + 3] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + jpeg[at + 7:]


def _on_white_png(data: bytes) -> bytes:
    """What the tfrecords step trains on for a transparent image: composited onto white
    (Pillow's alpha_composite), as a lossless PNG."""
    with Image.open(io.BytesIO(data)) as img:
        rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    buf = io.BytesIO()
    Image.alpha_composite(white, rgba).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def test_transparent_gif_bmp_webp_images_are_seen_as_in_training(setup, served, tmp_path):
    """A transparent PNG (black under alpha 0, as most are) and a GIF with a transparent
    colour are seen on white, as the tfrecords step makes them for training (the decoders
    gave black), whether their batch goes through the uint8 or the encoded signature; the
    annotated JPEG shows white too. GIF, BMP and WebP files are taken."""
    work, store, model_uri, _ = setup
    model, labels = served
    (_, data), (_, data2) = _good_images(work, 2)
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    h, w = rgb.shape[:2]
    alpha = np.full((h, w), 255, np.uint8)
    alpha[:, :w // 3] = 0
    rgba = np.dstack([np.where(alpha[..., None] == 0, 0, rgb), alpha]).astype(np.uint8)
    folder = tmp_path / "formats"
    folder.mkdir()
    inputs = {}

    def put(name: str, img: Image.Image, fmt: str, **params) -> None:
        buf = io.BytesIO()
        img.save(buf, fmt, **params)
        inputs[name.rsplit(".", 1)[0]] = buf.getvalue()
        (folder / name).write_bytes(buf.getvalue())

    put("clear.png", Image.fromarray(rgba, "RGBA"), "PNG")
    quantized = Image.open(io.BytesIO(data2)).convert("RGB").quantize(255)
    index = np.asarray(quantized).copy()
    index[:, :index.shape[1] // 3] = 255  # an unused palette entry, made transparent
    gif = Image.fromarray(index, "P")
    gif.putpalette(quantized.getpalette())
    put("clear_gif.gif", gif, "GIF", transparency=255)
    put("photo_webp.webp", Image.open(io.BytesIO(data2)), "WEBP", quality=90)
    put("photo_bmp.bmp", Image.open(io.BytesIO(data)), "BMP")
    for batch_size in (8, 1):  # mixed sizes through the encoded signature, then uint8 alone
        cfg = DetectConfig(score_threshold=LOW, max_boxes=4, num_shards=1,
                           batch_size=batch_size)
        result = run_detect(store, model_uri, str(folder), cfg, cache_dir=work / "cache",
                            force=batch_size == 1)
        records = _records(store, result)
        assert sorted(records) == sorted(inputs) and result.outputs["failed"] == 0
        for key in ("clear", "clear_gif"):
            _check_record(records[key], model, labels, _on_white_png(inputs[key]), cfg)
        for key in ("photo_webp", "photo_bmp"):
            _check_record(records[key], model, labels, inputs[key], cfg)
    for key in ("clear", "clear_gif"):
        annotated = store.get_bytes(_prefix(result) + f"annotated/{key}.jpg")[0]
        pixels = np.asarray(Image.open(io.BytesIO(annotated)).convert("RGB"))
        left = pixels[:, :pixels.shape[1] // 3 - 4]
        assert np.median(left) > 240, (key, np.median(left))  # white, not black


def test_an_input_changed_after_the_plan_fails_the_shard_task_for_good(setup, tmp_path):
    """The shard task runs the recorded plan: a retry would fail the same way, so the error
    is permanent (Airflow fails the task at once) and says to plan again."""
    work, store, model_uri, _ = setup
    folder = tmp_path / "changing"
    folder.mkdir()
    for name, data in _good_images(work, 2):
        (folder / f"{name}.jpg").write_bytes(data)
    cfg = DetectConfig(score_threshold=LOW, max_boxes=2, num_shards=1)
    p = plan(store, model_uri, str(folder), cfg)
    save_plan(store, p)
    first = sorted(folder.iterdir())[0]
    first.write_bytes(first.read_bytes() + b"\0")
    with pytest.raises(InputChanged, match="detect_plan") as info:
        run_shards(store, load_plan(store, p.fingerprint), [0], cfg, cache_dir=work / "cache")
    assert isinstance(info.value, PermanentError)


def test_same_sized_batches_use_the_uint8_signature_with_the_same_results(setup, served,
                                                                          tmp_path, caplog):
    work, store, model_uri, _ = setup
    model, labels = served
    name, data = _good_images(work, 1)[0]
    image = Image.open(io.BytesIO(data))
    folder = tmp_path / "same"
    folder.mkdir()
    variants = {"a": data}
    for i, angle in enumerate((180,)):
        buf = io.BytesIO()
        image.rotate(angle).save(buf, "JPEG", quality=92)
        variants[f"b{i}"] = buf.getvalue()
    for key, blob in variants.items():
        (folder / f"{key}.jpg").write_bytes(blob)
    cfg = DetectConfig(score_threshold=LOW, max_boxes=4, num_shards=1, batch_size=8)
    with caplog.at_level("INFO", logger="petdet_tasks.detect"):
        result = run_detect(store, model_uri, str(folder), cfg, cache_dir=work / "cache")
    assert "1 uint8 + 0 encoded batches" in caplog.text
    records = _records(store, result)
    for key, blob in variants.items():
        _check_record(records[key], model, labels, blob, cfg)


class _Counting:
    """Counts the writes a store receives (keys of put_bytes / put_file)."""

    def __init__(self, store: Store, monkeypatch):
        self.keys: list[str] = []
        for name in ("put_bytes", "put_file"):
            orig = getattr(store, name)

            def wrapped(key, *a, _orig=orig, **kw):
                self.keys.append(key)
                return _orig(key, *a, **kw)

            monkeypatch.setattr(store, name, wrapped)


def _assert_same_records(got, want, path: str = "records") -> None:
    """Equal, but for floats within 1e-5 (of a score or a normalised box coordinate)."""
    if isinstance(want, float) or isinstance(got, float):
        assert isinstance(got, int | float) and isinstance(want, int | float), path
        assert abs(got - want) <= 1e-5, f"{path}: {got} != {want}"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for k in want:
            _assert_same_records(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same_records(g, w, f"{path}[{i}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def _idempotency(store: Store, model_uri: str, images: str, work: Path, monkeypatch) -> None:
    cfg = DetectConfig(score_threshold=LOW, max_boxes=2, num_shards=3, batch_size=2)
    p = plan(store, model_uri, images, cfg)
    assert not p.cache_hit and p.groups(2) == [[0, 2], [1]]
    first = run_shards(store, p, [0, 1, 2], cfg, cache_dir=work / "cache")
    assert [r["shard"] for r in first] == [0, 1, 2]
    assert sum(len(r["records"]) for r in first) == len(p.items)
    assert all("thumbnails" not in r for r in first)
    before = {o.key: o.size for o in store.list(p.prefix)}

    counting = _Counting(store, monkeypatch)
    again = run_shards(store, p, [0, 1, 2], cfg, cache_dir=work / "cache")
    assert counting.keys == [], "a finished shard wrote again"
    assert again == first
    assert {o.key: o.size for o in store.list(p.prefix)} == before

    # a lost part report: only that shard is written again, to the same keys
    store.delete(part_key(p, 1))
    redo = run_shards(store, p, [1], cfg, cache_dir=work / "cache")
    shard1 = {it.key for it in p.shard_items(1)}
    assert shard1 and counting.keys
    for key in counting.keys:
        rel = key[len(p.prefix):]
        assert rel.startswith(("_parts/shard-00001.json", "_parts/shard-00001/")) \
            or rel.split("/", 1)[1].rsplit(".", 1)[0] in shard1, rel
    # the same records; scores and boxes from the model run again may differ in the last
    # digits (oneDNN's CPU kernels are not bit-reproducible between model loads under load)
    _assert_same_records(redo[0]["records"], first[1]["records"])
    assert {o.key: o.size for o in store.list(p.prefix)}.keys() == before.keys()

    counting.keys.clear()
    result = gather(store, p, cfg)
    assert not result.cache_hit and result.outputs["images"] == len(p.items)
    assert all(k.startswith(p.prefix) for k in counting.keys)
    assert not any("/images/" in k or "/annotated/" in k for k in counting.keys)

    counting.keys.clear()
    hit = run_detect(store, model_uri, images, cfg, cache_dir=work / "cache")
    assert hit.cache_hit and hit.fingerprint == p.fingerprint
    assert counting.keys == []
    assert plan(store, model_uri, images, cfg).cache_hit
    assert run_shards(store, plan(store, model_uri, images, cfg), [0], cfg) == []

    # batch size is speed only; the threshold (and the others) change the outputs
    faster = DetectConfig(score_threshold=LOW, max_boxes=2, num_shards=3, batch_size=8)
    assert plan(store, model_uri, images, faster).fingerprint == p.fingerprint
    for changed in (DetectConfig(score_threshold=0.3, max_boxes=2, num_shards=3),
                    DetectConfig(score_threshold=LOW, max_boxes=3, num_shards=3),
                    DetectConfig(score_threshold=LOW, max_boxes=2, num_shards=2),
                    DetectConfig(score_threshold=LOW, max_boxes=2, num_shards=3,
                                 thumbnail_size=120)):
        assert plan(store, model_uri, images, changed).fingerprint != p.fingerprint
    with pytest.raises(ValueError, match="not the one the plan was made with"):
        gather(store, p, DetectConfig(score_threshold=0.3, max_boxes=2, num_shards=3))


def test_idempotent_on_a_local_folder(setup, tmp_path, monkeypatch):
    work, store, model_uri, _ = setup
    folder = tmp_path / "idem"
    folder.mkdir()
    for name, data in _good_images(work, 5):
        (folder / f"{name}.jpg").write_bytes(data)
    _idempotency(store, model_uri, str(folder), work, monkeypatch)
    # a changed input is a new listing: another fingerprint
    cfg = DetectConfig(score_threshold=LOW, max_boxes=2, num_shards=3, batch_size=2)
    fp = plan(store, model_uri, str(folder), cfg).fingerprint
    first = sorted(folder.iterdir())[0]
    first.write_bytes(first.read_bytes() + b"\0")
    assert plan(store, model_uri, str(folder), cfg).fingerprint != fp


def _copy_output(src: Store, dst: Store, uri: str) -> str:
    result = load_output(src, uri)
    prefix = step_prefix(result.step, result.fingerprint)
    for rel in result.manifest["files"]:
        dst.put_bytes(prefix + rel, src.get_bytes(prefix + rel)[0])
    dst.put_bytes(prefix + "_MANIFEST.json", src.get_bytes(prefix + "_MANIFEST.json")[0])
    return dst.uri(prefix.rstrip("/"))


@pytest.mark.s3
def test_s3_store_prefix_input_gallery_and_idempotency(setup, seaweed, s3_client, served,
                                                       monkeypatch):
    work, local, model_uri, _ = setup
    model, labels = served
    s3 = S3Store(f"s3://{seaweed.bucket}/t-{uuid.uuid4().hex[:12]}", client=s3_client)
    s3_model = _copy_output(local, s3, model_uri)
    good = _good_images(work, 4)
    for name, data in good:
        s3.put_bytes(f"inputs/pets/{name}.jpg", data)
    s3.put_bytes("inputs/pets/corrupt.jpg", good[0][1][:300])
    s3.put_bytes("inputs/pets/readme.md", b"# not an image")
    cfg = DetectConfig(score_threshold=LOW, max_boxes=3, num_shards=2)
    result = run_detect(s3, s3_model, s3.uri("inputs/pets"), cfg, cache_dir=work / "cache")
    records = _records(s3, result)
    assert sorted(records) == sorted([n for n, _ in good] + ["corrupt"])
    assert records["corrupt"]["error"].startswith("undecodable: ")
    for name, data in good:
        assert records[name]["source"] == f"inputs/pets/{name}.jpg"
        _check_record(records[name], model, labels, data, cfg)
    page = s3.read_text(_prefix(result) + "index.html")
    assert sorted(_parse(page).keys) == sorted(records)
    again = run_detect(s3, s3_model, "inputs/pets", cfg, cache_dir=work / "cache")
    assert again.cache_hit and again.fingerprint == result.fingerprint
    # the shard protocol on S3 (ETag listing digest, skip, redo one shard)
    _idempotency(s3, s3_model, "inputs/pets/", work, monkeypatch)


def test_config_from_dict_and_validation():
    cfg = DetectConfig.from_dict({"score_threshold": "0.3", "max_boxes": "7",
                                  "batch_size": 4.0, "num_shards": "", "thumbnail_size": None})
    assert cfg == DetectConfig(score_threshold=0.3, max_boxes=7, batch_size=4)
    assert DetectConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown detect config keys"):
        DetectConfig.from_dict({"threshold": 0.2})
    with pytest.raises(ValueError, match="score_threshold"):
        DetectConfig(score_threshold=1.5).validate()
    with pytest.raises(ValueError, match="max_boxes"):
        DetectConfig.from_dict({"max_boxes": "2.5"})
    assert safe_key("a b/ç#1.JPG") == "a_b/_1"
    assert safe_key("../.hidden.png") == "_/hidden"


def test_dag_side_imports_no_tensorflow():
    import subprocess
    import sys

    code = ("import sys, petdet_tasks.detect as d; d.DetectConfig(); "
            "assert 'tensorflow' not in sys.modules, 'detect imported TF'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_detect_on_a_local_folder(setup, tmp_path):
    import subprocess
    import sys

    work, store, model_uri, _ = setup
    folder = tmp_path / "cli-in"
    folder.mkdir()
    for name, data in _good_images(work, 2):
        (folder / f"{name}.jpg").write_bytes(data)
    out = subprocess.run([sys.executable, "-m", "petdet_tasks", "detect", "--store", store.root,
                          "--model", model_uri, "--images", str(folder), "--shards", "1",
                          "--score-threshold", str(LOW), "--cache-dir", str(work / "cache")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["step"] == "detect" and result["images"] == 2 and result["failed"] == 0
    assert f"gallery: {result['uri']}/index.html" in out.stderr
    assert store.exists(_prefix_of(result["uri"], store) + "index.html")


def _prefix_of(uri: str, store) -> str:
    return uri[len(store.root.rstrip("/")) + 1:].rstrip("/") + "/"


def test_a_missing_or_empty_images_folder_is_a_config_error(tmp_path):
    """A ``detect_images`` folder that is not there or holds no image fails as a
    :class:`ConfigError` naming the option (Airflow fails the task at once instead of retrying
    it twice; the CLI exits 2), not as a plain FileNotFoundError."""
    from petdet_tasks.detect import list_images
    from petdet_tasks.errors import ConfigError

    store = LocalStore(tmp_path / "store")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    for folder in (tmp_path / "no-such-folder", empty):
        with pytest.raises(ConfigError, match=r"detect_images") as info:
            list_images(store, None, str(folder))
        assert str(folder) in str(info.value)
    # an empty prefix in the store likewise
    store.put_bytes("some/prefix/readme.txt", b"x")
    with pytest.raises(ConfigError, match=r"detect_images.*no images to detect on"):
        list_images(store, None, "some/prefix")


def test_cli_detect_on_a_missing_folder_exits_2(setup, tmp_path):
    import subprocess
    import sys

    work, store, model_uri, _ = setup
    out = subprocess.run([sys.executable, "-m", "petdet_tasks", "detect", "--store", store.root,
                          "--model", model_uri, "--images", str(tmp_path / "nothing-here"),
                          "--cache-dir", str(work / "cache")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "ConfigError" in out.stderr or "detect_images" in out.stderr
    assert "Traceback" not in out.stderr


def test_shard_tasks_and_gather_run_the_recorded_listing_not_a_new_one(setup, tmp_path):
    """Airflow's plan, shard and gather tasks run apart: an image arriving in the input prefix
    in between must not give the later tasks another listing (another fingerprint), which made
    the gather wait for shards that never came."""
    from petdet_tasks.store import StoreError

    work, store, model_uri, _ = setup
    inbox = f"inbox-{uuid.uuid4().hex[:8]}/"
    good = _good_images(work, 5)
    for name, data in good[:4]:
        store.put_bytes(inbox + name + ".jpg", data)
    cfg = DetectConfig(score_threshold=LOW, max_boxes=2, num_shards=2, batch_size=2)
    p = plan(store, model_uri, store.uri(inbox), cfg)
    with pytest.raises(StoreError, match=f"has no {PLAN_FILE}: the plan task records it"):
        load_plan(store, p.fingerprint)
    save_plan(store, p)
    store.put_bytes(inbox + "late-arrival.jpg", good[4][1])  # after the plan task
    assert plan(store, model_uri, store.uri(inbox), cfg).fingerprint != p.fingerprint

    assert load_plan(store, p.fingerprint) == p
    run_shards(store, load_plan(store, p.fingerprint), [1], cfg, cache_dir=work / "cache")
    run_shards(store, load_plan(store, p.fingerprint), [0], cfg, cache_dir=work / "cache")
    result = gather(store, load_plan(store, p.fingerprint), cfg)
    assert result.fingerprint == p.fingerprint and result.outputs["images"] == 4
    assert PLAN_FILE in result.manifest["files"], "the listing detected is part of the output"

    hit = load_plan(store, p.fingerprint)
    assert hit.cache_hit and run_shards(store, hit, [0, 1], cfg) == []
    assert gather(store, hit, cfg).cache_hit
    # a cache hit made without a recorded plan (the CLI) is described by its manifest
    store.delete(p.prefix + PLAN_FILE)
    assert load_plan(store, p.fingerprint).cache_hit
    assert load_plan(store, p.fingerprint).units == [0, 1]
    # a recorded plan that does not describe its prefix is refused
    other = plan(store, model_uri, store.uri(inbox), cfg)
    store.put_bytes(p.prefix + PLAN_FILE, store.get_bytes(save_plan(store, other))[0])
    with pytest.raises(StoreError, match="does not describe") as mismatch:
        load_plan(store, p.fingerprint, force=True)
    assert isinstance(mismatch.value, PermanentError), "a retry reads the same record"
