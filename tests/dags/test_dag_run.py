"""``dag.test()`` of petdet_retrain against a real metadata DB (SQLite), a real S3 server
(SeaweedFS, reached through an Airflow connection) and a local HTTP server with the sample."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from petdet_tasks.manifest import read_manifest
from petdet_tasks.store import S3Store
from tests.support.http_server import serve_directory

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.airflow


@pytest.fixture
def aws_connection(seaweed, monkeypatch):
    conn = {
        "conn_type": "aws",
        "login": seaweed.access_key,
        "password": seaweed.secret_key,
        "extra": {"endpoint_url": seaweed.endpoint, "region_name": "us-east-1"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_PETDET_TEST_S3", json.dumps(conn))
    return "petdet_test_s3"


def _dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags["petdet_retrain"]


def _xcom(dag_run, task_id, key="return_value", map_index=-1):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.query(XComModel).filter_by(
            dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id=task_id, key=key,
            map_index=map_index).one()
        value = row.value
    return json.loads(value) if isinstance(value, str) else value


def _mapped_xcoms(dag_run, task_id, n):
    return [_xcom(dag_run, task_id, map_index=i) for i in range(n)]


@pytest.fixture(scope="module")
def micro_preset(tmp_path_factory):
    from petdet_tasks.detector import make_preset

    return make_preset(tmp_path_factory.mktemp("preset") / "micro", num_classes=4,
                       image_size=64, arch="micro", train_steps=1)


@pytest.fixture
def gpu_pool(airflow_db):
    import subprocess
    import sys

    subprocess.run([str(Path(sys.executable).parent / "airflow"), "pools", "set", "gpu", "1",
                    "GPU slots"], check=True, capture_output=True)
    return "gpu"


def test_dag_test_runs_the_pipeline_into_s3_then_hits_the_cache(airflow_db, seaweed, s3_client,
                                                                aws_connection, sample_archives,
                                                                micro_preset, gpu_pool, tmp_path,
                                                                caplog, capfd, monkeypatch):
    src, summary = sample_archives
    # a download cache of its own: the archive requests below count real downloads
    monkeypatch.setenv("PETDET_CACHE_DIR", str(tmp_path / "cache"))
    root = f"s3://{seaweed.bucket}/dagtest-{uuid.uuid4().hex[:8]}"
    dag = _dag()
    with serve_directory(src) as server:
        conf = {"source": server.url, "store_root": root, "aws_conn_id": aws_connection,
                "classes": "present", "max_quarantine_fraction": 0.05, "shards": 2,
                "shard_tasks": 2, "preset": str(micro_preset), "num_steps": 4,
                "checkpoint_every_n": 2, "image_size": 64, "batch_size": 4,
                "detect_shards": 2, "detect_tasks": 2, "detection_score_threshold": 0.05}
        run1 = dag.test(run_conf=conf)
        assert run1.state == "success"
        archive_gets = [r for r in server.requests if r.path.endswith(".tar.gz")]
        assert len(archive_gets) == 2

        out = _xcom(run1, "download")
        assert out["cache_hit"] is False
        assert out["uri"] == f"{root}/datasets/{out['fingerprint']}"
        assert out["images"] == summary["images"]

        store = S3Store(root, client=s3_client)
        manifest = read_manifest(store, f"datasets/{out['fingerprint']}/")
        assert manifest is not None and manifest["outputs"]["images"] == summary["images"]
        assert manifest["writer"]["run_id"] == run1.run_id

        tfr = _xcom(run1, "tfrecords_gather")
        assert tfr["cache_hit"] is False and tfr["train"] > 0 and tfr["val"] > 0
        assert tfr["quarantined"] == 1 and tfr["repaired"] == 4
        assert read_manifest(store, f"tfrecords/{tfr['fingerprint']}/") is not None
        assert _xcom(run1, "tfrecords_plan", key="plan")["fingerprint"] == tfr["fingerprint"]
        assert len(_xcom(run1, "tfrecords_plan")) == 2  # shard groups, one per mapped task

        trained = _xcom(run1, "train")
        assert trained["cache_hit"] is False and trained["steps"] == 4
        assert trained["uri"] == f"{root}/training/{trained['fingerprint']}"
        assert read_manifest(store, f"training/{trained['fingerprint']}/") is not None

        model = _xcom(run1, "export")
        assert model["cache_hit"] is False and model["parity_checks"] == 5
        assert model["uri"] == f"{root}/models/{model['fingerprint']}"
        evaluation = _xcom(run1, "evaluate")
        assert evaluation["model_uri"] == model["uri"] and 0 <= evaluation["mAP"] <= 1
        decision = _xcom(run1, "promote")
        assert decision["promoted"] is True and decision["production"] is None
        assert _xcom(run1, "promote", key="decision") == decision
        pointer = json.loads(store.read_text("registry/production.json"))
        assert pointer["model_uri"] == model["uri"]
        assert pointer["evaluation_uri"] == evaluation["uri"]
        assert pointer["evaluated_on"] == {"tfrecords": tfr["fingerprint"], "split": "val"}
        assert _xcom(run1, "evaluate_production")["uri"] is None  # no production model yet
        assert _xcom(run1, "detect_plan", key="plan")["model_uri"] == model["uri"]
        detected = _xcom(run1, "detect_gather")
        assert detected["cache_hit"] is False
        assert detected["images"] == summary["test"]
        prefix = f"detections/{detected['fingerprint']}/"
        page = store.read_text(prefix + "index.html")
        jsons = [o.key for o in store.list(prefix + "images/")]
        assert len(jsons) == summary["test"]
        for key in jsons:  # every image has a card in the gallery
            assert key[len(prefix + "images/"):-len(".json")] in page

        n = len(server.requests)
        run2 = dag.test(run_conf=conf)
        assert run2.state == "success"
        out2 = _xcom(run2, "download")
        assert out2["cache_hit"] is True and out2["fingerprint"] == out["fingerprint"]
        assert not [r for r in server.requests[n:] if r.path.endswith(".tar.gz")]
        assert _xcom(run2, "tfrecords_gather")["cache_hit"] is True
        assert _xcom(run2, "train")["cache_hit"] is True
        for task_id in ("export", "evaluate", "detect_gather"):
            assert _xcom(run2, task_id)["cache_hit"] is True, task_id
        # the mapped shard tasks say so too (the demo's summary reads this), and wrote nothing
        for task_id in ("tfrecords_shards", "detect_shards"):
            assert [x["cache_hit"] for x in _mapped_xcoms(run1, task_id, 2)] == [False] * 2
            assert [x["cache_hit"] for x in _mapped_xcoms(run2, task_id, 2)] == [True] * 2
        assert [x["images"] for x in _mapped_xcoms(run2, "detect_shards", 2)] == [0, 0]
        assert "already in production" in _xcom(run2, "promote")["reason"]
        # production on this run's records: the same records, so its own evaluation
        production_eval = _xcom(run2, "evaluate_production")
        assert production_eval["cache_hit"] is True
        assert production_eval["uri"] == evaluation["uri"]

        # a new model that must beat production by 1.0 mAP: not promoted, and with
        # skip_detection_if_not_promoted the run ends at promote
        run3 = dag.test(run_conf={**conf, "num_steps": 6, "promotion_margin": 1.0,
                                  "skip_detection_if_not_promoted": True})
        assert run3.state == "success"
        states = {ti.task_id: ti.state for ti in run3.get_task_instances()}
        assert states["evaluate"] == "success" and states["promote"] == "skipped"
        assert states["detect_plan"] == "skipped" and states["detect_gather"] == "skipped"
        decision3 = _xcom(run3, "promote", key="decision")
        assert decision3["promoted"] is False
        assert decision3["reason"].startswith("not promoted")
        assert decision3["production_evaluation"] == evaluation["uri"]  # the same records
        assert json.loads(store.read_text("registry/production.json")) == pointer

    # force reaches detection: the detection tasks alone, forced, on the same production model
    # and images recompute the same output (no cache hit) and commit it again
    detection = dag.partial_subset(task_ids=["detect_plan", "detect_shards", "detect_gather"],
                                   include_upstream=False)
    assert sorted(detection.task_ids) == ["detect_gather", "detect_plan", "detect_shards"]
    run4 = detection.test(run_conf={**conf, "force": True})
    assert run4.state == "success"
    planned4 = _xcom(run4, "detect_plan", key="plan")
    assert planned4["cache_hit"] is False and planned4["model_uri"] == model["uri"]
    assert planned4["fingerprint"] == detected["fingerprint"]
    shards4 = _mapped_xcoms(run4, "detect_shards", 2)
    assert [x["cache_hit"] for x in shards4] == [False] * 2
    assert sum(x["images"] for x in shards4) == summary["test"]  # every image detected again
    detected4 = _xcom(run4, "detect_gather")
    assert detected4["cache_hit"] is False
    assert detected4["fingerprint"] == detected["fingerprint"]
    assert read_manifest(store, prefix)["writer"]["run_id"] == run4.run_id

    # the secret never reaches a log line or XCom
    captured = capfd.readouterr()
    logs = captured.out + captured.err + "\n".join(r.getMessage() for r in caplog.records)
    assert seaweed.secret_key not in logs
    assert seaweed.secret_key not in json.dumps(out) + json.dumps(out2)
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") is None
