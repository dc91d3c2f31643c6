"""Builds the upstream steps a test needs (sample → download → tfrecords → train), small."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from petdet_tasks.manifest import StepResult
from petdet_tasks.store import Store


@dataclass
class Trained:
    work: Path
    store: Store
    sample: dict  # make_sample's summary
    dataset: StepResult
    records: StepResult
    training: StepResult


def build_trained(store: Store, work: Path, *, breeds: int = 6, per_breed: int = 12,
                  image_size: int = 128, steps: int = 30) -> Trained:
    """A micro RetinaNet (detector.py's test arch) fine-tuned briefly on the synthetic pets."""
    from petdet_tasks.detector import make_preset
    from petdet_tasks.download import DownloadConfig, download
    from petdet_tasks.sample_data import make_sample
    from petdet_tasks.tfrecords import TFRecordConfig, build
    from petdet_tasks.train import train
    from petdet_tasks.train_config import LRSchedule, TrainConfig

    sample = make_sample(work / "sample", breeds=breeds, per_breed=per_breed, seed=0)
    dataset = download(store, DownloadConfig(source=str(work / "sample"),
                                             cache_dir=str(work / "cache")))
    records = build(store, dataset.uri, TFRecordConfig(num_shards=2, classes="present",
                                                       max_quarantine_fraction=0.1), workers=1)
    preset = make_preset(work / "preset", num_classes=5, image_size=image_size, arch="micro",
                         train_steps=2)
    cfg = TrainConfig(image_size=image_size, batch_size=8, num_steps=steps,
                      checkpoint_every_n=steps, log_every_n=10, preset=str(preset),
                      optimizer="sgd", learning_rate=LRSchedule(kind="constant",
                                                                initial_learning_rate=0.004))
    training = train(store, records.uri, cfg, cache_dir=work / "cache")
    return Trained(work, store, sample, dataset, records, training)
