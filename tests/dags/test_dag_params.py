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


class _TI:
    """The ``ti`` a template's ``xcom_pull`` reads: every step's result and plan."""

    def __init__(self, text: str):
        self.text = text

    def xcom_pull(self, task_ids: str, key: str = "return_value"):
        return {"uri": self.text, "fingerprint": self.text, "model_uri": self.text}


FREE_TEXTS = ("source", "aws_conn_id", "extra_data", "preset", "train_config_file",
              "detect_images")
# texts that read as Python literals: native rendering evaluated them (2024.1, 20240601, ...)
LITERAL_LOOKING = ["2024.10", "2024_06_01", "1e3", "0x10", "True", "[1]", "'q'",
                   "12345678901234567890"]


@pytest.mark.parametrize("text", LITERAL_LOOKING)
def test_texts_reach_the_tasks_as_typed_even_when_they_read_as_numbers(dag, trigger_params,
                                                                       text):
    """A prefix named ``2024.10`` stays ``"2024.10"`` (rendered bare it became the float
    2024.1: another prefix, read without a word); so do a preset, a config file, a source, a
    connection id, and whatever the tasks pull from XCom (a fingerprint may be all digits)."""
    params = _validated(trigger_params, {"extra_data": text, "detect_images": text,
                                         "preset": text, "train_config_file": text,
                                         "source": text, "aws_conn_id": text,
                                         "detect_with": "candidate"})
    context = {"params": params, "ti": _TI(text)}
    env = dag.get_template_env()

    def is_text(template) -> bool:  # a free text param's template, or one reading XCom
        return isinstance(template, str) and "{{" in template and (
            "xcom_pull" in template or any(f"params.{n} " in template for n in FREE_TEXTS))

    texts = {}
    for task in dag.tasks:
        kwargs = task.partial_kwargs if task.is_mapped else vars(task)
        for field in task.template_fields:
            value = kwargs.get(field)
            pairs = value.items() if isinstance(value, dict) else [(None, value)]
            for k, template in pairs:
                if is_text(template):
                    name = f"{task.task_id}.{field}" + (f".{k}" if k else "")
                    texts[name] = task.render_template(template, context, env)
    assert all(v == text for v in texts.values()), {k: v for k, v in texts.items() if v != text}
    for name in ("download.source", "download.aws_conn_id", "train.config.preset",
                 "train.config_file", "tfrecords_plan.config.extra_data",
                 "detect_plan.images", "detect_plan.model_uri", "detect_shards.model_uri",
                 "tfrecords_gather.plan_fingerprint", "detect_gather.plan_fingerprint",
                 "export.training_uri"):
        assert name in texts, name


@pytest.mark.parametrize("conf", [{"store_root": "s3://petdet/petdet "},
                                  {"store_root": " /data/petdet"},
                                  {"store_root": "/data/petdet\n"},
                                  {"store_root": "file:///data/petdet\t"},
                                  {"source": " "}, {"source": "/data/pets "}],
                         ids=["s3-trailing", "leading", "newline", "file-tab", "blank",
                              "source-trailing"])
def test_a_root_or_source_with_surrounding_space_is_refused_by_the_form(trigger_params, conf):
    """A pasted ``"s3://petdet/petdet "`` would name another store: a fresh download,
    retraining and a second registry, without a word."""
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError):
        _validated(trigger_params, conf)


@pytest.mark.parametrize("conf", [{"store_root": "s3://petdet/petdet"},
                                  {"store_root": "s3://petdet/"}, {"store_root": "s3://petdet"},
                                  {"store_root": "/data/my store"},
                                  {"store_root": "file:///data/x"},
                                  {"source": "https://example.org/pets/"},
                                  {"source": "/data/my pets"}, {"source": "x"}])
def test_roots_and_sources_with_inner_spaces_are_accepted(trigger_params, conf):
    assert _validated(trigger_params, conf)[next(iter(conf))] == next(iter(conf.values()))


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


def test_the_training_config_log_line_shows_no_credentials(dag, trigger_params, tmp_path,
                                                           capfd, caplog):
    op = _train_op(dag, trigger_params,
                   {"preset": "s3://AKIAEXAMPLE:wJalrSECRETKEY@other-bucket/presets/x"},
                   tmp_path)
    with caplog.at_level("INFO"), pytest.raises(Exception) as e:  # no such records: fails
        op.execute({"run_id": "manual__1"})
    out = capfd.readouterr()
    seen = out.out + out.err + caplog.text  # the task logger (structlog) writes to stdout
    assert "training config:" in seen and "***@other-bucket" in seen, seen
    assert "SECRETKEY" not in seen + str(e.value)


def test_the_image_size_choices_are_the_sizes_training_accepts(trigger_params):
    from airflow.sdk.definitions.param import ParamValidationError

    from petdet_tasks.train_config import valid_image_size

    choices = trigger_params.get_param("image_size").schema["enum"]
    assert choices[0] is None and [s for s in range(1, 2000) if valid_image_size(s)] == \
        choices[1:]
    for bad in (96, 320, 416):
        with pytest.raises(ParamValidationError):
            _validated(trigger_params, {"image_size": bad})


def test_whole_number_floats_from_an_api_client_are_the_integers_they_are(dag, trigger_params,
                                                                         tmp_path):
    """JSON Schema's ``integer`` admits 8.0 (a REST client may send it): the form takes it, so
    train must too, not fail with a ConfigError after download and tfrecords ran."""
    conf = {"num_steps": 100.0, "batch_size": 8.0, "image_size": 256.0,
            "checkpoint_every_n": 50.0}
    cfg = _train_op(dag, trigger_params, conf, tmp_path).resolved_config()
    assert (cfg.num_steps, cfg.batch_size, cfg.image_size, cfg.checkpoint_every_n) == (
        100, 8, 256, 50)
    assert all(type(v) is int for v in (cfg.num_steps, cfg.batch_size, cfg.image_size,
                                        cfg.checkpoint_every_n))
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError):  # a fraction is still refused by the form
        _validated(trigger_params, {"batch_size": 8.5})


def test_od_api_pipeline_config_is_not_overridden_by_form_defaults(dag, trigger_params,
                                                                   tmp_path):
    """The OD API pets tutorial's pipeline.config, as the option's description offers it."""
    from petdet_tasks.train_config import load_train_config

    fixture = ROOT / "tests" / "fixtures" / "faster_rcnn_resnet101_pets.config"
    want = load_train_config(fixture)
    got = _train_op(dag, trigger_params, {"train_config_file": str(fixture)}, tmp_path) \
        .resolved_config()
    assert got == want
