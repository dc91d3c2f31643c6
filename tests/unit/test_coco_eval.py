"""petdet_tasks.coco_eval: COCO box metrics on small hand-made cases with known answers."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from petdet_tasks.coco_eval import coco_metrics, format_table

CLASSES = {1: "Abyssinian", 2: "beagle", 3: "Bengal"}
W, H = 400, 300  # every image below is 400 px wide and 300 px high


def px(x: float, y: float, w: float, h: float) -> list[float]:
    """A pixel box ``x, y, w, h`` in a W x H image as normalised ``[ymin, xmin, ymax, xmax]``."""
    return [y / H, x / W, (y + h) / H, (x + w) / W]


def gt(image_id: str, boxes=(), labels=()) -> dict:
    return {"image_id": image_id, "width": W, "height": H,
            "boxes": [list(b) for b in boxes], "labels": list(labels)}


def det(image_id: str, boxes=(), scores=(), classes=()) -> dict:
    return {"image_id": image_id, "boxes": [list(b) for b in boxes], "scores": list(scores),
            "classes": list(classes)}


def perfect(groundtruth: list[dict], score: float = 0.9) -> list[dict]:
    """Every ground-truth box predicted exactly, with the right class."""
    return [det(g["image_id"], g["boxes"], [score] * len(g["boxes"]), g["labels"])
            for g in groundtruth]


SUMMARY_KEYS = ["mAP", "mAP@.5", "mAP@.75", "mAP_small", "mAP_medium", "mAP_large",
                "recall@1", "recall@10", "recall@100"]


def _walk(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _walk(v)
    else:
        yield value


def assert_clean(metrics: dict) -> None:
    """JSON-serialisable, plain Python numbers, and no -1 left over from pycocotools."""
    json.dumps(metrics)
    assert list(metrics) == [*SUMMARY_KEYS, "images", "groundtruth_boxes", "detections",
                             "per_class"]
    for value in _walk(metrics):
        assert value is None or type(value) in (int, float), value
        if type(value) is float:
            assert 0.0 <= value <= 1.0, value


# ------------------------------------------------------------------------------- perfect


@pytest.fixture
def three_images() -> list[dict]:
    """Several classes over three images, with small, medium and large boxes."""
    return [
        gt("img-a", [px(10, 10, 100, 100), px(200, 50, 150, 200)], [1, 2]),
        gt("img-b", [px(20, 20, 20, 20), px(100, 100, 50, 50), px(250, 150, 60, 120)], [3, 1, 2]),
        gt("img-c", [px(0, 0, 400, 300)], [3]),
    ]


def test_perfect_predictions_score_one(three_images):
    m = coco_metrics(three_images, perfect(three_images), CLASSES)
    assert_clean(m)
    for key in SUMMARY_KEYS:
        if key == "recall@1":
            continue  # img-b has 3 boxes, so one detection per image cannot find them all
        assert m[key] == pytest.approx(1.0), key
    assert m["images"] == 3
    assert m["groundtruth_boxes"] == 6
    assert m["detections"] == 6
    assert m["per_class"] == {
        "Abyssinian": {"id": 1, "AP": pytest.approx(1.0), "AP@.5": pytest.approx(1.0),
                       "groundtruth": 2, "detections": 2},
        "beagle": {"id": 2, "AP": pytest.approx(1.0), "AP@.5": pytest.approx(1.0),
                   "groundtruth": 2, "detections": 2},
        "Bengal": {"id": 3, "AP": pytest.approx(1.0), "AP@.5": pytest.approx(1.0),
                   "groundtruth": 2, "detections": 2},
    }


def test_per_class_in_label_map_id_order():
    classes = {3: "c", 1: "a", 2: "b"}
    groundtruth = [gt("x", [px(0, 0, 100, 100)], [2])]
    m = coco_metrics(groundtruth, perfect(groundtruth), classes)
    assert list(m["per_class"]) == ["a", "b", "c"]
    assert [row["id"] for row in m["per_class"].values()] == [1, 2, 3]


def test_size_buckets_without_objects_are_none():
    groundtruth = [gt("x", [px(100, 100, 100, 100)], [1])]  # 10000 px² > 96²: large
    m = coco_metrics(groundtruth, perfect(groundtruth), CLASSES)
    assert m["mAP_large"] == pytest.approx(1.0)
    assert m["mAP_small"] is None
    assert m["mAP_medium"] is None
    assert_clean(m)


# --------------------------------------------------------------------------- known shifts


@pytest.mark.parametrize(
    ("shift", "map_", "ap50", "ap75"),
    [
        # IoU = (100 - d) / (100 + d), matched at every threshold t <= IoU of .50:.05:.95
        (4, 0.9, 1.0, 1.0),  # IoU 0.923: .50 ... .90
        (10, 0.7, 1.0, 1.0),  # IoU 0.818: .50 ... .80
        (24, 0.3, 1.0, 0.0),  # IoU 0.613: .50, .55, .60
        (40, 0.0, 0.0, 0.0),  # IoU 0.429: none
    ],
)
def test_shifted_box(shift, map_, ap50, ap75):
    groundtruth = [gt("img", [px(100, 100, 100, 100)], [1])]
    detections = [det("img", [px(100 + shift, 100, 100, 100)], [0.9], [1])]
    m = coco_metrics(groundtruth, detections, CLASSES)
    assert m["mAP"] == pytest.approx(map_)
    assert m["mAP@.5"] == pytest.approx(ap50)
    assert m["mAP@.75"] == pytest.approx(ap75)
    assert m["recall@100"] == pytest.approx(map_)  # one box: recall at t is 1 iff matched at t
    assert m["per_class"]["Abyssinian"]["AP"] == pytest.approx(map_)
    assert m["per_class"]["Abyssinian"]["AP@.5"] == pytest.approx(ap50)


# ------------------------------------------------------------------- wrong class, ranking


def test_wrong_class_scores_zero_for_the_true_class():
    groundtruth = [gt("img", [px(100, 100, 100, 100)], [1])]
    detections = [det("img", [px(100, 100, 100, 100)], [0.9], [2])]
    m = coco_metrics(groundtruth, detections, CLASSES)
    assert m["per_class"]["Abyssinian"]["AP"] == 0.0
    assert m["per_class"]["Abyssinian"]["AP@.5"] == 0.0
    assert m["per_class"]["beagle"]["AP"] is None  # no beagle ground truth
    assert m["per_class"]["beagle"]["detections"] == 1
    assert m["mAP"] == 0.0
    assert m["recall@100"] == 0.0
    assert_clean(m)


def test_false_positive_above_the_true_positive_halves_precision():
    # Ranked: FP (0.9), TP (0.8). Precision at recall 0 and at recall 1 is 1/2 (the envelope),
    # so all 101 recall points read 0.5: AP = 0.5 at every IoU threshold.
    groundtruth = [gt("img", [px(100, 100, 100, 100)], [1])]
    detections = [det("img", [px(250, 150, 100, 100), px(100, 100, 100, 100)], [0.9, 0.8],
                      [1, 1])]
    m = coco_metrics(groundtruth, detections, CLASSES)
    assert m["mAP"] == pytest.approx(0.5)
    assert m["mAP@.5"] == pytest.approx(0.5)
    assert m["recall@1"] == 0.0  # the single top detection is the false positive
    assert m["recall@10"] == pytest.approx(1.0)
    assert m["recall@100"] == pytest.approx(1.0)


def test_false_positive_between_true_positives_101_point_interpolation():
    # Three ground-truth boxes; ranked TP (.9), FP (.8), TP (.7), TP (.6).
    # recall    = 1/3, 1/3, 2/3, 1      precision = 1, 1/2, 2/3, 3/4
    # envelope (max precision at >= recall): 1, 3/4, 3/4, 3/4
    # recall points 0.00..0.33 (34 of them) read 1; 0.34..1.00 (67) read 3/4
    # AP = (34 + 67 * 3/4) / 101 = 337/404 at every IoU threshold.
    box = px(100, 100, 100, 100)
    groundtruth = [gt("a", [box], [1]), gt("b", [box], [1]), gt("c", [box], [1])]
    detections = [
        det("a", [box, px(250, 0, 100, 100)], [0.9, 0.8], [1, 1]),
        det("b", [box], [0.7], [1]),
        det("c", [box], [0.6], [1]),
    ]
    m = coco_metrics(groundtruth, detections, CLASSES)
    assert m["mAP"] == pytest.approx(337 / 404)
    assert m["mAP@.5"] == pytest.approx(337 / 404)
    assert m["mAP@.75"] == pytest.approx(337 / 404)
    assert m["per_class"]["Abyssinian"]["AP"] == pytest.approx(337 / 404)
    assert m["recall@100"] == pytest.approx(1.0)
    assert m["detections"] == 4


# ------------------------------------------------------------- classes without ground truth


def test_class_without_groundtruth_is_none_and_left_out_of_means():
    groundtruth = [gt("a", [px(0, 0, 100, 100)], [1]), gt("b", [px(0, 0, 100, 100)], [2])]
    detections = [
        det("a", [px(0, 0, 100, 100)], [0.9], [1]),  # Abyssinian: right
        det("b", [px(0, 0, 100, 100)], [0.9], [3]),  # beagle box called Bengal
    ]
    m = coco_metrics(groundtruth, detections, CLASSES)
    bengal = m["per_class"]["Bengal"]
    assert bengal == {"id": 3, "AP": None, "AP@.5": None, "groundtruth": 0, "detections": 1}
    assert m["per_class"]["Abyssinian"]["AP"] == pytest.approx(1.0)
    assert m["per_class"]["beagle"]["AP"] == 0.0
    # Mean over Abyssinian and beagle only: 1/2, not 1/3 (Bengal as 0) nor 0 (Bengal as -1).
    assert m["mAP"] == pytest.approx(0.5)
    assert m["mAP@.5"] == pytest.approx(0.5)
    assert m["recall@100"] == pytest.approx(0.5)
    assert_clean(m)


def test_no_groundtruth_at_all_gives_none():
    groundtruth = [gt("a"), gt("b")]
    detections = [det("a", [px(0, 0, 10, 10)], [0.5], [1])]
    m = coco_metrics(groundtruth, detections, CLASSES)
    for key in SUMMARY_KEYS:
        assert m[key] is None, key
    assert m["images"] == 2
    assert m["groundtruth_boxes"] == 0
    assert m["detections"] == 1
    assert_clean(m)


# -------------------------------------------------------------------------- zero detections


@pytest.mark.parametrize("empty", ["no entries", "empty entries"])
def test_zero_detections(three_images, empty):
    if empty == "no entries":
        detections = []
    else:
        detections = [det(g["image_id"]) for g in three_images]
    m = coco_metrics(three_images, detections, CLASSES)
    for key in SUMMARY_KEYS:
        assert m[key] == 0.0, key
    assert m["detections"] == 0
    for row in m["per_class"].values():
        assert row["AP"] == 0.0
        assert row["AP@.5"] == 0.0
        assert row["detections"] == 0
    assert_clean(m)


def test_zero_detections_class_without_groundtruth_still_none():
    groundtruth = [gt("a", [px(0, 0, 100, 100)], [1])]
    m = coco_metrics(groundtruth, [], CLASSES)
    assert m["per_class"]["Abyssinian"]["AP"] == 0.0
    assert m["per_class"]["beagle"]["AP"] is None
    assert m["mAP"] == 0.0


# ------------------------------------------------------------------- images without boxes


def test_image_without_groundtruth_counts_its_detections_as_false_positives():
    groundtruth = [gt("pet", [px(100, 100, 100, 100)], [1]), gt("empty")]
    detections = [
        det("pet", [px(100, 100, 100, 100)], [0.8], [1]),
        det("empty", [px(100, 100, 100, 100)], [0.9], [1]),  # ranked first, matches nothing
    ]
    m = coco_metrics(groundtruth, detections, CLASSES)
    assert m["images"] == 2
    assert m["groundtruth_boxes"] == 1
    assert m["mAP"] == pytest.approx(0.5)


def test_image_without_groundtruth_or_detections_changes_nothing(three_images):
    with_empty = [*three_images, gt("empty")]
    m = coco_metrics(with_empty, perfect(three_images), CLASSES)
    assert m["images"] == 4
    assert m["mAP"] == pytest.approx(1.0)


def test_image_missing_from_detections_has_none():
    groundtruth = [gt("a", [px(0, 0, 100, 100)], [1]), gt("b", [px(0, 0, 100, 100)], [1])]
    detections = [det("a", [px(0, 0, 100, 100)], [0.9], [1])]
    m = coco_metrics(groundtruth, detections, CLASSES)
    # Precision 1 at recall points 0.00..0.50 (51 of 101), nothing beyond recall 1/2.
    assert m["mAP@.5"] == pytest.approx(51 / 101)
    assert m["recall@100"] == pytest.approx(0.5)


# ------------------------------------------------------------- conversions and conventions


def test_boxes_outside_unit_square_are_clipped():
    groundtruth = [gt("img", [[0.0, 0.0, 0.5, 0.5]], [1])]
    # Unclipped IoU would be 0.25 / (0.7 * 0.6) = 0.595 (mAP 0.2); clipped it is exact.
    detections = [det("img", [[-0.2, -0.1, 0.5, 0.5]], [0.9], [1])]
    m = coco_metrics(groundtruth, detections, CLASSES)
    assert m["mAP"] == pytest.approx(1.0)


def test_groundtruth_boxes_are_clipped_too():
    groundtruth = [gt("img", [[0.5, 0.5, 1.4, 1.2]], [1])]
    detections = [det("img", [[0.5, 0.5, 1.0, 1.0]], [0.9], [1])]
    assert coco_metrics(groundtruth, detections, CLASSES)["mAP"] == pytest.approx(1.0)


def test_max_detections_keeps_the_highest_scores_per_image():
    groundtruth = [gt("img", [px(100, 100, 100, 100)], [1])]
    detections = [det("img", [px(100, 100, 100, 100), px(250, 150, 100, 100)], [0.5, 0.9],
                      [1, 1])]
    one = coco_metrics(groundtruth, detections, CLASSES, max_detections=1)
    assert one["detections"] == 1
    assert one["per_class"]["Abyssinian"]["detections"] == 1
    assert one["mAP"] == 0.0  # only the false positive survives
    two = coco_metrics(groundtruth, detections, CLASSES, max_detections=2)
    assert two["detections"] == 2
    assert two["mAP"] == pytest.approx(0.5)


def test_od_api_arrays_with_float_class_ids():
    groundtruth = [gt("img", [px(100, 100, 100, 100)], [1])]
    detections = [{
        "image_id": "img",
        "boxes": np.array([px(100, 100, 100, 100)], dtype=np.float32),
        "scores": np.array([0.9], dtype=np.float32),
        "classes": np.array([1.0], dtype=np.float32),
    }]
    m = coco_metrics(groundtruth, detections, CLASSES)
    assert m["mAP"] == pytest.approx(1.0)
    assert_clean(m)


def test_numeric_string_image_ids_are_distinct():
    groundtruth = [gt("1", [px(0, 0, 100, 100)], [1]), gt("01", [px(200, 100, 100, 100)], [1])]
    m = coco_metrics(groundtruth, perfect(groundtruth), CLASSES)
    assert m["images"] == 2
    assert m["mAP"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------- errors


def test_unknown_detection_class_raises():
    groundtruth = [gt("img", [px(0, 0, 100, 100)], [1])]
    detections = [det("img", [px(0, 0, 100, 100)], [0.9], [7])]
    with pytest.raises(ValueError, match=r"'img'.*class id 7 is not in the label map"):
        coco_metrics(groundtruth, detections, CLASSES)


def test_unknown_groundtruth_label_raises():
    with pytest.raises(ValueError, match="class id 9"):
        coco_metrics([gt("img", [px(0, 0, 10, 10)], [9])], [], CLASSES)


def test_unscorable_inputs_are_permanent_errors():
    """The evaluate task fails at once on them: the same records and model give the same
    inputs again, so Airflow's retries could not help."""
    from petdet_tasks.coco_eval import EvalInputError
    from petdet_tasks.errors import PermanentError

    with pytest.raises(EvalInputError, match="class id 9") as e:
        coco_metrics([gt("img", [px(0, 0, 10, 10)], [9])], [], CLASSES)
    assert isinstance(e.value, PermanentError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    ("boxes", "scores", "classes"),
    [([px(0, 0, 10, 10)], [0.9, 0.8], [1]), ([px(0, 0, 10, 10)], [0.9], [1, 2]),
     ([], [0.9], [1])],
)
def test_mismatched_detection_lengths_raise(boxes, scores, classes):
    groundtruth = [gt("cat_17", [px(0, 0, 100, 100)], [1])]
    with pytest.raises(ValueError, match=r"'cat_17'.*lengths differ"):
        coco_metrics(groundtruth, [det("cat_17", boxes, scores, classes)], CLASSES)


def test_mismatched_groundtruth_lengths_raise():
    with pytest.raises(ValueError, match=r"'dog_3'.*1 boxes but 2 labels"):
        coco_metrics([gt("dog_3", [px(0, 0, 10, 10)], [1, 2])], [], CLASSES)


def test_duplicated_groundtruth_image_raises():
    groundtruth = [gt("same", [px(0, 0, 10, 10)], [1]), gt("same")]
    with pytest.raises(ValueError, match="'same' appears more than once"):
        coco_metrics(groundtruth, [], CLASSES)


def test_duplicated_detection_image_raises():
    groundtruth = [gt("same", [px(0, 0, 10, 10)], [1])]
    detections = [det("same"), det("same")]
    with pytest.raises(ValueError, match="'same' appear more than once"):
        coco_metrics(groundtruth, detections, CLASSES)


def test_detections_for_unknown_image_raise():
    with pytest.raises(ValueError, match="'ghost'.*not in the ground truth"):
        coco_metrics([gt("real")], [det("ghost")], CLASSES)


@pytest.mark.parametrize(
    ("boxes", "message"),
    [([[0.5, 0.1, 0.2, 0.4]], "ymin > ymax"), ([[0.1, 0.2, 0.3]], "shape"),
     ([[0.1, float("nan"), 0.3, 0.4]], "non-finite")],
)
def test_malformed_boxes_raise(boxes, message):
    with pytest.raises(ValueError, match=message):
        coco_metrics([gt("img", boxes, [1])], [], CLASSES)


def test_non_integer_class_id_raises():
    groundtruth = [gt("img", [px(0, 0, 10, 10)], [1])]
    with pytest.raises(ValueError, match="must be integers"):
        coco_metrics(groundtruth, [det("img", [px(0, 0, 10, 10)], [0.9], [1.5])], CLASSES)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_image_size_or_max_detections_raise(bad):
    entry = gt("img")
    entry["width"] = bad
    with pytest.raises(ValueError, match="width"):
        coco_metrics([entry], [], CLASSES)
    with pytest.raises(ValueError, match="max_detections"):
        coco_metrics([gt("img")], [], CLASSES, max_detections=bad)


def test_duplicate_class_names_raise():
    with pytest.raises(ValueError, match="unique"):
        coco_metrics([gt("img")], [], {1: "cat", 2: "cat"})


# ------------------------------------------------------------------------- quiet, logging


def test_nothing_printed(three_images, capsys, caplog):
    with caplog.at_level(logging.DEBUG, logger="petdet_tasks.coco_eval"):
        coco_metrics(three_images, perfect(three_images), CLASSES)
        coco_metrics(three_images, [], CLASSES)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""
    assert "Accumulating evaluation results" in caplog.text  # pycocotools' output, at debug


# ---------------------------------------------------------------------------- format_table


def test_format_table(three_images):
    detections = perfect(three_images[:2])  # Bengal's img-c box is missed
    m = coco_metrics(three_images, detections, {**CLASSES, 4: "Birman"})
    table = format_table(m)
    for name in ("Abyssinian", "beagle", "Bengal", "Birman"):
        assert name in table
    assert f"{m['mAP']:.3f}" in table
    assert f"{m['recall@100']:.3f}" in table
    birman = next(line for line in table.splitlines() if line.startswith("Birman"))
    assert birman.split() == ["Birman", "4", "0", "-", "-"]
    bengal = next(line for line in table.splitlines() if line.startswith("Bengal"))
    assert bengal.split()[1:3] == ["3", "2"]
    widths = {len(line) for line in table.splitlines()[6:]}
    assert len(widths) == 1  # fixed width class rows


# ----------------------------------------------------------------- one class at a time


def _all_classes_at_once(groundtruth, detections, classes, max_detections=100):
    """The reference: one pycocotools COCOeval over every class (how coco_metrics scored
    before it went class by class), from the same pixel boxes."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = {g["image_id"]: n for n, g in enumerate(groundtruth, 1)}
    sizes = {g["image_id"]: (g["width"], g["height"]) for g in groundtruth}

    def pixels(b, key):
        w, h = sizes[key]
        ymin, xmin, ymax, xmax = np.clip(np.asarray(b, dtype=np.float64), 0, 1)
        return [xmin * w, ymin * h, (xmax - xmin) * w, (ymax - ymin) * h]

    gts, dts = [], []
    for g in groundtruth:
        for b, label in zip(g["boxes"], g["labels"], strict=True):
            box = pixels(b, g["image_id"])
            gts.append({"id": len(gts) + 1, "image_id": ids[g["image_id"]],
                        "category_id": int(label), "bbox": box, "area": box[2] * box[3],
                        "iscrowd": 0})
    for d in detections:
        order = np.argsort(-np.asarray(d["scores"]), kind="stable")[:max_detections]
        for i in order:
            box = pixels(d["boxes"][i], d["image_id"])
            dts.append({"id": len(dts) + 1, "image_id": ids[d["image_id"]],
                        "category_id": int(d["classes"][i]), "bbox": box,
                        "area": box[2] * box[3], "score": float(d["scores"][i]), "iscrowd": 0})
    images = [{"id": n, "width": sizes[k][0], "height": sizes[k][1]} for k, n in ids.items()]
    cats = [{"id": c, "name": n} for c, n in sorted(classes.items())]
    with contextlib.redirect_stdout(io.StringIO()):
        cocos = []
        for anns in (gts, dts):
            coco = COCO()
            coco.dataset = {"images": images, "categories": cats, "annotations": anns}
            coco.createIndex()
            cocos.append(coco)
        ev = COCOeval(*cocos, iouType="bbox")
        ev.params.imgIds = list(ids.values())
        ev.params.catIds = sorted(classes)
        ev.params.maxDets = [1, 10, max_detections]
        ev.evaluate()
        ev.accumulate()
    return ev.eval["precision"], ev.eval["recall"]


def _random_case(rng, n_images, n_classes, per_image):
    """Ground truth and detections of many classes: some detections near a true box (of its
    class or another), the rest anywhere, tied scores included."""
    groundtruth, detections = [], []
    for i in range(n_images):
        key = f"img-{i}"
        w, h = int(rng.integers(50, 600)), int(rng.integers(50, 600))
        n_gt = int(rng.integers(0, 4))
        boxes = []
        for _ in range(n_gt):
            y0, x0 = rng.uniform(0, 0.8, 2)
            boxes.append([y0, x0, y0 + rng.uniform(0.02, 1 - y0), x0 + rng.uniform(0.02, 1 - x0)])
        labels = rng.integers(1, n_classes + 1, n_gt).tolist()
        groundtruth.append({"image_id": key, "width": w, "height": h, "boxes": boxes,
                            "labels": labels})
        if i % 7 == 3:
            continue  # an image without detections
        d_boxes, d_classes = [], []
        for j in range(per_image):
            if boxes and j < 2 * len(boxes):
                b = np.clip(np.asarray(boxes[j % len(boxes)]) + rng.normal(0, 0.03, 4), 0, 1)
                b = [min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])]
                d_classes.append(labels[j % len(boxes)] if j % 3 else
                                 int(rng.integers(1, n_classes + 1)))
            else:
                y0, x0 = rng.uniform(0, 0.9, 2)
                b = [y0, x0, y0 + rng.uniform(0, 1 - y0), x0 + rng.uniform(0, 1 - x0)]
                d_classes.append(int(rng.integers(1, n_classes + 1)))
            d_boxes.append(list(b))
        scores = np.round(rng.uniform(0, 1, per_image), 2).tolist()  # ties on purpose
        detections.append({"image_id": key, "boxes": d_boxes, "scores": scores,
                           "classes": d_classes})
    return groundtruth, detections


@pytest.mark.parametrize("seed, max_detections", [(0, 100), (1, 100), (2, 5)])
def test_class_by_class_scores_exactly_as_one_run_over_every_class(seed, max_detections):
    """coco_metrics runs one COCOeval per class (memory: benchmarks/evaluate.py); the precision
    and recall of every class must be those of one run over all of them."""
    rng = np.random.default_rng(seed)
    n_classes = 37
    classes = {c: f"class{c}" for c in range(1, n_classes + 1)}
    classes[40] = "never_seen"  # a class with neither ground truth nor detections
    groundtruth, detections = _random_case(rng, 60, n_classes, per_image=12)
    precision, recall = _all_classes_at_once(groundtruth, detections, classes, max_detections)
    got = coco_metrics(groundtruth, detections, classes, max_detections=max_detections)

    def mean(a):
        a = a[a > -1]
        return float(np.mean(a)) if a.size else None

    t50 = 0
    expected = {"mAP": mean(precision[:, :, :, 0, 2]), "mAP@.5": mean(precision[t50, :, :, 0, 2]),
                "mAP@.75": mean(precision[5, :, :, 0, 2]),
                "mAP_small": mean(precision[:, :, :, 1, 2]),
                "mAP_medium": mean(precision[:, :, :, 2, 2]),
                "mAP_large": mean(precision[:, :, :, 3, 2]),
                "recall@1": mean(recall[:, :, 0, 0]), "recall@10": mean(recall[:, :, 0, 1]),
                "recall@100": mean(recall[:, :, 0, 2])}
    assert {k: got[k] for k in expected} == expected
    assert expected["mAP"] is not None and 0 < expected["mAP"] < 1  # a case with something to rank
    for k, (class_id, name) in enumerate(sorted(classes.items())):
        row = got["per_class"][name]
        assert row["AP"] == mean(precision[:, :, k, 0, 2]), name
        assert row["AP@.5"] == mean(precision[t50, :, k, 0, 2]), name
    assert got["per_class"]["never_seen"]["AP"] is None
    assert got["detections"] == sum(min(len(d["scores"]), max_detections) for d in detections)
    assert_clean(got)


def test_an_empty_label_map_is_refused():
    from petdet_tasks.coco_eval import EvalInputError

    with pytest.raises(EvalInputError, match="no class to evaluate"):
        coco_metrics([gt("img-a")], [], {})
