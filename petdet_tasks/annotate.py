"""Turn object-detector outputs into what people look at: JSON records, annotated images,
thumbnails, CSV/JSONL exports, a summary and a self-contained HTML gallery.

The detector follows the TensorFlow Object Detection API output contract, per image:
``detection_boxes`` ``[N, 4]`` normalised ``ymin, xmin, ymax, xmax``; ``detection_scores``
``[N]``; ``detection_classes`` ``[N]`` 1-based label ids as floats; ``num_detections`` (only the
first ``num_detections`` rows are real). :func:`image_record` turns one image's outputs into a
*record* (schema version 1, see :data:`RECORD_SCHEMA`); an image that could not be decoded gets
a :func:`failure_record` instead. Everything else here consumes records.

Pillow, numpy and the standard library only: no TensorFlow import.
"""

from __future__ import annotations

import base64
import csv
import functools
import html
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from petdet_tasks.label_map import LabelMap

__all__ = [
    "CSV_COLUMNS",
    "FAILURE_SCHEMA",
    "RECORD_SCHEMA",
    "SCHEMA_VERSION",
    "SummaryCounter",
    "class_color",
    "draw_detections",
    "encode_jpeg",
    "failure_record",
    "failures_html",
    "gallery_html",
    "image_record",
    "label_text_color",
    "records_to_csv",
    "records_to_jsonl",
    "summarize",
    "thumbnail_jpeg",
    "validate_record",
]

SCHEMA_VERSION = 1

_NONE = type(None)
_FLOAT = "float"  # marker in the schemas: int or float (never bool), finite

#: Keys and types of a detection record (schema 1). Values are a type, a tuple of allowed types,
#: :data:`_FLOAT` (a finite int or float), a nested dict (an object with exactly those keys) or
#: a one-element list (an array of that). Besides the types, :func:`validate_record` checks:
#: ``schema == 1``; ``image`` non-empty; ``width``/``height`` >= 1; ``class_id`` >= 1;
#: ``class_name`` non-empty; ``score`` in [0, 1] and detections sorted by score, highest first;
#: ``box`` values in [0, 1] with ``ymin <= ymax`` and ``xmin <= xmax``; ``box_pixels`` x values
#: in [0, width - 1], y values in [0, height - 1], ``xmin <= xmax`` and ``ymin <= ymax``.
#: No other keys are allowed.
RECORD_SCHEMA: dict[str, Any] = {
    "schema": int,
    "image": str,
    "source": (str, _NONE),
    "width": int,
    "height": int,
    "detections": [
        {
            "class_id": int,
            "class_name": str,
            "score": _FLOAT,
            "box": {"ymin": _FLOAT, "xmin": _FLOAT, "ymax": _FLOAT, "xmax": _FLOAT},
            "box_pixels": {"xmin": int, "ymin": int, "xmax": int, "ymax": int},
        }
    ],
}

#: Keys and types of a failure record (an input that could not be decoded): a record with an
#: ``error`` key is checked against this schema; ``error`` must be non-empty.
FAILURE_SCHEMA: dict[str, Any] = {
    "schema": int,
    "image": str,
    "source": (str, _NONE),
    "error": str,
}

_BOX_KEYS = ("ymin", "xmin", "ymax", "xmax")
_PIXEL_KEYS = ("xmin", "ymin", "xmax", "ymax")


# ------------------------------------------------------------------------------------ records


def _names_dict(names: Mapping[int, str] | LabelMap) -> Mapping[int, str]:
    """``names`` as an id → name mapping (a :class:`LabelMap` is accepted too)."""
    if isinstance(names, LabelMap):
        return {item.id: item.name for item in names}
    return names


def _to_pixel(v: float, size: int) -> int:
    """The pixel index containing normalised coordinate ``v`` on an axis of ``size`` pixels.

    ``min(max(floor(v * size + 1e-6), 0), size - 1)``: the ``1e-6`` absorbs float error (so
    ``0.6 * 400`` gives 240, not 239); ``v = 1.0`` (the far image edge) maps to ``size - 1``.
    """
    return min(max(math.floor(v * size + 1e-6), 0), size - 1)


def _num_detections(num_detections: Any, rows: int) -> int:
    arr = np.asarray(num_detections)
    if arr.size != 1:
        raise ValueError(f"num_detections must be a single number, got shape {arr.shape}")
    value = float(arr.reshape(-1)[0])
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise ValueError(f"num_detections must be a whole number >= 0, got {value!r}")
    n = int(value)
    if n > rows:
        raise ValueError(f"num_detections is {n} but there are only {rows} detection rows")
    return n


def image_record(
    key: str,
    width: int,
    height: int,
    boxes: Any,
    scores: Any,
    classes: Any,
    num_detections: Any,
    names: Mapping[int, str],
    *,
    score_threshold: float = 0.5,
    max_boxes: int = 20,
    source: str | None = None,
) -> dict:
    """The JSON record (schema 1) of one image's detections.

    ``boxes`` ``[N, 4]`` (normalised ``ymin, xmin, ymax, xmax``), ``scores`` ``[N]`` and
    ``classes`` ``[N]`` (1-based label ids, floats are fine) are one image's detector outputs
    (array-likes; slice off any batch dimension first); only the first ``num_detections`` rows
    are looked at. ``names`` maps class ids to names (a :class:`LabelMap` works too).

    Kept: rows with ``score >= score_threshold`` (the raw score), highest score first (ties
    keep the detector's order), at most ``max_boxes`` of them. Each detection has:

    * ``score`` rounded to 4 decimals;
    * ``box``: the normalised box clipped to [0, 1] and rounded to 6 decimals (a box given with
      ``ymin > ymax`` or ``xmin > xmax`` has that pair swapped);
    * ``box_pixels``: inclusive pixel indices computed from the stored ``box`` values as
      ``min(max(floor(v * size + 1e-6), 0), size - 1)`` with ``size`` = ``width`` for x and
      ``height`` for y: the column/row containing each edge, an edge at 1.0 landing on the last
      column/row. E.g. 400x300 and ``[0.1, 0.2, 0.5, 0.6]`` → ``xmin 80, ymin 30, xmax 240,
      ymax 150``.

    Raises ValueError for bad shapes or sizes, a non-finite box or score, a score outside
    [0, 1], a non-integral class, and a class id that ``names`` does not know (every one of the
    first ``num_detections`` rows is checked, whatever its score, so a label map that does not
    match the model is caught early); the message names the row and the id.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string, got {key!r}")
    for label, size in (("width", width), ("height", height)):
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
            raise ValueError(f"{label} must be a positive integer, got {size!r}")
    width, height = int(width), int(height)
    if isinstance(max_boxes, bool) or not isinstance(max_boxes, int) or max_boxes < 0:
        raise ValueError(f"max_boxes must be an integer >= 0, got {max_boxes!r}")
    if not 0.0 <= float(score_threshold) <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold!r}")
    if source is not None and not isinstance(source, str):
        raise ValueError(f"source must be a string or None, got {type(source).__name__}")
    lookup = _names_dict(names)

    b = np.asarray(boxes, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(classes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {b.shape}")
    if s.shape != (b.shape[0],) or c.shape != (b.shape[0],):
        raise ValueError(
            f"scores and classes must have shape [{b.shape[0]}] like boxes, "
            f"got {s.shape} and {c.shape}"
        )
    n = _num_detections(num_detections, b.shape[0])

    rows: list[tuple[float, int, str, np.ndarray]] = []
    for i in range(n):
        score = float(s[i])
        if not math.isfinite(score) or not -1e-6 <= score <= 1.0 + 1e-6:
            raise ValueError(f"detection row {i}: score {score!r} is not in [0, 1]")
        if not np.all(np.isfinite(b[i])):
            raise ValueError(f"detection row {i}: box {b[i].tolist()} is not finite")
        raw = float(c[i])
        if not math.isfinite(raw) or abs(raw - round(raw)) > 1e-3:
            raise ValueError(f"detection row {i}: class {raw!r} is not a whole label id")
        class_id = int(round(raw))
        if class_id not in lookup:
            known = sorted(lookup)
            span = f"{known[0]}..{known[-1]}" if known else "none"
            raise ValueError(
                f"detection row {i}: unknown class id {class_id} (not in the label map; "
                f"known ids {span})"
            )
        rows.append((min(max(score, 0.0), 1.0), class_id, lookup[class_id], b[i]))

    kept = sorted((r for r in rows if r[0] >= score_threshold), key=lambda r: -r[0])[:max_boxes]
    detections = []
    for score, class_id, name, box in kept:
        ymin, xmin, ymax, xmax = (round(min(max(float(v), 0.0), 1.0), 6) for v in box)
        ymin, ymax = min(ymin, ymax), max(ymin, ymax)
        xmin, xmax = min(xmin, xmax), max(xmin, xmax)
        detections.append({
            "class_id": class_id,
            "class_name": name,
            "score": round(score, 4),
            "box": {"ymin": ymin, "xmin": xmin, "ymax": ymax, "xmax": xmax},
            "box_pixels": {
                "xmin": _to_pixel(xmin, width),
                "ymin": _to_pixel(ymin, height),
                "xmax": _to_pixel(xmax, width),
                "ymax": _to_pixel(ymax, height),
            },
        })
    return {
        "schema": SCHEMA_VERSION,
        "image": key,
        "source": source,
        "width": width,
        "height": height,
        "detections": detections,
    }


def failure_record(key: str, reason: str, source: str | None = None) -> dict:
    """The record (schema 1) of an input that could not be decoded: its key and the reason."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string, got {key!r}")
    if not isinstance(reason, str) or not reason:
        raise ValueError("reason must be a non-empty string")
    return {"schema": SCHEMA_VERSION, "image": key, "source": source, "error": reason}


def _type_name(spec: Any) -> str:
    if spec is _FLOAT:
        return "number"
    if isinstance(spec, tuple):
        return " or ".join("null" if t is _NONE else t.__name__ for t in spec)
    if isinstance(spec, dict):
        return "object"
    if isinstance(spec, list):
        return "array"
    return "integer" if spec is int else spec.__name__


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _check(value: Any, spec: Any, path: str) -> None:
    """Raise ValueError(``path: ...``) where ``value`` does not match ``spec`` (types only)."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected an object, got {_describe(value)}")
        for k, sub in spec.items():
            if k not in value:
                raise ValueError(f"{path}.{k}: missing")
            _check(value[k], sub, f"{path}.{k}")
        extra = [k for k in value if k not in spec]
        if extra:
            raise ValueError(f"{path}.{extra[0]}: unexpected key")
        return
    if isinstance(spec, list):
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected an array, got {_describe(value)}")
        for i, item in enumerate(value):
            _check(item, spec[0], f"{path}[{i}]")
        return
    if spec is _FLOAT:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
    elif spec is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, spec)
    if not ok:
        raise ValueError(f"{path}: expected {_type_name(spec)}, got {_describe(value)}")


def validate_record(rec: Any) -> None:
    """Check a record against :data:`RECORD_SCHEMA` (or :data:`FAILURE_SCHEMA` when it has an
    ``error`` key) and the value rules listed there.

    Raises ValueError whose message starts with the path of the first bad field, e.g.
    ``detections[1].box.ymin: expected number, got str '0.1'`` or
    ``detections[0].score: 1.5 is not in [0, 1]`` (paths are relative to the record; the
    record's image key is appended when known). Returns None for a good record.
    """

    def fail(path: str, problem: str) -> ValueError:
        where = ""
        if isinstance(rec, dict) and isinstance(rec.get("image"), str):
            where = f" (record of image {rec['image']!r})"
        return ValueError(f"{path}: {problem}{where}")

    if not isinstance(rec, dict):
        raise ValueError(f"record: expected an object (dict), got {_describe(rec)}")
    schema = FAILURE_SCHEMA if "error" in rec else RECORD_SCHEMA
    try:
        for k, sub in schema.items():
            if k not in rec:
                raise ValueError(f"{k}: missing")
            _check(rec[k], sub, k)
        extra = [k for k in rec if k not in schema]
        if extra:
            raise ValueError(f"{extra[0]}: unexpected key")
    except ValueError as e:
        raise fail(*str(e).split(": ", 1)) from None
    if rec["schema"] != SCHEMA_VERSION:
        raise fail("schema", f"expected {SCHEMA_VERSION}, got {rec['schema']!r}")
    if not rec["image"]:
        raise fail("image", "empty")
    if schema is FAILURE_SCHEMA:
        if not rec["error"]:
            raise fail("error", "empty")
        return
    width, height = rec["width"], rec["height"]
    for k in ("width", "height"):
        if rec[k] < 1:
            raise fail(k, f"must be >= 1, got {rec[k]}")
    previous = math.inf
    for i, det in enumerate(rec["detections"]):
        at = f"detections[{i}]"
        if det["class_id"] < 1:
            raise fail(f"{at}.class_id", f"must be >= 1, got {det['class_id']}")
        if not det["class_name"]:
            raise fail(f"{at}.class_name", "empty")
        score = det["score"]
        if not 0 <= score <= 1:
            raise fail(f"{at}.score", f"{score!r} is not in [0, 1]")
        if score > previous:
            raise fail(f"{at}.score", f"{score!r} is above the previous score (not sorted)")
        previous = score
        box, px = det["box"], det["box_pixels"]
        for k in _BOX_KEYS:
            if not 0 <= box[k] <= 1:
                raise fail(f"{at}.box.{k}", f"{box[k]!r} is not in [0, 1]")
        for lo, hi in (("ymin", "ymax"), ("xmin", "xmax")):
            if box[lo] > box[hi]:
                raise fail(f"{at}.box.{lo}", f"{box[lo]!r} is above {hi} {box[hi]!r}")
        for k in _PIXEL_KEYS:
            limit = width - 1 if k[0] == "x" else height - 1
            if not 0 <= px[k] <= limit:
                raise fail(f"{at}.box_pixels.{k}", f"{px[k]} is not in [0, {limit}]")
        for lo, hi in (("xmin", "xmax"), ("ymin", "ymax")):
            if px[lo] > px[hi]:
                raise fail(f"{at}.box_pixels.{lo}", f"{px[lo]} is above {hi} {px[hi]}")


# ------------------------------------------------------------------------------------ colours

# 48 colours picked greedily for the largest CIELAB distance to the colours already picked
# (farthest-point sampling, starting from pure red) among HSV candidates: hue in 5° steps,
# saturation 0.45..1.0, value 0.6..1.0 (so none is grey, black or white). The first 37 are at
# least 27.9 ΔE (CIE76) apart, the 48 at least 23.9. Hard-coded so they never drift.
_PALETTE_HEX = (
    "ff0000", "0000ff", "00ff00", "40cfff", "ff66cc", "998f26", "00ffbf", "004099",
    "993d3d", "ffff00", "ea00ff", "009900", "ff9500", "54997c", "ff1966", "ffb28c",
    "cfff8c", "8c66ff", "8c9fff", "000099", "99548e", "0f6b99", "8e0f99", "ff8ca9",
    "8cfff5", "e66439", "19ff79", "99e600", "b21262", "ffcf40", "997c54", "995900",
    "d98cff", "2db264", "8800cc", "ffe28c", "8ab212", "990000", "1979ff", "ff00d4",
    "8ab262", "ff0095", "14ccad", "4040ff", "629eb2", "22cc00", "00aaff", "f266ff",
)  # fmt: skip
_PALETTE: tuple[tuple[int, int, int], ...] = tuple(
    (int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)) for h in _PALETTE_HEX
)


def class_color(class_id: int) -> tuple[int, int, int]:
    """The RGB colour of class ``class_id``: fixed, distinct for ids 1..48, then repeating.

    Id ``k`` takes palette entry ``(k - 1) % 48`` of a hard-coded palette of well-separated,
    saturated colours (see ``_PALETTE_HEX``); the same id always gets the same colour.
    """
    if isinstance(class_id, bool) or not isinstance(class_id, int | np.integer):
        raise TypeError(f"class_id must be an integer, got {type(class_id).__name__}")
    return _PALETTE[(int(class_id) - 1) % len(_PALETTE)]


def _luminance(rgb: tuple[int, int, int]) -> float:
    """WCAG relative luminance of an sRGB colour."""

    def lin(u: int) -> float:
        x = u / 255
        return x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(u) for u in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def label_text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever has the higher WCAG contrast ratio against ``background``."""
    lum = _luminance(background)
    on_black = (lum + 0.05) / 0.05
    on_white = 1.05 / (lum + 0.05)
    return (0, 0, 0) if on_black >= on_white else (255, 255, 255)


# ------------------------------------------------------------------------------------ drawing

_HAVE_FREETYPE = features.check("freetype2")


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font: scalable (``size`` px) with FreeType, else the fixed bitmap one
    (``load_default_imagefont()``, about 11 px; ``size`` is then ignored)."""
    if _HAVE_FREETYPE:
        return ImageFont.load_default(size=size)
    return ImageFont.load_default_imagefont()


def _text_mask(text: str, size: int) -> Image.Image:
    """An ``L`` mask of ``text`` about ``size`` px tall (ascender to descender), tightly cropped
    to the line's height (the same for any text at that size) and the text's ink width.

    Without FreeType the bitmap font is drawn at its native size and scaled up by a whole
    factor (nearest neighbour), so labels still grow with the image, only blockier.
    """
    native = _HAVE_FREETYPE
    font = _font(size) if native else _font(0)
    left, top, right, bottom = font.getbbox(text)
    _, ref_top, _, ref_bottom = font.getbbox("Hgjy|")
    top, bottom = min(top, ref_top), max(bottom, ref_bottom)
    width, height = max(1, int(right - left)), max(1, int(bottom - top))
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font)
    if not native:
        factor = max(1, round(size / height))
        if factor > 1:
            mask = mask.resize((width * factor, height * factor), Image.Resampling.NEAREST)
    return mask


def _flatten_rgb(image: Image.Image) -> Image.Image:
    """An RGB copy of ``image``; transparency is composited onto white."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    out = image.convert("RGB")
    return out if out is not image else image.copy()


def _sizes(width: int, height: int) -> tuple[int, int, int]:
    """(outline width, font size, label padding) for an image of this size."""
    short = min(width, height)
    line = max(2, round(short / 250))
    font_size = max(12, round(short / 30))
    pad = max(2, round(font_size / 6))
    return line, font_size, pad


def draw_detections(image: Image.Image, record: dict) -> Image.Image:
    """An RGB copy of ``image`` with ``record``'s detections drawn on it; ``image`` is untouched.

    Each detection gets a box outline in :func:`class_color` (drawn inside the box's pixel
    bounds) and a label ``"name 0.87"`` on a filled box of the same colour, the text black or
    white (:func:`label_text_color`). The label sits on the box's top edge, above it, or inside
    its top when there is no room above; it is shifted left when it would run past the right
    edge of the image. Labels are drawn after all outlines, highest score last (on top).

    Sizes scale with the image's shorter side ``s``: outline ``max(2, s/250)`` px, font
    ``max(12, s/30)`` px. The font is Pillow's built-in scalable font
    (``ImageFont.load_default(size=...)``), which needs FreeType
    (``PIL.features.check("freetype2")``); without FreeType the fixed bitmap default font is
    used, scaled up by a whole factor, so labels still grow with the image.

    Boxes come from the normalised ``box`` values mapped onto *this* image's size (same rule as
    ``box_pixels``), so a resized copy of the original image can be annotated too. A failure
    record (one with ``error``) gives a plain RGB copy. Transparent images are flattened onto
    white.
    """
    validate_record(record)
    out = _flatten_rgb(image)
    if "error" in record or not record["detections"]:
        return out
    width, height = out.size
    line, font_size, pad = _sizes(width, height)
    draw = ImageDraw.Draw(out)

    placed = []
    for det in record["detections"]:
        box = det["box"]
        x0, x1 = _to_pixel(box["xmin"], width), _to_pixel(box["xmax"], width)
        y0, y1 = _to_pixel(box["ymin"], height), _to_pixel(box["ymax"], height)
        color = class_color(det["class_id"])
        draw.rectangle((x0, y0, x1, y1), outline=color, width=line)
        placed.append((x0, y0, color, f"{det['class_name']} {det['score']:.2f}"))

    for x0, y0, color, text in reversed(placed):
        mask = _text_mask(text, font_size)
        label_w, label_h = mask.width + 2 * pad, mask.height + 2 * pad
        top = y0 - label_h if y0 - label_h >= 0 else y0
        top = max(0, min(top, height - label_h))
        left = max(0, min(x0, width - label_w))
        draw.rectangle((left, top, left + label_w - 1, top + label_h - 1), fill=color)
        out.paste(label_text_color(color), (left + pad, top + pad), mask)
    return out


# ------------------------------------------------------------------------------------ encoding


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """Baseline JPEG bytes of ``image`` (RGB; transparency flattened onto white)."""
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer in 1..100, got {quality!r}")
    buf = io.BytesIO()
    _flatten_rgb(image).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def thumbnail_jpeg(image: Image.Image, max_side: int = 320, quality: int = 80) -> bytes:
    """JPEG bytes of ``image`` shrunk (never enlarged) to fit ``max_side`` x ``max_side``,
    aspect ratio kept (Lanczos resampling)."""
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1:
        raise ValueError(f"max_side must be a positive integer, got {max_side!r}")
    small = _flatten_rgb(image)
    small.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return encode_jpeg(small, quality)


# ------------------------------------------------------------------------------------ exports


def records_to_jsonl(records: Iterable[dict]) -> bytes:
    """UTF-8 JSON Lines: each record (validated first) on one line, keys sorted."""
    lines = []
    for rec in records:
        validate_record(rec)
        lines.append(json.dumps(rec, sort_keys=True, ensure_ascii=False, allow_nan=False))
    return "".join(line + "\n" for line in lines).encode("utf-8")


#: Columns of :func:`records_to_csv`, in order.
CSV_COLUMNS = (
    "image", "width", "height", "class_id", "class_name", "score",
    "ymin", "xmin", "ymax", "xmax", "xmin_px", "ymin_px", "xmax_px", "ymax_px", "error",
)  # fmt: skip


def records_to_csv(records: Iterable[dict], *, header: bool = True) -> bytes:
    """UTF-8 CSV (``\\n`` line ends, a header row of :data:`CSV_COLUMNS`) in which every image
    appears: one row per detection; one row with empty detection fields for an image without
    detections; one row with only ``image`` and ``error`` filled for a failed image.
    Numbers are written as Python's ``str`` writes them (``0.93``, ``80``).

    ``header=False`` leaves the header row out: the rows to append to a CSV written in parts.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header:
        writer.writerow(CSV_COLUMNS)
    for rec in records:
        validate_record(rec)
        if "error" in rec:
            writer.writerow([rec["image"], *[""] * (len(CSV_COLUMNS) - 2), rec["error"]])
            continue
        head = [rec["image"], rec["width"], rec["height"]]
        if not rec["detections"]:
            writer.writerow(head + [""] * (len(CSV_COLUMNS) - len(head)))
        for det in rec["detections"]:
            box, px = det["box"], det["box_pixels"]
            writer.writerow([
                *head,
                det["class_id"],
                det["class_name"],
                det["score"],
                *(box[k] for k in _BOX_KEYS),
                *(px[k] for k in _PIXEL_KEYS),
                "",
            ])
    return buf.getvalue().encode("utf-8")


class SummaryCounter:
    """:func:`summarize`, one record at a time (records read in parts: only the counts and
    the failures are kept)."""

    def __init__(self, names: Mapping[int, str]):
        self._lookup = _names_dict(names)
        self._per_class = {self._lookup[i]: 0 for i in sorted(self._lookup)}
        self._failures: list[dict] = []
        self._images = self._with_detections = self._boxes = 0
        self._total_score = 0.0

    def add(self, rec: dict) -> None:
        """Count one record (validated first; ValueError for a class id ``names`` lacks)."""
        validate_record(rec)
        self._images += 1
        if "error" in rec:
            self._failures.append({"image": rec["image"], "error": rec["error"]})
            return
        for det in rec["detections"]:
            if det["class_id"] not in self._lookup:
                raise ValueError(
                    f"image {rec['image']!r}: unknown class id {det['class_id']} "
                    "(not in the label map)"
                )
        if rec["detections"]:
            self._with_detections += 1
        for det in rec["detections"]:
            self._per_class[self._lookup[det["class_id"]]] += 1
            self._boxes += 1
            self._total_score += det["score"]

    def summary(self) -> dict:
        """The counts so far, as :func:`summarize` gives them (failures in the order added)."""
        boxes = self._boxes
        return {
            "images": self._images,
            "images_with_detections": self._with_detections,
            "failed": len(self._failures),
            "failures": list(self._failures),
            "boxes": boxes,
            "boxes_per_class": dict(self._per_class),
            "mean_score": round(self._total_score / boxes, 4) if boxes else None,
        }


def summarize(records: Iterable[dict], names: Mapping[int, str]) -> dict:
    """Counts over ``records``.

    ``{"images", "images_with_detections", "failed", "failures": [{"image", "error"}],
    "boxes", "boxes_per_class": {name: count} (every class of ``names`` in id order, 0
    included), "mean_score"}``; ``mean_score`` is the mean detection score rounded to 4
    decimals, or None without detections. A detection whose class id ``names`` does not know
    raises ValueError. (:class:`SummaryCounter` counts the same one record at a time.)
    """
    counter = SummaryCounter(names)
    for rec in records:
        counter.add(rec)
    return counter.summary()


# ------------------------------------------------------------------------------------ gallery

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5rem;
color:#222;background:#fafafa}
h1{margin:0 0 1rem}
.summary{background:#fff;border:1px solid #ddd;border-radius:6px;padding:1rem;margin-bottom:1.5rem}
.summary table{border-collapse:collapse;margin:.5rem 0}
.summary td,.summary th{padding:.1rem .8rem .1rem 0;text-align:left}
.summary td.n{text-align:right}
.zero{color:#aaa}
.failures li{color:#a00}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:1rem}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.5rem;margin:0}
.card img{display:block;max-width:100%;height:auto;margin:0 auto}
.card .key{font-family:ui-monospace,monospace;font-size:.85rem;word-break:break-all;
margin:.4rem 0}
.card ul{list-style:none;padding:0;margin:.2rem 0}
.card li{font-size:.9rem}
.swatch{display:inline-block;width:.8em;height:.8em;margin-right:.3em;vertical-align:middle;
border:1px solid #0004}
.card.failed{border-color:#d88;background:#fff5f5}
.card .error{color:#a00;font-size:.9rem;word-break:break-word}
.none{color:#888;font-size:.9rem}
.pages{margin:1rem 0}
.pages a,.pages strong{margin-right:.6rem}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _relative_href(href: str, what: str, key: str) -> str:
    """``href`` attribute-escaped, after checking it is a relative reference."""
    if not isinstance(href, str) or not href:
        raise ValueError(f"{what} for {key!r} must be a non-empty string, got {href!r}")
    parts = urlsplit(href)
    if parts.scheme or parts.netloc or href.startswith(("/", "\\")):
        raise ValueError(
            f"{what} for {key!r} must be a relative path (the page has to work from the store "
            f"and from a local copy), got {href!r}"
        )
    return _esc(href)


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _summary_html(summary: dict, failures_href: str | None = None) -> str:
    mean = summary.get("mean_score")
    parts = [
        '<section class="summary">',
        "<p>",
        f"<strong>{_esc(summary.get('images', 0))}</strong> images, ",
        f"<strong>{_esc(summary.get('images_with_detections', 0))}</strong> with detections, ",
        f"<strong>{_esc(summary.get('failed', 0))}</strong> failed; ",
        f"<strong>{_esc(summary.get('boxes', 0))}</strong> boxes",
        f", mean score {_esc(f'{mean:.3f}')}" if isinstance(mean, int | float) else "",
        "</p>",
    ]
    per_class = summary.get("boxes_per_class") or {}
    if per_class:
        parts.append("<table><thead><tr><th>Class</th><th>Boxes</th></tr></thead><tbody>")
        for name, count in per_class.items():
            cls = "" if count else ' class="zero"'
            parts.append(f'<tr{cls}><td>{_esc(name)}</td><td class="n">{_esc(count)}</td></tr>')
        parts.append("</tbody></table>")
    failures = summary.get("failures") or []
    if failures_href is not None and summary.get("failed"):
        href = _relative_href(failures_href, "failures_href", "the summary")
        n = summary["failed"]
        parts.append(
            f'<p class="failures"><a href="{href}">{_esc(n)} image{"s" if n != 1 else ""} '
            "could not be read: the list with the reasons</a></p>"
        )
    elif failures:
        parts.append('<h2>Failures</h2><ul class="failures">')
        for f in failures:
            parts.append(f"<li><code>{_esc(f.get('image'))}</code>: {_esc(f.get('error'))}</li>")
        parts.append("</ul>")
    parts.append("</section>")
    return "\n".join(parts)


def _card_html(
    rec: dict,
    thumbnails: Mapping[str, bytes],
    image_href: Callable[[str], str],
    json_href: Callable[[str], str],
) -> str:
    key = rec["image"]
    json_link = (
        f'<a class="json" href="{_relative_href(json_href(key), "json_href", key)}">JSON</a>'
    )
    if "error" in rec:
        return (
            '<figure class="card failed">'
            f'<figcaption><div class="key">{_esc(key)}</div>'
            f'<div class="error">{_esc(rec["error"])}</div>{json_link}</figcaption></figure>'
        )
    href = _relative_href(image_href(key), "image_href", key)
    thumb = thumbnails.get(key)
    if thumb:
        data = base64.b64encode(thumb).decode("ascii")
        picture = (
            f'<a href="{href}"><img src="data:image/jpeg;base64,{data}" alt="{_esc(key)}">'
            "</a>"
        )
    else:
        picture = f'<a class="none" href="{href}">(no thumbnail)</a>'
    if rec["detections"]:
        items = "".join(
            f'<li><span class="swatch" style="background:{_hex(class_color(d["class_id"]))}">'
            f"</span>{_esc(d['class_name'])} {d['score']:.2f}</li>"
            for d in rec["detections"]
        )
        labels = f"<ul>{items}</ul>"
    else:
        labels = '<div class="none">no detections</div>'
    return (
        f'<figure class="card">{picture}<figcaption><div class="key">{_esc(key)}</div>'
        f"{labels}{json_link}</figcaption></figure>"
    )


def gallery_html(
    records: Sequence[dict],
    thumbnails: Mapping[str, bytes],
    *,
    title: str,
    summary: dict,
    image_href: Callable[[str], str],
    json_href: Callable[[str], str],
    pages: Sequence[tuple[str, str | None]] = (),
    failures_href: str | None = None,
) -> str:
    """One self-contained HTML5 page: inline CSS, no JavaScript, no external URLs.

    A title, the ``summary`` (from :func:`summarize`: counts, boxes per class, failures with
    their reasons — or, with ``failures_href`` (relative), a link to a page listing the
    failures, e.g. :func:`failures_html`, instead of the list: a gallery split over many
    pages then does not repeat a long list on every page), then one card per record in
    record order: the thumbnail
    (``thumbnails[key]``, JPEG bytes, embedded as a ``data:image/jpeg;base64,`` URI) linking to
    the full-size annotated image at ``image_href(key)``, the key, the labels
    (``"Bengal 0.93"``) and a link to ``json_href(key)``. A failed record's card shows its
    error and no picture; a record without a thumbnail gets a text link instead.

    ``image_href``/``json_href`` must return relative references (no scheme, host or leading
    ``/``; ValueError otherwise) so that the page works both in the store and in a local copy;
    they are attribute-escaped here but not percent-encoded (do that in the callables if keys
    may contain ``#``, ``?`` or ``%``). Every string from the data is HTML-escaped.

    ``pages`` (optional) links the pages of a gallery split over several files: ``(label,
    href)`` pairs shown as a navigation bar above and below the cards, ``href`` None for the
    current page (shown unlinked); hrefs must be relative like the others.
    """
    for rec in records:
        validate_record(rec)
    cards = "\n".join(_card_html(r, thumbnails, image_href, json_href) for r in records)
    nav = _pages_html(pages)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_esc(title)}</h1>\n{nav}{_summary_html(summary, failures_href)}\n"
        f'<main class="grid">\n{cards}\n</main>\n{nav}</body>\n</html>\n'
    )


def _pages_html(pages: Sequence[tuple[str, str | None]]) -> str:
    """The page navigation bar of a multi-page gallery ('' for a single page)."""
    if not pages:
        return ""
    links = []
    for label, href in pages:
        if href is None:
            links.append(f'<strong aria-current="page">{_esc(label)}</strong>')
        else:
            links.append(f'<a href="{_relative_href(href, "page href", label)}">{_esc(label)}</a>')
    return f'<nav class="pages">Pages: {" ".join(links)}</nav>\n'


def failures_html(
    failures: Iterable[Mapping[str, Any]],
    *,
    title: str,
    json_href: Callable[[str], str],
    back_href: str | None = None,
) -> str:
    """One self-contained HTML5 page listing ``failures`` (``{"image", "error"}``, as in
    :func:`summarize`'s ``failures``): each image's key, linked to ``json_href(key)``, and the
    reason; ``back_href`` (optional) links back to the gallery. Hrefs must be relative
    (ValueError otherwise); every string from the data is HTML-escaped."""
    rows = []
    for f in failures:
        key = str(f.get("image"))
        href = _relative_href(json_href(key), "json_href", key)
        rows.append(
            f'<li><a href="{href}"><code>{_esc(key)}</code></a>: {_esc(f.get("error"))}</li>'
        )
    back = ""
    if back_href is not None:
        href = _relative_href(back_href, "back_href", "the page")
        back = f'<p><a href="{href}">Back to the gallery</a></p>\n'
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_esc(title)}</h1>\n{back}"
        '<ul class="failures">\n' + "\n".join(rows) + "\n</ul>\n</body>\n</html>\n"
    )
