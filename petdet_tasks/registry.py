"""Champion/challenger promotion of an exported model through ``registry/production.json``.

The pointer names the production model and the metrics it was promoted on::

    {"schema": 1, "model_uri": ..., "model_fingerprint": ..., "evaluation_uri": ...,
     "evaluated_on": {"tfrecords": <fp>, "split": "val"},
     "metric": "mAP", "value": 0.412, "metrics": {...}, "promoted_at": "...+00:00",
     "run_id": ..., "previous": {"model_uri": ..., "model_fingerprint": ..., "value": ...,
                                 "evaluation_uri": ...}}

:func:`promote` compares a candidate with the current champion (higher is better): the first
model is always promoted; later ones only when strictly better *and* better by at least
``margin``. Both numbers must come from the same evaluation set: when the champion was
measured on other records or another split (``evaluated_on``: last week's records, before
extra data was added), ``rescore`` measures it on the candidate's set first, and without one
the promotion is refused. A number measured on other images says nothing about which model
is better. The pointer is replaced with a compare-and-swap on its ETag (created with a
create-only put), so two runs promoting at once cannot lose an update: the loser gets
:class:`~petdet_tasks.store.PreconditionFailed`, re-reads the pointer and decides again
against the champion that is really there now. A pointer is always written whole (the JSON is
built first, and a store put is atomic), so nobody ever reads a half-written one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from petdet_tasks.errors import PermanentError
from petdet_tasks.layout import PRODUCTION_POINTER, output_uri, split_output_uri
from petdet_tasks.store import NotFound, PreconditionFailed, Store

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema": int,
    "model_uri": str,
    "model_fingerprint": str,
    "metric": str,
    "value": (int, float),
    "metrics": dict,
}


class RegistryError(PermanentError, ValueError):
    """The production pointer is unreadable, or the promotion cannot be decided as asked (an
    unknown metric, a bad margin): a retry would meet the same pointer and arguments."""


@dataclasses.dataclass(frozen=True)
class Decision:
    """The outcome of one :func:`promote` call (also what the promote task pushes to XCom)."""

    promoted: bool  # True also when the candidate already IS production (idempotent retry)
    reason: str  # one human sentence with both numbers
    metric: str
    candidate: float
    production: float | None  # the production value compared with (None: no production yet)
    margin: float
    candidate_model: str  # model URI
    production_model: str | None  # the model it was compared with
    pointer: dict | None  # the production.json content after the decision
    # the evaluation production's number comes from: the pointer's, or production measured
    # again on the candidate's evaluation set (``rescore``); None: no production yet
    production_evaluation: str | None = None
    already_production: bool = False  # the candidate is production already: nothing written

    def to_json(self) -> dict:
        """Plain JSON (the pointer included)."""
        return dataclasses.asdict(self)


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is not a finite real number (bools are
    not metrics; numpy scalars are accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _fmt(x: float) -> str:
    """A metric value as people read it (4 significant digits); the exact values are in the
    decision's JSON."""
    return f"{x:.4g}"


def _pointer_uri(store: Store) -> str:
    return store.uri(PRODUCTION_POINTER)


def production_model_uri(store: Store, pointer: Mapping) -> str:
    """The production model's URI in this store, from its fingerprint. The pointer's
    ``model_uri`` is where it was promoted: a store restored elsewhere, or a bucket reached
    through another root, holds the same ``models/<fingerprint>`` under a different root."""
    return output_uri(store, "export", pointer["model_fingerprint"])


def describe_set(evaluated_on: Mapping | None) -> str:
    """An evaluation set as people read it: ``the 'val' split of tfrecords/<fp>``."""
    if not evaluated_on:
        return "an evaluation set it does not record (promoted before sets were recorded)"
    return f"the {evaluated_on.get('split')!r} split of tfrecords/{evaluated_on.get('tfrecords')}"


def read_production(store: Store) -> tuple[dict | None, str | None]:
    """(pointer, etag); (None, None) when no model was promoted yet.

    A pointer that is not valid JSON or lacks required fields raises RegistryError naming the key
    (never silently treated as empty: that would let any model replace the champion).
    """
    try:
        data, etag = store.get_bytes(PRODUCTION_POINTER)
    except NotFound:
        return None, None
    where = _pointer_uri(store)
    try:
        pointer = json.loads(data)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise RegistryError(f"{where} is not valid JSON ({e}); fix or remove it by hand") from None
    if not isinstance(pointer, dict):
        raise RegistryError(
            f"{where} is not a production pointer: expected a JSON object, got "
            f"{type(pointer).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in pointer]
    if missing:
        raise RegistryError(
            f"{where} is not a production pointer: missing field(s) "
            + ", ".join(repr(k) for k in missing))
    wrong = [k for k, t in REQUIRED_FIELDS.items()
             if not isinstance(pointer[k], t) or isinstance(pointer[k], bool)]
    if wrong:
        raise RegistryError(
            f"{where} is not a production pointer: wrong type for field(s) "
            + ", ".join(f"{k!r} ({type(pointer[k]).__name__})" for k in wrong))
    if pointer["schema"] != SCHEMA_VERSION:
        raise RegistryError(
            f"{where} has schema {pointer['schema']}, this code reads schema {SCHEMA_VERSION}")
    if _number(pointer["value"]) is None:
        raise RegistryError(f"{where} has a non-finite value {pointer['value']!r}")
    if not pointer["model_fingerprint"] or not pointer["model_uri"]:
        raise RegistryError(f"{where} has an empty model_uri or model_fingerprint")
    return pointer, etag


def _production_value(store: Store, pointer: dict, metric: str) -> float:
    """Production's value of ``metric``: its promoted value when it was promoted on the same
    metric, else its recorded ``metrics[metric]``; RegistryError when it has none."""
    if pointer["metric"] == metric:
        return float(pointer["value"])
    value = _number(pointer["metrics"].get(metric))
    if value is None:
        raise RegistryError(
            f"cannot compare on {metric!r}: production model {pointer['model_uri']} was promoted "
            f"on {pointer['metric']!r} and {_pointer_uri(store)} records no finite {metric!r} "
            f"for it (recorded metrics: {sorted(pointer['metrics'])}); promote on "
            f"{pointer['metric']!r} or replace the pointer deliberately")
    return value


def _json_metrics(metrics: Mapping[str, float | None]) -> dict[str, float | None]:
    """The metrics that JSON can hold: finite numbers (as float) and None (null)."""
    out: dict[str, float | None] = {}
    for name, value in metrics.items():
        if value is None:
            out[str(name)] = None
        elif (num := _number(value)) is not None:
            out[str(name)] = num
        else:
            log.debug("metric %r = %r is not JSON-safe; left out of the pointer", name, value)
    return out


def _encode(pointer: dict) -> bytes:
    return (json.dumps(pointer, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


# production's evaluation on the candidate's set: pointer → (evaluation URI, its metrics)
Rescore = Callable[[dict], tuple[str, Mapping[str, float | None]]]


def promote(store: Store, *, model_uri: str, model_fingerprint: str, evaluation_uri: str,
            metrics: Mapping[str, float | None], metric: str = "mAP", margin: float = 0.0,
            run_id: str | None = None, max_attempts: int = 20,
            evaluated_on: Mapping[str, str] | None = None,
            rescore: Rescore | None = None) -> Decision:
    """Make the model production if it beats the current one on ``metric`` (module doc).

    Promoted when there is no production model yet, or when ``candidate > production`` and
    ``candidate >= production + margin`` (a tie never promotes; float rounding in the margin
    comparison is tolerated). A candidate that already is production (same fingerprint) is
    reported as promoted without writing. When the pointer changes between our read and our
    write, the decision is taken again against the new champion, at most ``max_attempts``
    times (then RuntimeError).

    ``evaluated_on`` names the candidate's evaluation set (``{"tfrecords": fp, "split": s}``).
    When given and production's pointer records another set (or none), production's number is
    taken from ``rescore(pointer)`` (its evaluation on the candidate's set), and without
    ``rescore`` the promotion is refused. Without ``evaluated_on`` the numbers are compared as
    given (the caller vouches that they are comparable).

    :raises RegistryError: ``metric`` is not a finite number in ``metrics``, ``margin`` is
        negative or not finite, the pointer is invalid, production has no value for
        ``metric``, or production was measured on another set and there is no ``rescore``.
    """
    numeric = {k: v for k, v in ((k, _number(v)) for k, v in metrics.items()) if v is not None}
    if metric not in numeric:
        got = "missing" if metric not in metrics else f"{metrics[metric]!r}, not a finite number"
        raise RegistryError(
            f"cannot promote on metric {metric!r} ({got}); numeric metrics available: "
            f"{sorted(numeric) or 'none'}")
    candidate = numeric[metric]
    if _number(margin) is None or margin < 0:
        raise RegistryError(f"margin must be a finite number >= 0, got {margin!r}")
    margin = float(margin)
    if max_attempts < 1:
        raise RegistryError(f"max_attempts must be >= 1, got {max_attempts!r}")
    for name, value in (("model_uri", model_uri), ("model_fingerprint", model_fingerprint),
                        ("evaluation_uri", evaluation_uri)):
        if not isinstance(value, str) or not value:
            raise RegistryError(f"{name} must be a non-empty string, got {value!r}")
    try:
        _, _, uri_fp = split_output_uri(model_uri)
    except ValueError:
        uri_fp = None  # not a <root>/<folder>/<fp> URI: nothing to cross-check
    if uri_fp is not None and uri_fp != model_fingerprint:
        raise RegistryError(
            f"model_fingerprint {model_fingerprint!r} does not match the fingerprint "
            f"{uri_fp!r} in model_uri {model_uri}")
    safe_metrics = _json_metrics(metrics)

    production_evaluation: str | None = None

    def decided(promoted: bool, reason: str, production: float | None,
                production_model: str | None, pointer: dict | None,
                already: bool = False) -> Decision:
        log.info("candidate %s (run %s): %s", model_uri, run_id, reason)
        return Decision(promoted=promoted, reason=reason, metric=metric, candidate=candidate,
                        production=production, margin=margin, candidate_model=model_uri,
                        production_model=production_model, pointer=pointer,
                        production_evaluation=production_evaluation,
                        already_production=already)

    def production_number(pointer: dict) -> tuple[float, str, str]:
        """(production's value, the evaluation it comes from, how the reason names it)."""
        if evaluated_on is None or pointer.get("evaluated_on") == dict(evaluated_on):
            return (_production_value(store, pointer, metric), pointer.get("evaluation_uri"),
                    f"model {pointer['model_uri']}")
        if rescore is None:
            raise RegistryError(
                f"cannot compare: production model {pointer['model_uri']} was measured on "
                f"{describe_set(pointer.get('evaluated_on'))}, this candidate on "
                f"{describe_set(evaluated_on)}; evaluate production on the candidate's set "
                "first (numbers from different images say nothing about which is better)")
        log.info("production model %s was measured on %s; measuring it on %s, the candidate's "
                 "set", pointer["model_uri"], describe_set(pointer.get("evaluated_on")),
                 describe_set(evaluated_on))
        where, theirs = rescore(pointer)
        value = _number(theirs.get(metric))
        if value is None:
            raise RegistryError(f"production's evaluation {where} on the candidate's set has no "
                                f"finite {metric!r} ({theirs.get(metric)!r})")
        return (value, where, f"model {pointer['model_uri']}, measured again on "
                f"{describe_set(evaluated_on)}")

    pointer, etag = read_production(store)
    for _attempt in range(max_attempts):
        if pointer is None:
            production = production_evaluation = None
            previous = None
            reason = (f"promoted: {metric} {_fmt(candidate)} is the first production model "
                      "(no production model yet)")
        else:
            if pointer["model_fingerprint"] == model_fingerprint:
                production_evaluation = pointer.get("evaluation_uri")
                value = _number(pointer["metrics"].get(metric))
                if pointer["metric"] == metric:
                    value = float(pointer["value"])
                return decided(
                    True,
                    f"already in production: model {pointer['model_uri']} is production "
                    f"({pointer['metric']} {_fmt(float(pointer['value']))}; this evaluation "
                    f"{metric} {_fmt(candidate)}); nothing written",
                    value, pointer["model_uri"], pointer, already=True)
            production, production_evaluation, named = production_number(pointer)
            champion = f"production {_fmt(production)} ({named})"
            gain = candidate - production
            enough = gain >= margin or math.isclose(gain, margin, rel_tol=1e-9, abs_tol=1e-12)
            if candidate == production:
                return decided(False, f"not promoted: {metric} {_fmt(candidate)} ties "
                               f"{champion}; a tie keeps the champion",
                               production, pointer["model_uri"], pointer)
            if candidate < production:
                return decided(False, f"not promoted: {metric} {_fmt(candidate)} is worse than "
                               f"{champion} by {_fmt(-gain)}",
                               production, pointer["model_uri"], pointer)
            if not enough:
                return decided(False, f"not promoted: {metric} {_fmt(candidate)} beats "
                               f"{champion} by only {_fmt(gain)} < margin {_fmt(margin)}",
                               production, pointer["model_uri"], pointer)
            previous = {"model_uri": pointer["model_uri"],
                        "model_fingerprint": pointer["model_fingerprint"],
                        "value": production, "evaluation_uri": production_evaluation}
            reason = (f"promoted: {metric} {_fmt(candidate)} beats {champion} by {_fmt(gain)} "
                      f">= margin {_fmt(margin)}")

        new_pointer = {
            "schema": SCHEMA_VERSION,
            "model_uri": model_uri,
            "model_fingerprint": model_fingerprint,
            "evaluation_uri": evaluation_uri,
            "evaluated_on": None if evaluated_on is None else dict(evaluated_on),
            "metric": metric,
            "value": candidate,
            "metrics": safe_metrics,
            "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "run_id": run_id,
            "previous": previous,
        }
        body = _encode(new_pointer)  # whole pointer built before anything is written
        try:
            if etag is None:
                store.put_bytes(PRODUCTION_POINTER, body, if_absent=True)
            else:
                store.put_bytes(PRODUCTION_POINTER, body, if_match=etag)
        except PreconditionFailed:
            pointer, etag = read_production(store)
            if pointer is None:
                now = "no production model"
            else:
                now = (f"model {pointer['model_uri']}, {pointer['metric']} "
                       f"{_fmt(float(pointer['value']))}")
            log.warning("%s changed while promoting %s (now %s); deciding again",
                        PRODUCTION_POINTER.rsplit("/", 1)[-1], model_uri, now)
            continue
        return decided(True, reason, production,
                       None if pointer is None else pointer["model_uri"], new_pointer)
    raise RuntimeError(
        f"gave up promoting {model_uri} after {max_attempts} attempts: {_pointer_uri(store)} "
        "kept changing between read and write")
