"""The training input pipeline: staging shards, the model's batch contract, the augmentation's
geometry (pixels and boxes stay aligned), label mapping, sequential == parallel."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from petdet_tasks.download import DownloadConfig, download
from petdet_tasks.layout import step_prefix
from petdet_tasks.sample_data import make_sample
from petdet_tasks.store import LocalStore
from petdet_tasks.tfexample import TFRecordWriter, encode_od_example
from petdet_tasks.tfrecords import TFRecordConfig, build
from petdet_tasks.train_input import (
    InputConfig,
    label_index,
    load_records_label_map,
    make_dataset,
    parse_example,
    stage_shards,
    transform_example,
)

S = 128  # small inputs keep the tests fast; the geometry does not depend on the size


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Real shards: sample archives → download → tfrecords in a local store."""
    tmp = tmp_path_factory.mktemp("train-input")
    make_sample(tmp / "src")
    store = LocalStore(tmp / "store")
    dataset = download(store, DownloadConfig(source=str(tmp / "src"),
                                             cache_dir=str(tmp / "dl-cache")))
    result = build(store, dataset.uri, TFRecordConfig(num_shards=2, classes="present",
                                                      max_quarantine_fraction=0.05), workers=1)
    return store, result


@pytest.fixture(scope="module")
def staged(records, tmp_path_factory):
    store, result = records
    cache = tmp_path_factory.mktemp("shard-cache")
    return stage_shards(store, result.uri, "train", cache), load_records_label_map(store,
                                                                                    result.uri)


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _record(pixels: np.ndarray, boxes: list[tuple[float, float, float, float]],
            labels: list[int], name: str = "x") -> bytes:
    """An OD API example; boxes normalised (ymin, xmin, ymax, xmax)."""
    h, w = pixels.shape[:2]
    n = len(boxes)
    return encode_od_example(
        height=h, width=w, filename=f"{name}.jpg".encode(), sha256=b"0" * 64,
        encoded=_jpeg(pixels), image_format=b"jpeg",
        ymin=[b[0] for b in boxes], xmin=[b[1] for b in boxes],
        ymax=[b[2] for b in boxes], xmax=[b[3] for b in boxes],
        texts=[b"c"] * n, labels=labels, difficult=[0] * n, truncated=[0] * n,
        views=[b"Frontal"] * n)


def _write(path, recs: list[bytes]):
    with TFRecordWriter(path) as w:
        for r in recs:
            w.write(r)
    return path


def _white_box(h: int, w: int, box_px: tuple[int, int, int, int]) -> np.ndarray:
    """Black image with a white rectangle at pixel rows y0:y1, cols x0:x1."""
    img = np.zeros((h, w, 3), np.uint8)
    y0, x0, y1, x1 = box_px
    img[y0:y1, x0:x1] = 255
    return img


def _letterbox_reference(image: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The intended eval image, computed directly: output pixel centre i + 0.5 reads source
    index (i + 0.5) / scale - 0.5, bilinear; samples outside the source are padding."""
    h, w = image.shape[:2]
    c = (np.arange(S) + 0.5) / scale - 0.5
    ys, xs = c[c <= h - 1], c[c <= w - 1]
    y0 = np.clip(np.floor(ys).astype(int), 0, h - 1)
    x0 = np.clip(np.floor(xs).astype(int), 0, w - 1)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    img = image.astype(np.float64)
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1] * fx
    bottom = img[y1][:, x0] * (1 - fx) + img[y1][:, x1] * fx
    ref = np.zeros((S, S, 3))
    ref[:len(ys), :len(xs)] = top * (1 - fy) + bottom * fy
    valid = np.zeros((S, S), bool)
    valid[:len(ys), :len(xs)] = True
    return ref, valid


def _transform_fn(cfg: InputConfig):
    """transform_example traced once, seed as an input."""
    @tf.function
    def fn(image, boxes, labels, seed):
        return transform_example(image, boxes, labels, cfg, seed=seed)
    return fn


NO_AUG = dict(horizontal_flip=False, scale_jitter=(1.0, 1.0), color_jitter=0.0)


# ---------------------------------------------------------------------------------------------
# stage_shards
# ---------------------------------------------------------------------------------------------

def test_stage_shards_downloads_verifies_reuses_and_repairs(records, tmp_path, monkeypatch,
                                                            caplog):
    store, result = records
    files = result.manifest["files"]
    paths = stage_shards(store, result.uri, "val", tmp_path)
    assert [p.name for p in paths] == ["val-00000-of-00002.tfrecord",
                                       "val-00001-of-00002.tfrecord"]
    assert all(p.parent == tmp_path / result.fingerprint for p in paths)
    for p in paths:
        assert p.stat().st_size == files[p.name]["size"]
        assert p.read_bytes() == store.get_bytes(
            step_prefix("tfrecords", result.fingerprint) + p.name)[0]

    calls = []
    real = store.download_file
    monkeypatch.setattr(store, "download_file",
                        lambda *a, **k: (calls.append(a[0]), real(*a, **k))[1])
    caplog.set_level(logging.INFO, logger="petdet_tasks.train_input")
    assert stage_shards(store, result.uri, "val", tmp_path) == paths
    assert calls == []
    assert sum("cached" in r.getMessage() for r in caplog.records) >= 2

    # same size, one byte flipped: the sha256 catches it and the file is fetched again
    data = bytearray(paths[1].read_bytes())
    data[100] ^= 0xFF
    paths[1].write_bytes(bytes(data))
    paths[0].write_bytes(b"truncated")
    assert stage_shards(store, result.uri, "val", tmp_path) == paths
    assert sorted(k.rsplit("/", 1)[1] for k in calls) == [p.name for p in paths]
    for p in paths:
        assert p.stat().st_size == files[p.name]["size"]


def test_stage_shards_missing_split_is_a_clear_error(records, tmp_path):
    store, result = records
    with pytest.raises(FileNotFoundError, match=r"no 'test' shards.*splits: train, val"):
        stage_shards(store, result.uri, "test", tmp_path)
    with pytest.raises(ValueError, match="invalid split"):
        stage_shards(store, result.uri, "../train", tmp_path)


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------

def test_label_index_is_contiguous_in_id_order():
    assert label_index([6, 1, 2]) == {1: 0, 2: 1, 6: 2}
    for bad in ([], [0, 1], [1, 1], [-3]):
        with pytest.raises(ValueError):
            label_index(bad)


def test_sparse_ids_map_to_indices_and_unknown_ids_drop_their_box(tmp_path):
    img = np.full((60, 80, 3), 90, np.uint8)
    path = _write(tmp_path / "l.tfrecord", [
        _record(img, [(0.1, 0.1, 0.5, 0.5), (0.2, 0.2, 0.9, 0.9)], [6, 1]),
        _record(img, [(0.1, 0.1, 0.5, 0.5), (0.2, 0.2, 0.9, 0.9)], [9, 2]),  # 9: unknown
    ])
    cfg = InputConfig(image_size=S, batch_size=2, max_boxes=3)
    images, target = next(iter(make_dataset([path], [1, 2, 6], cfg, training=False)))
    assert target["labels"].numpy().tolist() == [[2, 0, -1], [1, -1, -1]]
    # the kept box of the second example is the second record box
    np.testing.assert_allclose(target["boxes"][1, 0].numpy(),
                               np.array([0.2 * 60, 0.2 * 80, 0.9 * 60, 0.9 * 80]) * S / 80,
                               atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Evaluation batches: the model contract
# ---------------------------------------------------------------------------------------------

def test_eval_batches_follow_the_model_contract(staged):
    paths, labels = staged
    cfg = InputConfig(image_size=S, batch_size=4, max_boxes=3)
    ds = make_dataset(paths, labels.ids, cfg, training=False)
    index = label_index(labels.ids)
    raw = [parse_example(r) for r in tf.data.TFRecordDataset([str(p) for p in paths])]
    assert raw[0]["image"].dtype == tf.uint8 and raw[0]["image"].shape[2] == 3
    assert raw[0]["boxes"].dtype == tf.float32 and raw[0]["boxes"].shape[1] == 4
    assert raw[0]["labels"].dtype == tf.int64
    got = [(im, t) for im, t in ds]
    assert sum(int(im.shape[0]) for im, _ in got) == len(raw)
    n = 0
    for images, target in got:
        b = images.shape[0]
        assert images.dtype == tf.float32 and images.shape[1:] == (S, S, 3)
        assert target["boxes"].dtype == tf.float32 and target["boxes"].shape == (b, 3, 4)
        assert target["labels"].dtype == tf.int32 and target["labels"].shape == (b, 3)
        assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 255.0
        for i in range(b):
            ex = raw[n]
            n += 1
            h, w = ex["image"].shape[:2]
            scale = S / max(h, w)
            k = len(ex["labels"])
            expect = ex["boxes"].numpy() * np.array([h, w, h, w]) * scale
            np.testing.assert_allclose(target["boxes"][i, :k].numpy(), expect, atol=1e-3)
            assert target["labels"][i, :k].numpy().tolist() == \
                [index[int(v)] for v in ex["labels"].numpy()]
            assert (target["boxes"][i, k:].numpy() == -1).all()
            assert (target["labels"][i, k:].numpy() == -1).all()
            # letterbox: a bilinear resize by S / max(h, w), padded bottom/right with 0
            ref, valid = _letterbox_reference(ex["image"].numpy(), scale)
            mine = images[i].numpy()
            np.testing.assert_allclose(mine[valid], ref[valid], atol=0.05)
            assert (mine[~valid] == 0).all()
            assert valid.sum() >= (round(h * scale) - 1) * (round(w * scale) - 1)
    assert {len(r["labels"]) for r in raw} == {1}  # the pets data: one head box per image


def test_stretch_mode_fills_the_input(tmp_path):
    img = _white_box(50, 100, (10, 20, 40, 80))
    path = _write(tmp_path / "s.tfrecord", [_record(img, [(0.2, 0.2, 0.8, 0.8)], [1])])
    cfg = InputConfig(image_size=S, keep_aspect_ratio=False, max_boxes=1)
    images, target = next(iter(make_dataset([path], [1], cfg, training=False)))
    np.testing.assert_allclose(target["boxes"][0, 0].numpy(), np.array([0.2, 0.2, 0.8, 0.8]) * S,
                               atol=1e-3)
    y0, x0, y1, x1 = (np.array([0.2, 0.2, 0.8, 0.8]) * S).astype(int)
    assert images[0, y0 + 2:y1 - 2, x0 + 2:x1 - 2].numpy().min() > 230
    assert images[0, :y0 - 2].numpy().max() < 25


def test_sequential_variant_yields_the_same_eval_elements(staged):
    paths, labels = staged
    par = InputConfig(image_size=S, batch_size=3)
    seq = InputConfig(image_size=S, batch_size=3, parallel=False)
    a = list(make_dataset(paths, labels.ids, par, training=False))
    b = list(make_dataset(paths, labels.ids, seq, training=False))
    assert len(a) == len(b) > 1
    for (ia, ta), (ib, tb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ia.numpy(), ib.numpy())
        np.testing.assert_array_equal(ta["boxes"].numpy(), tb["boxes"].numpy())
        np.testing.assert_array_equal(ta["labels"].numpy(), tb["labels"].numpy())


# ---------------------------------------------------------------------------------------------
# Training batches and the augmentation
# ---------------------------------------------------------------------------------------------

def test_training_batches_are_fixed_size_in_range_and_boxes_inside(staged):
    paths, labels = staged
    cfg = InputConfig(image_size=S, batch_size=4, max_boxes=2, shuffle_buffer=16,
                      color_jitter=0.3, scale_jitter=(0.6, 1.6))
    ds = make_dataset(paths, labels.ids, cfg, training=True)
    spec_images, spec_target = ds.element_spec
    assert spec_images.shape == (4, S, S, 3)
    assert spec_target["boxes"].shape == (4, 2, 4) and spec_target["labels"].shape == (4, 2)
    kept = 0
    for images, target in ds.take(12):  # more than one epoch: it repeats
        assert images.shape == (4, S, S, 3)
        x = images.numpy()
        assert x.min() >= 0.0 and x.max() <= 255.0
        boxes, lab = target["boxes"].numpy(), target["labels"].numpy()
        real = lab >= 0
        assert ((boxes >= 0) & (boxes <= S)).all(axis=-1)[real].all()
        assert (boxes[real][:, 2] > boxes[real][:, 0]).all()
        assert (boxes[real][:, 3] > boxes[real][:, 1]).all()
        assert (boxes[~real] == -1).all() and (lab[real] < len(labels)).all()
        kept += real.sum()
    assert kept > 0.8 * 12 * 4  # dropped boxes are the exception


def test_augmentation_is_reproducible_per_seed(tmp_path):
    cfg = InputConfig(image_size=S, color_jitter=0.2)
    img = tf.constant(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8))
    boxes = tf.constant([[0.2, 0.3, 0.6, 0.7]])
    labels = tf.constant([0], tf.int32)
    fn = _transform_fn(cfg)
    a = fn(img, boxes, labels, tf.constant([0, 5], tf.int64))
    b = fn(img, boxes, labels, tf.constant([0, 5], tf.int64))
    c = fn(img, boxes, labels, tf.constant([0, 6], tf.int64))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert not np.array_equal(a[0].numpy(), c[0].numpy())


def test_horizontal_flip_moves_pixels_and_boxes_together():
    h, w = 60, 90
    img = _white_box(h, w, (12, 9, 36, 36))  # off-centre so a flip is visible
    norm = np.array([[12 / h, 9 / w, 36 / h, 36 / w]], np.float32)
    labels = tf.constant([0], tf.int32)
    flip_fn = _transform_fn(InputConfig(image_size=S, **{**NO_AUG, "horizontal_flip": True}))
    plain = transform_example(tf.constant(img), tf.constant(norm), labels,
                              InputConfig(image_size=S, **NO_AUG))
    mirrored_norm = norm.copy()
    mirrored_norm[:, 1], mirrored_norm[:, 3] = 1 - norm[:, 3], 1 - norm[:, 1]
    mirrored = transform_example(tf.constant(img[:, ::-1].copy()), tf.constant(mirrored_norm),
                                 labels, InputConfig(image_size=S, **NO_AUG))
    outcomes = set()
    for k in range(16):
        out = flip_fn(tf.constant(img), tf.constant(norm), labels, tf.constant([3, k], tf.int64))
        for name, ref in (("plain", plain), ("mirrored", mirrored)):
            if np.abs(out[0].numpy() - ref[0].numpy()).max() < 1e-3:
                np.testing.assert_allclose(out[1].numpy(), ref[1].numpy(), atol=1e-4)
                outcomes.add(name)
                break
        else:
            pytest.fail(f"seed {k}: output is neither the image nor its mirror")
    assert outcomes == {"plain", "mirrored"}
    # the mirrored box, in pixels: xmin' = (1 - xmax) * w * scale; padding stays bottom/right
    scale = S / w
    np.testing.assert_allclose(mirrored[1][0].numpy(),
                               [12 * scale, (w - 36) * scale, 36 * scale, (w - 9) * scale],
                               atol=1e-3)
    assert (mirrored[0].numpy()[round(h * scale) + 1:] == 0).all()


def _inside_outside(image: np.ndarray, box: np.ndarray) -> tuple[float, float]:
    """Mean of the image inside the box (shrunk by 1.5 px) and outside it (grown by 1.5 px).
    The image around the box is black and so is the padding."""
    s = image.shape[0]
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    y0, x0, y1, x1 = box
    inner = (yy > y0 + 1.5) & (yy < y1 - 1.5) & (xx > x0 + 1.5) & (xx < x1 - 1.5)
    outer = ~((yy > y0 - 1.5) & (yy < y1 + 1.5) & (xx > x0 - 1.5) & (xx < x1 + 1.5))
    grey = image.mean(axis=-1)
    return grey[inner].mean(), grey[outer].mean()


@pytest.mark.parametrize("keep_aspect", [True, False])
def test_scale_jitter_keeps_boxes_on_their_pixels(keep_aspect):
    h, w = 150, 200
    box_px = (30, 50, 105, 140)
    img = _white_box(h, w, box_px)
    norm = tf.constant([[box_px[0] / h, box_px[1] / w, box_px[2] / h, box_px[3] / w]])
    cfg = InputConfig(image_size=S, keep_aspect_ratio=keep_aspect, scale_jitter=(0.5, 2.0),
                      color_jitter=0.0, max_boxes=2)
    fn = _transform_fn(cfg)
    sizes, offsets = [], []
    for k in range(40):
        image, boxes, labels = (t.numpy() for t in fn(tf.constant(img), norm,
                                                      tf.constant([0], tf.int32),
                                                      tf.constant([7, k], tf.int64)))
        assert (labels[1:] == -1).all() and (boxes[1:] == -1).all()
        if labels[0] < 0:
            continue
        box = boxes[0]
        inside, outside = _inside_outside(image, box)
        assert inside > 235, (k, box, inside)
        assert outside < 12, (k, box, outside)
        sizes.append(box[2] - box[0])
        offsets.append(box[0])
    assert len(sizes) >= 30
    assert max(sizes) > 1.5 * min(sizes)  # the zoom varies
    assert np.std(offsets) > 2  # and so does the crop window


def test_boxes_mostly_cropped_away_are_dropped_and_kept_ones_stay_aligned():
    h, w = 100, 100
    box_px = (5, 5, 25, 25)  # a small box in the top-left corner
    img = _white_box(h, w, box_px)
    norm = tf.constant([[0.05, 0.05, 0.25, 0.25]])
    cfg = InputConfig(image_size=S, scale_jitter=(3.0, 3.0), color_jitter=0.0,
                      horizontal_flip=False, max_boxes=1)
    fn = _transform_fn(cfg)
    full = 20 * 3 * S / 100  # the box's side after the zoom, in input pixels
    kept = dropped = 0
    for k in range(30):
        image, boxes, labels = (t.numpy() for t in fn(tf.constant(img), norm,
                                                      tf.constant([0], tf.int32),
                                                      tf.constant([1, k], tf.int64)))
        if labels[0] < 0:
            dropped += 1
            assert (boxes == -1).all()
            # under a quarter of the box's pixels are in the window
            assert (image.mean(axis=-1) > 128).sum() < 0.25 * full**2 + 2 * full
            continue
        kept += 1
        inside, _ = _inside_outside(image, boxes[0])
        assert inside > 235
        area = (boxes[0, 2] - boxes[0, 0]) * (boxes[0, 3] - boxes[0, 1])
        assert area >= 0.25 * full * full - 1e-3
    assert kept > 0 and dropped > 0


def test_color_jitter_keeps_padding_black_and_values_in_range():
    img = np.random.default_rng(1).integers(0, 255, (60, 120, 3), dtype=np.uint8)
    cfg = InputConfig(image_size=S, color_jitter=0.5, scale_jitter=(1.0, 1.0))
    fn = _transform_fn(cfg)
    means = []
    for k in range(8):
        out = fn(tf.constant(img), tf.zeros([0, 4]), tf.zeros([0], tf.int32),
                 tf.constant([2, k], tf.int64))[0].numpy()
        assert out.min() >= 0 and out.max() <= 255
        assert (out[S // 2 + 1:] == 0).all()  # 60x120 → 64x128, rows below are padding
        means.append(out[: S // 2 - 1].mean())
    assert np.std(means) > 3  # the brightness/contrast actually change


def test_an_example_without_boxes_is_all_padding(tmp_path):
    img = np.full((40, 50, 3), 200, np.uint8)
    path = _write(tmp_path / "e.tfrecord", [_record(img, [], [], name=f"e{i}")
                                             for i in range(3)])
    cfg = InputConfig(image_size=S, batch_size=2, max_boxes=4, shuffle_buffer=4)
    for training in (True, False):
        images, target = next(iter(make_dataset([path], [1, 2], cfg, training=training)))
        assert images.shape == (2, S, S, 3)
        assert (target["boxes"].numpy() == -1).all()
        assert (target["labels"].numpy() == -1).all()


def test_boxes_beyond_max_boxes_are_truncated(tmp_path):
    img = np.full((40, 40, 3), 100, np.uint8)
    boxes = [(0.1 * i, 0.1 * i, 0.1 * i + 0.3, 0.1 * i + 0.3) for i in range(5)]
    path = _write(tmp_path / "t.tfrecord", [_record(img, boxes, [1] * 5)])
    cfg = InputConfig(image_size=S, max_boxes=3)
    _, target = next(iter(make_dataset([path], [1], cfg, training=False)))
    assert target["labels"].numpy().tolist() == [[0, 0, 0]]
    np.testing.assert_allclose(target["boxes"][0, :, 0].numpy(), [0, 0.1 * S, 0.2 * S],
                               atol=1e-3)


def test_config_and_paths_are_validated():
    with pytest.raises(ValueError, match="scale_jitter"):
        make_dataset(["x"], [1], InputConfig(scale_jitter=(1.2, 0.8)), training=True)
    with pytest.raises(ValueError, match="no shard files"):
        make_dataset([], [1], InputConfig(), training=True)
