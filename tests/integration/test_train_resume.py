"""The training step stopped and run again: after SIGKILL, inside its final checkpoint, with a
pointer to deleted files, after losing its lease, after the final checkpoint. Each retry resumes
from what the store holds and commits one whole run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from petdet_tasks.layout import step_prefix
from petdet_tasks.manifest import read_manifest
from petdet_tasks.train import train
from petdet_tasks.train_config import LRSchedule
from tests.support.training import (
    Crash,
    checkpoint_files,
    crash_after,
    event_steps,
    latest_pointer,
    small_cfg,
    spy_streams,
    train_cfg,
)

pytestmark = pytest.mark.slow


def test_sigkill_then_rerun_resumes_from_the_checkpoint(training_setup, tmp_path):
    work, store, records, preset = training_setup
    # 64 px, batch 4: what is tested is the kill and the resume, not the learning. The kill
    # lands within a second of the step-20 checkpoint (polled every 0.5 s); the run moves
    # latest.json on or commits only after 20 more steps and its final evaluation (seconds)
    cfg = small_cfg(preset, seed=1, num_steps=40, checkpoint_every_n=20, log_every_n=10)
    cfg_path = tmp_path / "train.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    cmd = [sys.executable, "-m", "petdet_tasks", "train", "--store", store.root,
           "--tfrecords", records.uri, "--config", str(cfg_path),
           "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "PETDET_TRAIN_LEASE_TTL_S": "3"}

    def uncommitted_pointers() -> set[str]:
        return {o.key for o in store.list("training/") if o.key.endswith("latest.json")
                and read_manifest(store, o.key.rsplit("checkpoints/", 1)[0]) is None}

    others = uncommitted_pointers()  # the store is shared with the other training tests
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.monotonic() + 300
    latest = None
    while time.monotonic() < deadline and first.poll() is None:
        found = sorted(uncommitted_pointers() - others)
        if found:
            latest = found[0]
            break
        time.sleep(0.5)
    assert latest, "no checkpoint appeared: " + first.stdout.read().decode()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    prefix = latest.rsplit("checkpoints/", 1)[0]
    assert read_manifest(store, prefix) is None, "a killed run commits nothing"
    killed_at = json.loads(store.read_text(latest))["step"]
    assert killed_at == 20

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    out = json.loads(second.stdout.strip().splitlines()[-1])
    assert out["steps"] == 40 and out["resumed_from"] == 20
    assert "resuming from the checkpoint at step 20 of 40" in second.stderr
    assert "step 30/40" in second.stderr and "step 10/40" not in second.stderr
    manifest = read_manifest(store, prefix)
    assert manifest is not None and manifest["outputs"]["steps"] == 40
    assert "checkpoints/ckpt-40.index" in manifest["files"]
    assert not any(k.startswith("checkpoints/ckpt-20") for k in manifest["files"])


def test_one_input_stream_per_run_and_a_resumed_run_continues_it(training_setup, monkeypatch):
    """Every checkpoint interval used to build a fresh input stream, which started each shard
    at its first record again: the heads of the shards were all a training ever saw. A run
    reads one stream through all its intervals, and a resumed run continues it: it skips
    what the checkpoint's steps drew (start x global batch images)."""
    import petdet_tasks.train as train_module

    work, store, records, preset = training_setup
    cfg = train_cfg(preset, image_size=64, batch_size=4, num_steps=6, checkpoint_every_n=2,
                  log_every_n=2, seed=21,
                  learning_rate=LRSchedule(kind="constant", initial_learning_rate=0.001))
    made = spy_streams(monkeypatch)
    original_save = train_module._Checkpointer.save
    crash_after(monkeypatch, 4)
    with pytest.raises(Crash):
        train(store, records.uri, cfg, cache_dir=work / "cache")
    # the held-out recall's stream batches 4x the training batch (its eager calls are few)
    assert made == [{"val_batch": 16}, {"seed": 21, "skip": 0, "shards": 2}], \
        "one stream for steps 0..4"
    monkeypatch.setattr(train_module._Checkpointer, "save", original_save)
    result = train(store, records.uri, cfg, cache_dir=work / "cache")
    assert result.outputs["resumed_from"] == 4 and result.outputs["steps"] == 6
    assert made[2:] == [{"val_batch": 16}, {"seed": 21, "skip": 4 * 4, "shards": 2}], \
        "continued, not restarted"
    latest = json.loads(store.read_text(step_prefix("train", result.fingerprint)
                                        + "checkpoints/latest.json"))
    assert latest["step"] == 6 and latest["examples"] == 6 * 4


def test_stops_inside_the_final_checkpoint_leave_a_run_that_completes(training_setup,
                                                                      monkeypatch, caplog):
    """Stopped while the last checkpoint is written — before its files; the retry, before
    latest.json moves to it; the next retry, while the older ones are deleted — each retry
    resumes from what the store holds, and the last one completes. (The older checkpoints
    were deleted first: latest.json pointed at deleted files and every retry failed with
    NotFoundError.)"""
    work, store, records, preset = training_setup
    cfg = small_cfg(preset, seed=31)
    final = "ckpt-4."
    put_file, put_bytes, delete = store.put_file, store.put_bytes, store.delete
    where = None
    prefixes = []

    def crash_put_file(key, path, **kw):
        if where == "final-files" and f"checkpoints/{final}" in key:
            prefixes.append(key.rsplit("checkpoints/", 1)[0])
            raise Crash(key)
        return put_file(key, path, **kw)

    def crash_put_bytes(key, data, **kw):
        if (where == "final-pointer" and key.endswith("checkpoints/latest.json")
                and json.loads(data)["step"] == 4):
            raise Crash(key)
        return put_bytes(key, data, **kw)

    def crash_delete(key):
        if where == "cleanup" and "/checkpoints/ckpt-2." in key:
            raise Crash(key)
        return delete(key)

    monkeypatch.setattr(store, "put_file", crash_put_file)
    monkeypatch.setattr(store, "put_bytes", crash_put_bytes)
    monkeypatch.setattr(store, "delete", crash_delete)
    # (where it stops, the step it resumes from, the files and pointer it leaves behind)
    attempts = [
        ("final-files", 0, {"ckpt-2.index"}, 2),
        ("final-pointer", 2, {"ckpt-2.index", "ckpt-4.index"}, 2),
        ("cleanup", 2, {"ckpt-2.index", "ckpt-4.index"}, 4),
    ]
    for where, resumed, indexes, pointer in attempts:
        caplog.clear()
        with caplog.at_level("INFO", logger="petdet_tasks.train"):
            with pytest.raises(Crash):
                train(store, records.uri, cfg, cache_dir=work / "cache")
        started = (f"resuming from the checkpoint at step {resumed} of 4" if resumed
                   else "training steps 0..4")
        assert started in caplog.text, (where, caplog.text[-2000:])
        listed = {o.key.rsplit("/", 1)[1] for o in store.list(prefixes[0] + "checkpoints/")}
        assert {f for f in listed if f.endswith(".index")} == indexes, where
        assert latest_pointer(store, prefixes[0])["step"] == pointer, where
        assert read_manifest(store, prefixes[0]) is None, where
    monkeypatch.undo()
    result = train(store, records.uri, cfg, cache_dir=work / "cache")
    assert not result.cache_hit and result.outputs["steps"] == 4
    assert result.outputs["resumed_from"] == 4
    assert checkpoint_files(store, result) == [
        "ckpt-4.data-00000-of-00001", "ckpt-4.index", "latest.json"]
    assert {k for k in result.manifest["files"] if k.startswith("checkpoints/")} == {
        "checkpoints/ckpt-4.data-00000-of-00001", "checkpoints/ckpt-4.index",
        "checkpoints/latest.json"}


def test_a_pointer_to_missing_files_falls_back_to_a_complete_checkpoint(training_setup,
                                                                        monkeypatch, caplog):
    """A prefix whose latest.json names deleted files (what the old final cleanup left) resumes
    from the newest complete checkpoint, or from step 0 when none is left, with a warning."""
    work, store, records, preset = training_setup
    cfg = small_cfg(preset, seed=34, num_steps=6)
    prefixes = crash_after(monkeypatch, 4)
    with pytest.raises(Crash):
        train(store, records.uri, cfg, cache_dir=work / "cache")
    monkeypatch.undo()
    for obj in list(store.list(prefixes[0] + "checkpoints/ckpt-4.")):
        store.delete(obj.key)
    with caplog.at_level("WARNING", logger="petdet_tasks.train"):
        result = train(store, records.uri, cfg, cache_dir=work / "cache")
    assert result.outputs["resumed_from"] == 2 and result.outputs["steps"] == 6
    assert "latest.json names ckpt-4, whose files are not all in the store; resuming from " \
        "ckpt-2" in caplog.text

    # none left at all: from step 0
    cfg = small_cfg(preset, seed=35, num_steps=6)
    prefixes = crash_after(monkeypatch, 4)
    with pytest.raises(Crash):
        train(store, records.uri, cfg, cache_dir=work / "cache")
    monkeypatch.undo()
    for obj in list(store.list(prefixes[0] + "checkpoints/ckpt-")):
        store.delete(obj.key)
    caplog.clear()
    with caplog.at_level("WARNING", logger="petdet_tasks.train"):
        result = train(store, records.uri, cfg, cache_dir=work / "cache")
    assert result.outputs["resumed_from"] == 0 and result.outputs["steps"] == 6
    assert "no complete checkpoint is left; training from step 0" in caplog.text


def test_a_lost_lease_stops_training_before_it_touches_the_prefix_again(training_setup,
                                                                        monkeypatch):
    """Another attempt took the lease over (this one's renewals failed past the expiry): this
    writer stops at the next batch, writing or deleting no checkpoint after that. (It trained
    to the end, overwrote the checkpoints and deleted the other attempt's in its final
    cleanup; only the commit noticed.)"""
    import petdet_tasks.train as train_module
    from petdet_tasks.manifest import LeaseLost

    work, store, records, preset = training_setup
    cfg = small_cfg(preset, seed=41, num_steps=6)
    original_save = train_module._Checkpointer.save
    lost = []

    def save_then_lose(self, step, extra, **kw):
        original_save(self, step, extra, **kw)
        if step == 2:
            self.writer._lease.lost.set()  # what the renewing thread does
            lost.append(step)

    touched = []
    put_file, put_bytes, delete = store.put_file, store.put_bytes, store.delete

    def record(fn):
        def wrapper(key, *args, **kw):
            if lost and "/checkpoints/" in key:
                touched.append(key)
            return fn(key, *args, **kw)
        return wrapper

    monkeypatch.setattr(train_module._Checkpointer, "save", save_then_lose)
    monkeypatch.setattr(store, "put_file", record(put_file))
    monkeypatch.setattr(store, "put_bytes", record(put_bytes))
    monkeypatch.setattr(store, "delete", record(delete))
    steps = []
    original_batch_end = train_module._make_progress_class

    def progress_class():
        cls = original_batch_end()

        class Counting(cls):
            def on_train_batch_end(self, batch, logs=None):
                steps.append(self.step + 1)
                super().on_train_batch_end(batch, logs)
        return Counting

    monkeypatch.setattr(train_module, "_make_progress_class", progress_class)
    with pytest.raises(LeaseLost, match="taken over by another writer"):
        train(store, records.uri, cfg, cache_dir=work / "cache")
    assert lost == [2] and touched == []
    assert steps == [1, 2, 3], "stopped at the first batch after the loss"


def test_a_retry_after_the_final_checkpoint_commits_the_whole_history(training_setup, monkeypatch):
    """Stopped after step 2's checkpoint, then again after the final checkpoint (while the
    outputs were uploaded): the committed history.jsonl, TensorBoard logs and final loss are
    the whole run's. (history.jsonl went with the intermediate checkpoints only and logs/
    only with the commit: the retry committed steps 1-2, no curves of steps 3-4 and step 2's
    loss as the final one.)"""
    from petdet_tasks.manifest import StepWriter

    work, store, records, preset = training_setup
    cfg = small_cfg(preset, seed=51, log_every_n=1)
    crash_after(monkeypatch, 2)
    with pytest.raises(Crash):
        train(store, records.uri, cfg, cache_dir=work / "cache")
    monkeypatch.undo()

    original_put_tree = StepWriter.put_tree
    seen = {}

    def crash_at_preset(self, local, rel="", **kw):
        if rel == "preset/":
            seen["history"] = [json.loads(x) for x in (local.parent / "history.jsonl")
                               .read_text().splitlines()]
            raise Crash("stopped while uploading the outputs")
        return original_put_tree(self, local, rel, **kw)

    monkeypatch.setattr(StepWriter, "put_tree", crash_at_preset)
    with pytest.raises(Crash):
        train(store, records.uri, cfg, cache_dir=work / "cache")
    monkeypatch.undo()
    assert [h["step"] for h in seen["history"]] == [1, 2, 3, 4]

    result = train(store, records.uri, cfg, cache_dir=work / "cache")
    assert result.outputs["resumed_from"] == 4
    prefix = step_prefix("train", result.fingerprint)
    history = [json.loads(x) for x in store.read_text(prefix + "history.jsonl").splitlines()]
    assert history == seen["history"]
    assert result.outputs["final_loss"] == history[-1]["loss"]
    assert event_steps(store, prefix) == [1, 2, 3, 4]  # each step once, over two attempts
    logs = [k for k in result.manifest["files"] if k.startswith("logs/")]
    assert len(logs) == 2  # the two attempts that trained; the third made none
    assert sorted(o.key[len(prefix):] for o in store.list(prefix + "logs/")) == sorted(logs)

