"""The export's check of its best detection against keras-hub's own decoder, on hand-made
decoder outputs: when it must fail, and when the two cannot be compared (keras-hub runs its
NMS with the boxes in the letterbox padding, which the export drops first)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from petdet_tasks.export import ExportError, _check_top_detection

SIZE = 100


def _fns():
    ids = np.array([1, 2, 3])
    return SimpleNamespace(size=SIZE, keep_aspect_ratio=False, detector=None,
                           label_ids=SimpleNamespace(numpy=lambda: ids),
                           cfg=SimpleNamespace(score_threshold=0.05, iou_threshold=0.5))


def _theirs(*dets):
    """keras-hub's decode_predictions output: [1, 100] rows, label -1 padding."""
    boxes, conf, labels = np.zeros((1, 100, 4)), np.zeros((1, 100)), -np.ones((1, 100), int)
    for j, (label, score, box) in enumerate(dets):
        boxes[0, j], conf[0, j], labels[0, j] = box, score, label
    return lambda detector, x: {"boxes": boxes, "confidence": conf, "labels": labels}


def _ours(*dets):
    """The export's outputs for one image (normalised boxes, label-map ids)."""
    ref = {"num_detections": np.array([len(dets)], float),
           "detection_boxes": np.zeros((1, 100, 4)), "detection_scores": np.zeros((1, 100)),
           "detection_classes": np.zeros((1, 100))}
    for j, (cls, score, box) in enumerate(dets):
        ref["detection_classes"][0, j] = cls
        ref["detection_scores"][0, j] = score
        ref["detection_boxes"][0, j] = box
    return ref


IMAGE = np.zeros((1, SIZE, SIZE, 3))
HEAD = [10, 20, 50, 60]  # pixels (yxyx) of the model input


def _check(theirs, ours):
    _check_top_detection(_fns(), None, IMAGE, ours, theirs)


def test_the_same_best_detection_passes():
    _check(_theirs((0, 0.9, HEAD)), _ours((1, 0.9, np.array(HEAD) / SIZE)))


def test_a_different_best_detection_fails():
    with pytest.raises(ExportError, match="best detection differs"):
        _check(_theirs((0, 0.9, HEAD)), _ours((1, 0.7, np.array(HEAD) / SIZE)))
    with pytest.raises(ExportError, match="best detection differs"):
        _check(_theirs((0, 0.9, HEAD)), _ours((2, 0.9, np.array(HEAD) / SIZE)))


def test_no_detection_from_keras_hub_where_the_export_has_some_fails():
    with pytest.raises(ExportError, match="finds no detection where the export finds 1"):
        _check(_theirs(), _ours((1, 0.3, np.array(HEAD) / SIZE)))


def test_a_padding_box_on_top_of_keras_hubs_list_makes_them_incomparable(caplog):
    """keras-hub kept a box wholly in the padding (out of the image) above everything: its
    class-agnostic NMS may have suppressed the in-image box the export keeps, or filled its
    rows (seen on a weakly trained model in the DAG test)."""
    padding = [-40, -40, -5, -5]
    with caplog.at_level("INFO", logger="petdet_tasks.export"):
        _check(_theirs((0, 0.8, padding)), _ours((1, 0.3, np.array(HEAD) / SIZE)))
        _check(_theirs((0, 0.8, padding), (1, 0.2, HEAD)),
               _ours((1, 0.6, np.array([0.1, 0.2, 0.5, 0.6]))))
    assert caplog.text.count("top-detection check against keras-hub's decoder skipped") == 2
    # a padding box below the in-image best changes nothing: the check still bites
    with pytest.raises(ExportError, match="best detection differs"):
        _check(_theirs((0, 0.9, HEAD), (0, 0.5, padding)), _ours((1, 0.7, np.array(HEAD) / SIZE)))


def test_a_sliver_on_the_images_edge_on_top_of_keras_hubs_list_makes_them_incomparable(caplog):
    """A box reaching just past the image's top edge clips to 1e-5 high in keras-hub's
    numbers and to nothing in the export's (which drops it): not comparable either. A box
    with area is still compared."""
    sliver = [-5, 10, 0.0005, 90]  # 5e-6 of the image high once clipped
    with caplog.at_level("INFO", logger="petdet_tasks.export"):
        _check(_theirs((0, 0.8, sliver)), _ours((1, 0.3, np.array(HEAD) / SIZE)))
    assert "lies in the letterbox padding (or is a sliver" in caplog.text
    with pytest.raises(ExportError, match="best detection differs"):
        _check(_theirs((0, 0.8, [-5, 10, 0.5, 90])), _ours((1, 0.3, np.array(HEAD) / SIZE)))
