"""TrainConfig: defaults, validation messages, dict/JSON/YAML round trip, the LR reference."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest

from petdet_tasks.train_config import (
    Augmentation,
    ConfigError,
    LRSchedule,
    TrainConfig,
    load_train_config,
)

TUTORIAL_LR = LRSchedule(kind="manual_step", initial_learning_rate=0.0003,
                         steps=((900000, 0.00003), (1200000, 0.000003)))


def _problems(**changes) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        replace(TrainConfig(), **changes).validate()
    return ei.value.problems


def _one_problem(**changes) -> str:
    problems = _problems(**changes)
    assert len(problems) == 1, problems
    return problems[0]


# ------------------------------------------------------------------------------------ defaults


def test_defaults_are_valid():
    cfg = TrainConfig()
    assert cfg.validate() is cfg
    assert cfg.problems() == []
    assert cfg.learning_rate.kind == "cosine"
    assert cfg.augmentation == Augmentation()


def test_module_imports_no_tensorflow_or_keras():
    code = ("import sys, petdet_tasks.train_config, petdet_tasks.pipeline_config; "
            "bad = [m for m in ('tensorflow', 'keras', 'keras_hub') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------- dict round trip


def test_round_trip_defaults_and_custom():
    custom = TrainConfig(
        image_size=512, keep_aspect_ratio=False, batch_size=2, optimizer="adam", momentum=0.5,
        learning_rate=LRSchedule(kind="manual_step", initial_learning_rate=0.02,
                                 steps=((100, 0.002), (200, 0.0002)), warmup_steps=10,
                                 warmup_start_lr=0.001),
        clipnorm=None, weight_decay=1e-4, num_steps=300, checkpoint_every_n=50, log_every_n=5,
        augmentation=Augmentation(horizontal_flip=False, scale_jitter=(0.5, 2.0),
                                  color_jitter=0.0),
        freeze_backbone=True, preset="/models/preset", num_classes=37,
        label_map_path="x/label_map.pbtxt", input_paths=("a", "b"), seed=7,
        mixed_precision="off")
    for cfg in (TrainConfig(), custom):
        d = cfg.to_dict()
        assert json.loads(json.dumps(d)) == d  # JSON-able as is
        assert TrainConfig.from_dict(d) == cfg
        assert TrainConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_from_dict_partial_and_nested_defaults():
    cfg = TrainConfig.from_dict({"batch_size": 4, "learning_rate": {"initial_learning_rate": 1},
                                 "augmentation": {"scale_jitter": [0.9, 1.1]}})
    assert cfg.batch_size == 4
    assert cfg.learning_rate == LRSchedule(initial_learning_rate=1.0)
    assert isinstance(cfg.learning_rate.initial_learning_rate, float)
    assert cfg.augmentation.scale_jitter == (0.9, 1.1)
    assert cfg.augmentation.horizontal_flip is True
    # steps as pairs or as {"step", "learning_rate"} dicts; lists become tuples (hashable)
    cfg = TrainConfig.from_dict({"learning_rate": {
        "kind": "manual_step", "steps": [[10, 0.1], {"step": 20, "learning_rate": 0.01}]}})
    assert cfg.learning_rate.steps == ((10, 0.1), (20, 0.01))
    hash(cfg)


def test_from_dict_unknown_key_suggests_and_lists_valid_keys():
    with pytest.raises(ConfigError) as ei:
        TrainConfig.from_dict({"batch_sise": 4})
    msg = str(ei.value)
    assert "batch_sise" in msg and "did you mean 'batch_size'" in msg
    assert "valid keys:" in msg and "num_steps" in msg
    with pytest.raises(ConfigError, match=r"learning_rate\.warmup: unknown key.*warmup_steps"):
        TrainConfig.from_dict({"learning_rate": {"warmup": 5}})


def test_from_dict_type_errors_are_named():
    with pytest.raises(ConfigError) as ei:
        TrainConfig.from_dict({"batch_size": "8", "freeze_backbone": "yes",
                               "learning_rate": "cosine", "momentum": "fast",
                               "num_steps": 10.5, "image_size": True})
    msg = str(ei.value)
    for name in ("batch_size", "freeze_backbone", "learning_rate", "momentum", "num_steps",
                 "image_size"):
        assert f"- {name}:" in msg, (name, msg)
    assert "got '8'" in msg
    with pytest.raises(ConfigError, match="expected a mapping"):
        TrainConfig.from_dict([1, 2])


def test_from_dict_yaml_friendly_coercions():
    # YAML 1.1 reads 1e-4 as a string and on/off as booleans
    cfg = TrainConfig.from_dict({"weight_decay": "1e-4", "mixed_precision": False})
    assert cfg.weight_decay == 1e-4 and cfg.mixed_precision == "off"
    assert TrainConfig.from_dict({"mixed_precision": True}).mixed_precision == "on"


def test_merged_overrides_nested_keys_only():
    cfg = TrainConfig().merged({"learning_rate": {"initial_learning_rate": 0.05},
                                "num_steps": 10})
    assert cfg.learning_rate.initial_learning_rate == 0.05
    assert cfg.learning_rate.kind == "cosine" and cfg.num_steps == 10


# -------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("changes, field, fragment", [
    ({"batch_size": 0}, "batch_size", "integer >= 1, got 0"),
    ({"num_steps": 0}, "num_steps", "integer >= 1, got 0"),
    ({"checkpoint_every_n": 0}, "checkpoint_every_n", ">= 1"),
    ({"log_every_n": -1}, "log_every_n", ">= 1"),
    ({"image_size": 100}, "image_size", "64 or a multiple of 128 in [64, 1536] (keras-hub's "
     "anchor grid matches the P6/P7 feature maps (strides 64, 128) only at 64 px or "
     "multiples of 128), got 100"),
    ({"image_size": 96}, "image_size", "64 or a multiple of 128 in [64, 1536]"),
    ({"image_size": 320}, "image_size", "anchor grid"),
    ({"image_size": 32}, "image_size", "in [64, 1536] (keras-hub's anchor grid"),
    ({"image_size": 1568}, "image_size", "got 1568"),
    ({"image_size": 1664}, "image_size", "got 1664"),
    ({"image_size": "384"}, "image_size", "an integer, 64 or a multiple of 128"),
    ({"momentum": 1.0}, "momentum", "< 1"),
    ({"momentum": -0.1}, "momentum", ">= 0"),
    ({"optimizer": "adamw"}, "optimizer", "'sgd', 'adam', got 'adamw'"),
    ({"mixed_precision": "fp16"}, "mixed_precision", "'auto', 'on', 'off'"),
    ({"clipnorm": 0.0}, "clipnorm", "> 0"),
    ({"weight_decay": -1.0}, "weight_decay", ">= 0"),
    ({"num_classes": 0}, "num_classes", ">= 1"),
    ({"preset": ""}, "preset", "keras-hub preset"),
    ({"seed": -1}, "seed", ">= 0"),
    ({"input_paths": "a"}, "input_paths", "list of strings"),
    ({"learning_rate": LRSchedule(initial_learning_rate=0.0)},
     "learning_rate.initial_learning_rate", "> 0, got 0.0"),
    ({"learning_rate": LRSchedule(initial_learning_rate=math.nan)},
     "learning_rate.initial_learning_rate", "finite"),
    ({"learning_rate": LRSchedule(kind="step")}, "learning_rate.kind", "'manual_step'"),
    ({"learning_rate": LRSchedule(alpha=1.5)}, "learning_rate.alpha", "<= 1"),
    ({"learning_rate": LRSchedule(kind="constant", warmup_steps=5)},
     "learning_rate.warmup_steps", "expected 0 for kind 'constant'"),
    ({"learning_rate": LRSchedule(warmup_steps=2000)}, "learning_rate.warmup_steps",
     "fewer than num_steps=2000, got 2000"),
    ({"learning_rate": LRSchedule(steps=((10, 0.1),))}, "learning_rate.steps",
     "only used by 'manual_step'"),
    ({"learning_rate": LRSchedule(kind="manual_step", steps=((20, 0.1), (20, 0.01)))},
     "learning_rate.steps[1].step", "strictly increasing (> 20), got 20"),
    ({"learning_rate": LRSchedule(kind="manual_step", steps=((0, 0.1),))},
     "learning_rate.steps[0].step", ">= 1, got 0"),
    ({"learning_rate": LRSchedule(kind="manual_step", steps=((10, -0.1),))},
     "learning_rate.steps[0].learning_rate", "> 0"),
    ({"learning_rate": LRSchedule(kind="manual_step", steps=((10, 0.1),), warmup_steps=10)},
     "learning_rate.steps[0].step", "after the warm-up"),
    ({"augmentation": Augmentation(scale_jitter=(1.2, 0.8))}, "augmentation.scale_jitter",
     "0 < lo <= hi"),
    ({"augmentation": Augmentation(scale_jitter=(0.0, 1.0))}, "augmentation.scale_jitter",
     "0 < lo <= hi"),
    ({"augmentation": Augmentation(color_jitter=1.5)}, "augmentation.color_jitter", "< 1"),
    ({"augmentation": Augmentation(color_jitter=1.0)}, "augmentation.color_jitter",
     ">= 0 and < 1, got 1.0"),
    ({"augmentation": Augmentation(horizontal_flip="yes")}, "augmentation.horizontal_flip",
     "true or false"),
])
def test_each_rule_names_field_expected_and_got(changes, field, fragment):
    problem = _one_problem(**changes)
    assert problem.startswith(field + ":"), problem
    assert "expected" in problem and "got" in problem
    assert fragment in problem, problem


def test_image_sizes_are_those_whose_anchors_sit_on_the_feature_grid():
    """keras-hub puts level-l anchors every S // ceil(S / 2**l) px: the stride 2**l only when
    S is a multiple of 2**l or the level is one cell. For P3..P7 that is S = 64 or k x 128."""
    from petdet_tasks.train_config import nearest_image_size, valid_image_size

    def anchors_on_grid(s: int) -> bool:
        return all(s // math.ceil(s / 2**lvl) == 2**lvl or math.ceil(s / 2**lvl) == 1
                   for lvl in range(3, 8))

    accepted = [s for s in range(1, 2000) if valid_image_size(s)]
    assert accepted == [64, *range(128, 1537, 128)]
    assert accepted == [s for s in range(64, 1537, 32) if anchors_on_grid(s)]
    for s in accepted:
        TrainConfig(image_size=s).validate()
        assert nearest_image_size(s) == s
    assert [nearest_image_size(x) for x in (1, 95, 96, 160, 192, 300, 320, 1000, 4000)] == [
        64, 64, 128, 128, 256, 256, 384, 1024, 1536]


def test_color_jitter_must_stay_below_1_as_the_input_pipeline_wants():
    from petdet_tasks.train_input import InputConfig

    TrainConfig(augmentation=Augmentation(color_jitter=0.99)).validate()
    InputConfig(color_jitter=0.99).validate()
    with pytest.raises(ConfigError, match="color_jitter"):
        TrainConfig(augmentation=Augmentation(color_jitter=1.0)).validate()
    with pytest.raises(ValueError, match="color_jitter"):
        InputConfig(color_jitter=1.0).validate()


def test_manual_step_boundaries_beyond_num_steps_are_allowed():
    # the OD API pets tutorial: boundaries at 900k/1.2M, num_steps 200k (the rate never decays)
    TrainConfig(num_steps=200000, learning_rate=TUTORIAL_LR).validate()


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as ei:
        TrainConfig(batch_size=0, image_size=100, optimizer="rmsprop", num_steps=0,
                    augmentation=Augmentation(color_jitter=2.0)).validate()
    e = ei.value
    assert len(e.problems) == 5
    msg = str(e)
    assert msg.startswith("invalid training config (5 problems):")
    for name in ("batch_size", "image_size", "optimizer", "num_steps",
                 "augmentation.color_jitter"):
        assert f"  - {name}:" in msg
    assert isinstance(e, ValueError)


def test_misspelled_choice_gets_a_suggestion():
    assert "did you mean 'cosine'" in _one_problem(learning_rate=LRSchedule(kind="cosin"))


# ---------------------------------------------------------------------------------- lr_at


def test_lr_constant():
    s = LRSchedule(kind="constant", initial_learning_rate=0.004)
    assert [s.lr_at(i, 100) for i in (0, 50, 100, 1000)] == [0.004] * 4


def test_lr_manual_step_tutorial():
    s = TUTORIAL_LR
    assert s.lr_at(0, 200000) == 0.0003
    assert s.lr_at(899999, 200000) == 0.0003
    assert s.lr_at(900000, 200000) == 0.00003  # OD API: the new rate applies from the boundary
    assert s.lr_at(1199999, 200000) == 0.00003
    assert s.lr_at(1200000, 200000) == 0.000003
    assert s.lr_at(5000000, 200000) == 0.000003


def test_lr_manual_step_with_warmup():
    s = LRSchedule(kind="manual_step", initial_learning_rate=0.01, steps=((100, 0.001),),
                   warmup_steps=10, warmup_start_lr=0.0)
    assert s.lr_at(0, 200) == 0.0
    assert s.lr_at(5, 200) == pytest.approx(0.005)
    assert s.lr_at(10, 200) == 0.01
    assert s.lr_at(99, 200) == 0.01
    assert s.lr_at(100, 200) == 0.001


def test_lr_cosine_with_warmup():
    s = LRSchedule(kind="cosine", initial_learning_rate=0.01, warmup_steps=100,
                   warmup_start_lr=0.001)
    total = 1100
    assert s.lr_at(0, total) == pytest.approx(0.001)              # start of warm-up
    assert s.lr_at(50, total) == pytest.approx(0.0055)            # middle of warm-up
    assert s.lr_at(100, total) == pytest.approx(0.01)             # end of warm-up = peak
    assert s.lr_at(600, total) == pytest.approx(0.005)            # half-way through the decay
    assert s.lr_at(1100, total) == pytest.approx(0.0, abs=1e-12)  # end
    assert s.lr_at(5000, total) == pytest.approx(0.0, abs=1e-12)  # after the end: stays
    vals = [s.lr_at(i, total) for i in range(100, 1101)]
    assert all(a >= b for a, b in zip(vals, vals[1:], strict=False))  # monotone decay


def test_lr_cosine_alpha_and_no_warmup():
    s = LRSchedule(kind="cosine", initial_learning_rate=0.1, alpha=0.1)
    assert s.lr_at(0, 1000) == pytest.approx(0.1)
    assert s.lr_at(500, 1000) == pytest.approx(0.1 * (0.9 * 0.5 + 0.1))
    assert s.lr_at(1000, 1000) == pytest.approx(0.01)
    assert s.lr_at(-5, 1000) == pytest.approx(0.1)  # negative steps clamp to 0


# ------------------------------------------------------------------------------ fingerprint


def test_fingerprint_fields_exclude_non_model_fields():
    fp = TrainConfig().fingerprint_fields()
    for name in ("log_every_n", "checkpoint_every_n", "label_map_path", "input_paths"):
        assert name not in fp
    assert fp["learning_rate"]["kind"] == "cosine" and "batch_size" in fp
    a = TrainConfig(log_every_n=1, checkpoint_every_n=7, input_paths=("x",))
    assert a.fingerprint_fields() == TrainConfig().fingerprint_fields()
    assert TrainConfig(seed=1).fingerprint_fields() != TrainConfig().fingerprint_fields()


# ---------------------------------------------------------------------------------- loading


def test_load_json(tmp_path):
    p = tmp_path / "train.json"
    p.write_text(json.dumps({"batch_size": 2, "learning_rate": {"kind": "constant"}}))
    cfg = load_train_config(p)
    assert cfg.batch_size == 2 and cfg.learning_rate.kind == "constant"
    assert load_train_config(str(p)) == cfg


def test_load_yaml(tmp_path):
    p = tmp_path / "train.yaml"
    p.write_text("batch_size: 4\nweight_decay: 1e-4\nmixed_precision: off\n"
                 "learning_rate:\n  kind: manual_step\n  initial_learning_rate: 0.01\n"
                 "  steps:\n    - [100, 0.001]\naugmentation:\n  scale_jitter: [0.9, 1.1]\n")
    cfg = load_train_config(p)
    assert cfg.batch_size == 4 and cfg.weight_decay == 1e-4 and cfg.mixed_precision == "off"
    assert cfg.learning_rate.steps == ((100, 0.001),)
    assert cfg.augmentation.scale_jitter == (0.9, 1.1)
    empty = tmp_path / "empty.yml"
    empty.write_text("")
    assert load_train_config(empty) == TrainConfig()


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=r"nope\.json: cannot read training config"):
        load_train_config(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON"):
        load_train_config(bad)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_train_config(bad_yaml)
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps({"batch_size": 0, "num_step": 5}))
    with pytest.raises(ConfigError) as ei:
        load_train_config(invalid)
    msg = str(ei.value)
    assert msg.startswith(f"{invalid}: invalid training config (2 problems)")
    assert "batch_size: expected an integer >= 1, got 0" in msg
    assert "did you mean 'num_steps'" in msg
    not_mapping = tmp_path / "list.json"
    not_mapping.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"list\.json: invalid training config"):
        load_train_config(not_mapping)


def test_load_pipeline_config_converts(tmp_path, caplog):
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "fixtures" / "faster_rcnn_resnet101_pets.config"
    cfg = load_train_config(src)
    assert cfg.num_classes == 37 and cfg.batch_size == 1
    assert any("fine_tune_checkpoint" in r.getMessage() for r in caplog.records)
