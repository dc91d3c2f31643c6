"""OD API ``pipeline.config`` (protobuf text format) → :class:`TrainConfig` plus warnings.

People arrive with the Object Detection API tutorial's ``faster_rcnn_resnet101_pets.config``
(or an SSD / CenterNet one). :func:`convert` carries over what petdet can honour — classes,
input size, batch size, optimizer, learning-rate schedule, clipping, steps, augmentation, the
checkpoint to start from — and says, in one warning per field (or per ignored subtree), what it
did not honour or only approximated. No field is dropped silently: every field of the input is
either mapped (:attr:`Conversion.mapped`) or named, directly or through its parent path, in a
warning (:attr:`Conversion.ignored` lists those paths).

:func:`parse_pbtxt` is a small generic text-format parser (no protobuf schema, no TensorFlow):
a message becomes a dict, a field given more than once (or with ``[a, b]`` list syntax) a list.
Pure Python; imported by the CLI (``python -m petdet_tasks config from-pipeline``).
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from petdet_tasks.train_config import (
    COLOR_JITTER_MAX,
    DEFAULT_PRESET,
    IMAGE_SIZE_RULE,
    IMAGE_SIZE_WHY,
    Augmentation,
    ConfigError,
    LRSchedule,
    TrainConfig,
    nearest_image_size,
)

__all__ = ["Conversion", "PbtxtError", "convert", "main_from_pipeline", "parse_pbtxt"]


class PbtxtError(ConfigError):
    """A text-format syntax error; the message starts with ``source:line:``."""

    def __init__(self, source: str, line: int, message: str):
        super().__init__(f"{source}:{line}: {message}")
        self.source, self.line = source, line


# ============================================================================ text-format parser

_TOKEN_RE = re.compile(r"""
    (?P<nl>\n)
  | (?P<ws>[ \t\r\f\v]+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<number>-?(?:0[xX][0-9a-fA-F]+|(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?[fF]?)
      (?![A-Za-z0-9_.]))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[{}\[\]<>:,;\-/.])
""", re.VERBOSE)

_ESCAPES = {"n": b"\n", "t": b"\t", "r": b"\r", "a": b"\a", "b": b"\b", "f": b"\f",
            "v": b"\v", "\\": b"\\", "'": b"'", '"': b'"', "?": b"?"}
_ESC_RE = re.compile(r"\\(x[0-9a-fA-F]{1,2}|[0-7]{1,3}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)",
                     re.DOTALL)
_CLOSE = {"{": "}", "<": ">"}
_FLOAT_WORDS = {"inf": math.inf, "infinity": math.inf, "nan": math.nan}


@dataclass(frozen=True)
class _Tok:
    kind: str
    value: str
    line: int

    def describe(self) -> str:
        if self.kind == "punct":
            return f"'{self.value}'"
        return f"{self.kind} {self.value!r}" if self.kind != "string" else f"string {self.value}"


def _tokenize(text: str, source: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos, line = 0, 1
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            ch = text[pos]
            if ch in "\"'":
                raise PbtxtError(source, line, "unterminated string (a string must close on "
                                               "the line it opens)")
            raise PbtxtError(source, line, f"unexpected character {ch!r}")
        kind = m.lastgroup
        if kind == "nl":
            line += 1
        elif kind not in ("ws", "comment"):
            toks.append(_Tok(kind, m.group(), line))
        pos = m.end()
    return toks


def _unescape(body: str, source: str, line: int) -> str:
    out = bytearray()
    pos = 0
    for m in _ESC_RE.finditer(body):
        out += body[pos:m.start()].encode("utf-8")
        e = m.group(1)
        if e[0] == "x":
            out.append(int(e[1:], 16))
        elif e[0] in "01234567":
            out.append(int(e, 8) & 0xFF)
        elif e[0] in "uU":
            out += chr(int(e[1:], 16)).encode("utf-8", "surrogatepass")
        elif e in _ESCAPES:
            out += _ESCAPES[e]
        else:
            raise PbtxtError(source, line, f"unknown escape sequence '\\{e}' in string")
        pos = m.end()
    out += body[pos:].encode("utf-8")
    return out.decode("utf-8", "backslashreplace")


def _number(tok: _Tok, source: str) -> int | float:
    s = tok.value
    try:
        if re.fullmatch(r"-?0[xX][0-9a-fA-F]+", s):
            return int(s, 16)
        if s[-1] in "fF" or any(c in s for c in ".eE"):
            return float(s.rstrip("fF"))
        return int(s, 10)
    except ValueError as e:  # pragma: no cover - the token regex only lets numbers through
        raise PbtxtError(source, tok.line, f"bad number {s!r}") from e


class _Parser:
    def __init__(self, toks: list[_Tok], source: str):
        self.toks, self.i, self.source = toks, 0, source

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> _Tok | None:
        t = self.peek()
        self.i += t is not None
        return t

    def error(self, tok: _Tok | None, msg: str) -> PbtxtError:
        line = tok.line if tok else (self.toks[-1].line if self.toks else 1)
        return PbtxtError(self.source, line, msg)

    def is_punct(self, tok: _Tok | None, chars: str) -> bool:
        return tok is not None and tok.kind == "punct" and tok.value in chars

    def body(self, close: str | None, name: str = "", line: int = 0) -> dict:
        msg: dict[str, Any] = {}
        while True:
            t = self.peek()
            if t is None:
                if close:
                    raise self.error(t, f"expected '{close}' to close {name!r} opened on line "
                                        f"{line}, got end of input (unbalanced braces)")
                return msg
            if self.is_punct(t, "}>"):
                self.take()
                if t.value == close:
                    return msg
                where = (f"expected '{close}' to close {name!r} opened on line {line}" if close
                         else "nothing is open at this point")
                raise self.error(t, f"unexpected '{t.value}' ({where}; unbalanced braces)")
            if self.is_punct(t, "["):
                raise self.error(t, "extension and Any fields ('[name] { ... }') are not "
                                    "supported by petdet's pipeline.config reader")
            if t.kind != "ident":
                raise self.error(t, f"expected a field name, got {t.describe()}")
            self.take()
            fname = t.value
            colon = self.is_punct(self.peek(), ":")
            if colon:
                self.take()
            v = self.peek()
            if self.is_punct(v, "{<"):
                self.take()
                value: Any = self.body(_CLOSE[v.value], fname, v.line)
                _add(msg, fname, value, False)
            elif colon and self.is_punct(v, "["):
                self.take()
                _add(msg, fname, self.list_value(fname, v.line), True)
            elif colon:
                _add(msg, fname, self.scalar(fname, t), False)
            else:
                got = v.describe() if v else "end of input"
                raise self.error(v or t, f"expected ':' or '{{' after field name {fname!r}, "
                                         f"got {got}")
            if self.is_punct(self.peek(), ",;"):
                self.take()

    def list_value(self, name: str, line: int) -> list:
        out: list = []
        if self.is_punct(self.peek(), "]"):
            self.take()
            return out
        while True:
            t = self.peek()
            if self.is_punct(t, "{<"):
                self.take()
                out.append(self.body(_CLOSE[t.value], name, t.line))
            else:
                out.append(self.scalar(name, t))
            t = self.take()
            if self.is_punct(t, "]"):
                return out
            if not self.is_punct(t, ","):
                got = t.describe() if t else "end of input"
                raise self.error(t, f"expected ',' or ']' in the list {name!r} opened on line "
                                    f"{line}, got {got}")

    def scalar(self, name: str, after: _Tok | None) -> Any:
        t = self.take()
        if t is None or (t.kind == "punct" and t.value != "-"):
            got = t.describe() if t else "end of input"
            raise self.error(t or after, f"expected a value after '{name}:', got {got}")
        if t.kind == "string":
            parts = [_unescape(t.value[1:-1], self.source, t.line)]
            while (n := self.peek()) is not None and n.kind == "string":
                self.take()
                parts.append(_unescape(n.value[1:-1], self.source, n.line))
            return "".join(parts)
        if t.kind == "number":
            return _number(t, self.source)
        if t.kind == "punct":  # '-' before inf / nan
            n = self.take()
            if n is not None and n.kind == "ident" and n.value.lower() in _FLOAT_WORDS:
                return -_FLOAT_WORDS[n.value.lower()]
            got = n.describe() if n else "end of input"
            raise self.error(n or t, f"expected a number after '-' in '{name}:', got {got}")
        word = t.value
        if word in ("true", "True", "t"):
            return True
        if word in ("false", "False", "f"):
            return False
        if word.lower() in _FLOAT_WORDS:
            return _FLOAT_WORDS[word.lower()]
        return word  # an enum value


def _add(msg: dict, name: str, value: Any, is_list: bool) -> None:
    """Repeated occurrences of a field collect into one list."""
    if name not in msg:
        msg[name] = value
        return
    prev = msg[name]
    prev = prev if isinstance(prev, list) else [prev]
    msg[name] = prev + (value if is_list else [value])


def parse_pbtxt(text: str, source: str = "<string>") -> dict:
    """Parses protobuf text format into nested dicts (messages) and lists (repeated fields).

    Scalars become ``int``, ``float``, ``bool`` or ``str`` (quoted strings and bare enum
    identifiers alike). A field that occurs once is its value; one that occurs several times
    (or uses ``[a, b]`` list syntax) a list — use :func:`many` to read "one or many".
    Syntax errors raise :class:`PbtxtError` naming ``source`` and the line.
    """
    return _Parser(_tokenize(text, source), source).body(None)


def many(node: dict | None, key: str) -> list:
    """The values of a possibly repeated field as a list (empty when absent)."""
    if not isinstance(node, dict) or key not in node:
        return []
    v = node[key]
    return v if isinstance(v, list) else [v]


# ================================================================================= conversion


@dataclass
class Conversion:
    config: TrainConfig
    warnings: list[str]
    source: dict
    mapped: list[str] = field(default_factory=list)   # field paths carried into the config
    ignored: list[str] = field(default_factory=list)  # field paths named in a warning instead


# OD API proto defaults (object_detection/protos/*.proto) for fields a config may leave out.
_OD_DEFAULT_LR = 0.002
_OD_DEFAULTS = {
    "keep_aspect_ratio_resizer": {"min_dimension": 600, "max_dimension": 1024},
    "fixed_shape_resizer": {"height": 300, "width": 300},
    "cosine_decay_learning_rate": {"learning_rate_base": 0.002, "total_steps": 4000000,
                                   "warmup_learning_rate": 0.0002, "warmup_steps": 10000,
                                   "hold_base_rate_steps": 0},
    "exponential_decay_learning_rate": {"initial_learning_rate": 0.002,
                                        "decay_steps": 4000000, "decay_factor": 0.95,
                                        "staircase": True, "burnin_learning_rate": 0.0,
                                        "burnin_steps": 0, "min_learning_rate": 0.0},
    "random_image_scale": {"min_scale_ratio": 0.5, "max_scale_ratio": 2.0},
}
_COLOR_OPTIONS = ("random_adjust_brightness", "random_adjust_contrast", "random_adjust_hue",
                  "random_adjust_saturation", "random_distort_color")
_CHECKPOINT_NOTES = ("fine_tune_checkpoint_type", "from_detection_checkpoint",
                     "load_all_detection_checkpoint_vars", "fine_tune_checkpoint_version")
_MAX_STEP_BOUNDARIES = 100
_PRESET_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_]*")
_TF_CKPT_RE = re.compile(r"(^|[/\\])[^/\\]*ckpt[^/\\]*$|\.index$|\.data-\d+-of-\d+$|"
                         r"PATH_TO_BE_CONFIGURED|\.pb$|saved_model")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".") or path.startswith(prefix + "[")


def _round_size(x: float) -> int:
    """The nearest size training accepts (:func:`~petdet_tasks.train_config.nearest_image_size`:
    64 or a multiple of 128, for keras-hub's anchor grid)."""
    return nearest_image_size(x)


_ROUNDED = f"the nearest {IMAGE_SIZE_RULE}: {IMAGE_SIZE_WHY}"


class _Converter:
    def __init__(self, tree: dict, source: str):
        self.tree, self.source = tree, source
        self.kw: dict[str, Any] = {}
        self.warnings: list[str] = []
        self.mapped: list[str] = []
        self.ignored: list[str] = []
        self.errors: list[str] = []

    # ---------------------------------------------------------------- bookkeeping

    def warn(self, msg: str, *ignored: str) -> None:
        self.warnings.append(msg)
        self.ignored.extend(ignored)

    def map(self, *paths: str) -> None:
        self.mapped.extend(paths)

    def covered(self, path: str) -> bool:
        return any(_under(path, p) for p in self.mapped + self.ignored)

    def covered_below(self, path: str) -> bool:
        return any(p.startswith(path + ".") or p.startswith(path + "[")
                   for p in self.mapped + self.ignored)

    # ---------------------------------------------------------------- typed access

    def one(self, node: dict | None, key: str, path: str) -> Any:
        """A singular field's value (None when absent); the last one if given repeatedly."""
        if not isinstance(node, dict) or key not in node:
            return None
        v = node[key]
        if isinstance(v, list):
            if not v:
                return None
            self.warn(f"{path}: given {len(v)} times; the last one is used")
            v = v[-1]
        return v

    def msg(self, node: dict | None, key: str, path: str) -> dict | None:
        v = self.one(node, key, path)
        if v is None or isinstance(v, dict):
            return v
        self.errors.append(f"{path}: expected a message ({{ ... }}), got {_fmt(v)}")
        return None

    def int_(self, node, key, path, default=None) -> int | None:
        v = self.one(node, key, path)
        if v is None:
            return default
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        self.errors.append(f"{path}: expected an integer, got {_fmt(v)}")
        return default

    def float_(self, node, key, path, default=None) -> float | None:
        v = self.one(node, key, path)
        if v is None:
            return default
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
        self.errors.append(f"{path}: expected a number, got {_fmt(v)}")
        return default

    def bool_(self, node, key, path, default=None) -> bool | None:
        v = self.one(node, key, path)
        if v is None:
            return default
        if isinstance(v, bool):
            return v
        if v in (0, 1):
            return bool(v)
        self.errors.append(f"{path}: expected true or false, got {_fmt(v)}")
        return default

    def str_(self, node, key, path, default=None) -> str | None:
        v = self.one(node, key, path)
        if v is None:
            return default
        if isinstance(v, str):
            return v
        self.errors.append(f"{path}: expected a string, got {_fmt(v)}")
        return default

    # ---------------------------------------------------------------- model

    def model(self) -> None:
        model = self.msg(self.tree, "model", "model")
        if not model:
            return
        archs = list(model)
        arch = archs[0]
        for other in archs[1:]:
            self.warn(f"model.{other}: a second model architecture (model is a oneof); only "
                      f"model.{arch} is read", f"model.{other}")
        ap = f"model.{arch}"
        node = self.msg(model, arch, ap)
        if node is None:
            return
        n = self.int_(node, "num_classes", f"{ap}.num_classes")
        if n is not None:
            self.kw["num_classes"] = n
            self.map(f"{ap}.num_classes")
        resizer = self.msg(node, "image_resizer", f"{ap}.image_resizer")
        if resizer is not None:
            self.image_resizer(resizer, f"{ap}.image_resizer")
        fe = self.msg(node, "feature_extractor", f"{ap}.feature_extractor")
        if fe is not None:
            fp = f"{ap}.feature_extractor"
            fe_type = fe.get("type")
            rest = [k for k in fe if k != "type"]
            also = f" (also ignored: {', '.join(rest)})" if rest else ""
            head = f"{fp}.type={_fmt(fe_type)}" if "type" in fe else fp
            self.warn(f"{head}: petdet trains a keras-hub RetinaNet; the {arch} architecture "
                      f"and its feature extractor are not carried over{also}", fp)
        rest = [k for k in node if k not in ("num_classes", "image_resizer",
                                             "feature_extractor")]
        if rest:
            self.warn(f"{ap}: petdet trains a keras-hub RetinaNet with its own anchors, heads, "
                      f"losses and post-processing; these {arch} fields are not carried over: "
                      f"{', '.join(rest)}", *(f"{ap}.{k}" for k in rest))
        elif fe is None:
            self.warn(f"{ap}: petdet trains a keras-hub RetinaNet; the {arch} architecture is "
                      f"not carried over", ap)

    def image_resizer(self, r: dict, rp: str) -> None:
        kinds = list(r)
        for other in kinds[1:]:
            self.warn(f"{rp}.{other}: a second resizer (image_resizer is a oneof); only "
                      f"{rp}.{kinds[0]} is read", f"{rp}.{other}")
        if not kinds:
            return
        kind = kinds[0]
        kp = f"{rp}.{kind}"
        node = self.msg(r, kind, kp) or {}
        if kind == "keep_aspect_ratio_resizer":
            d = _OD_DEFAULTS[kind]
            mind = self.int_(node, "min_dimension", f"{kp}.min_dimension", d["min_dimension"])
            maxd = self.int_(node, "max_dimension", f"{kp}.max_dimension", d["max_dimension"])
            size = _round_size(maxd)
            self.kw.update(keep_aspect_ratio=True, image_size=size)
            self.map(kp if not node else f"{kp}.max_dimension")
            if "max_dimension" not in node:
                self.warn(f"{kp}.max_dimension: not set; the OD API default {maxd} is used")
            elif size != maxd:
                self.warn(f"{kp}.max_dimension={maxd}: rounded to image_size={size} "
                          f"({_ROUNDED})")
            if "min_dimension" in node:
                self.warn(f"{kp}.min_dimension={mind}: not used; petdet resizes the longest side "
                          f"to image_size={size} and letterboxes (pads) the image to a square "
                          f"{size}x{size} input (the OD API scales the shorter side to {mind} "
                          f"unless the longer one would exceed {maxd})", f"{kp}.min_dimension")
            pad = self.bool_(node, "pad_to_max_dimension", f"{kp}.pad_to_max_dimension")
            if pad is True:
                self.map(f"{kp}.pad_to_max_dimension")
            elif pad is False:
                self.warn(f"{kp}.pad_to_max_dimension=false: petdet always pads to a square "
                          f"{size}x{size} input", f"{kp}.pad_to_max_dimension")
        elif kind == "fixed_shape_resizer":
            d = _OD_DEFAULTS[kind]
            h = self.int_(node, "height", f"{kp}.height", d["height"])
            w = self.int_(node, "width", f"{kp}.width", d["width"])
            size = _round_size(max(h, w))
            self.kw.update(keep_aspect_ratio=False, image_size=size)
            self.map(kp if not node else f"{kp}.height", f"{kp}.width")
            if h != w:
                rounded = (f" (the larger side {max(h, w)} rounded to {_ROUNDED})"
                           if size != max(h, w) else "")
                self.warn(f"{kp}: height={h} width={w} is not square; petdet stretches images to "
                          f"a square {size}x{size} input{rounded}")
            elif size != h:
                self.warn(f"{kp}: height={h} width={w} rounded to image_size={size} "
                          f"({_ROUNDED})")
        else:
            self.warn(f"{kp}: not supported; petdet resizes the longest side to image_size="
                      f"{TrainConfig.image_size} and letterboxes to a square input", kp)

    # ---------------------------------------------------------------- train_config

    def train_config(self) -> None:
        tp = "train_config"
        tc = self.msg(self.tree, "train_config", tp)
        if tc is None:
            self.warn("train_config: missing; petdet's defaults are used")
            return
        bs = self.int_(tc, "batch_size", f"{tp}.batch_size")
        if bs is not None:
            self.kw["batch_size"] = bs
            self.map(f"{tp}.batch_size")
            if bs > 1:
                # the same number means another batch on several GPUs: say which
                self.warn(f"{tp}.batch_size={bs} is the OD API's global batch (split across "
                          f"the GPUs); petdet's batch_size is per replica (global batch = "
                          f"batch_size x GPUs): batch_size={bs} is the same batch on one GPU; "
                          f"on N GPUs set batch_size to {bs}/N")

        n = self.int_(tc, "num_steps", f"{tp}.num_steps")
        if n is None or n <= 0:
            why = " not set" if n is None else f"={n}"
            self.warn(f"{tp}.num_steps{why}: the OD API would train indefinitely; petdet trains "
                      f"for num_steps={TrainConfig.num_steps}",
                      *([f"{tp}.num_steps"] if n is not None else []))
            n = TrainConfig.num_steps
        else:
            self.kw["num_steps"] = n
            self.map(f"{tp}.num_steps")
        self.num_steps = n

        opt = self.msg(tc, "optimizer", f"{tp}.optimizer")
        if opt is not None:
            self.optimizer(opt, f"{tp}.optimizer")

        clip = self.float_(tc, "gradient_clipping_by_norm", f"{tp}.gradient_clipping_by_norm")
        # both clip the global norm of all the gradients together (tf.clip_by_global_norm)
        self.kw["clipnorm"] = clip if clip and clip > 0 else None  # 0 / absent: no clipping
        if "gradient_clipping_by_norm" in tc:
            self.map(f"{tp}.gradient_clipping_by_norm")

        self.checkpoint(tc, tp)
        self.augmentation(tc, tp)

    def optimizer(self, o: dict, op: str) -> None:
        kinds = [k for k in o if k not in ("use_moving_average", "moving_average_decay")]
        for other in kinds[1:]:
            self.warn(f"{op}.{other}: a second optimizer (optimizer is a oneof); only "
                      f"{op}.{kinds[0]} is read", f"{op}.{other}")
        if kinds:
            kind = kinds[0]
            kp = f"{op}.{kind}"
            node = self.msg(o, kind, kp) or {}
            if kind in ("momentum_optimizer", "rms_prop_optimizer"):
                m = self.float_(node, "momentum_optimizer_value",
                                f"{kp}.momentum_optimizer_value", 0.9)
                self.kw.update(optimizer="sgd", momentum=m)
                if "momentum_optimizer_value" in node:
                    self.map(f"{kp}.momentum_optimizer_value")
                if kind == "rms_prop_optimizer":
                    extra = [k for k in node if k not in ("learning_rate",
                                                          "momentum_optimizer_value")]
                    also = f" ({', '.join(extra)} ignored)" if extra else ""
                    self.warn(f"{kp}: RMSProp is not supported; falling back to SGD with "
                              f"momentum {m:g} and the same learning-rate schedule — the "
                              f"effective step size differs, re-tune the learning rate{also}",
                              kp)
            elif kind == "adam_optimizer":
                self.kw["optimizer"] = "adam"
                if "epsilon" in node:
                    self.warn(f"{kp}.epsilon={_fmt(node['epsilon'])}: ignored; petdet uses "
                              f"Keras' Adam epsilon (1e-7)", f"{kp}.epsilon")
            else:
                self.warn(f"{kp}: not supported; petdet uses its default optimizer "
                          f"({TrainConfig.optimizer}, momentum {TrainConfig.momentum:g}) and "
                          f"learning-rate schedule", kp)
                node = {}
            if kind in ("momentum_optimizer", "rms_prop_optimizer", "adam_optimizer"):
                if not node:
                    self.map(kp)
                lr = self.msg(node, "learning_rate", f"{kp}.learning_rate")
                if lr is not None:
                    self.learning_rate(lr, f"{kp}.learning_rate")
        uma = self.bool_(o, "use_moving_average", f"{op}.use_moving_average")
        if uma is True:
            self.warn(f"{op}.use_moving_average=true: not supported; petdet trains and exports "
                      f"the raw weights (no exponential moving average)",
                      f"{op}.use_moving_average")
        elif uma is False:
            self.map(f"{op}.use_moving_average")
        if "moving_average_decay" in o:
            self.warn(f"{op}.moving_average_decay={_fmt(o['moving_average_decay'])}: ignored "
                      f"(petdet keeps no moving average of the weights)",
                      f"{op}.moving_average_decay")

    def learning_rate(self, lr: dict, lp: str) -> None:
        kinds = list(lr)
        for other in kinds[1:]:
            self.warn(f"{lp}.{other}: a second schedule (learning_rate is a oneof); only "
                      f"{lp}.{kinds[0]} is read", f"{lp}.{other}")
        if not kinds:
            return
        kind = kinds[0]
        kp = f"{lp}.{kind}"
        node = self.msg(lr, kind, kp) or {}
        sched: LRSchedule | None = None
        if kind == "constant_learning_rate":
            v = self.float_(node, "learning_rate", f"{kp}.learning_rate", _OD_DEFAULT_LR)
            sched = LRSchedule(kind="constant", initial_learning_rate=v)
            self.map(kp)
        elif kind == "manual_step_learning_rate":
            sched = self.manual_step(node, kp)
        elif kind == "cosine_decay_learning_rate":
            sched = self.cosine(node, kp)
        elif kind == "exponential_decay_learning_rate":
            sched = self.exponential(node, kp)
        else:
            self.warn(f"{kp}: not supported; petdet's default schedule is used "
                      f"({TrainConfig().learning_rate.kind}, initial "
                      f"{TrainConfig().learning_rate.initial_learning_rate:g})", kp)
        if sched is not None:
            self.kw["learning_rate"] = sched

    def manual_step(self, node: dict, kp: str) -> LRSchedule:
        init = self.float_(node, "initial_learning_rate", f"{kp}.initial_learning_rate",
                           _OD_DEFAULT_LR)
        steps = []
        for i, s in enumerate(many(node, "schedule")):
            sp = f"{kp}.schedule[{i}]" if isinstance(node["schedule"], list) else f"{kp}.schedule"
            if not isinstance(s, dict):
                self.errors.append(f"{sp}: expected a message {{ step learning_rate }}, "
                                   f"got {_fmt(s)}")
                continue
            st = self.int_(s, "step", f"{sp}.step", 0)
            r = self.float_(s, "learning_rate", f"{sp}.learning_rate", _OD_DEFAULT_LR)
            steps.append((st, r))
            extra = [k for k in s if k not in ("step", "learning_rate")]
            for k in extra:
                self.warn(f"{sp}.{k}: unknown schedule field; ignored", f"{sp}.{k}")
        self.map(*([f"{kp}.{k}" for k in ("initial_learning_rate", "schedule", "warmup")
                    if k in node] or [kp]))
        warmup = self.bool_(node, "warmup", f"{kp}.warmup", False)
        if warmup and steps:
            # OD API: linear from initial_learning_rate (step 0) to schedule[0] at its step.
            ws, first = steps[0]
            ws = self.clamp_warmup(ws, f"{kp}.schedule[0].step")
            return LRSchedule(kind="manual_step", initial_learning_rate=first,
                              steps=tuple(steps[1:]), warmup_steps=ws, warmup_start_lr=init)
        return LRSchedule(kind="manual_step", initial_learning_rate=init, steps=tuple(steps))

    def cosine(self, node: dict, kp: str) -> LRSchedule:
        d = _OD_DEFAULTS["cosine_decay_learning_rate"]
        base = self.float_(node, "learning_rate_base", f"{kp}.learning_rate_base",
                           d["learning_rate_base"])
        total = self.int_(node, "total_steps", f"{kp}.total_steps", d["total_steps"])
        wlr = self.float_(node, "warmup_learning_rate", f"{kp}.warmup_learning_rate",
                          d["warmup_learning_rate"])
        ws = self.int_(node, "warmup_steps", f"{kp}.warmup_steps", d["warmup_steps"])
        hold = self.int_(node, "hold_base_rate_steps", f"{kp}.hold_base_rate_steps",
                         d["hold_base_rate_steps"])
        self.map(*([f"{kp}.{k}" for k in ("learning_rate_base", "warmup_learning_rate",
                                          "warmup_steps") if k in node] or [kp]))
        n = self.num_steps
        if total != n:
            self.warn(f"{kp}.total_steps={total}: petdet's cosine decays to 0 at num_steps={n}; "
                      f"the OD API schedule's length is not kept",
                      *([f"{kp}.total_steps"] if "total_steps" in node else []))
        elif "total_steps" in node:
            self.map(f"{kp}.total_steps")
        if hold:
            self.warn(f"{kp}.hold_base_rate_steps={hold}: not supported; the cosine decay starts "
                      f"right after the warm-up", f"{kp}.hold_base_rate_steps")
        elif "hold_base_rate_steps" in node:
            self.map(f"{kp}.hold_base_rate_steps")
        if "warmup_steps" not in node and ws:
            self.warn(f"{kp}.warmup_steps: not set; the OD API default {ws} is used")
        ws = self.clamp_warmup(ws, f"{kp}.warmup_steps")
        return LRSchedule(kind="cosine", initial_learning_rate=base, warmup_steps=ws,
                          warmup_start_lr=wlr if ws else 0.0)

    def exponential(self, node: dict, kp: str) -> LRSchedule:
        d = _OD_DEFAULTS["exponential_decay_learning_rate"]
        g = {k: (self.float_ if isinstance(v, float) else
                 self.bool_ if isinstance(v, bool) else self.int_)(node, k, f"{kp}.{k}", v)
             for k, v in d.items()}
        n = self.num_steps
        init, every = g["initial_learning_rate"], max(g["decay_steps"], 1)
        count = (n - 1) // every
        stride = max(1, math.ceil(count / _MAX_STEP_BOUNDARIES))
        steps = tuple((k * every, max(init * g["decay_factor"] ** k, g["min_learning_rate"]))
                      for k in range(stride, count + 1, stride))
        self.map(kp)
        notes = []
        if not g["staircase"]:
            notes.append("staircase=false is approximated by a step per decay_steps")
        if stride > 1:
            notes.append(f"one step every {stride * every} steps instead of every {every}")
        if g["burnin_steps"] and g["burnin_learning_rate"]:
            notes.append(f"the burn-in ({g['burnin_steps']} steps at "
                         f"{g['burnin_learning_rate']:g}) is not supported")
        if notes:
            self.warn(f"{kp}: converted to a manual_step schedule; " + "; ".join(notes))
        return LRSchedule(kind="manual_step", initial_learning_rate=init, steps=steps)

    def clamp_warmup(self, ws: int, path: str) -> int:
        if ws >= self.num_steps:
            new = max(self.num_steps - 1, 0)
            self.warn(f"{path}={ws}: the warm-up would outlast num_steps={self.num_steps}; "
                      f"shortened to {new} steps")
            return new
        return ws

    def checkpoint(self, tc: dict, tp: str) -> None:
        fp = f"{tp}.fine_tune_checkpoint"
        ckpt = self.str_(tc, "fine_tune_checkpoint", fp)
        if not ckpt:
            self.warn(f"{fp}: not set (the OD API would train from scratch); petdet starts from "
                      f"the keras-hub preset {DEFAULT_PRESET!r}",
                      *([fp] if "fine_tune_checkpoint" in tc else []))
        elif _TF_CKPT_RE.search(ckpt):
            self.warn(f"{fp}={ckpt!r}: a TF Object Detection API checkpoint cannot be loaded into "
                      f"a keras-hub RetinaNet; petdet starts from the keras-hub preset "
                      f"{DEFAULT_PRESET!r} instead (set 'preset' to a keras-hub preset name, "
                      f"kaggle:// handle, preset directory or store prefix)", fp)
        else:
            self.kw["preset"] = ckpt
            self.map(fp)
            if not (_PRESET_NAME_RE.fullmatch(ckpt) or ckpt.startswith(("kaggle://", "hf://"))):
                self.warn(f"{fp}={ckpt!r}: used as the keras-hub preset (a preset directory or "
                          f"store prefix); a TF Object Detection API checkpoint there would not "
                          f"load")
        notes = [k for k in _CHECKPOINT_NOTES if k in tc]
        if notes:
            self.warn(", ".join(f"{tp}.{k}={_fmt(tc[k])}" for k in notes) + ": noted; petdet "
                      "always restores the preset's backbone, FPN and box head and trains a new "
                      "class head", *(f"{tp}.{k}" for k in notes))

    def augmentation(self, tc: dict, tp: str) -> None:
        flip, scale, colors = False, (1.0, 1.0), []
        opts = many(tc, "data_augmentation_options")
        is_list = isinstance(tc.get("data_augmentation_options"), list)
        for i, el in enumerate(opts):
            ep = f"{tp}.data_augmentation_options" + (f"[{i}]" if is_list else "")
            if not isinstance(el, dict):
                self.errors.append(f"{ep}: expected a message, got {_fmt(el)}")
                continue
            for kind, node in el.items():
                kp = f"{ep}.{kind}"
                node = node if isinstance(node, dict) else {}
                if kind == "random_horizontal_flip":
                    flip = True
                    self.map(kp if not node else f"{kp}.probability")
                    p = self.float_(node, "probability", f"{kp}.probability", 0.5)
                    if p != 0.5:
                        self.warn(f"{kp}.probability={p:g}: petdet flips with probability 0.5")
                elif kind == "random_image_scale":
                    d = _OD_DEFAULTS[kind]
                    lo = self.float_(node, "min_scale_ratio", f"{kp}.min_scale_ratio",
                                     d["min_scale_ratio"])
                    hi = self.float_(node, "max_scale_ratio", f"{kp}.max_scale_ratio",
                                     d["max_scale_ratio"])
                    scale = (lo, hi)
                    self.map(kp)
                elif kind in _COLOR_OPTIONS:
                    s = self.color_strength(kind, node, kp)
                    colors.append(s)
                    capped = (f"; {s:g} capped to {COLOR_JITTER_MAX:g}: color_jitter must be "
                              f"below 1 (at 1 the contrast and saturation factors 1 - strength "
                              f"reach 0)" if s > COLOR_JITTER_MAX else "")
                    self.warn(f"{kp}: approximated by petdet's single color_jitter strength "
                              f"{min(s, COLOR_JITTER_MAX):g} (one strength for brightness, "
                              f"contrast, saturation and hue){capped}", kp)
                else:
                    self.warn(f"{kp}: not supported by petdet's augmentation (horizontal flip, "
                              f"scale jitter, color jitter); ignored", kp)
        self.kw["augmentation"] = Augmentation(
            horizontal_flip=flip, scale_jitter=scale,
            color_jitter=min(max(colors), COLOR_JITTER_MAX) if colors else 0.0)

    def color_strength(self, kind: str, node: dict, kp: str) -> float:
        if kind == "random_adjust_brightness":
            return self.float_(node, "max_delta", f"{kp}.max_delta", 0.2)
        if kind == "random_adjust_hue":
            return self.float_(node, "max_delta", f"{kp}.max_delta", 0.02)
        if kind in ("random_adjust_contrast", "random_adjust_saturation"):
            lo = self.float_(node, "min_delta", f"{kp}.min_delta", 0.8)
            hi = self.float_(node, "max_delta", f"{kp}.max_delta", 1.25)
            return max(1.0 - lo, hi - 1.0, 0.0)
        return 0.2  # random_distort_color: a mix of all four

    # ---------------------------------------------------------------- input readers, eval

    def inputs(self) -> None:
        rp = "train_input_reader"
        r = self.msg(self.tree, rp, rp)
        if r is not None:
            named = []
            tf_rec = self.msg(r, "tf_record_input_reader", f"{rp}.tf_record_input_reader")
            if tf_rec is not None and "input_path" in tf_rec:
                ip = f"{rp}.tf_record_input_reader.input_path"
                paths = many(tf_rec, "input_path")
                bad = [p for p in paths if not isinstance(p, str)]
                if bad:
                    self.errors.append(f"{ip}: expected strings, got {_fmt(bad[0])}")
                self.kw["input_paths"] = tuple(p for p in paths if isinstance(p, str))
                self.map(ip)
                named.append(ip)
            lm = self.str_(r, "label_map_path", f"{rp}.label_map_path")
            if lm is not None:
                self.kw["label_map_path"] = lm
                self.map(f"{rp}.label_map_path")
                named.append(f"{rp}.label_map_path")
            if named:
                self.warn(f"{', '.join(named)}: kept for information only (input_paths, "
                          f"label_map_path); petdet trains on the shards and label map of its "
                          f"tfrecords step")
        for key, why in (("eval_config", "petdet's evaluate step has its own settings (COCO "
                                         "mAP on the validation split)"),
                         ("eval_input_reader", "petdet evaluates on the validation split of "
                                               "its own TFRecords")):
            if key in self.tree:
                v = self.tree[key]
                names = sorted({k for x in (v if isinstance(v, list) else [v])
                                if isinstance(x, dict) for k in x})
                listed = f": {', '.join(names)}" if names else ""
                self.warn(f"{key}: ignored — {why}{listed}", key)

    # ---------------------------------------------------------------- the rest

    def sweep(self, node: Any, path: str) -> None:
        """Names every field nobody mapped or warned about (no silent drops)."""
        if path and self.covered(path):
            return
        if not path or (self.covered_below(path) and isinstance(node, dict | list)):
            if isinstance(node, dict):
                for k, v in node.items():
                    self.sweep(v, _join(path, k))
                return
            if isinstance(node, list) and any(isinstance(x, dict) for x in node):
                for i, v in enumerate(node):
                    self.sweep(v, f"{path}[{i}]")
                return
        shown = f"={_fmt(node)}" if not isinstance(node, dict | list) else ""
        self.warn(f"{path}{shown}: not used by petdet; ignored", path)

    def run(self) -> Conversion:
        self.num_steps = TrainConfig.num_steps
        self.model()
        self.train_config()
        self.inputs()
        self.sweep(self.tree, "")
        if self.errors:
            raise ConfigError(_problems_message(self.source, "cannot convert pipeline config",
                                                self.errors), self.errors)
        cfg = TrainConfig(**self.kw)
        problems = cfg.problems()
        if problems:
            raise ConfigError(_problems_message(self.source, "the converted training config is "
                                                "invalid", problems), problems)
        return Conversion(cfg, self.warnings, self.tree, self.mapped, self.ignored)


def _problems_message(source: str, head: str, problems: list[str]) -> str:
    return f"{source}: {head}:\n" + "\n".join(f"  - {p}" for p in problems)


def convert(text: str, source: str = "<string>") -> Conversion:
    """Converts an OD API ``pipeline.config`` text into a validated :class:`TrainConfig`."""
    return _Converter(parse_pbtxt(text, source), source).run()


def main_from_pipeline(path: str, out: str | None) -> int:
    """``python -m petdet_tasks config from-pipeline FILE [--out OUT.json]``.

    Writes the petdet config JSON to ``out`` (stdout when None), each warning to stderr as
    ``warning: ...``; returns 0, or 2 after an ``error: ...`` line for a bad file.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        print(f"error: cannot read pipeline config {path}: {why}", file=sys.stderr)
        return 2
    try:
        conv = convert(text, source=str(path))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in conv.warnings:
        print(f"warning: {w}", file=sys.stderr)
    doc = json.dumps(conv.config.to_dict(), indent=2) + "\n"
    if out is None:
        sys.stdout.write(doc)
        return 0
    try:
        Path(out).write_text(doc, encoding="utf-8")
    except OSError as e:
        print(f"error: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(conv.warnings)} warnings)", file=sys.stderr)
    return 0
