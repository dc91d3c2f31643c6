"""The detection step: an exported model run over images → per-image JSON, annotated JPEGs and a
gallery (``object_detection_run.py`` done right).

Three phases, so that Airflow can map the middle one over shard groups:

* :func:`plan` — resolves the model (:func:`resolve_model`: the registry's production model
  unless one is given), lists the input images (module doc, *Inputs*), computes the
  fingerprint and splits the listing into ``num_shards`` shards (image ``i`` of the sorted
  listing → shard ``i % num_shards``). No image is decoded; images in a local folder or a
  local store are hashed (their content is part of the fingerprint).
* :func:`run_shards` — for each shard, streaming: a ``tf.data`` pipeline reads the bytes (a
  few requests ahead in threads on a remote store), looks at each image's header
  (:func:`_prepare`: an image over :data:`petdet_tasks.images.MAX_PIXELS` pixels becomes a
  failure record before any pixel is decoded; a transparent one is composited onto white as
  the tfrecords step does for training), decodes them in parallel
  (``tf.io.decode_image``), and the SavedModel runs on batches: decoded images wait in one
  bucket per size, a full bucket goes through the ``serving_default`` uint8 signature; when
  too many wait (many distinct sizes) the oldest go together through
  ``encoded_image_string_tensor`` on their raw bytes (a composited image's as its RGB PNG; the
  same decoder inside the graph, so the same detections; it costs a second decode). While the
  next batch runs, a thread pool turns each image's outputs into its record
  (:func:`petdet_tasks.annotate.image_record`), draws the boxes, encodes the annotated JPEG and
  the thumbnail and uploads them. When every image of a gallery page that the shard holds is
  done, the shard writes that page's part file ``_parts/shard-0000i/page-0000p.json`` (its
  records and thumbnails on page ``p``); when every image of the shard is, its part report
  ``_parts/shard-0000i.json`` follows (records, the files with size and sha256).
  A shard whose part report is there with all its files is skipped, so a retried shard task
  writes nothing twice. An image that cannot be read or decoded gets a failure record with the
  reason and the shard goes on.
* :func:`gather` — under the commit protocol, streaming (it holds one shard's records and one
  page's thumbnails at a time, never all of them): checks every shard's part report, one at a
  time, then builds and writes one gallery page at a time from that page's part files,
  appending its records to ``detections.jsonl`` and ``detections.csv``; writes
  ``summary.json`` and ``failures.html``, and commits the manifest, which lists the files the
  shards wrote with their sha256.

:func:`detect` runs all three in one process (the CLI): the shards go through one pipeline
with one loaded model, back to back (the model already uses every core; parallel processes
would only compete for them).

Inputs (``images``):

* None — the test split of the dataset the model was trained on: the model's
  ``pipeline.json`` names its tfrecords output, whose manifest names the download output;
  ``annotations/test.txt`` there lists the images (``images/<name>.jpg``).
* a store URI or path under the store root, or a key prefix relative to the root — every
  ``.jpg``/``.jpeg``/``.png``/``.gif``/``.bmp``/``.webp`` (any case: what
  ``tf.io.decode_image`` reads) under that prefix;
* a local directory (absolute, ``./relative``, or relative when no store key has that
  prefix) — every such file in it, recursively. Shard tasks read it from their own disk: on a
  distributed Airflow, use a store prefix.

Every listed image ends as a record or a failure record; never skipped silently. The other
files under the prefix or folder are counted: a warning at planning, ``not_images`` (count and
the first names) in ``summary.json``.

Decoding matches the tfrecords step's (what the model was trained on): a transparent image is
composited onto white, EXIF orientation is not applied, an image over 50 Mpx is refused
(``image too large: ...``, from its header). GIFs give their first frame.

Output layout (``detections/<fingerprint>/``)::

    images/<key>.json         the image's record (annotate schema 1), or its failure record
    annotated/<key>.jpg       the image with boxes and "name score" labels (not for failures)
    detections.jsonl          every record, sorted by key, one per line
    detections.csv            one row per detection (annotate.records_to_csv)
    summary.json              images, boxes per class, failures and their reasons, model, input,
                              not_images (files under the input not taken)
    index.html                the gallery, self-contained (inline CSS, thumbnails as data URIs,
                              relative links); gallery-002.html ... when there are more than
                              500 images, every page linked from every other; the summary's
                              counts on each, the failure list only on failures.html
    failures.html             every failed image (linked to its JSON) and the reason; written
                              when an image failed, linked from every gallery page
    _parts/shard-0000i.json   part reports: one shard's records and files
    _parts/shard-0000i/page-0000p.json   one shard's records and base64 thumbnails on page p
    _MANIFEST.json

``<key>`` is the image's path relative to the listed prefix or folder (for the test split:
its name) without the extension, every character outside ``A-Z a-z 0-9 . _ -`` (and the
``/`` separators) replaced by ``_`` and leading dots dropped, so it is safe in object keys and
URLs as it is; two files that map to the same key (``a.jpg`` and ``a.png``, or names equal
but for case) get a ``-<hash>`` suffix after the first. A record's ``source`` is the image's
key in the store (relative to the store root), or its path relative to a local folder.

The fingerprint covers the model's fingerprint, a digest of the listing (each image's source,
size and sha256 — or, on S3, its ETag) and the config fields that change the outputs
(``score_threshold``, ``max_boxes``, ``num_shards``, ``thumbnail_size``; not
``batch_size``). A shard that reads an image whose content no longer matches the listing
stops with :class:`InputChanged`, a permanent error (a retry would run the same recorded plan
again): plan again.

TensorFlow is imported only inside :func:`run_shards` (the DAG file and the plan/gather tasks
never load it).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

from petdet_tasks import annotate, worker_cache
from petdet_tasks.errors import ConfigError, PermanentError
from petdet_tasks.images import read_header
from petdet_tasks.label_map import LabelMap, parse_label_map
from petdet_tasks.layout import (
    PLAN,
    PRODUCTION_POINTER,
    cache_root,
    fingerprint,
    split_output_uri,
    step_prefix,
)
from petdet_tasks.manifest import (
    PlanMismatch,
    StepResult,
    StepWriter,
    load_output,
    read_manifest,
    read_plan_record,
    register_plan_record,
    resolve_output_uri,
    run_step,
    save_plan_record,
)
from petdet_tasks.registry import production_model_uri, read_production
from petdet_tasks.store import FileEntry, NotFound, Store, StoreError, _check_key, _redact

log = logging.getLogger(__name__)

STEP = "detect"
# 2: .gif/.bmp/.webp taken; summary.json names the files not taken (not_images); transparent
# images composited onto white; images over images.MAX_PIXELS failed from their header; the
# gallery pages link to failures.html instead of each listing every failure; thumbnails in
# per-page part files
SCHEMA_VERSION = 2
PARTS = "_parts/"
# what tf.io.decode_image reads (TF 2.21: JPEG, PNG, GIF, BMP, WebP); other files under the
# input prefix or folder are counted and reported (``not_images``), never silently dropped
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
PAGE_SIZE = 500  # gallery cards per HTML page
FAILURES_PAGE = "failures.html"
NOT_IMAGE_EXAMPLES = 10  # file names named in the log and summary.json
JPEG_QUALITY = 90  # annotated images
THUMBNAIL_QUALITY = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

#: Figures of the last :func:`run_shards` call that ran a shard in this process (images,
#: seconds, model seconds, batches per signature, model load seconds): for logs and benchmarks.
LAST_RUN: dict[str, Any] = {}
_MODEL_CACHE: dict[str, Any] = {}  # one loaded SavedModel per process, by local path
_MODEL_LOCK = threading.Lock()


class NoProductionModel(PermanentError, LookupError):
    """No model was given and the registry has no production model yet (a retry minutes later
    finds none either: promote a model, or pass one)."""


class NoImagesToDetect(PermanentError, FileNotFoundError):
    """The default input, the test split of the model's dataset, holds no image (or no list of
    them), or the model does not lead to that dataset (its ``pipeline.json`` names no records,
    or its records name no dataset). Those outputs are content-addressed and immutable, so a
    retry would find the same nothing: not retried (pass the images to detect on)."""


class InputChanged(PermanentError, StoreError):
    """An input image changed (or vanished) between planning and reading it.

    Permanent for the task that raises it: a shard task runs the plan the plan task recorded,
    so a retry reads the same listing and fails the same way. Planning again (in Airflow:
    clearing ``detect_plan``; on the CLI: running ``detect`` again) lists the inputs anew."""


def _plan_again(what: str) -> InputChanged:
    return InputChanged(
        f"{what}: the plan recorded for this output no longer describes its inputs, and a "
        "retry of this task would run the same plan and fail the same way; plan again "
        "(Airflow: clear the detect_plan task and its downstream tasks; CLI: run detect "
        "again)")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DetectConfig:
    """:param score_threshold: keep detections scoring at least this (0..1).
    :param max_boxes: at most this many detections per image (highest scores first).
    :param batch_size: images per model call (speed only: not part of the fingerprint).
    :param num_shards: how many shards the listing is split into (the unit of retry and of
        Airflow mapping).
    :param thumbnail_size: the gallery thumbnails' longest side, in pixels.
    """

    score_threshold: float = 0.5
    max_boxes: int = 20
    batch_size: int = 8
    num_shards: int = 4
    thumbnail_size: int = 240

    def validate(self) -> DetectConfig:
        problems = []
        st = self.score_threshold
        if isinstance(st, bool) or not isinstance(st, int | float) or not 0.0 <= st <= 1.0:
            problems.append(f"score_threshold must be a number in [0, 1], got {st!r}")
        for name, lo, hi in (("max_boxes", 1, 1000), ("batch_size", 1, 1024),
                             ("num_shards", 1, 10_000), ("thumbnail_size", 16, 4096)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                problems.append(f"{name} must be an integer in {lo}..{hi}, got {v!r}")
        if problems:
            raise ConfigError("invalid detect config: " + "; ".join(problems), problems)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint_fields(self) -> dict:
        """The fields that change the outputs (``batch_size`` does not)."""
        return {"score_threshold": float(self.score_threshold), "max_boxes": self.max_boxes,
                "num_shards": self.num_shards, "thumbnail_size": self.thumbnail_size}

    @classmethod
    def from_dict(cls, values: dict | None) -> DetectConfig:
        """From loosely typed values (CLI, Airflow params rendered as text): coerced, validated;
        unknown keys are an error, empty strings mean "not set"."""
        values = dict(values or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"unknown detect config keys {unknown}; expected some of "
                              f"{sorted(fields)}")
        out: dict[str, Any] = {}
        for k, v in values.items():
            if v is None or (isinstance(v, str) and v.strip() in ("", "None")):
                continue
            kind = type(getattr(cls, k))
            if isinstance(v, bool):
                raise ConfigError(f"detect config {k}={v!r}: expected {kind.__name__}")
            try:
                if kind is int and isinstance(v, float) and not v.is_integer():
                    raise ValueError
                out[k] = kind(float(v)) if kind is int and isinstance(v, float) else kind(v)
            except (TypeError, ValueError):
                raise ConfigError(f"detect config {k}={v!r}: expected {kind.__name__}") from None
        return cls(**out).validate()


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------

class Item(NamedTuple):
    """One listed image: its output key, where its bytes are, and what the listing saw."""

    key: str  # output key (images/<key>.json, annotated/<key>.jpg)
    ref: str  # store key (kind "store") or absolute local path (kind "local")
    kind: str  # "store" or "local"
    source: str  # the record's ``source``: store key, or path relative to the local folder
    size: int  # bytes (-1: not readable at planning)
    digest: str  # "sha256:<hex>", "etag:<etag>", "missing: <why>" or "unreadable: <why>"
    shard: int

    def to_json(self) -> dict:
        return self._asdict()


@dataclass
class DetectPlan:
    """What :func:`plan` decided; every shard task and the gather recompute the same one."""

    uri: str
    fingerprint: str
    prefix: str
    cache_hit: bool
    model_uri: str
    model_fingerprint: str
    items: list[Item] = field(repr=False)
    units: list[int]
    images: str  # what was listed, in words
    config: dict
    inputs: dict
    force: bool = False
    # files under the input prefix or folder that are not taken (list_images)
    not_images: dict = field(default_factory=lambda: {"count": 0, "examples": []})
    page_size: int = PAGE_SIZE  # gallery cards per page: the shards write thumbnails by page

    def groups(self, n_tasks: int) -> list[list[int]]:
        """The shard indices split into ``n_tasks`` JSON-able groups (for Airflow's
        ``expand``)."""
        n = max(1, min(int(n_tasks), len(self.units)))
        return [self.units[i::n] for i in range(n)]

    def shard_items(self, unit: int) -> list[Item]:
        return [it for it in self.items if it.shard == unit]

    @property
    def pages(self) -> int:
        """How many gallery pages (image ``i`` of the sorted listing is on page
        ``i // page_size + 1``; one page, empty, for no image)."""
        return max(1, math.ceil(len(self.items) / self.page_size))

    def page_items(self, page: int) -> list[Item]:
        return self.items[(page - 1) * self.page_size:page * self.page_size]


def resolve_model(store: Store, model_uri: str | None) -> str:
    """The model to run: ``model_uri`` (a URI, or ``models/<fp>`` relative to the store root),
    else the registry's production model. :class:`NoProductionModel` when neither exists."""
    if model_uri is not None and str(model_uri).strip():
        return resolve_output_uri(store, model_uri)
    pointer, _ = read_production(store)
    if pointer is None:
        raise NoProductionModel(
            f"no model given and no production model yet ({store.uri(PRODUCTION_POINTER)} "
            "does not exist): evaluate and promote a model first, or pass a model URI "
            "(--model models/<fingerprint>)")
    model = production_model_uri(store, pointer)  # by fingerprint: the store may have moved
    log.info("using the production model %s (%s %s)", model, pointer["metric"],
             pointer["value"])
    return model


def safe_key(rel: str) -> str:
    """An image's output key from its relative path (module doc): extension dropped, unsafe
    characters replaced by ``_``, leading dots dropped from every component."""
    head, _, name = rel.rpartition("/")
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    path = f"{head}/{stem}" if head else stem
    parts = [(_UNSAFE.sub("_", p).lstrip(".") or "_") for p in path.split("/") if p]
    return "/".join(parts) or "_"


def _assign_keys(rels: Iterable[str]) -> dict[str, str]:
    """rel path → unique safe key (case-insensitively unique: a local copy on macOS or
    Windows must not merge two outputs); later clashes get a ``-<hash>`` suffix."""
    used: set[str] = set()
    out = {}
    for rel in sorted(rels):
        key = safe_key(rel)
        if key.lower() in used:
            key = f"{key}-{hashlib.sha256(rel.encode()).hexdigest()[:8]}"
        used.add(key.lower())
        out[rel] = key
    return out


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _list_test_split(store: Store, model: StepResult) -> tuple[list[tuple], str]:
    """(rel, ref, kind, source, size, digest) of the model's dataset's test images."""
    model_prefix = step_prefix("export", model.fingerprint)
    pipeline = json.loads(store.read_text(model_prefix + "pipeline.json"))
    records_uri = pipeline.get("tfrecords_uri")
    if not records_uri:
        raise NoImagesToDetect(f"{model.uri}/pipeline.json names no tfrecords output: cannot "
                               "find the dataset it was trained on; pass the images to detect "
                               "on")
    _, _, records_fp = split_output_uri(records_uri)  # the same output under this store's root
    records = read_manifest(store, step_prefix("tfrecords", records_fp))
    if records is None:  # retried: a forced rebuild of the records removes their manifest first
        raise StoreError(f"the model's tfrecords output tfrecords/{records_fp} is incomplete "
                         f"or not in {store.uri()}: pass the images to detect on")
    dataset_fp = records.get("inputs", {}).get("dataset")
    if not dataset_fp:
        raise NoImagesToDetect(f"tfrecords/{records_fp} records no dataset input: cannot find "
                               "the test split; pass the images to detect on")
    base = step_prefix("download", dataset_fp)
    dataset = read_manifest(store, base)
    if dataset is None:
        raise StoreError(f"the model's dataset {store.uri(base)} is incomplete or absent")
    files = dataset.get("files", {})
    if "annotations/test.txt" not in files:
        raise NoImagesToDetect(f"{store.uri(base)} has no annotations/test.txt: no test split "
                               "to detect on; pass the images to detect on")
    names: dict[str, None] = {}
    for line in store.read_text(base + "annotations/test.txt").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names[line.split()[0]] = None
    out = []
    for name in names:
        rel = f"images/{name}.jpg"
        entry = files.get(rel)
        if entry is None:
            out.append((name, base + rel, "store", base + rel, -1,
                        "missing: annotations/test.txt lists it but the dataset has no " + rel))
        else:
            out.append((name, base + rel, "store", base + rel, entry["size"],
                        "sha256:" + entry["sha256"]))
    return out, f"test split of {store.uri(base.rstrip('/'))} ({len(out)} images)"


def _list_store_prefix(store: Store, prefix: str) -> tuple[list[tuple], list[str]]:
    """(rows, the relative keys of the other objects: not taken)."""
    out, others = [], []
    for obj in store.list(prefix):
        rel = obj.key[len(prefix):]
        if not _is_image(obj.key):
            if not obj.key.endswith("/"):  # a "folder" marker object is no file
                others.append(rel)
            continue
        try:  # S3 allows keys the store refuses to read ("a//b.jpg", "a/../b.jpg")
            _check_key(obj.key)
        except ValueError as e:
            out.append((rel, obj.key, "store", obj.key, -1, f"unreadable: {e}"))
            continue
        if obj.etag:
            digest = "etag:" + obj.etag.strip('"')
        else:  # a local store: the listing carries no version tag, the content decides
            digest = "sha256:" + _sha256(store.get_bytes(obj.key)[0])
        out.append((rel, obj.key, "store", obj.key, obj.size, digest))
    return out, others


def _list_local(folder: Path) -> tuple[list[tuple], list[str]]:
    """(rows, the relative paths of the other files: not taken)."""
    out, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if not _is_image(name):
                others.append(rel)
                continue
            try:
                data = path.read_bytes()
                out.append((rel, str(path), "local", rel, len(data), "sha256:" + _sha256(data)))
            except OSError as e:
                out.append((rel, str(path), "local", rel, -1,
                            f"unreadable: {e.strerror or type(e).__name__}"))
    return out, others


def _resolve_images(store: Store, images: str) -> tuple[str, str | Path]:
    """``("store", prefix)`` or ``("local", folder)`` for an ``images`` argument."""
    s = str(images).strip()
    if not s:
        raise ConfigError("images is empty")
    root = store.root.rstrip("/")
    local_root = None if store.remote else Path(store.root)
    if s.startswith("file://"):
        s = s[len("file://"):]
    if s == root or s.startswith(root + "/"):
        prefix = s[len(root):].strip("/")
    elif s.startswith("s3://") or "://" in s:
        raise ConfigError(f"images {_redact(images)!r} is not under the store root {store.root}: "
                          "copy the images into the store, or pass a local folder")
    elif os.path.isabs(s) or s.startswith(("./", "../", "~")):
        path = Path(s).expanduser().resolve()
        if local_root is not None and (path == local_root or local_root in path.parents):
            prefix = path.relative_to(local_root).as_posix()
        else:
            if not path.is_dir():
                raise ConfigError(f"images (--images, Airflow param detect_images): the folder "
                                  f"{path} does not exist")
            return "local", path
    else:
        prefix = s.strip("/")
        if not any(True for _ in store.list(prefix + "/")) and Path(s).is_dir():
            return "local", Path(s).resolve()
    if not prefix or prefix == ".":
        raise ConfigError(f"images {_redact(images)!r} names the whole store: give the prefix that "
                          "holds the images")
    return "store", prefix + "/"


class Listing(NamedTuple):
    """What :func:`list_images` found."""

    items: list[Item]  # unsharded, sorted by key
    what: str  # what was listed, in words
    not_images: dict  # {"count": N, "examples": [the first relative paths]}: files not taken


def _not_images(others: list[str]) -> dict:
    return {"count": len(others), "examples": sorted(others)[:NOT_IMAGE_EXAMPLES]}


def _describe_not_images(not_images: dict) -> str:
    n = not_images["count"]
    return (f"{n} file{'s' if n != 1 else ''} not taken: not {'/'.join(IMAGE_EXTENSIONS)} "
            f"(e.g. {', '.join(not_images['examples'][:3])})")


def list_images(store: Store, model: StepResult, images: str | None) -> Listing:
    """The listing (module doc, *Inputs*): unsharded :class:`Item` s sorted by key, a
    description of what was listed, and the files under the prefix or folder that are not
    taken (their extension is none of :data:`IMAGE_EXTENSIONS`)."""
    others: list[str] = []
    if images is None or not str(images).strip():
        rows, what = _list_test_split(store, model)
    else:
        kind, where = _resolve_images(store, images)
        if kind == "local":
            rows, others = _list_local(Path(where))
            what = f"local folder {where} ({len(rows)} images)"
        else:
            rows, others = _list_store_prefix(store, str(where))
            what = f"{store.uri(str(where))} ({len(rows)} images)"
    not_images = _not_images(others)
    if not rows:
        where = what.rsplit(' (', 1)[0]
        looked = f"(looked for {', '.join(IMAGE_EXTENSIONS)} files"
        looked += f"; {_describe_not_images(not_images)})" if others else ")"
        if images is None or not str(images).strip():
            # the dataset output is immutable: a retry would find the same empty split
            raise NoImagesToDetect(f"no images to detect on in the {where} {looked}; pass "
                                   "the images to detect on")
        # the option names an empty place: the same option would fail the same way again
        raise ConfigError(f"images (--images, Airflow param detect_images) {_redact(images)!r}: no "
                          f"images to detect on in the {where} {looked}")
    if others:
        what = what[:-1] + f"; {_describe_not_images(not_images)})"
    keys = _assign_keys(r[0] for r in rows)
    items = [Item(keys[rel], ref, kind, source, size, digest, -1)
             for rel, ref, kind, source, size, digest in rows]
    items.sort(key=lambda it: it.key)
    return Listing(items, what, not_images)


def listing_digest(items: Iterable[Item]) -> str:
    """sha256 over every item's key, source, size and digest (part of the fingerprint)."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.key}\t{it.source}\t{it.size}\t{it.digest}\n".encode())
    return h.hexdigest()


def plan(store: Store, model_uri: str | None, images: str | None, cfg: DetectConfig, *,
         force: bool = False) -> DetectPlan:
    """Resolve the model, list the images, fix the fingerprint and the shards (module doc).

    :param force: recompute even if the output is complete (shards and gather).
    """
    cfg.validate()
    uri = resolve_model(store, model_uri)
    model = load_output(store, uri, expect_step="export")
    items, what, not_images = list_images(store, model, images)
    if not_images["count"]:
        log.warning("%s: %s", what.split(" (", 1)[0], _describe_not_images(not_images))
    items = [it._replace(shard=i % cfg.num_shards) for i, it in enumerate(items)]
    inputs = {"model": model.fingerprint, "images": listing_digest(items)}
    config = cfg.fingerprint_fields()
    fp = fingerprint(STEP, SCHEMA_VERSION, inputs, config)
    prefix = step_prefix(STEP, fp)
    cache_hit = not force and read_manifest(store, prefix) is not None
    return DetectPlan(store.uri(prefix.rstrip("/")), fp, prefix, cache_hit, model.uri,
                      model.fingerprint, items, list(range(cfg.num_shards)), what, config,
                      inputs, force, not_images, PAGE_SIZE)


def save_plan(store: Store, p: DetectPlan) -> str:
    """Record the plan (its listing, model and config) for the shard tasks and the gather
    (:func:`petdet_tasks.manifest.save_plan_record`); returns its key. A cache hit needs
    none (nothing will run)."""
    return save_plan_record(store, p.prefix, {
        "schema": 1, "fingerprint": p.fingerprint, "model_uri": p.model_uri,
        "model_fingerprint": p.model_fingerprint, "images": p.images, "config": p.config,
        "inputs": p.inputs, "units": p.units, "items": [list(it) for it in p.items],
        "not_images": p.not_images, "page_size": p.page_size})


def load_plan(store: Store, fp: str, *, force: bool = False) -> DetectPlan:
    """The plan :func:`save_plan` recorded for the output ``detections/<fp>``; for a complete
    output without one (a cache hit, or made by the CLI), the plan its manifest describes."""
    doc, manifest, cache_hit = read_plan_record(store, STEP, fp, force=force)
    prefix = step_prefix(STEP, fp)
    uri = store.uri(prefix.rstrip("/"))
    if doc is None:
        return DetectPlan(uri, fp, prefix, True, manifest["outputs"]["model_uri"],
                          manifest["outputs"]["model_fingerprint"], [],
                          list(range(int(manifest["detect_config"]["num_shards"]))),
                          manifest.get("input", ""), manifest["config"], manifest["inputs"],
                          force)
    items = [Item(*it) for it in doc["items"]]
    if (listing_digest(items) != doc["inputs"].get("images")
            or fingerprint(STEP, SCHEMA_VERSION, doc["inputs"], doc["config"]) != fp):
        raise PlanMismatch(f"{store.uri(prefix + PLAN)} does not describe {uri}: "
                           "run the plan task again")
    return DetectPlan(uri, fp, prefix, cache_hit, doc["model_uri"], doc["model_fingerprint"],
                      items, [int(u) for u in doc["units"]], doc["images"], doc["config"],
                      doc["inputs"], force, doc["not_images"], int(doc["page_size"]))


def _check_config(p: DetectPlan, cfg: DetectConfig) -> None:
    cfg.validate()
    if cfg.fingerprint_fields() != p.config:
        raise ConfigError(f"the config {cfg.fingerprint_fields()} is not the one the plan was "
                          f"made with {p.config}")


def part_key(p: DetectPlan, unit: int) -> str:
    return f"{p.prefix}{PARTS}shard-{unit:05d}.json"


def page_part_rel(unit: int, page: int) -> str:
    """One shard's records and thumbnails on one gallery page, relative to the prefix."""
    return f"{PARTS}shard-{unit:05d}/page-{page:05d}.json"


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------

def _tf_error_text(e: BaseException) -> str:
    """A TensorFlow op error as one readable line (no function-node noise)."""
    msg = getattr(e, "message", None) or str(e)
    msg = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", msg)
    msg = re.sub(r"\s*\[Op:\w+\]", "", msg).strip()
    return msg.splitlines()[0] if msg else type(e).__name__


class _Unreadable(Exception):
    """An input that cannot be read: becomes a failure record (the reason is the message)."""


def _read_item(store: Store, item: Item) -> bytes:
    """The image's bytes, checked against the listing; :class:`_Unreadable` for a per-image
    failure, :class:`InputChanged` when the input is not the one planned."""
    if item.digest.startswith(("missing:", "unreadable:")):
        raise _Unreadable(item.digest)
    if item.kind == "local":
        try:
            data = Path(item.ref).read_bytes()
        except FileNotFoundError:
            # or the plan ran on another worker: a local folder is the worker's own
            where = ("; its folder is not on this worker at all: a worker-local folder must "
                     "be at the same path on every worker that runs detect tasks (a shared "
                     "filesystem), else put the images in the store"
                     if not Path(item.ref).parent.exists() else "")
            raise _plan_again(f"{item.ref} was deleted after planning{where}") from None
        except OSError as e:
            raise _Unreadable(f"unreadable: {e.strerror or type(e).__name__}") from None
        etag = None
    else:
        try:
            data, etag = store.get_bytes(item.ref)
        except NotFound:
            raise _plan_again(f"{store.uri(item.ref)} was deleted after planning") from None
    kind, _, want = item.digest.partition(":")
    got = (etag or "").strip('"') if kind == "etag" else _sha256(data)
    if got != want:
        where = item.ref if item.kind == "local" else store.uri(item.ref)
        raise _plan_again(f"{where} changed after planning ({kind} {got}, listed {want})")
    return data


def _read_ahead(store: Store, items: list[Item], window: int = 16
                ) -> Iterator[tuple[int, bytes | None, str | None]]:
    """``(index, bytes, None)`` or ``(index, None, reason)`` in order; on a remote store a few
    requests run ahead in threads (S3 latency hidden), a local one is read directly."""
    if not store.remote:
        for j, item in enumerate(items):
            try:
                yield j, _read_item(store, item), None
            except _Unreadable as e:
                yield j, None, str(e)
        return

    def one(item: Item) -> tuple[bytes | None, str | None]:
        try:
            return _read_item(store, item), None
        except _Unreadable as e:
            return None, str(e)

    with ThreadPoolExecutor(max_workers=min(8, window), thread_name_prefix="petdet-read"
                            ) as pool:
        futures: collections.deque = collections.deque()
        it = iter(enumerate(items))
        for j, item in it:
            futures.append((j, pool.submit(one, item)))
            if len(futures) >= window:
                break
        while futures:
            j, fut = futures.popleft()
            nxt = next(it, None)
            if nxt is not None:
                futures.append((nxt[0], pool.submit(one, nxt[1])))
            data, reason = fut.result()
            yield j, data, reason


@dataclass
class _Page:
    """One shard's images on one gallery page, until the last of them is done."""

    remaining: int = 0
    records: list[dict] = field(default_factory=list)
    thumbnails: dict[str, str] = field(default_factory=dict)  # key → base64 JPEG


@dataclass
class _Unit:
    """Progress of one shard inside :class:`_ShardRunner`."""

    index: int
    remaining: int
    records: list[dict] = field(default_factory=list)
    pages: dict[int, _Page] = field(default_factory=dict)  # the pages not written yet
    page_numbers: list[int] = field(default_factory=list)  # every page with an image of it
    files: dict[str, dict] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


class _ShardRunner:
    """Runs the given shards' images through one pipeline (module doc, :func:`run_shards`)."""

    def __init__(self, store: Store, p: DetectPlan, cfg: DetectConfig, model, labels: LabelMap,
                 *, workers: int | None = None):
        self.store, self.p, self.cfg = store, p, cfg
        self.model, self.labels = model, labels
        self.workers = workers or (8 if store.remote else 2)
        self.lock = threading.Lock()
        self.units: dict[int, _Unit] = {}
        self.reports: dict[int, dict] = {}
        self.todo: list[tuple[int, Item, int]] = []  # (shard, item, gallery page)
        self.model_seconds = 0.0
        self.batches = {"uint8": 0, "encoded": 0}

    # -- per image, in the pool ------------------------------------------------------------
    def _put(self, unit: _Unit, rel: str, data: bytes) -> None:
        self.store.put_bytes(self.p.prefix + rel, data)
        with self.lock:
            unit.files[rel] = {"size": len(data), "sha256": _sha256(data)}

    def _finish_image(self, j: int, image, out: dict) -> None:
        from PIL import Image

        u, item, page = self.todo[j]
        unit = self.units[u]
        h, w = int(image.shape[0]), int(image.shape[1])
        rec = annotate.image_record(
            item.key, w, h, out["detection_boxes"], out["detection_scores"],
            out["detection_classes"], out["num_detections"], self.labels,
            score_threshold=float(self.cfg.score_threshold), max_boxes=self.cfg.max_boxes,
            source=item.source)
        drawn = annotate.draw_detections(Image.fromarray(image), rec)
        self._put(unit, f"annotated/{item.key}.jpg", annotate.encode_jpeg(drawn, JPEG_QUALITY))
        # a whole-factor box reduction first (still >= the thumbnail size) makes the Lanczos
        # step ~3x cheaper than on the full image
        factor = max(1, max(w, h) // self.cfg.thumbnail_size)
        small = drawn.reduce(factor) if factor > 1 else drawn
        thumb = annotate.thumbnail_jpeg(small, self.cfg.thumbnail_size, THUMBNAIL_QUALITY)
        self._put(unit, f"images/{item.key}.json", _record_json(rec))
        self._done(unit, page, rec, thumb)

    def _finish_failure(self, j: int, reason: str) -> None:
        u, item, page = self.todo[j]
        unit = self.units[u]
        log.warning("%s: %s", item.source, reason)
        rec = annotate.failure_record(item.key, reason, item.source)
        self._put(unit, f"images/{item.key}.json", _record_json(rec))
        self._done(unit, page, rec, None)

    def _done(self, unit: _Unit, page: int, rec: dict, thumb: bytes | None) -> None:
        with self.lock:
            unit.records.append(rec)
            part = unit.pages[page]
            part.records.append(rec)
            if thumb is not None:
                part.thumbnails[rec["image"]] = base64.b64encode(thumb).decode("ascii")
            part.remaining -= 1
            if part.remaining == 0:
                del unit.pages[page]
            else:
                part = None
        if part is not None:  # the page file is written before this image counts as done,
            self._write_page(unit, page, part)  # so the part report lists it
        with self.lock:
            unit.remaining -= 1
            last = unit.remaining == 0
        if last:
            self._write_part(unit)

    def _write_page(self, unit: _Unit, page: int, part: _Page) -> None:
        """This shard's records and thumbnails on one gallery page (the gather builds the page
        from these files, one page at a time)."""
        doc = {"schema": SCHEMA_VERSION, "fingerprint": self.p.fingerprint,
               "shard": unit.index, "page": page,
               "records": sorted(part.records, key=lambda r: r["image"]),
               "thumbnails": dict(sorted(part.thumbnails.items()))}
        self._put(unit, page_part_rel(unit.index, page), json.dumps(doc, sort_keys=True).encode())

    def _write_part(self, unit: _Unit) -> None:
        records = sorted(unit.records, key=lambda r: r["image"])
        report = {
            "schema": SCHEMA_VERSION,
            "fingerprint": self.p.fingerprint,
            "model_fingerprint": self.p.model_fingerprint,
            "shard": unit.index,
            "images": len(records),
            "failed": sum(1 for r in records if "error" in r),
            "boxes": sum(len(r.get("detections", ())) for r in records),
            "records": records,
            "pages": unit.page_numbers,
            "page_size": self.p.page_size,
            "files": dict(sorted(unit.files.items())),
            "seconds": round(time.monotonic() - unit.started, 3),
        }
        self.store.put_bytes(part_key(self.p, unit.index),
                             json.dumps(report, sort_keys=True).encode())
        log.info("shard %d: %d images, %d failed, %d boxes (%.1fs)", unit.index,
                 report["images"], report["failed"], report["boxes"], report["seconds"])
        with self.lock:
            self.reports[unit.index] = report

    # -- the model, in the calling thread ----------------------------------------------------
    def _run_model(self, batch: list[tuple[int, Any, bytes]]) -> dict:
        import numpy as np
        import tensorflow as tf

        from petdet_tasks.export import INPUT_KEY, SIGNATURE_ENCODED, SIGNATURE_IMAGES

        started = time.perf_counter()
        shapes = {b[1].shape for b in batch}
        if len(shapes) == 1:  # one size: the uint8 signature, no second decode
            fn = self.model.signatures[SIGNATURE_IMAGES]
            out = fn(**{INPUT_KEY: tf.constant(np.stack([b[1] for b in batch]))})
            self.batches["uint8"] += 1
        else:  # mixed sizes: the encoded signature decodes each image at its own size
            fn = self.model.signatures[SIGNATURE_ENCODED]
            out = fn(**{INPUT_KEY: tf.constant([b[2] for b in batch], dtype=tf.string)})
            self.batches["encoded"] += 1
        result = {k: v.numpy() for k, v in out.items()}
        self.model_seconds += time.perf_counter() - started
        return result

    def _decode_error(self, data: bytes | None) -> str:
        import tensorflow as tf

        if data is None:
            return "undecodable: dropped by the input pipeline"
        try:
            tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
        except Exception as e:  # noqa: BLE001 - the reason is what we want
            return f"undecodable: {_tf_error_text(e)}"
        return "undecodable: failed in the input pipeline (decodes on its own: out of memory?)"

    def run(self, units: list[int]) -> None:
        import tensorflow as tf

        position = {it.key: i for i, it in enumerate(self.p.items)}
        for u in units:
            items = self.p.shard_items(u)
            unit = self.units[u] = _Unit(u, len(items))
            for it in items:
                page = position[it.key] // self.p.page_size + 1
                unit.pages.setdefault(page, _Page()).remaining += 1
                self.todo.append((u, it, page))
            unit.page_numbers = sorted(unit.pages)
        for u in units:
            if self.units[u].remaining == 0:
                self._write_part(self.units[u])
        if not self.todo:
            return
        raw: dict[int, bytes] = {}
        read_errors: dict[int, str] = {}
        fatal: list[BaseException] = []
        items = [it for _, it, _ in self.todo]

        def generate():
            try:
                for j, data, reason in _read_ahead(self.store, items):
                    if data is not None:
                        data, reason = _prepare(data)
                    if data is None:
                        read_errors[j] = reason or "unreadable"
                        continue
                    raw[j] = data
                    yield j, data
            except Exception as e:  # noqa: BLE001 - re-raised by the consumer
                fatal.append(e)

        def decode(j, data):
            return j, tf.io.decode_image(data, channels=3, dtype=tf.uint8,
                                         expand_animations=False)

        ds = tf.data.Dataset.from_generator(generate, output_signature=(
            tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.string)))
        # undecodable images are dropped here and found again by their missing index
        ds = ds.map(decode, num_parallel_calls=max(2, min(4, os.cpu_count() or 2)),
                    deterministic=True).ignore_errors().prefetch(2 * self.cfg.batch_size)
        # fixed parallelism and buffers, autotuning off: its optimisation thread sleeps up to
        # ~10 s between rounds and deleting the iterator waits for it (seen: a 9 s stall
        # after a third of the runs)
        options = tf.data.Options()
        options.autotune.enabled = False
        ds = ds.with_options(options)

        inflight: collections.deque[Future] = collections.deque()
        limit = 3 * self.cfg.batch_size
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="petdet-draw"
                                ) as pool:

            def submit(fn: Callable, *args) -> None:
                inflight.append(pool.submit(fn, *args))
                while len(inflight) > limit or (inflight and inflight[0].done()):
                    inflight.popleft().result()

            def fail_gap(j: int) -> None:
                reason = read_errors.pop(j, None) or self._decode_error(raw.pop(j, None))
                submit(self._finish_failure, j, reason)

            # Batching by size: images wait in one bucket per (height, width); a full bucket
            # runs through the uint8 signature (no second decode). When too many wait, the
            # oldest go together, mixed sizes, through the encoded signature; so do the odd
            # ones left at the end.
            size = self.cfg.batch_size
            waiting: collections.OrderedDict[int, tuple[int, Any, bytes]] = \
                collections.OrderedDict()  # j → (j, image, bytes), oldest first
            buckets: dict[tuple, list[int]] = {}  # (h, w, 3) → waiting indices

            def run_batch(js: list[int]) -> None:
                batch = [waiting.pop(j) for j in js]
                for j, image, _ in batch:
                    bucket = buckets[image.shape]
                    bucket.remove(j)
                    if not bucket:
                        del buckets[image.shape]
                out = self._run_model(batch)
                for i, (j, image, _) in enumerate(batch):
                    submit(self._finish_image, j, image, {k: v[i] for k, v in out.items()})

            def add(j: int, image, data: bytes) -> None:
                waiting[j] = (j, image, data)
                bucket = buckets.setdefault(image.shape, [])
                bucket.append(j)
                if len(bucket) >= size:
                    run_batch(list(bucket))
                elif len(waiting) >= 3 * size:
                    run_batch(list(waiting)[:size])

            expected = 0
            for j_t, image_t in ds:
                j = int(j_t)
                while expected < j:
                    fail_gap(expected)
                    expected += 1
                expected = j + 1
                add(j, image_t.numpy(), raw.pop(j))
            if fatal:
                raise fatal[0]
            for bucket in sorted(buckets.values(), key=len, reverse=True):
                if len(bucket) > 1:
                    run_batch(list(bucket))
            rest = list(waiting)
            for i in range(0, len(rest), size):
                run_batch(rest[i:i + size])
            while expected < len(self.todo):
                fail_gap(expected)
                expected += 1
            while inflight:
                inflight.popleft().result()


def _prepare(data: bytes) -> tuple[bytes | None, str | None]:
    """``(bytes to decode, None)`` or ``(None, reason)``, from the image's header alone
    (:func:`petdet_tasks.images.read_header`, the header reading of the tfrecords check):

    * over :data:`petdet_tasks.images.MAX_PIXELS` pixels: a failure (``image too large:
      ...``, the tfrecords quarantine reason) before any pixel is decoded;
    * transparent (an alpha channel, or a ``transparency`` entry on a palette, grey or RGB
      image, GIFs included): composited onto white exactly as the tfrecords step does for
      training (:func:`petdet_tasks.images._to_rgb`) and passed on as an RGB PNG, so that the
      model sees what it was trained on, whichever signature it goes through (the decoders
      drop alpha, and TF's GIF decoder makes transparent pixels black);
    * anything else (every JPEG, read without Pillow) as it is.
    """
    header = read_header(data)
    if header is None:  # no readable header: the decoder will say what is wrong
        return data, None
    if header.too_large:
        return None, header.too_large
    if not header.transparent:
        return data, None
    import io

    from PIL import Image

    from petdet_tasks.images import _to_rgb

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.seek(0)
            rgb, _ = _to_rgb(img, header.format)
            buf = io.BytesIO()
            rgb.save(buf, "PNG", compress_level=1)
    except Exception:  # noqa: BLE001 - undecodable: the decoder will say why
        return data, None
    return buf.getvalue(), None


def _load_model(path: Path):
    """The SavedModel at ``path``, loaded once per process (the last one is kept: a CLI run
    loads it once anyway; repeated runs in one process — tests, benchmarks — reuse it)."""
    import tensorflow as tf

    key = str(path)
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE.clear()
            _MODEL_CACHE[key] = tf.saved_model.load(key)
        return _MODEL_CACHE[key]


def _record_json(rec: dict) -> bytes:
    return (json.dumps(rec, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _finished_part(store: Store, p: DetectPlan, unit: int, listed: Callable[[], dict]
                   ) -> dict | None:
    """The shard's part report when it is there with every file it lists, else None."""
    try:
        report = json.loads(store.get_bytes(part_key(p, unit))[0])
    except NotFound:
        return None
    if report.get("fingerprint") != p.fingerprint:
        return None
    sizes = listed()
    missing = [rel for rel, e in report.get("files", {}).items()
               if sizes.get(p.prefix + rel) != e["size"]]
    if missing:
        log.warning("shard %d: part report found but %d of its files are missing or "
                    "different (e.g. %s); writing it again", unit, len(missing), missing[0])
        return None
    return report


def run_shards(store: Store, p: DetectPlan, units: Iterable[int], cfg: DetectConfig, *,
               cache_dir=None) -> list[dict]:
    """Detect on the given shards (one Airflow mapped task, or the CLI with every shard);
    returns their part reports (``records``, ``files``, counts, ``pages``; the thumbnails
    are in the per-page part files).

    Shards already written (part report + files present) are skipped without loading the
    model; the others run back to back through one pipeline (module doc)."""
    _check_config(p, cfg)
    units = [int(u) for u in units]
    bad = [u for u in units if u not in p.units]
    if bad:
        raise ValueError(f"shards {bad} are not in the plan (0..{len(p.units) - 1})")
    if p.cache_hit:
        log.info("cache hit: %s is complete; no shard to run", p.uri)
        return []
    cache: dict[str, dict] = {}

    def listed() -> dict:
        if "sizes" not in cache:
            cache["sizes"] = {o.key: o.size for o in store.list(p.prefix)}
        return cache["sizes"]

    reports: dict[int, dict] = {}
    todo = []
    for u in units:
        done = None if p.force else _finished_part(store, p, u, listed)
        if done is not None:
            log.info("shard %d already written (%d images); skipping", u, done["images"])
            reports[u] = done
        else:
            todo.append(u)
    if todo:
        from petdet_tasks.export import load_exported

        started = time.monotonic()
        # the model's local copy stays in the worker cache while the shards run
        with worker_cache.in_use(cache_root(cache_dir), ("models", p.model_fingerprint)):
            result, saved_model, labels = load_exported(store, p.model_uri, cache_dir)
            if result.fingerprint != p.model_fingerprint:
                raise StoreError(f"{p.model_uri} has fingerprint {result.fingerprint}, the "
                                 f"plan says {p.model_fingerprint}")
            model = _load_model(saved_model)
            runner = _ShardRunner(store, p, cfg, model, labels)
            n = sum(len(p.shard_items(u)) for u in todo)
            t0 = time.monotonic()
            runner.run(todo)
        secs = time.monotonic() - t0
        reports.update(runner.reports)
        LAST_RUN.clear()
        LAST_RUN.update(shards=todo, images=n, seconds=secs, model_seconds=runner.model_seconds,
                        batches=dict(runner.batches), load_seconds=t0 - started)
        log.info("shards %s: %d images in %.1fs (%.1f images/s; model %.1fs, %d uint8 + %d "
                 "encoded batches; model load %.1fs)", todo, n, secs,
                 n / secs if secs else math.inf, runner.model_seconds,
                 runner.batches["uint8"], runner.batches["encoded"], t0 - started)
    return [reports[u] for u in units]


# ---------------------------------------------------------------------------------------------
# Gather
# ---------------------------------------------------------------------------------------------

def _model_labels(store: Store, p: DetectPlan) -> LabelMap:
    key = step_prefix("export", p.model_fingerprint) + "label_map.pbtxt"
    return parse_label_map(store.read_text(key), source=store.uri(key))


def page_name(page: int) -> str:
    """``index.html`` for page 1, then ``gallery-002.html``, ..."""
    return "index.html" if page == 1 else f"gallery-{page:03d}.html"


def _href(folder: str, key: str, ext: str) -> str:
    return f"{folder}/{quote(key, safe='/')}{ext}"


def gallery_page(records: list[dict], thumbnails: dict[str, bytes], summary: dict, *,
                 title: str, page: int, pages: int, failures: bool) -> str:
    """The HTML of gallery page ``page`` of ``pages`` (every page linked from it): its cards,
    the summary's counts and, when there are failures, a link to :data:`FAILURES_PAGE`
    (the failure list itself is on that page only)."""
    names = [page_name(k + 1) for k in range(pages)]
    nav = [(str(k + 1), None if k + 1 == page else names[k]) for k in range(pages)] \
        if pages > 1 else []
    suffix = f" — page {page} of {pages}" if pages > 1 else ""
    return annotate.gallery_html(
        records, thumbnails, title=title + suffix, summary=summary,
        image_href=lambda k: _href("annotated", k, ".jpg"),
        json_href=lambda k: _href("images", k, ".json"), pages=nav,
        failures_href=FAILURES_PAGE if failures else None)


def _failure_reasons(failures: list[dict]) -> dict[str, int]:
    reasons = Counter(f["error"].split(":", 1)[0] for f in failures)
    return dict(sorted(reasons.items()))


def _read_part(store: Store, p: DetectPlan, unit: int) -> tuple[dict, bytes] | None:
    key = part_key(p, unit)
    try:
        data = store.get_bytes(key)[0]
    except NotFound:
        return None
    report = json.loads(data)
    if (report.get("fingerprint") != p.fingerprint or report.get("shard") != unit
            or report.get("page_size") != p.page_size):
        raise StoreError(f"{store.uri(key)} is not shard {unit} of {p.uri}")
    return report, data


def _read_page_parts(store: Store, p: DetectPlan, page: int
                     ) -> tuple[list[dict], dict[str, bytes]]:
    """The records (sorted by key) and thumbnails of gallery page ``page``, from the page part
    files of the shards that have images on it; checked against the plan."""
    items = p.page_items(page)
    records: list[dict] = []
    thumbnails: dict[str, bytes] = {}
    for unit in sorted({it.shard for it in items}):
        rel = page_part_rel(unit, page)
        doc = json.loads(store.get_bytes(p.prefix + rel)[0])
        if (doc.get("fingerprint") != p.fingerprint or doc.get("shard") != unit
                or doc.get("page") != page):
            raise StoreError(f"{store.uri(p.prefix + rel)} is not page {page} of shard {unit} "
                             f"of {p.uri}")
        records.extend(doc["records"])
        thumbnails.update((k, base64.b64decode(v)) for k, v in doc["thumbnails"].items())
    records.sort(key=lambda r: r["image"])
    if [r["image"] for r in records] != [it.key for it in items]:
        raise StoreError(f"the page part files of page {page} of {p.uri} do not hold that "
                         "page's images: run the shard tasks again (force)")
    return records, thumbnails


def gather(store: Store, p: DetectPlan, cfg: DetectConfig, *, run_id: str | None = None
           ) -> StepResult:
    """Commit the step: every shard present and complete, the merged files and the gallery
    written, the shard-written files registered, manifest last.

    Streams, so that it never holds every record and thumbnail at once: the part reports
    are read one at a time (files registered, listing coverage checked, summary counted),
    then each gallery page is built from its own page part files alone, written, and its
    records appended to ``detections.jsonl`` / ``detections.csv`` (local temporary files,
    uploaded at the end). The failure list goes to ``failures.html`` (and ``summary.json``),
    which every page links to, instead of onto every page."""
    _check_config(p, cfg)

    def body(writer: StepWriter) -> dict:
        labels = _model_labels(store, p)
        counter = annotate.SummaryCounter(labels)
        missing = []
        lost, dupes, extra = [], [], []
        for u in p.units:
            found = _read_part(store, p, u)
            if found is None:
                missing.append(u)
                continue
            report, data = found
            for rel, e in report["files"].items():
                writer.register(rel, FileEntry(e["size"], e["sha256"]))
            writer.register(part_key(p, u)[len(p.prefix):], FileEntry(len(data), _sha256(data)))
            seen = Counter(r["image"] for r in report["records"])
            planned = {it.key for it in p.shard_items(u)}
            lost += sorted(planned - set(seen))
            dupes += sorted(k for k, n in seen.items() if n > 1)
            extra += sorted(set(seen) - planned)
            for rec in report["records"]:
                counter.add(rec)
            del report, data
        register_plan_record(writer)
        if missing:
            raise StoreError(f"{len(missing)} of {len(p.units)} shards of {p.uri} are not "
                             f"written yet (shards {missing[:10]}); run the shard tasks first")
        if dupes or lost or extra:
            raise StoreError(f"the shards of {p.uri} do not cover the listing: "
                             f"{len(lost)} images without a record (e.g. {lost[:3]}), "
                             f"{len(dupes)} with several ({dupes[:3]}), "
                             f"{len(extra)} not listed ({extra[:3]})")
        summary = counter.summary()
        failures = summary["failures"]
        failures.sort(key=lambda f: f["image"])  # counted shard by shard
        on_pages = {k: v for k, v in summary.items() if k != "failures"}
        title = f"petdet detections — {summary['images']} images"
        names = [page_name(k + 1) for k in range(p.pages)]
        with tempfile.TemporaryDirectory(prefix="petdet-gather-") as tmp:
            jsonl_path, csv_path = Path(tmp, "detections.jsonl"), Path(tmp, "detections.csv")
            with open(jsonl_path, "wb") as jsonl, open(csv_path, "wb") as csv:
                for page in range(1, p.pages + 1):
                    records, thumbnails = _read_page_parts(store, p, page)
                    jsonl.write(annotate.records_to_jsonl(records))
                    csv.write(annotate.records_to_csv(records, header=page == 1))
                    html = gallery_page(records, thumbnails, on_pages, title=title, page=page,
                                        pages=p.pages, failures=bool(failures))
                    del records, thumbnails
                    writer.put_bytes(names[page - 1], html.encode("utf-8"))
                    del html
            writer.put_file("detections.jsonl", jsonl_path)
            writer.put_file("detections.csv", csv_path)
        if failures:
            writer.put_bytes(FAILURES_PAGE, annotate.failures_html(
                failures, title=f"petdet detections — {len(failures)} failed images",
                json_href=lambda k: _href("images", k, ".json"), back_href="index.html",
            ).encode("utf-8"))
        summary_json = {
            **summary,
            "failure_reasons": _failure_reasons(failures),
            "model_uri": p.model_uri,
            "model_fingerprint": p.model_fingerprint,
            "input": p.images,
            "not_images": p.not_images,
            "config": p.config,
            "shards": len(p.units),
            "pages": names,
            "failures_page": FAILURES_PAGE if failures else None,
        }
        writer.put_json("summary.json", summary_json)
        not_taken = (f"; {_describe_not_images(p.not_images)}" if p.not_images["count"]
                     else "")
        log.info("detect: %d images, %d with detections, %d boxes, %d failed (%s)%s; "
                 "gallery %s", summary["images"], summary["images_with_detections"],
                 summary["boxes"], summary["failed"],
                 summary_json["failure_reasons"] or "no failures", not_taken,
                 writer.uri("index.html"))
        return {"images": summary["images"],
                "images_with_detections": summary["images_with_detections"],
                "boxes": summary["boxes"], "failed": summary["failed"],
                "not_images": p.not_images["count"],
                "gallery": "index.html", "pages": p.pages, "shards": len(p.units),
                "model_uri": p.model_uri, "model_fingerprint": p.model_fingerprint}

    return run_step(store, STEP, SCHEMA_VERSION, inputs=p.inputs, config=p.config, body=body,
                    force=p.force, resume=True, force_clears=False, fp=p.fingerprint,
                    run_id=run_id,
                    extra_manifest={"detect_config": cfg.to_dict(), "input": p.images})


# ---------------------------------------------------------------------------------------------
# Everything in one call (the CLI)
# ---------------------------------------------------------------------------------------------

def detect(store: Store, model_uri: str | None, images: str | None,
           cfg: DetectConfig | None = None, *, cache_dir=None, run_id: str | None = None,
           force: bool = False) -> StepResult:
    """plan → every shard (one process, one pipeline) → gather."""
    cfg = (cfg or DetectConfig()).validate()
    p = plan(store, model_uri, images, cfg, force=force)
    log.info("%s: %d images from the %s in %d shards, model %s%s", p.uri, len(p.items),
             p.images, len(p.units), p.model_uri, " (cache hit)" if p.cache_hit else "")
    if not p.cache_hit:
        run_shards(store, p, p.units, cfg, cache_dir=cache_dir)
    return gather(store, p, cfg, run_id=run_id)
