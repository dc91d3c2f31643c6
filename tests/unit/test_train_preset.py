"""Where the training starts from: preset names pass through, directories and store prefixes
are identified by content, and a store prefix is synced to the local cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from petdet_tasks.errors import ConfigError
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
    with pytest.raises(ConfigError, match="empty"):
        preset_identity(store, store.uri("presets/nothing-here"))
    # relative to the store root, like --extra-data and detect's --images
    assert resolve_preset(store, "presets/coco-ish", tmp_path / "cache2") != "presets/coco-ish"
    assert preset_identity(store, "presets/coco-ish") == preset_identity(store, ref)


def test_a_preset_that_names_nothing_is_a_config_error(tmp_path):
    """Not handed to keras-hub to fail with 'Unknown preset identifier' after the data is
    staged, and not retried: a retry cannot make it exist."""
    store = LocalStore(tmp_path / "store")
    for preset, message in (
            ("presets/absent", "(is empty|neither a local directory nor a prefix)"),
            (str(tmp_path / "no-such-dir"), "neither a local directory nor a prefix"),
            ("./tiny", "neither a local directory nor a prefix"),
            ("s3://another-bucket/presets/x", "not under the store root"),
            ("retinanet_resnet50_fpn_cocoo", "not a keras-hub RetinaNet preset "
             r"\(retinanet_resnet50_fpn_coco, ")):
        with pytest.raises(ConfigError, match=message):
            preset_identity(store, preset)
            resolve_preset(store, preset, tmp_path / "cache")


def test_credentials_in_a_preset_never_reach_the_message(tmp_path):
    store = LocalStore(tmp_path / "store")
    for preset in ("s3://AKIAEXAMPLE:wJalrSECRETKEY@another-bucket/presets/x",
                   "file://user:wJalrSECRETKEY@host/presets/x"):
        with pytest.raises(ConfigError) as e:
            preset_identity(store, preset)
        assert "SECRETKEY" not in str(e.value) and "***@" in str(e.value), str(e.value)


def _metadata(saved: str, params: int = 1234) -> bytes:
    # what keras-hub's save_to_preset writes (preset_utils.py: "date_saved" is the save time)
    return json.dumps({"keras_version": "3.15.1", "keras_hub_version": "0.32.0",
                       "parameter_count": params, "date_saved": saved, "tasks": []},
                      indent=4).encode()


def test_resaving_the_same_preset_keeps_its_identity(store, tmp_path):
    """keras-hub stamps the save time into metadata.json: the same weights saved again must not
    change the training fingerprint (hours of retraining), while any other change must."""
    dirs = {}
    for label, meta in (("first", _metadata("2026-11-28@20:19:51")),
                        ("resaved", _metadata("2026-11-29@00:28:43")),
                        ("other", _metadata("2026-11-29@00:28:43", params=999))):
        d = _preset_dir(tmp_path / label)
        (d / "metadata.json").write_bytes(meta)
        for f in d.iterdir():
            store.put_file(f"presets/{label}/{f.name}", f)
        dirs[label] = d
    for ref in (lambda k: str(dirs[k]), lambda k: store.uri(f"presets/{k}")):
        assert preset_identity(store, ref("first")) == preset_identity(store, ref("resaved"))
        assert preset_identity(store, ref("first")) != preset_identity(store, ref("other"))
    # a metadata.json that is not JSON is identified by its bytes, not rejected here
    bad = _preset_dir(tmp_path / "bad")
    (bad / "metadata.json").write_bytes(b"{not json")
    ident = preset_identity(store, str(bad))
    (bad / "metadata.json").write_bytes(b"{not json either")
    assert preset_identity(store, str(bad)) != ident
