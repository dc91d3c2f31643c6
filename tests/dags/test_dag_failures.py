"""How ``petdet_retrain`` fails: ``dag.test()`` against the real metadata DB, a local store and
the sample dataset in a local folder.

A failure caused by the inputs or the config (``petdet_tasks.errors.PermanentError``) must fail
its task on the first try, with the reason, not spend the DAG's retries and their back-off on
the same failure; any other failure keeps its retries."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.airflow


@pytest.fixture
def dag(airflow_db, tmp_path, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    # this test's own download cache (dag.test() runs the tasks in this process): the
    # session's would hand the sample's archives to later tests that count their downloads
    monkeypatch.setenv("PETDET_CACHE_DIR", str(tmp_path / "cache"))

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags["petdet_retrain"]
    # the DAG's own retry policy, without its minutes of back-off (dag.test() sleeps through
    # them): a wrongly retried task shows as a second try, not as a slow test
    for task in dag.tasks:
        assert task.retries == 2, task.task_id
        task.retry_delay = timedelta(0)
        task.retry_exponential_backoff = False
    return dag


def _tries(dag_run) -> dict[str, tuple[str, int]]:
    return {ti.task_id: (ti.state, ti.try_number) for ti in dag_run.get_task_instances()
            if ti.map_index < 1}


def _logs(capfd, caplog) -> str:
    captured = capfd.readouterr()  # the task's failure is logged to stderr
    return captured.out + captured.err + caplog.text


def test_a_quality_gate_failure_fails_once_without_retries(dag, sample_archives, tmp_path,
                                                           caplog, capfd):
    src, _ = sample_archives
    store = tmp_path / "store"
    # classes=all: the sample has 4 of the 37 breeds, so the gate refuses the data
    conf = {"source": str(src), "store_root": str(store), "classes": "all",
            "max_quarantine_fraction": 0.05, "shards": 2, "shard_tasks": 2}
    with caplog.at_level(logging.INFO):
        run = dag.test(run_conf=conf)
    assert run.state == "failed"
    tries = _tries(run)
    assert tries["download"] == ("success", 1)
    assert tries["tfrecords_shards"] == ("success", 1)
    assert tries["tfrecords_gather"] == ("failed", 1)
    assert tries["train"][0] == "upstream_failed"
    assert not list((store / "tfrecords").glob("*/_MANIFEST.json"))
    logs = _logs(capfd, caplog)
    assert "DataQualityError" in logs and "have no training example" in logs
    assert "not retried" in logs


def test_a_bad_training_config_fails_its_task_at_once(dag, sample_archives, tmp_path, caplog,
                                                      capfd):
    src, _ = sample_archives
    config_file = tmp_path / "train.json"
    config_file.write_text('{"num_step": 100}')  # a typo the trigger form cannot catch
    conf = {"source": str(src), "store_root": str(tmp_path / "store"), "classes": "present",
            "max_quarantine_fraction": 0.05, "shards": 1, "shard_tasks": 1,
            "train_config_file": str(config_file)}
    with caplog.at_level(logging.INFO):
        run = dag.test(run_conf=conf)
    assert run.state == "failed"
    tries = _tries(run)
    assert tries["tfrecords_gather"] == ("success", 1)
    assert tries["train"] == ("failed", 1)
    assert tries["export"][0] == "upstream_failed"
    logs = _logs(capfd, caplog)
    assert "ConfigError" in logs and "num_step" in logs


def test_other_failures_keep_their_retries(dag, tmp_path):
    # a source folder that is not there (yet): maybe a mount still coming up, so retried
    conf = {"source": str(tmp_path / "no-such-folder"), "store_root": str(tmp_path / "store")}
    run = dag.test(run_conf=conf)
    assert run.state == "failed"
    tries = _tries(run)
    assert tries["download"] == ("failed", 3)  # the first try and the DAG's two retries
    assert tries["tfrecords_plan"][0] == "upstream_failed"
