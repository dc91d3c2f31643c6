"""The detector module: offline build, a locally made preset, the fine-tune head swap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from petdet_tasks.detector import (
    PRIOR_PROBABILITY,
    build_detector,
    load_for_finetune,
    load_preset,
    make_preset,
    save_preset,
)

pytestmark = pytest.mark.slow
SIZE = 128
# keras-hub's COCO RetinaNet normalises with the ImageNet statistics (its converter: scale
# 1/255/std and offset -mean/std per channel, at 800 px)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PIXEL = (124.0, 116.0, 104.0)  # about the ImageNet mean: about 0 once normalised


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    return make_preset(tmp_path_factory.mktemp("preset") / "tiny5", num_classes=5,
                       image_size=SIZE, train_steps=2)


@pytest.fixture(scope="module")
def coco_style_preset(tmp_path_factory):
    """A tiny preset saved with a COCO-style image converter (per-channel scale + offset, its
    own 800 px size), like ``retinanet_resnet50_fpn_coco``'s."""
    import keras_hub

    detector = build_detector(5, image_size=SIZE)
    detector.preprocessor = keras_hub.models.RetinaNetObjectDetectorPreprocessor(
        image_converter=keras_hub.layers.RetinaNetImageConverter(
            image_size=(800, 800), scale=[1 / 255 / s for s in STD],
            offset=[-m / s for m, s in zip(MEAN, STD, strict=True)]))
    path = tmp_path_factory.mktemp("preset") / "coco_style"
    detector.save_to_preset(str(path))
    return path


def _normalised(detector, pixel=PIXEL):
    """The preprocessor's output at one pixel of a SIZE x SIZE image of that colour (and the
    output's shape)."""
    out = np.asarray(detector.preprocessor(np.full((1, SIZE, SIZE, 3), pixel, "float32")))
    return out[0, SIZE // 2, SIZE // 3], out.shape


def _same(a, b) -> bool:
    wa, wb = a.get_weights(), b.get_weights()
    return len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb, strict=True))


def test_preset_is_a_keras_hub_preset_dir(preset):
    names = {p.name for p in preset.iterdir()}
    assert {"config.json", "metadata.json", "task.json", "task.weights.h5",
            "model.weights.h5"} <= names


def test_finetune_swaps_only_the_class_head(preset):
    import keras_hub

    original = keras_hub.models.RetinaNetObjectDetector.from_preset(str(preset))
    tuned = load_for_finetune(preset, 3, image_size=SIZE)
    assert (original.num_classes, tuned.num_classes) == (5, 3)
    assert _same(original.backbone, tuned.backbone), "backbone + FPN weights carried over"
    assert _same(original.box_head, tuned.box_head), "box head carried over"
    bias = tuned.classification_head.get_weights()[-1]
    assert bias.shape[-1] == 9 * 3  # 9 anchors per location x 3 classes
    np.testing.assert_allclose(bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY),
                               rtol=1e-6)
    out = tuned.predict(np.zeros((2, SIZE, SIZE, 3), "float32"), verbose=0)
    assert out["boxes"].shape == (2, 100, 4) and out["labels"].shape == (2, 100)
    assert set(np.unique(out["labels"])) <= {-1, 0, 1, 2}


def test_same_class_count_loads_the_whole_task(preset):
    import keras_hub

    original = keras_hub.models.RetinaNetObjectDetector.from_preset(str(preset))
    same = load_for_finetune(preset, 5, image_size=SIZE)
    assert _same(original.classification_head, same.classification_head)


def test_freeze_backbone_freezes_the_image_encoder_only(preset):
    tuned = load_for_finetune(preset, 3, image_size=SIZE, freeze_backbone=True)
    assert not tuned.backbone.image_encoder.trainable
    assert tuned.classification_head.trainable and tuned.box_head.trainable
    trainable = {id(w) for w in tuned.trainable_weights}
    assert not any(id(w) in trainable for w in tuned.backbone.image_encoder.weights)


def test_finetune_keeps_the_presets_normalisation(coco_style_preset):
    """The backbone sees the pixels it was trained on: the preset's scale and offset (ImageNet
    mean/std), at petdet's input size (not the preset's 800 px), whether the class head is
    swapped (3 classes) or the task loaded whole (5)."""
    want = [(p / 255 - m) / s for p, m, s in zip(PIXEL, MEAN, STD, strict=True)]
    for num_classes in (3, 5):
        tuned = load_for_finetune(coco_style_preset, num_classes, image_size=SIZE,
                                  freeze_backbone=True)
        value, shape = _normalised(tuned)
        assert shape == (1, SIZE, SIZE, 3)
        np.testing.assert_allclose(value, want, atol=1e-5)
        converter = tuned.preprocessor.image_converter
        assert converter.image_size == (SIZE, SIZE)
        assert not converter.pad_to_aspect_ratio
        np.testing.assert_allclose(converter.offset, [-m / s for m, s in zip(MEAN, STD,
                                                                             strict=True)])


def test_finetune_of_a_petdet_preset_still_feeds_0_to_1(preset):
    tuned = load_for_finetune(preset, 3, image_size=SIZE)
    converter = tuned.preprocessor.image_converter
    assert converter.scale == 1 / 255.0 and converter.offset is None
    value, _ = _normalised(tuned, (255.0, 0.0, 51.0))
    np.testing.assert_allclose(value, [1.0, 0.0, 0.2], atol=1e-6)


def test_the_fine_tuned_preset_keeps_the_normalisation(coco_style_preset, tmp_path):
    """What training saves (float32, or mixed_float16 re-loaded in float32) and export loads
    normalises as the fine-tune trained: the exported model sees the same pixels."""
    import keras

    for policy in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            tuned = load_for_finetune(coco_style_preset, 3, image_size=SIZE)
            trained_on, _ = _normalised(tuned)
            save_preset(tuned, tmp_path / policy, image_size=SIZE)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        served = load_preset(tmp_path / policy, dtype="float32")  # as export loads it
        value, shape = _normalised(served)
        assert shape == (1, SIZE, SIZE, 3)
        np.testing.assert_allclose(value, trained_on, atol=2e-3, err_msg=policy)  # float16
        np.testing.assert_allclose(value, [(p / 255 - m) / s for p, m, s
                                           in zip(PIXEL, MEAN, STD, strict=True)], atol=1e-5)


def test_micro_is_tiny_without_the_head_convolutions(tmp_path):
    """micro (what the test suite trains) predicts straight from the FPN features; its ResNet
    and FPN are tiny's, and a preset of it fine-tunes like any other."""
    micro, tiny = build_detector(3, image_size=64, arch="micro"), build_detector(3, image_size=64)
    for head in ("box_head", "classification_head"):
        assert len(getattr(micro, head).conv_layers) == 0
        assert len(getattr(tiny, head).conv_layers) == 2
    assert [w.shape for w in micro.backbone.weights] == [w.shape for w in tiny.backbone.weights]
    preset = make_preset(tmp_path / "micro", num_classes=5, image_size=64, arch="micro",
                         train_steps=1)
    tuned = load_for_finetune(preset, 3, image_size=64)
    assert tuned.pre_logits_num_conv_layers == 0 and tuned.num_classes == 3
    out = tuned.predict(np.zeros((1, 64, 64, 3), "float32"), verbose=0)
    assert out["boxes"].shape == (1, 100, 4)


def test_build_rejects_unknown_arch():
    with pytest.raises(ValueError, match="arch must be one of"):
        build_detector(3, arch="vgg")
