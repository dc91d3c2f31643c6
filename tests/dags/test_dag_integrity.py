"""DAG integrity: every DAG file imports cleanly, fast, with no DB query, no connection and no
TensorFlow; the structure and defaults a platform team relies on are there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAG_FILES = sorted((ROOT / "dags").glob("*.py"))

PROBE = r"""
import json, socket, sys, time
attempts = []
_orig_connect = socket.socket.connect
def _connect(self, address):
    attempts.append(repr(address))
    raise OSError("network access during DAG parse")
socket.socket.connect = _connect

import airflow.sdk  # the cost of Airflow itself is not the DAG's
import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import Engine
queries = []
event.listen(Engine, "before_cursor_execute", lambda *a, **k: queries.append(a[2]))
from airflow.dag_processing.dagbag import DagBag

t0, c0 = time.perf_counter(), time.process_time()
import importlib.util
spec = importlib.util.spec_from_file_location("dagfile", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
import_s, import_cpu_s = time.perf_counter() - t0, time.process_time() - c0

bag = DagBag(dag_folder=sys.argv[1])
heavy = sorted(m for m in ("tensorflow", "keras", "keras_hub", "boto3", "botocore", "PIL",
                           "lxml", "petdet_tasks.download") if m in sys.modules)
print(json.dumps({"import_s": import_s, "import_cpu_s": import_cpu_s,
                  "errors": {k: str(v) for k, v in bag.import_errors.items()},
                  "dags": sorted(bag.dag_ids), "queries": queries, "connects": attempts,
                  "heavy": heavy}))
"""


def _probe(dag_file: Path) -> dict:
    env = {**os.environ, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "sqlite:////nonexistent/x.db"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(dag_file)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_there_are_dag_files():
    assert [p.name for p in DAG_FILES] == ["petdet_retrain.py"]


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.name)
def test_dag_file_parses_cheaply(dag_file):
    report = _probe(dag_file)
    assert report["errors"] == {}
    assert report["dags"] == ["petdet_retrain"]
    assert report["queries"] == [], "DAG parse ran DB queries"
    assert report["connects"] == [], "DAG parse opened network connections"
    assert report["heavy"] == [], f"DAG parse imported heavy modules: {report['heavy']}"
    # CPU time, not wall time: the suite runs in parallel processes, and another one's work
    # (a training on both cores) would lengthen the wall time of this import, not its cost
    assert report["import_cpu_s"] < 1.0, (f"DAG file import took {report['import_cpu_s']:.2f}s "
                                          f"of CPU ({report['import_s']:.2f}s of wall time)")


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags["petdet_retrain"]


def test_retrain_dag_structure(dag):
    assert sorted(dag.task_ids) == ["detect_gather", "detect_plan", "detect_shards",
                                    "download", "evaluate", "evaluate_production", "export",
                                    "promote", "tfrecords_gather", "tfrecords_plan",
                                    "tfrecords_shards", "train"]
    chain = ["train", "export", "evaluate", "promote", "detect_plan", "detect_shards",
             "detect_gather"]
    for up, down in zip(chain, chain[1:], strict=False):
        if down != "promote":
            assert dag.get_task(down).upstream_task_ids == {up}, down
    # production is measured on this run's records beside the candidate (needs no model of
    # this run: it can run while training does), and promote compares the two
    assert dag.get_task("evaluate_production").upstream_task_ids == {"tfrecords_gather"}
    assert dag.get_task("promote").upstream_task_ids == {"evaluate", "evaluate_production"}
    assert dag.get_task("detect_shards").is_mapped
    train = dag.get_task("train")
    assert train.upstream_task_ids == {"tfrecords_gather"}
    assert (train.pool, train.queue) == ("gpu", "gpu")
    assert dag.get_task("tfrecords_plan").upstream_task_ids == {"download"}
    assert dag.get_task("tfrecords_shards").upstream_task_ids == {"tfrecords_plan"}
    assert dag.get_task("tfrecords_gather").upstream_task_ids == {"tfrecords_shards"}
    assert "petdet" in dag.tags
    assert dag.doc_md and "petdet_retrain" in dag.doc_md
    assert dag.schedule is not None or dag.timetable is not None
    assert dag.catchup is False and dag.max_active_runs == 1
    # a run stuck for good must not hold back the next weekly runs, and train's three tries
    # (a retry resumes) must fit
    assert 3 * train.execution_timeout < dag.dagrun_timeout < timedelta(days=7)
    for task in dag.tasks:
        assert task.retries >= 2, f"{task.task_id} has retries={task.retries}"
        assert task.execution_timeout is not None


def test_every_task_fails_at_once_on_a_permanent_error(dag):
    """The retries are for failures that may pass next time: every task runs through
    ``PetdetOperator.execute``, which fails a ``PermanentError`` without retrying it
    (tests/dags/test_dag_failures.py runs it). An operator that overrode ``execute`` would
    spend its retries on them again."""
    from petdet_airflow.operators import PetdetOperator

    for task in dag.tasks:
        cls = task.operator_class if task.is_mapped else type(task)
        assert issubclass(cls, PetdetOperator), task.task_id
        owner = next(k for k in cls.__mro__ if "execute" in vars(k))
        assert owner is PetdetOperator, f"{task.task_id}: {owner.__name__} overrides execute"
        assert cls.execute_step is not PetdetOperator.execute_step, (
            f"{task.task_id}: {cls.__name__} has no execute_step")


def test_retrain_dag_params_draw_a_typed_form(dag):
    params = dag.params
    assert params.get_param("source").schema["type"] == "string"
    assert params.get_param("store_root").schema["type"] == "string"
    assert params.get_param("force").schema["type"] == "boolean"
    assert params.get_param("shards").schema["type"] == "integer"
    assert params.get_param("val_fraction").schema["type"] == "number"
    assert params.get_param("image_check").schema["enum"] == ["header", "full"]
    for name in ("source", "store_root", "aws_conn_id", "force", "shards", "shard_tasks",
                 "val_fraction", "image_check", "max_quarantine_fraction", "classes",
                 "extra_data", "preset", "num_steps", "batch_size", "image_size", "optimizer",
                 "learning_rate", "checkpoint_every_n", "train_config_file",
                 "promotion_metric", "promotion_margin", "skip_detection_if_not_promoted",
                 "detect_with", "detect_images", "detection_score_threshold",
                 "detection_max_boxes", "detect_shards", "detect_tasks"):
        assert params.get_param(name).schema.get("title"), f"param {name} has no title"


def test_download_task_is_templated(dag):
    task = dag.get_task("download")
    for field in ("source", "store_root", "aws_conn_id", "force"):
        assert field in task.template_fields
    assert task.source == "{{ params.source | verbatim }}"


def test_force_reaches_every_task(dag):
    """``force`` recomputes every step: each task takes it from the param (the detection tasks
    too; tests/dags/test_dag_run.py runs a forced detection)."""
    for task in dag.tasks:
        if task.task_id == "promote":
            continue  # promote decides on the evaluation; it has nothing to recompute
        kwargs = task.partial_kwargs if task.is_mapped else vars(task)
        if task.task_id.startswith("tfrecords"):  # part of the TFRecordConfig they share
            assert "config" in task.template_fields
            value = kwargs["config"]["force"]
        else:
            assert "force" in task.template_fields, task.task_id
            value = kwargs["force"]
        assert value == "{{ params.force }}", task.task_id


def test_shard_and_gather_tasks_run_the_plan_tasks_recorded_plan(dag):
    """Not a listing of their own: an input prefix (detect_images, extra_data) may gain
    images after the plan task (tests/integration/test_detect_step.py and
    test_tfrecords_step.py show what that did)."""
    for step in ("tfrecords", "detect"):
        for task_id in (f"{step}_shards", f"{step}_gather"):
            task = dag.get_task(task_id)
            kwargs = task.partial_kwargs if task.is_mapped else vars(task)
            assert "plan_fingerprint" in task.template_fields, task_id
            assert kwargs["plan_fingerprint"] == (
                f"{{{{ ti.xcom_pull(task_ids='{step}_plan', key='plan')['fingerprint'] "
                "| verbatim }}"), task_id


def test_detection_reads_the_production_model_unless_asked_for_the_candidate(dag):
    task = dag.get_task("detect_plan")
    assert "params.detect_with == 'candidate'" in task.model_uri
    promote = dag.get_task("promote")
    assert promote.skip_downstream_if_not_promoted == \
        "{{ params.skip_detection_if_not_promoted }}"
    assert dag.params.get_param("skip_detection_if_not_promoted").value is False
