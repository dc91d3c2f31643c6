"""The TFRecord step on the sample dataset, on both store backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import tensorflow as tf

from petdet_tasks.download import DownloadConfig, download
from petdet_tasks.errors import ConfigError, PermanentError
from petdet_tasks.label_map import parse_label_map
from petdet_tasks.layout import step_prefix
from petdet_tasks.manifest import load_output, read_manifest
from petdet_tasks.sample_data import make_sample
from petdet_tasks.tfrecords import (
    DataQualityError,
    TFRecordConfig,
    build,
    gather,
    plan,
    split_of,
    write_shard,
)
from tests.unit.test_tfrecords_examples import OD_API_SPEC

SAMPLE_CFG = dict(num_shards=2, classes="present", max_quarantine_fraction=0.05)


@pytest.fixture
def dataset(store, sample_archives, tmp_path):
    src, summary = sample_archives
    result = download(store, DownloadConfig(source=str(src), cache_dir=str(tmp_path / "cache")))
    return result.uri, summary


def _report(store, result) -> dict:
    return json.loads(store.get_bytes(step_prefix("tfrecords", result.fingerprint)
                                      + "data_report.json")[0])


def _read_records(store, result, tmp_path) -> list[dict]:
    prefix = step_prefix("tfrecords", result.fingerprint)
    out = []
    for rel, entry in sorted(result.manifest["files"].items()):
        if rel.endswith(".tfrecord"):
            local = tmp_path / "read" / rel
            store.download_file(prefix + rel, local, sha256=entry["sha256"])
            for raw in tf.data.TFRecordDataset(str(local)):
                f = tf.io.parse_single_example(raw, OD_API_SPEC)
                out.append({"split": rel.split("-")[0],
                            "name": f["image/filename"].numpy().decode()[:-4],
                            "labels": tf.sparse.to_dense(f["image/object/class/label"]).numpy(),
                            "texts": tf.sparse.to_dense(f["image/object/class/text"]).numpy(),
                            "height": int(f["image/height"]), "width": int(f["image/width"]),
                            "encoded": f["image/encoded"]})
    return out


def test_sample_defects_end_where_they_should(store, dataset, tmp_path):
    uri, summary = dataset
    result = build(store, uri, TFRecordConfig(**SAMPLE_CFG), workers=1)
    assert not result.cache_hit
    report = _report(store, result)
    by_kind = {}
    for name, kind in summary["defects"].items():
        by_kind.setdefault(kind, []).append(name)
    repaired = {r["name"] for r in report["repaired"]}
    assert repaired == {*by_kind["png_as_jpg"], *by_kind["gif_as_jpg"], *by_kind["cmyk_jpeg"],
                        *by_kind["rgba_png_as_jpg"]}
    assert [q["name"] for q in report["quarantined"]] == by_kind["truncated_jpeg"]
    assert "truncated" in report["quarantined"][0]["reason"]
    assert [s["name"] for s in report["skipped"]["missing_xml"]] == by_kind["missing_xml"]
    train, val = report["splits"]["train"]["examples"], report["splits"]["val"]["examples"]
    assert train + val == summary["trainval"] - 2 == report["written"]
    assert result.outputs["train"] == train and result.outputs["val"] == val
    assert result.outputs["classes"] == len(summary["breeds"])
    assert report["box_stats"]["box_width"]["count"] == report["splits"]["train"]["boxes"] + \
        report["splits"]["val"]["boxes"]
    assert set(result.manifest["files"]) >= {"label_map.pbtxt", "data_report.json",
                                             "train-00000-of-00002.tfrecord",
                                             "val-00001-of-00002.tfrecord"}


def test_records_read_back_with_tf_data(store, dataset, tmp_path):
    uri, summary = dataset
    result = build(store, uri, TFRecordConfig(**SAMPLE_CFG), workers=1)
    records = _read_records(store, result, tmp_path)
    labels = parse_label_map(store.read_text(step_prefix("tfrecords", result.fingerprint)
                                             + "label_map.pbtxt"))
    assert sorted(labels.names) == sorted(summary["breeds"])
    assert len(records) == result.outputs["train"] + result.outputs["val"]
    for r in records:
        breed = r["name"].rsplit("_", 1)[0]
        assert list(r["labels"]) == [labels.id_of(breed)] * len(r["labels"])
        assert {t.decode() for t in r["texts"]} <= {breed}
        assert r["split"] == split_of(r["name"], 0.3)
        img = tf.io.decode_jpeg(r["encoded"], channels=3)
        assert tuple(img.shape[:2]) == (r["height"], r["width"])


def test_records_within_a_shard_mix_the_breeds(store, dataset, tmp_path):
    """In name order every breed is one run of a shard (the names start with the breed), and a
    training reader interleaving a few shards drew batches of one or two breeds. The order is
    a hash of the name: mixed, and the same on every rebuild."""
    from petdet_tasks.tfrecords import record_order

    uri, _ = dataset
    result = build(store, uri, TFRecordConfig(**SAMPLE_CFG), workers=1)
    records = _read_records(store, result, tmp_path)
    for split in ("train", "val"):
        shards: dict[str, list[str]] = {}
        prefix = step_prefix("tfrecords", result.fingerprint)
        for rel in sorted(result.manifest["files"]):
            if rel.startswith(split) and rel.endswith(".tfrecord"):
                local = tmp_path / "order" / rel
                store.download_file(prefix + rel, local)
                shards[rel] = [tf.io.parse_single_example(raw, OD_API_SPEC)["image/filename"]
                               .numpy().decode()[:-4] for raw in tf.data.TFRecordDataset(
                                   str(local))]
        examples = {e.name: e for e in plan(store, uri, TFRecordConfig(**SAMPLE_CFG)).examples}
        for rel, names in shards.items():
            assert len(names) >= 5, rel
            assert names != sorted(names), rel
            assert names == sorted(names, key=lambda n: record_order(examples[n])), rel
            breeds = [n.rsplit("_", 1)[0] for n in names]
            runs = 1 + sum(a != b for a, b in zip(breeds, breeds[1:], strict=False))
            assert runs > len(set(breeds)), (rel, runs)  # name order: one run per breed
    assert len(records) == result.outputs["train"] + result.outputs["val"]


def test_plan_assigns_splits_and_shards_by_the_name_hash(store, dataset):
    from petdet_tasks.tfrecords import shard_of

    uri, summary = dataset
    cfg = TFRecordConfig(**{**SAMPLE_CFG, "num_shards": 3, "val_fraction": 0.4})
    p = plan(store, uri, cfg)
    assert len(p.examples) == summary["trainval"] - 1  # the one without an XML is skipped
    files = load_output(store, uri).manifest["files"]
    for ex in p.examples:
        assert (ex.split, ex.shard) == (split_of(ex.name, 0.4), shard_of(ex.name, 3))
        assert ex.image_key.endswith(f"/images/{ex.name}.jpg") and ex.source == "dataset"
        assert ex.sha256 == files[f"images/{ex.name}.jpg"]["sha256"]  # what the writer checks
        assert type(ex).__name__ == "Example" and ex._fields[-1] == "shard"
    # the per-shard lists partition the examples, each in name order
    assert sorted(p.by_unit) == sorted(p.units)
    assert sorted(e for unit in p.by_unit.values() for e in unit) == p.examples
    assert all(e.split == s and e.shard == i for (s, i), unit in p.by_unit.items() for e in unit)
    assert all(unit == sorted(unit) for unit in p.by_unit.values())
    with pytest.raises(ValueError, match="is not a shard of this plan"):
        write_shard(store, p, "train", 3, cfg)


def test_second_run_is_a_cache_hit_and_config_changes_the_fingerprint(store, dataset):
    uri, _ = dataset
    first = build(store, uri, TFRecordConfig(**SAMPLE_CFG), workers=1)
    second = build(store, uri, TFRecordConfig(**SAMPLE_CFG), workers=1)
    assert second.cache_hit and second.fingerprint == first.fingerprint
    other = plan(store, uri, TFRecordConfig(**{**SAMPLE_CFG, "val_fraction": 0.5}))
    assert other.fingerprint != first.fingerprint and not other.cache_hit
    assert plan(store, uri, TFRecordConfig(**{**SAMPLE_CFG, "check": "full"})).fingerprint \
        != first.fingerprint


def test_parallel_and_sequential_builds_write_identical_shards(dataset, tmp_path, store):
    uri, _ = dataset
    seq = build(store, uri, TFRecordConfig(**SAMPLE_CFG), workers=1)
    par = build(store, uri, TFRecordConfig(**SAMPLE_CFG, force=True), workers=2)
    assert not par.cache_hit
    shards = {k: v for k, v in seq.manifest["files"].items() if k.endswith(".tfrecord")}
    assert shards == {k: v for k, v in par.manifest["files"].items() if k.endswith(".tfrecord")}


def test_a_finished_shard_is_not_rewritten(store, dataset, caplog):
    uri, _ = dataset
    cfg = TFRecordConfig(**SAMPLE_CFG)
    p = plan(store, uri, cfg)
    first = write_shard(store, p, "train", 0, cfg)
    caplog.set_level("INFO")
    again = write_shard(store, p, "train", 0, cfg)
    assert again == first
    assert any("already written" in r.getMessage() for r in caplog.records)


def test_gather_refuses_missing_shards(store, dataset):
    uri, _ = dataset
    cfg = TFRecordConfig(**SAMPLE_CFG)
    p = plan(store, uri, cfg)
    write_shard(store, p, "train", 0, cfg)
    with pytest.raises(Exception, match="3 shards .* are not written yet"):
        gather(store, p, cfg)
    assert read_manifest(store, p.prefix) is None


def test_quality_gate_failures_commit_nothing(store, dataset):
    uri, summary = dataset
    with pytest.raises(DataQualityError, match="have no training example"):
        build(store, uri, TFRecordConfig(num_shards=2, classes="all",
                                         max_quarantine_fraction=0.05), workers=1)
    with pytest.raises(DataQualityError, match=r"quarantined \(.*%\), more than") as gate:
        build(store, uri, TFRecordConfig(num_shards=2, classes="present",
                                         max_quarantine_fraction=0.0), workers=1)
    # the message names the image, its reason and where the per-image lists are (a failed
    # gate writes no data_report.json), and what to change
    truncated = next(n for n, kind in summary["defects"].items() if kind == "truncated_jpeg")
    assert f"{truncated}: truncated" in str(gate.value)
    assert store.uri("tfrecords/") in str(gate.value) and "/_parts/" in str(gate.value)
    assert "--max-quarantine" in str(gate.value)
    assert [o.key for o in store.list("tfrecords/") if o.key.endswith("_MANIFEST.json")] == []


def _upload_extra(store, tmp_path, prefix: str) -> tuple[list[str], dict]:
    """A labelled batch in the dataset layout (images renamed _1000+), uploaded under prefix:
    (its trainval names, its sample summary)."""
    extra_src = tmp_path / "extra"
    extra_summary = make_sample(extra_src, breeds=2, per_breed=6, seed=9)
    names = []
    for archive in ("images.tar.gz", "annotations.tar.gz"):
        with tarfile.open(extra_src / archive) as tf_:
            for m in tf_.getmembers():
                if not m.isfile() or "/._" in m.name:
                    continue
                data = tf_.extractfile(m).read()
                rel = m.name
                stem = rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]
                if rel.startswith(("images/", "annotations/xmls/")):
                    new = stem.rsplit("_", 1)[0] + "_" + str(1000 + int(stem.rsplit("_", 1)[1]))
                    rel = rel.replace(stem, new)
                    store.put_bytes(f"{prefix}{rel}", data)
                elif rel == "annotations/trainval.txt":
                    lines = []
                    for line in data.decode().splitlines():
                        n, *rest = line.split()
                        n = n.rsplit("_", 1)[0] + "_" + str(1000 + int(n.rsplit("_", 1)[1]))
                        names.append(n)
                        lines.append(" ".join([n, *rest]))
                    store.put_bytes(f"{prefix}annotations/trainval.txt",
                                    ("\n".join(lines) + "\n").encode())
    return names, extra_summary


def test_extra_data_is_merged_changes_the_fingerprint_and_keeps_splits(store, dataset,
                                                                      tmp_path):
    uri, summary = dataset
    base = build(store, uri, TFRecordConfig(**SAMPLE_CFG), workers=1)
    base_records = {r["name"]: r["split"] for r in _read_records(store, base, tmp_path / "a")}

    # a labelled batch in the dataset layout, uploaded under extra/2026-11/
    names, extra_summary = _upload_extra(store, tmp_path, "extra/2026-11/")
    cfg = TFRecordConfig(**{**SAMPLE_CFG, "extra_data": "extra/2026-11/",
                            "max_quarantine_fraction": 0.1})
    merged = build(store, uri, cfg, workers=1)
    assert merged.fingerprint != base.fingerprint
    merged_records = {r["name"]: r["split"] for r in _read_records(store, merged, tmp_path / "b")}
    for name, split in base_records.items():
        assert merged_records[name] == split, f"{name} moved from {split}"
    unusable = {n for n, kind in extra_summary["defects"].items()
                if kind in ("truncated_jpeg", "missing_xml")}
    renamed = {n.rsplit("_", 1)[0] + "_" + str(1000 + int(n.rsplit("_", 1)[1])) for n in unusable}
    assert set(merged_records) - set(base_records) == set(names) - renamed
    # unchanged extra data: a cache hit
    assert build(store, uri, cfg, workers=1).cache_hit


def test_cli(store, dataset, tmp_path, request):
    uri, _ = dataset
    env = dict(os.environ)
    if store.root.startswith("s3://"):  # the CLI reads the standard AWS environment
        env.update(request.getfixturevalue("seaweed").env)
    cmd = [sys.executable, "-m", "petdet_tasks", "tfrecords", "--store", store.root,
           "--dataset", uri, "--shards", "2", "--workers", "2", "--classes", "present",
           "--max-quarantine", "0.05"]
    out = [subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
           for _ in range(2)]
    assert out[0].returncode == 0, out[0].stderr
    first, second = (json.loads(o.stdout.strip().splitlines()[-1]) for o in out)
    assert first["cache_hit"] is False and second["cache_hit"] is True
    assert first["uri"].startswith(store.root + "/tfrecords/")
    assert first["train"] > 0 and first["val"] > 0


def test_cli_exit_status_says_whether_a_retry_can_help(store, dataset, request):
    """2: the data or the config is at fault (a rerun fails the same way); 1: anything else."""
    uri, _ = dataset
    env = dict(os.environ)
    if store.root.startswith("s3://"):
        env.update(request.getfixturevalue("seaweed").env)
    base = [sys.executable, "-m", "petdet_tasks", "tfrecords", "--store", store.root,
            "--shards", "2", "--workers", "1"]

    def run(*args):
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=300,
                              env=env)

    gate = run("--dataset", uri, "--classes", "all", "--max-quarantine", "0.05")
    assert gate.returncode == 2, gate.stderr
    assert "have no training example" in gate.stderr and "Traceback" not in gate.stderr
    bad_config = run("--dataset", uri, "--val-fraction", "2")
    assert bad_config.returncode == 2, bad_config.stderr
    assert "val_fraction must be in (0, 1), got 2.0" in bad_config.stderr
    # a well-formed output that is not there (yet): it may still be on its way, so 1 ...
    missing = run("--dataset", uri.rsplit("/", 1)[0] + "/" + "0" * 20)
    assert missing.returncode == 1, missing.stderr
    assert "Traceback" not in missing.stderr and "has no _MANIFEST.json" in missing.stderr
    # ... but a URI that cannot name an output never will be: 2
    malformed = run("--dataset", uri.rsplit("/", 1)[0] + "/0000000000")
    assert malformed.returncode == 2, malformed.stderr
    assert "invalid fingerprint" in malformed.stderr and "Traceback" not in malformed.stderr


def test_an_image_changed_in_the_store_after_download_is_an_error(store, dataset):
    uri, _ = dataset
    cfg = TFRecordConfig(**SAMPLE_CFG)
    p = plan(store, uri, cfg)
    victim = next(e for e in p.examples if e.split == "train" and e.shard == 0)
    store.put_bytes(victim.image_key, store.get_bytes(victim.image_key)[0] + b"\x00tampered")
    with pytest.raises(Exception, match="does not match the dataset manifest"):
        write_shard(store, p, "train", 0, cfg)


# --- the CLI's forked shard writers (local store: an injected S3 client stays in one process) --

def _fail_in(monkeypatch, tmp_path, where: str, how):
    """Make write_shard call ``how(split, index)`` in the forked worker (``where="child"``) or
    in the calling process (``"parent"``), once the other process has taken a shard (it is
    slowed on that one, so it is still writing it when the failure comes)."""
    import time

    import petdet_tasks.tfrecords as tfrecords

    parent, real = os.getpid(), tfrecords.write_shard
    other_started = tmp_path / "other-process-started"

    def write_shard_(store, p, split, index, cfg):
        failing = (os.getpid() == parent) == (where == "parent")
        if failing:
            deadline = time.monotonic() + 60
            while not other_started.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            how(split, index)
        elif not other_started.exists():
            other_started.touch()
            time.sleep(0.5)
        return real(store, p, split, index, cfg)

    monkeypatch.setattr(tfrecords, "write_shard", write_shard_)


def _forked_children() -> list[int]:
    """This process's forked shard workers not joined: children running this same program, or
    exited and never reaped (a zombie's cmdline is empty). Other children, such as a test S3
    server, run something else."""
    me = os.getpid()
    cmdline = Path(f"/proc/{me}/cmdline").read_bytes()
    left = []
    for c in Path(f"/proc/{me}/task/{me}/children").read_text().split():
        try:
            state = Path(f"/proc/{c}/stat").read_text().rpartition(")")[2].split()[0]
            if state == "Z" or Path(f"/proc/{c}/cmdline").read_bytes() == cmdline:
                left.append(int(c))
        except FileNotFoundError:  # reaped meanwhile
            pass
    return left


def _raise(split, index):
    from petdet_tasks.store import StoreError

    raise StoreError(f"injected failure on {split}-{index}")


@pytest.mark.parametrize("store", ["local"], indirect=True)
def test_forked_worker_failure_is_reported_and_a_retry_resumes(store, dataset, monkeypatch,
                                                                tmp_path):
    from petdet_tasks.tfrecords import ShardWorkerError

    uri, _ = dataset
    cfg = TFRecordConfig(**SAMPLE_CFG)
    _fail_in(monkeypatch, tmp_path, "child", _raise)
    with pytest.raises(ShardWorkerError) as err:
        build(store, uri, cfg, workers=2)
    message = str(err.value)
    assert "1 of 1 forked shard workers failed" in message
    assert "StoreError: injected failure on" in message and "Traceback" in message
    assert "a retry resumes" in message
    p = plan(store, uri, cfg)
    assert read_manifest(store, p.prefix) is None  # nothing committed
    assert _forked_children() == []  # the worker was joined
    written = [o.key for o in store.list(p.prefix + "_parts/")]
    assert 1 <= len(written) < len(p.units)  # the parent's shards are kept ...
    kept = {k: (store.path / k).stat().st_ino for k in written}

    monkeypatch.undo()
    result = build(store, uri, cfg, workers=2)  # ... and the retry only writes the others
    assert not result.cache_hit
    # whichever process took a kept shard skipped it: its part report is the same file
    assert {k: (store.path / k).stat().st_ino for k in written} == kept
    assert len(list(store.list(p.prefix + "_parts/"))) == len(p.units)
    seq = build(store, uri, TFRecordConfig(**SAMPLE_CFG, force=True), workers=1)
    assert {k: v for k, v in seq.manifest["files"].items() if k.endswith(".tfrecord")} == \
        {k: v for k, v in result.manifest["files"].items() if k.endswith(".tfrecord")}


@pytest.mark.parametrize("store", ["local"], indirect=True)
def test_a_killed_forked_worker_is_reported_with_its_signal(store, dataset, monkeypatch, tmp_path):
    import signal

    from petdet_tasks.tfrecords import ShardWorkerError

    uri, _ = dataset
    _fail_in(monkeypatch, tmp_path, "child",
             lambda split, index: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(ShardWorkerError, match=r"died with signal 9 while writing shards"):
        build(store, uri, TFRecordConfig(**SAMPLE_CFG), workers=2)
    assert _forked_children() == []


@pytest.mark.parametrize("store", ["local"], indirect=True)
def test_a_failure_in_the_calling_process_stops_the_workers(store, dataset, monkeypatch,
                                                           tmp_path):
    from petdet_tasks.store import StoreError

    uri, _ = dataset
    cfg = TFRecordConfig(**SAMPLE_CFG)
    _fail_in(monkeypatch, tmp_path, "parent", _raise)
    with pytest.raises(StoreError, match="injected failure on"):
        build(store, uri, cfg, workers=2)
    assert _forked_children() == []  # joined after their current shard
    p = plan(store, uri, cfg)
    assert read_manifest(store, p.prefix) is None
    # the worker stopped after its current shard: not every shard was written
    assert len(list(store.list(p.prefix + "_parts/"))) < len(p.units)


@pytest.mark.parametrize("extra", ["../../outside", "a/../../b", "/abs/path", "s3://K:s3cr3t@b/x"])
def test_extra_data_outside_the_store_is_a_config_error_naming_the_option(store, dataset,
                                                                         extra):
    uri, _ = dataset
    with pytest.raises(ConfigError, match=r"extra_data \(--extra-data\) .* must be a prefix "
                                          r"inside the store") as info:
        plan(store, uri, TFRecordConfig(**SAMPLE_CFG, extra_data=extra))
    assert "s3cr3t" not in str(info.value)


def test_list_file_duplicates_bad_ids_and_malformed_lines_are_reported(store, dataset,
                                                                       tmp_path):
    uri, summary = dataset
    key = step_prefix("download", load_output(store, uri).fingerprint) + \
        "annotations/trainval.txt"
    lines = store.get_bytes(key)[0].decode().splitlines()
    defects = set(summary["defects"])
    good = [ln for ln in lines if ln.split()[0] not in defects]
    (dup, *_), (bad_cols, *_), (bare, *_), (wrong, *ids) = (ln.split() for ln in good[:4])
    edited = [ln for ln in lines if ln.split()[0] not in (bad_cols, bare, wrong)]
    n = len(edited)
    edited += [f"{bad_cols} x y", bare, f"{wrong} 99 {ids[1]} {ids[2]}", good[0]]
    store.put_bytes(key, ("\n".join(edited) + "\n").encode())

    result = build(store, uri, TFRecordConfig(**SAMPLE_CFG), workers=1)
    report = _report(store, result)
    skipped = report["skipped"]
    assert skipped["duplicate_list_line"] == [{
        "name": dup, "detail": f"annotations/trainval.txt line {n + 4} lists it again (first "
        f"on line {lines.index(good[0]) + 1}): written once"}]
    assert skipped["malformed_list_line"] == sorted([
        {"name": bad_cols, "detail": f"annotations/trainval.txt line {n + 1} is "
         f"'{bad_cols} x y': expected IMAGE CLASS-ID SPECIES BREED-ID"},
        {"name": bare, "detail": f"annotations/trainval.txt line {n + 2} is '{bare}': "
         "expected IMAGE CLASS-ID SPECIES BREED-ID"}], key=lambda x: x["name"])
    breed = wrong.rsplit("_", 1)[0]
    assert "list_ids_disagree" not in skipped  # kept: the file name says the breed
    assert report["noted"]["list_ids_disagree"] == [{
        "name": wrong, "detail": f"annotations/trainval.txt line {n + 3}: CLASS-ID SPECIES "
        f"BREED-ID are 99 {ids[1]} {ids[2]}, the file name's breed {breed} has "
        f"{' '.join(ids)}; the file name's breed is used"}]
    counts = report["counts"]
    assert (counts["skipped_duplicate_list_line"], counts["skipped_malformed_list_line"],
            counts["noted_list_ids_disagree"]) == (1, 2, 1)
    names = [r["name"] for r in _read_records(store, result, tmp_path)]
    assert names.count(dup) == 1 and wrong in names
    assert bad_cols not in names and bare not in names
    assert report["written"] == summary["trainval"] - 2 - 2  # the sample's 2, the 2 malformed


def test_shard_tasks_and_gather_run_the_recorded_plan_not_a_new_one(store, dataset, tmp_path):
    """Airflow's plan, shard and gather tasks run apart: images arriving in the extra-data
    prefix in between must not give the later tasks another plan (another fingerprint), which
    made the gather wait for shards that never came."""
    from petdet_tasks.layout import PLAN as PLAN_FILE
    from petdet_tasks.store import StoreError
    from petdet_tasks.tfrecords import load_plan, plan, save_plan, write_shards

    uri, _ = dataset
    _upload_extra(store, tmp_path, "extra/inbox/")
    cfg = TFRecordConfig(**{**SAMPLE_CFG, "extra_data": "extra/inbox/",
                            "max_quarantine_fraction": 0.1})
    p = plan(store, uri, cfg)
    with pytest.raises(StoreError, match=f"has no {PLAN_FILE}: the plan task records it"):
        load_plan(store, p.fingerprint)
    save_plan(store, p)
    late = next(o.key for o in store.list("extra/inbox/images/"))
    store.put_bytes("extra/inbox/images/zz_late_arrival.jpg", store.get_bytes(late)[0])
    assert plan(store, uri, cfg).fingerprint != p.fingerprint

    assert load_plan(store, p.fingerprint) == p
    # a recorded plan that does not describe its prefix is refused, and not retried
    doc = json.loads(store.get_bytes(p.prefix + PLAN_FILE)[0])
    store.put_bytes(p.prefix + PLAN_FILE, json.dumps(
        {**doc, "config": {**doc["config"], "val_fraction": 0.5}}).encode())
    with pytest.raises(PermanentError, match="does not describe"):
        load_plan(store, p.fingerprint)
    save_plan(store, p)
    write_shards(store, load_plan(store, p.fingerprint), p.units[::2], cfg)
    write_shards(store, load_plan(store, p.fingerprint), p.units[1::2], cfg)
    result = gather(store, load_plan(store, p.fingerprint), cfg)
    assert result.fingerprint == p.fingerprint and not result.cache_hit
    assert PLAN_FILE in result.manifest["files"], "the plan is part of the output"
    assert _report(store, result)["written"] == len(p.examples) - len(
        _report(store, result)["quarantined"])
    hit = load_plan(store, p.fingerprint)
    assert hit.cache_hit and write_shards(store, hit, hit.units, cfg) == []
    # a complete output without a recorded plan (the CLI built it): described by its manifest
    store.delete(p.prefix + PLAN_FILE)
    assert load_plan(store, p.fingerprint).units == p.units
    assert gather(store, load_plan(store, p.fingerprint), cfg).cache_hit
