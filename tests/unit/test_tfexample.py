"""petdet_tasks.tfexample: hand-encoded Examples and TFRecords, checked against real TensorFlow.

The library never imports TensorFlow; this test module does, to prove byte compatibility.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

from petdet_tasks.tfexample import (  # noqa: E402
    Feature,
    TFRecordWriter,
    bytes_feature,
    decode_example,
    encode_example,
    float_feature,
    int64_feature,
    masked_crc32c,
    read_tfrecords,
)

IMAGE = np.random.default_rng(42).integers(0, 256, 100_000, dtype=np.uint8).tobytes()

# Each spec: name -> (kind, values). Built both ways: ours and tf.train.Feature.
SPECS = {
    "detection": {
        "image/encoded": ("bytes", [IMAGE]),
        "image/format": ("bytes", [b"jpeg"]),
        "image/filename": ("bytes", ["Abyssinian_1.jpg"]),
        "image/source_id": ("bytes", ["Abyssinian_1"]),
        "image/height": ("int64", [400]),
        "image/width": ("int64", [600]),
        "image/object/bbox/xmin": ("float", [0.1, 0.25]),
        "image/object/bbox/xmax": ("float", [0.9, 0.75]),
        "image/object/bbox/ymin": ("float", [0.2, 0.3]),
        "image/object/bbox/ymax": ("float", [0.8, 0.6]),
        "image/object/class/text": ("bytes", ["Abyssinian", "cat"]),
        "image/object/class/label": ("int64", [1, 1]),
        "image/object/difficult": ("int64", [0, 0]),
        "image/object/truncated": ("int64", [0, 1]),
        "image/object/view": ("bytes", [b"Frontal", b"Left"]),
    },
    "empty_lists": {
        "b": ("bytes", []),
        "f": ("float", []),
        "i": ("int64", []),
        "zero_bytes": ("bytes", [b""]),
    },
    "integers": {
        "neg": ("int64", [-1, -2, -(2**63), -128]),
        "big": ("int64", [0, 1, 127, 128, 300, 2**32, 2**63 - 1]),
        "many": ("int64", list(range(-500, 500, 7))),
    },
    "unicode": {
        "name": ("bytes", ["Bängal 🐈", "日本語", ""]),
        "ключ": ("bytes", [b"\x00\xff"]),
    },
    "floats": {
        "f": ("float", [0.0, -0.0, 1.5, 1e-3, -2.5e10, float("inf"), -float("inf")]),
        "rounded": ("float", [0.1, 1 / 3, 1e40, 1e-46]),  # float32 rounding, overflow, underflow
        "many": ("float", [i / 7 for i in range(100)]),
    },
    # upb's deterministic order: bytewise, and a key sorts after the keys it is a prefix of.
    "key_order": {
        k: ("int64", [i]) for i, k in enumerate(["a", "ab", "aa", "", "B", "_", "é", "z"])
    },
    "long_lists": {
        "bytes": ("bytes", [bytes([i % 256]) * i for i in range(300)]),
        "big": ("bytes", [IMAGE * 2]),  # 200 KB: 3-byte length varints
    },
    "no_features": {},
}


def ours(spec: dict) -> dict[str, Feature]:
    make = {"bytes": bytes_feature, "int64": int64_feature, "float": float_feature}
    return {k: make[kind](values) for k, (kind, values) in spec.items()}


def tf_example(spec: dict) -> tf.train.Example:
    def feature(kind, values):
        if kind == "bytes":
            values = [v.encode() if isinstance(v, str) else v for v in values]
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
        if kind == "int64":
            return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        return tf.train.Feature(float_list=tf.train.FloatList(value=values))

    feats = {k: feature(kind, values) for k, (kind, values) in spec.items()}
    return tf.train.Example(features=tf.train.Features(feature=feats))


@pytest.mark.parametrize("name", list(SPECS))
def test_encode_example_matches_tensorflow_byte_for_byte(name):
    spec = SPECS[name]
    expected = tf_example(spec).SerializeToString(deterministic=True)
    assert encode_example(ours(spec)) == expected
    # and TF's parser reads ours back to the same message
    assert tf.train.Example.FromString(encode_example(ours(spec))) == tf_example(spec)


def test_encode_example_is_independent_of_insertion_order():
    spec = SPECS["detection"]
    forward = ours(spec)
    backward = dict(reversed(list(forward.items())))
    assert encode_example(forward) == encode_example(backward)


def test_scalars_and_sequences_encode_alike():
    assert encode_example({"x": bytes_feature(b"v")}) == encode_example(
        {"x": bytes_feature([b"v"])}
    )
    assert encode_example({"x": bytes_feature("é")}) == encode_example({"x": bytes_feature(["é"])})
    assert encode_example({"x": int64_feature(3)}) == encode_example({"x": int64_feature([3])})
    assert encode_example({"x": float_feature(0.5)}) == encode_example({"x": float_feature([0.5])})
    numpy_values = {
        "i": int64_feature(np.array([1, -2], dtype=np.int64)),
        "f": float_feature(np.array([0.1, 0.2], dtype=np.float32)),
        "s": int64_feature(np.int32(7)),
    }
    plain = {"i": int64_feature([1, -2]), "f": float_feature([0.1, 0.2]), "s": int64_feature(7)}
    assert encode_example(numpy_values) == encode_example(plain)


def test_bytes_feature_copies_mutable_buffers():
    buf = bytearray(b"abc")
    feature = bytes_feature(buf)
    buf[:] = b"xyz"
    assert decode_example(encode_example({"k": feature})) == {"k": [b"abc"]}


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="int64 range"):
        int64_feature(2**63)
    with pytest.raises(ValueError, match="int64 range"):
        int64_feature([-(2**63) - 1])
    with pytest.raises(TypeError, match="expected int"):
        int64_feature([1.5])
    with pytest.raises(TypeError, match="expected int, got bool"):  # as protobuf refuses them
        int64_feature(True)
    with pytest.raises(TypeError, match="expected float"):
        float_feature(["x"])
    with pytest.raises(TypeError, match="sequence of numbers"):
        int64_feature(b"\x01\x02")  # not silently [1, 2]
    with pytest.raises(TypeError, match="sequence of numbers"):
        float_feature("1.5")
    with pytest.raises(TypeError, match="expected bytes or str"):
        bytes_feature([1])
    with pytest.raises(TypeError, match="not a Feature"):
        encode_example({"x": b"raw"})
    with pytest.raises(TypeError, match="must be str"):
        encode_example({b"x": int64_feature(1)})


def test_decode_example_round_trip():
    for name, spec in SPECS.items():
        decoded = decode_example(encode_example(ours(spec)))
        expected = {}
        for key, (kind, values) in spec.items():
            if kind == "bytes":
                expected[key] = [v.encode() if isinstance(v, str) else v for v in values]
            elif kind == "int64":
                expected[key] = [int(v) for v in values]
            else:  # float32 round trip
                with np.errstate(over="ignore"):
                    expected[key] = [float(np.float32(v)) for v in values]
        assert decoded == expected, name


def test_decode_example_reads_unpacked_and_unknown_fields():
    # Int64List with unpacked values (tag 0x08) and FloatList with unpacked values (tag 0x0d),
    # plus an unknown varint field 5 in the Example: all legal protobuf, parsers must cope.
    int_list = b"\x08\x05\x08\x7f"
    float_list = b"\x0d" + np.float32(1.5).tobytes()
    feat_i = b"\x1a" + bytes([len(int_list)]) + int_list
    feat_f = b"\x12" + bytes([len(float_list)]) + float_list
    entry_i = b"\x0a\x01i\x12" + bytes([len(feat_i)]) + feat_i
    entry_f = b"\x0a\x01f\x12" + bytes([len(feat_f)]) + feat_f
    features = b"\x0a" + bytes([len(entry_i)]) + entry_i + b"\x0a" + bytes([len(entry_f)]) + entry_f
    data = b"\x28\x01" + b"\x0a" + bytes([len(features)]) + features
    assert decode_example(data) == {"i": [5, 127], "f": [1.5]}
    parsed = tf.train.Example.FromString(data)  # sanity: TF agrees
    assert list(parsed.features.feature["i"].int64_list.value) == [5, 127]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x0a\x05\x0a\x03", "runs past the end"),
        (b"\x0a", "truncated varint"),
        (b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "longer than 10 bytes"),
        (b"\x0b", "wire type 3"),
        (b"\x00", "field number 0"),
        (b"\x0a\x08\x0a\x06\x0a\x01x\x12\x01\x12", "truncated varint in feature 'x'"),
        (b"\x0a\x09\x0a\x07\x0a\x01x\x12\x02\x12\x05", "runs past the end"),
        (b"\x0a\x0b\x0a\x09\x0a\x01x\x12\x04\x12\x02\x0a\x03", "runs past the end"),
        (b"\x0a\x0c\x0a\x0a\x0a\x01x\x12\x05\x12\x03\x0a\x01\x00", "multiple of 4"),
        (b"\x0a\x07\x0a\x05\x0a\x01\xff\x12\x00", "UTF-8"),
    ],
)
def test_decode_example_rejects_malformed_input(data, message):
    with pytest.raises(ValueError, match=message):
        decode_example(data)


def test_masked_crc32c():
    crc = 0xE3069283  # CRC-32C of b"123456789" (the standard check value)
    assert masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32
    assert masked_crc32c(bytearray(b"123456789")) == masked_crc32c(b"123456789")


RECORDS = [encode_example(ours(spec)) for spec in SPECS.values()] + [b"", b"x" * 300]


def test_tfrecord_writer_matches_tensorflow(tmp_path):
    with TFRecordWriter(tmp_path / "ours.tfrecord") as writer:
        for record in RECORDS:
            writer.write(record)
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as tf_writer:
        for record in RECORDS:
            tf_writer.write(record)
    ours_bytes = (tmp_path / "ours.tfrecord").read_bytes()
    assert ours_bytes == (tmp_path / "tf.tfrecord").read_bytes()
    assert writer.records == len(RECORDS)
    assert writer.bytes == len(ours_bytes) == sum(len(r) + 16 for r in RECORDS)
    assert writer.closed
    with pytest.raises(ValueError, match="closed"):
        writer.write(b"late")
    # and we read TF's file
    assert list(read_tfrecords(tmp_path / "tf.tfrecord")) == RECORDS


def test_tensorflow_reads_and_parses_our_records(tmp_path):
    path = tmp_path / "shard-00000-of-00001.tfrecord"
    specs = [SPECS["detection"], {**SPECS["detection"], "image/object/class/label": ("int64", [])}]
    with TFRecordWriter(path) as writer:
        for spec in specs:
            writer.write(encode_example(ours(spec)))
    feature_spec = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/filename": tf.io.FixedLenFeature([], tf.string),
        "image/height": tf.io.FixedLenFeature([], tf.int64),
        "image/width": tf.io.FixedLenFeature([], tf.int64),
        "image/object/bbox/xmin": tf.io.VarLenFeature(tf.float32),
        "image/object/class/text": tf.io.VarLenFeature(tf.string),
        "image/object/class/label": tf.io.VarLenFeature(tf.int64),
    }
    parsed = [
        tf.io.parse_single_example(record, feature_spec)
        for record in tf.data.TFRecordDataset(str(path))
    ]
    assert len(parsed) == 2
    first = parsed[0]
    assert first["image/encoded"].numpy() == IMAGE
    assert first["image/filename"].numpy() == b"Abyssinian_1.jpg"
    assert (int(first["image/height"]), int(first["image/width"])) == (400, 600)
    np.testing.assert_allclose(first["image/object/bbox/xmin"].values.numpy(), [0.1, 0.25])
    assert first["image/object/class/text"].values.numpy().tolist() == [b"Abyssinian", b"cat"]
    assert first["image/object/class/label"].values.numpy().tolist() == [1, 1]
    assert parsed[1]["image/object/class/label"].values.numpy().tolist() == []


def test_tfrecord_writer_batches_writes_and_resumes_short_writes(tmp_path, monkeypatch):
    """Records are handed to the kernel in writev batches (at most IOV_MAX buffers a call);
    a short write resumes mid-buffer; the file is byte-identical to TensorFlow's either way."""
    import petdet_tasks.tfexample as tfexample

    records = [bytes([i % 251]) * (i % 97) for i in range(1500)]  # 4500 buffers, some empty
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as tf_writer:
        for record in records:
            tf_writer.write(record)
    expected = (tmp_path / "tf.tfrecord").read_bytes()

    calls = []
    real_writev = os.writev

    def short_writev(fd, buffers):  # at most 1000 bytes per call, like a congested disk
        calls.append(len(buffers))
        assert len(buffers) <= tfexample._IOV_MAX
        data = b"".join(bytes(b) for b in buffers)[:1000]
        return real_writev(fd, [data]) if data else 0

    monkeypatch.setattr(tfexample.os, "writev", short_writev)
    with TFRecordWriter(tmp_path / "short.tfrecord", flush_bytes=1 << 30) as writer:
        for record in records:
            writer.write(record)
        assert calls == []  # nothing written before a flush
        writer.flush()
        assert (tmp_path / "short.tfrecord").read_bytes() == expected
    assert len(calls) >= len(expected) // 1000
    monkeypatch.setattr(tfexample.os, "writev", real_writev)

    with TFRecordWriter(tmp_path / "small.tfrecord", flush_bytes=4096) as writer:
        for record in records:
            writer.write(record)
    assert (tmp_path / "small.tfrecord").read_bytes() == expected
    assert writer.bytes == len(expected) and writer.records == len(records)


def test_tfrecord_writer_stuck_writev_raises(tmp_path, monkeypatch):
    import petdet_tasks.tfexample as tfexample

    monkeypatch.setattr(tfexample.os, "writev", lambda fd, buffers: 0)
    writer = TFRecordWriter(tmp_path / "stuck.tfrecord")
    writer.write(b"record")
    with pytest.raises(OSError, match="wrote nothing"):
        writer.close()
    assert writer.closed


def _write(path, records):
    with TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    return path.read_bytes()


def test_read_tfrecords_round_trip_and_empty_file(tmp_path):
    _write(tmp_path / "a.tfrecord", RECORDS)
    assert list(read_tfrecords(tmp_path / "a.tfrecord")) == RECORDS
    _write(tmp_path / "empty.tfrecord", [])
    assert list(read_tfrecords(str(tmp_path / "empty.tfrecord"))) == []


def test_read_tfrecords_detects_flipped_bytes(tmp_path):
    records = [b"first record", b"second record", b"third"]
    data = _write(tmp_path / "ok.tfrecord", records)
    second = len(records[0]) + 16  # offset of the second record
    bad = tmp_path / "bad.tfrecord"

    corrupt = bytearray(data)
    corrupt[second + 12 + 3] ^= 0x01  # inside the second record's data
    bad.write_bytes(corrupt)
    reader = read_tfrecords(bad)
    assert next(reader) == records[0]  # records before the damage still come out
    with pytest.raises(
        ValueError, match=rf"bad\.tfrecord.*data \(CRC mismatch\) at offset {second}"
    ):
        next(reader)

    corrupt = bytearray(data)
    corrupt[second] ^= 0x40  # the second record's length
    bad.write_bytes(corrupt)
    with pytest.raises(ValueError, match=rf"bad\.tfrecord.*length \(CRC mismatch\).*{second}"):
        list(read_tfrecords(bad))

    corrupt = bytearray(data)
    corrupt[-1] ^= 0xFF  # the last record's data CRC
    bad.write_bytes(corrupt)
    with pytest.raises(ValueError, match="CRC mismatch"):
        list(read_tfrecords(bad))


@pytest.mark.parametrize("cut", [1, 4, 10, 13, 20])
def test_read_tfrecords_detects_truncation(tmp_path, cut):
    records = [b"first record", b"second record"]
    data = _write(tmp_path / "ok.tfrecord", records)
    second = len(records[0]) + 16
    bad = tmp_path / "cut.tfrecord"
    bad.write_bytes(data[: len(data) - cut])
    with pytest.raises(ValueError, match=rf"cut\.tfrecord: truncated .*at offset {second}"):
        list(read_tfrecords(bad))


def test_library_modules_do_not_import_tensorflow():
    code = (
        "import sys\n"
        "import petdet_tasks.tfexample, petdet_tasks.images\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))\n"
        "heavy += [m for m in sys.modules if m.startswith('google.protobuf')]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("n_boxes", [0, 1, 3])
def test_od_api_fast_path_equals_the_generic_encoder(n_boxes):
    from petdet_tasks.tfexample import (
        bytes_feature,
        encode_example,
        encode_od_example,
        float_feature,
        int64_feature,
    )

    rng = np.random.default_rng(n_boxes)
    image = rng.integers(0, 256, 70_000, dtype=np.uint8).tobytes()
    boxes = rng.random((4, n_boxes)).tolist()
    kw = dict(height=375, width=500, filename=b"great_pyrenees_12.jpg",
              sha256=b"f" * 64, encoded=image, image_format=b"jpeg", xmin=boxes[0],
              xmax=boxes[1], ymin=boxes[2], ymax=boxes[3], texts=[b"great_pyrenees"] * n_boxes,
              labels=[16] * n_boxes, difficult=[0] * n_boxes, truncated=[1] * n_boxes,
              views=[b"Frontal"] * n_boxes)
    generic = encode_example({
        "image/height": int64_feature(375), "image/width": int64_feature(500),
        "image/filename": bytes_feature(kw["filename"]),
        "image/source_id": bytes_feature(kw["filename"]),
        "image/key/sha256": bytes_feature(kw["sha256"]), "image/encoded": bytes_feature(image),
        "image/format": bytes_feature(b"jpeg"),
        "image/object/bbox/xmin": float_feature(boxes[0]),
        "image/object/bbox/xmax": float_feature(boxes[1]),
        "image/object/bbox/ymin": float_feature(boxes[2]),
        "image/object/bbox/ymax": float_feature(boxes[3]),
        "image/object/class/text": bytes_feature(kw["texts"]),
        "image/object/class/label": int64_feature(kw["labels"]),
        "image/object/difficult": int64_feature(kw["difficult"]),
        "image/object/truncated": int64_feature(kw["truncated"]),
        "image/object/view": bytes_feature(kw["views"]),
    })
    fast = encode_od_example(**kw)
    assert fast == generic
    parsed = tf.train.Example.FromString(fast)
    assert parsed.features.feature["image/encoded"].bytes_list.value[0] == image
