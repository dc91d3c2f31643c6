"""The detector: a keras-hub RetinaNet, built offline, saved as a preset, fine-tuned from one.

* :func:`build_detector` — a RetinaNet from a config (``tiny`` ResNet for demos, ``micro`` for
  tests, ``resnet18``/``resnet50`` layouts), no download.
* :func:`make_preset` — what tests and the demo start from instead of COCO weights: a tiny
  model briefly trained on a *different* class count, saved with ``save_to_preset``. Fine-tuning
  from it walks the same code path as fine-tuning from the real COCO preset.
* :func:`load_preset` — ``from_preset`` under an explicit dtype policy: a preset saved by a
  model trained with ``mixed_float16`` records that policy in a form keras-hub 0.32 cannot read
  back ("Invalid dtype: mixed_float16"), so every load names the policy it wants.
* :func:`save_preset` — ``save_to_preset`` in float32 whatever the model trained in (a mixed
  precision model is re-loaded in float32 first), so the preset loads anywhere.
* :func:`load_for_finetune` — the real path: ``from_preset(preset, num_classes=N)`` rebuilds the
  task and loads backbone + FPN weights; the box head is copied over from the full preset
  (keras-hub 0.32 does not load it when the class count changes); the new classification head
  gets the focal-loss prior bias (0.32 puts that prior on the box head, so a fresh class head
  would start at score 0.5 everywhere and its first losses run high); the input keeps the
  preset's normalisation (its image converter's scale and offset: ImageNet mean/std for the
  COCO preset) at petdet's input size; optionally the backbone's image encoder (the ResNet)
  is frozen. The fine-tuned preset saves that preprocessor, so export serves the same pixels.

``preset`` may be a keras-hub preset name (``retinanet_resnet50_fpn_coco``), a ``kaggle://``
handle, or a local directory. TensorFlow/keras-hub are imported when these functions run.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

PRIOR_PROBABILITY = 0.01
SCORE_THRESHOLD = 0.05
# 3x3 convolutions (256 filters, on every FPN level) in each head before its prediction layer:
# they are most of the compute of the small models. micro predicts straight from the FPN
# features: its training steps at 128 px run 2.4x as fast as tiny's (benchmarks/archs.py), and
# on the synthetic pets it learns as well (val recall 0.27-0.50 after the fine-tuning
# test's 300 steps in 3 runs, tiny 0.23-0.40). The test suite trains it; the demo trains tiny.
_HEAD_CONVS = {"micro": 0, "tiny": 2, "resnet18": 4, "resnet50": 4}
_RESNET = {
    # stackwise filters, blocks, strides, block type
    "tiny": ([64, 64, 64, 64], [1, 1, 1, 1], [1, 2, 2, 2], "basic_block"),
    "resnet18": ([64, 128, 256, 512], [2, 2, 2, 2], [1, 2, 2, 2], "basic_block"),
    "resnet50": ([64, 128, 256, 512], [3, 4, 6, 3], [1, 2, 2, 2], "bottleneck_block"),
}
_RESNET["micro"] = _RESNET["tiny"]  # micro: tiny less its heads' convolutions
ARCHS = tuple(_HEAD_CONVS)


def _keras_hub():
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras_hub

    return keras_hub


def _preprocessor(image_size: int, scale=1 / 255.0, offset=None):
    """The preprocessor petdet trains and serves with: exactly ``image_size`` square in (the
    input pipeline letterboxes; the resize is a no-op), ``pixel * scale + offset`` out. The
    default (0..1 pixels) is what :func:`build_detector` trains from scratch; a fine-tune
    passes the starting preset's own normalisation (:func:`normalisation`)."""
    kh = _keras_hub()
    converter = kh.layers.RetinaNetImageConverter(image_size=(image_size, image_size),
                                                  scale=scale, offset=offset)
    return kh.models.RetinaNetObjectDetectorPreprocessor(image_converter=converter)


def _plain(value):
    """A converter's scale/offset as JSON-able Python: None, a float, or a list of floats."""
    if value is None:
        return None
    try:
        return [float(v) for v in value]
    except TypeError:
        return float(value)


def normalisation(detector) -> tuple:
    """``(scale, offset)`` of ``detector``'s image converter: what its backbone was trained to
    see (``pixel * scale + offset``). keras-hub's COCO RetinaNet normalises with the ImageNet
    statistics per channel (scale ``1/255/std``, offset ``-mean/std``); a petdet-made preset
    says ``1/255`` and no offset. A model without a converter gets ``(1/255, None)``."""
    converter = getattr(getattr(detector, "preprocessor", None), "image_converter", None)
    if converter is None:
        log.warning("the model has no image converter: assuming 0..1 input pixels (scale "
                    "1/255, no offset)")
        return 1 / 255.0, None
    return _plain(converter.scale), _plain(converter.offset)


def set_score_threshold(detector, threshold: float = SCORE_THRESHOLD,
                        max_detections: int = 100) -> None:
    """keras-hub's decoder keeps boxes scoring >= 0.5 only; evaluation (COCO style) and the
    served model want every box above a low floor, up to ``max_detections`` per image."""
    from keras_hub.src.layers.modeling.non_max_supression import NonMaxSuppression

    detector.prediction_decoder = NonMaxSuppression(
        bounding_box_format=detector.bounding_box_format, from_logits=True,
        confidence_threshold=threshold, max_detections=max_detections)


def set_prior_bias(detector, probability: float = PRIOR_PROBABILITY) -> None:
    """Start the classification logits at ``probability`` (focal-loss prior) everywhere."""
    head = detector.classification_head
    weights = head.get_weights()
    weights[-1][...] = -math.log((1 - probability) / probability)
    head.set_weights(weights)


def build_detector(num_classes: int, *, image_size: int = 384, arch: str = "tiny"):
    """A RetinaNet (yxyx boxes, FPN P3–P7) with a ResNet layout from ``ARCHS``, untrained."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    kh = _keras_hub()
    filters, blocks, strides, block_type = _RESNET[arch]
    encoder = kh.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=filters,
        stackwise_num_blocks=blocks, stackwise_num_strides=strides, block_type=block_type,
        use_pre_activation=False, image_shape=(None, None, 3))
    backbone = kh.models.RetinaNetBackbone(image_encoder=encoder, min_level=3, max_level=7,
                                           use_p5=False, image_shape=(None, None, 3))
    detector = kh.models.RetinaNetObjectDetector(
        backbone=backbone, num_classes=num_classes, bounding_box_format="yxyx",
        pre_logits_num_conv_layers=_HEAD_CONVS[arch],
        preprocessor=_preprocessor(image_size))
    set_prior_bias(detector)
    set_score_threshold(detector)
    return detector


def make_preset(path: str | os.PathLike, *, num_classes: int = 5, image_size: int = 128,
                arch: str = "tiny", train_steps: int = 3, seed: int = 0) -> Path:
    """Build a small detector, train it for a few steps on random boxes (so its weights are
    not the initial ones), and save it as a keras-hub preset directory."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(seed)
    detector = build_detector(num_classes, image_size=image_size, arch=arch)
    rng = np.random.default_rng(seed)
    n = 4
    images = rng.integers(0, 256, (n, image_size, image_size, 3)).astype("float32")
    lo = rng.uniform(0, image_size / 2, (n, 1, 2))
    hi = lo + rng.uniform(image_size / 8, image_size / 2, (n, 1, 2))
    boxes = np.concatenate([lo, hi], axis=-1).astype("float32")
    labels = rng.integers(0, num_classes, (n, 1)).astype("int32")
    detector.compile(optimizer=keras.optimizers.SGD(0.001, momentum=0.9, clipnorm=10.0))
    if train_steps:
        detector.fit(images, {"boxes": boxes, "labels": labels}, batch_size=n,
                     epochs=train_steps, verbose=0)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    detector.save_to_preset(str(path))
    log.info("saved a %s preset (%d classes, %d px) to %s", arch, num_classes, image_size, path)
    return path


_REDUCED_POLICIES = ("mixed_float16", "mixed_bfloat16", "float16", "bfloat16")


def _policy_name(dtype) -> str:
    return dtype if isinstance(dtype, str) else dtype.name


def _float32_config(value):
    """A saved Keras config with every reduced-precision dtype policy made float32: the
    nested ones too (the ResNet inside the backbone, the image converter, the anchor
    generator), which ``from_preset(dtype=...)`` does not reach."""
    if isinstance(value, list):
        return [_float32_config(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, v in value.items():
        if key == "dtype" and isinstance(v, str) and v in _REDUCED_POLICIES:
            v = "float32"
        elif (key == "dtype" and isinstance(v, dict) and isinstance(v.get("config"), dict)
              and v["config"].get("name") in _REDUCED_POLICIES):
            v = {"module": "keras", "class_name": "DTypePolicy",
                 "config": {"name": "float32"}, "registered_name": None}
        else:
            v = _float32_config(v)
        out[key] = v
    return out


def _float32_copy(preset: Path, dest: Path) -> bool:
    """Copy a local preset to ``dest`` with its configs made float32 (weights linked, they
    are float32 whatever the policy); False (nothing written) when it is float32 already."""
    import json

    configs = {p: json.loads(p.read_text()) for p in preset.glob("*.json")}
    fixed = {p: _float32_config(c) for p, c in configs.items()}
    if fixed == configs:
        return False
    for f in preset.iterdir():
        target = dest / f.name
        if f in fixed:
            target.write_text(json.dumps(fixed[f], indent=4))
        elif f.is_dir():
            shutil.copytree(f, target)
        else:
            try:
                os.symlink(f.resolve(), target)
            except OSError:
                shutil.copy2(f, target)
    return True


def load_preset(preset: str | os.PathLike, *, dtype=None, **kwargs):
    """``RetinaNetObjectDetector.from_preset(preset, dtype=..., **kwargs)`` under an explicit
    policy, ``dtype`` (default: the global Keras policy, ``"float32"`` or ``"mixed_float16"``).

    keras-hub 0.32 saves a ``mixed_float16`` model's policy in a form its own loader rejects
    ("Invalid dtype: mixed_float16"), and ``from_preset(dtype=...)`` reaches the task and its
    heads but not the nested layers (the ResNet, the image converter). So a float32 load of a
    local preset saved in reduced precision goes through a copy whose configs say float32
    everywhere: the model serves (and exports) in float32, whatever it trained in."""
    import tempfile

    import keras

    kh = _keras_hub()
    name = _policy_name(dtype or keras.mixed_precision.dtype_policy())
    local = Path(os.fspath(preset)).expanduser()
    if name == "float32" and local.is_dir():
        with tempfile.TemporaryDirectory(prefix="petdet-preset-") as tmp:
            if _float32_copy(local, Path(tmp)):
                log.info("preset %s was saved in reduced precision: loading it in float32",
                         preset)
                return kh.models.RetinaNetObjectDetector.from_preset(tmp, dtype=name, **kwargs)
    return kh.models.RetinaNetObjectDetector.from_preset(str(preset), dtype=name, **kwargs)


def save_preset(detector, path: str | os.PathLike, *, image_size: int) -> Path:
    """``detector.save_to_preset(path)`` with every policy float32: a model trained under
    ``mixed_float16`` is saved, re-loaded in float32 (the variables are float32 either way:
    the weights are the same) and saved again, so that the preset loads with a plain
    ``from_preset`` (export, fine-tuning, keras-hub users) wherever it goes."""
    import keras

    path = Path(path)
    if all(_policy_name(layer.dtype_policy) == "float32"
           for layer in detector._flatten_layers(include_self=True, recursive=True)):
        detector.save_to_preset(str(path))
        return path
    staging = path.with_name(path.name + ".mixed")
    shutil.rmtree(staging, ignore_errors=True)
    detector.save_to_preset(str(staging))
    policy = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        f32 = load_preset(staging, dtype="float32")
        # the trained model's own normalisation (the starting preset's), rebuilt in float32
        f32.preprocessor = _preprocessor(image_size, *normalisation(detector))
        set_score_threshold(f32)
        f32.save_to_preset(str(path))
    finally:
        keras.mixed_precision.set_global_policy(policy)
        shutil.rmtree(staging, ignore_errors=True)
    log.info("saved the %s-trained model as a float32 preset", _policy_name(policy))
    return path


def load_for_finetune(preset: str | os.PathLike, num_classes: int, *, image_size: int,
                      freeze_backbone: bool = False):
    """The preset's backbone, FPN and box head under a new ``num_classes`` classification head
    (module doc). A preset with the same class count is loaded whole. The model is built under
    the global Keras policy (``mixed_float16`` when training in mixed precision), whatever
    policy the preset was saved with."""
    preset = str(preset)
    full = load_preset(preset)
    if full.num_classes == num_classes:
        detector = full
        log.info("preset %s already has %d classes: loaded whole", preset, num_classes)
    else:
        detector = load_preset(preset, num_classes=num_classes)
        detector.box_head.set_weights(full.box_head.get_weights())
        set_prior_bias(detector)
        log.info("preset %s: backbone, FPN and box head loaded; new %d-class head (was %d)",
                 preset, num_classes, full.num_classes)
    # feed exactly image_size x image_size (the input pipeline letterboxes, nothing resizes),
    # normalised as the preset's backbone was trained (COCO: ImageNet mean/std per channel):
    # its converter's scale and offset, not its size or resize settings
    scale, offset = normalisation(full)
    detector.preprocessor = _preprocessor(image_size, scale, offset)
    log.info("input normalisation from the preset: pixel * %s + %s", scale, offset)
    set_score_threshold(detector)
    detector.backbone.image_encoder.trainable = not freeze_backbone
    if freeze_backbone:
        log.info("image encoder (ResNet) frozen: the FPN and the heads train")
    return detector


def detect_batch(detector, images):
    """Detections for one batch of float images (0..255, already at the model's input size),
    run eagerly: keras-hub 0.32's ``predict`` retraces with a relaxed (None) batch size after
    batches of different sizes, and its NMS cannot trace that. Returns numpy arrays
    ``boxes`` [B, 100, 4] (yxyx pixels), ``confidence`` [B, 100], ``labels`` [B, 100] (-1 pad)."""
    import keras
    import numpy as np

    x = detector.preprocessor(images)
    raw = detector(x, training=False)
    # under mixed_float16 the heads emit float16; the anchors and the decoding are float32
    raw = {k: keras.ops.cast(v, "float32") for k, v in raw.items()}
    out = detector.decode_predictions(raw, keras.ops.cast(x, "float32"))
    return {k: np.asarray(v) for k, v in out.items()}
