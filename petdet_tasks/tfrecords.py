"""The TFRecord step: ``create_pet_tf_record.py`` done right.

Three phases, so that Airflow can map the middle one over shard groups:

* :func:`plan` — reads the dataset's list files (and the optional extra labelled data), assigns
  every trainval image to train/val by a stable hash of its name and to a shard by another,
  computes the fingerprint, and returns the shard units. No image is read.
* :func:`write_shards` — for each unit ``(split, index)``: reads its images and XMLs from the
  store, checks every image (:mod:`petdet_tasks.images`: format lies, CMYK/alpha repaired,
  truncated/undecodable quarantined), clips boxes and drops degenerate ones, builds the OD API
  ``tf.Example`` (:mod:`petdet_tasks.tfexample`, no TensorFlow import) and uploads
  ``<split>-0000i-of-000NN.tfrecord`` plus a part report ``_parts/<split>-0000i.json``. A unit
  whose part report is already there with its shard file is skipped (retries redo nothing).
* :func:`gather` — under the commit protocol: checks every unit is present, merges the part
  reports into ``data_report.json``, applies the quality gate, writes ``label_map.pbtxt`` and
  the manifest.

:func:`build` runs all three, the middle one in several processes (the CLI): the calling one and
forked workers taking shards from a shared counter.

Splits are stable: an image's split depends only on its name and ``val_fraction``, so adding
images never moves an existing image to the other split. Nothing is skipped without a line in
``data_report.json``.

Within a shard the records are in the order of a third hash of the name, not by name: the
Oxford names start with the breed, so name order puts each breed in one run, and a reader that
interleaves a few shards would see batches of one or two breeds (the OD API's script shuffles
its examples before writing for the same reason). The order is still fixed by the names, so a
rebuild writes the same bytes.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import multiprocessing
import os
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from lxml import etree

from petdet_tasks.breeds import BREEDS, breed_id, breed_of, class_id, species
from petdet_tasks.errors import ConfigError, PermanentError
from petdet_tasks.images import CHECK_MODES, check_image
from petdet_tasks.label_map import LabelMap, load_label_map, pets_label_map
from petdet_tasks.layout import PLAN, decode_list_file, fingerprint, step_prefix
from petdet_tasks.manifest import (
    PlanMismatch,
    StepResult,
    StepWriter,
    load_output,
    read_manifest,
    read_plan_record,
    register_plan_record,
    run_step,
    save_plan_record,
)
from petdet_tasks.store import (
    FileEntry,
    NotFound,
    S3Store,
    Store,
    StoreError,
    _check_key,
    _redact,
    open_store,
)
from petdet_tasks.tfexample import TFRecordWriter, encode_od_example

log = logging.getLogger(__name__)

STEP = "tfrecords"
SCHEMA_VERSION = 2  # 2: records within a shard in name-hash order (1: by name)
SPLITS = ("train", "val")
PARTS = "_parts/"
HIST_BINS = 10


class DataQualityError(PermanentError, ValueError):
    """The data failed the quality gate; the message says which rule and the numbers."""


@dataclass(frozen=True)
class TFRecordConfig:
    """:param num_shards: shards per split (``train-00000-of-000NN.tfrecord``).
    :param val_fraction: share of trainval images that go to val (stable by name hash).
    :param check: ``header`` (cheap: header + end-of-image marker) or ``full`` (decode pixels).
    :param max_quarantine_fraction: fail when more of the labelled images are quarantined.
    :param classes: ``all`` — every label-map class must have training examples; ``present``
        — the written label map keeps only the classes that have (ids unchanged), e.g. for a
        sample with a few breeds.
    :param label_map: a label-map file (OD API text format); default: the 37 pets breeds.
    :param extra_data: a prefix in the same store laid out like the dataset (``images/``,
        ``annotations/xmls/``, ``annotations/trainval.txt`` or ``list.txt``), merged in.
    :param jpeg_quality: quality of re-encoded (repaired) images.
    """

    num_shards: int = 10
    val_fraction: float = 0.3
    check: str = "header"
    max_quarantine_fraction: float = 0.01
    classes: str = "all"
    label_map: str | None = None
    extra_data: str | None = None
    jpeg_quality: int = 95
    force: bool = False

    def validate(self) -> TFRecordConfig:
        problems = []
        if not (isinstance(self.num_shards, int) and 1 <= self.num_shards <= 10_000):
            problems.append(f"num_shards must be an integer in 1..10000, got {self.num_shards!r}")
        if not (0.0 < float(self.val_fraction) < 1.0):
            problems.append(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.check not in CHECK_MODES:
            problems.append(f"check must be one of {CHECK_MODES}, got {self.check!r}")
        if not (0.0 <= float(self.max_quarantine_fraction) <= 1.0):
            problems.append("max_quarantine_fraction must be in [0, 1], got "
                            f"{self.max_quarantine_fraction!r}")
        if self.classes not in ("all", "present"):
            problems.append(f"classes must be 'all' or 'present', got {self.classes!r}")
        if not (50 <= int(self.jpeg_quality) <= 100):
            problems.append(f"jpeg_quality must be in 50..100, got {self.jpeg_quality!r}")
        if problems:
            raise ConfigError("invalid tfrecords config: " + "; ".join(problems), problems)
        return self

    @classmethod
    def from_dict(cls, values: dict) -> TFRecordConfig:
        """From loosely typed values (CLI, Airflow params rendered as text): coerced, validated;
        unknown keys are an error, empty strings mean "not set"."""
        fields = {f.name: f for f in cls.__dataclass_fields__.values()}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(f"unknown tfrecords config keys {unknown}; expected some of "
                              f"{sorted(fields)}")
        out = {}
        for k, v in values.items():
            if v is None or (isinstance(v, str) and v.strip() in ("", "None")):
                continue
            kind = type(getattr(cls, k))
            if kind is bool:
                out[k] = v if isinstance(v, bool) else str(v).strip().lower() in (
                    "1", "true", "yes", "on")
            elif kind in (int, float):
                try:
                    out[k] = kind(v)
                except (TypeError, ValueError):
                    raise ConfigError(f"tfrecords config {k}={v!r}: expected "
                                      f"{kind.__name__}") from None
            else:
                out[k] = str(v)
        return cls(**out).validate()

    def label_map_obj(self) -> LabelMap:
        return load_label_map(self.label_map) if self.label_map else pets_label_map()


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------

class Example(NamedTuple):
    """One labelled image to write: where its bytes are and where it goes."""

    name: str
    image_key: str
    xml_key: str
    source: str  # "dataset" or "extra"
    sha256: str | None  # the image's sha256 in the dataset manifest (None: extra data)
    split: str
    shard: int


@dataclass
class Plan:
    fingerprint: str
    uri: str
    prefix: str
    cache_hit: bool
    units: list[tuple[str, int]]
    examples: list[Example] = field(repr=False)  # sorted by name
    skipped: dict[str, list[dict]]  # reason → [{"name", "detail"}]: never silent
    config: dict
    inputs: dict
    # reason → [{"name", "detail"}]: images written, with something about them to report
    noted: dict[str, list[dict]] = field(default_factory=dict)
    by_unit: dict[tuple[str, int], list[Example]] = field(repr=False, init=False)

    def __post_init__(self) -> None:
        # grouped once: a shard writer then touches only its own examples (no scan of all of
        # them per shard, and no write to the rest's shared pages in a forked worker)
        self.by_unit = {u: [] for u in self.units}
        for e in self.examples:
            self.by_unit[e.split, e.shard].append(e)

    def groups(self, n_groups: int) -> list[list[list]]:
        """The units split into ``n_groups`` JSON-able groups (for Airflow's ``expand``)."""
        n = max(1, min(n_groups, len(self.units)))
        return [[list(u) for u in self.units[i::n]] for i in range(n)]


def _name_hash(name: str) -> tuple[int, int]:
    """Two independent 64-bit numbers from the image name: (split draw, shard draw)."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:16], "big")


def split_of(name: str, val_fraction: float) -> str:
    """``val`` when the name's hash falls below ``val_fraction``: independent of other images."""
    return "val" if _name_hash(name)[0] < val_fraction * 2**64 else "train"


def shard_of(name: str, num_shards: int) -> int:
    return _name_hash(name)[1] % num_shards


def record_order(ex: Example) -> bytes:
    """Where an example goes within its shard: a hash of its name independent of the split
    and shard draws (module doc)."""
    return hashlib.sha256(b"order\0" + ex.name.encode()).digest()


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def splits_of(files: Mapping[str, object]) -> list[str]:
    """The splits whose shards a tfrecords output's manifest ``files`` list, sorted."""
    return sorted({rel.split("-", 1)[0] for rel in files if rel.endswith(".tfrecord")})


def _id_columns(breed: str) -> tuple[str, str, str] | None:
    """CLASS-ID, SPECIES, BREED-ID that the list files give a breed (None: not an Oxford one)."""
    if breed not in BREEDS:
        return None
    return str(class_id(breed)), str(species(breed)), str(breed_id(breed))


def _listed_files(store: Store, base: str) -> dict[str, None]:
    """The files under ``base`` (relative), in the shape of a manifest's ``files`` without the
    recorded hashes."""
    return {o.key[len(base):]: None for o in store.list(base)}


def _prefix_digest(store: Store, prefix: str) -> str:
    """Content digest of everything under an (extra data) prefix."""
    h = hashlib.sha256()
    n = 0
    for obj in store.list(prefix):
        tag = obj.etag or hashlib.sha256(store.get_bytes(obj.key)[0]).hexdigest()
        h.update(f"{obj.key[len(prefix):]}\0{obj.size}\0{tag}\n".encode())
        n += 1
    if n == 0:
        raise StoreError(f"extra data prefix {store.uri(prefix)} is empty")
    return h.hexdigest()


def _extra_prefix(store: Store, extra: str) -> str:
    root = store.root.rstrip("/") + "/"
    rel = extra[len(root):] if extra.startswith(root) else extra
    problem = None
    if "://" in rel or rel.startswith("/"):
        problem = "it is outside the store"
    else:
        rel = rel.strip("/") + "/"
        try:
            _check_key(rel)
        except ValueError as e:
            problem = str(e)
    if problem:
        raise ConfigError(f"extra_data (--extra-data) {_redact(extra)!r} must be a prefix "
                          f"inside the store {store.root}: {problem}")
    return rel


_ABSENT = object()


def _examples_from(store: Store, base: str, files: Mapping[str, dict | None], source: str,
                   cfg: TFRecordConfig, labels: LabelMap, skipped: dict[str, list],
                   noted: dict[str, list]) -> list[Example]:
    """The examples of one source. ``files``: relative path → its manifest entry (whose
    ``sha256`` the shard writer checks the image against) or None where no hash is recorded.

    Each line of the list file must be ``IMAGE CLASS-ID SPECIES BREED-ID``; the breed comes
    from the image name (as in the OD API's script). A line of other columns is skipped
    (``malformed_list_line``), a name listed again is written once (``duplicate_list_line``),
    and ID columns that disagree with the name's breed are noted (``list_ids_disagree``)."""
    list_file = next((f for f in ("annotations/trainval.txt", "annotations/list.txt")
                      if f in files), None)
    if list_file is None:
        raise FileNotFoundError(f"{store.uri(base)}: no annotations/trainval.txt or list.txt")
    text = decode_list_file(store.get_bytes(base + list_file)[0], store.uri(base + list_file))
    val_cut = cfg.val_fraction * 2**64
    num_shards = cfg.num_shards
    out: list[Example] = []
    # breed → the ID columns its lines should have (an Oxford breed's own, else the first
    # line's); a breed is in it once checked against the label map
    known: dict[str, tuple[str, ...]] = {}
    first_line: dict[str, int] = {}  # name → the line that listed it first
    sha256, from_bytes, new_example = hashlib.sha256, int.from_bytes, tuple.__new__
    for line_no, line in enumerate(text.splitlines(), 1):  # per image, in the serial plan:
        cols = line.split()                                # kept lean (no per-line strings)
        if not cols or cols[0][0] == "#":
            continue
        name = cols[0]
        if len(cols) != 4:
            skipped.setdefault("malformed_list_line", []).append({
                "name": name, "detail": f"{list_file} line {line_no} is {' '.join(cols)!r}: "
                "expected IMAGE CLASS-ID SPECIES BREED-ID"})
            continue
        if first_line.setdefault(name, line_no) != line_no:
            skipped.setdefault("duplicate_list_line", []).append({
                "name": name, "detail": f"{list_file} line {line_no} lists it again (first on "
                f"line {first_line[name]}): written once"})
            continue
        breed, sep, num = name.rpartition("_")
        if not (sep and num.isdigit() and breed in known):  # the slow path once per breed
            try:
                breed = breed_of(name)
                labels.id_of(breed)
            except (KeyError, ValueError) as e:
                skipped.setdefault("unknown_class", []).append({"name": name, "detail": str(e)})
                continue
            if breed not in known:
                known[breed] = _id_columns(breed) or tuple(cols[1:])
        ids = known[breed]
        if ids[0] != cols[1] or ids[1] != cols[2] or ids[2] != cols[3]:  # the file name wins
            problem = _id_problem(cols[1:], ids, breed)
            if problem is not None:
                kind, detail = problem
                (skipped if kind == "malformed_list_line" else noted).setdefault(kind, []).append(
                    {"name": name, "detail": f"{list_file} line {line_no}: {detail}"})
                if kind == "malformed_list_line":
                    continue
        image = "images/" + name + ".jpg"
        xml = "annotations/xmls/" + name + ".xml"
        entry = files.get(image, _ABSENT)
        if entry is _ABSENT:
            skipped.setdefault("missing_image", []).append(
                {"name": name, "detail": f"{list_file} lists it but {image} is absent"})
            continue
        if xml not in files:
            skipped.setdefault("missing_xml", []).append(
                {"name": name, "detail": f"no {xml}: no box to train on"})
            continue
        digest = sha256(name.encode()).digest()  # _name_hash, inlined
        out.append(new_example(Example, (
            name, base + image, base + xml, source, entry.get("sha256") if entry else None,
            "val" if from_bytes(digest[:8], "big") < val_cut else "train",
            from_bytes(digest[8:16], "big") % num_shards)))
    return out


def _id_problem(cols: list[str], ids: tuple[str, ...], breed: str) -> tuple[str, str] | None:
    """Why a line's ID columns differ from the breed's (None: the same numbers written
    differently, e.g. ``01``). ``malformed_list_line`` (not numbers: the line is skipped) or
    ``list_ids_disagree`` (the image is kept, with the breed its file name says)."""
    try:
        got = [int(c) for c in cols]
    except ValueError:
        return ("malformed_list_line",
                f"{' '.join(cols)!r} are not CLASS-ID SPECIES BREED-ID numbers")
    if got == [int(i) for i in ids]:
        return None
    return ("list_ids_disagree",
            f"CLASS-ID SPECIES BREED-ID are {' '.join(cols)}, the file name's breed {breed} has "
            f"{' '.join(ids)}; the file name's breed is used")


def plan(store: Store, dataset_uri: str, cfg: TFRecordConfig) -> Plan:
    """Decide every example's split and shard and the output fingerprint (module doc)."""
    cfg.validate()
    labels = cfg.label_map_obj()
    dataset = load_output(store, dataset_uri, expect_step="download")
    base = step_prefix("download", dataset.fingerprint)
    skipped: dict[str, list] = {}
    noted: dict[str, list] = {}
    examples = _examples_from(store, base, dataset.manifest["files"], "dataset", cfg, labels,
                              skipped, noted)
    inputs = {"dataset": dataset.fingerprint}
    if cfg.extra_data:
        extra = _extra_prefix(store, cfg.extra_data)
        inputs["extra_data"] = _prefix_digest(store, extra)
        extra_examples = _examples_from(store, extra, _listed_files(store, extra), "extra",
                                        cfg, labels, skipped, noted)
        clash = sorted({e.name for e in examples} & {e.name for e in extra_examples})
        if clash:
            raise DataQualityError(
                f"extra data {store.uri(extra)} repeats {len(clash)} dataset image names "
                f"(e.g. {', '.join(clash[:5])}): rename them so every image has one label")
        examples += extra_examples
    examples.sort(key=lambda e: e.name)
    config = {
        "num_shards": cfg.num_shards, "val_fraction": cfg.val_fraction, "check": cfg.check,
        "classes": cfg.classes, "label_map": labels.to_json(), "jpeg_quality": cfg.jpeg_quality,
    }
    fp = fingerprint(STEP, SCHEMA_VERSION, inputs, config)
    prefix = step_prefix(STEP, fp)
    cache_hit = not cfg.force and read_manifest(store, prefix) is not None
    units = [(s, i) for s in SPLITS for i in range(cfg.num_shards)]
    return Plan(fp, store.uri(prefix.rstrip("/")), prefix, cache_hit, units, examples, skipped,
                config, inputs, noted)


def save_plan(store: Store, p: Plan) -> str:
    """Record the plan (every example's split and shard, what was skipped, the inputs) for
    Airflow's shard tasks and gather (:func:`petdet_tasks.manifest.save_plan_record`: the
    extra-data prefix may gain images meanwhile); returns its key. A cache hit needs none."""
    return save_plan_record(store, p.prefix, {
        "schema": 1, "fingerprint": p.fingerprint, "units": [list(u) for u in p.units],
        "examples": [list(e) for e in p.examples], "skipped": p.skipped, "noted": p.noted,
        "config": p.config, "inputs": p.inputs})


def load_plan(store: Store, fp: str, *, force: bool = False) -> Plan:
    """The plan :func:`save_plan` recorded for ``tfrecords/<fp>``; for a complete output
    without one (a cache hit, or built by the CLI), the plan its manifest describes."""
    doc, manifest, cache_hit = read_plan_record(store, STEP, fp, force=force)
    prefix = step_prefix(STEP, fp)
    uri = store.uri(prefix.rstrip("/"))
    if doc is None:
        units = [(s, i) for s in SPLITS for i in range(int(manifest["config"]["num_shards"]))]
        return Plan(fp, uri, prefix, True, units, [], {}, manifest["config"],
                    manifest["inputs"], {})
    if fingerprint(STEP, SCHEMA_VERSION, doc["inputs"], doc["config"]) != fp:
        raise PlanMismatch(f"{store.uri(prefix + PLAN)} does not describe {uri}: run the "
                           "plan task again")
    return Plan(fp, uri, prefix, cache_hit, [(s, int(i)) for s, i in doc["units"]],
                [Example(*e) for e in doc["examples"]], doc["skipped"], doc["config"],
                doc["inputs"], doc["noted"])


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------

# built at import, so that forked shard workers inherit it ready
_XML_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                              dtd_validation=False, huge_tree=False, remove_comments=True,
                              remove_pis=True)


def parse_voc(data: bytes) -> dict:
    """A PASCAL VOC annotation → ``{"width", "height", "objects": [...]}``, safely parsed
    (no entity expansion, no DTD, no network). Raises ValueError naming what is wrong."""
    try:
        root = etree.fromstring(data, _XML_PARSER)
    except etree.XMLSyntaxError as e:
        raise ValueError(f"not well-formed XML: {e}") from None
    if root.tag != "annotation":
        raise ValueError(f"root element is <{root.tag}>, expected <annotation>")

    # an entity reference is left unexpanded: a field holding one has a child node, which a
    # child's .text does not show ("<xmin>&x;</xmin>" would read as a missing <xmin>)
    entities = b"&" in data and next(root.iter(etree.Entity), None) is not None

    def texts(node) -> dict:
        # one pass over the children: much cheaper than an ElementPath lookup per field
        if node is None:
            return {}
        if not entities:
            return {c.tag: c.text for c in node}
        return {c.tag: _as_written(c) for c in node}

    def num(values: dict, tag: str, kind=float):
        value = values.get(tag)
        if value is None or not value.strip():
            raise ValueError(f"missing <{tag}>" if tag not in values else f"<{tag}> is empty")
        try:
            number = float(value)
        except ValueError:
            hint = " (entities are not expanded)" if "&" in value else ""
            raise ValueError(f"<{tag}> is {value.strip()!r}, expected a number{hint}") from None
        if not math.isfinite(number):  # nan, inf, 1e400: no box, no size
            raise ValueError(f"<{tag}> is {value.strip()!r}, expected a finite number")
        return kind(number)

    def flag(values: dict, tag: str) -> int:
        value = (values.get(tag) or "0").strip() or "0"
        if value not in ("0", "1"):
            hint = " (entities are not expanded)" if "&" in value else ""
            raise ValueError(f"<{tag}> is {value!r}, expected 0 or 1{hint}")
        return int(value)

    top = {c.tag: c for c in root}
    size = texts(top.get("size"))
    width = num(size, "width", int) if "width" in size else None
    height = num(size, "height", int) if "height" in size else None
    objects = []
    for obj in root.iterchildren("object"):
        fields = {c.tag: c for c in obj}
        if "bndbox" not in fields:
            raise ValueError("an <object> has no <bndbox>")
        box = texts(fields["bndbox"])
        values = texts(obj)
        objects.append({
            "xmin": num(box, "xmin"), "ymin": num(box, "ymin"),
            "xmax": num(box, "xmax"), "ymax": num(box, "ymax"),
            "difficult": flag(values, "difficult"),
            "truncated": flag(values, "truncated"),
            "pose": (values.get("pose") or "").strip() or "Unspecified",
        })
    return {"width": width, "height": height, "objects": objects}


def _as_written(el) -> str | None:
    """An element's text with its unexpanded entity references (``&x;``) and child elements
    shown as written, for messages; its plain ``.text`` when it has no child."""
    if not len(el):
        return el.text
    parts = [el.text or ""]
    for c in el:
        parts.append(c.text if c.tag is etree.Entity else f"<{c.tag}>...</{c.tag}>")
        parts.append(c.tail or "")
    return "".join(parts)


class _Hist:
    """Mergeable summary of values in [0, 1]: count, min, max, mean, fixed-bin histogram."""

    @staticmethod
    def empty() -> dict:
        return {"count": 0, "min": None, "max": None, "sum": 0.0, "bins": [0] * HIST_BINS}

    @staticmethod
    def add(h: dict, v: float) -> None:
        h["count"] += 1
        h["sum"] += v
        h["min"] = v if h["min"] is None else min(h["min"], v)
        h["max"] = v if h["max"] is None else max(h["max"], v)
        h["bins"][min(HIST_BINS - 1, int(v * HIST_BINS))] += 1

    @staticmethod
    def merge(a: dict, b: dict) -> dict:
        if b["count"] == 0:
            return a
        if a["count"] == 0:
            return dict(b, bins=list(b["bins"]))
        return {"count": a["count"] + b["count"], "min": min(a["min"], b["min"]),
                "max": max(a["max"], b["max"]), "sum": a["sum"] + b["sum"],
                "bins": [x + y for x, y in zip(a["bins"], b["bins"], strict=True)]}

    @staticmethod
    def final(h: dict) -> dict:
        out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()
               if k != "sum"}
        out["mean"] = round(h["sum"] / h["count"], 4) if h["count"] else None
        out["bin_edges"] = [round(i / HIST_BINS, 2) for i in range(HIST_BINS + 1)]
        return out


def build_example(name: str, image_bytes: bytes, xml_bytes: bytes, labels: LabelMap,
                  cfg: TFRecordConfig, report: dict, *, image_sha256: str | None = None
                  ) -> bytes | None:
    """The OD API tf.Example for one image, or None when it is quarantined (reason in report).

    Boxes are normalised by the real image size (the XML's is only checked), clipped to the
    image, and dropped when degenerate; every such event is counted in ``report``.
    ``image_sha256`` (of ``image_bytes``, when the caller has it) saves hashing them again.
    """
    check = check_image(image_bytes, name=name, mode=cfg.check, jpeg_quality=cfg.jpeg_quality)
    if check.status == "quarantined":
        report["quarantined"].append({"name": name, "reason": check.reason})
        return None
    try:
        voc = parse_voc(xml_bytes)
    except ValueError as e:
        report["quarantined"].append({"name": name, "reason": f"bad XML: {e}"})
        return None
    if check.status == "repaired":
        report["repaired"].append({"name": name, "reason": check.reason})
    width, height = check.width, check.height
    if (voc["width"], voc["height"]) != (width, height):
        report["size_mismatch"].append({"name": name, "xml": [voc["width"], voc["height"]],
                                        "image": [width, height]})
    breed = breed_of(name)
    label = labels.id_of(breed)
    xmin, ymin, xmax, ymax, difficult, truncated, poses = [], [], [], [], [], [], []
    for obj in voc["objects"]:
        raw = (obj["xmin"] / width, obj["ymin"] / height, obj["xmax"] / width,
               obj["ymax"] / height)
        box = tuple(min(1.0, max(0.0, v)) for v in raw)
        if box != raw:
            report["clipped"].append({"name": name, "box": [round(v, 4) for v in raw]})
        if (box[2] - box[0]) * width < 1.0 or (box[3] - box[1]) * height < 1.0:
            report["dropped"].append({"name": name, "box": [round(v, 4) for v in raw],
                                      "reason": "degenerate box (under 1 px wide or high)"})
            continue
        xmin.append(box[0])
        ymin.append(box[1])
        xmax.append(box[2])
        ymax.append(box[3])
        difficult.append(obj["difficult"])
        truncated.append(obj["truncated"])
        poses.append(obj["pose"])
        w, h = box[2] - box[0], box[3] - box[1]
        _Hist.add(report["box_width"], w)
        _Hist.add(report["box_height"], h)
        _Hist.add(report["box_area"], w * h)
    if not xmin:
        report["no_boxes"].append(name)
    data = check.data
    if image_sha256 is None or data is not image_bytes:
        image_sha256 = hashlib.sha256(data).hexdigest()
    filename = f"{name}.jpg"
    report["per_class"][breed] = report["per_class"].get(breed, 0) + 1
    report["boxes"] += len(xmin)
    breed_b = breed.encode()
    return encode_od_example(
        height=height, width=width, filename=filename.encode(), sha256=image_sha256.encode(),
        encoded=data, image_format=b"jpeg", xmin=xmin, xmax=xmax, ymin=ymin, ymax=ymax,
        texts=[breed_b] * len(xmin), labels=[label] * len(xmin), difficult=difficult,
        truncated=truncated, views=[v.encode() for v in poses])


def _new_report(split: str, index: int) -> dict:
    return {"split": split, "shard": index, "examples": 0, "boxes": 0, "per_class": {},
            "repaired": [], "quarantined": [], "size_mismatch": [], "clipped": [], "dropped": [],
            "no_boxes": [], "box_width": _Hist.empty(), "box_height": _Hist.empty(),
            "box_area": _Hist.empty()}


def _read_pairs(store: Store, keys: list[tuple[str, str]], window: int = 16
                ) -> Iterator[tuple[bytes, bytes]]:
    """(image, xml) bytes in order; from a remote store fetched ahead by a few threads (S3
    latency hidden), from a local one read directly (threads would only add overhead)."""
    if not store.remote:
        for image_key, xml_key in keys:
            yield store.get_bytes(image_key)[0], store.get_bytes(xml_key)[0]
        return
    if not keys:
        return
    with ThreadPoolExecutor(max_workers=min(8, window)) as pool:
        futures = []
        it = iter(keys)
        for pair in it:
            futures.append((pool.submit(store.get_bytes, pair[0]),
                            pool.submit(store.get_bytes, pair[1])))
            if len(futures) >= window:
                break
        while futures:
            fi, fx = futures.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                futures.append((pool.submit(store.get_bytes, nxt[0]),
                                pool.submit(store.get_bytes, nxt[1])))
            yield fi.result()[0], fx.result()[0]


def write_shard(store: Store, p: Plan, split: str, index: int, cfg: TFRecordConfig) -> dict:
    """Write one shard + its part report (skipped when both are already there)."""
    n = cfg.num_shards
    rel = shard_name(split, index, n)
    part_key = f"{p.prefix}{PARTS}{split}-{index:05d}.json"
    try:
        existing = json.loads(store.get_bytes(part_key)[0])
        listed = {o.key: o.size for o in store.list(p.prefix + rel)}
        if not cfg.force and listed.get(p.prefix + rel) == existing["file"]["size"]:
            log.info("%s already written (%d examples); skipping", rel, existing["examples"])
            return existing
    except NotFound:
        pass
    mine = p.by_unit.get((split, index))
    if mine is None:
        raise ValueError(f"{split}-{index} is not a shard of this plan: splits {SPLITS}, "
                         f"shards 0..{n - 1}")
    mine = sorted(mine, key=record_order)  # breeds mixed (module doc)
    labels = cfg.label_map_obj()
    report = _new_report(split, index)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="petdet-shard-", dir=store.scratch_dir()) as tmp:
        local = Path(tmp) / rel
        with TFRecordWriter(local) as writer:
            pairs = _read_pairs(store, [(e.image_key, e.xml_key) for e in mine])
            for ex, (image, xml) in zip(mine, pairs, strict=True):
                sha = hashlib.sha256(image).hexdigest()
                _verify_source(ex, sha)
                record = build_example(ex.name, image, xml, labels, cfg, report,
                                       image_sha256=sha)
                if record is not None:
                    writer.write(record)
                    report["examples"] += 1
        entry = store.put_file(p.prefix + rel, local, move=True,
                               entry=FileEntry(writer.bytes, writer.sha256))
    report["file"] = {"name": rel, **entry.to_json()}
    report["seconds"] = round(time.monotonic() - started, 3)
    store.put_bytes(part_key, json.dumps(report, sort_keys=True, allow_nan=False).encode())
    log.info("%s: %d examples, %d repaired, %d quarantined (%.1fs)", rel, report["examples"],
             len(report["repaired"]), len(report["quarantined"]), report["seconds"])
    return report


def _verify_source(ex: Example, sha256: str) -> None:
    """The image read is the one the dataset manifest recorded (the hash is needed anyway for
    ``image/key/sha256``, so this check is free)."""
    if ex.sha256 is not None and sha256 != ex.sha256:
        raise StoreError(f"{ex.image_key} does not match the dataset manifest's sha256 "
                         f"{ex.sha256}: the stored dataset is corrupt; re-run download with force")


def write_shards(store: Store, p: Plan, units: Iterable[tuple[str, int]], cfg: TFRecordConfig
                 ) -> list[dict]:
    """Write the given units sequentially (one Airflow mapped task, or the CLI with one worker)."""
    if p.cache_hit:
        log.info("cache hit: %s is complete; no shard to write", p.uri)
        return []
    return [write_shard(store, p, s, i, cfg) for s, i in units]


# ---------------------------------------------------------------------------------------------
# Gather
# ---------------------------------------------------------------------------------------------

def _merge(reports: list[dict], skipped: dict[str, list], noted: dict[str, list]) -> dict:
    per_split: dict[str, dict] = {}
    for split in SPLITS:
        rs = [r for r in reports if r["split"] == split]
        per_class = Counter()
        for r in rs:
            per_class.update(r["per_class"])
        per_split[split] = {"examples": sum(r["examples"] for r in rs),
                            "boxes": sum(r["boxes"] for r in rs),
                            "per_class": dict(sorted(per_class.items())),
                            "shards": len(rs)}
    lists = {k: sorted((x for r in reports for x in r[k]), key=lambda x: json.dumps(x))
             for k in ("repaired", "quarantined", "size_mismatch", "clipped", "dropped",
                       "no_boxes")}
    hists = {}
    for k in ("box_width", "box_height", "box_area"):
        h = _Hist.empty()
        for r in reports:
            h = _Hist.merge(h, r[k])
        hists[k] = _Hist.final(h)
    written = sum(v["examples"] for v in per_split.values())
    return {
        "splits": per_split,
        "written": written,
        "repaired": lists["repaired"],
        "quarantined": lists["quarantined"],
        "skipped": {k: sorted(v, key=lambda x: x["name"]) for k, v in sorted(skipped.items())},
        "noted": {k: sorted(v, key=lambda x: x["name"]) for k, v in sorted(noted.items())},
        "size_mismatch": lists["size_mismatch"],
        "boxes_clipped": lists["clipped"],
        "boxes_dropped": lists["dropped"],
        "images_without_boxes": lists["no_boxes"],
        "box_stats": hists,
        "counts": {
            "written": written, "repaired": len(lists["repaired"]),
            "quarantined": len(lists["quarantined"]),
            **{f"skipped_{k}": len(v) for k, v in sorted(skipped.items())},
            **{f"noted_{k}": len(v) for k, v in sorted(noted.items())},
            "size_mismatch": len(lists["size_mismatch"]),
            "boxes_clipped": len(lists["clipped"]), "boxes_dropped": len(lists["dropped"]),
            "images_without_boxes": len(lists["no_boxes"]),
        },
    }


def quality_gate(report: dict, labels: LabelMap, cfg: TFRecordConfig,
                 parts_uri: str) -> LabelMap:
    """Raise :class:`DataQualityError` on a bad dataset; return the label map to write.
    ``parts_uri``: where the shard reports listing each image are (named in the message, since
    a failed gate writes no data_report.json)."""
    labelled = report["written"] + len(report["quarantined"])
    quarantined = len(report["quarantined"])
    if labelled == 0:
        raise DataQualityError("no labelled image could be used: every split is empty "
                               f"(skipped: {report['counts']})")
    frac = quarantined / labelled
    if frac > cfg.max_quarantine_fraction:
        reasons = Counter(q["reason"].split(":")[0] for q in report["quarantined"])
        first = "; ".join(f"{q['name']}: {q['reason']}" for q in report["quarantined"][:5])
        more = f" (+{quarantined - 5} more)" if quarantined > 5 else ""
        raise DataQualityError(
            f"{quarantined} of {labelled} labelled images were quarantined ({frac:.1%}), more "
            f"than max_quarantine_fraction={cfg.max_quarantine_fraction:.1%}; reasons: "
            f"{dict(reasons)}: {first}{more}; every one is listed with its reason in the shard "
            f"reports {parts_uri}<split>-NNNNN.json. Fix or remove those images, or raise "
            "max_quarantine_fraction (--max-quarantine) if that share is acceptable")
    for split in SPLITS:
        if report["splits"][split]["examples"] == 0:
            raise DataQualityError(f"the {split} split is empty "
                                   f"({report['written']} examples in all)")
    present = report["splits"]["train"]["per_class"]
    if cfg.classes == "present":
        return labels.subset([n for n in labels.names if present.get(n)])
    missing = [n for n in labels.names if not present.get(n)]
    if missing:
        raise DataQualityError(
            f"{len(missing)} of {len(labels)} label-map classes have no training example: "
            f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} (use classes="
            "'present' to train on the classes the data has)")
    return labels


def gather(store: Store, p: Plan, cfg: TFRecordConfig, *, run_id: str | None = None
           ) -> StepResult:
    """Commit the step: every shard present, report merged, gate passed, manifest last."""
    labels = cfg.label_map_obj()

    def body(writer: StepWriter) -> dict:
        reports, missing = [], []
        for split, index in p.units:
            key = f"{p.prefix}{PARTS}{split}-{index:05d}.json"
            try:
                data = store.get_bytes(key)[0]
            except NotFound:
                missing.append(shard_name(split, index, cfg.num_shards))
                continue
            report = json.loads(data)
            reports.append(report)
            writer.register(report["file"]["name"], FileEntry(report["file"]["size"],
                                                              report["file"]["sha256"]))
            writer.register(key[len(p.prefix):], FileEntry(len(data),
                                                           hashlib.sha256(data).hexdigest()))
        if missing:
            raise StoreError(f"{len(missing)} shards of {p.uri} are not written yet: "
                             f"{', '.join(missing[:5])}; run the shard tasks first")
        register_plan_record(writer)
        merged = _merge(reports, p.skipped, p.noted)
        written_labels = quality_gate(merged, labels, cfg, parts_uri=store.uri(p.prefix + PARTS))
        merged["label_map"] = written_labels.to_json()
        writer.put_bytes("label_map.pbtxt", written_labels.to_pbtxt().encode())
        # strict JSON: a NaN or Infinity literal would make the report unreadable elsewhere
        writer.put_bytes("data_report.json", (json.dumps(
            merged, indent=2, sort_keys=True, allow_nan=False) + "\n").encode())
        c = merged["counts"]
        log.info("tfrecords: %d train / %d val examples, %d repaired, %d quarantined, "
                 "%d boxes clipped, %d dropped", merged["splits"]["train"]["examples"],
                 merged["splits"]["val"]["examples"], c["repaired"], c["quarantined"],
                 c["boxes_clipped"], c["boxes_dropped"])
        return {"train": merged["splits"]["train"]["examples"],
                "val": merged["splits"]["val"]["examples"],
                "classes": len(written_labels), "num_shards": cfg.num_shards,
                "repaired": c["repaired"], "quarantined": c["quarantined"]}

    return run_step(store, STEP, SCHEMA_VERSION, inputs=p.inputs, config=p.config, body=body,
                    force=cfg.force, resume=True, force_clears=False, fp=p.fingerprint,
                    run_id=run_id)


# ---------------------------------------------------------------------------------------------
# Everything in one call (the CLI)
# ---------------------------------------------------------------------------------------------

class ShardWorkerError(RuntimeError):
    """A forked shard worker failed; the message carries its traceback."""


def _take(counter) -> int:
    with counter.get_lock():
        i = counter.value
        counter.value = i + 1
    return i


def _write_taken(store: Store, p: Plan, units: list[tuple[str, int]], cfg: TFRecordConfig,
                 counter) -> None:
    """Write units in the order the shared counter hands them out until none is left."""
    while (i := _take(counter)) < len(units):
        split, index = units[i]
        write_shard(store, p, split, index, cfg)


def _shard_worker(root: str, p: Plan, units: list[tuple[str, int]], cfg: TFRecordConfig,
                  counter, conn) -> None:
    """A forked worker: its own store client (an S3 client must not cross a fork). Sends
    ``None`` when out of units, or the failure's traceback."""
    try:
        _write_taken(open_store(root), p, units, cfg, counter)
    except BaseException as exc:
        with counter.get_lock():
            counter.value = len(units)  # the others stop after their current shard
        conn.send(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        raise SystemExit(1) from None
    conn.send(None)


class _ForkedWriters:
    """Write ``units`` in ``workers`` processes: this one and ``workers - 1`` forked children,
    each taking the next unit from a shared counter as it frees up.

    The calling process works too rather than waiting on a pool: one fork fewer, no task or
    result traffic, and the plan is not copied anywhere (the children inherit it). It waits
    for each child's "done" message, not for its exit (tearing a process down takes a few ms):
    the gather can start meanwhile, and :meth:`reap` joins them afterwards. A failed child
    stops the others after their current shard and is raised here with its traceback; a
    child that dies without a word (killed, e.g. for memory) is reported with its signal. The
    shards already written are kept, so a retry resumes."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.children: list = []

    def __enter__(self) -> _ForkedWriters:
        return self

    def __exit__(self, *exc) -> None:
        self.reap()

    def run(self, store: Store, p: Plan, units: list[tuple[str, int]], cfg: TFRecordConfig
            ) -> None:
        ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        counter = ctx.Value("l", 0)
        gc.freeze()  # GC passes then leave the inherited heap (and its shared pages) alone
        pipes = []
        try:
            for _ in range(min(self.workers, len(units)) - 1):  # no idle children
                ours, theirs = ctx.Pipe(duplex=False)
                child = ctx.Process(target=_shard_worker, daemon=True,
                                    name="petdet-shard-worker",
                                    args=(store.root, p, units, cfg, counter, theirs))
                child.start()
                theirs.close()
                self.children.append(child)
                pipes.append(ours)
            _write_taken(store, p, units, cfg, counter)
        except BaseException:
            with counter.get_lock():
                counter.value = len(units)  # the children finish their current shard and stop
            raise
        finally:
            gc.unfreeze()
        failures = []
        for child, conn in zip(self.children, pipes, strict=True):
            try:
                message = conn.recv()  # EOFError: the child died without sending
            except EOFError:
                child.join()
                code = child.exitcode
                message = (f"{child.name} (pid {child.pid}) died with "
                           + (f"signal {-code}" if code is not None and code < 0
                              else f"exit code {code}")
                           + " while writing shards (killed, e.g. for memory?)")
            finally:
                conn.close()
            if message is not None:
                failures.append(message)
        if failures:
            raise ShardWorkerError(
                f"{len(failures)} of {len(self.children)} forked shard workers failed; shards "
                "already written are kept (a retry resumes):\n" + "\n".join(failures))

    def reap(self) -> None:
        for child in self.children:
            child.join()
        self.children = []


def build(store: Store, dataset_uri: str, cfg: TFRecordConfig, *, workers: int | None = None,
          run_id: str | None = None) -> StepResult:
    """plan → shards (in ``workers`` processes) → gather."""
    p = plan(store, dataset_uri, cfg)
    if p.cache_hit:
        return gather(store, p, cfg, run_id=run_id)
    workers = workers or os.cpu_count() or 1
    explicit_client = isinstance(store, S3Store) and store.has_explicit_client
    started = time.monotonic()
    # one unit per shard, largest first, taken by whichever worker frees up: balanced load
    units = sorted(p.units, key=lambda u: -len(p.by_unit[u]))
    with contextlib.ExitStack() as stack:
        if workers <= 1:
            write_shards(store, p, units, cfg)
        elif explicit_client:
            # a client handed in (e.g. from an Airflow connection) cannot cross processes
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(lambda u: write_shards(store, p, [u], cfg), units))
        else:
            # the children are joined after the gather: it need not wait for their exit
            stack.enter_context(_ForkedWriters(workers)).run(store, p, units, cfg)
        n = len(p.examples)
        secs = time.monotonic() - started
        log.info("wrote %d shards for %d examples in %.1fs (%.0f images/s, %d workers)",
                 len(p.units), n, secs, n / secs if secs else math.inf, workers)
        return gather(store, p, cfg, run_id=run_id)
