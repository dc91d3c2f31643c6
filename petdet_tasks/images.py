"""Cheap checks (and repairs) of image files before they go into TFRecords.

:func:`check_image` answers, for the bytes of one dataset image: can the training input pipeline
(``tf.io.decode_jpeg``) use them as they are (``"ok"``), after re-encoding (``"repaired"``), or
not at all (``"quarantined"``)? It never raises for bad image bytes.

Two modes:

``"header"`` (default, ~tens of µs)
    Pillow parses only the header (format, mode, size). A JPEG in ``RGB`` or ``L`` is accepted
    *without decoding pixels* once two markers check out: SOI (``FF D8``) at the start and EOI
    (``FF D9``) at the end.

    Why the EOI check: it is the cheapest check that catches truncation, the commonest damage
    (interrupted downloads/extractions, short writes). Every encoder writes EOI last, so a file
    cut anywhere loses it; and ``FF D9`` cannot occur inside entropy-coded data, where every
    ``FF`` byte is stuffed as ``FF 00`` or is a restart marker ``FF D0``-``FF D7``. Looking at
    the last 64 bytes (after stripping trailing ``00``/whitespace padding) is O(1) whatever the
    file size, and ``tf.io.decode_jpeg`` fails on exactly these truncated files.

    What it misses: damage *inside* the file with an intact tail — flipped or overwritten bytes
    in the scan data, spliced-in markers, a premature EOI mid-scan. libjpeg often decodes such
    files "successfully" with gray or smeared blocks. Use ``mode="full"`` to look for those.
    It also rejects (false positive) a valid JPEG followed by more than 64 bytes of non-padding
    trailer data.

``"full"``
    Additionally decodes every JPEG (``Image.load()``, truncated data is an error) and walks its
    marker structure (segment lengths, scan data up to the next marker), so a decode error or
    an EOI marker followed by more image data (which libjpeg silently treats as "the rest is
    gray") quarantines the file. Costs a full decode (milliseconds per image).

In both modes an image of more than :data:`MAX_PIXELS` (50 million) pixels is quarantined as
``image too large: ...`` before any pixel is decoded, whatever its format: its header alone
says so (a 14 KB PNG can claim 121 Mpx, and decoding and re-encoding it costs ~600 MB in a
shard worker). Pillow's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, raised as an
error only at twice its 89 Mpx) is left alone; 50 Mpx is well above any photo of the dataset
and above a 48 Mpx camera's, and bounds a worker's memory for one repair to a few hundred MB.

Anything but a JPEG in ``RGB``/``L`` — PNG/GIF/BMP/WEBP/TIFF named ``.jpg``, CMYK/YCCK JPEGs,
alpha or palette images, 16-bit or float images — is fully decoded in either mode, converted to
RGB and re-encoded as a baseline JPEG (``"repaired"``):

* alpha (``RGBA``, ``LA``, ``PA``, ``RGBa``, or a ``transparency`` entry on ``P``/``L``/``RGB``/
  ``1``) is composited onto white;
* CMYK goes through Pillow's ``convert("RGB")`` (Pillow undoes Adobe's inverted CMYK on decode;
  ICC profiles are ignored);
* ``I;16*`` (16-bit) is scaled to 8 bits as ``round(v / 257)`` (0..65535 → 0..255, linear);
  ``I`` (32-bit int, what some plugins produce for 16-bit data) is clipped to 0..65535 and
  scaled the same way; ``F`` (float) is taken as 0..1 when all values lie in [0, 1] (scaled by
  255), else clipped to 0..255; NaN becomes 0;
* GIF/APNG/multi-page sources keep their first frame;
* every other mode (``P``, ``1``, ``LAB``, ``YCbCr``, ...) uses ``convert("RGB")``.

The output JPEG uses Pillow's defaults except ``quality`` (baseline, ``optimize=False``, default
chroma subsampling, no EXIF/ICC/comment/DPI), so the same input gives the same bytes. Width and
height are the source's: nothing is resized or rotated (EXIF orientation is not applied).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from io import BytesIO

from PIL import Image, ImageFile, UnidentifiedImageError

__all__ = ["CHECK_MODES", "MAX_PIXELS", "ImageCheck", "ImageHeader", "check_image", "read_header"]

CHECK_MODES = ("header", "full")

_JPEG_FORMATS = ("JPEG", "MPO")  # MPO: camera multi-picture files, a JPEG with extra images
_JPEG_OK_MODES = ("RGB", "L")
_SOI = b"\xff\xd8"
_EOI = b"\xff\xd9"
_PADDING = b"\x00 \t\r\n\x0b\x0c"  # trailing bytes ignored after the EOI marker
_EOI_WINDOW = 64  # EOI must lie in the last 64 bytes before the padding
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

_TRUNCATED = "truncated JPEG: no end-of-image marker"

#: Images with more pixels are quarantined from their header alone (module docstring).
MAX_PIXELS = 50_000_000


def _too_large(pixels: int, size: tuple[int, int] | None = None) -> str:
    dims = f" ({size[0]}x{size[1]})" if size else ""
    return (f"image too large: {pixels} pixels{dims}, over the limit of {MAX_PIXELS} "
            "(decompression-bomb guard)")


@dataclass(frozen=True)
class ImageCheck:
    """The verdict on one image; ``data`` is what to store (``None`` when quarantined)."""

    status: str  # "ok" | "repaired" | "quarantined"
    data: bytes | None
    width: int | None
    height: int | None
    source_format: str | None  # PIL format name of what the bytes really are
    source_mode: str | None  # PIL mode of the source
    reason: str | None  # what was repaired / why quarantined; None when ok

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _quarantine(
    reason: str,
    size: tuple[int, int] | None = None,
    fmt: str | None = None,
    mode: str | None = None,
) -> ImageCheck:
    w, h = size if size else (None, None)
    return ImageCheck("quarantined", None, w, h, fmt, mode, reason)


def _content_end(data: bytes) -> int:
    """``len(data)`` minus trailing padding, looking at the tail only (4 KiB at a time)."""
    end = len(data)
    while end:
        start = max(0, end - 4096)
        kept = len(data[start:end].rstrip(_PADDING))
        if kept:
            return start + kept
        end = start
    return 0


def _has_eoi(data: bytes) -> bool:
    end = _content_end(data)
    return data.rfind(_EOI, max(2, end - _EOI_WINDOW), end) != -1


def _jpeg_structure_error(data: bytes) -> str | None:
    """Walk the JPEG markers from SOI to EOI; describe the first structural problem, if any.

    Segments are skipped by their length; after each SOS the entropy-coded data is scanned (with
    ``bytes.find``, not per byte) to the next marker that is not a stuffed ``FF 00``, a restart
    marker or fill. The first EOI ends the image: what follows may be padding, up to 64 bytes
    of junk, or another JPEG (MPO) — anything else means the EOI came too early.
    """
    n = len(data)
    if not data.startswith(_SOI):
        return "not a JPEG: missing start-of-image marker"
    pos = 2
    while True:
        if pos >= n:
            return _TRUNCATED
        if data[pos] != 0xFF:
            return f"corrupt JPEG: expected a marker at offset {pos}, found 0x{data[pos]:02X}"
        while pos < n and data[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos >= n:
            return _TRUNCATED
        marker, at = data[pos], pos - 1
        pos += 1
        if marker == 0xD9:
            eoi_at = at
            break
        if marker == 0xD8:
            return f"corrupt JPEG: second start-of-image marker at offset {at}"
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no payload
            continue
        if marker == 0x00:
            return f"corrupt JPEG: stuffed byte outside scan data at offset {at}"
        if pos + 2 > n:
            return _TRUNCATED
        length = (data[pos] << 8) | data[pos + 1]
        if length < 2:
            return f"corrupt JPEG: bad segment length {length} at offset {at}"
        pos += length
        if pos > n:
            return _TRUNCATED
        if marker == 0xDA:  # SOS: entropy-coded data up to the next real marker
            while True:
                i = data.find(b"\xff", pos)
                if i < 0 or i + 1 >= n:
                    return _TRUNCATED
                following = data[i + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:
                    pos = i + 2
                elif following == 0xFF:
                    pos = i + 1
                else:
                    pos = i
                    break
    rest_end = _content_end(data)
    if rest_end - pos > _EOI_WINDOW and not data.startswith(b"\xff\xd8\xff", pos):
        return (
            f"corrupt JPEG: end-of-image marker at offset {eoi_at} is followed by "
            f"{rest_end - pos} more bytes of data"
        )
    return None


def _decode(img: Image.Image) -> None:
    """Decode all pixels; truncated data is an error (not gray-filled) whatever the caller set."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    img.load()


def _scale_to_l(img: Image.Image) -> tuple[Image.Image, str]:
    """16-bit / 32-bit int / float grayscale → 8-bit ``L`` (rules in the module docstring)."""
    import numpy as np  # only here: a rare image kind, and numpy is 0.2 s of every import

    mode = img.mode
    a = np.asarray(img)
    if mode == "F":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a, how = a * 255.0, "float 0..1 scaled to 8-bit (x255)"
        else:
            how = "float clipped to 0..255"
        out = np.rint(np.clip(a, 0.0, 255.0)).astype(np.uint8)
    else:
        a = np.clip(a.astype(np.int64), 0, 65535)
        out = ((a * 255 + 32767) // 65535).astype(np.uint8)
        how = "16-bit scaled to 8-bit (value/257)"
        if mode == "I":
            how = "32-bit int clipped to 0..65535, " + how
    return Image.fromarray(out, "L").convert("RGB"), f"{mode}: {how}"


def _to_rgb(img: Image.Image, fmt: str) -> tuple[Image.Image, str | None]:
    """Convert a decoded image to RGB; return it with a note on what was done (None: nothing)."""
    mode = img.mode
    has_transparency = "transparency" in img.info and mode in ("P", "L", "RGB", "1")
    if mode in _ALPHA_MODES or has_transparency:
        rgba = img.convert("RGBA") if mode != "La" else img.convert("LA").convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        label = f"{mode} with transparency" if has_transparency else mode
        return (
            Image.alpha_composite(white, rgba).convert("RGB"),
            f"{label}: alpha dropped (composited on white)",
        )
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _scale_to_l(img)
    if mode == "RGB":
        return img, None
    if mode == "P":
        return img.convert("RGB"), "P: palette expanded to RGB"
    where = " JPEG" if fmt in _JPEG_FORMATS else ""
    return img.convert("RGB"), f"{mode}{where} converted to RGB"


def _frames_note(img: Image.Image) -> str | None:
    try:
        frames = int(getattr(img, "n_frames", 1))
    except Exception:  # counting frames reads the file; a broken later frame is not our problem
        return None
    return f"first of {frames} frames kept" if frames > 1 else None


def _repair(img: Image.Image, fmt: str, name: str, jpeg_quality: int) -> tuple[bytes, str]:
    notes: list[str] = []
    if fmt not in _JPEG_FORMATS:
        suffix = os.path.splitext(name)[1]
        notes.append(
            f"{fmt} named {suffix} re-encoded as JPEG" if suffix else f"{fmt} re-encoded as JPEG"
        )
    frames = _frames_note(img)
    if frames:
        img.seek(0)
        notes.append(frames)
    rgb, note = _to_rgb(img, fmt)
    if note:
        notes.append(note)
    rgb.info = {}  # no comment/EXIF/ICC/DPI carried over into the output
    buf = BytesIO()
    rgb.save(buf, "JPEG", quality=jpeg_quality, optimize=False)
    return buf.getvalue(), "; ".join(notes)


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # not DHT, JPG, DAC
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn, TEM: no length field


def _jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's start-of-frame segment, walking the marker
    segments before it by their lengths (a few µs, no Pillow). None when the structure is
    anything but plain — the caller then asks Pillow, which explains what is wrong."""
    if not data.startswith(_SOI):
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        while pos < end and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= end:
            return None
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if marker in (0xD8, 0xD9, 0xDA) or pos + 2 > end:
            return None  # SOI again, EOI or scan data before any frame header
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2:
            return None
        if marker in _SOF_MARKERS:
            if length < 8 or pos + 8 > end:
                return None
            height = int.from_bytes(data[pos + 3:pos + 5], "big")
            width = int.from_bytes(data[pos + 5:pos + 7], "big")
            components = data[pos + 7]
            if not width or not height:
                return None  # height defined later by a DNL marker: let Pillow handle it
            return width, height, components
        pos += length
    return None


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, no pixel decoded (:func:`read_header`)."""

    width: int | None  # None: Pillow refused the header as a decompression bomb
    height: int | None
    pixels: int
    format: str  # PIL format name ("JPEG", "PNG", "GIF", ...)
    mode: str | None  # PIL mode; None for a JPEG read by the fast path
    transparent: bool  # an alpha channel or a ``transparency`` entry (:func:`check_image`
    # composites such images onto white)

    @property
    def too_large(self) -> str | None:
        """The reason :func:`check_image` quarantines the image for its size, or None."""
        if self.pixels <= MAX_PIXELS:
            return None
        size = (self.width, self.height) if self.width and self.height else None
        return _too_large(self.pixels, size)


def read_header(data: bytes) -> ImageHeader | None:
    """The image's size, format and whether it has transparency, from its header alone
    (a JPEG's frame header in a few µs, else Pillow's header parse); None when no header can
    be read (a decoder then says what is wrong). Never raises for bad bytes.

    The same reading :func:`check_image` does before it decodes anything: the same size
    limit (:attr:`ImageHeader.too_large`) and the same notion of transparency."""
    frame = _jpeg_frame(data)
    if frame is not None:
        width, height, _ = frame
        return ImageHeader(width, height, width * height, "JPEG", None, False)
    try:
        img = Image.open(BytesIO(data))
    except Image.DecompressionBombError as e:  # over twice Pillow's limit: no size known
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        return ImageHeader(None, None, int(pixels[1]), "unknown", None, False) if pixels \
            else None
    except Exception:  # not an image, or a header a plugin chokes on
        return None
    with img:
        mode = img.mode
        transparent = mode in _ALPHA_MODES or (
            "transparency" in img.info and mode in ("P", "L", "RGB", "1"))
        width, height = img.size
        return ImageHeader(width, height, width * height, img.format or "unknown", mode,
                           transparent)


def check_image(
    data: bytes, *, name: str = "", mode: str = "header", jpeg_quality: int = 95
) -> ImageCheck:
    """Check one image's bytes; see the module docstring for the modes and repairs.

    ``name`` (the file name) is only used in messages. Raises ``ValueError`` for a bad ``mode``
    or ``jpeg_quality``, never for bad image bytes.
    """
    if mode not in CHECK_MODES:
        raise ValueError(f"mode must be one of {CHECK_MODES}, got {mode!r}")
    if not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be an int in 1..100, got {jpeg_quality!r}")
    if not isinstance(data, bytes):
        data = bytes(data)
    if not data:
        return _quarantine("empty file")

    if mode == "header":
        # fast path for the common case, a plain RGB or grayscale JPEG: read the frame header
        # ourselves (Pillow's header parse costs ~5x more) and check the end-of-image marker
        frame = _jpeg_frame(data)
        if frame is not None and frame[2] in (1, 3):
            width, height, components = frame
            src_mode = "L" if components == 1 else "RGB"
            known = {"size": (width, height), "fmt": "JPEG", "mode": src_mode}
            if width * height > MAX_PIXELS:
                return _quarantine(_too_large(width * height, (width, height)), **known)
            if not _has_eoi(data):
                return _quarantine(_TRUNCATED, **known)
            return ImageCheck("ok", data, width, height, "JPEG", src_mode, None)

    try:
        img = Image.open(BytesIO(data))
    except UnidentifiedImageError:
        return _quarantine("cannot identify image file")
    except Image.DecompressionBombError as e:  # over twice Pillow's limit: no size known
        frame = _jpeg_frame(data)
        if frame is not None:
            size = frame[:2]
            return _quarantine(_too_large(size[0] * size[1], size), size=size, fmt="JPEG")
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        return _quarantine(_too_large(int(pixels[1])) if pixels else f"image too large: {e}")
    except Exception as e:  # a plugin choking on a mangled header: SyntaxError, OSError, ...
        return _quarantine(f"cannot read image header: {type(e).__name__}: {e}")

    with img:
        fmt, src_mode, size = img.format or "unknown", img.mode, img.size
        known = {"size": size, "fmt": fmt, "mode": src_mode}
        if size[0] * size[1] > MAX_PIXELS:
            return _quarantine(_too_large(size[0] * size[1], size), **known)
        if fmt in _JPEG_FORMATS:
            if not data.startswith(_SOI):
                return _quarantine("not a JPEG: missing start-of-image marker", **known)
            if not _has_eoi(data):
                return _quarantine(_TRUNCATED, **known)

        if fmt in _JPEG_FORMATS and src_mode in _JPEG_OK_MODES and mode == "header":
            return ImageCheck("ok", data, size[0], size[1], fmt, src_mode, None)

        try:
            _decode(img)
        except Exception as e:
            return _quarantine(f"decode failed: {e}", **known)
        if fmt in _JPEG_FORMATS and mode == "full":
            problem = _jpeg_structure_error(data)
            if problem:
                return _quarantine(problem, **known)
        if fmt in _JPEG_FORMATS and src_mode in _JPEG_OK_MODES:
            return ImageCheck("ok", data, size[0], size[1], fmt, src_mode, None)

        try:
            jpeg, reason = _repair(img, fmt, name, jpeg_quality)
        except Exception as e:
            return _quarantine(f"cannot convert {fmt} {src_mode} to RGB JPEG: {e}", **known)
        return ImageCheck("repaired", jpeg, size[0], size[1], fmt, src_mode, reason)
