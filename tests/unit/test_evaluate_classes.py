"""Which classes an evaluation scores when the model's and the records' label maps differ."""

from __future__ import annotations

import logging

import pytest

from petdet_tasks.errors import ConfigError, PermanentError
from petdet_tasks.evaluate import eval_classes
from petdet_tasks.label_map import LabelMap, LabelMapItem


def _map(*pairs: tuple[int, str]) -> LabelMap:
    return LabelMap(LabelMapItem(i, n) for i, n in pairs)


OXFORD = _map((1, "Abyssinian"), (2, "american_bulldog"), (3, "american_pit_bull_terrier"))


def test_the_same_map_scores_its_classes():
    assert eval_classes(OXFORD, OXFORD, "m", "r") == (
        {1: "Abyssinian", 2: "american_bulldog", 3: "american_pit_bull_terrier"}, [])


def test_swapped_ids_are_refused_naming_both_sides():
    """Records whose id 1 is american_bulldog: the model's 1 (Abyssinian) would be scored as a
    bulldog, and the table would print the wrong names (an audit measured mAP 0.013 instead of
    0.0495 on such records, without a word)."""
    swapped = _map((1, "american_bulldog"), (2, "Abyssinian"), (3, "american_pit_bull_terrier"))
    with pytest.raises(ConfigError, match=(
            r"label maps of the records r and the model m disagree: id 1 is 'american_bulldog' "
            r"in the records, 'Abyssinian' in the model; id 2 is 'Abyssinian' in the records, "
            r"'american_bulldog' in the model; 'american_bulldog' is id 1 in the records, 2 in "
            r"the model")) as e:
        eval_classes(OXFORD, swapped, "m", "r")
    assert isinstance(e.value, PermanentError)


def test_a_name_under_another_id_is_refused():
    moved = _map((1, "Abyssinian"), (7, "american_bulldog"))
    with pytest.raises(ConfigError, match="'american_bulldog' is id 7 in the records, 2 in"):
        eval_classes(OXFORD, moved, "m", "r")


def test_classes_the_model_was_not_trained_on_are_scored_and_listed(caplog):
    """A model trained on the classes its records had ('present') measured on records with
    more: the new classes count (AP 0) rather than making the evaluation impossible — which is
    what lets last week's champion be measured on this week's records."""
    caplog.set_level(logging.WARNING, logger="petdet_tasks.evaluate")
    subset = _map((1, "Abyssinian"), (3, "american_pit_bull_terrier"))
    classes, cannot = eval_classes(subset, OXFORD, "m", "r")
    assert classes == {1: "Abyssinian", 2: "american_bulldog", 3: "american_pit_bull_terrier"}
    assert cannot == ["american_bulldog"]
    assert "not trained on 1 classes of the records r (american_bulldog)" in caplog.text
    # the other way round: the model knows more classes than the records hold
    assert eval_classes(OXFORD, subset, "m", "r") == (
        {1: "Abyssinian", 2: "american_bulldog", 3: "american_pit_bull_terrier"}, [])


# --- what the model gets wrong ------------------------------------------------------------------

NAMES = {1: "Abyssinian", 2: "american_bulldog", 3: "american_pit_bull_terrier"}


def _gt(boxes, labels):
    return {"boxes": boxes, "labels": labels}


def _det(boxes, scores, classes):
    return {"boxes": boxes, "scores": scores, "classes": classes}


def test_error_analysis_names_what_the_model_saw_at_each_box():
    from petdet_tasks.evaluate import error_analysis, format_analysis

    head = [0.1, 0.1, 0.5, 0.5]
    shifted = [0.1, 0.1, 0.5, 0.45]  # IoU 0.875 with head
    far = [0.6, 0.6, 0.9, 0.9]
    groundtruth = [
        _gt([head], [1]),              # found, right breed
        _gt([head], [2]),              # the best overlapping detection says Abyssinian
        _gt([head, far], [3, 3]),      # one found, one missed
        _gt([head], [2]),              # another bulldog seen as an Abyssinian
    ]
    detections = [
        _det([shifted, far], [0.9, 0.3], [1, 2]),  # far, 0.3: below the false-alarm score
        _det([head, shifted], [0.4, 0.7], [2, 1]),  # the right class scores lower
        _det([head, [0.0, 0.0, 0.05, 0.05]], [0.6, 0.8], [3, 1]),  # a confident false alarm
        _det([shifted], [0.55], [1]),
    ]
    summary, outcomes = error_analysis(groundtruth, detections, NAMES)
    assert outcomes[0] == [{"class": 1, "result": "correct", "predicted": 1, "score": 0.9,
                            "iou": 0.875}]
    assert outcomes[1][0]["result"] == "confused" and outcomes[1][0]["predicted"] == 1
    assert [o["result"] for o in outcomes[2]] == ["correct", "missed"]
    assert outcomes[2][1] == {"class": 3, "result": "missed"}
    assert summary["groundtruth_boxes"] == 5
    assert (summary["correct"], summary["confused"], summary["missed"]) == (2, 2, 1)
    assert summary["found_rate"] == 4 / 5 and summary["correct_rate"] == 2 / 5
    assert summary["confusion"] == {
        "Abyssinian": {"Abyssinian": 1},
        "american_bulldog": {"Abyssinian": 2},
        "american_pit_bull_terrier": {"(missed)": 1, "american_pit_bull_terrier": 1}}
    assert summary["most_confused"] == [
        {"truth": "american_bulldog", "predicted": "Abyssinian", "boxes": 2}]
    assert summary["false_alarms"] == 1 and summary["false_alarm_classes"] == {"Abyssinian": 1}
    text = format_analysis(summary)
    assert "2 right class, 2 another class, 1 missed; 1 detections of nothing" in text
    assert "american_bulldog seen as Abyssinian (2)" in text


def test_error_analysis_of_an_image_without_detections_or_boxes():
    from petdet_tasks.evaluate import error_analysis

    summary, outcomes = error_analysis([_gt([[0.1, 0.1, 0.2, 0.2]], [1]), _gt([], [])],
                                       [_det([], [], []), _det([[0.1, 0.1, 0.2, 0.2]], [0.9],
                                                               [2])], NAMES)
    assert outcomes == [[{"class": 1, "result": "missed"}], []]
    assert summary["missed"] == 1 and summary["false_alarms"] == 1
    empty, _ = error_analysis([], [], NAMES)
    assert empty["groundtruth_boxes"] == 0 and empty["found_rate"] is None
