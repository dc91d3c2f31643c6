"""The training step's GPU configuration on CPU: mixed precision on, 'auto' across machines with
and without a GPU, the learning rate under skipped steps, and presets saved in mixed precision."""

from __future__ import annotations

import json

import pytest

from petdet_tasks.layout import step_prefix
from petdet_tasks.train import train
from petdet_tasks.train_config import LRSchedule
from tests.support.training import (
    Crash,
    crash_after,
    latest_pointer,
    small_cfg,
    train_cfg,
)

pytestmark = pytest.mark.slow


def test_mixed_precision_auto_resumes_across_machines_with_and_without_gpu(
        training_setup, monkeypatch, caplog):
    """mixed_precision='auto' resolves by the machine: a retry on a machine without a GPU
    resumes a checkpoint trained in mixed precision, and the other way round (it failed with
    an InvalidArgumentError, retried forever). latest.json records the precision, the
    replicas and the global batch; a change is a warning naming both."""
    import keras

    import petdet_tasks.train as train_module

    work, store, records, preset = training_setup
    cfg = small_cfg(preset, seed=61, num_steps=6, mixed_precision="auto")
    gpu = ["/physical_device:GPU:0 (pretended)"]
    try:
        monkeypatch.setattr(train_module, "_visible_gpus", lambda: gpu)
        prefixes = crash_after(monkeypatch, 2)
        with pytest.raises(Crash):
            train(store, records.uri, cfg, cache_dir=work / "cache")
        prefix = prefixes[0]
        assert latest_pointer(store, prefix) == {
            "step": 2, "path": "ckpt-2", "examples": 8, "format": 2, "mixed_precision": True,
            "replicas": 1, "global_batch": 4}
        monkeypatch.undo()

        crash_after(monkeypatch, 4)  # no GPU: float32
        with caplog.at_level("WARNING", logger="petdet_tasks.train"):
            with pytest.raises(Crash):
                train(store, records.uri, cfg, cache_dir=work / "cache")
        assert "ckpt-2 was trained in mixed precision (mixed_float16), this attempt trains " \
            "in float32" in caplog.text
        assert latest_pointer(store, prefix)["mixed_precision"] is False
        monkeypatch.undo()

        caplog.clear()
        monkeypatch.setattr(train_module, "_visible_gpus", lambda: gpu)
        with caplog.at_level("WARNING", logger="petdet_tasks.train"):
            result = train(store, records.uri, cfg, cache_dir=work / "cache")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert "ckpt-4 was trained in float32, this attempt trains in mixed precision" \
        in caplog.text
    assert result.outputs["resumed_from"] == 4 and result.outputs["steps"] == 6
    assert result.outputs["mixed_precision"] is True


def test_the_learning_rate_follows_the_training_step_not_the_optimizer_iterations(
        training_setup, monkeypatch):
    """Under mixed precision the optimizer's iterations skip the steps whose gradients
    overflowed; the rate followed them while the logs showed lr_at(step). Here the iterations
    are pushed ahead by 100 after the first step (what skips do the other way): every step
    still trains at lr_at(step - 1) and history.jsonl says so."""
    import petdet_tasks.train as train_module

    work, store, records, preset = training_setup
    sched = LRSchedule(kind="cosine", initial_learning_rate=0.004, warmup_steps=2,
                       warmup_start_lr=0.0004, alpha=0.1)
    cfg = small_cfg(preset, seed=71, num_steps=6, log_every_n=1, learning_rate=sched)
    applied = []
    original_class = train_module._make_progress_class

    def progress_class():
        class Spying(original_class()):
            def on_train_batch_end(self, batch, logs=None):
                optimizer = self.model.optimizer
                applied.append((self.step + 1, float(optimizer.learning_rate)))
                if self.step == 0:
                    optimizer.iterations.assign_add(100)
                super().on_train_batch_end(batch, logs)
        return Spying

    monkeypatch.setattr(train_module, "_make_progress_class", progress_class)
    result = train(store, records.uri, cfg, cache_dir=work / "cache")
    expected = [(s, pytest.approx(sched.lr_at(s - 1, 6), rel=1e-5)) for s in range(1, 7)]
    assert applied == expected
    history = [json.loads(x) for x in store.read_text(
        step_prefix("train", result.fingerprint) + "history.jsonl").splitlines()]
    assert [(h["step"], h["lr"]) for h in history] == expected


def test_mixed_precision_path_runs_on_cpu(training_setup):
    """The GPU configuration (mixed_float16 + loss scaling) forced on: the step counter, the
    checkpoints and the decoding of float16 head outputs all hold; the trained model is saved
    as a float32 preset, which export loads and exports, and which fine-tunes again under
    either precision (a mixed_float16 policy in the preset made every load fail with "Invalid
    dtype: mixed_float16")."""
    import math

    import keras

    from petdet_tasks.detector import load_for_finetune
    from petdet_tasks.export import export

    work, store, records, preset = training_setup
    cfg = train_cfg(preset, image_size=64, batch_size=4, num_steps=4, checkpoint_every_n=2,
                  log_every_n=2, mixed_precision="on",
                  learning_rate=LRSchedule(kind="constant", initial_learning_rate=0.001))
    try:
        result = train(store, records.uri, cfg, cache_dir=work / "cache")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    out = result.outputs
    assert out["steps"] == 4 and out["mixed_precision"] is True
    assert math.isfinite(out["final_loss"])
    prefix = step_prefix("train", result.fingerprint)
    for name in ("config.json", "preprocessor.json", "task.json"):
        assert "mixed_float16" not in store.read_text(prefix + "preset/" + name), name

    exported = export(store, result.uri, cache_dir=work / "cache")
    assert exported.outputs["num_classes"] == 6 and exported.outputs["parity_checks"] >= 1

    local = work / "mixed-trained-preset"
    for obj in store.list(prefix + "preset/"):
        store.download_file(obj.key, local / obj.key[len(prefix + "preset/"):])
    for policy in ("mixed_float16", "float32"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            again = load_for_finetune(local, 3, image_size=64)
            assert again.num_classes == 3 and again.dtype_policy.name == policy
        finally:
            keras.mixed_precision.set_global_policy("float32")


def test_a_preset_saved_in_mixed_precision_loads_for_export_and_finetuning(tmp_path):
    """Presets written before the float32 save (keras-hub records mixed_float16 in a form its
    loader rejects) still load: export's loader and the fine-tune loader name the policy."""
    import keras
    import numpy as np

    from petdet_tasks.detector import build_detector, detect_batch, load_for_finetune
    from petdet_tasks.export import _load_detector

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        build_detector(3, image_size=64).save_to_preset(str(tmp_path / "mixed"))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert "mixed_float16" in (tmp_path / "mixed" / "config.json").read_text()
    with pytest.raises(ValueError, match="mixed_float16"):  # keras-hub's own loader
        import keras_hub

        keras_hub.models.RetinaNetObjectDetector.from_preset(str(tmp_path / "mixed"))
    loaded = _load_detector(tmp_path / "mixed")
    layers = loaded._flatten_layers(include_self=True, recursive=True)
    assert {layer.dtype_policy.name for layer in layers} == {"float32"}
    out = detect_batch(loaded, np.zeros((1, 64, 64, 3), "float32"))
    assert out["boxes"].dtype == np.float32
    assert load_for_finetune(tmp_path / "mixed", 5, image_size=64).num_classes == 5

