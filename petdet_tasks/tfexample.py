"""``tf.train.Example`` records and TFRecord files, byte-compatible with TensorFlow, without it.

TFRecord shards are written by many worker processes at once; importing TensorFlow costs seconds
and hundreds of MB per process, so the writers use this module instead. It never imports
TensorFlow (or protobuf): the few messages involved are encoded by hand.

Wire format (``tensorflow/core/example/{example,feature}.proto``)::

    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }  # entry {string key = 1; Feature value = 2;}
    Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                            Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }
    FloatList { repeated float value = 1 [packed = true]; }   # little-endian float32
    Int64List { repeated int64 value = 1 [packed = true]; }   # varints; negatives take 10 bytes

:func:`encode_example` output is byte-identical to
``tf.train.Example(...).SerializeToString(deterministic=True)`` of the protobuf runtime TensorFlow
ships with (upb). Map entries come in upb's deterministic order: bytewise ascending on the UTF-8
key, and where one key is a prefix of another the *longer* key first (``"ab"`` before ``"a"``,
``""`` last). C++ protobuf puts the shorter key first; parsers do not care either way, and the
unit tests pin the order against the installed runtime.

Cost: a :class:`Feature` keeps references to its values (no copy) and :func:`encode_example`
joins everything with one ``b"".join`` — a 100 KB image is copied exactly once.

TFRecord framing, per record: ``uint64 length | uint32 masked_crc32c(length) | data |
uint32 masked_crc32c(data)``, all little-endian, CRC-32C from ``google_crc32c`` (C code).
"""

from __future__ import annotations

import functools
import hashlib
import math
import operator
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import google_crc32c

__all__ = [
    "Feature",
    "TFRecordWriter",
    "bytes_feature",
    "decode_example",
    "OD_API_KEYS",
    "encode_example",
    "encode_od_example",
    "float_feature",
    "int64_feature",
    "masked_crc32c",
    "read_tfrecords",
]

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_UINT64_MASK = (1 << 64) - 1
_FLOAT32_MAX = 3.4028234663852886e38

# Tags: (field_number << 3) | wire_type; wire type 2 = length-delimited, 0 = varint, 5 = 32-bit.
_TAG_1_LEN = b"\x0a"  # Example.features, Features.feature, entry.key, Feature.bytes_list, value
_TAG_2_LEN = b"\x12"  # map entry value, Feature.float_list
_TAG_3_LEN = b"\x1a"  # Feature.int64_list

_ONE_BYTE = [bytes((i,)) for i in range(128)]


def _varint(n: int) -> bytes:
    """Unsigned LEB128 varint of ``0 <= n < 2**64``."""
    if n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@dataclass(frozen=True, slots=True, repr=False)
class Feature:
    """One encoded ``tf.train.Feature``; build it with the ``*_feature`` functions.

    Opaque: ``_chunks`` concatenated are the serialized Feature message (``_size`` bytes). The
    chunks reference the caller's bytes values, so building a Feature copies no image data.
    """

    _kind: str
    _count: int
    _size: int
    _chunks: tuple[bytes, ...]

    def __repr__(self) -> str:
        return f"<Feature {self._kind}[{self._count}] {self._size} bytes>"


def _wrap(kind: str, count: int, tag: bytes, body: tuple[bytes, ...], body_size: int) -> Feature:
    header = tag + _varint(body_size)
    return Feature(kind, count, len(header) + body_size, (header, *body))


def _is_scalar(values: object) -> bool:
    if isinstance(values, (str, bytes, bytearray, memoryview)):  # not a sequence of numbers
        raise TypeError(f"expected a number or a sequence of numbers, got {type(values).__name__}")
    try:
        iter(values)  # type: ignore[call-overload]
    except TypeError:
        return True
    return False


def bytes_feature(values: bytes | str | Sequence[bytes | str]) -> Feature:
    """A ``bytes_list`` feature. ``str`` values are UTF-8 encoded; one value or a sequence."""
    if isinstance(values, (bytes, bytearray, memoryview, str)):
        values = (values,)
    chunks: list[bytes] = []
    size = 0
    count = 0
    for v in values:
        if isinstance(v, str):
            v = v.encode("utf-8")
        elif not isinstance(v, bytes):
            if not isinstance(v, (bytearray, memoryview)):
                raise TypeError(f"bytes_feature: expected bytes or str, got {type(v).__name__}")
            v = bytes(v)  # freeze a mutable buffer: the Feature must not change under us
        length = _varint(len(v))
        chunks.append(_TAG_1_LEN)
        chunks.append(length)
        chunks.append(v)
        size += 1 + len(length) + len(v)
        count += 1
    return _wrap("bytes_list", count, _TAG_1_LEN, tuple(chunks), size)


def int64_feature(values: int | Sequence[int]) -> Feature:
    """An ``int64_list`` feature (packed): Python/numpy ints; bools refused, as by protobuf."""
    if _is_scalar(values):
        values = (values,)  # type: ignore[assignment]
    parts: list[bytes] = []
    for v in values:  # type: ignore[union-attr]
        if isinstance(v, bool):
            raise TypeError("int64_feature: expected int, got bool")
        try:
            n = operator.index(v)
        except TypeError:
            raise TypeError(f"int64_feature: expected int, got {type(v).__name__}") from None
        if not _INT64_MIN <= n <= _INT64_MAX:
            raise ValueError(f"int64_feature: {n} is out of the int64 range")
        parts.append(_varint(n & _UINT64_MASK))
    if not parts:
        return Feature("int64_list", 0, 2, (_TAG_3_LEN + b"\x00",))
    packed = b"".join(parts)
    body = _TAG_1_LEN + _varint(len(packed)) + packed
    return _wrap("int64_list", len(parts), _TAG_3_LEN, (body,), len(body))


def float_feature(values: float | Sequence[float]) -> Feature:
    """A ``float_list`` feature (packed float32; values are rounded to float32 like protobuf)."""
    if _is_scalar(values):
        values = (values,)  # type: ignore[assignment]
    floats: list[float] = []
    for v in values:  # type: ignore[union-attr]
        if isinstance(v, (str, bytes)):
            raise TypeError(f"float_feature: expected float, got {type(v).__name__}")
        try:
            f = float(v)
        except TypeError:
            raise TypeError(f"float_feature: expected float, got {type(v).__name__}") from None
        if abs(f) > _FLOAT32_MAX and math.isfinite(f):
            f = _float32_round(f)
        floats.append(f)
    if not floats:
        return Feature("float_list", 0, 2, (_TAG_2_LEN + b"\x00",))
    packed = struct.pack(f"<{len(floats)}f", *floats)
    body = _TAG_1_LEN + _varint(len(packed)) + packed
    return _wrap("float_list", len(floats), _TAG_2_LEN, (body,), len(body))


def _float32_round(f: float) -> float:
    """What a C float cast does with a double beyond float32's range: round to max or inf."""
    try:
        struct.pack("<f", f)
    except OverflowError:
        return math.copysign(math.inf, f)
    return f  # within half an ulp of FLT_MAX: struct rounds it down itself


def _map_order(key: bytes) -> bytes:
    # upb's deterministic order (see the module docstring): 0xFF never occurs in UTF-8, so it
    # works as a terminator that sorts after every byte — a key sorts after its extensions.
    return key + b"\xff"


@functools.lru_cache(maxsize=1024)
def _key_parts(key: str) -> tuple[bytes, bytes]:
    """(sort order, encoded ``key`` field of the map entry) — the same few keys every time."""
    kb = key.encode("utf-8")
    return _map_order(kb), _TAG_1_LEN + _varint(len(kb)) + kb


def encode_example(features: Mapping[str, Feature]) -> bytes:
    """Serialize a ``tf.train.Example`` holding ``features`` (deterministic byte output)."""
    entries: list[tuple[bytes, bytes, Feature]] = []
    for key, feature in features.items():
        if not isinstance(key, str):
            raise TypeError(f"encode_example: feature names must be str, got {key!r}")
        if not isinstance(feature, Feature):
            raise TypeError(
                f"encode_example: feature {key!r} is a {type(feature).__name__}, not a Feature "
                "(build it with bytes_feature/int64_feature/float_feature)"
            )
        order, key_part = _key_parts(key)
        entries.append((order, key_part, feature))
    entries.sort(key=operator.itemgetter(0))

    chunks: list[bytes] = []
    features_size = 0
    for _, key_part, feature in entries:
        value_len = _varint(feature._size)
        entry_size = len(key_part) + 1 + len(value_len) + feature._size
        entry_len = _varint(entry_size)
        chunks += (_TAG_1_LEN, entry_len, key_part, _TAG_2_LEN, value_len)
        chunks += feature._chunks
        features_size += 1 + len(entry_len) + entry_size
    # Example.features is a set submessage: emitted even when empty (as ``0a 00``).
    return b"".join((_TAG_1_LEN, _varint(features_size), *chunks))


# --------------------------------------------------------------------------------- decoding


class _Reader:
    """Protobuf wire-format reader over ``data[start:end]``; errors carry absolute offsets."""

    __slots__ = ("data", "end", "pos", "what")

    def __init__(self, data: bytes, start: int, end: int, what: str) -> None:
        self.data, self.pos, self.end, self.what = data, start, end, what

    def fail(self, msg: str, at: int | None = None) -> ValueError:
        at = self.pos if at is None else at
        return ValueError(f"malformed tf.train.Example: {msg} in {self.what} at offset {at}")

    def varint(self) -> int:
        data, pos, end = self.data, self.pos, self.end
        result = shift = 0
        start = pos
        while True:
            if pos >= end:
                raise self.fail("truncated varint", start)
            b = data[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
            if shift >= 70:
                raise self.fail("varint longer than 10 bytes", start)
        self.pos = pos
        return result & _UINT64_MASK

    def tag(self) -> tuple[int, int]:
        at = self.pos
        key = self.varint()
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise self.fail("field number 0", at)
        return field, wire_type

    def length_delimited(self) -> tuple[int, int]:
        """The ``(start, end)`` of a length-delimited payload; moves past it."""
        at = self.pos
        n = self.varint()
        if n > self.end - self.pos:
            raise self.fail(f"length {n} runs past the end of the message", at)
        start = self.pos
        self.pos += n
        return start, self.pos

    def skip(self, wire_type: int) -> None:
        if wire_type == 0:
            self.varint()
        elif wire_type == 1:
            self._advance(8)
        elif wire_type == 2:
            self.length_delimited()
        elif wire_type == 5:
            self._advance(4)
        else:
            raise self.fail(f"unsupported wire type {wire_type}")

    def _advance(self, n: int) -> None:
        if self.end - self.pos < n:
            raise self.fail("truncated fixed-size field")
        self.pos += n

    def fields(self) -> Iterator[tuple[int, int]]:
        """Yield ``(field, wire_type)`` until the end; the caller consumes (or skips) each value."""
        while self.pos < self.end:
            yield self.tag()


def _int64(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def _decode_feature(data: bytes, start: int, end: int, key: str) -> list:
    r = _Reader(data, start, end, f"feature {key!r}")
    values: list = []
    kind = None
    for field, wt in r.fields():
        if field not in (1, 2, 3) or wt != 2:
            r.skip(wt)
            continue
        s, e = r.length_delimited()
        if field != kind:  # oneof: the last kind present wins; repeats of one kind merge
            kind, values = field, []
        lr = _Reader(data, s, e, f"feature {key!r}")
        for vfield, vwt in lr.fields():
            if vfield != 1:
                lr.skip(vwt)
            elif field == 1:  # BytesList
                if vwt != 2:
                    raise lr.fail(f"bytes_list value with wire type {vwt}")
                vs, ve = lr.length_delimited()
                values.append(data[vs:ve])
            elif field == 2:  # FloatList: packed or not
                if vwt == 2:
                    vs, ve = lr.length_delimited()
                    if (ve - vs) % 4:
                        raise lr.fail("packed float_list length is not a multiple of 4", vs)
                    values.extend(struct.unpack_from(f"<{(ve - vs) // 4}f", data, vs))
                elif vwt == 5:
                    lr._advance(4)
                    values.append(struct.unpack_from("<f", data, lr.pos - 4)[0])
                else:
                    raise lr.fail(f"float_list value with wire type {vwt}")
            else:  # Int64List: packed or not
                if vwt == 2:
                    vs, ve = lr.length_delimited()
                    pr = _Reader(data, vs, ve, f"feature {key!r}")
                    while pr.pos < pr.end:
                        values.append(_int64(pr.varint()))
                elif vwt == 0:
                    values.append(_int64(lr.varint()))
                else:
                    raise lr.fail(f"int64_list value with wire type {vwt}")
    return values


def decode_example(data: bytes) -> dict[str, list]:
    """Parse a serialized ``tf.train.Example`` (the inverse of :func:`encode_example`).

    Returns ``{name: values}``: ``list[bytes]`` for bytes lists, ``list[int]`` for int64 lists,
    ``list[float]`` (float32 values widened) for float lists, ``[]`` for an empty Feature.
    Unknown fields are skipped as protobuf does; anything malformed raises ``ValueError``.
    Meant for verification and tests — pure Python, not fast.
    """
    if not isinstance(data, bytes):
        if not isinstance(data, (bytearray, memoryview)):
            raise TypeError(f"decode_example: expected bytes, got {type(data).__name__}")
        data = bytes(data)
    out: dict[str, list] = {}
    ex = _Reader(data, 0, len(data), "Example")
    for field, wt in ex.fields():
        if field != 1 or wt != 2:
            ex.skip(wt)
            continue
        fs, fe = ex.length_delimited()
        feats = _Reader(data, fs, fe, "Features")
        for ffield, fwt in feats.fields():
            if ffield != 1 or fwt != 2:
                feats.skip(fwt)
                continue
            es, ee = feats.length_delimited()
            entry = _Reader(data, es, ee, "feature map entry")
            key_bytes = b""
            value: tuple[int, int] | None = None
            for efield, ewt in entry.fields():
                if efield == 1 and ewt == 2:
                    ks, ke = entry.length_delimited()
                    key_bytes = data[ks:ke]
                elif efield == 2 and ewt == 2:
                    value = entry.length_delimited()
                else:
                    entry.skip(ewt)
            try:
                key = key_bytes.decode("utf-8")
            except UnicodeDecodeError:
                raise entry.fail("feature name is not valid UTF-8", es) from None
            out[key] = [] if value is None else _decode_feature(data, *value, key)
    return out


# ------------------------------------------------------------------------------- TFRecords


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C: ``((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2**32)``."""
    crc = google_crc32c.value(data if isinstance(data, bytes) else bytes(data))
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


_LEN = struct.Struct("<Q")
_CRC = struct.Struct("<I")


_IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)


def _writev_all(fd: int, buffers: list[bytes]) -> None:
    """Write every buffer, in order, with as few ``writev`` calls as the kernel allows (a
    short write resumes mid-buffer)."""
    i = 0
    while i < len(buffers):
        batch = buffers[i:i + _IOV_MAX]
        written = os.writev(fd, batch)
        if written == 0 and any(len(buf) for buf in batch):
            raise OSError(f"writev wrote nothing to fd {fd}")
        for buf in batch:
            if written < len(buf):
                buffers[i] = memoryview(buf)[written:]
                break
            written -= len(buf)
            i += 1


class TFRecordWriter:
    """Write a TFRecord file (uncompressed), byte-identical to ``tf.io.TFRecordWriter``.

    ``.records`` and ``.bytes`` count what was written (``bytes`` includes the 16 bytes of
    framing per record) and ``.sha256`` is the file's digest so far (hashed as it is written,
    so publishing the file needs no second read). Use it as a context manager; the file is
    closed on exit, also after an error — the partial file stays, it is the caller's job not
    to publish it.

    Records are gathered (not copied) and handed to the kernel by ``writev`` once about
    ``flush_bytes`` are pending: a few system calls per MiB, and no user-space buffer to copy
    each image through. ``flush()`` writes what is pending.
    """

    def __init__(self, path: str | os.PathLike, *, flush_bytes: int = 1 << 20) -> None:
        self.path = os.fspath(path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                                       | getattr(os, "O_BINARY", 0), 0o666)  # see close()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._flush_bytes = flush_bytes
        self.records = 0
        self.bytes = 0
        self._hash = hashlib.sha256()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, record: bytes) -> None:
        if self._fd is None:
            raise ValueError(f"TFRecordWriter for {self.path} is closed")
        if not isinstance(record, bytes):
            if not isinstance(record, (bytearray, memoryview)):
                raise TypeError(
                    f"TFRecordWriter.write: expected bytes, got {type(record).__name__}"
                )
            record = bytes(record)
        length = _LEN.pack(len(record))
        head = length + _CRC.pack(masked_crc32c(length))
        tail = _CRC.pack(masked_crc32c(record))
        h = self._hash
        h.update(head)
        h.update(record)
        h.update(tail)
        self._pending += (head, record, tail)
        self._pending_bytes += len(record) + 16
        self.records += 1
        self.bytes += len(record) + 16
        if self._pending_bytes >= self._flush_bytes:
            self.flush()

    def flush(self) -> None:
        if self._fd is not None and self._pending:
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            _writev_all(self._fd, pending)

    def close(self) -> None:
        if self._fd is not None:
            try:
                self.flush()
            finally:
                fd, self._fd = self._fd, None
                self._pending = []
                os.close(fd)

    @property
    def closed(self) -> bool:
        return self._fd is None

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd is None else "open"
        return f"<TFRecordWriter {self.path!r} {state}, {self.records} records, {self.bytes} bytes>"


def read_tfrecords(path: str | os.PathLike) -> Iterator[bytes]:
    """Yield the records of an uncompressed TFRecord file, verifying both CRCs of each.

    Raises ``ValueError`` naming the file and the byte offset of the bad record on a CRC
    mismatch or a truncated record. An empty file holds zero records.
    """
    name = os.fspath(path)
    with open(name, "rb") as f:
        offset = 0
        while True:
            header = f.read(12)
            if not header:
                return
            if len(header) < 12:
                raise ValueError(
                    f"{name}: truncated record header at offset {offset} "
                    f"({len(header)} of 12 bytes)"
                )
            length_bytes = header[:8]
            if _CRC.unpack_from(header, 8)[0] != masked_crc32c(length_bytes):
                raise ValueError(f"{name}: corrupt record length (CRC mismatch) at offset {offset}")
            (length,) = _LEN.unpack(length_bytes)
            data = f.read(length)
            footer = f.read(4) if len(data) == length else b""
            if len(footer) < 4:
                raise ValueError(
                    f"{name}: truncated record at offset {offset}: expected {length + 16} bytes, "
                    f"file has {12 + len(data) + len(footer)}"
                )
            if _CRC.unpack(footer)[0] != masked_crc32c(data):
                raise ValueError(f"{name}: corrupt record data (CRC mismatch) at offset {offset}")
            yield data
            offset += length + 16


# ------------------------------------------------------------------ OD API example fast path

OD_API_KEYS = (
    "image/height", "image/width", "image/filename", "image/source_id", "image/key/sha256",
    "image/encoded", "image/format", "image/object/bbox/xmin", "image/object/bbox/xmax",
    "image/object/bbox/ymin", "image/object/bbox/ymax", "image/object/class/text",
    "image/object/class/label", "image/object/difficult", "image/object/truncated",
    "image/object/view",
)
# the keys in the serialized (upb deterministic) order, each with its encoded key field
_OD_ORDER = tuple(sorted(OD_API_KEYS, key=lambda k: _key_parts(k)[0]))
_OD_KEY_PART = {k: _key_parts(k)[1] for k in OD_API_KEYS}


def _fast_int64(values: Sequence[int]) -> bytes:
    if not values:
        return _TAG_3_LEN + b"\x00"
    packed = b"".join([_varint(v & _UINT64_MASK) for v in values])
    body = _TAG_1_LEN + _varint(len(packed)) + packed
    return _TAG_3_LEN + _varint(len(body)) + body


def _fast_float(values: Sequence[float]) -> bytes:
    if not values:
        return _TAG_2_LEN + b"\x00"
    packed = struct.pack(f"<{len(values)}f", *values)
    body = _TAG_1_LEN + _varint(len(packed)) + packed
    return _TAG_2_LEN + _varint(len(body)) + body


def _fast_bytes(values: Sequence[bytes]) -> bytes:
    body = b"".join([_TAG_1_LEN + _varint(len(v)) + v for v in values])
    return _TAG_1_LEN + _varint(len(body)) + body


def encode_od_example(*, height: int, width: int, filename: bytes, sha256: bytes,
                      encoded: bytes, image_format: bytes, xmin: Sequence[float],
                      xmax: Sequence[float], ymin: Sequence[float], ymax: Sequence[float],
                      texts: Sequence[bytes], labels: Sequence[int],
                      difficult: Sequence[int], truncated: Sequence[int],
                      views: Sequence[bytes]) -> bytes:
    """The Object Detection API's tf.Example (the 16 keys of :data:`OD_API_KEYS`), the same
    bytes as :func:`encode_example` over the same features, built about 5x faster: the one
    record every TFRecord shard writes per image. Values must already be valid (ints in range,
    bytes); the image bytes are copied once, into the result."""
    features = {
        "image/height": _fast_int64((height,)),
        "image/width": _fast_int64((width,)),
        "image/filename": _fast_bytes((filename,)),
        "image/source_id": _fast_bytes((filename,)),
        "image/key/sha256": _fast_bytes((sha256,)),
        "image/format": _fast_bytes((image_format,)),
        "image/object/bbox/xmin": _fast_float(xmin),
        "image/object/bbox/xmax": _fast_float(xmax),
        "image/object/bbox/ymin": _fast_float(ymin),
        "image/object/bbox/ymax": _fast_float(ymax),
        "image/object/class/text": _fast_bytes(texts),
        "image/object/class/label": _fast_int64(labels),
        "image/object/difficult": _fast_int64(difficult),
        "image/object/truncated": _fast_int64(truncated),
        "image/object/view": _fast_bytes(views),
    }
    chunks: list[bytes] = []
    total = 0
    for key in _OD_ORDER:
        key_part = _OD_KEY_PART[key]
        if key == "image/encoded":  # the big one: never copied before the final join
            value_head = _TAG_1_LEN + _varint(len(encoded))
            inner = len(value_head) + len(encoded)
            feature_head = _TAG_1_LEN + _varint(inner)
            feature_size = len(feature_head) + inner
            value_len = _varint(feature_size)
            entry_size = len(key_part) + 1 + len(value_len) + feature_size
            head = _TAG_1_LEN + _varint(entry_size) + key_part + _TAG_2_LEN + value_len
            chunks += (head + feature_head + value_head, encoded)
        else:
            feature = features[key]
            value_len = _varint(len(feature))
            entry_size = len(key_part) + 1 + len(value_len) + len(feature)
            head = _TAG_1_LEN + _varint(entry_size) + key_part + _TAG_2_LEN + value_len
            chunks += (head, feature)
        total += 1 + len(_varint(entry_size)) + entry_size
    return b"".join((_TAG_1_LEN, _varint(total), *chunks))
