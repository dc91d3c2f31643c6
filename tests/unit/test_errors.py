"""Which failures are permanent (the Airflow task fails at once, the CLI exits 2) and which
may pass on a retry (the task keeps its retries, the CLI exits 1)."""

from __future__ import annotations

import pytest

from petdet_tasks.__main__ import main
from petdet_tasks.errors import ConfigError, PermanentError


def _config_failures():
    from petdet_tasks.detect import DetectConfig
    from petdet_tasks.evaluate import EvalConfig
    from petdet_tasks.export import ExportConfig
    from petdet_tasks.tfrecords import TFRecordConfig
    from petdet_tasks.train_config import TrainConfig
    from petdet_tasks.train_input import InputConfig

    return {
        "tfrecords": lambda: TFRecordConfig(val_fraction=2.0).validate(),
        "tfrecords keys": lambda: TFRecordConfig.from_dict({"shards": 3}),
        "detect": lambda: DetectConfig(max_boxes=0).validate(),
        "detect keys": lambda: DetectConfig.from_dict({"max_box": 3}),
        "evaluate": lambda: EvalConfig(batch_size=0).validate(),
        "export": lambda: ExportConfig(iou_threshold=0.0).validate(),
        "export keys": lambda: ExportConfig.from_dict({"iou": 0.5}),
        "train": lambda: TrainConfig(num_steps=0).validate(),
        "input": lambda: InputConfig(image_size=8).validate(),
    }


@pytest.mark.parametrize("name", sorted(_config_failures()))
def test_every_config_check_raises_a_permanent_config_error(name):
    with pytest.raises(ConfigError) as e:
        _config_failures()[name]()
    assert isinstance(e.value, PermanentError) and isinstance(e.value, ValueError)


def test_a_config_error_lists_each_problem_on_its_own():
    from petdet_tasks.detect import DetectConfig
    from petdet_tasks.tfrecords import TFRecordConfig

    with pytest.raises(ConfigError) as e:
        TFRecordConfig(num_shards=0, val_fraction=2.0).validate()
    assert len(e.value.problems) == 2
    assert e.value.problems[1] == "val_fraction must be in (0, 1), got 2.0"
    assert str(e.value) == "invalid tfrecords config: " + "; ".join(e.value.problems)
    with pytest.raises(ConfigError) as e:
        DetectConfig(max_boxes=0, batch_size=0).validate()
    assert [p.split()[0] for p in e.value.problems] == ["max_boxes", "batch_size"]


def test_the_data_and_model_failures_are_permanent_the_io_ones_are_not():
    from petdet_tasks.download import DatasetLayoutError
    from petdet_tasks.export import ExportError
    from petdet_tasks.fetch import ChecksumMismatch, FetchError
    from petdet_tasks.label_map import LabelMapError
    from petdet_tasks.manifest import LeaseLost, UnreadableManifest
    from petdet_tasks.pipeline_config import PbtxtError
    from petdet_tasks.registry import RegistryError
    from petdet_tasks.safe_tar import ArchiveTooLarge, DamagedArchive, UnsafeArchiveError
    from petdet_tasks.store import NotFound, StoreError
    from petdet_tasks.tfrecords import DataQualityError, ShardWorkerError
    from petdet_tasks.train import TrainingDiverged

    permanent = [DataQualityError, TrainingDiverged, LabelMapError, UnsafeArchiveError,
                 DatasetLayoutError, ExportError, PbtxtError, RegistryError, DamagedArchive,
                 ArchiveTooLarge, UnreadableManifest]
    # a store or network failure, a corrupt transfer, a lost lease, a killed worker: a retry
    # may pass
    retryable = [StoreError, NotFound, FetchError, ChecksumMismatch, LeaseLost,
                 ShardWorkerError, OSError]
    assert [c for c in permanent if not issubclass(c, PermanentError)] == []
    assert [c for c in retryable if issubclass(c, PermanentError)] == []
    # still the built-in kinds callers catch
    assert issubclass(DataQualityError, ValueError) and issubclass(TrainingDiverged, RuntimeError)


def test_cli_exits_2_on_a_permanent_error_1_otherwise(tmp_path, caplog):
    store = str(tmp_path / "store")
    assert main(["tfrecords", "--store", store, "--dataset", "datasets/x",
                 "--val-fraction", "1.5"]) == 2
    assert "val_fraction must be in (0, 1)" in caplog.text
    # a well-formed output that is not there (yet): maybe still being written, so 1
    assert main(["tfrecords", "--store", store, "--dataset", "datasets/" + "0" * 20]) == 1
    assert "has no _MANIFEST.json" in caplog.text


@pytest.mark.parametrize("args, message", [
    (["--dataset", "datasets/0123456789"], "invalid fingerprint"),
    (["--dataset", "models/" + "0" * 20], "is a 'export' output, expected a 'download' output"),
    (["--dataset", "s3://elsewhere/p/datasets/" + "0" * 20], "is not under the store root"),
])
def test_cli_exits_2_for_an_output_uri_that_cannot_be_right(tmp_path, caplog, args, message):
    assert main(["tfrecords", "--store", str(tmp_path / "store"), *args]) == 2
    assert message in caplog.text


@pytest.mark.parametrize("argv, message", [
    (["tfrecords", "--store", "s", "--dataset", "d", "--workers", "0"], "must be at least 1"),
    (["tfrecords", "--store", "s", "--dataset", "d", "--workers", "-3"], "must be at least 1"),
    (["make-preset", "out", "--num-classes", "0"], "must be at least 1"),
    (["sample-data", "out", "--breeds", "38"], None),
])
def test_cli_usage_and_argument_errors_exit_2(tmp_path, capsys, caplog, argv, message):
    argv = [a if a != "out" else str(tmp_path / "out") for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2
    if message:
        assert message in capsys.readouterr().err
    else:
        assert "breeds must be between 1 and 37" in caplog.text

