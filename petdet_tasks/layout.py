"""The one place that knows where things live in the store, and how a prefix is named.

```
datasets/<fingerprint>/      download      tfrecords/<fingerprint>/    tfrecords
training/<fingerprint>/      train         models/<fingerprint>/       export
evaluations/<fingerprint>/   evaluate      detections/<fingerprint>/   detect
registry/production.json     the promoted model
```

A step's fingerprint hashes its name, its schema version (bumped when its output format
changes), the fingerprints/digests of its inputs and the canonical JSON of the config fields
that change its output: same inputs + same config ⇒ same prefix.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from petdet_tasks.errors import ConfigError, PermanentError

MANIFEST = "_MANIFEST.json"
LEASE = "_LEASE.json"
PLAN = "_plan.json"  # a sharded step's plan, recorded for its shard and gather tasks
PRODUCTION_POINTER = "registry/production.json"
FINGERPRINT_LEN = 20  # hex chars (80 bits)

STEP_FOLDERS: dict[str, str] = {
    "download": "datasets",
    "tfrecords": "tfrecords",
    "train": "training",
    "export": "models",
    "evaluate": "evaluations",
    "detect": "detections",
}


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace; raises on values JSON cannot represent."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def fingerprint(step: str, schema_version: int, inputs: dict[str, str], config: dict) -> str:
    """Content address of a step's output (see the module doc)."""
    if step not in STEP_FOLDERS:
        raise KeyError(f"unknown step {step!r}: expected one of {sorted(STEP_FOLDERS)}")
    payload = canonical_json(
        {"step": step, "schema_version": schema_version, "inputs": inputs, "config": config}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:FINGERPRINT_LEN]


def step_prefix(step: str, fp: str) -> str:
    """``<folder>/<fingerprint>/`` for a step's output."""
    if step not in STEP_FOLDERS:
        raise KeyError(f"unknown step {step!r}: expected one of {sorted(STEP_FOLDERS)}")
    if len(fp) != FINGERPRINT_LEN or any(c not in "0123456789abcdef" for c in fp):
        raise ValueError(f"invalid fingerprint {fp!r}: expected {FINGERPRINT_LEN} hex chars")
    return f"{STEP_FOLDERS[step]}/{fp}/"


def output_uri(store, step: str, fp: str) -> str:
    """The URI of a step's output ``<root>/<folder>/<fingerprint>`` in ``store``."""
    return store.uri(step_prefix(step, fp).rstrip("/"))


def manifest_key(prefix: str) -> str:
    return prefix + MANIFEST


def lease_key(prefix: str) -> str:
    return prefix + LEASE


def split_output_uri(uri: str) -> tuple[str, str, str]:
    """``<root>/<folder>/<fp>`` → (root, step, fingerprint); the inverse of a step's output URI.
    A malformed one is a :class:`ConfigError` (a retry cannot mend it)."""
    parts = uri.rstrip("/").rsplit("/", 2)
    if len(parts) != 3:
        raise ConfigError(f"{uri!r} is not a step output URI (<root>/<folder>/<fingerprint>)")
    root, folder, fp = parts
    steps = {v: k for k, v in STEP_FOLDERS.items()}
    if folder not in steps:
        raise ConfigError(
            f"{uri!r} is not a step output URI: folder {folder!r} is not one of "
            f"{sorted(steps)}"
        )
    try:
        step_prefix(steps[folder], fp)  # validates the fingerprint
    except ValueError as e:
        raise ConfigError(f"{uri!r} is not a step output URI: {e}") from None
    return root, steps[folder], fp


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The worker-local cache (staged shards, presets, models): ``cache_dir``, else
    ``$PETDET_CACHE_DIR``, else ``~/.cache/petdet``. Scratch only: the store holds the truth."""
    base = cache_dir or os.environ.get("PETDET_CACHE_DIR") or "~/.cache/petdet"
    return Path(base).expanduser()


class DatasetLayoutError(PermanentError, ValueError):
    """The archives did not contain the Oxford-IIIT Pet layout."""


def decode_list_file(data: bytes, where: str) -> str:
    """The text of a list file (``trainval.txt`` ...), which must be UTF-8 (the real ones are
    ASCII); otherwise a :class:`DatasetLayoutError` naming ``where`` and the line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DatasetLayoutError(
            f"{where} is not UTF-8 text: line {line}, column {column} has byte "
            f"0x{data[e.start]:02x} ({e.reason}); save the list file as UTF-8") from None
