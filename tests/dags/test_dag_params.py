"""petdet_retrain's params as the trigger form and the tasks see them: the real DAG (DagBag),
its params validated the way a trigger validates them (the serialized DAG's params merged with
the run conf), its tasks' templates rendered with Airflow's own Jinja environment, and the
operators' resolution of what they rendered (training config, store connection)."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.airflow

# optional texts: the trigger form sends null for a cleared text field
OPTIONAL_TEXTS = ("aws_conn_id", "extra_data", "train_config_file", "detect_images")
# training fields that must leave a training config file's values alone unless set
TRAIN_FIELDS = ("preset", "num_steps", "batch_size", "image_size", "optimizer",
                "learning_rate", "checkpoint_every_n")


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.dags["petdet_retrain"]


@pytest.fixture(scope="module")
def trigger_params(dag):
    """The params a trigger validates: the serialized DAG's (what the API server holds)."""
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.from_dict(DagSerialization.to_dict(dag)).params


def _validated(trigger_params, conf: dict) -> dict:
    return trigger_params.deep_merge(conf).validate()


def _render(dag, task_id: str, field: str, params: dict):
    """A task's template field rendered as a run with ``params`` renders it."""
    task = dag.get_task(task_id)
    return task.render_template(getattr(task, field), {"params": params},
                                dag.get_template_env())


@pytest.mark.parametrize("name", OPTIONAL_TEXTS)
@pytest.mark.parametrize("value", [None, ""], ids=["null", "empty"])
def test_optional_text_params_may_be_cleared(trigger_params, name, value):
    _validated(trigger_params, {name: value})  # a ParamValidationError before the fix
    schema = trigger_params.get_param(name).schema
    assert schema["type"] == ["null", "string"], name


def test_cleared_optional_params_are_unset_in_the_tasks(dag, trigger_params, tmp_path):
    from petdet_airflow.operators import TrainDetectorOperator

    from petdet_tasks.tfrecords import TFRecordConfig
    from petdet_tasks.train_config import TrainConfig

    for cleared in (None, "", "None"):
        params = _validated(trigger_params, {n: None for n in (*OPTIONAL_TEXTS, *TRAIN_FIELDS)})
        params.update({n: cleared for n in OPTIONAL_TEXTS})
        assert _render(dag, "download", "aws_conn_id", params) in (None, "", "None")
        tfr = _render(dag, "tfrecords_plan", "config", params)
        assert TFRecordConfig.from_dict(tfr).extra_data is None
        train = TrainDetectorOperator(
            task_id=f"train_{uuid.uuid4().hex[:6]}", store_root=str(tmp_path / "store"),
            tfrecords_uri="unused", config=_render(dag, "train", "config", params),
            config_file=_render(dag, "train", "config_file", params))
        assert train.resolved_config() == TrainConfig(), repr(cleared)


@pytest.mark.parametrize("cleared", [None, "", "None"], ids=["null", "empty", "None"])
def test_a_cleared_aws_connection_means_the_workers_aws_environment(dag, seaweed, monkeypatch,
                                                                    cleared):
    """``aws_conn_id`` cleared: the store's client comes from the standard AWS environment
    (here pointed at the test's SeaweedFS), no Airflow connection is looked up."""
    from petdet_airflow.operators import DownloadPetsOperator

    for var, value in seaweed.env.items():
        monkeypatch.setenv(var, value)
    op = DownloadPetsOperator(task_id=f"dl_{uuid.uuid4().hex[:6]}",
                              store_root=f"s3://{seaweed.bucket}/conn-{uuid.uuid4().hex[:8]}",
                              aws_conn_id=cleared, source="unused")
    store = op.get_store()
    assert not store.has_explicit_client
    store.put_bytes("probe.txt", b"ok")
    assert store.get_bytes("probe.txt")[0] == b"ok"


def test_training_params_are_empty_by_default_and_describe_the_fallback(trigger_params):
    """Empty by default (so a config file's values apply), and the default each description
    names is TrainConfig's own."""
    from petdet_tasks.train_config import TrainConfig

    defaults = TrainConfig()
    expected = {"preset": defaults.preset, "num_steps": defaults.num_steps,
                "batch_size": defaults.batch_size, "image_size": defaults.image_size,
                "optimizer": defaults.optimizer,
                "learning_rate": defaults.learning_rate.initial_learning_rate,
                "checkpoint_every_n": defaults.checkpoint_every_n}
    values = _validated(trigger_params, {})
    for name in TRAIN_FIELDS:
        param = trigger_params.get_param(name)
        assert "null" in param.schema["type"], name
        assert values[name] is None, f"{name} defaults to {values[name]!r}"
        m = re.search(r"else (\S+?)\.?(?:\s|$)", param.description or "")
        assert m, f"{name}: the description does not say the default"
        assert m.group(1) == str(expected[name]), name
    for name, value in (("num_steps", 50), ("optimizer", "adam"), ("learning_rate", 0.001),
                        ("image_size", 640), ("preset", "some/prefix")):
        assert _validated(trigger_params, {name: value})[name] == value


def _file_config(tmp_path) -> Path:
    """A training config file that sets every field the form has (not to the defaults)."""
    from petdet_tasks.train_config import LRSchedule, TrainConfig

    cfg = TrainConfig(num_steps=50000, batch_size=24, image_size=640, optimizer="adam",
                      checkpoint_every_n=1000, preset="/models/my-preset",
                      learning_rate=LRSchedule(kind="cosine", initial_learning_rate=0.0004,
                                               warmup_steps=500, warmup_start_lr=0.0001))
    path = tmp_path / "train.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return path


def _train_op(dag, trigger_params, conf: dict, tmp_path):
    from petdet_airflow.operators import TrainDetectorOperator

    params = _validated(trigger_params, conf)
    return TrainDetectorOperator(
        task_id=f"train_{uuid.uuid4().hex[:6]}", store_root=str(tmp_path / "store"),
        tfrecords_uri="unused", config=_render(dag, "train", "config", params),
        config_file=_render(dag, "train", "config_file", params))


def test_a_training_config_file_applies_where_the_form_is_empty(dag, trigger_params, tmp_path):
    path = _file_config(tmp_path)
    cfg = _train_op(dag, trigger_params, {"train_config_file": str(path)}, tmp_path) \
        .resolved_config()
    assert (cfg.num_steps, cfg.batch_size, cfg.image_size, cfg.optimizer,
            cfg.checkpoint_every_n, cfg.preset) == (50000, 24, 640, "adam", 1000,
                                                    "/models/my-preset")
    assert cfg.learning_rate.initial_learning_rate == pytest.approx(0.0004)
    assert cfg.learning_rate.warmup_steps == 500


def test_form_values_override_the_training_config_file(dag, trigger_params, tmp_path):
    path = _file_config(tmp_path)
    conf = {"train_config_file": str(path), "num_steps": 3000, "batch_size": 2,
            "image_size": 256, "optimizer": "sgd", "learning_rate": 0.02,
            "checkpoint_every_n": 50, "preset": "retinanet_resnet50_fpn_coco"}
    cfg = _train_op(dag, trigger_params, conf, tmp_path).resolved_config()
    assert (cfg.num_steps, cfg.batch_size, cfg.image_size, cfg.optimizer,
            cfg.checkpoint_every_n, cfg.preset) == (3000, 2, 256, "sgd", 50,
                                                    "retinanet_resnet50_fpn_coco")
    assert cfg.learning_rate.initial_learning_rate == pytest.approx(0.02)
    assert cfg.learning_rate.warmup_steps == 500  # what the form does not set stays the file's
    # one field set: only that one overrides
    cfg = _train_op(dag, trigger_params, {"train_config_file": str(path), "num_steps": 700},
                    tmp_path).resolved_config()
    assert (cfg.num_steps, cfg.batch_size, cfg.image_size) == (700, 24, 640)


def test_od_api_pipeline_config_is_not_overridden_by_form_defaults(dag, trigger_params,
                                                                   tmp_path):
    """The OD API pets tutorial's pipeline.config, as the option's description offers it."""
    from petdet_tasks.train_config import load_train_config

    fixture = ROOT / "tests" / "fixtures" / "faster_rcnn_resnet101_pets.config"
    want = load_train_config(fixture)
    got = _train_op(dag, trigger_params, {"train_config_file": str(fixture)}, tmp_path) \
        .resolved_config()
    assert got == want
