"""build_example: one tiny hand-built example with every feature asserted exactly, and the
per-image rules (repair, quarantine, clipping, size mismatch, hostile XML)."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from petdet_tasks.label_map import pets_label_map
from petdet_tasks.tfrecords import (
    TFRecordConfig,
    _new_report,
    build_example,
    parse_voc,
    shard_name,
    shard_of,
    split_of,
)

OD_API_SPEC = {
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "image/filename": tf.io.FixedLenFeature([], tf.string),
    "image/source_id": tf.io.FixedLenFeature([], tf.string),
    "image/key/sha256": tf.io.FixedLenFeature([], tf.string),
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/format": tf.io.FixedLenFeature([], tf.string),
    "image/object/bbox/xmin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/xmax": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/ymin": tf.io.VarLenFeature(tf.float32),
    "image/object/bbox/ymax": tf.io.VarLenFeature(tf.float32),
    "image/object/class/text": tf.io.VarLenFeature(tf.string),
    "image/object/class/label": tf.io.VarLenFeature(tf.int64),
    "image/object/difficult": tf.io.VarLenFeature(tf.int64),
    "image/object/truncated": tf.io.VarLenFeature(tf.int64),
    "image/object/view": tf.io.VarLenFeature(tf.string),
}


def _jpeg(w=40, h=30, color=(200, 30, 30), fmt="JPEG", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color if mode != "RGBA" else (*color, 128)).save(buf, fmt)
    return buf.getvalue()


def _xml(objects, size=(40, 30), extra_head="") -> bytes:
    objs = "".join(
        f"<object><name>cat</name><pose>{pose}</pose><truncated>{tr}</truncated>"
        f"<occluded>0</occluded><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
        f"<ymax>{b[3]}</ymax></bndbox><difficult>{d}</difficult></object>"
        for b, pose, tr, d in objects)
    return (f"{extra_head}<annotation><folder>OXIIIT</folder><filename>x.jpg</filename>"
            f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
            f"{objs}</annotation>").encode()


def _parse(record: bytes) -> dict:
    parsed = tf.io.parse_single_example(record, OD_API_SPEC)
    out = {}
    for k, v in parsed.items():
        out[k] = (tf.sparse.to_dense(v).numpy().tolist() if isinstance(v, tf.SparseTensor)
                  else v.numpy())
    return out


def _build(name, image, xml, **cfg):
    report = _new_report("train", 0)
    record = build_example(name, image, xml, pets_label_map(), TFRecordConfig(**cfg), report)
    return record, report


def test_tiny_example_every_feature_exactly():
    image = _jpeg()
    xml = _xml([((4, 3, 20, 15), "Frontal", 0, 0), ((10, 6, 40, 30), "Left", 1, 1)])
    record, report = _build("Abyssinian_1", image, xml)
    f = _parse(record)
    assert f["image/height"] == 30 and f["image/width"] == 40
    assert f["image/filename"] == b"Abyssinian_1.jpg"
    assert f["image/source_id"] == b"Abyssinian_1.jpg"
    assert f["image/key/sha256"] == hashlib.sha256(image).hexdigest().encode()
    assert f["image/encoded"] == image, "a clean JPEG is stored byte for byte"
    assert f["image/format"] == b"jpeg"
    np.testing.assert_allclose(f["image/object/bbox/xmin"], [4 / 40, 10 / 40], rtol=1e-6)
    np.testing.assert_allclose(f["image/object/bbox/ymin"], [3 / 30, 6 / 30], rtol=1e-6)
    np.testing.assert_allclose(f["image/object/bbox/xmax"], [20 / 40, 1.0], rtol=1e-6)
    np.testing.assert_allclose(f["image/object/bbox/ymax"], [15 / 30, 1.0], rtol=1e-6)
    assert f["image/object/class/text"] == [b"Abyssinian", b"Abyssinian"]
    assert f["image/object/class/label"] == [1, 1]
    assert f["image/object/difficult"] == [0, 1]
    assert f["image/object/truncated"] == [0, 1]
    assert f["image/object/view"] == [b"Frontal", b"Left"]
    assert report["boxes"] == 2 and report["per_class"] == {"Abyssinian": 1}
    assert report["repaired"] == report["quarantined"] == report["clipped"] == []


def test_dog_breed_gets_its_od_api_id():
    record, _ = _build("yorkshire_terrier_7", _jpeg(), _xml([((1, 1, 10, 10), "Frontal", 0, 0)]))
    f = _parse(record)
    assert f["image/object/class/label"] == [37]
    assert f["image/object/class/text"] == [b"yorkshire_terrier"]


def test_png_named_jpg_is_repaired_to_rgb_jpeg():
    record, report = _build("Bengal_2", _jpeg(fmt="PNG", mode="RGBA"),
                            _xml([((4, 3, 20, 15), "Frontal", 0, 0)]))
    f = _parse(record)
    decoded = tf.io.decode_jpeg(f["image/encoded"]).numpy()
    assert decoded.shape == (30, 40, 3)
    assert [r["name"] for r in report["repaired"]] == ["Bengal_2"]
    assert "PNG" in report["repaired"][0]["reason"]


def test_truncated_image_is_quarantined_with_reason():
    image = _jpeg(200, 150)
    record, report = _build("Bengal_3", image[: len(image) * 6 // 10],
                            _xml([((4, 3, 20, 15), "Frontal", 0, 0)]))
    assert record is None
    assert report["quarantined"][0]["name"] == "Bengal_3"
    assert "truncated" in report["quarantined"][0]["reason"]


def test_boxes_clipped_and_degenerate_dropped_and_counted():
    xml = _xml([((-5, 3, 20, 45), "Frontal", 0, 0), ((10, 10, 10, 20), "Frontal", 0, 0)])
    record, report = _build("Bengal_4", _jpeg(), xml)
    f = _parse(record)
    assert f["image/object/bbox/xmin"] == [0.0] and f["image/object/bbox/ymax"] == [1.0]
    assert [c["name"] for c in report["clipped"]] == ["Bengal_4"]
    assert [d["name"] for d in report["dropped"]] == ["Bengal_4"]
    assert report["boxes"] == 1


def test_xml_size_disagreeing_with_the_image_is_reported_and_the_real_size_used():
    xml = _xml([((4, 3, 20, 15), "Frontal", 0, 0)], size=(600, 400))
    record, report = _build("Bengal_5", _jpeg(), xml)
    f = _parse(record)
    assert (f["image/width"], f["image/height"]) == (40, 30)
    assert f["image/object/bbox/xmax"] == pytest.approx([0.5])
    assert report["size_mismatch"] == [{"name": "Bengal_5", "xml": [600, 400], "image": [40, 30]}]


def test_all_boxes_degenerate_keeps_the_image_and_lists_it():
    record, report = _build("Bengal_6", _jpeg(), _xml([((5, 5, 5, 5), "Frontal", 0, 0)]))
    assert record is not None and report["no_boxes"] == ["Bengal_6"]


def test_hostile_xml_is_parsed_without_entities_or_network(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    head = (f'<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY xxe SYSTEM "file://{secret}">'
            '<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>')
    xml = _xml([((4, 3, 20, 15), "&xxe;&lol2;", 0, 0)], extra_head=head)
    voc = parse_voc(xml)
    assert "TOP-SECRET" not in repr(voc)
    # an entity where a number must be is a bad XML, quarantined with the reason
    bad = _xml([(("&xxe;", 3, 20, 15), "Frontal", 0, 0)], extra_head=head)
    record, report = _build("Bengal_7", _jpeg(), bad)
    assert record is None and "bad XML" in report["quarantined"][0]["reason"]


def test_malformed_xml_is_quarantined():
    record, report = _build("Bengal_8", _jpeg(), b"<annotation><size>")
    assert record is None and "not well-formed" in report["quarantined"][0]["reason"]


def test_split_and_shard_are_functions_of_the_name_only():
    names = [f"Bengal_{i}" for i in range(2000)]
    val = [n for n in names if split_of(n, 0.3) == "val"]
    assert 0.25 < len(val) / len(names) < 0.35
    assert all(split_of(n, 0.3) == split_of(n, 0.3) for n in names[:50])
    # a larger val fraction only moves images into val, never out of it
    assert set(val) <= {n for n in names if split_of(n, 0.4) == "val"}
    counts = np.bincount([shard_of(n, 8) for n in names], minlength=8)
    assert counts.min() > 180
    assert shard_name("train", 3, 10) == "train-00003-of-00010.tfrecord"


def test_config_from_loose_values_and_clear_errors():
    cfg = TFRecordConfig.from_dict({"num_shards": "4", "val_fraction": "0.25", "force": "False",
                                    "extra_data": "", "classes": "present"})
    assert (cfg.num_shards, cfg.val_fraction, cfg.force, cfg.extra_data) == (4, 0.25, False, None)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        TFRecordConfig.from_dict({"val_fraction": 1.5})
    with pytest.raises(ValueError, match="unknown tfrecords config keys"):
        TFRecordConfig.from_dict({"shards": 3})
    with pytest.raises(ValueError, match="num_shards=.*expected int"):
        TFRecordConfig.from_dict({"num_shards": "many"})


@pytest.mark.parametrize("size,box,reason", [
    (("inf", 30), (4, 3, 20, 15), "<width> is 'inf', expected a finite number"),
    ((40, "1e400"), (4, 3, 20, 15), "<height> is '1e400', expected a finite number"),
    ((40, "nan"), (4, 3, 20, 15), "<height> is 'nan', expected a finite number"),
    ((40, 30), ("nan", 3, 20, 15), "<xmin> is 'nan', expected a finite number"),
    ((40, 30), (4, "-inf", 20, 15), "<ymin> is '-inf', expected a finite number"),
    ((40, 30), (4, 3, "Infinity", 15), "<xmax> is 'Infinity', expected a finite number"),
    ((40, 30), (4, 3, 20, "1e999"), "<ymax> is '1e999', expected a finite number"),
])
def test_non_finite_numbers_quarantine_the_image_naming_field_and_value(size, box, reason):
    record, report = _build("Bengal_9", _jpeg(), _xml([(box, "Frontal", 0, 0)], size=size))
    assert record is None
    assert report["quarantined"] == [{"name": "Bengal_9", "reason": f"bad XML: {reason}"}]
    assert not report["clipped"] and not report["dropped"]
    json.dumps(report, allow_nan=False)  # the part report stays strict JSON


@pytest.mark.parametrize("truncated,difficult,reason", [
    (7, 0, "<truncated> is '7', expected 0 or 1"),
    (0, -1, "<difficult> is '-1', expected 0 or 1"),
    (2**64 + 1, 0, f"<truncated> is '{2**64 + 1}', expected 0 or 1"),
    (0, "yes", "<difficult> is 'yes', expected 0 or 1"),
])
def test_flags_other_than_0_or_1_quarantine_the_image(truncated, difficult, reason):
    record, report = _build("Bengal_10", _jpeg(),
                            _xml([((4, 3, 20, 15), "Frontal", truncated, difficult)]))
    assert record is None
    assert report["quarantined"] == [{"name": "Bengal_10", "reason": f"bad XML: {reason}"}]


def test_flags_0_1_and_absent_are_accepted():
    record, report = _build("Bengal_11", _jpeg(), _xml([((4, 3, 20, 15), "Frontal", 1, 0)]))
    assert record is not None and not report["quarantined"]
    assert parse_voc(b"<annotation><object><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
                     b"<ymax>5</ymax></bndbox></object></annotation>")["objects"][0][
        "difficult"] == 0


@pytest.mark.parametrize("value,shown", [("&x;", "'&x;'"), ("1&x;0", "'1&x;0'")])
def test_an_unexpanded_entity_is_named_in_the_reason(value, shown):
    head = '<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY x "5">]>'
    xml = _xml([((value, 3, 20, 15), "Frontal", 0, 0)], extra_head=head)
    record, report = _build("Bengal_12", _jpeg(), xml)
    assert record is None
    assert report["quarantined"][0]["reason"] == (
        f"bad XML: <xmin> is {shown}, expected a number (entities are not expanded)")
    flagged = _xml([((4, 3, 20, 15), "Frontal", "&x;", 0)], extra_head=head)
    assert _build("Bengal_13", _jpeg(), flagged)[1]["quarantined"][0]["reason"] == (
        "bad XML: <truncated> is '&x;', expected 0 or 1 (entities are not expanded)")
