"""The detector module: offline build, a locally made preset, the fine-tune head swap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from petdet_tasks.detector import (
    PRIOR_PROBABILITY,
    build_detector,
    load_for_finetune,
    make_preset,
)

pytestmark = pytest.mark.slow
SIZE = 128


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    return make_preset(tmp_path_factory.mktemp("preset") / "tiny5", num_classes=5,
                       image_size=SIZE, train_steps=2)


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


def test_build_rejects_unknown_arch():
    with pytest.raises(ValueError, match="arch must be one of"):
        build_detector(3, arch="vgg")
