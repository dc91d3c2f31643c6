"""The training step: fine-tune a keras-hub RetinaNet on the TFRecords, resumably.

``train(store, tfrecords_uri, TrainConfig(...))`` → ``training/<fingerprint>/``:

* ``checkpoints/ckpt-<step>.{index,data-*}`` + ``checkpoints/latest.json`` — written every
  ``checkpoint_every_n`` steps (model *and* optimizer state, ``tf.train.Checkpoint``), uploaded
  as training goes; the last two are kept. ``latest.json`` also records the images of the
  input stream trained on, the precision, the replicas and the global batch;
* ``history.jsonl`` (step, loss, learning rate of that step, images/s), ``curves.png``,
  ``logs/`` (TensorBoard event files); history.jsonl and logs/ go with every checkpoint;
* ``preset/`` — the fine-tuned model as a keras-hub preset (what export loads);
* ``label_map.pbtxt`` (the records'), ``train_config.json``, and the manifest with the final
  metrics (final loss, recall at IoU 0.5 with the right class on the val split).

Resume: the step runs under the commit protocol with ``resume=True``; a prefix without a
manifest but with ``checkpoints/latest.json`` is a training that stopped (killed, preempted,
failed). The next attempt restores model, optimizer and step counter from that checkpoint (or
the newest complete one, should latest.json name missing files), continues the input stream
where it stopped (one stream for the whole run: every epoch reads every record) and trains on
to ``num_steps`` — never from 0. A writer whose lease was taken over stops at the next batch.

Devices: a ``tf.distribute.MirroredStrategy`` over the visible GPUs (on a machine without one,
its single CPU replica runs the same code); ``batch_size`` is per replica, the global batch is
``batch_size * replicas``; mixed precision (``mixed_float16``) when a GPU is present
(``mixed_precision="auto"``) or asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path

from petdet_tasks import worker_cache
from petdet_tasks.errors import ConfigError, PermanentError
from petdet_tasks.layout import cache_root, fingerprint, step_prefix
from petdet_tasks.manifest import StepResult, StepWriter, load_output, run_step
from petdet_tasks.store import NotFound, Store, _redact, sha256_file
from petdet_tasks.train_config import TrainConfig

log = logging.getLogger(__name__)

STEP = "train"
SCHEMA_VERSION = 2  # 2: one input stream for the run, global-norm clipping, LR by step
CHECKPOINTS = "checkpoints/"
KEEP_CHECKPOINTS = 2
VAL_BATCH_FACTOR = 4  # the held-out recall's batch, x the per-replica training batch
LEASE_TTL_S = float(os.environ.get("PETDET_TRAIN_LEASE_TTL_S", "120"))
# The detection loss (focal classification + Huber box regression, per matched anchor) starts
# around 1-10 from a preset and falls. A mean beyond this, or not finite, means the weights have
# blown up: the step stops there rather than commit a model that only looks trained.
DIVERGED_LOSS = 1e6


class TrainingDiverged(PermanentError, RuntimeError):
    """The loss became non-finite or exploded; nothing is committed."""


# ---------------------------------------------------------------------------------------------
# Starting point
# ---------------------------------------------------------------------------------------------

# keras-hub's ``save_to_preset`` stamps the save time into metadata.json: the same weights saved
# twice must still be the same starting point (no retraining for a re-saved preset)
_PRESET_METADATA = "metadata.json"
_VOLATILE_METADATA = ("date_saved",)


def _preset_file_digest(rel: str, data: bytes) -> bytes:
    """sha256 of a preset file's content; the root metadata.json without its save time."""
    if rel == _PRESET_METADATA:
        try:
            meta = json.loads(data)
        except ValueError:
            meta = None  # not JSON: identified by its bytes (keras-hub will say what is wrong)
        if isinstance(meta, dict):
            for key in _VOLATILE_METADATA:
                meta.pop(key, None)
            data = json.dumps(meta, sort_keys=True).encode()
    return hashlib.sha256(data).digest()


def preset_identity(store: Store, preset: str) -> str:
    """What identifies the starting weights in the fingerprint: a digest of a local directory's
    files or of a store prefix's listing; a preset name / Kaggle handle as given. The save time
    keras-hub writes into metadata.json is left out: re-saving the same preset is no change."""
    preset = _in_store(store, preset)
    path = Path(preset).expanduser()
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = f.relative_to(path).as_posix()
            h.update(rel.encode() + b"\0")
            h.update(_preset_file_digest(rel, f.read_bytes()))
        return "dir:" + h.hexdigest()
    rel = _store_prefix(store, preset)
    if rel is not None:
        listing = []
        for o in store.list(rel):
            name = o.key[len(rel):]
            if name == _PRESET_METADATA:  # small: read, so that its save time can be left out
                digest = _preset_file_digest(name, store.get_bytes(o.key)[0])
                listing.append((name, "sha256", digest.hex()))
            else:
                listing.append((name, o.size, o.etag))
        if not listing:
            raise ConfigError(f"preset prefix {store.uri(rel)} is empty: nothing to start from")
        return "store:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return "name:" + preset


def _in_store(store: Store, preset: str) -> str:
    """A path with a ``/`` that is no local directory (``presets/tiny``) names a prefix relative
    to the store root, as ``--extra-data`` and detect's ``--images`` do: its URI."""
    if ("://" in preset or preset.startswith(("/", ".", "~")) or "/" not in preset.strip("/")
            or Path(preset).is_dir()):
        return preset
    return store.uri(preset.strip("/"))


def _store_prefix(store: Store, preset: str) -> str | None:
    """The store prefix a preset URI names; None for a keras-hub name or handle. A path that is
    neither a local directory nor under the store is a ConfigError, not a keras-hub lookup."""
    root = store.root.rstrip("/") + "/"
    if preset.startswith(root):
        return preset[len(root):].rstrip("/") + "/"
    if "://" in preset:
        if preset.split("://", 1)[0].lower() in ("s3", "file"):
            raise ConfigError(f"preset {_redact(preset)} is not under the store root "
                              f"{store.root}")
        return None  # kaggle://, hf://, ...: keras-hub fetches it
    if preset.startswith(("/", ".", "~")):
        raise ConfigError(
            f"preset {_redact(preset)!r} is neither a local directory nor a prefix in the store "
            f"{store.root}; give a directory holding a keras-hub preset, a store prefix, a "
            "keras-hub preset name or a kaggle:// / hf:// handle")
    return None  # a keras-hub preset name


def _check_preset_name(preset: str) -> None:
    """A bare name must be one of keras-hub's RetinaNet presets (handles are checked by the
    download itself, whose failures may be worth a retry)."""
    if "://" in preset:
        return
    import keras_hub

    known = sorted(keras_hub.models.RetinaNetObjectDetector.presets)
    if preset not in known:
        raise ConfigError(
            f"preset {preset!r} is not a keras-hub RetinaNet preset ({', '.join(known)}), a "
            "local directory, a store prefix or a kaggle:// / hf:// handle")


def synced_preset_name(store: Store, preset: str) -> str | None:
    """The worker-cache entry (``presets/<name>``) that :func:`resolve_preset` syncs a store
    prefix to; None for a local directory or a keras-hub name or handle."""
    preset = _in_store(store, preset)
    if Path(preset).expanduser().is_dir():
        return None
    rel = _store_prefix(store, preset)
    return None if rel is None else _preset_cache_name(store, rel)


def _preset_cache_name(store: Store, rel: str) -> str:
    return hashlib.sha256(store.uri(rel).encode()).hexdigest()[:16]


def resolve_preset(store: Store, preset: str, cache: Path) -> str:
    """A local directory (a store prefix is synced to the cache first) or the name/handle."""
    preset = _in_store(store, preset)
    if Path(preset).expanduser().is_dir():
        return str(Path(preset).expanduser())
    rel = _store_prefix(store, preset)
    if rel is None:
        _check_preset_name(preset)
        return preset  # keras-hub preset name or kaggle:// handle: keras-hub downloads it
    local = cache / "presets" / _preset_cache_name(store, rel)
    for obj in store.list(rel):
        dest = local / obj.key[len(rel):]
        if not (dest.exists() and dest.stat().st_size == obj.size):
            store.download_file(obj.key, dest)
    log.info("preset %s synced to %s", store.uri(rel), local)
    return str(local)


# ---------------------------------------------------------------------------------------------
# Pieces that need TensorFlow (imported inside)
# ---------------------------------------------------------------------------------------------

def learning_rate_schedule(cfg: TrainConfig, counter=None):
    """A Keras schedule computing ``cfg.learning_rate.lr_at(step, num_steps)`` in graph mode.

    ``counter``: a variable holding the training step (the steps done so far), which the
    schedule reads instead of the step Keras passes, the optimizer's ``iterations``: under
    mixed precision those skip the steps whose gradients overflowed, and the rate would lag
    behind the step that the logs, the checkpoints and ``num_steps`` count. Restored with the
    checkpoint, so a resumed run continues the same curve."""
    import keras
    import tensorflow as tf

    sched = cfg.learning_rate
    total = cfg.num_steps

    class PetdetSchedule(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            step = tf.cast(step if counter is None else counter, tf.float32)
            init = tf.constant(sched.initial_learning_rate, tf.float32)
            if sched.kind == "constant":
                return init
            if sched.kind == "manual_step":
                lr = init
                for boundary, rate in sched.steps:
                    lr = tf.where(step >= boundary, tf.constant(rate, tf.float32), lr)
            else:  # cosine
                decay = float(max(total - sched.warmup_steps, 1))
                p = tf.clip_by_value((step - sched.warmup_steps) / decay, 0.0, 1.0)
                cos = 0.5 * (1.0 + tf.cos(math.pi * p))
                lr = init * ((1.0 - sched.alpha) * cos + sched.alpha)
            if sched.warmup_steps > 0:
                warm = sched.warmup_start_lr + (sched.initial_learning_rate
                                                - sched.warmup_start_lr) * step / sched.warmup_steps
                lr = tf.where(step < sched.warmup_steps, warm, lr)
            return lr

        def get_config(self):
            return {"schedule": sched.to_dict(), "num_steps": total}

    return PetdetSchedule()


def _optimizer(cfg: TrainConfig, counter=None):
    import keras

    lr = learning_rate_schedule(cfg, counter)
    # the norm of all the gradients together, as the OD API's gradient_clipping_by_norm
    # (tf.clip_by_global_norm); Keras' clipnorm would clip each variable's on its own
    kwargs = {"global_clipnorm": cfg.clipnorm} if cfg.clipnorm else {}
    if cfg.weight_decay:
        kwargs["weight_decay"] = cfg.weight_decay
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=lr, **kwargs)
    return keras.optimizers.SGD(learning_rate=lr, momentum=cfg.momentum, **kwargs)


def _visible_gpus() -> list:
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


def _strategy_and_precision(cfg: TrainConfig):
    import keras
    import tensorflow as tf

    gpus = _visible_gpus()
    strategy = tf.distribute.MirroredStrategy()
    mixed = cfg.mixed_precision == "on" or (cfg.mixed_precision == "auto" and bool(gpus))
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    log.info("devices: %d GPU(s); %d replica(s); mixed precision %s", len(gpus),
             strategy.num_replicas_in_sync, "on" if mixed else "off")
    return strategy, mixed


def _recall_at_iou(detector, dataset, iou: float = 0.5, min_score: float = 0.05,
                   top_k: int = 10) -> dict:
    """Share of ground-truth boxes found by one of the top ``top_k`` detections with the same
    class and IoU >= ``iou`` (a quick held-out check; full COCO metrics are the evaluate step)."""
    import numpy as np

    from petdet_tasks.detector import detect_batch

    found = total = 0
    for images, targets in dataset:
        out = detect_batch(detector, images)
        boxes, scores, labels = (np.asarray(out["boxes"]), np.asarray(out["confidence"]),
                                 np.asarray(out["labels"]))
        gt_boxes, gt_labels = targets["boxes"].numpy(), targets["labels"].numpy()
        for i in range(len(gt_boxes)):
            keep = (scores[i] >= min_score) & (labels[i] >= 0)
            order = np.argsort(-scores[i][keep])[:top_k]
            pb, pl = boxes[i][keep][order], labels[i][keep][order]
            for gb, gl in zip(gt_boxes[i], gt_labels[i], strict=True):
                if gl < 0:
                    continue
                total += 1
                if len(pb) and np.any((_iou(gb, pb) >= iou) & (pl == gl)):
                    found += 1
    return {"val_boxes": int(total),
            "val_recall_iou50": round(found / total, 4) if total else None}


def _iou(box, boxes):
    import numpy as np

    y0 = np.maximum(box[0], boxes[:, 0])
    x0 = np.maximum(box[1], boxes[:, 1])
    y1 = np.minimum(box[2], boxes[:, 2])
    x1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(y1 - y0, 0, None) * np.clip(x1 - x0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and learning rate against the step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, [h["loss"] for h in history], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    if history and min(h["loss"] for h in history) > 0:
        ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["lr"] for h in history], color="tab:orange", label="learning rate")
    ax2.set_ylabel("learning rate", color="tab:orange")
    ax.set_title("petdet training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------

_CKPT_FILE = re.compile(r"ckpt-(\d+)\.(?:index|data-(\d+)-of-(\d+))")


class _Checkpointer:
    """Writes ``tf.train.Checkpoint`` files locally and mirrors them into the store.

    Order of writes (each a whole object): the checkpoint's data files, its index, the extra
    files, then ``latest.json`` (the pointer a resumed run follows); older checkpoints are
    deleted only after that. A checkpoint is complete when its index and all its data files
    are in the store; restore takes the one ``latest.json`` names, or, when those files are
    gone, the newest complete one (a stop inside the old final cleanup left such a pointer).

    The layout does not depend on the precision: ``optimizer`` is the inner optimizer (its
    slots and iterations), ``loss_scale`` the mixed-precision LossScaleOptimizer when there is
    one (its scale). ``mixed_precision="auto"`` resolves by the machine, so a retry may run in
    another precision than the checkpoint: it restores the weights, the optimizer state and
    the step all the same (the loss scale starts afresh when it had none), with a warning
    naming both. ``latest.json`` records the precision, the replicas and the global batch.
    (Checkpoints of the earlier layout, ``optimizer`` = the LossScaleOptimizer, cannot be met:
    they belong to schema-1 trainings, whose fingerprints schema 2 never reuses.)"""

    def __init__(self, writer: StepWriter, local: Path, model, optimizer, *, loss_scale=None,
                 mixed: bool = False, replicas: int = 1, global_batch: int = 1, step=None):
        import tensorflow as tf

        self.writer, self.store, self.local = writer, writer.store, local
        self.prefix = writer.prefix + CHECKPOINTS
        self.optimizer, self.loss_scale = optimizer, loss_scale
        self.run = {"mixed_precision": mixed, "replicas": replicas, "global_batch": global_batch}
        # the step counter is saved on its own: with mixed precision the optimizer's
        # iterations skip the steps whose gradients overflowed
        self.step = step if step is not None else tf.Variable(0, dtype=tf.int64,
                                                               trainable=False)
        # the model's own dependencies less its optimizer (Keras tracks the compiled one, the
        # LossScaleOptimizer under mixed precision, and then the layouts would differ by the
        # precision): the optimizers are checkpointed at the top
        self.model_node = tf.train.Checkpoint(**{
            k: v for k, v in model._trackable_children("checkpoint").items()
            if k != "optimizer"})
        objects = {"model": self.model_node, "optimizer": optimizer, "step": self.step}
        if loss_scale is not None:
            objects["loss_scale"] = loss_scale
        self.ckpt = tf.train.Checkpoint(**objects)
        self.uploaded: list[int] = []  # in the store, oldest first (the restored one too)
        self.latest: dict = {}  # the restored checkpoint's latest.json

    def _read_latest(self) -> dict | None:
        try:
            return json.loads(self.store.get_bytes(self.prefix + "latest.json")[0])
        except NotFound:
            return None

    def complete_steps(self) -> list[int]:
        """Steps of the checkpoints whose index and every data file are in the store."""
        files: dict[int, set[str]] = {}
        for rel in _listing(self.store, self.prefix):
            m = _CKPT_FILE.fullmatch(rel)
            if m:
                files.setdefault(int(m.group(1)), set()).add(rel)
        complete = []
        for step, names in files.items():
            shards = {rel for rel in names if not rel.endswith(".index")}
            total = {int(_CKPT_FILE.fullmatch(rel).group(3)) for rel in shards}
            if (f"ckpt-{step}.index" in names and len(total) == 1
                    and len(shards) == total.pop()):
                complete.append(step)
        return sorted(complete)

    def restore(self) -> int:
        """Restore the newest checkpoint of an earlier attempt; returns its step (0: none)."""
        latest = self._read_latest()
        complete = self.complete_steps()
        if latest is None and not complete:
            return 0
        step = None if latest is None else int(latest["step"])
        if step not in complete:
            named = ("no latest.json" if latest is None else
                     f"latest.json names ckpt-{step}, whose files are not all in the store")
            if not complete:
                log.warning("%s: %s and no complete checkpoint is left; training from step 0",
                            self.writer.uri(CHECKPOINTS), named)
                return 0
            found = complete[-1]
            log.warning("%s: %s; resuming from ckpt-%d, the newest complete checkpoint",
                        self.writer.uri(CHECKPOINTS), named, found)
            examples = None
            if latest is not None and "examples" in latest:
                per_step = latest["examples"] // max(step, 1)
                examples = latest["examples"] - (step - found) * per_step
            latest = {"step": found, **({"examples": examples} if examples is not None else {})}
            step = found
        name = f"ckpt-{step}"
        for obj in self.store.list(self.prefix + name + "."):
            self.store.download_file(obj.key, self.local / obj.key[len(self.prefix):])
        saved_mixed = self._read(self.local / name)
        if int(self.step.numpy()) != step:
            raise RuntimeError(f"checkpoint {name} holds step {int(self.step.numpy())}, "
                               f"latest.json says {step}")
        self._compare(name, {**latest, "mixed_precision": latest.get("mixed_precision",
                                                                     saved_mixed)})
        self.latest = latest
        self.uploaded = [step]
        return step

    def _read(self, path: Path) -> bool:
        """Read a checkpoint into this run's objects; returns whether it was written under
        mixed precision (it holds a loss scale)."""
        import tensorflow as tf

        names = [n for n, _ in tf.train.list_variables(str(path))]
        has_scale = any(n.startswith("loss_scale/") for n in names)
        objects = {"model": self.model_node, "step": self.step, "optimizer": self.optimizer}
        if has_scale and self.loss_scale is not None:
            objects["loss_scale"] = self.loss_scale
        status = tf.train.Checkpoint(**objects).read(str(path))
        # every weight, slot and counter of this run has its value; what the checkpoint has
        # beyond them (another precision's loss scale) is left
        status.assert_existing_objects_matched().expect_partial()
        return has_scale

    def _compare(self, name: str, saved: dict) -> None:
        precision = {True: "mixed precision (mixed_float16)", False: "float32"}
        if saved.get("mixed_precision") is not None and \
                bool(saved["mixed_precision"]) != self.run["mixed_precision"]:
            log.warning(
                "%s was trained in %s, this attempt trains in %s (mixed_precision='auto' "
                "follows the machine's GPUs): the weights, optimizer state and step are "
                "restored; %s", name, precision[bool(saved["mixed_precision"])],
                precision[self.run["mixed_precision"]],
                "the loss scale starts afresh" if self.run["mixed_precision"] else
                "its loss scale is dropped")
        if saved.get("replicas") is not None and saved["replicas"] != self.run["replicas"]:
            log.warning("%s was trained on %d replica(s) (global batch %s), this attempt has "
                        "%d (global batch %d): the steps from here on draw %d images each",
                        name, saved["replicas"], saved.get("global_batch", "?"),
                        self.run["replicas"], self.run["global_batch"],
                        self.run["global_batch"])

    def save(self, step: int, extra_files: dict[str, Path], *, examples: int) -> None:
        """Checkpoint files first, then the extra files, then ``latest.json`` (the pointer a
        resumed run follows; ``examples``: images of the input stream trained on so far), then
        the checkpoints older than the last two are dropped."""
        name = f"ckpt-{step}"
        self.step.assign(step)
        path = self.ckpt.write(str(self.local / name))
        # the index last: a checkpoint is complete once its index is in the store
        for f in sorted(self.local.glob(name + ".*"), key=lambda f: f.suffix == ".index"):
            self._put_file(self.prefix + f.name, f)
        for rel, f in extra_files.items():
            if f.exists():
                self._put_file(self.writer.prefix + rel, f)
        self.writer._check_lease()
        self.store.put_bytes(self.prefix + "latest.json",
                             json.dumps({"step": step, "path": Path(path).name,
                                         "examples": examples, "format": 2,
                                         **self.run}).encode())
        self.uploaded = [s for s in self.uploaded if s != step] + [step]
        self.drop(keep=self.uploaded[-KEEP_CHECKPOINTS:])
        log.info("checkpoint at step %d saved to %s", step, self.writer.uri(CHECKPOINTS))

    def _put_file(self, key: str, path: Path) -> None:
        # a writer whose lease another attempt took over must not touch the prefix: it
        # would overwrite that attempt's checkpoints (and delete them, below)
        self.writer._check_lease()
        self.store.put_file(key, path)

    def drop(self, keep: list[int]) -> None:
        """Delete every checkpoint but ``keep`` (store and local); latest.json stays."""
        for rel in _listing(self.store, self.prefix):
            m = _CKPT_FILE.fullmatch(rel)
            if m and int(m.group(1)) not in keep:
                self.writer._check_lease()
                self.store.delete(self.prefix + rel)
        for f in self.local.glob("ckpt-*"):
            m = _CKPT_FILE.fullmatch(f.name)
            if m and int(m.group(1)) not in keep:
                f.unlink()
        self.uploaded = [s for s in self.uploaded if s in keep]


def train(store: Store, tfrecords_uri: str, cfg: TrainConfig, *, cache_dir=None,
          run_id: str | None = None, force: bool = False) -> StepResult:
    """Run (or resume, or find cached) the training step; see the module doc."""
    cfg.validate()
    records = load_output(store, tfrecords_uri, expect_step="tfrecords")
    inputs = {"tfrecords": records.fingerprint, "preset": preset_identity(store, cfg.preset)}
    # the preset enters through inputs["preset"] (a directory or prefix by its content), not by
    # its path: the same preset in another checkout or cache is the same starting point
    config = cfg.fingerprint_fields()
    config.pop("preset", None)
    fp = fingerprint(STEP, SCHEMA_VERSION, inputs, config)
    cache = cache_root(cache_dir)

    def body(writer: StepWriter) -> dict:
        # its scratch, staged records and synced preset are held in the worker cache while it
        # trains (no step on this worker evicts them); the scratch goes when it ends
        preset_name = synced_preset_name(store, cfg.preset)
        held = [("tfrecords", records.fingerprint)] + (
            [("presets", preset_name)] if preset_name else [])
        with worker_cache.scratch(cache, "training", fp, *held) as work:
            return _train_body(store, writer, records, cfg, cache, work)

    return run_step(store, STEP, SCHEMA_VERSION, inputs=inputs, config=config,
                    body=body, force=force, resume=True, fp=fp, run_id=run_id,
                    lease_ttl_s=LEASE_TTL_S,
                    extra_manifest={"train_config": cfg.to_dict()})


def _train_body(store: Store, writer: StepWriter, records: StepResult, cfg: TrainConfig,
                cache: Path, work: Path) -> dict:
    import keras
    import tensorflow as tf

    from petdet_tasks.detector import load_for_finetune, save_preset
    from petdet_tasks.label_map import parse_label_map
    from petdet_tasks.train_input import InputConfig, make_dataset, stage_shards

    labels = parse_label_map(store.read_text(step_prefix("tfrecords", records.fingerprint)
                                             + "label_map.pbtxt"))
    num_classes = len(labels)
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ConfigError(f"train config num_classes={cfg.num_classes} but the records' label "
                          f"map has {num_classes} classes: drop num_classes (the records' label "
                          "map decides) or build the records with the classes you want")
    ckpt_dir = work / "ckpt"
    ckpt_dir.mkdir()
    keras.utils.set_random_seed(cfg.seed)
    preset = resolve_preset(store, cfg.preset, cache)  # a wrong one fails before any staging

    strategy, mixed = _strategy_and_precision(cfg)
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.batch_size * replicas
    shard_cache = cache / "tfrecords"
    train_paths = stage_shards(store, records.uri, "train", shard_cache)
    val_paths = stage_shards(store, records.uri, "val", shard_cache)
    aug = cfg.augmentation
    in_cfg = InputConfig(image_size=cfg.image_size, keep_aspect_ratio=cfg.keep_aspect_ratio,
                         batch_size=global_batch, horizontal_flip=aug.horizontal_flip,
                         scale_jitter=tuple(aug.scale_jitter), color_jitter=aug.color_jitter,
                         seed=cfg.seed)
    # the held-out recall after training runs eagerly on one device, in inference: no
    # activations are kept for gradients, so a batch of 4x the per-replica training batch
    # costs far less memory than a training step, and pays the fixed cost of an eager call
    # (~0.4 s of Keras layer calls on this host's CPU) 4x less often
    val_ds = make_dataset(val_paths, labels.ids,
                          dataclasses.replace(in_cfg, batch_size=VAL_BATCH_FACTOR * cfg.batch_size),
                          training=False)

    with strategy.scope():
        detector = load_for_finetune(preset, num_classes, image_size=cfg.image_size,
                                     freeze_backbone=cfg.freeze_backbone)
        # the training step (steps done): drives the learning rate, saved in the checkpoints
        counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="petdet_step",
                              aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        inner = _optimizer(cfg, counter)
        detector.compile(optimizer=inner)
        # under mixed_float16 compile() wraps it in a LossScaleOptimizer; built before the
        # restore, so that its loss scale exists to be restored
        optimizer = detector.optimizer
        optimizer.build(detector.trainable_variables)
        checkpointer = _Checkpointer(
            writer, ckpt_dir, detector, inner,
            loss_scale=optimizer if optimizer is not inner else None, mixed=mixed,
            replicas=replicas, global_batch=global_batch, step=counter)
        start = checkpointer.restore()
    if start:
        log.info("resuming from the checkpoint at step %d of %d", start, cfg.num_steps)
        try:
            history = [json.loads(line) for line in store.read_text(
                writer.prefix + "history.jsonl").splitlines() if line.strip()]
        except NotFound:
            history = []
        history = [h for h in history if h["step"] <= start]
    else:
        history = []

    history_path = work / "history.jsonl"
    logs_dir = work / "logs"
    for obj in list(store.list(writer.prefix + "logs/")):
        if start:
            # the earlier attempts' TensorBoard files (uploaded with each checkpoint, so
            # holding the steps up to it): the committed logs/ shows the whole run
            store.download_file(obj.key, logs_dir / obj.key[len(writer.prefix + "logs/"):])
        else:  # an attempt that left no usable checkpoint: its curves are not this run's
            writer._check_lease()
            store.delete(obj.key)
    every = cfg.checkpoint_every_n
    # images of the training stream consumed before this attempt (older checkpoints did not
    # record it: their runs had the same global batch throughout)
    examples = int(checkpointer.latest.get("examples", start * global_batch))

    def checkpoint(at: int) -> None:
        # history.jsonl and logs/ go with every checkpoint, the final one too: a retry that
        # resumes from it commits the whole history, curves and final loss
        extras = {"history.jsonl": history_path}
        if logs_dir.exists():
            extras.update({"logs/" + f.relative_to(logs_dir).as_posix(): f
                           for f in sorted(logs_dir.rglob("*")) if f.is_file()})
        checkpointer.save(at, extras, examples=examples + (at - start) * global_batch)

    # the lease is checked after every batch (it only reads a flag the renewing thread sets)
    progress = _Progress(cfg, global_batch, start, history, history_path, logs_dir, checkpoint,
                         writer._check_lease, counter)
    remaining = cfg.num_steps - start
    if remaining > 0:
        log.info("training steps %d..%d, global batch %d, %s, checkpoint every %d", start,
                 cfg.num_steps, global_batch, cfg.optimizer, every)
        # one input stream for the whole run: every epoch reads every record (a stream per
        # checkpoint interval read only the heads of a few shards each time); a resumed run
        # continues it where the checkpoint left it
        train_ds = make_dataset(train_paths, labels.ids, in_cfg, training=True, skip=examples)
        # one fit() whose epochs are checkpoint intervals (Keras keeps the iterator across
        # them and resets its running loss mean at each); the callback checkpoints at every
        # multiple of checkpoint_every_n and stops at num_steps
        interval = min(every, remaining)
        detector.fit(train_ds, steps_per_epoch=interval, epochs=math.ceil(remaining / interval),
                     verbose=0, callbacks=[progress])
    step = progress.step
    if step != cfg.num_steps:
        raise RuntimeError(f"training stopped at step {step} of {cfg.num_steps}")
    final_step = step
    applied = int(optimizer.iterations.numpy())
    if applied != final_step:
        log.info("%d of %d steps were skipped by the mixed-precision loss scaling (gradient "
                 "overflow)", final_step - applied, final_step)

    metrics = _recall_at_iou(detector, val_ds)
    preset_dir = work / "preset"
    # float32 whatever the training ran in: a mixed_float16 preset cannot be loaded back
    save_preset(detector, preset_dir, image_size=cfg.image_size)
    plot_curves(history, work / "curves.png")
    history_path.write_text("".join(json.dumps(h) + "\n" for h in history))

    # the published outputs: the newest checkpoint, the preset, the curves, the logs. The
    # final checkpoint and latest.json are written first, the older checkpoints deleted only
    # then: a stop anywhere in between leaves a prefix that resumes
    if final_step not in checkpointer.uploaded:
        checkpoint(final_step)
    checkpointer.drop(keep=[final_step])
    for rel in _listing(store, writer.prefix + CHECKPOINTS):
        local = ckpt_dir / rel
        if local.exists():  # uploaded by the checkpointer just now: record, don't re-upload
            writer.register(CHECKPOINTS + rel, sha256_file(local))
        else:
            writer.put_bytes(CHECKPOINTS + rel,
                             store.get_bytes(writer.prefix + CHECKPOINTS + rel)[0])
    writer.put_tree(preset_dir, "preset/")
    if logs_dir.exists():
        writer.put_tree(logs_dir, "logs/")
    writer.put_file("history.jsonl", history_path)
    writer.put_file("curves.png", work / "curves.png")
    writer.put_bytes("label_map.pbtxt", labels.to_pbtxt().encode())
    writer.put_json("train_config.json", cfg.to_dict())
    final_loss = history[-1]["loss"] if history else None
    log.info("training done: %d steps, final loss %s, val recall@IoU0.5 %s", final_step,
             final_loss, metrics["val_recall_iou50"])
    return {"steps": final_step, "resumed_from": start, "final_loss": final_loss,
            "num_classes": num_classes, "image_size": cfg.image_size,
            "global_batch": global_batch, "replicas": replicas, "mixed_precision": mixed,
            **metrics}


def _listing(store: Store, prefix: str) -> list[str]:
    return [o.key[len(prefix):] for o in store.list(prefix)]


def _make_progress_class():
    import keras
    import tensorflow as tf

    class Progress(keras.callbacks.Callback):
        """Logs step/total, loss, lr, images/s and ETA every ``log_every_n`` steps, and writes
        the same numbers to history.jsonl and TensorBoard (keyed by the true global step, so a
        resumed run continues the curves)."""

        def __init__(self, cfg, global_batch, start, history, history_path, logs_dir,
                     checkpoint, check_lease, counter):
            super().__init__()
            self.counter = counter  # the step the learning rate schedule reads
            self.cfg, self.batch, self.step = cfg, global_batch, start
            self.checkpoint, self.saved, self.check_lease = checkpoint, start, check_lease
            self.history, self.history_path = history, history_path
            self.logs_dir, self.summary = logs_dir, None  # an event file once there is a step
            self.t_last = time.monotonic()
            self.step_at_last = start
            self.losses: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.running = 0.0  # Keras reports the mean loss since the start of the epoch

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            self.counter.assign(self.step)  # the next batch trains at lr_at(self.step)
            self.check_lease()  # LeaseLost: another attempt took the prefix over; stop now
            running = float((logs or {}).get("loss", float("nan")))
            if not abs(running) < DIVERGED_LOSS:  # also NaN
                lr, since = self.cfg.learning_rate, self.step - batch - 1
                kept = (f"the checkpoints up to step {self.saved} are kept" if self.saved
                        else "no checkpoint was written")
                raise TrainingDiverged(
                    f"training diverged at step {self.step}: the mean loss since step {since} "
                    f"is {running:g}. Nothing is committed ({kept}), but the same config would "
                    f"diverge again: lower learning_rate ({lr.kind}, initial "
                    f"{lr.initial_learning_rate:g}), add warmup_steps, or set clipnorm (now "
                    f"{self.cfg.clipnorm}); a changed config is a new fingerprint and trains "
                    "afresh")
            # this batch's own loss, recovered from the running mean over batches 0..batch
            self.losses.append((batch + 1) * running - batch * self.running)
            self.running = running
            if not (self.step % self.cfg.log_every_n and self.step != self.cfg.num_steps):
                self._log()
            if self.step >= self.cfg.num_steps:
                self.model.stop_training = True
            elif self.step % self.cfg.checkpoint_every_n == 0:
                self.checkpoint(self.step)
                self.saved = self.step

        def _log(self):
            now = time.monotonic()
            rate = (self.step - self.step_at_last) * self.batch / max(now - self.t_last, 1e-9)
            left = (self.cfg.num_steps - self.step) * self.batch / max(rate, 1e-9)
            mean = sum(self.losses) / len(self.losses)
            # the rate the step just taken trained at (step s, counted from 1, ran at
            # lr_at(s - 1): the schedule counts the steps done before it)
            lr = self.cfg.learning_rate.lr_at(self.step - 1, self.cfg.num_steps)
            log.info("step %d/%d  loss %.4f  lr %.3g  %.1f images/s  ETA %s", self.step,
                     self.cfg.num_steps, mean, lr, rate, _hms(left))
            self.history.append({"step": self.step, "loss": round(mean, 5), "lr": lr,
                                 "images_per_s": round(rate, 2)})
            self.history_path.write_text("".join(json.dumps(h) + "\n" for h in self.history))
            if self.summary is None:
                self.summary = tf.summary.create_file_writer(str(self.logs_dir))
            with self.summary.as_default(step=self.step):
                tf.summary.scalar("loss", mean)
                tf.summary.scalar("learning_rate", lr)
                tf.summary.scalar("images_per_second", rate)
            self.summary.flush()
            self.losses.clear()
            self.t_last, self.step_at_last = now, self.step

    return Progress


def _Progress(*args):  # noqa: N802 - builds the Keras callback class lazily (no TF at import)
    return _make_progress_class()(*args)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
