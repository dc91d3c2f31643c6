"""COCO detection metrics (pycocotools) for the evaluation step.

:func:`coco_metrics` takes ground truth and detections as plain Python structures and returns the
standard COCO box metrics as a JSON-serialisable dict: mAP averaged over IoU .50:.05:.95, mAP at
IoU .50 and .75, mAP for small / medium / large objects, average recall at 1, 10 and
``max_detections`` detections per image, and a per-class table (AP and AP@.5). :func:`format_table`
renders that dict as a small fixed-width text table for the task log.

Conventions:

* Boxes come in as the TensorFlow Object Detection API writes them: normalised
  ``[ymin, xmin, ymax, xmax]`` in 0..1 (anything outside is clipped). Inside they become COCO
  pixel boxes ``[x, y, w, h]`` using each image's ``width`` and ``height``.
* A box's area is ``w * h`` in pixels (no segmentation masks), which decides the COCO size bucket
  (small < 32², medium < 96², large otherwise). Every ground-truth box has ``iscrowd`` 0.
* COCO category ids are the label-map ids (1-based); every class of the label map is evaluated.
  A class with no ground truth has no defined AP: it is reported as ``None`` and left out of the
  means (pycocotools marks it -1; that value never reaches the output).
* Image ids may be any hashable (usually strings); they are mapped to 1-based ints internally.
* At most ``max_detections`` highest-scoring detections are kept per image.
* Any metric COCO leaves undefined (no ground truth in that bucket) is ``None``.

Nothing is read or written and TensorFlow is not imported. pycocotools' console chatter is
captured and sent to this module's logger at debug level.
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from petdet_tasks.errors import PermanentError

__all__ = ["coco_metrics", "format_table"]

log = logging.getLogger(__name__)

# pycocotools' area ranges, in the order of COCOeval.params.areaRngLbl.
_AREA_INDEX = {"all": 0, "small": 1, "medium": 2, "large": 3}


class EvalInputError(PermanentError, ValueError):
    """Ground truth, detections or classes that cannot be scored as given (a box with ymin >
    ymax, an unknown class id, an image twice, ...): the same records and model give the same
    inputs again, so a retry cannot mend it."""


@dataclass(frozen=True)
class _Image:
    """One ground-truth image after validation: COCO pixel boxes and labels."""

    key: Hashable
    coco_id: int
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) COCO [x, y, w, h] in pixels
    labels: list[int]


def _positive_int(value: Any, what: str) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise EvalInputError(f"{what} must be an integer, got {value!r}") from None
    if number <= 0:
        raise EvalInputError(f"{what} must be positive, got {number}")
    return number


def _class_ids(values: Any, what: str) -> list[int]:
    """Integer class ids; integral floats (the OD API's ``detection_classes``) are accepted."""
    array = np.asarray(values if values is not None else [], dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
        raise EvalInputError(f"{what}: class ids must be integers, got {array.tolist()}")
    return [int(v) for v in array]


def _pixel_boxes(values: Any, width: int, height: int, what: str) -> np.ndarray:
    """Normalised ``[ymin, xmin, ymax, xmax]`` rows to clipped COCO pixel ``[x, y, w, h]``."""
    boxes = np.asarray(values if values is not None else [], dtype=np.float64)
    if boxes.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise EvalInputError(f"{what}: boxes must be [ymin, xmin, ymax, xmax] rows, "
                         f"got shape {boxes.shape}")
    if not np.all(np.isfinite(boxes)):
        raise EvalInputError(f"{what}: boxes contain non-finite values")
    inverted = np.flatnonzero((boxes[:, 0] > boxes[:, 2]) | (boxes[:, 1] > boxes[:, 3]))
    if inverted.size:
        i = int(inverted[0])
        raise EvalInputError(f"{what}: box {i} has ymin > ymax or xmin > xmax: {boxes[i].tolist()}")
    ymin, xmin, ymax, xmax = np.clip(boxes, 0.0, 1.0).T
    return np.stack(
        [xmin * width, ymin * height, (xmax - xmin) * width, (ymax - ymin) * height], axis=1
    )


def _check_classes(classes: Mapping[int, str]) -> dict[int, str]:
    """The label map as ``{id: name}`` sorted by id; ids positive, names unique."""
    checked: dict[int, str] = {}
    for raw_id, name in classes.items():
        class_id = _positive_int(raw_id, "class id")
        if class_id in checked:
            raise EvalInputError(f"class id {class_id} appears twice in classes")
        checked[class_id] = str(name)
    names = list(checked.values())
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise EvalInputError(f"class names must be unique, repeated: {duplicated}")
    return dict(sorted(checked.items()))


def _unknown_class(class_ids: list[int], classes: Mapping[int, str], what: str) -> None:
    unknown = sorted(set(class_ids) - set(classes))
    if unknown:
        raise EvalInputError(f"{what}: class id {unknown[0]} is not in the label map")


def _read_groundtruth(
    groundtruth: Sequence[Mapping], classes: Mapping[int, str]
) -> dict[Hashable, _Image]:
    images: dict[Hashable, _Image] = {}
    for entry in groundtruth:
        key = entry["image_id"]
        what = f"groundtruth image {key!r}"
        if key in images:
            raise EvalInputError(f"{what} appears more than once")
        width = _positive_int(entry["width"], f"{what}: width")
        height = _positive_int(entry["height"], f"{what}: height")
        boxes = _pixel_boxes(entry.get("boxes"), width, height, what)
        labels = _class_ids(entry.get("labels"), what)
        if len(labels) != len(boxes):
            raise EvalInputError(f"{what}: {len(boxes)} boxes but {len(labels)} labels")
        _unknown_class(labels, classes, what)
        images[key] = _Image(key, len(images) + 1, width, height, boxes, labels)
    return images


@dataclass(frozen=True)
class _Detections:
    """The kept detections of every image, as arrays (a COCO annotation dict per detection,
    for all classes at once, took ~1 KB each: 2 million at 20,000 images)."""

    image_ids: np.ndarray  # (D,) int64, COCO image ids
    boxes: np.ndarray  # (D, 4) float64, COCO [x, y, w, h] in pixels
    scores: np.ndarray  # (D,) float64
    labels: np.ndarray  # (D,) int64, label-map ids

    def annotations(self, class_id: int) -> list[dict[str, Any]]:
        """The COCO result annotations of one class (ids from 1)."""
        out = []
        for n, i in enumerate(np.flatnonzero(self.labels == class_id), 1):
            box = self.boxes[i]
            out.append({
                # ids must be >= 1: COCOeval uses 0 to mean "not matched".
                "id": n,
                "image_id": int(self.image_ids[i]),
                "category_id": class_id,
                "bbox": [float(v) for v in box],
                "area": float(box[2] * box[3]),
                "score": float(self.scores[i]),
                "iscrowd": 0,
            })
        return out


def _read_detections(
    detections: Sequence[Mapping],
    images: Mapping[Hashable, _Image],
    classes: Mapping[int, str],
    max_detections: int,
) -> _Detections:
    """The top ``max_detections`` detections of each image, validated."""
    seen: set[Hashable] = set()
    ids, kept_boxes, kept_scores, kept_labels = [], [], [], []
    for entry in detections:
        key = entry["image_id"]
        what = f"detections for image {key!r}"
        if key not in images:
            raise EvalInputError(f"{what}: image is not in the ground truth")
        if key in seen:
            raise EvalInputError(f"{what} appear more than once")
        seen.add(key)
        image = images[key]
        boxes = _pixel_boxes(entry.get("boxes"), image.width, image.height, what)
        scores = np.asarray(entry.get("scores", []), dtype=np.float64).reshape(-1)
        labels = _class_ids(entry.get("classes"), what)
        if not len(boxes) == len(scores) == len(labels):
            raise EvalInputError(f"{what}: lengths differ: {len(boxes)} boxes, "
                                 f"{len(scores)} scores, {len(labels)} classes")
        if not np.all(np.isfinite(scores)):
            raise EvalInputError(f"{what}: scores contain non-finite values")
        _unknown_class(labels, classes, what)
        order = np.argsort(-scores, kind="stable")[:max_detections]
        ids.append(np.full(len(order), image.coco_id, dtype=np.int64))
        kept_boxes.append(boxes[order].reshape(-1, 4))
        kept_scores.append(scores[order])
        kept_labels.append(np.asarray(labels, dtype=np.int64).reshape(-1)[order])
    if not ids:
        return _Detections(np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0),
                           np.zeros(0, np.int64))
    return _Detections(np.concatenate(ids), np.concatenate(kept_boxes),
                       np.concatenate(kept_scores), np.concatenate(kept_labels))


def _coco(images: list[dict], categories: list[dict], annotations: list[dict]) -> COCO:
    """A pycocotools COCO object built in memory (``loadRes`` fails on an empty result list)."""
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    coco.createIndex()
    return coco


def _mean(values: np.ndarray) -> float | None:
    """Mean of the defined (> -1) entries, ``None`` when there are none."""
    defined = values[values > -1]
    return float(np.mean(defined)) if defined.size else None


def coco_metrics(
    groundtruth: Sequence[Mapping],
    detections: Sequence[Mapping],
    classes: Mapping[int, str],
    *,
    max_detections: int = 100,
) -> dict:
    """COCO box metrics of ``detections`` against ``groundtruth``.

    Args:
        groundtruth: one entry per evaluated image: ``image_id``, ``width``, ``height`` (pixels),
            ``boxes`` (normalised ``[ymin, xmin, ymax, xmax]``) and ``labels`` (label-map ids).
            An image may have no boxes.
        detections: one entry per image (``image_id``, ``boxes``, ``scores``, ``classes``) as the
            OD API serving signature returns them, cut to ``num_detections``. An image without an
            entry has no detections.
        classes: the label map, ``{id: name}``; every class is evaluated and reported.
        max_detections: detections kept per image (highest scores first); also the ``maxDets``
            of ``recall@100`` (below 10, ``recall@10`` can see no more than that either).

    Returns:
        ``mAP``, ``mAP@.5``, ``mAP@.75``, ``mAP_small``, ``mAP_medium``, ``mAP_large``,
        ``recall@1``, ``recall@10``, ``recall@100`` (floats, ``None`` where undefined),
        ``images``, ``groundtruth_boxes``, ``detections`` (counts) and ``per_class``:
        ``{name: {"id", "AP", "AP@.5", "groundtruth", "detections"}}`` in label-map id order.

    Raises:
        EvalInputError (a ValueError): an empty ``classes``, a duplicated image id, an image
            id in ``detections`` that is not in ``groundtruth``, mismatched lengths, malformed
            boxes, or a class id not in ``classes``.
    """
    max_detections = _positive_int(max_detections, "max_detections")
    label_map = _check_classes(classes)
    if not label_map:
        raise EvalInputError("classes is empty: there is no class to evaluate")
    images = _read_groundtruth(groundtruth, label_map)
    kept = _read_detections(detections, images, label_map, max_detections)

    gt_annotations = []
    for image in images.values():
        for box, label in zip(image.boxes, image.labels, strict=True):
            gt_annotations.append({
                "id": len(gt_annotations) + 1,
                "image_id": image.coco_id,
                "category_id": label,
                "bbox": [float(v) for v in box],
                "area": float(box[2] * box[3]),
                "iscrowd": 0,
            })
    coco_images = [
        {"id": im.coco_id, "width": im.width, "height": im.height} for im in images.values()
    ]
    categories = [{"id": i, "name": n} for i, n in label_map.items()]
    class_ids = list(label_map)

    # One COCOeval per class: with categories scored apart (useCats, pycocotools' default)
    # each class's precision and recall depend on its own boxes only, so the arrays are those
    # of one run over every class, while the per-image state pycocotools keeps (its evalImgs,
    # one dict per image, class and area range) and the result annotations are one class's at
    # a time: memory no longer grows with images x classes (benchmarks/evaluate.py).
    captured = io.StringIO()
    image_ids = [im["id"] for im in coco_images]
    precisions, recalls = [], []
    with contextlib.redirect_stdout(captured):
        coco_gt = _coco(coco_images, categories, gt_annotations)
        for class_id in class_ids:
            evaluator = COCOeval(coco_gt, _coco(coco_images, categories,
                                                kept.annotations(class_id)), iouType="bbox")
            evaluator.params.imgIds = image_ids
            evaluator.params.catIds = [class_id]
            evaluator.params.maxDets = [1, 10, max_detections]
            evaluator.evaluate()
            evaluator.accumulate()
            precisions.append(evaluator.eval["precision"][:, :, 0])
            recalls.append(evaluator.eval["recall"][:, 0])
            iou_thrs = evaluator.params.iouThrs
    log.debug("pycocotools output:\n%s", captured.getvalue().rstrip())
    # precision: [T iou, R recall, K class, A area, M maxDets]; recall: [T, K, A, M]
    precision, recall = np.stack(precisions, axis=2), np.stack(recalls, axis=1)
    t50 = int(np.flatnonzero(np.isclose(iou_thrs, 0.5))[0])
    t75 = int(np.flatnonzero(np.isclose(iou_thrs, 0.75))[0])
    every, top = _AREA_INDEX["all"], 2

    gt_counts = dict.fromkeys(class_ids, 0)
    for annotation in gt_annotations:
        gt_counts[annotation["category_id"]] += 1
    dt_counts = {c: int(np.count_nonzero(kept.labels == c)) for c in class_ids}

    per_class = {
        name: {
            "id": class_id,
            "AP": _mean(precision[:, :, k, every, top]),
            "AP@.5": _mean(precision[t50, :, k, every, top]),
            "groundtruth": gt_counts[class_id],
            "detections": dt_counts[class_id],
        }
        for k, (class_id, name) in enumerate(label_map.items())
    }
    metrics = {
        "mAP": _mean(precision[:, :, :, every, top]),
        "mAP@.5": _mean(precision[t50, :, :, every, top]),
        "mAP@.75": _mean(precision[t75, :, :, every, top]),
        "mAP_small": _mean(precision[:, :, :, _AREA_INDEX["small"], top]),
        "mAP_medium": _mean(precision[:, :, :, _AREA_INDEX["medium"], top]),
        "mAP_large": _mean(precision[:, :, :, _AREA_INDEX["large"], top]),
        "recall@1": _mean(recall[:, :, every, 0]),
        "recall@10": _mean(recall[:, :, every, 1]),
        "recall@100": _mean(recall[:, :, every, top]),
        "images": len(images),
        "groundtruth_boxes": len(gt_annotations),
        "detections": len(kept.labels),
        "per_class": per_class,
    }
    log.debug("COCO metrics: %d images, %d ground-truth boxes, %d detections, mAP %s",
              len(images), len(gt_annotations), len(kept.labels), metrics["mAP"])
    return metrics


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(metrics: dict) -> str:
    """A fixed-width text table of :func:`coco_metrics` output, for the task log."""
    lines = [
        f"COCO detection metrics: {metrics['images']} images, "
        f"{metrics['groundtruth_boxes']} ground-truth boxes, {metrics['detections']} detections",
    ]
    for key in ("mAP", "mAP@.5", "mAP@.75", "recall@100"):
        lines.append(f"  {key:<11}{_fmt(metrics[key]):>7}")
    per_class = metrics.get("per_class", {})
    width = max([len("class"), *(len(name) for name in per_class)])
    lines.append("")
    lines.append(f"{'class':<{width}}  {'id':>4}  {'gt':>6}  {'AP':>7}  {'AP@.5':>7}")
    lines.append("-" * (width + 2 + 4 + 2 + 6 + 2 + 7 + 2 + 7))
    for name, row in per_class.items():
        lines.append(
            f"{name:<{width}}  {row['id']:>4}  {row['groundtruth']:>6}  "
            f"{_fmt(row['AP']):>7}  {_fmt(row['AP@.5']):>7}"
        )
    return "\n".join(lines)
