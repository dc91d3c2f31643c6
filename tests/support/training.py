"""What the training tests share: their sample store and preset, configs, and the ways they
stop a training at a chosen point (tests/integration/test_train_*.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from petdet_tasks.detector import make_preset
from petdet_tasks.download import DownloadConfig, download
from petdet_tasks.layout import step_prefix
from petdet_tasks.sample_data import make_sample
from petdet_tasks.store import LocalStore
from petdet_tasks.tfrecords import TFRecordConfig, build
from petdet_tasks.train_config import LRSchedule, TrainConfig

SIZE = 128


def make_setup(work: Path):
    """The setup the training tests share (conftest's ``training_setup``): the sample (6 breeds
    x 30) downloaded and made into records in a local store, and a micro 5-class preset to
    fine-tune from (micro: the detector.py arch without head convolutions, a step 2.4x as fast
    as tiny's)."""
    make_sample(work / "sample", breeds=6, per_breed=30, seed=0)
    store = LocalStore(work / "store")
    dataset = download(store, DownloadConfig(source=str(work / "sample"),
                                             cache_dir=str(work / "cache"))).uri
    records = build(store, dataset, TFRecordConfig(num_shards=2, classes="present",
                                                   max_quarantine_fraction=0.05), workers=1)
    preset = make_preset(work / "preset", num_classes=5, image_size=SIZE, arch="micro",
                         train_steps=2)
    return work, store, records, preset


def train_cfg(preset, **kw) -> TrainConfig:
    base = dict(image_size=SIZE, batch_size=8, num_steps=40, checkpoint_every_n=20,
                log_every_n=10, preset=str(preset), optimizer="sgd", momentum=0.9,
                learning_rate=LRSchedule(kind="cosine", initial_learning_rate=0.004,
                                         warmup_steps=20, warmup_start_lr=0.0004))
    base.update(kw)
    return TrainConfig(**base)


def small_cfg(preset, seed: int, **kw) -> TrainConfig:
    base = dict(image_size=64, batch_size=4, num_steps=4, checkpoint_every_n=2, log_every_n=2,
                seed=seed, learning_rate=LRSchedule(kind="constant", initial_learning_rate=0.001))
    return train_cfg(preset, **{**base, **kw})


class Crash(Exception):
    """Stands for a kill: raised from inside the training at a chosen point."""


def crash_after(monkeypatch, at: int) -> list[str]:
    """Stop the next training right after its checkpoint at step ``at``; the list gets the
    training's prefix."""
    import petdet_tasks.train as train_module

    original_save = train_module._Checkpointer.save
    prefixes: list[str] = []

    def save_then_crash(self, step, extra, **kw):
        original_save(self, step, extra, **kw)
        if step == at:
            prefixes.append(self.writer.prefix)
            raise Crash(f"stopped after the checkpoint at step {at}")

    monkeypatch.setattr(train_module._Checkpointer, "save", save_then_crash)
    return prefixes


def spy_streams(monkeypatch) -> list[dict]:
    """Record every input stream the step builds: a training stream's seed, skip and shards,
    the validation stream's batch."""
    import petdet_tasks.train_input as train_input

    made: list[dict] = []
    original = train_input.make_dataset

    def spy(paths, label_ids, cfg, *, training, **kw):
        made.append({"seed": cfg.seed, "skip": kw.get("skip", 0), "shards": len(paths)}
                    if training else {"val_batch": cfg.batch_size})
        return original(paths, label_ids, cfg, training=training, **kw)

    monkeypatch.setattr(train_input, "make_dataset", spy)
    return made


def checkpoint_files(store, result) -> list[str]:
    prefix = step_prefix("train", result.fingerprint) + "checkpoints/"
    return sorted(o.key[len(prefix):] for o in store.list(prefix))


def latest_pointer(store, cfg_seed_prefix: str) -> dict:
    return json.loads(store.read_text(cfg_seed_prefix + "checkpoints/latest.json"))


def event_steps(store, prefix: str, tag: str = "loss") -> list[int]:
    """The steps of ``tag`` in every TensorBoard event file under ``prefix`` + logs/."""
    import tensorflow as tf

    steps = []
    for obj in store.list(prefix + "logs/"):
        data = store.get_bytes(obj.key)[0]
        path = f"/tmp/petdet-events-{os.getpid()}"
        with open(path, "wb") as f:
            f.write(data)
        for event in tf.compat.v1.train.summary_iterator(path):
            steps += [event.step for v in event.summary.value if v.tag == tag]
        os.unlink(path)
    return sorted(steps)

