"""Champion/challenger promotion (petdet_tasks.registry) on both backends."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest

from petdet_tasks.layout import PRODUCTION_POINTER
from petdet_tasks.registry import Decision, RegistryError, promote, read_production
from petdet_tasks.store import Store


def _fp(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:20]


def _promote(store: Store, name: str, value: float | None, **kw) -> Decision:
    """Promote model ``name`` with mAP ``value`` (plus a second metric)."""
    fp = _fp(name)
    kw.setdefault("metrics", {"mAP": value, "AR@100": 0.5})
    return promote(store, model_uri=store.uri(f"models/{fp}"), model_fingerprint=fp,
                   evaluation_uri=store.uri(f"evaluations/{_fp('eval-' + name)}"),
                   run_id=f"run-{name}", **kw)


def _pointer(store: Store) -> tuple[dict, str]:
    pointer, etag = read_production(store)
    assert pointer is not None and etag is not None
    raw, raw_etag = store.get_bytes(PRODUCTION_POINTER)
    assert raw_etag == etag and json.loads(raw) == pointer  # always whole, parseable JSON
    return pointer, etag


class InterferingStore(Store):
    """Delegates to ``inner``; before each write of the pointer calls ``hook(n)`` (n = 0, 1,
    ...) so that another promotion can happen between a promote's read and its write."""

    def __init__(self, inner: Store, hook: Callable[[int], None]):
        self.inner, self.hook, self.writes = inner, hook, 0
        self.root, self.remote = inner.root, inner.remote

    def put_bytes(self, key, data, *, if_absent=False, if_match=None):
        if key == PRODUCTION_POINTER:
            n, self.writes = self.writes, self.writes + 1
            self.hook(n)
        return self.inner.put_bytes(key, data, if_absent=if_absent, if_match=if_match)

    def get_bytes(self, key):
        return self.inner.get_bytes(key)

    def put_file(self, key, path, *, entry=None, move=False):
        return self.inner.put_file(key, path, entry=entry, move=move)

    def _download(self, key, tmp_path):
        return self.inner._download(key, tmp_path)

    def list(self, prefix=""):
        return self.inner.list(prefix)

    def delete(self, key):
        return self.inner.delete(key)


def test_no_production_yet(store):
    assert read_production(store) == (None, None)


def test_first_model_is_always_promoted(store, caplog):
    caplog.set_level(logging.INFO, logger="petdet_tasks.registry")
    before = datetime.now().astimezone()
    d = _promote(store, "a", 0.1, metrics={"mAP": 0.1, "AR@100": 0.25, "loss": None}, margin=0.5)
    fp = _fp("a")
    assert d.promoted and d.production is None and d.production_model is None
    assert d.candidate == 0.1 and d.metric == "mAP" and d.margin == 0.5
    assert d.candidate_model == store.uri(f"models/{fp}")
    assert "first production model" in d.reason and "0.1" in d.reason
    pointer, _ = _pointer(store)
    assert d.pointer == pointer
    promoted_at = pointer.pop("promoted_at")
    assert pointer == {
        "schema": 1,
        "model_uri": store.uri(f"models/{fp}"),
        "model_fingerprint": fp,
        "evaluation_uri": store.uri(f"evaluations/{_fp('eval-a')}"),
        "evaluated_on": None,  # the caller named no evaluation set
        "metric": "mAP",
        "value": 0.1,
        "metrics": {"mAP": 0.1, "AR@100": 0.25, "loss": None},
        "run_id": "run-a",
        "previous": None,
    }
    at = datetime.fromisoformat(promoted_at)
    assert at.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=2) <= at <= datetime.now().astimezone()
    raw = store.get_bytes(PRODUCTION_POINTER)[0].decode()
    assert raw == json.dumps(d.pointer, indent=2, sort_keys=True) + "\n"
    assert any("first production model" in r.getMessage() for r in caplog.records)
    assert json.loads(json.dumps(d.to_json()))["pointer"] == d.pointer


@pytest.mark.parametrize("margin", [0.0, 0.01, 0.014])
def test_better_by_margin_is_promoted_and_previous_filled(store, caplog, margin):
    caplog.set_level(logging.INFO, logger="petdet_tasks.registry")
    _promote(store, "old", 0.398)
    d = _promote(store, "new", 0.412, margin=margin)  # 0.014 == margin: float rounding tolerated
    assert d.promoted, d.reason
    assert d.production == 0.398 and d.production_model == store.uri(f"models/{_fp('old')}")
    assert d.reason.startswith("promoted:")
    assert "0.412" in d.reason and "0.398" in d.reason and "0.014" in d.reason
    pointer, _ = _pointer(store)
    assert pointer == d.pointer
    assert pointer["model_fingerprint"] == _fp("new") and pointer["value"] == 0.412
    assert pointer["previous"] == {"model_uri": store.uri(f"models/{_fp('old')}"),
                                   "model_fingerprint": _fp("old"), "value": 0.398,
                                   "evaluation_uri": store.uri(f"evaluations/{_fp('eval-old')}")}
    assert d.production_evaluation == pointer["previous"]["evaluation_uri"]
    assert any("0.412" in r.getMessage() and "0.398" in r.getMessage()
               for r in caplog.records if r.levelno == logging.INFO)


@pytest.mark.parametrize(("value", "margin", "words"), [
    (0.405, 0.01, "by only"),  # better by less than the margin
    (0.39, 0.0, "worse"),
    (0.398, 0.0, "ties"),
    (0.398, 0.01, "ties"),
])
def test_not_promoted_leaves_pointer_untouched(store, value, margin, words):
    first = _promote(store, "old", 0.398)
    _, etag = _pointer(store)
    d = _promote(store, "new", value, margin=margin)
    assert not d.promoted
    assert d.reason.startswith("not promoted:") and words in d.reason
    assert str(value) in d.reason and "0.398" in d.reason
    assert d.production == 0.398 and d.candidate == value
    assert d.pointer == first.pointer
    pointer, etag_after = _pointer(store)
    assert etag_after == etag and pointer == first.pointer


def test_promoting_the_production_model_again_is_idempotent(store):
    first = _promote(store, "a", 0.4)
    _, etag = _pointer(store)
    again = _promote(store, "a", 0.4, margin=0.1)
    assert again.promoted and again.reason.startswith("already in production")
    assert "0.4" in again.reason
    assert again.pointer == first.pointer and again.production == 0.4
    assert _pointer(store)[1] == etag  # nothing written


def test_racing_promotions_end_with_the_best_model(store):
    n = 8
    values = [0.30, 0.71, 0.45, 0.52, 0.18, 0.66, 0.49, 0.60]
    barrier = threading.Barrier(n)
    decisions: dict[int, Decision] = {}
    errors: list[BaseException] = []

    def go(i: int) -> None:
        barrier.wait()
        try:
            decisions[i] = _promote(store, f"m{i}", values[i])
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(decisions) == list(range(n))
    best = max(range(n), key=values.__getitem__)
    pointer, _ = _pointer(store)
    assert pointer["model_fingerprint"] == _fp(f"m{best}") and pointer["value"] == 0.71
    assert decisions[best].promoted and decisions[best].pointer == pointer
    prev = pointer["previous"]
    assert prev is None or prev["value"] < 0.71
    for i, d in decisions.items():
        # every decision compared against a champion that really was production at the time
        if d.production is not None:
            assert d.production in values
            assert d.promoted == (d.candidate > d.production)
        if not d.promoted:
            assert d.pointer is not None and d.pointer["value"] >= values[i]


def test_two_racers_with_the_same_metric_have_one_winner(store):
    barrier = threading.Barrier(2)
    decisions: list[Decision] = []

    def go(name: str) -> None:
        barrier.wait()
        decisions.append(_promote(store, name, 0.5))

    threads = [threading.Thread(target=go, args=(name,)) for name in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(d.promoted for d in decisions) == [False, True]
    winner = next(d for d in decisions if d.promoted)
    loser = next(d for d in decisions if not d.promoted)
    assert "ties" in loser.reason and loser.production_model == winner.candidate_model
    assert _pointer(store)[0]["model_uri"] == winner.candidate_model


def test_lost_race_redecides_against_the_new_champion(store, caplog):
    caplog.set_level(logging.INFO, logger="petdet_tasks.registry")
    _promote(store, "a", 0.40)

    def interloper(n: int) -> None:
        if n == 0:  # between the candidate's read and its write, a better model wins
            assert _promote(store, "b", 0.45).promoted

    d = _promote(InterferingStore(store, interloper), "c", 0.42)
    assert not d.promoted, d.reason
    assert d.production == 0.45 and d.production_model == store.uri(f"models/{_fp('b')}")
    assert "0.42" in d.reason and "0.45" in d.reason
    pointer, _ = _pointer(store)
    assert pointer["model_fingerprint"] == _fp("b")  # b's promotion was not overwritten
    assert pointer["previous"]["model_fingerprint"] == _fp("a")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "production.json changed while promoting" in warnings[0]
    assert _fp("b") in warnings[0] and "0.45" in warnings[0] and "deciding again" in warnings[0]


def test_lost_race_then_still_better_keeps_history(store):
    _promote(store, "a", 0.40)

    def interloper(n: int) -> None:
        if n == 0:
            assert _promote(store, "b", 0.41).promoted

    d = _promote(InterferingStore(store, interloper), "c", 0.42)
    assert d.promoted and d.production == 0.41  # compared with b, not with the stale a
    pointer, _ = _pointer(store)
    assert pointer["model_fingerprint"] == _fp("c")
    assert pointer["previous"] == {"model_uri": store.uri(f"models/{_fp('b')}"),
                                   "model_fingerprint": _fp("b"), "value": 0.41,
                                   "evaluation_uri": store.uri(f"evaluations/{_fp('eval-b')}")}


def test_lost_race_on_the_first_promotion(store):
    def interloper(n: int) -> None:
        if n == 0:  # someone creates the pointer between our "no pointer" read and our create
            assert _promote(store, "b", 0.30).promoted

    d = _promote(InterferingStore(store, interloper), "c", 0.35)
    assert d.promoted and d.production == 0.30
    assert _pointer(store)[0]["previous"]["model_fingerprint"] == _fp("b")


def test_gives_up_when_the_pointer_keeps_changing(store):
    _promote(store, "a", 0.10)

    def interloper(n: int) -> None:
        assert _promote(store, f"b{n}", 0.11 + n / 1000).promoted

    with pytest.raises(RuntimeError, match="after 3 attempts"):
        _promote(InterferingStore(store, interloper), "c", 0.9, max_attempts=3)
    assert _pointer(store)[0]["model_fingerprint"] == _fp("b2")


@pytest.mark.parametrize(("content", "match"), [
    (b"{not json", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"schema": 1, "model_uri": "s3://b/models/x", "metric": "mAP"}',
     "missing field.*'model_fingerprint'.*'value'"),
    (b'{"schema": 1, "model_uri": "u", "model_fingerprint": "f", "metric": "mAP", '
     b'"value": "high", "metrics": {}}', "wrong type.*'value'"),
    (b'{"schema": 2, "model_uri": "u", "model_fingerprint": "f", "metric": "mAP", '
     b'"value": 0.5, "metrics": {}}', "schema 2"),
])
def test_bad_pointer_is_an_error_never_empty(store, content, match):
    store.put_bytes(PRODUCTION_POINTER, content)
    with pytest.raises(RegistryError, match="registry/production.json") as info:
        read_production(store)
    assert info.match(match)
    with pytest.raises(ValueError, match="registry/production.json"):
        _promote(store, "a", 0.9)
    assert store.get_bytes(PRODUCTION_POINTER)[0] == content  # left for a human to fix


@pytest.mark.parametrize(("kw", "match"), [
    ({"metric": "mAP@50"}, r"'mAP@50' \(missing\).*\['AR@100', 'mAP'\]"),
    ({"metrics": {"mAP": float("nan"), "AR@100": 0.5}}, r"nan.*\['AR@100'\]"),
    ({"metrics": {"mAP": float("inf")}}, "inf.*none"),
    ({"metrics": {"mAP": None, "AR@100": 0.5}}, r"None.*\['AR@100'\]"),
    ({"metrics": {"mAP": True}}, "True"),
    ({"margin": -0.01}, "margin"),
    ({"margin": float("nan")}, "margin"),
    ({"max_attempts": 0}, "max_attempts"),
])
def test_bad_arguments(store, kw, match):
    with pytest.raises(RegistryError, match=match):
        _promote(store, "a", 0.5, **kw)
    assert read_production(store) == (None, None)


def test_fingerprint_must_match_the_model_uri(store):
    with pytest.raises(ValueError, match="does not match"):
        promote(store, model_uri=store.uri(f"models/{_fp('a')}"), model_fingerprint=_fp("b"),
                evaluation_uri="e", metrics={"mAP": 0.5})


def test_other_metric_compares_with_productions_recorded_value(store):
    _promote(store, "a", 0.40, metrics={"mAP": 0.40, "AR@100": 0.50})
    d = _promote(store, "b", 0.30, metrics={"mAP": 0.30, "AR@100": 0.55}, metric="AR@100")
    assert d.promoted and d.production == 0.50 and d.candidate == 0.55
    pointer, _ = _pointer(store)
    assert pointer["metric"] == "AR@100" and pointer["value"] == 0.55
    assert pointer["previous"]["value"] == 0.50
    with pytest.raises(ValueError, match="'AR@100'.*'recall'"):
        _promote(store, "c", 0.9, metrics={"recall": 0.9}, metric="recall")


def test_pointer_keeps_only_json_safe_metrics(store):
    np = pytest.importorskip("numpy")
    d = _promote(store, "a", None, metrics={"mAP": np.float32(0.25), "AR@100": float("nan"),
                                            "AR@1": None, "n": 3})
    assert d.promoted and math.isclose(d.candidate, 0.25)
    pointer, _ = _pointer(store)
    assert pointer["metrics"] == {"mAP": 0.25, "AR@1": None, "n": 3.0}


# --- the same evaluation set ------------------------------------------------------------------

LAST_WEEK = {"tfrecords": _fp("records-1"), "split": "val"}
THIS_WEEK = {"tfrecords": _fp("records-2"), "split": "val"}


def _rescorer(values: dict[str, float]):
    """A rescore that 'evaluates' production on the candidate's set: ``values`` by model
    fingerprint; the calls are recorded."""
    calls = []

    def rescore(pointer):
        calls.append(pointer["model_fingerprint"])
        where = f"evaluations/{_fp('again-' + pointer['model_fingerprint'])}"
        return where, {"mAP": values[pointer["model_fingerprint"]], "AR@100": 0.5}
    return rescore, calls


def test_production_measured_on_other_records_is_measured_again_before_comparing(store):
    """Last week's champion scored 0.50 on last week's records; on this week's (new labelled
    data) it scores 0.30. A candidate with 0.40 this week is better, though 0.40 < 0.50."""
    _promote(store, "a", 0.50, evaluated_on=LAST_WEEK)
    rescore, calls = _rescorer({_fp("a"): 0.30})
    d = _promote(store, "b", 0.40, evaluated_on=THIS_WEEK, rescore=rescore)
    assert calls == [_fp("a")]
    assert d.promoted and d.production == 0.30
    assert d.production_evaluation == f"evaluations/{_fp('again-' + _fp('a'))}"
    assert "measured again on the 'val' split of tfrecords/" + THIS_WEEK["tfrecords"] in d.reason
    pointer, _ = _pointer(store)
    assert pointer["evaluated_on"] == THIS_WEEK and pointer["value"] == 0.40
    assert pointer["previous"] == {"model_uri": store.uri(f"models/{_fp('a')}"),
                                   "model_fingerprint": _fp("a"), "value": 0.30,
                                   "evaluation_uri": d.production_evaluation}
    # ... and the other way: the champion is better on the new set, though its old number
    # was lower than the candidate's
    rescore, calls = _rescorer({_fp("b"): 0.45})
    d = _promote(store, "c", 0.42, evaluated_on=LAST_WEEK, rescore=rescore)
    assert calls == [_fp("b")] and not d.promoted and d.production == 0.45
    assert "worse than production 0.45" in d.reason


def test_production_measured_on_the_same_set_is_not_measured_again(store):
    _promote(store, "a", 0.50, evaluated_on=THIS_WEEK)
    rescore, calls = _rescorer({})
    d = _promote(store, "b", 0.55, evaluated_on=THIS_WEEK, rescore=rescore)
    assert calls == [] and d.promoted and d.production == 0.50
    assert d.production_evaluation == store.uri(f"evaluations/{_fp('eval-a')}")


def test_an_unrecorded_set_is_another_set(store):
    """A pointer written before evaluation sets were recorded names none: production is
    measured again rather than trusted."""
    _promote(store, "a", 0.50)
    assert _pointer(store)[0]["evaluated_on"] is None
    rescore, calls = _rescorer({_fp("a"): 0.60})
    d = _promote(store, "b", 0.55, evaluated_on=THIS_WEEK, rescore=rescore)
    assert calls == [_fp("a")] and not d.promoted


def test_without_a_rescore_different_sets_are_refused(store):
    _promote(store, "a", 0.50, evaluated_on=LAST_WEEK)
    before = _pointer(store)
    with pytest.raises(RegistryError, match=(
            r"cannot compare: production model .* was measured on the 'val' split of "
            rf"tfrecords/{LAST_WEEK['tfrecords']}, this candidate on the 'val' split of "
            rf"tfrecords/{THIS_WEEK['tfrecords']}")):
        _promote(store, "b", 0.90, evaluated_on=THIS_WEEK)
    assert _pointer(store) == before


def test_a_rescore_without_the_metric_is_an_error(store):
    _promote(store, "a", 0.50, evaluated_on=LAST_WEEK)
    with pytest.raises(RegistryError, match="on the candidate's set has no finite 'mAP'"):
        _promote(store, "b", 0.90, evaluated_on=THIS_WEEK,
                 rescore=lambda pointer: ("evaluations/x", {"mAP": None}))


def test_production_model_uri_is_found_by_fingerprint_in_this_store(store):
    """A store restored under another root: the pointer's model_uri names the old root."""
    from petdet_tasks.registry import production_model_uri

    pointer = {"model_uri": "s3://old-bucket/petdet/models/" + _fp("a"),
               "model_fingerprint": _fp("a")}
    assert production_model_uri(store, pointer) == store.uri(f"models/{_fp('a')}")
