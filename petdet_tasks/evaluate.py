"""The evaluation step: an exported model on a split of the records → COCO metrics.

``evaluate(store, model_uri, tfrecords_uri, EvalConfig())`` → ``evaluations/<fingerprint>/``:

* ``metrics.json`` — :func:`petdet_tasks.coco_eval.coco_metrics` on the split (default
  ``val``): mAP@[.5:.95], mAP@.5, mAP@.75, small/medium/large, recall@1/10/100, per-class AP;
  plus the model and records URIs;
* ``detections.jsonl`` — what the model returned for every evaluated image (key, size, ground
  truth, detections), so a surprising number can be looked at image by image.

What is measured is the *served* model: the SavedModel's ``encoded_image_string_tensor``
signature fed the records' encoded JPEGs, exactly what a client sends. Ground truth is the
records' normalised boxes and label-map ids; the model's label map must hold every id the
records use.

The fingerprint covers the model's and the records' fingerprints and the config, so the same
model on the same data is a cache hit. Promotion (:mod:`petdet_tasks.registry`) reads
``metrics.json``; its decisions are appended beside it under ``promotions/`` (one create-only
file per decision — the committed metrics never change).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from petdet_tasks.errors import ConfigError
from petdet_tasks.layout import PRODUCTION_POINTER, cache_root, fingerprint, step_prefix
from petdet_tasks.manifest import StepResult, StepWriter, load_output, run_step
from petdet_tasks.store import Store

log = logging.getLogger(__name__)

STEP = "evaluate"
SCHEMA_VERSION = 1
HEADLINE = ("mAP", "mAP@.5", "mAP@.75", "recall@100")


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
        return _evaluate_body(store, writer, model, records, cfg, cache)

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
                   cfg: EvalConfig, cache: Path) -> dict:
    from petdet_tasks.coco_eval import coco_metrics, format_table
    from petdet_tasks.export import SIGNATURE_ENCODED, call_signature, load_exported
    from petdet_tasks.train_input import load_records_label_map, stage_shards

    _, saved_model_dir, labels = load_exported(store, model.uri, cache)
    record_labels = load_records_label_map(store, records.uri)
    unknown = sorted(set(record_labels.ids) - set(labels.ids))
    if unknown:
        raise ConfigError(f"the records {records.uri} use label ids {unknown} that the model "
                         f"{model.uri} does not know (its ids: {labels.ids})")
    paths = stage_shards(store, records.uri, cfg.split, cache / "tfrecords")
    import tensorflow as tf

    served = tf.saved_model.load(str(saved_model_dir))
    groundtruth, detections, lines = [], [], []
    started = time.monotonic()

    def flush(batch):
        out = call_signature(served, SIGNATURE_ENCODED, [b[1] for b in batch])
        for i, (key, _, w, h, boxes, ids) in enumerate(batch):
            n = int(out["num_detections"][i])
            det = {"image_id": key, "boxes": out["detection_boxes"][i, :n].tolist(),
                   "scores": out["detection_scores"][i, :n].tolist(),
                   "classes": [int(c) for c in out["detection_classes"][i, :n]]}
            gt = {"image_id": key, "width": w, "height": h, "boxes": boxes.tolist(),
                  "labels": [int(c) for c in ids]}
            groundtruth.append(gt)
            detections.append(det)
            lines.append(json.dumps({"image": key, "width": w, "height": h,
                                     "groundtruth": {"boxes": gt["boxes"],
                                                     "classes": gt["labels"]},
                                     "detections": {k: det[k] for k in
                                                    ("boxes", "scores", "classes")}},
                                    sort_keys=True))

    batch = []
    for example in read_examples(paths):
        batch.append(example)
        if len(batch) == cfg.batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if not groundtruth:
        raise ValueError(f"the {cfg.split!r} split of {records.uri} has no images")
    seconds = time.monotonic() - started
    metrics = coco_metrics(groundtruth, detections, dict(zip(labels.ids, labels.names,
                                                             strict=True)))
    log.info("evaluated %s on %d %s images of %s in %.1fs (%.1f images/s)\n%s", model.uri,
             len(groundtruth), cfg.split, records.uri, seconds,
             len(groundtruth) / max(seconds, 1e-9), format_table(metrics))
    metrics_doc = {"model_uri": model.uri, "tfrecords_uri": records.uri, "split": cfg.split,
                   "signature": SIGNATURE_ENCODED, **metrics}
    writer.put_json("metrics.json", metrics_doc)
    writer.put_bytes("detections.jsonl", ("\n".join(lines) + "\n").encode())
    return {"model_uri": model.uri, "model_fingerprint": model.fingerprint,
            "tfrecords_uri": records.uri, "split": cfg.split, "images": metrics["images"],
            **{k: metrics[k] for k in HEADLINE}}


def read_metrics(store: Store, evaluation_uri: str) -> tuple[StepResult, dict]:
    result = load_output(store, evaluation_uri, expect_step="evaluate")
    key = step_prefix(STEP, result.fingerprint) + "metrics.json"
    return result, json.loads(store.read_text(key))


def promote_evaluated(store: Store, evaluation_uri: str, *, metric: str = "mAP",
                      margin: float = 0.0, run_id: str | None = None) -> dict:
    """Promote the evaluated model if it beats production (:func:`registry.promote`), and
    record the decision beside the evaluation (``promotions/<time>-<run>.json``)."""
    from datetime import UTC, datetime

    from petdet_tasks.registry import promote

    result, metrics = read_metrics(store, evaluation_uri)
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))
               and not isinstance(v, bool)}
    decision = promote(store, model_uri=metrics["model_uri"],
                       model_fingerprint=result.manifest["inputs"]["model"],
                       evaluation_uri=result.uri, metrics=numbers, metric=metric,
                       margin=margin, run_id=run_id)
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
            "fingerprint": result.manifest["inputs"]["model"],
            "cache_hit": decision.production_model == decision.candidate_model,
            "promoted": decision.promoted, "reason": decision.reason, "metric": metric,
            "candidate": decision.candidate, "production": decision.production,
            "margin": margin, "model_uri": decision.candidate_model,
            "production_model": decision.production_model, "decision_uri": store.uri(key)}
