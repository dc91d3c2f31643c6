"""Where the training starts from: preset names pass through, directories and store prefixes
are identified by content, and a store prefix is synced to the local cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from petdet_tasks.store import LocalStore
from petdet_tasks.train import preset_identity, resolve_preset


def _preset_dir(path, weights=b"weights-v1"):
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"class_name": "RetinaNetBackbone"}')
    (path / "model.weights.h5").write_bytes(weights)
    return path


def test_names_and_handles_pass_through(tmp_path):
    store = LocalStore(tmp_path / "store")
    for name in ("retinanet_resnet50_fpn_coco",
                 "kaggle://keras/retinanet/keras/retinanet_resnet50_fpn_coco/4"):
        assert resolve_preset(store, name, tmp_path / "cache") == name
        assert preset_identity(store, name) == "name:" + name


def test_local_directory_identity_follows_its_content(tmp_path):
    store = LocalStore(tmp_path / "store")
    a = _preset_dir(tmp_path / "a")
    b = _preset_dir(tmp_path / "b")
    c = _preset_dir(tmp_path / "c", weights=b"weights-v2")
    assert preset_identity(store, str(a)) == preset_identity(store, str(b))
    assert preset_identity(store, str(a)) != preset_identity(store, str(c))
    assert resolve_preset(store, str(a), tmp_path / "cache") == str(a)


@pytest.mark.parametrize("as_uri", [False, True])
def test_store_prefix_is_synced_to_the_cache(store, tmp_path, as_uri):
    src = _preset_dir(tmp_path / "src")
    for f in src.iterdir():
        store.put_file(f"presets/coco-ish/{f.name}", f)
    ref = store.uri("presets/coco-ish") if as_uri else store.root.rstrip("/") + "/presets/coco-ish"
    local = resolve_preset(store, ref, tmp_path / "cache")
    assert sorted(p.name for p in Path(local).iterdir()) == ["config.json", "model.weights.h5"]
    assert (Path(local) / "model.weights.h5").read_bytes() == b"weights-v1"
    ident = preset_identity(store, ref)
    # a local store's prefix is a directory: identified by content like any other
    assert ident.startswith("store:" if store.remote else "dir:")
    store.put_bytes("presets/coco-ish/model.weights.h5", b"retrained")
    assert preset_identity(store, ref) != ident
    with pytest.raises(FileNotFoundError, match="empty"):
        preset_identity(store, store.uri("presets/nothing-here"))
