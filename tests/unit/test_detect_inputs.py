"""The detect step's inputs, without a model: which files are taken and which are reported,
what the header check does before decoding (size limit, transparency), and which input
failures are permanent. No TensorFlow is loaded here."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from petdet_tasks import detect as det
from petdet_tasks.errors import PermanentError
from petdet_tasks.images import MAX_PIXELS, check_image, read_header
from petdet_tasks.layout import step_prefix
from petdet_tasks.manifest import run_step
from petdet_tasks.store import LocalStore, ObjectInfo, StoreError


def _encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _photo(w: int = 64, h: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 / w, y * 255 / h, (x + y) * 255 / (w + h)], -1).astype(np.uint8)


JPEG = _encode(Image.fromarray(_photo()), "JPEG", quality=90)


def _claiming_size(jpeg: bytes, w: int, h: int) -> bytes:
    """``jpeg`` with its frame header (SOF0) patched to claim ``w`` x ``h``."""
    at = jpeg.index(b"\xff\xc0") + 2
    return jpeg[:at + 3] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + jpeg[at + 7:]


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), np.int16)


# ------------------------------------------------------------------------ permanent failures


def _fake_model(store: LocalStore, *, dataset_files: dict[str, bytes] | None = None):
    """A committed export output (label map, pipeline.json) and, with ``dataset_files``, the
    dataset and tfrecords outputs it names (no model inside: nothing here runs one)."""
    label_map = "item {\n  id: 1\n  name: 'cat'\n}\n"
    records_uri = None
    if dataset_files is not None:
        def dataset_body(w):
            for rel, data in dataset_files.items():
                w.put_bytes(rel, data)
            return {}

        dataset = run_step(store, "download", 1, inputs={},
                           config={"files": sorted(dataset_files)}, body=dataset_body)
        records = run_step(store, "tfrecords", 1, inputs={"dataset": dataset.fingerprint},
                           config={"fake": 1}, body=lambda w: {})
        records_uri = records.uri

    def body(w):
        w.put_bytes("label_map.pbtxt", label_map.encode())
        w.put_json("pipeline.json", {"tfrecords_uri": records_uri})
        return {}

    return run_step(store, "export", 1, inputs={"training": "fake"},
                    config={"files": sorted(dataset_files or {})}, body=body)


def test_an_empty_default_test_split_is_permanent(tmp_path):
    """The default input is the model's dataset's test split; that output is immutable, so
    finding it empty (or without a test list) fails the same way on every retry."""
    store = LocalStore(tmp_path / "store")
    model = _fake_model(store, dataset_files={"annotations/test.txt": b"# nothing\n",
                                              "annotations/trainval.txt": b"a 1 1 1\n"})
    with pytest.raises(det.NoImagesToDetect, match=r"no images to detect on in the test "
                                                   r"split of .*datasets/") as info:
        det.list_images(store, model, None)
    assert isinstance(info.value, PermanentError)
    assert isinstance(info.value, FileNotFoundError)  # what callers caught before
    no_list = _fake_model(store, dataset_files={"annotations/trainval.txt": b"a 1 1 1\n"})
    with pytest.raises(det.NoImagesToDetect, match="has no annotations/test.txt"):
        det.list_images(store, no_list, None)
    # the CLI exits 2 (permanent), not 1
    out = subprocess.run([sys.executable, "-m", "petdet_tasks", "detect", "--store",
                          store.root, "--model", model.uri], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "no images to detect on in the test split" in out.stderr


def test_an_input_changed_after_planning_is_permanent_and_says_to_plan_again(tmp_path):
    """A shard task runs the recorded plan: retrying it would read the same listing again."""
    store = LocalStore(tmp_path / "store")
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(JPEG)
    store.put_bytes("inbox/b.jpg", JPEG)
    (local,) = det.list_images(store, None, str(folder))[0]
    (remote,) = det.list_images(store, None, "inbox")[0]
    assert det._read_item(store, local) == JPEG
    (folder / "a.jpg").write_bytes(JPEG + b"\0")
    store.put_bytes("inbox/b.jpg", JPEG + b"\0")
    cases = [local, remote]
    (folder / "gone.jpg").write_bytes(JPEG)
    gone = next(it for it in det.list_images(store, None, str(folder))[0] if it.key == "gone")
    (folder / "gone.jpg").unlink()
    cases.append(gone)
    for item in cases:
        with pytest.raises(det.InputChanged) as info:
            det._read_item(store, item)
        e = info.value
        assert isinstance(e, PermanentError) and isinstance(e, StoreError)
        assert "after planning" in str(e) and "detect_plan" in str(e)
        assert "retry of this task would run the same plan" in str(e)
        assert "not on this worker" not in str(e)  # the folder is there: the file went
    # the plan ran on another worker, whose local folder this one does not have
    (folder / "a.jpg").write_bytes(JPEG)
    (moved,) = [it for it in det.list_images(store, None, str(folder))[0] if it.key == "a"]
    folder.rename(tmp_path / "elsewhere")
    with pytest.raises(det.InputChanged, match="its folder is not on this worker at all: a "
                       "worker-local folder must be at the same path on every worker"):
        det._read_item(store, moved)


# ------------------------------------------------------------------------------- listings


def _folder(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    rgb = Image.fromarray(_photo())
    (folder / "a.jpg").write_bytes(JPEG)
    (folder / "b.webp").write_bytes(_encode(rgb, "WEBP"))
    (folder / "c.GIF").write_bytes(_encode(rgb.quantize(16), "GIF"))
    (folder / "sub" / "d.bmp").write_bytes(_encode(rgb, "BMP"))
    (folder / "e.PNG").write_bytes(_encode(rgb, "PNG"))
    (folder / "notes.txt").write_text("not an image")
    (folder / "scan.tiff").write_bytes(_encode(rgb, "TIFF"))
    (folder / "sub" / ".DS_Store").write_bytes(b"\0")
    return folder


def test_gif_bmp_webp_are_taken_and_every_other_file_is_counted(tmp_path):
    store = LocalStore(tmp_path / "store")
    folder = _folder(tmp_path)
    items, what, not_images = det.list_images(store, None, str(folder))
    assert [it.key for it in items] == ["a", "b", "c", "e", "sub/d"]
    assert not_images == {"count": 3, "examples": ["notes.txt", "scan.tiff", "sub/.DS_Store"]}
    assert "(5 images; 3 files not taken" in what and "notes.txt" in what
    # the same under a store prefix
    for path in folder.rglob("*"):
        if path.is_file():
            store.put_bytes("inbox/" + path.relative_to(folder).as_posix(), path.read_bytes())
    items2, _, not_images2 = det.list_images(store, None, "inbox")
    assert [it.key for it in items2] == [it.key for it in items]
    assert not_images2 == not_images


def test_credentials_in_the_images_argument_never_reach_a_message(tmp_path):
    """The README's promise (URLs with user:password@ are redacted in messages) holds for
    detect's images too: the message becomes the Airflow task's failure and log line."""
    store = LocalStore(tmp_path / "store")
    for images in ("s3://AKIAEXAMPLE:wJalrSECRETKEY@other-bucket/imgs",
                   "https://user:wJalrSECRETKEY@host/imgs"):
        with pytest.raises(PermanentError, match="not under the store root") as e:
            det.list_images(store, None, images)
        assert "SECRETKEY" not in str(e.value) and "***@" in str(e.value), str(e.value)


def test_a_listed_key_the_store_cannot_read_is_a_failure_not_a_failed_shard(tmp_path):
    """S3 (not SeaweedFS) accepts keys like ``a//b.jpg`` or ``a/../b.jpg`` that petdet's store
    refuses to read: such an image is an unreadable input with a failure record, planned as
    one, instead of a ValueError failing its whole shard on every retry."""
    store = LocalStore(tmp_path / "store")
    store.put_bytes("inbox/ok.jpg", JPEG)
    real_list = store.list

    def listing(prefix):  # what an S3 listing of such a bucket returns
        yield from real_list(prefix)
        yield ObjectInfo("inbox/odd//b.jpg", len(JPEG), '"0123"')
        yield ObjectInfo("inbox/up/../c.png", len(JPEG), '"4567"')

    store.list = listing
    items, what, _ = det.list_images(store, None, "inbox")
    assert [(it.key, it.size) for it in items] == [("odd/b", -1), ("ok", len(JPEG)),
                                                   ("up/_/c", -1)]
    assert "(3 images)" in what
    for it in (items[0], items[2]):
        assert it.digest.startswith("unreadable: invalid store key")
        with pytest.raises(det._Unreadable, match="invalid store key 'inbox/odd//b.jpg'|"
                           "invalid store key 'inbox/up/../c.png'"):
            det._read_item(store, it)
    assert det._read_item(store, items[1]) == JPEG


def test_a_folder_of_only_other_files_names_them_in_the_error(tmp_path):
    store = LocalStore(tmp_path / "store")
    folder = tmp_path / "tiffs"
    folder.mkdir()
    (folder / "scan.tiff").write_bytes(b"II*\0")
    with pytest.raises(det.ConfigError, match=r"no images to detect on.*1 file not taken.*"
                                              r"scan\.tiff"):
        det.list_images(store, None, str(folder))


def test_the_plan_reports_the_files_not_taken_and_records_them(tmp_path, caplog):
    store = LocalStore(tmp_path / "store")
    model = _fake_model(store)
    folder = _folder(tmp_path)
    cfg = det.DetectConfig(num_shards=2)
    with caplog.at_level(logging.WARNING, logger="petdet_tasks.detect"):
        p = det.plan(store, model.uri, str(folder), cfg)
    assert p.not_images["count"] == 3
    assert "3 files not taken" in caplog.text and "notes.txt" in caplog.text
    det.save_plan(store, p)
    assert det.load_plan(store, p.fingerprint) == p  # the shard tasks and gather see it too


def test_the_recorded_plan_stays_plain_json(tmp_path):
    """The recorded plan stays plain JSON (read by the shard tasks on other workers)."""
    store = LocalStore(tmp_path / "store")
    model = _fake_model(store)
    folder = _folder(tmp_path)
    p = det.plan(store, model.uri, str(folder), det.DetectConfig())
    doc = json.loads(store.read_text(det.save_plan(store, p)))
    assert doc["not_images"]["count"] == 3 and doc["page_size"] == det.PAGE_SIZE
    assert step_prefix("detect", p.fingerprint) == p.prefix


# ------------------------------------------------------------------------- the header check


def test_an_image_over_the_pixel_limit_fails_from_its_header_before_any_decode(monkeypatch):
    """A 10000x10000 JPEG (100 Mpx) is refused from its frame header with the tfrecords
    quarantine's reason; nothing is decoded (Pillow is never asked to open it)."""
    bomb = _claiming_size(JPEG, 10000, 10000)

    def no_open(*a, **k):
        raise AssertionError("decoded")

    monkeypatch.setattr(Image, "open", no_open)
    data, reason = det._prepare(bomb)
    assert data is None
    assert reason == ("image too large: 100000000 pixels (10000x10000), over the limit of "
                      f"{MAX_PIXELS} (decompression-bomb guard)")
    assert reason == read_header(bomb).too_large
    monkeypatch.undo()
    assert check_image(bomb).reason == reason  # the same words as the tfrecords quarantine
    # at the limit: taken as it is
    at_limit = _claiming_size(JPEG, 10000, 5000)
    assert det._prepare(at_limit) == (at_limit, None)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_png_claiming_too_many_pixels_fails_too():
    big = _encode(Image.new("L", (9000, 6000)), "PNG")  # 54 Mpx, 50 KB
    data, reason = det._prepare(big)
    assert data is None and reason.startswith("image too large: 54000000 pixels (9000x6000)")


def test_plain_images_and_unreadable_bytes_pass_unchanged():
    png = _encode(Image.fromarray(_photo()), "PNG")
    for data in (JPEG, png, b"not an image", b""):
        out, reason = det._prepare(data)
        assert out is data and reason is None


def _alpha(w: int = 64, h: int = 48) -> np.ndarray:
    return np.tile(np.linspace(0, 255, w), (h, 1)).astype(np.uint8)


def test_transparent_images_are_composited_onto_white_as_for_training():
    """RGBA PNG, WebP with alpha, a palette PNG, a GIF and an RGB PNG with a transparent
    colour: the bytes handed to the decoder are an RGB image, the transparent parts white,
    equal to what the tfrecords step composites before its JPEG (images._to_rgb)."""
    from petdet_tasks.images import _to_rgb

    rgb, a = _photo(), _alpha()
    rgba = Image.fromarray(np.dstack([rgb, a]), "RGBA")
    palette = Image.fromarray(rgb).quantize(16)
    cases = {
        "rgba.png": _encode(rgba, "PNG"),
        "rgba.webp": _encode(rgba, "WEBP", lossless=True),
        "palette.png": _encode(palette, "PNG", transparency=0),
        "palette.gif": _encode(palette, "GIF", transparency=0),
        "rgb-trns.png": _encode(Image.fromarray(rgb), "PNG",
                                transparency=tuple(int(v) for v in rgb[0, 0])),
    }
    for name, data in cases.items():
        assert read_header(data).transparent, name
        out, reason = det._prepare(data)
        assert reason is None and out is not data, name
        with Image.open(io.BytesIO(out)) as img:
            assert img.format == "PNG" and img.mode == "RGB", name
            got = np.asarray(img, np.int16)
        with Image.open(io.BytesIO(data)) as src:
            want = np.asarray(_to_rgb(src, src.format)[0], np.int16)
        assert np.array_equal(got, want), name
    # fully transparent pixels come out white, never black (what the decoders make of them)
    got = _decode(det._prepare(cases["rgba.png"])[0])
    assert np.all(got[:, 0] == 255)
    gif = _decode(det._prepare(cases["palette.gif"])[0])
    with Image.open(io.BytesIO(cases["palette.gif"])) as src:
        index = np.asarray(src)
    assert (index == 0).any() and np.all(gif[index == 0] == 255)
