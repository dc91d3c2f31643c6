"""Deterministic synthetic stand-in for the Oxford-IIIT Pet archives.

``make_sample(out_dir)`` writes ``images.tar.gz`` and ``annotations.tar.gz`` laid out exactly
like the real downloads, so the pipeline (download -> TFRecords -> train -> detect) can run
offline, plus a ``SHA256SUMS`` file. Facts about the real archives that are reproduced here:

* Both ``.tar.gz`` files are PLAIN uncompressed tar archives despite their names.
* ``images.tar.gz`` holds ``images/<Name>_<n>.jpg``. The breed is the name minus ``_<n>``;
  capitalised breeds are cats (SPECIES 1), lower-case ones dogs (SPECIES 2).
* ``annotations.tar.gz`` holds ``annotations/list.txt`` (6 ``#`` header lines, then
  ``Name CLASS-ID SPECIES BREED-ID`` per image, sorted case-insensitively),
  ``trainval.txt`` and ``test.txt`` (same columns, no header, disjoint, roughly half of each
  breed each), a ``README``, ``xmls/<name>.xml`` PASCAL VOC head boxes for trainval images only
  (object ``name`` is the species word ``cat``/``dog``), and ``trimaps/<name>.png`` for every
  image (8-bit single channel: 1 pet, 2 background, 3 border band around the outline), plus a
  few macOS AppleDouble ``trimaps/._<name>.png`` junk files.
* The real data has broken files, reproduced one per image (see ``DEFECT_KINDS``): PNG, GIF
  and RGBA PNG files named ``.jpg``, a CMYK JPEG, a truncated JPEG and a trainval image
  without XML.

Each picture is a noisy, textured or gradient background with one drawn "pet": a body and a
head whose look is learnable from the breed (palette colour, fur pattern, head aspect; cats
have pointed ears, dogs floppy ones). The XML ``bndbox`` is exactly the head (with ears) and
the trimap is the body + head mask. The same seed gives byte-identical archives; an image's
content depends only on ``(seed, breed, n)``.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import math
import os
import tarfile
import xml.etree.ElementTree as ET  # noqa: S405 - only used to *write* XML
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from petdet_tasks.breeds import BREEDS, CAT, breed_id, class_id, species
from petdet_tasks.defaults import SAMPLE_BREEDS, SAMPLE_PER_BREED, SAMPLE_SEED
from petdet_tasks.errors import ConfigError

DEFAULT_BREEDS = SAMPLE_BREEDS
DEFAULT_PER_BREED = SAMPLE_PER_BREED
DEFAULT_SEED = SAMPLE_SEED

DEFECT_KINDS: tuple[str, ...] = (
    "png_as_jpg",
    "gif_as_jpg",
    "cmyk_jpeg",
    "rgba_png_as_jpg",
    "truncated_jpeg",
    "missing_xml",
)
JUNK_FILES = 2
LIST_HEADER: tuple[str, ...] = (
    "#Image CLASS-ID SPECIES BREED ID",
    "#ID: 1:37 Class ids",
    "#SPECIES: 1:Cat 2:Dog",
    "#BREED ID: 1-12:Cat 1:25:Dog",
    "#All images with 1st letter as captial are cat images",
    "#images with small first letter are dog images",
)
POSES: tuple[str, ...] = ("Frontal", "Left", "Right", "Unspecified")
PATTERNS: tuple[str, ...] = ("plain", "stripes", "spots", "two_tone")
ARCHIVES: tuple[str, ...] = ("images.tar.gz", "annotations.tar.gz")
DIRECTORIES: tuple[str, ...] = ("images", "annotations", "annotations/xmls", "annotations/trimaps")

MTIME = 1_300_000_000
JPEG_QUALITY = 90
TRUNCATE_FRACTION = 0.6
MIN_COLOUR_DISTANCE = 100.0

README = """\
OXFORD-IIIT PET Dataset (synthetic sample written by petdet_tasks.sample_data)
-----------------------------------------------------------------------------
Same layout as the real annotations archive; the pictures are drawn, not photographed.

Contents:
trimaps/    Trimap annotations for every image in the dataset
            Pixel Annotations: 1: Foreground 2:Background 3: Not classified
xmls/       Head bounding box annotations in PASCAL VOC Format (trainval images only)

list.txt    Combined list of all images in the dataset
            Each entry in the file is of following nature:
            Image CLASS-ID SPECIES BREED ID
            ID: 1:37 Class ids
            SPECIES: 1:Cat 2:Dog
            BREED ID: 1-12:Cat 1:25:Dog
            All images with 1st letter as captial are cat images while
            images with small first letter are dog images.
trainval.txt Files describing splits used in the paper. However,
test.txt     you are encouraged to try random splits.
"""

# Header of a macOS AppleDouble file ("._name"): magic, version, filler, no entries.
APPLEDOUBLE = bytes.fromhex("0005160700020000") + b"Mac OS X        " + b"\x00\x00"


# --------------------------------------------------------------------------- selection


def select_breeds(n: int) -> list[str]:
    """``n`` breeds alternating cat, dog, cat, ... in CLASS-ID order (dogs once cats run out)."""
    cats = [b for b in BREEDS if species(b) == CAT]
    dogs = [b for b in BREEDS if species(b) != CAT]
    order: list[str] = []
    for i in range(max(len(cats), len(dogs))):
        order.extend(group[i] for group in (cats, dogs) if i < len(group))
    return order[:n]


def _trainval_per_breed(per_breed: int) -> int:
    return (per_breed + 1) // 2


def _validate(breeds: int, per_breed: int, seed: int) -> None:
    for name, value in (("breeds", breeds), ("per_breed", per_breed), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if not 1 <= breeds <= len(BREEDS):
        raise ConfigError(f"breeds must be between 1 and {len(BREEDS)}, got {breeds}")
    if per_breed < 2:
        raise ConfigError(
            f"per_breed must be at least 2 (one trainval + one test), got {per_breed}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    trainval = breeds * _trainval_per_breed(per_breed)
    if trainval < len(DEFECT_KINDS):
        raise ConfigError(
            f"breeds={breeds} x per_breed={per_breed} gives only {trainval} trainval images, "
            f"but each of the {len(DEFECT_KINDS)} defects ({', '.join(DEFECT_KINDS)}) needs its "
            f"own trainval image: need breeds * ceil(per_breed / 2) >= {len(DEFECT_KINDS)} "
            f"(e.g. --breeds 2 --per-breed 6, or --breeds 3 --per-breed 4)"
        )


@dataclass(frozen=True)
class Plan:
    """Which images exist, how they are split, and which carry a defect."""

    names: list[str]  # sorted case-insensitively, like list.txt
    trainval: set[str]
    defects: dict[str, str]
    junk: list[str]


def plan_sample(breeds: list[str], per_breed: int, seed: int) -> Plan:
    names: list[str] = []
    trainval: set[str] = set()
    n_trainval = _trainval_per_breed(per_breed)
    for breed in breeds:
        rng = np.random.default_rng([seed, class_id(breed), 0])
        numbers = rng.permutation(np.arange(1, per_breed + 1))
        names.extend(f"{breed}_{n}" for n in range(1, per_breed + 1))
        trainval.update(f"{breed}_{n}" for n in numbers[:n_trainval])
    names.sort(key=str.lower)
    rng = np.random.default_rng([seed])
    candidates = [n for n in names if n in trainval]
    picked = rng.choice(len(candidates), size=len(DEFECT_KINDS), replace=False)
    defects = {candidates[i]: kind for i, kind in zip(picked, DEFECT_KINDS, strict=True)}
    junk = sorted(
        (names[i] for i in rng.choice(len(names), size=JUNK_FILES, replace=False)), key=str.lower
    )
    return Plan(names, trainval, defects, junk)


# --------------------------------------------------------------------------- breed look


@dataclass(frozen=True)
class Look:
    """Per-breed appearance: what a detector can learn to tell breeds apart by."""

    colour: tuple[int, int, int]
    second: tuple[int, int, int]
    pattern: str
    aspect: float  # head width / height
    slant: int  # stripe direction, +1 or -1
    is_cat: bool


def breed_look(breed: str) -> Look:
    cid = class_id(breed)
    hue = (cid * 0.618034) % 1.0
    sat = 0.35 + 0.5 * ((cid * 5) % 7) / 6
    val = 0.5 + 0.45 * ((cid * 3) % 5) / 4
    colour = _rgb(colorsys.hsv_to_rgb(hue, sat, val))
    pattern = PATTERNS[cid % len(PATTERNS)]
    if pattern == "two_tone":
        second = _rgb(colorsys.hsv_to_rgb(hue, sat * 0.25, min(1.0, val + 0.35)))
    else:
        second = _rgb(colorsys.hsv_to_rgb((hue + 0.08) % 1.0, sat, val * 0.4))
    aspect = 0.8 + 0.45 * ((cid * 7) % 10) / 9
    slant = 1 if cid % 3 else -1
    return Look(colour, second, pattern, aspect, slant, species(breed) == CAT)


def _rgb(floats: tuple[float, float, float]) -> tuple[int, int, int]:
    r, g, b = (int(round(255 * c)) for c in floats)
    return r, g, b


# --------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class Drawn:
    image: Image.Image  # RGB
    trimap: Image.Image  # L, values 1/2/3
    box: tuple[int, int, int, int]  # xmin, ymin, xmax, ymax (1-based, inclusive)
    pose: str


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], amount: int = 12):
    c = np.clip(np.array(colour) + rng.integers(-amount, amount + 1, 3), 0, 255)
    return tuple(int(v) for v in c)


def _far_colour(rng: np.random.Generator, avoid: list[tuple[int, int, int]]):
    """A random colour at least MIN_COLOUR_DISTANCE from every colour in ``avoid``."""
    best, best_d = None, -1.0
    for _ in range(64):
        c = rng.integers(0, 256, 3)
        d = min(float(np.linalg.norm(c - np.array(a))) for a in avoid)
        if d > best_d:
            best, best_d = c, d
        if d >= MIN_COLOUR_DISTANCE:
            break
    return best.astype(np.float32)


def _background(rng: np.random.Generator, w: int, h: int, avoid) -> np.ndarray:
    c1, c2 = _far_colour(rng, avoid), _far_colour(rng, avoid)
    kind = int(rng.integers(4))
    if kind == 0:  # linear gradient at a random angle
        theta = rng.uniform(0, 2 * math.pi)
        xx = np.arange(w, dtype=np.float32)[None, :]
        yy = np.arange(h, dtype=np.float32)[:, None]
        t = xx * math.cos(theta) + yy * math.sin(theta)
        t = ((t - t.min()) / max(float(np.ptp(t)), 1.0))[..., None]
        bg = c1 * (1 - t) + c2 * t
    elif kind == 1:  # soft clouds: a coarse random grid, upsampled
        gh, gw = int(rng.integers(3, 8)), int(rng.integers(3, 8))
        t = rng.random((gh, gw, 1)).astype(np.float32)
        grid = (c1 * (1 - t) + c2 * t).astype(np.uint8)
        bg = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    elif kind == 2:  # tiles / planks
        tw, th = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        xx, yy = np.arange(w)[None, :] // tw, np.arange(h)[:, None] // th
        t = ((xx + yy) % 2).astype(np.float32)[..., None]
        bg = c1 * (1 - t) + c2 * t
    else:  # coarse carpet texture
        grain = rng.integers(-30, 31, (h // 2 + 1, w // 2 + 1, 1)).astype(np.float32)
        grain = np.repeat(np.repeat(grain, 2, axis=0), 2, axis=1)[:h, :w]
        bg = np.broadcast_to(c1, (h, w, 3)) + grain
    return bg.astype(np.float32)


def _head_extent(look: Look, rw: float, rh: float) -> tuple[float, float, float, float]:
    """Head (+ ears) extent around the head centre: left, top, right, bottom."""
    if look.is_cat:
        return rw, 1.35 * rh, rw, rh
    return 1.2 * rw, rh, 1.2 * rw, rh


def _ears(look: Look, cx: float, cy: float, rw: float, rh: float) -> list[list[tuple]]:
    """Cat: two triangles over the head. Dog: two hanging ellipse boxes on the sides."""
    if look.is_cat:
        return [
            [
                (cx + s * 0.85 * rw, cy - 0.45 * rh),
                (cx + s * 0.1 * rw, cy - 0.85 * rh),
                (cx + s * 0.7 * rw, cy - 1.35 * rh),
            ]
            for s in (-1, 1)
        ]
    return [
        [
            (cx + s * 0.9 * rw - 0.3 * rw, cy - 0.65 * rh),
            (cx + s * 0.9 * rw + 0.3 * rw, cy + 0.75 * rh),
        ]
        for s in (-1, 1)
    ]


def _draw_pattern(draw: ImageDraw.ImageDraw, rng, look: Look, region, rh: float, second) -> None:
    x0, y0, x1, y1 = region
    if look.pattern == "stripes":
        step = max(6.0, 0.4 * rh)
        slant = 0.5 * (y1 - y0) * look.slant
        x = x0 - abs(slant) - step
        while x < x1 + abs(slant):
            draw.line([(x, y0), (x + slant, y1)], fill=second, width=max(2, int(0.15 * rh)))
            x += step
    elif look.pattern == "spots":
        for _ in range(int(rng.integers(12, 24))):
            sx, sy = rng.uniform(x0, x1), rng.uniform(y0, y1)
            r = rng.uniform(0.08, 0.16) * rh
            draw.ellipse([sx - r, sy - r, sx + r, sy + r], fill=second)
    elif look.pattern == "two_tone":
        mid = y0 + 0.55 * (y1 - y0)
        draw.rectangle([x0, mid, x1, y1], fill=second)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)-square, done separably with shifted ORs (fast)."""
    out = mask.copy()
    for axis in (0, 1):
        src = out.copy()
        n = src.shape[axis]
        for k in range(1, r + 1):
            lo = [slice(None)] * 2
            hi = [slice(None)] * 2
            lo[axis], hi[axis] = slice(0, n - k), slice(k, n)
            out[tuple(lo)] |= src[tuple(hi)]
            out[tuple(hi)] |= src[tuple(lo)]
    return out


def _trimap(mask: Image.Image) -> Image.Image:
    """1 inside the pet, 3 on a ~3 px band around its outline, 2 elsewhere."""
    pet = np.asarray(mask) > 0
    tri = np.full(pet.shape, 2, np.uint8)
    tri[_dilate(pet, 2)] = 3
    tri[~_dilate(~pet, 1)] = 1
    return Image.fromarray(tri, "L")


def draw_pet(breed: str, n: int, seed: int) -> Drawn:
    """Draw image ``<breed>_<n>``; depends only on (seed, breed, n)."""
    rng = np.random.default_rng([seed, class_id(breed), n])
    look = breed_look(breed)
    w, h = int(rng.integers(300, 501)), int(rng.integers(250, 501))
    colour, second = _jitter(rng, look.colour), _jitter(rng, look.second)
    bg = _background(rng, w, h, [colour, second])

    # Head geometry: the head box (ears included) spans ~15-45% of the shorter side.
    size = rng.uniform(0.15, 0.42) * min(w, h)
    rh = size / (2.35 if look.is_cat else 2.0)
    rw = rh * look.aspect * rng.uniform(0.95, 1.05)
    left, top, right, bottom = _head_extent(look, rw, rh)
    cx = rng.uniform(left + 2, w - right - 3)
    cy = rng.uniform(top + 2, h - bottom - 3)
    pose = POSES[int(rng.integers(len(POSES)))]
    side = {"Left": 1, "Right": -1, "Frontal": 0}.get(pose, int(rng.choice([-1, 1])))
    bw, bh = rw * rng.uniform(1.5, 2.2), rh * rng.uniform(1.0, 1.4)
    bx = cx + side * rw * rng.uniform(0.9, 1.5) + rng.uniform(-0.2, 0.2) * rw
    by = cy + rh * rng.uniform(0.9, 1.4)
    head = [cx - rw, cy - rh, cx + rw, cy + rh]
    body = [bx - bw, by - bh, bx + bw, by + bh]
    ears = _ears(look, cx, cy, rw, rh)

    # Masks: whole pet (for the trimap) and head + ears (for the box).
    pet_mask, head_mask = Image.new("L", (w, h), 0), Image.new("L", (w, h), 0)
    pm, hm = ImageDraw.Draw(pet_mask), ImageDraw.Draw(head_mask)
    for d in (pm, hm):
        d.ellipse(head, fill=255)
        for ear in ears:
            (d.polygon if look.is_cat else d.ellipse)(ear, fill=255)
    pm.ellipse(body, fill=255)

    # Fur: base colour plus the breed pattern, composited onto the background.
    fur = Image.new("RGB", (w, h), colour)
    region = (min(body[0], cx - 1.3 * rw), cy - 1.4 * rh, max(body[2], cx + 1.3 * rw), body[3])
    _draw_pattern(ImageDraw.Draw(fur), rng, look, region, rh, second)
    bg_img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    img = Image.composite(fur, bg_img, pet_mask)

    _draw_face(ImageDraw.Draw(img), look, colour, second, head, ears, cx, cy, rw, rh)
    noise = rng.integers(-6, 7, (h, w, 3), dtype=np.int16)
    img = Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))

    x0, y0, x1, y1 = head_mask.getbbox()
    return Drawn(img, _trimap(pet_mask), (x0 + 1, y0 + 1, x1, y1), pose)


def _draw_face(draw, look: Look, colour, second, head, ears, cx, cy, rw, rh) -> None:
    dark = tuple(int(c * 0.35) for c in colour)
    draw.ellipse(head, outline=dark, width=max(2, int(rh / 12)))
    if look.is_cat:
        for ear in ears:  # pink inner ear: the ear triangle shrunk towards its centroid
            mx, my = sum(p[0] for p in ear) / 3, sum(p[1] for p in ear) / 3
            inner = [(mx + 0.5 * (x - mx), my + 0.5 * (y - my)) for x, y in ear]
            draw.polygon(inner, fill=(235, 160, 170))
    else:
        for ear in ears:
            draw.ellipse(ear, fill=dark if look.pattern != "two_tone" else second)
    er_w, er_h = 0.14 * rw, 0.13 * rh
    for s in (-1, 1):
        ex, ey = cx + s * 0.38 * rw, cy - 0.12 * rh
        iris = (150, 200, 60) if look.is_cat else (70, 40, 20)
        draw.ellipse([ex - er_w, ey - er_h, ex + er_w, ey + er_h], fill=iris)
        pw = er_w * (0.3 if look.is_cat else 0.6)
        draw.ellipse([ex - pw, ey - er_h * 0.8, ex + pw, ey + er_h * 0.8], fill=(10, 10, 10))
    if look.is_cat:
        draw.polygon(
            [
                (cx - 0.1 * rw, cy + 0.25 * rh),
                (cx + 0.1 * rw, cy + 0.25 * rh),
                (cx, cy + 0.38 * rh),
            ],
            fill=(230, 130, 150),
        )
    else:
        draw.ellipse(
            [cx - 0.17 * rw, cy + 0.28 * rh, cx + 0.17 * rw, cy + 0.48 * rh], fill=(15, 15, 15)
        )


# --------------------------------------------------------------------------- encoding


def encode_image(img: Image.Image, defect: str | None = None) -> bytes:
    """The bytes stored as ``images/<name>.jpg``: a JPEG, or the file a defect calls for."""
    buf = io.BytesIO()
    if defect == "png_as_jpg":
        img.save(buf, "PNG")
    elif defect == "gif_as_jpg":
        img.save(buf, "GIF")
    elif defect == "cmyk_jpeg":
        img.convert("CMYK").save(buf, "JPEG", quality=JPEG_QUALITY)
    elif defect == "rgba_png_as_jpg":
        rgba = img.convert("RGBA")
        rgba.putalpha(255)
        rgba.save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=JPEG_QUALITY)
    data = buf.getvalue()
    if defect == "truncated_jpeg":
        data = data[: int(len(data) * TRUNCATE_FRACTION)]
    return data


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def voc_xml(name: str, size: tuple[int, int], box: tuple[int, int, int, int], pose: str) -> bytes:
    """PASCAL VOC annotation like the real ``xmls/<name>.xml`` (species word as object name)."""
    root = ET.Element("annotation")
    _sub(root, "folder", "OXIIIT")
    _sub(root, "filename", f"{name}.jpg")
    source = _sub(root, "source")
    _sub(source, "database", "OXFORD-IIIT Pet Dataset")
    _sub(source, "annotation", "OXIIIT")
    _sub(source, "image", "flickr")
    sz = _sub(root, "size")
    for tag, value in zip(("width", "height", "depth"), (*size, 3), strict=True):
        _sub(sz, tag, str(value))
    _sub(root, "segmented", "0")
    obj = _sub(root, "object")
    breed = name.rpartition("_")[0]
    _sub(obj, "name", "cat" if species(breed) == CAT else "dog")
    _sub(obj, "pose", pose)
    _sub(obj, "truncated", "0")
    _sub(obj, "occluded", "0")
    bndbox = _sub(obj, "bndbox")
    for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True):
        _sub(bndbox, tag, str(value))
    _sub(obj, "difficult", "0")
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode").encode() + b"\n"


def _sub(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
    el = ET.SubElement(parent, tag)
    if text is not None:
        el.text = text
    return el


def list_line(name: str) -> str:
    breed = name.rpartition("_")[0]
    return f"{name} {class_id(breed)} {species(breed)} {breed_id(breed)}"


def _lines(lines) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode()


# --------------------------------------------------------------------------- archives


def write_tar(path: Path, files: dict[str, bytes], dirs: tuple[str, ...]) -> None:
    """Plain (uncompressed) tar with sorted, fixed-metadata members: byte-reproducible."""
    entries = {d: None for d in dirs} | files
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name in sorted(entries):
            data = entries[name]
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = MTIME, 0, 0, "", ""
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.mode, info.size = 0o644, len(data)
                tar.addfile(info, io.BytesIO(data))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def make_sample(
    out_dir: str | os.PathLike,
    *,
    breeds: int = DEFAULT_BREEDS,
    per_breed: int = DEFAULT_PER_BREED,
    seed: int = DEFAULT_SEED,
) -> dict:
    """Write OUT_DIR/images.tar.gz, OUT_DIR/annotations.tar.gz and OUT_DIR/SHA256SUMS.

    Returns a JSON-able summary: ``{"images", "trainval", "test": counts, "breeds": names in
    selection order, "defects": {image name without .jpg: kind},
    "archives": {archive name: {"size", "sha256"}}}``.
    """
    _validate(breeds, per_breed, seed)
    chosen = select_breeds(breeds)
    plan = plan_sample(chosen, per_breed, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    images: dict[str, bytes] = {}
    annotations: dict[str, bytes] = {}
    for name in plan.names:
        breed, _, n = name.rpartition("_")
        drawn = draw_pet(breed, int(n), seed)
        defect = plan.defects.get(name)
        images[f"images/{name}.jpg"] = encode_image(drawn.image, defect)
        annotations[f"annotations/trimaps/{name}.png"] = _png(drawn.trimap)
        if name in plan.trainval and defect != "missing_xml":
            annotations[f"annotations/xmls/{name}.xml"] = voc_xml(
                name, drawn.image.size, drawn.box, drawn.pose
            )
    for name in plan.junk:
        annotations[f"annotations/trimaps/._{name}.png"] = APPLEDOUBLE
    annotations["annotations/README"] = README.encode()
    annotations["annotations/list.txt"] = _lines([*LIST_HEADER, *map(list_line, plan.names)])
    trainval = [n for n in plan.names if n in plan.trainval]
    test = [n for n in plan.names if n not in plan.trainval]
    annotations["annotations/trainval.txt"] = _lines(map(list_line, trainval))
    annotations["annotations/test.txt"] = _lines(map(list_line, test))

    write_tar(out / "images.tar.gz", images, DIRECTORIES[:1])
    write_tar(out / "annotations.tar.gz", annotations, DIRECTORIES[1:])
    archives = {
        a: {"size": (out / a).stat().st_size, "sha256": sha256_file(out / a)} for a in ARCHIVES
    }
    (out / "SHA256SUMS").write_text("".join(f"{v['sha256']}  {a}\n" for a, v in archives.items()))
    return {
        "images": len(plan.names),
        "trainval": len(trainval),
        "test": len(test),
        "breeds": chosen,
        "defects": dict(sorted(plan.defects.items(), key=lambda kv: kv[0].lower())),
        "archives": archives,
    }
