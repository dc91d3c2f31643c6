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
