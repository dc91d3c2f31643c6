"""petdet_tasks.images: header checks, full decodes, repairs and quarantines.

Every input is built here with PIL/numpy; nothing is downloaded.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from petdet_tasks.images import CHECK_MODES, ImageCheck, check_image

W, H = 160, 120


def photo(w: int = W, h: int = H) -> np.ndarray:
    """A smooth RGB test picture with mild noise (JPEG-friendly, not trivially compressible)."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / w, y * 255 / h, (x + y) * 255 / (w + h)], axis=-1)
    noise = np.random.default_rng(7).integers(-5, 6, rgb.shape)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


def alpha(w: int = W, h: int = H) -> np.ndarray:
    """Alpha from fully transparent (left) to opaque (right)."""
    return np.tile(np.linspace(0, 255, w), (h, 1)).astype(np.uint8)


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def on_white(rgb: np.ndarray, a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)[..., None] / 255
    return rgb.astype(np.float64) * a + 255 * (1 - a)


RGB = photo()
JPEG = encode(Image.fromarray(RGB), "JPEG", quality=90)
BIG_JPEG = encode(Image.fromarray(photo(500, 375)), "JPEG", quality=90)


def decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def assert_quarantined(result: ImageCheck, reason: str) -> None:
    assert result.status == "quarantined", result.reason
    assert result.data is None
    assert reason in result.reason


def scan_start(data: bytes) -> int:
    sos = data.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")


# ------------------------------------------------------------------------------ accepted


def test_rgb_jpeg_is_ok_without_decoding_pixels(monkeypatch):
    def no_decode(self):
        raise AssertionError("header mode must not decode pixels")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    result = check_image(JPEG, name="Abyssinian_1.jpg")
    assert result == ImageCheck("ok", JPEG, W, H, "JPEG", "RGB", None)
    assert result.data is JPEG  # the original bytes, not a copy or a re-encode


@pytest.mark.parametrize("mode", CHECK_MODES)
def test_grayscale_jpeg_is_ok(mode):
    data = encode(Image.fromarray(RGB).convert("L"), "JPEG")
    assert check_image(data, mode=mode) == ImageCheck("ok", data, W, H, "JPEG", "L", None)


@pytest.mark.parametrize("mode", CHECK_MODES)
@pytest.mark.parametrize("tail", [b"\x00" * 2000, b"\r\n \t", b"\x00junk\x00", b"x" * 60], ids=repr)
def test_padding_and_a_little_junk_after_eoi_are_ok(mode, tail):
    result = check_image(JPEG + tail, mode=mode)
    assert result.status == "ok", result.reason
    assert result.data == JPEG + tail


@pytest.mark.parametrize(
    "params",
    [
        {"progressive": True},
        {"optimize": True},
        {"restart_marker_blocks": 3},
        {"comment": b"a comment with \xff\xd9 inside", "icc_profile": b"\xff\xd9" * 300},
        {"subsampling": 0, "quality": 100},
    ],
    ids=["progressive", "optimized", "restart-markers", "fake-eoi-in-segments", "444-q100"],
)
def test_valid_jpeg_variants_pass_the_full_check(params):
    data = encode(Image.fromarray(RGB), "JPEG", **params)
    assert check_image(data, mode="full").status == "ok"


def test_mpo_multi_picture_jpeg_is_ok_in_both_modes():
    img = Image.fromarray(RGB)
    data = encode(
        img, "MPO", save_all=True, append_images=[img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    )
    for mode in CHECK_MODES:
        result = check_image(data, mode=mode)
        # the header fast path reads the first frame as the plain JPEG it is
        assert (result.status, result.data) == ("ok", data)
        assert result.source_format in ("MPO", "JPEG")


# ------------------------------------------------------------------------------ repaired


def _p_with_transparency() -> tuple[bytes, np.ndarray]:
    img = Image.fromarray(RGB).quantize(16)
    idx = np.asarray(img)
    data = encode(img, "PNG", transparency=0)
    expected = np.asarray(img.convert("RGB")).astype(np.float64)
    expected[idx == 0] = 255
    return data, expected


def _gif() -> tuple[bytes, np.ndarray]:
    img = Image.fromarray(RGB).quantize(256)
    return encode(img, "GIF"), np.asarray(img.convert("RGB"))


def _sixteen_bit() -> tuple[bytes, np.ndarray]:
    gray16 = (RGB[..., 0].astype(np.uint16) * 257) + 100  # full 16-bit range, low byte busy
    img = Image.fromarray(gray16)
    assert img.mode == "I;16"
    expected = np.rint(gray16 / 257)
    return encode(img, "PNG"), np.repeat(expected[..., None], 3, axis=-1)


def _float() -> tuple[bytes, np.ndarray]:
    f = RGB[..., 1].astype(np.float32) / 255  # a 0..1 float image
    expected = np.repeat(np.rint(f * 255)[..., None], 3, axis=-1)
    return encode(Image.fromarray(f, "F"), "TIFF"), expected


REPAIRS = {
    # name: (build() -> (bytes, expected RGB pixels), source format, mode, words in the reason)
    "png-as-jpg": (
        lambda: (encode(Image.fromarray(RGB), "PNG"), RGB),
        "PNG",
        "RGB",
        ["PNG named .jpg re-encoded as JPEG"],
    ),
    "gif-as-jpg": (_gif, "GIF", "P", ["GIF named .jpg", "P: palette"]),
    "bmp-as-jpg": (
        lambda: (encode(Image.fromarray(RGB), "BMP"), RGB),
        "BMP",
        "RGB",
        ["BMP named .jpg"],
    ),
    "webp-as-jpg": (
        lambda: (encode(Image.fromarray(RGB), "WEBP", lossless=True), RGB),
        "WEBP",
        "RGB",
        ["WEBP named .jpg"],
    ),
    "cmyk-jpeg": (
        lambda: (encode(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=95), RGB),
        "JPEG",
        "CMYK",
        ["CMYK JPEG converted to RGB"],
    ),
    "rgba-png": (
        lambda: (
            encode(Image.fromarray(np.dstack([RGB, alpha()]), "RGBA"), "PNG"),
            on_white(RGB, alpha()),
        ),
        "PNG",
        "RGBA",
        ["PNG named .jpg", "RGBA: alpha dropped (composited on white)"],
    ),
    "la-png": (
        lambda: (
            encode(Image.fromarray(np.dstack([RGB[..., 0], alpha()]), "LA"), "PNG"),
            on_white(np.repeat(RGB[..., :1], 3, axis=-1), alpha()),
        ),
        "PNG",
        "LA",
        ["LA: alpha dropped"],
    ),
    "p-with-transparency": (
        _p_with_transparency,
        "PNG",
        "P",
        ["P with transparency: alpha dropped (composited on white)"],
    ),
    "16-bit-png": (_sixteen_bit, "PNG", "I;16", ["I;16: 16-bit scaled to 8-bit"]),
    "float-tiff": (_float, "TIFF", "F", ["TIFF named .jpg", "F: float 0..1"]),
    "bilevel-png": (
        lambda: (
            encode(Image.fromarray(RGB[..., 0] > 127), "PNG"),
            np.repeat(np.where(RGB[..., :1] > 127, 255, 0), 3, axis=-1),
        ),
        "PNG",
        "1",
        ["1 converted to RGB"],
    ),
}


@pytest.mark.parametrize("mode", CHECK_MODES)
@pytest.mark.parametrize("case", list(REPAIRS))
def test_repairs_give_an_rgb_jpeg_of_the_same_size_and_content(case, mode):
    build, fmt, src_mode, words = REPAIRS[case]
    data, expected = build()
    result = check_image(data, name=f"{case}.jpg", mode=mode)
    assert result.status == "repaired", result.reason
    assert (result.width, result.height) == (W, H)
    assert (result.source_format, result.source_mode) == (fmt, src_mode)
    for word in words:
        assert word in result.reason
    out = decoded(result.data)
    assert (out.format, out.mode, out.size) == ("JPEG", "RGB", (W, H))
    # JPEG at quality 95: a small mean error (a wrong conversion, e.g. alpha ignored, is ~75)
    assert mean_abs_diff(out, expected) < 4
    assert not {"icc_profile", "exif", "comment"} & out.info.keys()
    assert check_image(result.data, mode="full").status == "ok"  # the repair is final


def test_repair_is_deterministic_and_honours_quality():
    data = encode(Image.fromarray(np.dstack([RGB, alpha()]), "RGBA"), "PNG")
    first = check_image(data)
    assert check_image(data) == first
    low = check_image(data, jpeg_quality=30)
    assert low.status == "repaired" and len(low.data) < len(first.data)


def test_repair_drops_metadata_from_the_source():
    img = Image.fromarray(RGB).convert("CMYK")
    data = encode(
        img, "JPEG", icc_profile=b"not really a profile", comment=b"hello", dpi=(300, 300)
    )
    result = check_image(data)
    assert result.status == "repaired"
    out = decoded(result.data)
    assert not {"icc_profile", "exif", "comment"} & out.info.keys()
    assert out.info.get("dpi", (72, 72)) != (300, 300)


def test_reason_without_a_name_names_the_format():
    result = check_image(encode(Image.fromarray(RGB), "PNG"))
    assert result.reason == "PNG re-encoded as JPEG"


def test_animated_gif_keeps_the_first_frame():
    frames = [Image.fromarray(RGB).quantize(64), Image.fromarray(255 - RGB).quantize(64)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    result = check_image(data, name="x.jpg")
    assert result.status == "repaired"
    assert "first of 2 frames kept" in result.reason
    assert mean_abs_diff(decoded(result.data), frames[0].convert("RGB")) < 4


# ---------------------------------------------------------------------------- quarantined


@pytest.mark.parametrize("mode", CHECK_MODES)
def test_truncated_jpeg_is_quarantined_by_the_eoi_check(mode):
    data = BIG_JPEG[: int(len(BIG_JPEG) * 0.6)]
    result = check_image(data, mode=mode)
    assert_quarantined(result, "truncated JPEG: no end-of-image marker")
    assert (result.width, result.height, result.source_format) == (500, 375, "JPEG")


def test_truncated_jpeg_padded_with_zeros_is_still_truncated():
    data = BIG_JPEG[: int(len(BIG_JPEG) * 0.6)] + b"\x00" * 5000
    assert_quarantined(check_image(data), "no end-of-image marker")


def test_long_trailer_after_eoi_is_quarantined():
    # The documented false positive of the cheap check: > 64 bytes of non-padding after EOI.
    assert_quarantined(check_image(JPEG + b"trailer!" * 20), "no end-of-image marker")


def test_mid_scan_corruption_passes_the_header_check_but_not_the_full_one():
    start = scan_start(BIG_JPEG)
    mid = (start + len(BIG_JPEG)) // 2
    data = BIG_JPEG[:mid] + b"\xff\xd8" * 8 + BIG_JPEG[mid + 16 :]  # SOI markers inside the scan
    assert data.endswith(b"\xff\xd9") and len(data) == len(BIG_JPEG)
    with pytest.raises(OSError):  # PIL's decoder really fails on this file
        decoded(data)
    assert check_image(data, mode="header").status == "ok"
    assert_quarantined(check_image(data, mode="full"), "decode failed: ")


def test_premature_eoi_in_the_scan_is_caught_by_the_full_check():
    # libjpeg (and so PIL and tf.io.decode_jpeg) stops at the early EOI and fills the rest of
    # the picture with gray *without an error*; the marker walk of mode="full" catches it.
    start = scan_start(BIG_JPEG)
    mid = (start + len(BIG_JPEG)) // 2
    data = BIG_JPEG[:mid] + b"\xff\xd9" * 4 + BIG_JPEG[mid + 8 :]
    assert decoded(data).size == (500, 375)  # PIL: no complaint
    assert check_image(data, mode="header").status == "ok"
    assert_quarantined(check_image(data, mode="full"), f"end-of-image marker at offset {mid}")


def test_full_mode_ignores_a_global_load_truncated_images(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    png = encode(Image.fromarray(RGB), "PNG")
    assert_quarantined(check_image(png[:-200], name="x.jpg"), "decode failed: ")


@pytest.mark.parametrize("mode", CHECK_MODES)
@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (np.random.default_rng(1).bytes(5000), "cannot identify image file"),
        (b"This is not an image.\n" * 50, "cannot identify image file"),
        (b"\xff\xd8\xff" + b"\x00" * 100, "cannot"),  # a JPEG signature and nothing else
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "cannot"),  # a PNG signature and garbage
    ],
    ids=["empty", "random", "text", "jpeg-signature-only", "png-signature-only"],
)
def test_not_images_are_quarantined(data, reason, mode):
    result = check_image(data, mode=mode)
    assert_quarantined(result, reason)
    assert (result.width, result.height) == (None, None)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="mode must be one of"):
        check_image(JPEG, mode="deep")
    with pytest.raises(ValueError, match="jpeg_quality"):
        check_image(JPEG, jpeg_quality=0)


def test_bytes_like_input_is_accepted():
    result = check_image(bytearray(JPEG))
    assert result.status == "ok" and result.data == JPEG and isinstance(result.data, bytes)


def test_header_fast_path_agrees_with_pillow_on_real_jpegs():
    """The marker walk that reads the frame header without Pillow gives Pillow's answer."""
    from petdet_tasks.images import _jpeg_frame

    rng = np.random.default_rng(0)
    for mode, size, kw in [("RGB", (37, 23), {}), ("L", (64, 48), {}),
                           ("RGB", (120, 90), {"progressive": True}),
                           ("RGB", (50, 40), {"exif": b"Exif\x00\x00" + b"\x00" * 200}),
                           ("CMYK", (30, 20), {})]:
        arr = rng.integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8).squeeze()
        buf = io.BytesIO()
        Image.fromarray(arr, mode).save(buf, "JPEG", **kw)
        data = buf.getvalue()
        with Image.open(io.BytesIO(data)) as img:
            expected = (*img.size, len(img.getbands()))
        assert _jpeg_frame(data) == expected
        result = check_image(data)
        assert (result.width, result.height) == img.size
        assert result.status == ("repaired" if mode == "CMYK" else "ok")
    assert _jpeg_frame(b"\xff\xd8\xff") is None
    assert _jpeg_frame(b"GIF89a") is None


def _claiming_size(jpeg: bytes, w: int, h: int) -> bytes:
    """``jpeg`` with its frame header (SOF0) patched to claim ``w`` x ``h``."""
    at = jpeg.index(b"\xff\xc0") + 2  # the segment length, then precision, height, width
    return jpeg[:at + 3] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + jpeg[at + 7:]


def _png_header_only(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims ``w`` x ``h`` (a decompression bomb's first bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("data,w,h", [
    (_claiming_size(JPEG, 50000, 50000), 50000, 50000),  # over Pillow's hard limit too
    (_claiming_size(JPEG, 8000, 7000), 8000, 7000),  # under Pillow's limits, over petdet's
    (_png_header_only(11000, 11000), 11000, 11000),  # 121 Mpx: Pillow would only warn
], ids=["jpeg-2500mpx", "jpeg-56mpx", "png-121mpx"])
def test_images_over_max_pixels_are_quarantined_in_both_modes_alike(data, w, h):
    from petdet_tasks.images import MAX_PIXELS

    reason = (f"image too large: {w * h} pixels ({w}x{h}), over the limit of {MAX_PIXELS} "
              "(decompression-bomb guard)")
    for mode in CHECK_MODES:
        result = check_image(data, name="bomb.jpg", mode=mode)
        assert result.status == "quarantined" and result.data is None, (mode, result.reason)
        assert result.reason == reason, (mode, result.reason)
        assert (result.width, result.height) == (w, h)


def test_an_image_at_max_pixels_is_not_refused_for_its_size():
    from petdet_tasks.images import MAX_PIXELS

    assert MAX_PIXELS == 50_000_000
    result = check_image(_claiming_size(JPEG, 10000, 5000), mode="header")
    assert result.status == "ok", result.reason
