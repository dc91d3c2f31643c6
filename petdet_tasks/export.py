"""The export step: a training output → a model people can serve (``models/<fingerprint>/``).

``export(store, training_uri, ExportConfig())`` writes:

* ``saved_model/`` — a TF2 SavedModel (``keras.export.ExportArchive``) with two signatures,
  both returning the TF Object Detection API contract (float32, ``max_detections`` rows per
  image, sorted by score):

  - ``serving_default``: ``input_tensor`` uint8 ``[N, H, W, 3]`` (any N, H, W);
  - ``encoded_image_string_tensor``: ``input_tensor`` string ``[N]``, encoded JPEG/PNG/GIF/BMP
    (each image its own size);

  outputs ``num_detections [N]``, ``detection_boxes [N, 100, 4]`` (ymin, xmin, ymax, xmax,
  normalised to the *original* image, clipped to 0..1), ``detection_scores [N, 100]``,
  ``detection_classes [N, 100]`` (1-based label-map ids). Rows past ``num_detections`` are
  zero (class 0 is no label-map id).
* ``frozen_inference_graph.pb`` — the same uint8 function as a TF1 frozen ``GraphDef``: input
  ``image_tensor:0``, outputs ``detection_boxes:0``, ``detection_scores:0``,
  ``detection_classes:0``, ``num_detections:0``; loads with ``tf.compat.v1`` exactly as the
  2019 tutorial's ``object_detection_run.py`` loads it.
* ``label_map.pbtxt`` (the training's) and ``pipeline.json`` (the training config, the
  training and records URIs, the input geometry and this export's config).

Inside every signature: the image is letterboxed to the training size exactly as the training
input pipeline's eval transform does it (:func:`petdet_tasks.train_input.sample_box`), the
RetinaNet runs, its box deltas are decoded against the anchors, boxes are mapped back to the
original image, normalised and clipped (a box wholly outside the image — in the letterbox
padding — is dropped, as the OD API's NMS drops it), and one ``CombinedNonMaxSuppression``
(per class, IoU ``iou_threshold``, scores ≥ ``score_threshold``) keeps the best
``max_detections``.

Verification before the manifest (a failure commits nothing): on fixture images — the first
val image of the records the model was trained on, and synthetic images of odd sizes in a
batch of two — every signature of the *reloaded* SavedModel and the frozen graph (through a
``tf.compat.v1.Session``) must agree with the same computation run eagerly on the Keras
model: same detections (matched order-insensitively, since near-tied scores can swap rows),
scores and box coordinates within :data:`PARITY_ATOL`; each image's best detection exactly so,
and at most 5% (at least 2) "NMS flips": detections missing from one output where a
same-class detection scoring as high overlaps them at about the IoU threshold, so that NMS
kept one or the other depending on the last float bits (:func:`compare_detections`). The eager
path's best detection is also checked against keras-hub's own decoder, and the model's raw
outputs must be finite.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
from pathlib import Path

import numpy as np

from petdet_tasks import worker_cache
from petdet_tasks.errors import ConfigError, PermanentError
from petdet_tasks.layout import cache_root, canonical_json, fingerprint, output_uri, step_prefix
from petdet_tasks.manifest import StepResult, StepWriter, fetch_tree, load_output, run_step
from petdet_tasks.store import Store

log = logging.getLogger(__name__)

STEP = "export"
SCHEMA_VERSION = 3  # 2: boxes wholly outside the image dropped before NMS; 3: PNG alpha on white
SIGNATURE_IMAGES = "serving_default"
SIGNATURE_ENCODED = "encoded_image_string_tensor"
INPUT_KEY = "input_tensor"
OUTPUT_KEYS = ("num_detections", "detection_boxes", "detection_scores", "detection_classes")
FROZEN_GRAPH = "frozen_inference_graph.pb"
FROZEN_INPUT = "image_tensor:0"
FROZEN_OUTPUTS = ("detection_boxes:0", "detection_scores:0", "detection_classes:0",
                  "num_detections:0")
# the stated tolerance: |score| and |normalised box coordinate| differences between the
# exported runtimes and the eager Keras model (float32 throughout; seen: ~1e-6)
PARITY_ATOL = 1e-4
# NMS near its IoU threshold may keep a different box in another runtime (compare_detections)
NMS_FLIP_FRACTION = 0.05
NMS_FLIP_IOU_BAND = 0.05


class ExportError(PermanentError, RuntimeError):
    """The model cannot be exported as it is, or an exported artefact disagrees with it."""


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What the serving graph bakes in (all part of the fingerprint)."""

    score_threshold: float = 0.05
    iou_threshold: float = 0.5
    max_detections: int = 100

    def validate(self) -> ExportConfig:
        errors = []
        if not 0.0 <= self.score_threshold < 1.0:
            errors.append(f"score_threshold must be in [0, 1), got {self.score_threshold!r}")
        if not 0.0 < self.iou_threshold <= 1.0:
            errors.append(f"iou_threshold must be in (0, 1], got {self.iou_threshold!r}")
        if not (isinstance(self.max_detections, int) and 1 <= self.max_detections <= 1000):
            errors.append(f"max_detections must be an int in 1..1000, got "
                          f"{self.max_detections!r}")
        if errors:
            raise ConfigError("bad export config: " + "; ".join(errors), errors)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> ExportConfig:
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown export config fields {unknown}; known: "
                              f"{[f.name for f in dataclasses.fields(cls)]}")
        return cls(**d).validate()


# ---------------------------------------------------------------------------------------------
# The serving functions
# ---------------------------------------------------------------------------------------------

class ServingFunctions:
    """The detector wrapped as plain TF functions of images (module doc for the contract).

    The methods run eagerly as they are (the parity reference) and trace into the SavedModel
    signatures and the frozen graph."""

    def __init__(self, detector, label_ids, *, image_size: int, keep_aspect_ratio: bool,
                 cfg: ExportConfig):
        import tensorflow as tf

        self.tf = tf
        self.detector = detector
        self.size = int(image_size)
        self.keep_aspect_ratio = bool(keep_aspect_ratio)
        self.cfg = cfg
        probe = tf.zeros([1, self.size, self.size, 3])
        anchors = detector.anchor_generator(probe)
        self.anchors = tf.constant(
            tf.concat(list(anchors.values()), axis=0).numpy(), tf.float32)
        self.label_ids = tf.constant(sorted(int(i) for i in label_ids), tf.float32)

    # -- geometry ---------------------------------------------------------------------------
    def _letterbox(self, images, h, w):
        """float32 ``[N, S, S, 3]`` + the per-image normaliser ``[N, 2]`` (the original
        height and width in model-input pixels) for a batch of same-sized images."""
        from petdet_tasks.train_input import input_scale, sample_box

        tf = self.tf
        n = tf.shape(images)[0]
        sy, sx = input_scale(h, w, self.size, self.keep_aspect_ratio)
        box = tf.stack(sample_box(h, w, sy, sx, self.size))
        x = tf.image.crop_and_resize(tf.cast(images, tf.float32), tf.tile(box[None], [n, 1]),
                                     tf.range(n), [self.size, self.size],
                                     extrapolation_value=0.0)
        denom = tf.tile(tf.stack([h * sy, w * sx])[None], [n, 1])
        return x, denom

    # -- the model + decoding + NMS ---------------------------------------------------------
    def raw(self, x):
        """The RetinaNet heads on letterboxed float images (float32 outputs)."""
        tf = self.tf
        out = self.detector(self.detector.preprocessor(x), training=False)
        return {k: tf.cast(v, tf.float32) for k, v in out.items()}

    def detect_letterboxed(self, x, denom):
        import keras

        tf = self.tf
        raw = self.raw(x)
        boxes = keras.utils.bounding_boxes.decode_deltas_to_boxes(
            anchors=self.anchors, boxes_delta=raw["bbox_regression"],
            encoded_format="center_xywh",
            anchor_format=self.detector.anchor_generator.bounding_box_format,
            box_format="yxyx", image_shape=(self.size, self.size, 3))
        boxes = tf.convert_to_tensor(boxes)
        # model-input pixels → normalised to the original image (IoU is invariant under the
        # per-axis scaling, so NMS on normalised boxes keeps the same boxes)
        scale = tf.concat([denom, denom], axis=-1)[:, None, :]
        boxes = tf.clip_by_value(boxes / scale, 0.0, 1.0)
        # a box entirely in the letterbox padding (outside the image) clips to nothing: drop
        # it, as the OD API's NMS does (clip_to_window with filter_nonoverlapping)
        inside = ((boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1]))
        scores = tf.sigmoid(raw["cls_logits"]) * tf.cast(inside, tf.float32)[..., None]
        k = self.cfg.max_detections
        nms = tf.image.combined_non_max_suppression(
            boxes[:, :, None, :], scores, max_output_size_per_class=k, max_total_size=k,
            iou_threshold=self.cfg.iou_threshold, score_threshold=self.cfg.score_threshold,
            pad_per_class=False, clip_boxes=False)
        valid = nms.valid_detections
        live = tf.range(k)[None, :] < valid[:, None]
        classes = tf.gather(self.label_ids, tf.cast(nms.nmsed_classes, tf.int32))
        return {
            "num_detections": tf.cast(valid, tf.float32),
            "detection_boxes": tf.where(live[..., None], nms.nmsed_boxes, 0.0),
            "detection_scores": tf.where(live, nms.nmsed_scores, 0.0),
            "detection_classes": tf.where(live, classes, 0.0),
        }

    # -- the two inputs ----------------------------------------------------------------------
    def from_images(self, input_tensor):
        """uint8 ``[N, H, W, 3]`` → detections."""
        tf = self.tf
        shape = tf.shape(input_tensor)
        h = tf.cast(shape[1], tf.float32)
        w = tf.cast(shape[2], tf.float32)
        x, denom = self._letterbox(input_tensor, h, w)
        return self.detect_letterboxed(x, denom)

    def decode_on_white(self, data):
        """An encoded image → uint8 ``[H, W, 3]``, as the TFRecords step sees it: a PNG's
        transparency (an alpha channel, or a tRNS colour or palette entry) is composited onto
        white (``petdet_tasks.images``), not dropped, which turned transparent backgrounds into
        black or noise that the model never saw in training; other formats decode to RGB."""
        tf = self.tf

        def png():
            rgba = tf.cast(tf.io.decode_png(data, channels=4), tf.float32)
            alpha = rgba[..., 3:] / 255.0
            return tf.cast(tf.round(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)), tf.uint8)

        def other():
            return tf.io.decode_image(data, channels=3, dtype=tf.uint8,
                                      expand_animations=False)

        is_png = tf.equal(tf.strings.substr(data, 0, 8), b"\x89PNG\r\n\x1a\n")
        return tf.cond(is_png, png, other)

    def from_encoded(self, input_tensor):
        """string ``[N]`` (encoded images, any sizes) → detections."""
        tf = self.tf
        s = self.size

        def one(data):
            image = self.decode_on_white(data)
            shape = tf.shape(image)
            x, denom = self._letterbox(image[None], tf.cast(shape[0], tf.float32),
                                       tf.cast(shape[1], tf.float32))
            return x[0], denom[0]

        x, denom = tf.map_fn(one, input_tensor, fn_output_signature=(
            tf.TensorSpec([s, s, 3], tf.float32), tf.TensorSpec([2], tf.float32)))
        return self.detect_letterboxed(x, denom)

    def frozen_fn(self, image_tensor):
        """:meth:`from_images` with the TF1 tensor names of the 2019 tutorial's graph."""
        tf = self.tf
        out = self.from_images(image_tensor)
        return {k: tf.identity(out[k], name=k) for k in OUTPUT_KEYS}


# ---------------------------------------------------------------------------------------------
# Writing and loading the artefacts
# ---------------------------------------------------------------------------------------------

def write_saved_model(fns: ServingFunctions, path: Path) -> None:
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(fns.detector)
    archive.add_endpoint(SIGNATURE_IMAGES, fns.from_images, input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_KEY)])
    archive.add_endpoint(SIGNATURE_ENCODED, fns.from_encoded, input_signature=[
        tf.TensorSpec([None], tf.string, name=INPUT_KEY)])
    archive.write_out(str(path), verbose=False)


def write_frozen_graph(fns: ServingFunctions, path: Path) -> int:
    """The frozen GraphDef; returns its size in bytes."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    concrete = tf.function(fns.frozen_fn).get_concrete_function(
        tf.TensorSpec([None, None, None, 3], tf.uint8, name="image_tensor"))
    frozen = convert_variables_to_constants_v2(concrete)
    graph_def = frozen.graph.as_graph_def()
    names = {n.name for n in graph_def.node}
    missing = [t for t in (FROZEN_INPUT, *FROZEN_OUTPUTS) if t.split(":")[0] not in names]
    if missing:
        raise ExportError(f"frozen graph lacks the tensors {missing}")
    data = graph_def.SerializeToString()
    path.write_bytes(data)
    return len(data)


def run_frozen_graph(path: str | os.PathLike, images: np.ndarray) -> dict[str, np.ndarray]:
    """The tutorial's way: ``tf.compat.v1`` GraphDef → ``import_graph_def`` → ``Session.run``."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        graph_def = tf.compat.v1.GraphDef()
        with tf.io.gfile.GFile(os.fspath(path), "rb") as f:
            graph_def.ParseFromString(f.read())
        tf.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as sess:
        values = sess.run(list(FROZEN_OUTPUTS), {FROZEN_INPUT: images})
    return {k.split(":")[0]: np.asarray(v) for k, v in zip(FROZEN_OUTPUTS, values, strict=True)}


def load_saved_model(path: str | os.PathLike):
    import tensorflow as tf

    return tf.saved_model.load(os.fspath(path))


def call_signature(model, name: str, batch) -> dict[str, np.ndarray]:
    import tensorflow as tf

    fn = model.signatures[name]
    dtype = tf.string if name == SIGNATURE_ENCODED else tf.uint8
    out = fn(**{INPUT_KEY: tf.constant(batch, dtype=dtype)})
    return {k: np.asarray(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------

def compare_detections(ref: dict, got: dict, *, atol: float = PARITY_ATOL,
                       score_threshold: float = 0.0, iou_threshold: float = 0.5,
                       nms_flips: float = NMS_FLIP_FRACTION) -> dict:
    """Check that ``got`` holds the same detections as ``ref``: the same class, score and box
    within ``atol``, matched order-insensitively (near-tied scores can swap rows).

    Non-maximum suppression is discontinuous: where two boxes overlap at almost exactly the
    IoU threshold, a difference in the last float bits between two runtimes decides whether
    the second box survives (and, if it does, what it suppresses in turn). So a detection
    present in one output and missing from the other is accepted as such an "NMS flip" only
    when the other output holds a same-class detection scoring at least as high that overlaps
    it by at least ``iou_threshold - NMS_FLIP_IOU_BAND`` (it was suppressed there), and only
    up to ``max(2, nms_flips * n)`` of them per image and direction; each image's best
    detection must match (unless it is a sliver, below). Detections within ``atol`` of the
    score threshold, or of the lowest kept score when every row is used (the top-k cut), may
    fall on either side. So may a box within ``atol`` of having no area: the serving
    functions drop a box that clips to nothing (wholly in the letterbox padding), and a
    sliver on the image's edge clips to nothing in one runtime and to 1e-5 in another
    (``edge_drops``; such a box overlaps nothing, so it suppresses nothing). An export bug
    (preprocessing, scaling, class ids, weights) breaks far more than that. Returns the
    largest differences and the counts; raises :class:`ExportError` describing the first
    disagreement past those allowances."""
    for k in OUTPUT_KEYS:
        if k not in got:
            raise ExportError(f"output {k!r} missing (got {sorted(got)})")
        if got[k].dtype != np.float32:
            raise ExportError(f"{k} is {got[k].dtype}, expected float32")
        if got[k].shape != ref[k].shape:
            raise ExportError(f"{k} has shape {got[k].shape}, expected {ref[k].shape}")
        if not np.all(np.isfinite(got[k])):
            raise ExportError(f"{k} has non-finite values")
    max_score = max_box = 0.0
    compared = flips = edge_drops = 0
    rows = ref["detection_scores"].shape[1]
    for i in range(ref["num_detections"].shape[0]):
        a = _rows(ref, i)
        b = _rows(got, i)
        cut = score_threshold
        for rows_i in (a, b):
            if len(rows_i) == rows:
                cut = max(cut, min(s for _, s, _ in rows_i))
        for mine, theirs, label in ((a, b, "missing"), (b, a, "unexpected")):
            checked = [(rank, row) for rank, row in enumerate(mine) if row[1] >= cut + atol]
            allowed = max(2, int(nms_flips * len(checked)))
            unmatched = 0
            for rank, (cls, score, box) in checked:
                best = None
                for c2, s2, b2 in theirs:
                    if c2 == cls and abs(s2 - score) <= atol:
                        d = float(np.max(np.abs(b2 - box)))
                        if d <= atol and (best is None or d < best[1]):
                            best = (abs(s2 - score), d)
                if best is not None:
                    max_score, max_box = max(max_score, best[0]), max(max_box, best[1])
                    compared += 1
                    continue
                if min(box[2] - box[0], box[3] - box[1]) <= atol:
                    edge_drops += 1
                    continue
                what = (f"image {i}: {label} detection #{rank + 1} class {cls:g} score "
                        f"{score:.6f} box {np.round(box, 6).tolist()} (no counterpart within "
                        f"{atol:g})")
                suppressed = any(c2 == cls and s2 >= score - atol
                                 and _iou(b2, box) >= iou_threshold - NMS_FLIP_IOU_BAND
                                 for c2, s2, b2 in theirs)
                if rank == 0 or not suppressed:
                    raise ExportError(what)
                unmatched += 1
                if unmatched > allowed:
                    raise ExportError(f"{what}; {unmatched} such detections, more than the "
                                      f"{allowed} NMS flips allowed")
            flips += unmatched
    return {"compared": compared // 2, "nms_flips": flips, "edge_drops": edge_drops,
            "max_score_diff": max_score, "max_box_diff": max_box}


def _rows(out: dict, i: int) -> list[tuple[float, float, np.ndarray]]:
    n = int(out["num_detections"][i])
    return [(float(out["detection_classes"][i, j]), float(out["detection_scores"][i, j]),
             out["detection_boxes"][i, j]) for j in range(n)]


def fixture_images(store: Store, records_uri: str | None, cache: Path, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, list[bytes], str]:
    """``(single [1,H,W,3], pair [2,h,w,3] of odd size, encoded [PNG of single, JPEG of a
    third size], description)``. The single image is the first val image of the records
    when they can be read, else a synthetic one."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = None
    what = "synthetic 375x500"
    if records_uri is not None:
        image, what = _first_record_image(store, records_uri, cache)
    if image is None:
        yy, xx = np.mgrid[0:375, 0:500]
        image = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
        image[100:300, 150:400] = rng.integers(0, 256, 3, dtype=np.uint8)
    pil = Image.fromarray(image)
    pair = np.stack([np.asarray(pil.resize((291, 173))),
                     np.asarray(pil.resize((291, 173)).transpose(Image.FLIP_LEFT_RIGHT))])
    png, jpeg = io.BytesIO(), io.BytesIO()
    pil.save(png, format="PNG")
    pil.resize((217, 333)).save(jpeg, format="JPEG", quality=90)
    return image[None], pair, [png.getvalue(), jpeg.getvalue()], what


def _first_record_image(store: Store, records_uri: str, cache: Path
                        ) -> tuple[np.ndarray | None, str]:
    """The first val image of the records, read from the shards staged in the worker cache
    (where the evaluation finds them again)."""
    from PIL import Image

    from petdet_tasks.tfexample import decode_example, read_tfrecords
    from petdet_tasks.train_input import stage_shards

    try:
        paths = stage_shards(store, records_uri, "val", cache / "tfrecords")
    except Exception as e:  # noqa: BLE001 - the records are optional for the check
        log.warning("no fixture image from %s (%s): using a synthetic one", records_uri, e)
        return None, ""
    for path in paths:
        for data in read_tfrecords(path):
            ex = decode_example(data)
            img = Image.open(io.BytesIO(ex["image/encoded"][0])).convert("RGB")
            return np.asarray(img), f"{path.name}: {ex['image/filename'][0].decode()}"
    return None, ""


def verify_export(fns: ServingFunctions, saved_model_dir: Path, frozen_path: Path,
                  fixtures) -> dict:
    """Every exported runtime against the eager Keras computation (module doc)."""
    from petdet_tasks.detector import detect_batch

    single, pair, encoded, what = fixtures
    tf = fns.tf
    # the model itself must produce numbers
    x, _ = fns._letterbox(tf.constant(single), float(single.shape[1]), float(single.shape[2]))
    for k, v in fns.raw(x).items():
        if not np.all(np.isfinite(v.numpy())):
            raise ExportError(f"the model's {k} output is not finite on the fixture image "
                              f"({what}): the weights are broken (NaN/Inf); nothing exported")
    refs = {
        "single": {k: v.numpy() for k, v in fns.from_images(tf.constant(single)).items()},
        "pair": {k: v.numpy() for k, v in fns.from_images(tf.constant(pair)).items()},
        "encoded": {k: v.numpy() for k, v in fns.from_encoded(tf.constant(encoded)).items()},
    }
    # our decoding + NMS against keras-hub's own decoder: the best detection is the same
    _check_top_detection(fns, x, single, refs["single"], detect_batch)

    model = load_saved_model(saved_model_dir)
    threshold = fns.cfg.score_threshold
    checks = {
        f"{SIGNATURE_IMAGES} 1x{single.shape[1]}x{single.shape[2]}":
            (refs["single"], call_signature(model, SIGNATURE_IMAGES, single)),
        f"{SIGNATURE_IMAGES} 2x{pair.shape[1]}x{pair.shape[2]}":
            (refs["pair"], call_signature(model, SIGNATURE_IMAGES, pair)),
        f"{SIGNATURE_ENCODED} PNG+JPEG":
            (refs["encoded"], call_signature(model, SIGNATURE_ENCODED, encoded)),
        f"{FROZEN_GRAPH} 1x{single.shape[1]}x{single.shape[2]}":
            (refs["single"], run_frozen_graph(frozen_path, single)),
        f"{FROZEN_GRAPH} 2x{pair.shape[1]}x{pair.shape[2]}":
            (refs["pair"], run_frozen_graph(frozen_path, pair)),
    }
    report = {"fixture": what, "tolerance": PARITY_ATOL, "checks": {}}
    for name, (ref, got) in checks.items():
        try:
            report["checks"][name] = compare_detections(
                ref, got, score_threshold=threshold, iou_threshold=fns.cfg.iou_threshold)
        except ExportError as e:
            raise ExportError(f"{name} disagrees with the Keras model: {e}") from None
        log.info("parity %s: %s", name, report["checks"][name])
    report["reference_detections"] = int(refs["single"]["num_detections"][0])
    return report


def _check_top_detection(fns: ServingFunctions, x, single, ref, detect_batch) -> None:
    """Our decoding + NMS against keras-hub's own decoder (class-agnostic NMS, boxes not
    clipped): its best detection inside the image must be among ours with the same class and
    score — the same box, or one NMS kept in its place (a tie overlapping it past the IoU
    threshold) — and our best score must be that score."""
    theirs = detect_batch(fns.detector, x)
    h, w = single.shape[1:3]
    s = fns.size / max(h, w) if fns.keep_aspect_ratio else None
    denom = np.array([h * s, w * s] * 2) if s else np.array([fns.size] * 4, float)
    ids = fns.label_ids.numpy()
    best = None
    # the best score of theirs wholly outside the image (in the padding), or a sliver on its
    # edge that may clip to nothing in our runtime (compare_detections)
    outside = -1.0
    for j in range(theirs["boxes"].shape[1]):
        label, score = int(theirs["labels"][0, j]), float(theirs["confidence"][0, j])
        box = np.clip(theirs["boxes"][0, j] / denom, 0, 1)
        if label < 0 or score < fns.cfg.score_threshold:
            continue
        if min(box[2] - box[0], box[3] - box[1]) <= PARITY_ATOL:
            outside = max(outside, score)
            continue
        if best is None or score > best[1]:
            best = (float(ids[label]), score, box)
    n = int(ref["num_detections"][0])
    if outside >= (best[1] if best is not None else 0.0):
        # keras-hub ran its NMS with the padding boxes in (we drop them first, as the OD API
        # does): one of them may have suppressed the in-image box we keep, or filled its
        # max_detections rows. Not comparable: a weakly trained model does this.
        log.info("top-detection check against keras-hub's decoder skipped: its best detection "
                 "(score %.4f) lies in the letterbox padding (or is a sliver on the image's "
                 "edge), which our export drops before NMS", outside)
        return
    if best is None:
        if n:
            raise ExportError(f"keras-hub's decoder finds no detection where the export finds "
                              f"{n}")
        return
    cls, score, box = best
    rows = [(float(ref["detection_classes"][0, j]), float(ref["detection_scores"][0, j]),
             ref["detection_boxes"][0, j]) for j in range(n)]
    found = any(c == cls and abs(sc - score) <= PARITY_ATOL
                and (np.max(np.abs(b - box)) <= PARITY_ATOL
                     or _iou(b, box) > fns.cfg.iou_threshold - 1e-3)
                for c, sc, b in rows)
    if not found or abs(rows[0][1] - score) > PARITY_ATOL:
        top = rows[0] if rows else (0.0, 0.0, np.zeros(4))
        raise ExportError(
            f"best detection differs from keras-hub's decoder: class {cls:g} score "
            f"{score:.6f} box {np.round(box, 6).tolist()} vs ours: class {top[0]:g} score "
            f"{top[1]:.6f} box {np.round(top[2], 6).tolist()}")


def _iou(a, b) -> float:
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------

def export(store: Store, training_uri: str, cfg: ExportConfig | None = None, *,
           cache_dir=None, run_id: str | None = None, force: bool = False) -> StepResult:
    """Run (or find cached) the export step; see the module doc."""
    cfg = (cfg or ExportConfig()).validate()
    training = load_output(store, training_uri, expect_step="train")
    # the model is named by the weights it serves, not only by the training config: a forced
    # retrain (same training fingerprint, new weights) exports to a new prefix, so it never
    # overwrites the production model in place and must win promotion on its own metrics
    inputs = {"training": training.fingerprint, "weights": weights_digest(training)}
    fp = fingerprint(STEP, SCHEMA_VERSION, inputs, cfg.to_dict())
    if force:
        _refuse_to_force_production(store, fp)
    cache = cache_root(cache_dir)

    records_fp = training.manifest.get("inputs", {}).get("tfrecords")

    def body(writer: StepWriter) -> dict:
        # its scratch and the staged records it takes fixture images from are held in the
        # worker cache meanwhile; the scratch goes when it ends
        held = [("tfrecords", records_fp)] if records_fp else []
        with worker_cache.scratch(cache, "export", fp, *held) as work:
            return _export_body(store, writer, training, records_fp, cfg, cache, work)

    return run_step(store, STEP, SCHEMA_VERSION, inputs=inputs, config=cfg.to_dict(),
                    body=body, force=force, fp=fp, run_id=run_id)


def weights_digest(training: StepResult) -> str:
    """sha256 over the training output's final model files (``preset/``: names and sha256s,
    as its manifest records them)."""
    files = {rel: e["sha256"] for rel, e in training.manifest.get("files", {}).items()
             if rel.startswith("preset/")}
    if not files:
        raise ExportError(f"{training.uri} has no preset/ files in its manifest: nothing to export")
    return hashlib.sha256(canonical_json(files).encode()).hexdigest()


def _refuse_to_force_production(store: Store, fp: str) -> None:
    """A forced export removes the output's manifest and files before rebuilding them: for the
    model the registry serves that is an outage (detection fails until the new commit) and, if
    the export then fails, a broken production. Same weights and config rebuild the same model,
    so there is nothing to gain."""
    from petdet_tasks.registry import read_production

    pointer, _ = read_production(store)
    if pointer is not None and pointer["model_fingerprint"] == fp:
        raise ExportError(
            f"refusing to force-rebuild {store.uri(step_prefix(STEP, fp).rstrip('/'))}: it is "
            "the production model (registry/production.json), and a forced rebuild removes it "
            "until the new export commits. The same weights and config export the same model: "
            "run without force, or promote another model first")


def _export_body(store: Store, writer: StepWriter, training: StepResult,
                 records_fp: str | None, cfg: ExportConfig, cache: Path, work: Path) -> dict:
    import keras

    from petdet_tasks.label_map import parse_label_map

    train_prefix = step_prefix("train", training.fingerprint)
    labels = parse_label_map(store.read_text(train_prefix + "label_map.pbtxt"),
                             source=store.uri(train_prefix + "label_map.pbtxt"))
    train_cfg = json.loads(store.read_text(train_prefix + "train_config.json"))
    image_size = int(train_cfg["image_size"])
    keep_aspect = bool(train_cfg.get("keep_aspect_ratio", True))
    records_uri = output_uri(store, "tfrecords", records_fp) if records_fp else None

    preset = fetch_tree(store, training, "preset/", work / "preset")
    keras.mixed_precision.set_global_policy("float32")  # serve in float32 whatever trained
    detector = _load_detector(preset)
    if detector.num_classes != len(labels):
        raise ExportError(f"the model has {detector.num_classes} classes but its label map "
                          f"has {len(labels)}")
    fns = ServingFunctions(detector, labels.ids, image_size=image_size,
                           keep_aspect_ratio=keep_aspect, cfg=cfg)

    saved_model_dir = work / "saved_model"
    write_saved_model(fns, saved_model_dir)
    frozen_path = work / FROZEN_GRAPH
    frozen_bytes = write_frozen_graph(fns, frozen_path)
    parity = verify_export(fns, saved_model_dir, frozen_path,
                           fixture_images(store, records_uri, cache))

    pipeline = {
        "training_uri": training.uri,
        "tfrecords_uri": records_uri,
        "train_config": train_cfg,
        "export_config": cfg.to_dict(),
        "input": {"image_size": image_size, "keep_aspect_ratio": keep_aspect,
                  "dtype": "uint8", "signatures": [SIGNATURE_IMAGES, SIGNATURE_ENCODED]},
        "label_ids": labels.ids,
        "training_outputs": training.outputs,
    }
    writer.put_tree(saved_model_dir, "saved_model/")
    writer.put_file(FROZEN_GRAPH, frozen_path)
    writer.put_bytes("label_map.pbtxt", labels.to_pbtxt().encode())
    writer.put_json("pipeline.json", pipeline)
    writer.put_json("parity.json", parity)
    params = int(sum(np.prod(v.shape) for v in detector.weights))
    log.info("exported %s: %d parameters, frozen graph %.1f MB, parity within %g on %d checks",
             writer.uri(), params, frozen_bytes / 1e6, PARITY_ATOL, len(parity["checks"]))
    return {"num_classes": len(labels), "image_size": image_size, "parameters": params,
            "frozen_graph_bytes": frozen_bytes, "parity_checks": len(parity["checks"]),
            "parity_max_score_diff": max(c["max_score_diff"] for c in parity["checks"].values()),
            "parity_max_box_diff": max(c["max_box_diff"] for c in parity["checks"].values()),
            "fixture_detections": parity["reference_detections"],
            "training_uri": training.uri}


def _load_detector(preset: Path):
    from petdet_tasks.detector import load_preset, set_score_threshold

    try:
        # float32 named explicitly: a preset saved by a mixed-precision training records a
        # policy keras-hub cannot read back ("Invalid dtype: mixed_float16")
        detector = load_preset(preset, dtype="float32")
    except Exception as e:
        raise ExportError(f"cannot load the trained model from {preset}: {e}") from e
    set_score_threshold(detector)
    return detector


# ---------------------------------------------------------------------------------------------
# Using an exported model
# ---------------------------------------------------------------------------------------------

def load_exported(store: Store, model_uri: str, cache_dir=None):
    """``(StepResult, local saved_model dir, LabelMap)`` of a committed export."""
    from petdet_tasks.label_map import parse_label_map

    result = load_output(store, model_uri, expect_step="export")
    local = cache_root(cache_dir) / "models" / result.fingerprint
    fetch_tree(store, result, "saved_model/", local / "saved_model")
    prefix = step_prefix("export", result.fingerprint)
    labels = parse_label_map(store.read_text(prefix + "label_map.pbtxt"),
                             source=store.uri(prefix + "label_map.pbtxt"))
    return result, local / "saved_model", labels
