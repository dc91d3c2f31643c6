"""The evaluation step: an exported model on a split of the records → COCO metrics.

``evaluate(store, model_uri, tfrecords_uri, EvalConfig())`` → ``evaluations/<fingerprint>/``:

* ``metrics.json`` — :func:`petdet_tasks.coco_eval.coco_metrics` on the split (default
  ``val``): mAP@[.5:.95], mAP@.5, mAP@.75, small/medium/large, recall@1/10/100, per-class AP;
  plus the model and records URIs;
* ``detections.jsonl`` — what the model returned for every evaluated image (key, size, ground
  truth, detections) and what became of each ground-truth box (``outcome``), so a surprising
  number can be looked at image by image;
* in ``metrics.json``, ``analysis`` (:func:`error_analysis`): how many ground-truth boxes the
  model found with the right class, found as another class, or missed, the breed confusion
  matrix with the most confused pairs, and the confident detections of nothing. mAP says how
  good the model is; this says what it gets wrong (for the pets: mostly one breed for another).

What is measured is the *served* model: the SavedModel's ``encoded_image_string_tensor``
signature fed the records' encoded JPEGs, exactly what a client sends. Ground truth is the
records' normalised boxes and label-map ids. The model's and the records' label maps must
agree wherever they share an id or a name (``1: Abyssinian`` in both); a class of the records
the model was not trained on is measured like any other (it scores AP 0, since the model never
predicts it) and is listed in ``metrics.json`` under ``classes_the_model_cannot_detect``.

The fingerprint covers the model's and the records' fingerprints and the config, so the same
model on the same data is a cache hit. Promotion (:func:`promote_evaluated`,
:mod:`petdet_tasks.registry`) reads ``metrics.json`` and compares models only on the same
evaluation set (records fingerprint and split): when production was measured on other records
(last week's, before new labelled data), it is evaluated on the candidate's set first (a
cached evaluation like any other). It refuses the ``train`` split, which models are fitted
on, and compares only the quality metrics (:data:`QUALITY_METRICS`, higher is better). Its
decisions are appended beside the evaluation under ``promotions/`` (one create-only file per
decision — the committed metrics never change).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from petdet_tasks import worker_cache
from petdet_tasks.errors import ConfigError
from petdet_tasks.label_map import LabelMap
from petdet_tasks.layout import (
    PRODUCTION_POINTER,
    cache_root,
    fingerprint,
    output_uri,
    step_prefix,
)
from petdet_tasks.manifest import StepResult, StepWriter, load_output, run_step
from petdet_tasks.store import Store

log = logging.getLogger(__name__)

STEP = "evaluate"
SCHEMA_VERSION = 2  # 2: metrics.json's analysis, detections.jsonl's outcome
# error_analysis: a box counts as found when a detection overlaps it this much (COCO's AP@.5)
ANALYSIS_IOU = 0.5
# ... and a detection of nothing counts as a false alarm from this score (the OD API's
# visualisation default: what a user drawing the boxes would see)
ANALYSIS_SCORE = 0.5
HEADLINE = ("mAP", "mAP@.5", "mAP@.75", "recall@100")
# the metrics.json numbers a promotion may compare (higher is better); the others are counts
QUALITY_METRICS = ("mAP", "mAP@.5", "mAP@.75", "mAP_small", "mAP_medium", "mAP_large",
                   "recall@1", "recall@10", "recall@100")
# the split models are fitted on: a promotion on it would reward memorising
TRAIN_SPLIT = "train"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    split: str = "val"
    batch_size: int = 8

    def validate(self) -> EvalConfig:
        if not self.split.isidentifier():
            raise ConfigError(f"split must be a split name like 'val', got {self.split!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ConfigError(f"batch_size must be a positive int, got {self.batch_size!r}")
        return self

    def fingerprint_fields(self) -> dict:
        return {"split": self.split}  # the batch size does not change the numbers


def evaluate(store: Store, model_uri: str, tfrecords_uri: str, cfg: EvalConfig | None = None, *,
             cache_dir=None, run_id: str | None = None, force: bool = False) -> StepResult:
    """Run (or find cached) the evaluation; see the module doc."""
    cfg = (cfg or EvalConfig()).validate()
    model = load_output(store, model_uri, expect_step="export")
    records = load_output(store, tfrecords_uri, expect_step="tfrecords")
    from petdet_tasks.tfrecords import splits_of

    splits = splits_of(records.manifest.get("files", {}))
    if cfg.split not in splits:  # before minutes of model loading, and never retried
        raise ConfigError(f"{records.uri} has no {cfg.split!r} shards: its splits are "
                          + ", ".join(repr(x) for x in splits))
    inputs = {"model": model.fingerprint, "tfrecords": records.fingerprint}
    fp = fingerprint(STEP, SCHEMA_VERSION, inputs, cfg.fingerprint_fields())
    cache = cache_root(cache_dir)

    def body(writer: StepWriter) -> dict:
        # the model, the staged records and its scratch stay in the worker cache while it
        # reads them; the scratch goes when it ends
        with worker_cache.scratch(cache, "evaluate", fp, ("models", model.fingerprint),
                                  ("tfrecords", records.fingerprint)) as work:
            return _evaluate_body(store, writer, model, records, cfg, cache, work)

    return run_step(store, STEP, SCHEMA_VERSION, inputs=inputs, config=cfg.fingerprint_fields(),
                    body=body, force=force, fp=fp, run_id=run_id)


def read_examples(paths):
    """``(key, encoded, width, height, boxes [n,4] normalised, labels [n])`` per record, in
    file order (tf.data parse with the training input's OD API spec, no decode: the model
    decodes)."""
    import numpy as np
    import tensorflow as tf

    from petdet_tasks.train_input import _BOX_KEYS, _FEATURES

    feats = {**_FEATURES,
             "image/filename": tf.io.FixedLenFeature([], tf.string),
             "image/width": tf.io.FixedLenFeature([], tf.int64),
             "image/height": tf.io.FixedLenFeature([], tf.int64)}

    def parse(serialized):
        f = tf.io.parse_single_example(serialized, feats)
        return {k: tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v
                for k, v in f.items()}

    ds = tf.data.TFRecordDataset([os.fspath(p) for p in paths]).map(
        parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    for f in ds.as_numpy_iterator():
        boxes = np.stack([f[k] for k in _BOX_KEYS], axis=-1).reshape(-1, 4)
        yield (f["image/filename"].decode(), f["image/encoded"], int(f["image/width"]),
               int(f["image/height"]), boxes, f["image/object/class/label"])


def _evaluate_body(store: Store, writer: StepWriter, model: StepResult, records: StepResult,
                   cfg: EvalConfig, cache: Path, work: Path) -> dict:
    import numpy as np

    from petdet_tasks.coco_eval import coco_metrics, format_table
    from petdet_tasks.export import SIGNATURE_ENCODED, call_signature, load_exported
    from petdet_tasks.train_input import load_records_label_map, stage_shards

    _, saved_model_dir, labels = load_exported(store, model.uri, cache)
    record_labels = load_records_label_map(store, records.uri)
    classes, cannot_detect = eval_classes(labels, record_labels, model.uri, records.uri)
    paths = stage_shards(store, records.uri, cfg.split, cache / "tfrecords")
    import tensorflow as tf

    served = tf.saved_model.load(str(saved_model_dir))
    groundtruth, detections = [], []
    analysis = _Analysis(classes)
    started = time.monotonic()
    # what the model returned, a line per image, streamed to a file: with up to 100 boxes an
    # image, held as JSON (and the detections as Python lists) it took ~30 KB an image
    lines_path = work / "detections.jsonl"

    def flush(batch, lines):
        out = call_signature(served, SIGNATURE_ENCODED, [b[1] for b in batch])
        for i, (key, _, w, h, boxes, ids) in enumerate(batch):
            n = int(out["num_detections"][i])
            det = {"image_id": key, "boxes": np.array(out["detection_boxes"][i, :n]),
                   "scores": np.array(out["detection_scores"][i, :n]),
                   "classes": out["detection_classes"][i, :n].astype(np.int64)}
            gt = {"image_id": key, "width": w, "height": h, "boxes": boxes.tolist(),
                  "labels": [int(c) for c in ids]}
            groundtruth.append(gt)
            detections.append(det)
            lines.write(json.dumps({"image": key, "width": w, "height": h,
                                    "groundtruth": {"boxes": gt["boxes"],
                                                    "classes": gt["labels"]},
                                    "detections": {k: det[k].tolist() for k in
                                                   ("boxes", "scores", "classes")},
                                    "outcome": analysis.add(gt, det)},
                                   sort_keys=True) + "\n")

    with lines_path.open("w", encoding="utf-8") as lines:
        batch = []
        for example in read_examples(paths):
            batch.append(example)
            if len(batch) == cfg.batch_size:
                flush(batch, lines)
                batch = []
        if batch:
            flush(batch, lines)
    if not groundtruth:  # committed records never change: a retry would find none again
        raise ConfigError(f"the {cfg.split!r} split of {records.uri} has no images")
    seconds = time.monotonic() - started
    metrics = coco_metrics(groundtruth, detections, classes)
    summary = analysis.summary()
    log.info("evaluated %s on %d %s images of %s in %.1fs (%.1f images/s)\n%s\n\n%s",
             model.uri, len(groundtruth), cfg.split, records.uri, seconds,
             len(groundtruth) / max(seconds, 1e-9), format_table(metrics),
             format_analysis(summary))
    metrics = {**metrics, "analysis": summary}
    metrics_doc = {"model_uri": model.uri, "model_fingerprint": model.fingerprint,
                   "tfrecords_uri": records.uri, "tfrecords_fingerprint": records.fingerprint,
                   "split": cfg.split, "signature": SIGNATURE_ENCODED,
                   "classes_the_model_cannot_detect": cannot_detect, **metrics}
    writer.put_json("metrics.json", metrics_doc)
    writer.put_file("detections.jsonl", lines_path)
    return {"model_uri": model.uri, "model_fingerprint": model.fingerprint,
            "tfrecords_uri": records.uri, "split": cfg.split, "images": metrics["images"],
            **{k: metrics[k] for k in HEADLINE}}


def _iou(box, boxes):
    """IoU of one ``[ymin, xmin, ymax, xmax]`` box with each of ``boxes`` (normalised
    coordinates give the same IoU as pixels: both axes scale areas and overlaps alike)."""
    import numpy as np

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    ih = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iw = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ih * iw
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


class _Analysis:
    """What became of each ground-truth box (:func:`error_analysis`), one image at a time."""

    def __init__(self, classes: dict[int, str]):
        self.classes = classes
        self.counts = {"correct": 0, "confused": 0, "missed": 0}
        self.confusion: dict[str, dict[str, int]] = {}
        self.false_alarms = 0
        self.false_alarm_classes: dict[str, int] = {}

    def _name(self, class_id: int) -> str:
        return self.classes.get(class_id, f"id {class_id}")

    def add(self, gt: dict, det: dict) -> list[dict]:
        """Each ground-truth box's outcome: the best-scoring detection overlapping it by at
        least :data:`ANALYSIS_IOU`, of any class, names what the model saw there — the right
        class (``correct``), another (``confused``), or nothing (``missed``). Detections from
        :data:`ANALYSIS_SCORE` that overlap no ground truth are counted as false alarms."""
        import numpy as np

        boxes = np.asarray(det["boxes"], dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(det["scores"], dtype=np.float64)
        overlaps_any = np.zeros(len(boxes), dtype=bool)
        out = []
        for box, label in zip(gt["boxes"], gt["labels"], strict=True):
            iou = _iou(np.asarray(box, dtype=np.float64), boxes)
            near = iou >= ANALYSIS_IOU
            overlaps_any |= near
            truth = self._name(label)
            row = self.confusion.setdefault(truth, {})
            if not near.any():
                kind, seen = "missed", "(missed)"
                out.append({"class": label, "result": kind})
            else:
                best = int(np.flatnonzero(near)[np.argmax(scores[near])])
                predicted = int(det["classes"][best])
                kind = "correct" if predicted == label else "confused"
                seen = self._name(predicted)
                out.append({"class": label, "result": kind, "predicted": predicted,
                            "score": round(float(scores[best]), 4),
                            "iou": round(float(iou[best]), 4)})
            self.counts[kind] += 1
            row[seen] = row.get(seen, 0) + 1
        for i in np.flatnonzero(~overlaps_any & (scores >= ANALYSIS_SCORE)):
            self.false_alarms += 1
            name = self._name(int(det["classes"][i]))
            self.false_alarm_classes[name] = self.false_alarm_classes.get(name, 0) + 1
        return out

    def summary(self) -> dict:
        boxes = sum(self.counts.values())
        pairs = sorted(((t, p, n) for t, row in self.confusion.items() for p, n in row.items()
                        if p not in (t, "(missed)")), key=lambda x: (-x[2], x[0], x[1]))
        return {
            "iou": ANALYSIS_IOU, "groundtruth_boxes": boxes, **self.counts,
            "found_rate": (self.counts["correct"] + self.counts["confused"]) / boxes
            if boxes else None,
            "correct_rate": self.counts["correct"] / boxes if boxes else None,
            "confusion": {t: dict(sorted(row.items())) for t, row in
                          sorted(self.confusion.items())},
            "most_confused": [{"truth": t, "predicted": p, "boxes": n} for t, p, n in
                              pairs[:10]],
            "false_alarm_score": ANALYSIS_SCORE, "false_alarms": self.false_alarms,
            "false_alarm_classes": dict(sorted(self.false_alarm_classes.items())),
        }


def error_analysis(groundtruth: list[dict], detections: list[dict],
                   classes: dict[int, str]) -> tuple[dict, list[list[dict]]]:
    """(summary, per-image outcomes) of the model's errors: see :meth:`_Analysis.add`.
    ``groundtruth``/``detections`` as for :func:`petdet_tasks.coco_eval.coco_metrics`, in
    the same image order, boxes normalised."""
    analysis = _Analysis(classes)
    outcomes = [analysis.add(g, d) for g, d in zip(groundtruth, detections, strict=True)]
    return analysis.summary(), outcomes


def format_analysis(summary: dict) -> str:
    """The analysis as a few log lines."""
    n = summary["groundtruth_boxes"]
    lines = [f"what became of the {n} ground-truth boxes (a detection overlapping at IoU >= "
             f"{summary['iou']}): {summary['correct']} right class, {summary['confused']} "
             f"another class, {summary['missed']} missed; {summary['false_alarms']} detections "
             f"of nothing at score >= {summary['false_alarm_score']}"]
    if summary["most_confused"]:
        lines.append("most confused: " + "; ".join(
            f"{c['truth']} seen as {c['predicted']} ({c['boxes']})"
            for c in summary["most_confused"][:5]))
    return "\n".join(lines)


def eval_classes(model_labels: LabelMap, record_labels: LabelMap, model_uri: str,
                 records_uri: str) -> tuple[dict[int, str], list[str]]:
    """The classes scored, ``{id: name}`` (both label maps together), and the names of the
    records' classes the model cannot detect. :class:`ConfigError` when the maps give one id
    two names or one name two ids: the model's ``1`` would be scored as another breed."""
    model_map = dict(zip(model_labels.ids, model_labels.names, strict=True))
    record_map = dict(zip(record_labels.ids, record_labels.names, strict=True))
    model_ids = {name: i for i, name in model_map.items()}
    conflicts = [f"id {i} is {name!r} in the records, {model_map[i]!r} in the model"
                 for i, name in record_map.items() if i in model_map and model_map[i] != name]
    conflicts += [f"{name!r} is id {i} in the records, {model_ids[name]} in the model"
                  for i, name in record_map.items()
                  if name in model_ids and model_ids[name] != i]
    if conflicts:
        raise ConfigError(f"the label maps of the records {records_uri} and the model "
                          f"{model_uri} disagree: " + "; ".join(conflicts[:5])
                          + (f" (+{len(conflicts) - 5} more)" if len(conflicts) > 5 else ""))
    cannot_detect = [name for i, name in record_map.items() if i not in model_map]
    if cannot_detect:
        log.warning("the model %s was not trained on %d classes of the records %s (%s): they "
                    "score AP 0", model_uri, len(cannot_detect), records_uri,
                    ", ".join(cannot_detect[:10]))
    return dict(sorted({**model_map, **record_map}.items())), cannot_detect


def evaluate_production(store: Store, tfrecords_uri: str, cfg: EvalConfig | None = None, *,
                        cache_dir=None, run_id: str | None = None,
                        force: bool = False) -> StepResult | None:
    """Production's evaluation on these records' split, so that a promotion compares it with
    the candidate on the same images: the DAG runs it beside the candidate's evaluation (the
    promotion then finds it cached). None when there is no production model yet; production's
    own evaluation when it was promoted on this very set."""
    from petdet_tasks.registry import production_model_uri, read_production

    cfg = (cfg or EvalConfig()).validate()
    pointer, _ = read_production(store)
    if pointer is None:
        log.info("no production model yet: nothing to compare the candidate with")
        return None
    model = production_model_uri(store, pointer)
    log.info("production model %s (%s %s, measured on %s): evaluating it on the %r split of %s",
             model, pointer["metric"], pointer["value"],
             pointer.get("evaluated_on") or "an unrecorded set", cfg.split, tfrecords_uri)
    return evaluate(store, model, tfrecords_uri, cfg, cache_dir=cache_dir, run_id=run_id,
                    force=force)


def read_metrics(store: Store, evaluation_uri: str) -> tuple[StepResult, dict]:
    result = load_output(store, evaluation_uri, expect_step="evaluate")
    key = step_prefix(STEP, result.fingerprint) + "metrics.json"
    return result, json.loads(store.read_text(key))


def promote_evaluated(store: Store, evaluation_uri: str, *, metric: str = "mAP",
                      margin: float = 0.0, run_id: str | None = None, cache_dir=None) -> dict:
    """Promote the evaluated model if it beats production (:func:`registry.promote`) on the
    same evaluation set, evaluating production on it first when it was measured on another
    (module doc), and record the decision beside the evaluation
    (``promotions/<time>-<run>.json``)."""
    from datetime import UTC, datetime

    from petdet_tasks.registry import RegistryError, production_model_uri, promote

    result, metrics = read_metrics(store, evaluation_uri)
    if metric not in QUALITY_METRICS:
        raise RegistryError(f"cannot promote on {metric!r}: promotion compares a quality metric "
                            f"(higher is better): {', '.join(QUALITY_METRICS)}")
    if metrics.get(metric) is None:
        raise RegistryError(f"cannot promote on {metric!r}: it is undefined on {result.uri} "
                            "(COCO gives no value when the split has no ground-truth box of "
                            "that kind); choose another metric")
    split = result.manifest["config"]["split"]
    if split == TRAIN_SPLIT:
        raise RegistryError(f"cannot promote on {result.uri}: it measured the {split!r} split, "
                            "which models are fitted on (a model that memorises it would win); "
                            "evaluate on a held-out split (val)")
    records_fp = result.manifest["inputs"]["tfrecords"]
    records_uri = output_uri(store, "tfrecords", records_fp)

    def rescore(pointer: dict) -> tuple[str, dict]:
        """Production's metrics on the candidate's set (a cached evaluation after the first)."""
        champion = evaluate(store, production_model_uri(store, pointer), records_uri,
                            EvalConfig(split=split), cache_dir=cache_dir, run_id=run_id)
        return champion.uri, read_metrics(store, champion.uri)[1]

    model_fp = result.manifest["inputs"]["model"]
    numbers = {k: metrics[k] for k in QUALITY_METRICS if k in metrics}
    decision = promote(store, model_uri=output_uri(store, "export", model_fp),
                       model_fingerprint=model_fp,
                       evaluation_uri=result.uri, metrics=numbers, metric=metric,
                       margin=margin, run_id=run_id,
                       evaluated_on={"tfrecords": records_fp, "split": split}, rescore=rescore)
    record = {"decided_at": datetime.now(UTC).isoformat(timespec="seconds"), "run_id": run_id,
              **decision.to_json()}
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    safe_run = "".join(c if c.isalnum() or c in "-_." else "_" for c in (run_id or "cli"))
    key = step_prefix(STEP, result.fingerprint) + f"promotions/{stamp}-{safe_run}.json"
    store.put_bytes(key, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode(),
                    if_absent=True)
    log.info("%s (decision recorded at %s)", decision.reason, store.uri(key))
    # the step-command contract (uri, fingerprint, cache_hit): the registry pointer, the model
    # decided on, and whether the registry was left as it was (this model already production)
    return {"uri": store.uri(PRODUCTION_POINTER),
            "fingerprint": model_fp, "cache_hit": decision.already_production,
            "promoted": decision.promoted, "reason": decision.reason, "metric": metric,
            "candidate": decision.candidate, "production": decision.production,
            "margin": margin, "model_uri": decision.candidate_model,
            "production_model": decision.production_model,
            "production_evaluation": decision.production_evaluation,
            "evaluated_on": {"tfrecords": records_fp, "split": split},
            "decision_uri": store.uri(key)}
