"""OD API pipeline.config → TrainConfig: the text-format parser and the conversion."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from petdet_tasks.pipeline_config import (
    Conversion,
    PbtxtError,
    convert,
    main_from_pipeline,
    many,
    parse_pbtxt,
)
from petdet_tasks.train_config import DEFAULT_PRESET, ConfigError, LRSchedule, TrainConfig

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "faster_rcnn_resnet101_pets.config"


@pytest.fixture(scope="module")
def tutorial() -> Conversion:
    return convert(FIXTURE.read_text(), source=str(FIXTURE))


# ============================================================================== the tutorial


def test_fixture_is_the_od_api_tutorial_file():
    text = FIXTURE.read_text()
    assert text.startswith("# Faster R-CNN with Resnet-101 (v1) configured for the Oxford-IIIT "
                           "Pet Dataset.")
    assert "type: 'faster_rcnn_resnet101'" in text and "num_examples: 1101" in text


def test_tutorial_converts(tutorial):
    c = tutorial.config
    assert c.num_classes == 37
    assert c.keep_aspect_ratio is True and c.image_size == 1024
    assert c.batch_size == 1
    assert c.optimizer == "sgd" and c.momentum == 0.9
    assert c.learning_rate == LRSchedule(kind="manual_step", initial_learning_rate=0.0003,
                                         steps=((900000, 3e-05), (1200000, 3e-06)))
    assert c.clipnorm == 10.0
    assert c.num_steps == 200000
    assert c.augmentation.horizontal_flip is True
    assert c.augmentation.scale_jitter == (1.0, 1.0) and c.augmentation.color_jitter == 0.0
    assert c.input_paths == ("PATH_TO_BE_CONFIGURED/pet_faces_train.record-?????-of-00010",)
    assert c.label_map_path == "PATH_TO_BE_CONFIGURED/pet_label_map.pbtxt"
    assert c.preset == DEFAULT_PRESET  # a TF1 checkpoint path cannot be a keras-hub preset
    assert c.validate() is c
    assert TrainConfig.from_dict(c.to_dict()) == c


def test_tutorial_warnings(tutorial):
    w = tutorial.warnings

    def one(prefix: str) -> str:
        hits = [x for x in w if x.startswith(prefix)]
        assert len(hits) == 1, (prefix, w)
        return hits[0]

    fe = one("model.faster_rcnn.feature_extractor.type='faster_rcnn_resnet101':")
    assert "RetinaNet" in fe and "first_stage_features_stride" in fe
    ck = one("train_config.fine_tune_checkpoint='PATH_TO_BE_CONFIGURED/model.ckpt':")
    assert "cannot be loaded" in ck and DEFAULT_PRESET in ck
    assert "letterbox" in one("model.faster_rcnn.image_resizer.keep_aspect_ratio_resizer"
                              ".min_dimension=600:")
    one("train_config.from_detection_checkpoint=true")
    one("eval_config:")
    one("eval_input_reader:")
    arch = one("model.faster_rcnn:")
    assert "first_stage_anchor_generator" in arch and "second_stage_post_processing" in arch
    # honoured fields give no warning
    assert not any(x.startswith(("train_config.batch_size", "train_config.num_steps",
                                 "train_config.gradient_clipping_by_norm",
                                 "model.faster_rcnn.num_classes")) for x in w)
    # one warning per unsupported subtree, not one per leaf
    assert not any("l2_regularizer" in x or "grid_anchor_generator" in x for x in w)
    assert len(w) < 15


def _leaves(node, path=""):
    """Every leaf field path of a parsed tree (scalars, scalar lists, empty messages)."""
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaves(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list) and any(isinstance(x, dict) for x in node):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".") or path.startswith(prefix + "[")


def _mentioned(path: str, warnings: list[str]) -> bool:
    """``path`` is named in a warning: verbatim, or as ``parent: ... name`` (grouped)."""
    pat = re.compile(re.escape(path) + r"(?![A-Za-z0-9_])")
    if any(pat.search(w) for w in warnings):
        return True
    parent, _, name = path.rpartition(".")
    return any(w.startswith(parent + ":") and re.search(rf"\b{re.escape(name)}\b", w)
               for w in warnings)


def assert_nothing_silently_dropped(conv: Conversion) -> None:
    leaves = list(_leaves(conv.source))
    assert leaves
    for leaf in leaves:
        assert any(_under(leaf, p) for p in conv.mapped + conv.ignored), \
            f"{leaf} was neither mapped nor named in a warning"
    for p in conv.ignored:
        assert _mentioned(p, conv.warnings), f"ignored {p} is not named in any warning"


def test_tutorial_nothing_silently_dropped(tutorial):
    leaves = list(_leaves(tutorial.source))
    assert "model.faster_rcnn.second_stage_box_predictor.mask_rcnn_box_predictor.fc_hyperparams" \
           ".initializer.variance_scaling_initializer.mode" in leaves
    assert "eval_input_reader.num_readers" in leaves
    assert len(leaves) > 50
    assert_nothing_silently_dropped(tutorial)
    for p in ("model.faster_rcnn.num_classes", "train_config.batch_size",
              "train_config.num_steps", "train_config.gradient_clipping_by_norm",
              "train_input_reader.label_map_path"):
        assert p in tutorial.mapped


def test_tutorial_source_tree(tutorial):
    fr = tutorial.source["model"]["faster_rcnn"]
    assert fr["first_stage_anchor_generator"]["grid_anchor_generator"]["scales"] == [
        0.25, 0.5, 1.0, 2.0]
    assert fr["second_stage_post_processing"]["score_converter"] == "SOFTMAX"
    sched = tutorial.source["train_config"]["optimizer"]["momentum_optimizer"][
        "learning_rate"]["manual_step_learning_rate"]["schedule"]
    assert sched == [{"step": 900000, "learning_rate": 3e-05},
                     {"step": 1200000, "learning_rate": 3e-06}]
    assert tutorial.source["train_config"]["data_augmentation_options"] == {
        "random_horizontal_flip": {}}


# ============================================================================== the parser


def test_parse_scalars_and_comments():
    t = parse_pbtxt("""
        # a comment
        a: 1  # trailing comment
        b: -2
        c: .00003
        d: 1e-4
        e: -1.5E+2
        f: 2.5f
        g: 0x1F
        h: true
        i: false
        j: True
        k: CONV
        l: 'single # not a comment'
        m: "double \\"quoted\\" \\n \\t \\x41 \\101 \\u00e9"
        n: "con" 'cat'
        o: inf
        p: -inf
        q: 10.
    """)
    assert t["a"] == 1 and isinstance(t["a"], int)
    assert t["b"] == -2
    assert t["c"] == pytest.approx(3e-05) and isinstance(t["c"], float)
    assert t["d"] == 1e-4 and t["e"] == -150.0 and t["f"] == 2.5 and t["g"] == 31
    assert t["h"] is True and t["i"] is False and t["j"] is True
    assert t["k"] == "CONV"
    assert t["l"] == "single # not a comment"
    assert t["m"] == 'double "quoted" \n \t A A é'
    assert t["n"] == "concat"
    assert t["o"] == math.inf and t["p"] == -math.inf and t["q"] == 10.0


def test_parse_messages_repeated_fields_and_lists():
    t = parse_pbtxt("""
        outer: {
          inner { x: 1 }
          item { step: 1 } item { step: 2 }
          item < step: 3 >
          scalar: 1, scalar: 2; scalar: 3
          listed: [0.5, 1.0, 2.0]
          msgs: [{a: 1}, {a: 2}]
          empty_list: []
          empty {}
        }
        single { step: 7 }
    """)
    o = t["outer"]
    assert o["inner"] == {"x": 1}
    assert o["item"] == [{"step": 1}, {"step": 2}, {"step": 3}]
    assert o["scalar"] == [1, 2, 3]
    assert o["listed"] == [0.5, 1.0, 2.0]
    assert o["msgs"] == [{"a": 1}, {"a": 2}]
    assert o["empty_list"] == [] and o["empty"] == {}
    assert many(o, "item") == o["item"]
    assert many(t, "single") == [{"step": 7}]
    assert many(t, "absent") == [] and many(None, "x") == []


def test_parse_list_syntax_and_repetition_merge():
    assert parse_pbtxt("a: [1, 2]\na: 3\na: [4]")["a"] == [1, 2, 3, 4]


@pytest.mark.parametrize("text, line, fragment", [
    # at end of input the error points at the last token
    ("a {\n  b: 1\n", 2, "expected '}' to close 'a' opened on line 1, got end of input"),
    ("a {\n  b: 1\n}\n}\n", 4, "unexpected '}'"),
    ("a {\n  b: 1\n>", 3, "expected '}' to close 'a'"),
    ("a {\n  b:\n}\n", 3, "expected a value after 'b:', got '}'"),
    ("a: 1\nb:", 2, "expected a value after 'b:', got end of input"),
    ("a 1\n", 1, "expected ':' or '{' after field name 'a'"),
    ("a: 1\n\nb: @\n", 3, "unexpected character '@'"),
    ("a: 1\n: 2\n", 2, "expected a field name, got ':'"),
    ("a: 'abc\n", 1, "unterminated string"),
    ("a: [1, 2\nb: 3", 2, "expected ',' or ']' in the list 'a'"),
    ("[ext.field] { a: 1 }", 1, "extension"),
    ("a: 'bad \\q escape'", 1, "unknown escape"),
    ("a: -foo", 1, "expected a number after '-'"),
])
def test_parse_errors_name_source_and_line(text, line, fragment):
    with pytest.raises(PbtxtError) as ei:
        parse_pbtxt(text, source="x.config")
    e = ei.value
    assert str(e).startswith(f"x.config:{line}: "), str(e)
    assert fragment in str(e)
    assert e.line == line and isinstance(e, ConfigError)


# ============================================================================= other configs

SSD = """
model {
  ssd {
    num_classes: 3
    image_resizer { fixed_shape_resizer { height: 300 width: 300 } }
    feature_extractor { type: "ssd_mobilenet_v2_keras" depth_multiplier: 1.0 }
    box_coder { faster_rcnn_box_coder { y_scale: 10.0 } }
    matcher { argmax_matcher { matched_threshold: 0.5 } }
    anchor_generator { ssd_anchor_generator { num_layers: 6 } }
  }
}
train_config {
  batch_size: 16
  optimizer {
    adam_optimizer {
      learning_rate {
        cosine_decay_learning_rate {
          learning_rate_base: 0.004
          total_steps: 5000
          warmup_learning_rate: 0.0001
          warmup_steps: 500
        }
      }
    }
    use_moving_average: true
    moving_average_decay: 0.9999
  }
  num_steps: 5000
  fine_tune_checkpoint: "kaggle://keras/retinanet/keras/retinanet_resnet50_fpn_coco/2"
  fine_tune_checkpoint_type: "detection"
  data_augmentation_options { random_horizontal_flip { } }
  data_augmentation_options { random_image_scale { min_scale_ratio: 0.75 max_scale_ratio: 1.5 } }
  data_augmentation_options { random_adjust_brightness { max_delta: 0.3 } }
  data_augmentation_options { random_adjust_contrast { } }
  data_augmentation_options { ssd_random_crop { } }
  max_number_of_boxes: 100
  sync_replicas: true
}
train_input_reader {
  tf_record_input_reader { input_path: "a-00000-of-00002" input_path: "a-00001-of-00002" }
  label_map_path: "label_map.pbtxt"
  shuffle: true
}
graph_rewriter { quantization { delay: 48000 } }
"""


def test_ssd_fixed_shape_adam_cosine():
    conv = convert(SSD, "ssd.config")
    c = conv.config
    assert c.num_classes == 3
    # 300 → 256: the nearest 64 or multiple of 128 (keras-hub's anchor grid)
    assert c.keep_aspect_ratio is False and c.image_size == 256
    assert c.batch_size == 16 and c.optimizer == "adam" and c.num_steps == 5000
    assert c.learning_rate == LRSchedule(kind="cosine", initial_learning_rate=0.004,
                                         warmup_steps=500, warmup_start_lr=0.0001)
    assert c.learning_rate.lr_at(0, c.num_steps) == pytest.approx(0.0001)
    assert c.learning_rate.lr_at(500, c.num_steps) == pytest.approx(0.004)
    assert c.clipnorm is None  # no gradient_clipping_by_norm: no clipping, as in the OD API
    assert c.preset == "kaggle://keras/retinanet/keras/retinanet_resnet50_fpn_coco/2"
    # the OD API's batch_size is the global batch, petdet's per replica: the warning says so
    batch = [w for w in conv.warnings if w.startswith("train_config.batch_size")]
    assert batch == ["train_config.batch_size=16 is the OD API's global batch (split across "
                     "the GPUs); petdet's batch_size is per replica (global batch = batch_size "
                     "x GPUs): batch_size=16 is the same batch on one GPU; on N GPUs set "
                     "batch_size to 16/N"]
    assert c.augmentation.horizontal_flip is True
    assert c.augmentation.scale_jitter == (0.75, 1.5)
    assert c.augmentation.color_jitter == pytest.approx(0.3)
    assert c.input_paths == ("a-00000-of-00002", "a-00001-of-00002")
    assert c.label_map_path == "label_map.pbtxt"

    w = "\n".join(conv.warnings)
    for needle in ("model.ssd.image_resizer.fixed_shape_resizer: height=300 width=300 rounded "
                   "to image_size=256 (the nearest 64 or a multiple of 128 in [64, 1536]: "
                   "keras-hub's anchor grid",
                   "model.ssd.feature_extractor.type='ssd_mobilenet_v2_keras'",
                   "train_config.optimizer.use_moving_average=true: not supported",
                   "train_config.optimizer.moving_average_decay=0.9999",
                   "train_config.data_augmentation_options[2].random_adjust_brightness: "
                   "approximated",
                   "train_config.data_augmentation_options[3].random_adjust_contrast",
                   "train_config.data_augmentation_options[4].ssd_random_crop: not supported",
                   "train_config.fine_tune_checkpoint_type='detection': noted",
                   "train_config.max_number_of_boxes=100: not used",
                   "train_config.sync_replicas=true: not used",
                   "train_input_reader.shuffle=true: not used",
                   "graph_rewriter: not used"):
        assert needle in w, needle
    assert not any(x.startswith("train_config.fine_tune_checkpoint=") for x in conv.warnings)
    assert_nothing_silently_dropped(conv)


@pytest.mark.parametrize("opt, expect", [
    ("momentum_optimizer { learning_rate { constant_learning_rate { learning_rate: 0.05 } } "
     "momentum_optimizer_value: 0.8 }",
     dict(optimizer="sgd", momentum=0.8,
          learning_rate=LRSchedule(kind="constant", initial_learning_rate=0.05))),
    ("rms_prop_optimizer { learning_rate { constant_learning_rate { learning_rate: 0.004 } } "
     "decay: 0.9 epsilon: 1.0 }",
     dict(optimizer="sgd", momentum=0.9,
          learning_rate=LRSchedule(kind="constant", initial_learning_rate=0.004))),
    ("momentum_optimizer { learning_rate { manual_step_learning_rate { "
     "initial_learning_rate: 0.001 schedule { step: 100 learning_rate: 0.01 } "
     "schedule { step: 800 learning_rate: 0.001 } warmup: true } } }",
     dict(optimizer="sgd", momentum=0.9,
          learning_rate=LRSchedule(kind="manual_step", initial_learning_rate=0.01,
                                   steps=((800, 0.001),), warmup_steps=100,
                                   warmup_start_lr=0.001))),
    ("momentum_optimizer { learning_rate { exponential_decay_learning_rate { "
     "initial_learning_rate: 0.1 decay_steps: 400 decay_factor: 0.5 } } }",
     dict(optimizer="sgd",
          learning_rate=LRSchedule(kind="manual_step", initial_learning_rate=0.1,
                                   steps=((400, 0.05), (800, 0.025))))),
])
def test_optimizers_and_schedules(opt, expect):
    conv = convert(f"train_config {{ num_steps: 1000 optimizer {{ {opt} }} }}")
    for k, v in expect.items():
        assert getattr(conv.config, k) == v, k
    if "rms_prop" in opt:
        assert any(w.startswith("train_config.optimizer.rms_prop_optimizer: RMSProp is not "
                                "supported; falling back to SGD") for w in conv.warnings)
    assert_nothing_silently_dropped(conv)


def test_manual_step_warmup_matches_od_api_semantics():
    # OD API manual_step warmup: linear from initial_learning_rate to schedule[0] at its step
    conv = convert("train_config { num_steps: 1000 optimizer { momentum_optimizer { "
                   "learning_rate { manual_step_learning_rate { initial_learning_rate: 0.0 "
                   "schedule { step: 100 learning_rate: 0.01 } warmup: true } } } } }")
    s = conv.config.learning_rate
    assert s.lr_at(0, 1000) == 0.0 and s.lr_at(50, 1000) == pytest.approx(0.005)
    assert s.lr_at(100, 1000) == 0.01 and s.lr_at(999, 1000) == 0.01


def test_absent_fields_follow_od_api_semantics():
    conv = convert("model { center_net { num_classes: 5 } }")
    c = conv.config
    assert c.num_classes == 5 and c.num_steps == TrainConfig.num_steps
    assert any(w.startswith("model.center_net: petdet trains a keras-hub RetinaNet")
               for w in conv.warnings)
    assert any(w.startswith("train_config: missing") for w in conv.warnings)
    conv = convert("train_config { batch_size: 2 }")
    a = conv.config.augmentation
    assert (a.horizontal_flip, a.scale_jitter, a.color_jitter) == (False, (1.0, 1.0), 0.0)
    assert conv.config.clipnorm is None
    w = "\n".join(conv.warnings)
    assert "train_config.num_steps not set" in w
    assert "train_config.fine_tune_checkpoint: not set" in w


def test_keep_aspect_ratio_rounding_and_clamping():
    conf = ("model {{ ssd {{ image_resizer {{ keep_aspect_ratio_resizer {{ "
            "max_dimension: {} }} }} }} }}")
    # the nearest size whose anchors sit on the P6/P7 grid: 64 or a multiple of 128
    for given, size in ((1000, 1024), (1024, 1024), (300, 256), (320, 384), (192, 256),
                        (96, 128), (95, 64), (64, 64), (32, 64), (160, 128)):
        conv = convert(conf.format(given))
        assert conv.config.image_size == size, given
        rounded = [w for w in conv.warnings if f"max_dimension={given}: rounded" in w]
        if size == given:
            assert not rounded, given
        else:
            assert rounded == [f"model.ssd.image_resizer.keep_aspect_ratio_resizer.max_dimension"
                               f"={given}: rounded to image_size={size} (the nearest 64 or a "
                               f"multiple of 128 in [64, 1536]: keras-hub's anchor grid matches "
                               f"the P6/P7 feature maps (strides 64, 128) only at 64 px or "
                               f"multiples of 128)"], given
        conv.config.validate()
    conv = convert(conf.format(4000))
    assert conv.config.image_size == 1536
    assert any("max_dimension=4000: rounded to image_size=1536" in w for w in conv.warnings)
    conv = convert("model { ssd { image_resizer { fixed_shape_resizer { height: 320 "
                   "width: 640 } } } }")
    assert conv.config.image_size == 640 and conv.config.keep_aspect_ratio is False
    assert any("height=320 width=640 is not square" in w for w in conv.warnings)
    conv = convert("model { ssd { image_resizer { fixed_shape_resizer { height: 320 "
                   "width: 600 } } } }")
    assert conv.config.image_size == 640
    assert any("height=320 width=600 is not square; petdet stretches images to a square "
               "640x640 input (the larger side 600 rounded to the nearest 64 or a multiple of "
               "128" in w for w in conv.warnings)


def test_color_strength_of_1_or_more_is_capped_below_1():
    """A contrast option down to 0 (strength 1) or a brightness delta of 1.5: TrainConfig wants
    color_jitter < 1 (the input pipeline's contrast/saturation factors 1 - s reach 0 at 1), so
    the import caps at 0.99 and says so; the config it writes validates."""
    from petdet_tasks.train_config import COLOR_JITTER_MAX

    for option, strength in (("random_adjust_contrast { min_delta: 0.0 max_delta: 2.0 }", 1),
                             ("random_adjust_brightness { max_delta: 1.5 }", 1.5)):
        conv = convert(f"train_config {{ data_augmentation_options {{ {option} }} }}")
        assert conv.config.augmentation.color_jitter == COLOR_JITTER_MAX == 0.99
        conv.config.validate()
        assert any(f"approximated by petdet's single color_jitter strength 0.99 (one strength "
                   f"for brightness, contrast, saturation and hue); {strength:g} capped to "
                   f"0.99: color_jitter must be below 1" in w for w in conv.warnings), option
    conv = convert("train_config { data_augmentation_options { random_adjust_brightness { "
                   "max_delta: 0.99 } } }")
    assert conv.config.augmentation.color_jitter == 0.99
    assert not any("capped" in w for w in conv.warnings)


def test_preset_like_checkpoint_values():
    def preset(v):
        return convert(f'train_config {{ fine_tune_checkpoint: "{v}" }}').config.preset

    assert preset("retinanet_resnet50_fpn_coco") == "retinanet_resnet50_fpn_coco"
    assert preset("s3://bucket/presets/retina") == "s3://bucket/presets/retina"
    assert preset("/models/ckpt/ckpt-0") == DEFAULT_PRESET
    assert preset("/models/model.ckpt-1234") == DEFAULT_PRESET


def test_conversion_errors_name_field_and_source():
    with pytest.raises(ConfigError) as ei:
        convert('model { ssd { num_classes: "three" } }\ntrain_config { batch_size: 1.5 }',
                source="bad.config")
    msg = str(ei.value)
    assert msg.startswith("bad.config: cannot convert pipeline config")
    assert "model.ssd.num_classes: expected an integer, got 'three'" in msg
    assert "train_config.batch_size: expected an integer, got 1.5" in msg
    with pytest.raises(ConfigError, match=r"bad\.config: the converted training config is "
                                          r"invalid:\n  - batch_size"):
        convert("train_config { batch_size: 0 }", source="bad.config")


# ================================================================================= the CLI


def test_main_from_pipeline_writes_json(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main_from_pipeline(str(FIXTURE), str(out)) == 0
    cfg = TrainConfig.from_dict(json.loads(out.read_text()))
    assert cfg.num_classes == 37 and cfg.image_size == 1024
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert any(x.startswith("warning: model.faster_rcnn.feature_extractor") for x in lines)
    assert sum(x.startswith("warning: ") for x in lines) == len(
        convert(FIXTURE.read_text()).warnings)


def test_main_from_pipeline_stdout(capsys):
    assert main_from_pipeline(str(FIXTURE), None) == 0
    captured = capsys.readouterr()
    assert TrainConfig.from_dict(json.loads(captured.out)).batch_size == 1
    assert "warning: " in captured.err


def test_main_from_pipeline_bad_files(tmp_path, capsys):
    missing = tmp_path / "missing.config"
    assert main_from_pipeline(str(missing), None) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read pipeline config {missing}: ")
    assert "No such file" in err
    broken = tmp_path / "broken.config"
    broken.write_text("model {\n  ssd {\n")
    assert main_from_pipeline(str(broken), str(tmp_path / "o.json")) == 2
    assert f"error: {broken}:2: expected '}}'" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_cli_converts_the_tutorial_config(tmp_path):
    import subprocess
    import sys

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "faster_rcnn_resnet101_pets.config"
    out = subprocess.run([sys.executable, "-m", "petdet_tasks", "config", "from-pipeline",
                          str(fixture), "--out", str(tmp_path / "pets.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "faster_rcnn_resnet101" in out.stderr and "warning:" in out.stderr
    cfg = TrainConfig.from_dict(json.loads((tmp_path / "pets.json").read_text()))
    assert (cfg.num_steps, cfg.batch_size, cfg.image_size) == (200000, 1, 1024)
    bad = subprocess.run([sys.executable, "-m", "petdet_tasks", "config", "from-pipeline",
                          str(tmp_path / "missing.config")], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "missing.config" in bad.stderr
