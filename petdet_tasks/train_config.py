"""The training step's typed configuration: defaults, validation, JSON/YAML round trip.

Pure Python (no TensorFlow, no keras): imported by the CLI and by Airflow at parse time.

* :class:`TrainConfig` — every knob of the fine-tune, with defaults that train a useful pets
  detector; :meth:`TrainConfig.validate` collects **all** problems into one :class:`ConfigError`
  whose lines each name the field, what was expected and what was given.
* :meth:`TrainConfig.from_dict` / :meth:`TrainConfig.to_dict` — a JSON-able round trip
  (``from_dict(c.to_dict()) == c``); unknown keys are errors that list the valid keys and suggest
  the nearest one.
* :meth:`TrainConfig.fingerprint_fields` — the part of the config that changes the trained model
  (what the step's fingerprint hashes).
* :class:`LRSchedule.lr_at` — the pure-Python reference of the learning-rate schedule; the
  TensorFlow schedule is tested against it.
* :func:`load_train_config` — a JSON or YAML file (or an OD API ``pipeline.config``, converted
  through :mod:`petdet_tasks.pipeline_config`).
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from petdet_tasks.errors import ConfigError

log = logging.getLogger(__name__)

LR_KINDS = ("constant", "manual_step", "cosine")
OPTIMIZERS = ("sgd", "adam")
MIXED_PRECISION = ("auto", "on", "off")
IMAGE_SIZE_MULTIPLE = 128
IMAGE_SIZE_MIN = 64
IMAGE_SIZE_MAX = 1536
# keras-hub's AnchorGenerator spaces level-l anchors S // ceil(S / 2**l) px apart: the feature
# stride 2**l (P3..P7: 8..128) only when S is a multiple of 2**l or the level has one cell. So
# the anchors sit on the P6/P7 feature grid for S = 64 and multiples of 128, and nowhere else.
IMAGE_SIZE_RULE = (f"{IMAGE_SIZE_MIN} or a multiple of {IMAGE_SIZE_MULTIPLE} in [{IMAGE_SIZE_MIN}, "
                   f"{IMAGE_SIZE_MAX}]")
IMAGE_SIZE_WHY = ("keras-hub's anchor grid matches the P6/P7 feature maps (strides 64, 128) "
                  f"only at 64 px or multiples of {IMAGE_SIZE_MULTIPLE}")
COLOR_JITTER_MAX = 0.99  # what the pipeline.config import caps a stronger colour option at
DEFAULT_PRESET = "retinanet_resnet50_fpn_coco"

# Fields that do not change the trained model: left out of the step's fingerprint.
NON_MODEL_FIELDS = ("log_every_n", "checkpoint_every_n", "label_map_path", "input_paths")


# --------------------------------------------------------------------------------------------
# small checkers: each returns None (fine) or a problem line "field: expected X, got Y"


def _got(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, str) else repr(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(float(v)))


def _check_int(name: str, v: Any, lo: int | None = None, hi: int | None = None) -> str | None:
    rng = _range_text(lo, hi)
    if not _is_int(v):
        return f"{name}: expected an integer{rng}, got {_got(v)}"
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        return f"{name}: expected an integer{rng}, got {v}"
    return None


def _range_text(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _check_num(name: str, v: Any, *, gt: float | None = None, ge: float | None = None,
               lt: float | None = None, le: float | None = None) -> str | None:
    parts = []
    if gt is not None:
        parts.append(f"> {gt:g}")
    if ge is not None:
        parts.append(f">= {ge:g}")
    if lt is not None:
        parts.append(f"< {lt:g}")
    if le is not None:
        parts.append(f"<= {le:g}")
    want = "a finite number" + (" " + " and ".join(parts) if parts else "")
    if not _is_num(v):
        return f"{name}: expected {want}, got {_got(v)}"
    bad = ((gt is not None and not v > gt) or (ge is not None and not v >= ge)
           or (lt is not None and not v < lt) or (le is not None and not v <= le))
    return f"{name}: expected {want}, got {v!r}" if bad else None


def _check_choice(name: str, v: Any, choices: tuple[str, ...]) -> str | None:
    if v not in choices or not isinstance(v, str):
        hint = _suggest(v, choices) if isinstance(v, str) else ""
        return f"{name}: expected one of {', '.join(map(repr, choices))}, got {_got(v)}{hint}"
    return None


def _check_bool(name: str, v: Any) -> str | None:
    return None if isinstance(v, bool) else f"{name}: expected true or false, got {_got(v)}"


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def valid_image_size(size: Any) -> bool:
    """True for the sizes training accepts: 64, or a multiple of 128 in [64, 1536]."""
    return (_is_int(size) and IMAGE_SIZE_MIN <= size <= IMAGE_SIZE_MAX
            and (size == IMAGE_SIZE_MIN or size % IMAGE_SIZE_MULTIPLE == 0))


def image_size_problem(size: Any) -> str | None:
    """None for a valid size, else why not: ``expected 64 or a multiple of 128 in [64, 1536]
    (keras-hub's anchor grid ...), got S``."""
    if valid_image_size(size):
        return None
    what = "an integer, " if not _is_int(size) else ""
    return f"expected {what}{IMAGE_SIZE_RULE} ({IMAGE_SIZE_WHY}), got {_got(size)}"


def nearest_image_size(x: float) -> int:
    """The valid size nearest to ``x`` (ties go to the larger)."""
    valid = [IMAGE_SIZE_MIN] + list(range(IMAGE_SIZE_MULTIPLE, IMAGE_SIZE_MAX + 1,
                                          IMAGE_SIZE_MULTIPLE))
    return min(valid, key=lambda v: (abs(v - x), -v))


# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LRSchedule:
    """The learning-rate schedule (per optimizer step; ``step`` counts from 0).

    * ``constant`` — ``initial_learning_rate`` throughout (no warm-up allowed).
    * ``manual_step`` — ``initial_learning_rate`` until the first boundary of ``steps``
      (``((step, lr), ...)``); from ``step`` on (``>=``, the OD API's ``manual_stepping``
      semantics) the paired ``lr`` applies. Boundaries may lie beyond ``num_steps`` (the OD API
      pets tutorial's do): the rate then simply never changes.
    * ``cosine`` — after the warm-up, ``initial * ((1 - alpha) * 0.5 * (1 + cos(pi * p)) +
      alpha)`` with ``p = (step - warmup_steps) / (total_steps - warmup_steps)`` clipped to
      [0, 1]; so the rate is ``initial`` at the end of the warm-up and ``initial * alpha`` at
      ``total_steps`` and after (Keras ``CosineDecay(decay_steps=total - warmup)``).

    Warm-up (``manual_step`` and ``cosine``): for ``step < warmup_steps`` the rate goes linearly
    from ``warmup_start_lr`` (at step 0) to ``initial_learning_rate`` (reached at
    ``warmup_steps``). Manual-step boundaries must lie after the warm-up.
    """

    kind: str = "cosine"
    initial_learning_rate: float = 0.01
    steps: tuple[tuple[int, float], ...] = ()
    warmup_steps: int = 0
    warmup_start_lr: float = 0.0
    alpha: float = 0.0

    def lr_at(self, step: int, total_steps: int) -> float:
        """The learning rate at optimizer step ``step`` of a ``total_steps``-step run."""
        step = max(int(step), 0)
        init = float(self.initial_learning_rate)
        if self.kind == "constant":
            return init
        if self.warmup_steps > 0 and step < self.warmup_steps:
            frac = step / self.warmup_steps
            return float(self.warmup_start_lr) + (init - float(self.warmup_start_lr)) * frac
        if self.kind == "manual_step":
            lr = init
            for boundary, rate in self.steps:
                if step >= boundary:
                    lr = float(rate)
                else:
                    break
            return lr
        if self.kind == "cosine":
            decay_steps = max(int(total_steps) - self.warmup_steps, 1)
            p = min(max(step - self.warmup_steps, 0) / decay_steps, 1.0)
            cos = 0.5 * (1.0 + math.cos(math.pi * p))
            return init * ((1.0 - self.alpha) * cos + self.alpha)
        raise ConfigError(f"learning_rate.kind: expected one of {LR_KINDS}, got {self.kind!r}")

    def problems(self, prefix: str = "learning_rate") -> list[str]:
        out: list[str] = []
        p = prefix + "."
        kind_problem = _check_choice(p + "kind", self.kind, LR_KINDS)
        out += [kind_problem] if kind_problem else []
        out += _drop_none([
            _check_num(p + "initial_learning_rate", self.initial_learning_rate, gt=0),
            _check_int(p + "warmup_steps", self.warmup_steps, lo=0),
            _check_num(p + "warmup_start_lr", self.warmup_start_lr, ge=0),
            _check_num(p + "alpha", self.alpha, ge=0, le=1),
        ])
        if self.kind == "constant" and _is_int(self.warmup_steps) and self.warmup_steps > 0:
            out.append(f"{p}warmup_steps: expected 0 for kind 'constant' (use kind "
                       f"'manual_step' with no steps for a warm-up to a constant rate), "
                       f"got {self.warmup_steps}")
        out += self._step_problems(p)
        return out

    def _step_problems(self, p: str) -> list[str]:
        if not isinstance(self.steps, tuple | list):
            return [f"{p}steps: expected a list of [step, learning_rate] pairs, "
                    f"got {_got(self.steps)}"]
        if self.steps and self.kind != "manual_step":
            return [f"{p}steps: expected no steps for kind {self.kind!r} (boundaries are only "
                    f"used by 'manual_step'), got {len(self.steps)}"]
        out: list[str] = []
        prev = None
        for i, pair in enumerate(self.steps):
            name = f"{p}steps[{i}]"
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                out.append(f"{name}: expected a [step, learning_rate] pair, got {_got(pair)}")
                continue
            s, lr = pair
            prob = _check_int(name + ".step", s, lo=1) or _check_num(name + ".learning_rate",
                                                                      lr, gt=0)
            if prob:
                out.append(prob)
                continue
            if prev is not None and s <= prev:
                out.append(f"{name}.step: expected steps strictly increasing (> {prev}), got {s}")
            if (i == 0 and _is_int(self.warmup_steps) and self.warmup_steps > 0
                    and s <= self.warmup_steps):
                out.append(f"{name}.step: expected a boundary after the warm-up "
                           f"(> warmup_steps={self.warmup_steps}), got {s}")
            prev = s
        return out

    def to_dict(self) -> dict:
        return {"kind": self.kind, "initial_learning_rate": self.initial_learning_rate,
                "steps": [[s, lr] for s, lr in self.steps], "warmup_steps": self.warmup_steps,
                "warmup_start_lr": self.warmup_start_lr, "alpha": self.alpha}


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation. ``scale_jitter=(1.0, 1.0)`` and ``color_jitter=0`` disable."""

    horizontal_flip: bool = True
    scale_jitter: tuple[float, float] = (0.8, 1.25)
    color_jitter: float = 0.1

    def problems(self, prefix: str = "augmentation") -> list[str]:
        p = prefix + "."
        out = _drop_none([
            _check_bool(p + "horizontal_flip", self.horizontal_flip),
            # < 1: at 1 the contrast and saturation factors (1 - strength) can reach 0
            _check_num(p + "color_jitter", self.color_jitter, ge=0, lt=1),
        ])
        sj = self.scale_jitter
        if (not isinstance(sj, tuple | list) or len(sj) != 2 or not all(map(_is_num, sj))
                or not 0 < sj[0] <= sj[1]):
            out.append(f"{p}scale_jitter: expected [lo, hi] with 0 < lo <= hi, got {_got(sj)}")
        return out

    def to_dict(self) -> dict:
        return {"horizontal_flip": self.horizontal_flip,
                "scale_jitter": list(self.scale_jitter), "color_jitter": self.color_jitter}


def _drop_none(items) -> list[str]:
    return [i for i in items if i]


@dataclass(frozen=True)
class TrainConfig:
    """Everything the training step needs besides its inputs (records, store)."""

    image_size: int = 384
    keep_aspect_ratio: bool = True
    batch_size: int = 8  # per replica: the global batch is batch_size x replicas (GPUs)
    optimizer: str = "sgd"
    momentum: float = 0.9
    learning_rate: LRSchedule = field(default_factory=LRSchedule)
    clipnorm: float | None = 10.0  # the global norm of all the gradients (None: no clipping)
    weight_decay: float = 0.0
    num_steps: int = 2000
    checkpoint_every_n: int = 200
    log_every_n: int = 20
    augmentation: Augmentation = field(default_factory=Augmentation)
    freeze_backbone: bool = False
    preset: str = DEFAULT_PRESET
    num_classes: int | None = None
    label_map_path: str | None = None
    input_paths: tuple[str, ...] = ()
    seed: int = 0
    mixed_precision: str = "auto"

    # ---------------------------------------------------------------- validation

    def problems(self) -> list[str]:
        """Every problem, one line each (empty when valid)."""
        out = _drop_none([
            _check_bool("keep_aspect_ratio", self.keep_aspect_ratio),
            _check_int("batch_size", self.batch_size, lo=1),
            _check_choice("optimizer", self.optimizer, OPTIMIZERS),
            _check_num("momentum", self.momentum, ge=0, lt=1),
            None if self.clipnorm is None else _check_num("clipnorm", self.clipnorm, gt=0),
            _check_num("weight_decay", self.weight_decay, ge=0),
            _check_int("num_steps", self.num_steps, lo=1),
            _check_int("checkpoint_every_n", self.checkpoint_every_n, lo=1),
            _check_int("log_every_n", self.log_every_n, lo=1),
            _check_bool("freeze_backbone", self.freeze_backbone),
            None if self.num_classes is None else _check_int("num_classes", self.num_classes,
                                                              lo=1),
            _check_int("seed", self.seed, lo=0),
            _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION),
        ])
        size_problem = image_size_problem(self.image_size)
        if size_problem:
            out.insert(0, "image_size: " + size_problem)
        if not isinstance(self.preset, str) or not self.preset.strip():
            out.append("preset: expected a keras-hub preset name, kaggle:// handle, local "
                       f"directory or store prefix, got {_got(self.preset)}")
        if self.label_map_path is not None and not isinstance(self.label_map_path, str):
            out.append("label_map_path: expected a string or null, got "
                       f"{_got(self.label_map_path)}")
        if (not isinstance(self.input_paths, tuple | list)
                or not all(isinstance(s, str) for s in self.input_paths)):
            out.append(f"input_paths: expected a list of strings, got {_got(self.input_paths)}")
        if isinstance(self.learning_rate, LRSchedule):
            out += self.learning_rate.problems()
            ws = self.learning_rate.warmup_steps
            if _is_int(ws) and _is_int(self.num_steps) and ws > 0 and ws >= self.num_steps:
                out.append(f"learning_rate.warmup_steps: expected fewer than "
                           f"num_steps={self.num_steps}, got {ws}")
        else:
            out.append(f"learning_rate: expected an LRSchedule, got {_got(self.learning_rate)}")
        if isinstance(self.augmentation, Augmentation):
            out += self.augmentation.problems()
        else:
            out.append(f"augmentation: expected an Augmentation, got {_got(self.augmentation)}")
        return out

    def validate(self) -> TrainConfig:
        """Returns ``self`` when valid; else raises one :class:`ConfigError` listing them all."""
        problems = self.problems()
        if problems:
            raise ConfigError(_message(problems), problems)
        return self

    # ---------------------------------------------------------------- dict round trip

    def to_dict(self) -> dict:
        """A JSON-able dict (tuples become lists); ``from_dict(to_dict(c)) == c``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, LRSchedule | Augmentation):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def fingerprint_fields(self) -> dict:
        """``to_dict()`` minus the fields that do not change the trained model."""
        d = self.to_dict()
        for name in NON_MODEL_FIELDS:
            d.pop(name, None)
        return d

    @classmethod
    def from_dict(cls, d: dict, *, validate: bool = True) -> TrainConfig:
        """Builds (and by default validates) a config from a plain dict (JSON/YAML).

        Missing keys take their defaults; ``learning_rate`` and ``augmentation`` are nested
        dicts (missing keys inside them take *their* defaults); lists become tuples; ints are
        accepted for float fields (and numeric strings, which YAML 1.1 makes of ``1e-4``).
        Unknown keys and wrong types are reported together with the validation problems.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"training config: expected a mapping, got {_got(d)}")
        problems: list[str] = []
        kwargs = _convert_fields(cls, d, "", problems)
        if "learning_rate" in kwargs:
            kwargs["learning_rate"] = _nested(LRSchedule, kwargs["learning_rate"],
                                              "learning_rate", problems)
        if "augmentation" in kwargs:
            kwargs["augmentation"] = _nested(Augmentation, kwargs["augmentation"],
                                             "augmentation", problems)
        if isinstance(kwargs.get("mixed_precision"), bool):  # YAML 1.1 reads on/off as booleans
            kwargs["mixed_precision"] = "on" if kwargs["mixed_precision"] else "off"
        cfg = cls(**kwargs)
        if validate:
            problems += [p for p in cfg.problems() if p not in problems]
        if problems:
            raise ConfigError(_message(problems), problems)
        return cfg

    def merged(self, overrides: dict) -> TrainConfig:
        """A new config: ``overrides`` (nested dicts merged key by key) on top of this one."""
        return TrainConfig.from_dict(_deep_merge(self.to_dict(), overrides))

    def replace(self, **changes) -> TrainConfig:
        return replace(self, **changes)


_FLOAT_FIELDS = {"momentum", "weight_decay", "clipnorm", "initial_learning_rate",
                 "warmup_start_lr", "alpha", "color_jitter"}


def _convert_fields(cls, d: dict, prefix: str, problems: list[str]) -> dict:
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in d if k not in valid]
    for k in unknown:
        problems.append(f"{prefix}{k}: unknown key{_suggest(str(k), valid)}; valid keys: "
                        f"{', '.join(valid)}")
    out = {}
    for k, v in d.items():
        if k in unknown:
            continue
        if k in _FLOAT_FIELDS:
            v = _to_float(v)
        elif k == "steps" and isinstance(v, list | tuple):
            v = tuple(_to_step(s) for s in v)
        elif k == "scale_jitter" and isinstance(v, list | tuple):
            v = tuple(_to_float(x) for x in v)
        elif k == "input_paths" and isinstance(v, str):
            v = (v,)
        elif isinstance(v, list):
            v = tuple(v)
        out[k] = v
    return out


def _to_float(v: Any) -> Any:
    if _is_int(v):
        return float(v)
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return v
        return f if math.isfinite(f) else v
    return v


def _to_step(s: Any) -> Any:
    if isinstance(s, dict) and set(s) == {"step", "learning_rate"}:
        s = (s["step"], s["learning_rate"])
    if isinstance(s, list | tuple) and len(s) == 2:
        return (s[0], _to_float(s[1]))
    return s


def _nested(kind, value: Any, name: str, problems: list[str]):
    if isinstance(value, kind):
        return value
    if not isinstance(value, dict):
        problems.append(f"{name}: expected a mapping of {', '.join(f.name for f in fields(kind))}"
                        f", got {_got(value)}")
        return kind()
    return kind(**_convert_fields(kind, value, name + ".", problems))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _message(problems: list[str], head: str = "invalid training config") -> str:
    n = len(problems)
    return f"{head} ({n} problem{'s' if n != 1 else ''}):\n" + "\n".join(
        f"  - {p}" for p in problems)


# --------------------------------------------------------------------------------------------


def load_train_config(path: str | Path) -> TrainConfig:
    """Reads and validates a training config file; every error names ``path``.

    ``.yaml``/``.yml`` are read with PyYAML (``safe_load``; an empty file means all defaults),
    ``.config``/``.pbtxt`` as an OD API ``pipeline.config`` (converted; its warnings are
    logged), anything else as JSON.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read training config: {e}") from e
    suffix = p.suffix.lower()
    if suffix in (".config", ".pbtxt"):
        from petdet_tasks.pipeline_config import convert

        conv = convert(text, source=str(p))
        for w in conv.warnings:
            log.warning("%s: %s", p, w)
        return conv.config
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:  # pragma: no cover - PyYAML is a dependency
            raise ConfigError(f"{p}: reading YAML needs PyYAML; use JSON instead") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        data = {} if data is None else data
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON: {e}") from e
    try:
        return TrainConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(_message(e.problems, f"{p}: invalid training config"),
                          e.problems) from e
