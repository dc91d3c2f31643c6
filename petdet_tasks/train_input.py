"""The training input pipeline: committed TFRecord shards → batches for ``model.fit``.

* :func:`stage_shards` — copies one split's shards of a committed ``tfrecords`` output into a
  local cache folder (``cache_dir/<fingerprint>/``), each verified against the manifest's
  sha256; files already there and intact are reused, damaged ones fetched again.
* :func:`make_dataset` — a ``tf.data`` pipeline over local shard files yielding
  ``(images, {"boxes": boxes, "labels": labels})`` as keras-hub's RetinaNet expects with
  ``bounding_box_format="yxyx"``:

  - ``images`` float32 ``[B, S, S, 3]``, values 0..255 (the model's preprocessor rescales);
  - ``boxes`` float32 ``[B, max_boxes, 4]``, absolute pixels of the S×S input,
    ``(ymin, xmin, ymax, xmax)``;
  - ``labels`` int32 ``[B, max_boxes]``, contiguous class indices ``0..C-1`` (label-map ids
    sorted ascending, see :func:`label_index`);
  - padding rows: boxes ``-1``, labels ``-1``. An image without boxes is all padding.

Geometry. Every image goes through one resampling, :func:`tf.image.crop_and_resize` with a
box computed so that its sample grid is exactly the half-pixel-centre mapping of a plain
resize: an output pixel centre ``i + 0.5`` reads source coordinate ``(i + 0.5 + offset) /
scale`` (continuous coordinates, pixel edges on integers), and a box edge ``u`` (source pixels)
lands on ``u * scale - offset``. ``keep_aspect_ratio`` letterboxes (longest side → S, padding
bottom/right, value 0), otherwise the image is stretched to S×S. Samples that fall outside the
image read 0 (padding); a source pixel's outer half at the image border therefore reads as
padding, a sub-pixel effect.

Augmentation (``training=True`` only), each draw from stateless random ops keyed by
``(seed, element number)`` so that a seed reproduces:

* horizontal flip with probability 1/2: the source is mirrored (the sample box is mirrored),
  boxes become ``xmin' = 1 - xmax``, ``xmax' = 1 - xmin`` — letterbox padding stays
  bottom/right;
* scale jitter: ``s`` log-uniform in ``scale_jitter``, the image scaled by ``s`` on top of the
  letterbox scale; where the scaled image is larger than S a uniformly random S-wide window is
  cut out of it, where smaller it is padded bottom/right (as the letterbox). Boxes are moved
  and scaled with the pixels, clipped to the S×S input, and dropped when less than
  ``MIN_VISIBLE_FRACTION`` of their area remains or they are under ``MIN_BOX_PIXELS`` wide
  or high;
* colour jitter of strength ``j``: brightness ``± j * 255``, contrast and saturation factors
  in ``[1 - j, 1 + j]``, folded into one affine map per image (``a * rgb + b * luma + c``,
  several times cheaper than the ``tf.image.adjust_*`` chain), applied before the resampling
  so that the padding stays 0; results clipped to 0..255.

Labels. Records carry label-map ids (1-based, possibly sparse after ``classes="present"``);
they are mapped to contiguous indices inside the graph. An id missing from the label map
cannot raise a readable error from inside a ``tf.data`` map function, so it maps to ``-1``
and its box is dropped (the image is kept). The tfrecords step only writes ids from its own
``label_map.pbtxt``, so with that label map this never happens.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from petdet_tasks.errors import ConfigError
from petdet_tasks.label_map import LabelMap, parse_label_map
from petdet_tasks.layout import step_prefix
from petdet_tasks.manifest import load_output
from petdet_tasks.store import Store, sha256_file

log = logging.getLogger(__name__)

MIN_VISIBLE_FRACTION = 0.25  # share of a box's area that must stay inside the input
MIN_BOX_PIXELS = 1.0  # boxes thinner than this (in input pixels) are dropped
LUMA = (0.299, 0.587, 0.114)  # the grey axis of the saturation jitter (ITU-R 601)

_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/object/bbox/ymin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/xmin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/ymax": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/xmax": tf.io.VarLenFeature(tf.float32),
    "image/object/class/label": tf.io.VarLenFeature(tf.int64),
}
_BOX_KEYS = tuple(f"image/object/bbox/{c}" for c in ("ymin", "xmin", "ymax", "xmax"))
_SPLIT_RE = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class InputConfig:
    """:param image_size: S, the model input is S×S.
    :param keep_aspect_ratio: letterbox (longest side → S, pad bottom/right with 0); else
        stretch to S×S.
    :param batch_size: images per batch (training batches drop the remainder).
    :param max_boxes: boxes per image after padding/truncation.
    :param horizontal_flip: random left-right flip (training).
    :param scale_jitter: ``(lo, hi)``: random zoom ``s`` (log-uniform), then crop/pad back
        to S×S (training); ``(1, 1)`` disables.
    :param color_jitter: brightness/contrast/saturation strength (training); 0 disables.
    :param shuffle_buffer: serialized records in the shuffle buffer (training), at most one
        epoch's worth (~100 KB each for the pets: the default holds ~200 MB).
    :param seed: seeds each epoch's file order, the shuffling and every augmentation draw
        (element ``k`` of the stream draws from ``(seed, k)``); a resumed run keeps the seed
        and passes ``skip`` to :func:`make_dataset`.
    :param parallel: False = the sequential variant: no interleave, ``num_parallel_calls=1``,
        no prefetch (and tf.data's automatic map parallelisation/prefetch injection off).
    """

    image_size: int = 384
    keep_aspect_ratio: bool = True
    batch_size: int = 8
    max_boxes: int = 8
    horizontal_flip: bool = True
    scale_jitter: tuple[float, float] = (0.8, 1.25)
    color_jitter: float = 0.1
    shuffle_buffer: int = 2048
    seed: int = 0
    parallel: bool = True

    def validate(self) -> InputConfig:
        problems = []
        if not (isinstance(self.image_size, int) and 16 <= self.image_size <= 4096):
            problems.append(f"image_size must be an integer in 16..4096, got {self.image_size!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            problems.append(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not (isinstance(self.max_boxes, int) and self.max_boxes >= 1):
            problems.append(f"max_boxes must be a positive integer, got {self.max_boxes!r}")
        try:
            lo, hi = (float(v) for v in self.scale_jitter)
            if not (0.0 < lo <= hi):
                raise ValueError
        except (TypeError, ValueError):
            problems.append("scale_jitter must be (lo, hi) with 0 < lo <= hi, got "
                            f"{self.scale_jitter!r}")
        if not (0.0 <= float(self.color_jitter) < 1.0):
            problems.append(f"color_jitter must be in [0, 1), got {self.color_jitter!r}")
        if not (isinstance(self.shuffle_buffer, int) and self.shuffle_buffer >= 1):
            problems.append(f"shuffle_buffer must be a positive integer, got "
                            f"{self.shuffle_buffer!r}")
        if problems:
            raise ConfigError("invalid input config: " + "; ".join(problems), problems)
        return self

    def to_json(self) -> dict:
        d = asdict(self)
        d["scale_jitter"] = list(self.scale_jitter)
        return d


# ---------------------------------------------------------------------------------------------
# Staging
# ---------------------------------------------------------------------------------------------

def _is_shard(rel: str, split: str) -> bool:
    return re.fullmatch(rf"{re.escape(split)}-\d{{5}}-of-\d{{5}}\.tfrecord", rel) is not None


def stage_shards(store: Store, tfrecords_uri: str, split: str,
                 cache_dir: str | os.PathLike) -> list[Path]:
    """Local copies of the ``split`` shards of a committed tfrecords output, sorted.

    Files go to ``cache_dir/<fingerprint>/`` and are checked against the manifest's sha256:
    an intact copy (size and sha256 match) is reused, anything else is downloaded again
    (atomically: a failed download leaves no file)."""
    if not _SPLIT_RE.fullmatch(split):
        raise ConfigError(f"invalid split name {split!r}: expected letters, digits or '_'")
    result = load_output(store, tfrecords_uri, expect_step="tfrecords")
    files: Mapping[str, dict] = result.manifest["files"]
    names = sorted(rel for rel in files if _is_shard(rel, split))
    if not names:
        from petdet_tasks.tfrecords import splits_of

        raise FileNotFoundError(
            f"{tfrecords_uri} has no {split!r} shards ({split}-NNNNN-of-NNNNN.tfrecord); "
            f"its splits: {', '.join(splits_of(files)) or 'none'}")
    prefix = step_prefix("tfrecords", result.fingerprint)
    local_dir = Path(cache_dir) / result.fingerprint
    out, fetched, reused = [], 0, 0
    for rel in names:
        entry = files[rel]
        local = local_dir / rel
        if local.is_file():
            if local.stat().st_size == entry["size"] and \
                    sha256_file(local).sha256 == entry["sha256"]:
                log.info("cached: %s (%d bytes, sha256 verified)", local, entry["size"])
                out.append(local)
                reused += 1
                continue
            log.warning("cached %s does not match the manifest (size or sha256); "
                        "downloading it again", local)
        store.download_file(prefix + rel, local, sha256=entry["sha256"])
        log.info("downloaded %s → %s (%d bytes)", store.uri(prefix + rel), local, entry["size"])
        out.append(local)
        fetched += 1
    log.info("staged %d %s shards of %s in %s (%d downloaded, %d cached)", len(out), split,
             tfrecords_uri, local_dir, fetched, reused)
    return out


def load_records_label_map(store: Store, tfrecords_uri: str) -> LabelMap:
    """The ``label_map.pbtxt`` written beside the shards (the classes the records use)."""
    result = load_output(store, tfrecords_uri, expect_step="tfrecords")
    key = step_prefix("tfrecords", result.fingerprint) + "label_map.pbtxt"
    return parse_label_map(store.read_text(key), source=store.uri(key))


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------

def label_index(label_ids: Sequence[int]) -> dict[int, int]:
    """``{label-map id: contiguous index}``, indices following the ids sorted ascending
    (ids ``[1, 2, 6]`` → ``{1: 0, 2: 1, 6: 2}``). Ids must be distinct positive integers.

    Inside the pipeline an id not in the mapping becomes ``-1`` and its box is dropped (see
    the module doc)."""
    ids = [int(i) for i in label_ids]
    if not ids:
        raise ValueError("label_ids is empty: need at least one class")
    if any(i < 1 for i in ids) or any(int(i) != i for i in label_ids):
        raise ValueError(f"label ids must be positive integers, got {list(label_ids)}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"label ids must be distinct, got {list(label_ids)}")
    return {i: k for k, i in enumerate(sorted(ids))}


def _lookup_table(index: Mapping[int, int]) -> np.ndarray:
    table = np.full(max(index) + 1, -1, dtype=np.int32)
    for i, k in index.items():
        table[i] = k
    return table


def _map_labels(ids: tf.Tensor, table: np.ndarray) -> tf.Tensor:
    top = len(table) - 1
    valid = (ids >= 0) & (ids <= top)
    return tf.where(valid, tf.gather(tf.constant(table), tf.clip_by_value(ids, 0, top)),
                    tf.constant(-1, tf.int32))


# ---------------------------------------------------------------------------------------------
# Parsing and the per-image transform
# ---------------------------------------------------------------------------------------------

def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """One OD API tf.Example → ``{"image": uint8 [H, W, 3], "boxes": float32 [n, 4]
    normalised (ymin, xmin, ymax, xmax), "labels": int64 [n] label-map ids}``."""
    f = tf.io.parse_single_example(serialized, _FEATURES)
    image = tf.io.decode_jpeg(f["image/encoded"], channels=3)
    boxes = tf.stack([tf.sparse.to_dense(f[k]) for k in _BOX_KEYS], axis=-1)
    labels = tf.sparse.to_dense(f["image/object/class/label"])
    check = tf.debugging.assert_equal(
        tf.shape(labels)[0], tf.shape(boxes)[0],
        message="record has a different number of box coordinates and class labels")
    with tf.control_dependencies([check]):
        labels = tf.identity(labels)
    return {"image": image, "boxes": tf.reshape(boxes, [-1, 4]), "labels": labels}


def _uniform(seed: tf.Tensor, lo, hi) -> tf.Tensor:
    return tf.random.stateless_uniform([], seed, minval=lo, maxval=hi, dtype=tf.float32)


def _color_coefficients(seed: tf.Tensor, strength: float, mean_luma: tf.Tensor
                        ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """``(a, b, offset)`` with ``rgb' = a * rgb + b * luma(rgb) + offset``: brightness, then
    contrast around the image's mean luma, then saturation towards each pixel's luma, folded
    into one affine map (luma weights sum to 1, so luma commutes with the offsets)."""
    s1, s2, s3 = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    delta = _uniform(s1, -strength, strength) * 255.0
    contrast = _uniform(s2, 1.0 - strength, 1.0 + strength)
    saturation = _uniform(s3, 1.0 - strength, 1.0 + strength)
    # brightness + contrast: y = c * (x + d - m') + m' with m' = m + d
    offset = contrast * delta + (1.0 - contrast) * (mean_luma + delta)
    # saturation: z = s * y + (1 - s) * luma(y), luma(y) = c * luma(x) + offset
    return saturation * contrast, (1.0 - saturation) * contrast, offset


def input_scale(h: tf.Tensor, w: tf.Tensor, size: int, keep_aspect_ratio: bool
                ) -> tuple[tf.Tensor, tf.Tensor]:
    """``(sy, sx)``: source pixels → model-input pixels (float32 ``h``/``w``)."""
    if keep_aspect_ratio:
        s = float(size) / tf.maximum(h, w)
        return s, s
    return float(size) / h, float(size) / w


def sample_box(h, w, sy, sx, size: int, off_y=0.0, off_x=0.0):
    """The ``crop_and_resize`` box (normalised by H-1 / W-1, "align corners" style) whose sample
    grid is the half-pixel mapping: output centre ``i + 0.5`` ↔ source index
    ``(i + 0.5 + off) / s - 0.5``. Returns ``(y1, x1, y2, x2)``; works on scalars or
    per-image vectors (the serving signatures letterbox whole batches with it)."""
    s_f = float(size)
    dy = tf.maximum(h - 1.0, 1.0)
    dx = tf.maximum(w - 1.0, 1.0)
    y1 = ((0.5 + off_y) / sy - 0.5) / dy
    y2 = y1 + (s_f - 1.0) / (sy * dy)
    x1 = ((0.5 + off_x) / sx - 0.5) / dx
    x2 = x1 + (s_f - 1.0) / (sx * dx)
    return y1, x1, y2, x2


def transform_example(image: tf.Tensor, boxes: tf.Tensor, labels: tf.Tensor, cfg: InputConfig,
                      *, seed: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """One parsed image → the model's per-image input (module doc): ``(image float32 [S, S, 3],
    boxes float32 [max_boxes, 4] pixels, labels int32 [max_boxes])``.

    ``labels`` are contiguous indices already (``-1`` = drop the box). ``seed`` (int
    ``[2]``) turns on the augmentation of ``cfg``; None = the deterministic eval transform.
    Graph-safe: used inside ``tf.data`` map functions."""
    size = cfg.image_size
    s_f = float(size)
    shape = tf.shape(image)
    h = tf.cast(shape[0], tf.float32)
    w = tf.cast(shape[1], tf.float32)
    sy, sx = input_scale(h, w, size, cfg.keep_aspect_ratio)
    boxes = tf.cast(boxes, tf.float32)
    off_y = off_x = tf.constant(0.0)
    flip = tf.constant(False)
    pixels = tf.cast(image, tf.float32)
    if seed is not None:
        seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
        k_flip, k_scale, k_y, k_x, k_color = tf.unstack(
            tf.random.experimental.stateless_split(seed, 5))
        lo, hi = (float(v) for v in cfg.scale_jitter)
        if hi > lo:
            scale = tf.exp(_uniform(k_scale, np.log(lo), np.log(hi)))
        else:
            scale = tf.constant(lo, tf.float32)
        sy, sx = sy * scale, sx * scale
        off_y = _uniform(k_y, 0.0, 1.0) * tf.maximum(h * sy - s_f, 0.0)
        off_x = _uniform(k_x, 0.0, 1.0) * tf.maximum(w * sx - s_f, 0.0)
        if cfg.horizontal_flip:
            flip = _uniform(k_flip, 0.0, 1.0) < 0.5
        if cfg.color_jitter > 0:
            # elementwise on purpose: a [P, 3] x [3, 3] matmul is slower on CPU and runs on
            # oneDNN's own threads, outside tf.data's threading limits
            luma = (pixels[..., 0:1] * LUMA[0] + pixels[..., 1:2] * LUMA[1]
                    + pixels[..., 2:3] * LUMA[2])
            a, b, offset = _color_coefficients(k_color, float(cfg.color_jitter),
                                               tf.reduce_mean(luma))
            pixels = tf.clip_by_value(a * pixels + (b * luma + offset), 0.0, 255.0)

    y1, x1, y2, x2 = sample_box(h, w, sy, sx, size, off_y, off_x)
    # mirroring the source: index x ↔ (W-1) - x, i.e. normalised x ↔ 1 - x
    x1, x2 = tf.where(flip, 1.0 - x1, x1), tf.where(flip, 1.0 - x2, x2)
    out = tf.image.crop_and_resize(pixels[None], tf.stack([y1, x1, y2, x2])[None],
                                   tf.zeros([1], tf.int32), [size, size],
                                   extrapolation_value=0.0)[0]

    ymin, xmin, ymax, xmax = tf.unstack(boxes, num=4, axis=-1)
    xmin, xmax = tf.where(flip, 1.0 - xmax, xmin), tf.where(flip, 1.0 - xmin, xmax)
    raw = tf.stack([ymin * h * sy - off_y, xmin * w * sx - off_x,
                    ymax * h * sy - off_y, xmax * w * sx - off_x], axis=-1)
    clipped = tf.clip_by_value(raw, 0.0, s_f)
    bh = clipped[:, 2] - clipped[:, 0]
    bw = clipped[:, 3] - clipped[:, 1]
    raw_area = (raw[:, 2] - raw[:, 0]) * (raw[:, 3] - raw[:, 1])
    keep = ((labels >= 0) & (bh >= MIN_BOX_PIXELS) & (bw >= MIN_BOX_PIXELS)
            & (bh * bw >= MIN_VISIBLE_FRACTION * raw_area))
    kept_boxes = tf.boolean_mask(clipped, keep)[:cfg.max_boxes]
    kept_labels = tf.boolean_mask(tf.cast(labels, tf.int32), keep)[:cfg.max_boxes]
    pad = cfg.max_boxes - tf.shape(kept_labels)[0]
    out_boxes = tf.pad(kept_boxes, [[0, pad], [0, 0]], constant_values=-1.0)
    out_labels = tf.pad(kept_labels, [[0, pad]], constant_values=-1)
    out.set_shape([size, size, 3])
    out_boxes.set_shape([cfg.max_boxes, 4])
    out_labels.set_shape([cfg.max_boxes])
    return out, out_boxes, out_labels


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------

MAX_READERS = 64  # shard files read at once (interleaved record by record)
_RECORD_HEADER = 12  # uint64 length + uint32 masked crc of the length; the data's crc follows


def count_records(path: str | os.PathLike) -> int:
    """Records in a TFRecord file, counted from the length headers (seeks, no data read)."""
    n = 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        while pos < size:
            header = f.read(_RECORD_HEADER)
            if len(header) < _RECORD_HEADER:
                raise ValueError(f"{path}: truncated TFRecord header at byte {pos}")
            pos += _RECORD_HEADER + int.from_bytes(header[:8], "little") + 4
            if pos > size:
                raise ValueError(f"{path}: truncated TFRecord at byte {pos}")
            f.seek(pos)
            n += 1
    return n


def _graph_only(fn):
    """A ``tf.data`` function that autograph need not convert: everything in it is TF ops or
    Python branching on Python values (the config), so converting its source only costs time
    (about a second per input pipeline built here)."""
    return tf.autograph.experimental.do_not_convert(fn)


def _training_records(files: list[str], cfg: InputConfig, epoch_size: int, *, skip: int,
                      repeat: bool) -> tf.data.Dataset:
    """The serialized records of the training stream after its first ``skip`` elements.

    Epoch ``e`` reads every file once, in an order drawn from ``(seed, e)``, up to
    ``MAX_READERS`` files at a time interleaved record by record (deterministically: the
    stream is a function of the seed, so a resumed run can skip to where it was). A shuffle
    buffer (at most one epoch) mixes records across files and epoch boundaries: every record
    is drawn once per epoch's worth of elements, give or take the buffer."""
    first_epoch, within = divmod(skip, epoch_size) if repeat else (0, skip)
    names = tf.constant(files)
    seed = cfg.seed
    cycle = min(len(files), MAX_READERS)

    @_graph_only
    def epoch(e):
        order = tf.random.experimental.stateless_shuffle(
            names, seed=tf.stack([tf.constant(seed, tf.int64), e]))
        ds = tf.data.Dataset.from_tensor_slices(order)
        if cfg.parallel:
            return ds.interleave(tf.data.TFRecordDataset, cycle_length=cycle, block_length=1,
                                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.flat_map(tf.data.TFRecordDataset)

    epochs = (tf.data.Dataset.counter(first_epoch) if repeat
              else tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)))
    ds = epochs.flat_map(epoch)
    if within:
        # reads (does not decode) at most one epoch of records
        ds = ds.skip(within)
    # a fresh buffer draws afresh: seeded by where the stream starts, so a resumed run does
    # not replay the first run's draws on other records
    return ds.shuffle(max(1, min(cfg.shuffle_buffer, epoch_size)),
                      seed=(seed * 1_000_003 + skip + 1) % 2**31)


def make_dataset(paths: Sequence[str | os.PathLike], label_ids: Sequence[int], cfg: InputConfig,
                 *, training: bool, repeat: bool | None = None, skip: int = 0
                 ) -> tf.data.Dataset:
    """Batches ``(images, {"boxes": boxes, "labels": labels})`` from local shard files (module
    doc for the contract).

    ``training=True``: one stream for the whole training (:func:`_training_records`): every
    epoch all files in a new seeded order, up to ``MAX_READERS`` read interleaved, a shuffle
    buffer, repeated (``repeat`` default True); parse + decode + augment in a parallel map
    (element ``k`` of the stream augmented with the draws of ``(seed, k)``), fixed-size
    batches (remainder dropped), prefetch. ``skip``: elements (images) of that stream already
    trained on — a resumed training continues the stream where it stopped (the epoch, the
    file order, the augmentation draws) instead of starting at the heads of the files again.
    ``training=False``: files and records in the given order, no augmentation, no repeat
    (``repeat`` default False), the last batch may be short. ``cfg.parallel=False`` runs the
    same operations sequentially (the benchmark's baseline)."""
    cfg.validate()
    files = [os.fspath(p) for p in paths]
    if not files:
        raise ValueError("make_dataset: no shard files given (stage_shards returns them)")
    if not (isinstance(skip, int) and skip >= 0):
        raise ValueError(f"skip must be a non-negative integer, got {skip!r}")
    table = _lookup_table(label_index(label_ids))
    repeat = training if repeat is None else repeat
    autotune = tf.data.AUTOTUNE

    if training:
        epoch_size = sum(count_records(f) for f in files)
        if epoch_size == 0:
            raise ValueError(f"make_dataset: the {len(files)} shard files hold no records")
        ds = _training_records(files, cfg, epoch_size, skip=skip, repeat=repeat)
    else:
        ds = tf.data.TFRecordDataset(files)
        if repeat:
            ds = ds.repeat()

    if training:
        # element k of the stream draws its augmentation from the stateless seed (seed, k)
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.counter(skip)))

        @_graph_only
        def _map(serialized, k):
            return _element(serialized, tf.stack([tf.constant(cfg.seed, tf.int64), k]))
    else:
        @_graph_only
        def _map(serialized):
            return _element(serialized, None)

    def _element(serialized, seed):
        ex = parse_example(serialized)
        image, boxes, labels = transform_example(
            ex["image"], ex["boxes"], _map_labels(ex["labels"], table), cfg, seed=seed)
        return image, {"boxes": boxes, "labels": labels}

    # every element has the same shapes after the transform (boxes padded/truncated to
    # max_boxes), so a plain batch is the padded batch
    if cfg.parallel:
        ds = ds.map(_map, num_parallel_calls=autotune, deterministic=not training)
        # the batch copies (8 x 1.8 MB of float32 at 384 px) are spread over threads as well
        ds = ds.batch(cfg.batch_size, drop_remainder=training, num_parallel_calls=autotune,
                      deterministic=not training)
        ds = ds.prefetch(autotune)
    else:
        ds = ds.map(_map)  # synchronous: one element at a time, in the consumer's thread
        ds = ds.batch(cfg.batch_size, drop_remainder=training)

    options = tf.data.Options()
    options.deterministic = not training
    if not cfg.parallel:
        options.experimental_optimization.map_parallelization = False
        options.experimental_optimization.inject_prefetch = False
    return ds.with_options(options)
