"""Read and write TensorFlow Object Detection API label maps (``StringIntLabelMap`` text).

The format, as in ``label_maps/pet_label_map.pbtxt``::

    item {
      id: 1
      name: 'Abyssinian'
    }

Accepted on input: ``#`` comments (whole-line and trailing), single or double quotes, escapes
inside strings (``\\'``, ``\\"``, ``\\\\``, ``\\n``, ``\\t``, octal ``\\303\\251`` and ``\\xHH``
UTF-8 bytes as protobuf writes them, ``\\uXXXX``), several fields or items on one line, blank
lines, CRLF line endings, an optional ``:`` between ``item`` and ``{``, fields in any order and an
optional ``display_name``. Anything else (other fields, ``;``/``,`` separators, unquoted names,
non-decimal ids) is refused with a :class:`LabelMapError` naming the source, the line, what was
expected and what came.

A small hand-written tokenizer does the parsing: no protobuf or TensorFlow import.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from petdet_tasks.breeds import BREEDS
from petdet_tasks.errors import PermanentError

__all__ = [
    "LabelMap",
    "LabelMapError",
    "LabelMapItem",
    "load_label_map",
    "parse_label_map",
    "pets_label_map",
]

_INT32_MAX = 2**31 - 1
_FIELDS = ("id", "name", "display_name")


@dataclass(frozen=True)
class LabelMapItem:
    """One class: its integer id (>= 1; 0 is the OD API's background) and its name."""

    id: int
    name: str
    display_name: str | None = None


class LabelMapError(PermanentError, ValueError):
    """A label map that cannot be read or is not valid.

    ``str()`` reads ``SOURCE, line N: MESSAGE`` (``SOURCE`` is a file path or ``<string>``;
    the line part only when known, and ``label map`` when there is no source).
    """

    def __init__(self, message: str, source: str | None = None, line: int | None = None):
        super().__init__(message, source, line)
        self.message = message
        self.source = source
        self.line = line

    def __str__(self) -> str:
        where = self.source if self.source is not None else "label map"
        if self.line is not None:
            where = f"{where}, line {self.line}"
        return f"{where}: {self.message}"


class _UnknownLabel(KeyError):
    """KeyError whose ``str()`` is the plain message (KeyError would show its repr)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _hint(wanted: str, known: Sequence[str]) -> str:
    """' (did you mean ...?)' from close matches, case-insensitive; else a short listing."""
    by_lower: dict[str, str] = {}
    for k in known:
        by_lower.setdefault(k.lower(), k)
    close = difflib.get_close_matches(wanted.lower(), list(by_lower), n=3, cutoff=0.6)
    if close:
        return "; did you mean " + " or ".join(repr(by_lower[c]) for c in close) + "?"
    shown = ", ".join(repr(k) for k in known[:5])
    more = f", ... ({len(known)} in all)" if len(known) > 5 else ""
    return f"; known names: {shown}{more}"


def _validate(
    items: Sequence[LabelMapItem],
    lines: Sequence[int | None] | None = None,
    source: str | None = None,
) -> None:
    """Raise LabelMapError for an invalid list of items (``lines``: where each item starts)."""
    if not items:
        raise LabelMapError("no items: a label map needs at least one 'item { ... }'", source)
    lines = list(lines) if lines is not None else [None] * len(items)
    first_id: dict[int, tuple[LabelMapItem, int | None]] = {}
    first_name: dict[str, tuple[LabelMapItem, int | None]] = {}

    def at(line: int | None) -> str:
        return f" (line {line})" if line is not None else ""

    for item, line in zip(items, lines, strict=True):
        if not isinstance(item, LabelMapItem):
            raise LabelMapError(f"expected a LabelMapItem, got {type(item).__name__}", source, line)
        if isinstance(item.id, bool) or not isinstance(item.id, int):
            raise LabelMapError(
                f"id must be an integer, got {type(item.id).__name__} {item.id!r}", source, line
            )
        if item.id < 1:
            raise LabelMapError(
                f"id must be >= 1 (0 is reserved for the background), got {item.id} "
                f"for name {item.name!r}",
                source,
                line,
            )
        if item.id > _INT32_MAX:
            raise LabelMapError(f"id {item.id} does not fit in int32", source, line)
        if not isinstance(item.name, str):
            raise LabelMapError(
                f"name must be a string, got {type(item.name).__name__}", source, line
            )
        if not item.name.strip():
            raise LabelMapError(f"empty name for id {item.id}", source, line)
        if item.display_name is not None and not isinstance(item.display_name, str):
            raise LabelMapError(
                f"display_name must be a string or None, got {type(item.display_name).__name__}",
                source,
                line,
            )
        if item.id in first_id:
            other, other_line = first_id[item.id]
            raise LabelMapError(
                f"duplicate id {item.id}: {other.name!r}{at(other_line)} and "
                f"{item.name!r}{at(line)}",
                source,
                line,
            )
        if item.name in first_name:
            other, other_line = first_name[item.name]
            raise LabelMapError(
                f"duplicate name {item.name!r}: id {other.id}{at(other_line)} and "
                f"id {item.id}{at(line)}",
                source,
                line,
            )
        first_id[item.id] = (item, line)
        first_name[item.name] = (item, line)


class LabelMap:
    """An immutable, validated label map; items sorted by id."""

    __slots__ = ("_by_id", "_by_name", "items")

    def __init__(self, items: Iterable[LabelMapItem]):
        given = list(items)
        _validate(given)
        self.items: tuple[LabelMapItem, ...] = tuple(sorted(given, key=lambda i: i.id))
        self._by_id = {i.id: i for i in self.items}
        self._by_name = {i.name: i for i in self.items}

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[LabelMapItem]:
        return iter(self.items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelMap):
            return NotImplemented
        return self.items == other.items

    def __hash__(self) -> int:
        return hash(self.items)

    def __repr__(self) -> str:
        head = ", ".join(f"{i.id}:{i.name!r}" for i in self.items[:3])
        more = ", ..." if len(self.items) > 3 else ""
        return f"LabelMap({len(self.items)} items: {head}{more})"

    @property
    def names(self) -> tuple[str, ...]:
        """Names in id order."""
        return tuple(i.name for i in self.items)

    @property
    def ids(self) -> tuple[int, ...]:
        """Ids, ascending."""
        return tuple(i.id for i in self.items)

    @property
    def max_id(self) -> int:
        """Largest id (the OD API's ``num_classes`` when ids are 1..N)."""
        return self.items[-1].id

    def id_of(self, name: str) -> int:
        """Id of ``name`` (exact spelling); KeyError with close matches when unknown."""
        item = self._by_name.get(name)
        if item is None:
            hint = _hint(name, self.names)
            raise _UnknownLabel(f"no class named {name!r} in the label map{hint}")
        return item.id

    def name_of(self, id: int) -> str:
        """Name of class ``id``; KeyError when there is none."""
        item = self._by_id.get(id)
        if item is None:
            raise _UnknownLabel(
                f"no class with id {id!r} in the label map (ids {_ranges(self.ids)})"
            )
        return item.name

    def subset(self, names: Iterable[str]) -> LabelMap:
        """The items named in ``names``, keeping their original ids."""
        if isinstance(names, str):
            raise TypeError("subset() takes an iterable of names, not a single string")
        wanted = list(dict.fromkeys(names))
        for n in wanted:
            if n not in self._by_name:
                raise LabelMapError(f"subset: unknown name {n!r}{_hint(n, self.names)}")
        if not wanted:
            raise LabelMapError("subset: no names given")
        return LabelMap(self._by_name[n] for n in wanted)

    def to_pbtxt(self) -> str:
        """OD API text: single quotes, 2-space indent, a blank line between items."""
        blocks = []
        for i in self.items:
            lines = ["item {", f"  id: {i.id}", f"  name: {_quote(i.name)}"]
            if i.display_name is not None:
                lines.append(f"  display_name: {_quote(i.display_name)}")
            lines.append("}")
            blocks.append("\n".join(lines) + "\n")
        return "\n".join(blocks)

    def to_json(self) -> list[dict]:
        """``[{"id": 1, "name": ...}, ...]`` (plus ``display_name`` where set)."""
        out: list[dict] = []
        for i in self.items:
            d: dict = {"id": i.id, "name": i.name}
            if i.display_name is not None:
                d["display_name"] = i.display_name
            out.append(d)
        return out


def _ranges(ids: Sequence[int]) -> str:
    """'1..37' or '1..3, 7, 9..10' for sorted ids."""
    parts: list[str] = []
    start = prev = ids[0]
    for i in [*ids[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}..{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


# ---------------------------------------------------------------------------------- writing

_WRITE_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quote(s: str) -> str:
    out = []
    for ch in s:
        if ch in _WRITE_ESCAPES:
            out.append(_WRITE_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return "'" + "".join(out) + "'"


# ---------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Tok:
    kind: str  # "word", "string", "{", "}", ":", "eof"
    value: str
    line: int

    def describe(self) -> str:
        if self.kind == "eof":
            return "end of input"
        if self.kind == "string":
            return f"string {self.value!r}"
        if self.kind == "word":
            return repr(self.value)
        return f"'{self.kind}'"


_WORD = re.compile(r"[A-Za-z0-9_.+-]+")
_SIMPLE_ESCAPES = {
    "a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11,
    "\\": 92, "'": 39, '"': 34, "?": 63,
}  # fmt: skip


def _tokenize(text: str, source: str) -> list[_Tok]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.startswith("\ufeff"):
        text = text[1:]
    toks: list[_Tok] = []
    pos, line, n = 0, 1, len(text)
    while pos < n:
        ch = text[pos]
        if ch == "\n":
            line += 1
            pos += 1
        elif ch in " \t\f\v":
            pos += 1
        elif ch == "#":
            end = text.find("\n", pos)
            pos = n if end < 0 else end
        elif ch in "{}:":
            toks.append(_Tok(ch, ch, line))
            pos += 1
        elif ch in "'\"":
            value, pos = _read_string(text, pos, line, source)
            toks.append(_Tok("string", value, line))
        else:
            m = _WORD.match(text, pos)
            if m is None:
                extra = ""
                if ch in ";,":
                    extra = " (fields are separated by whitespace only; drop the separator)"
                elif ch in "<>":
                    extra = " (write 'item { ... }' with braces)"
                raise LabelMapError(f"unexpected character {ch!r}{extra}", source, line)
            toks.append(_Tok("word", m.group(), line))
            pos = m.end()
    toks.append(_Tok("eof", "", line))
    return toks


def _read_string(text: str, pos: int, line: int, source: str) -> tuple[str, int]:
    """Decode the quoted string starting at ``text[pos]``; return (value, position after)."""
    quote = text[pos]
    buf = bytearray()
    i, n = pos + 1, len(text)
    while True:
        if i >= n or text[i] == "\n":
            raise LabelMapError(
                f"unterminated string: expected a closing {quote} before the "
                f"{'end of input' if i >= n else 'end of the line'}",
                source,
                line,
            )
        ch = text[i]
        if ch == quote:
            break
        if ch != "\\":
            buf += ch.encode("utf-8", "surrogatepass")
            i += 1
            continue
        if i + 1 >= n or text[i + 1] == "\n":
            raise LabelMapError(
                "unterminated string: a backslash ends the line (expected an escape "
                "such as \\' or \\\\)",
                source,
                line,
            )
        esc = text[i + 1]
        i += 2
        if esc in _SIMPLE_ESCAPES:
            buf.append(_SIMPLE_ESCAPES[esc])
        elif esc in "01234567":
            digits = esc
            while len(digits) < 3 and i < n and text[i] in "01234567":
                digits += text[i]
                i += 1
            value = int(digits, 8)
            if value > 0xFF:
                raise LabelMapError(f"octal escape \\{digits} is above \\377", source, line)
            buf.append(value)
        elif esc in "xX":
            m = re.compile(r"[0-9A-Fa-f]{1,2}").match(text, i)
            if m is None:
                raise LabelMapError("expected hex digits after \\x", source, line)
            buf.append(int(m.group(), 16))
            i = m.end()
        elif esc in "uU":
            width = 4 if esc == "u" else 8
            digits = text[i : i + width]
            if len(digits) != width or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise LabelMapError(
                    f"expected {width} hex digits after \\{esc}, got {digits!r}", source, line
                )
            try:
                buf += chr(int(digits, 16)).encode("utf-8")
            except (ValueError, UnicodeEncodeError) as e:
                raise LabelMapError(
                    f"\\{esc}{digits} is not a valid code point", source, line
                ) from e
            i += width
        else:
            raise LabelMapError(
                f"unknown escape \\{esc} in string (expected one of \\' \\\" \\\\ \\n \\t "
                "\\r, an octal \\NNN, \\xHH or \\uXXXX)",
                source,
                line,
            )
    try:
        value = buf.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LabelMapError(f"string is not valid UTF-8 after unescaping: {e}", source, line) from e
    return value, i + 1


class _Parser:
    def __init__(self, text: str, source: str):
        self.source = source
        self.toks = _tokenize(text, source)
        self.pos = 0

    def peek(self) -> _Tok:
        return self.toks[self.pos]

    def take(self) -> _Tok:
        tok = self.toks[self.pos]
        if tok.kind != "eof":
            self.pos += 1
        return tok

    def fail(self, message: str, tok: _Tok) -> LabelMapError:
        return LabelMapError(message, self.source, tok.line)

    def expect(self, kind: str, what: str) -> _Tok:
        tok = self.take()
        if tok.kind != kind:
            raise self.fail(f"expected {what}, got {tok.describe()}", tok)
        return tok

    def parse(self) -> LabelMap:
        items: list[LabelMapItem] = []
        lines: list[int] = []
        while self.peek().kind != "eof":
            tok = self.take()
            if tok.kind != "word" or tok.value != "item":
                hint = ""
                if tok.kind == "word" and tok.value in _FIELDS:
                    hint = f" ({tok.value!r} belongs inside an 'item {{ ... }}' block)"
                raise self.fail(f"expected 'item', got {tok.describe()}{hint}", tok)
            if self.peek().kind == ":":
                self.take()
            self.expect("{", "'{' after 'item'")
            items.append(self.parse_item(tok.line))
            lines.append(tok.line)
        if not items:
            raise LabelMapError(
                "no items: expected at least one 'item { id: N name: '...' }'", self.source
            )
        _validate(items, lines, self.source)
        return LabelMap(items)

    def parse_item(self, start: int) -> LabelMapItem:
        values: dict[str, object] = {}
        seen_at: dict[str, int] = {}
        while True:
            tok = self.take()
            if tok.kind == "}":
                break
            if tok.kind == "eof" or (tok.kind == "word" and tok.value == "item"):
                raise self.fail(
                    f"expected '}}' to close the item opened at line {start}, got {tok.describe()}",
                    tok,
                )
            if tok.kind != "word":
                raise self.fail(
                    f"expected a field name (id, name, display_name) or '}}', got {tok.describe()}",
                    tok,
                )
            field = tok.value
            if field not in _FIELDS:
                close = difflib.get_close_matches(field, _FIELDS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise self.fail(
                    f"unknown field {field!r} in item (expected id, name or display_name){hint}",
                    tok,
                )
            if field in values:
                raise self.fail(
                    f"field {field!r} given twice in one item (first at line {seen_at[field]})",
                    tok,
                )
            self.expect(":", f"':' after {field!r}")
            values[field] = self.parse_int(field) if field == "id" else self.parse_str(field)
            seen_at[field] = tok.line
        for required in ("id", "name"):
            if required not in values:
                raise LabelMapError(
                    f"item has no {required!r} (expected 'id: N' and 'name: '...'')",
                    self.source,
                    start,
                )
        display = values.get("display_name")
        item = LabelMapItem(
            int(values["id"]),  # type: ignore[call-overload]
            str(values["name"]),
            None if display is None else str(display),
        )
        if not item.name.strip():
            raise LabelMapError(f"empty name for id {item.id}", self.source, seen_at["name"])
        return item

    def parse_int(self, field: str) -> int:
        tok = self.take()
        if tok.kind != "word" or not re.fullmatch(r"-?(0|[1-9][0-9]*)", tok.value):
            raise self.fail(
                f"expected a decimal integer after '{field}:', got {tok.describe()}", tok
            )
        value = int(tok.value)
        if value < 1:
            raise self.fail(f"id must be >= 1 (0 is reserved for the background), got {value}", tok)
        if value > _INT32_MAX:
            raise self.fail(f"id {value} does not fit in int32", tok)
        return value

    def parse_str(self, field: str) -> str:
        tok = self.take()
        if tok.kind != "string":
            hint = " (names must be quoted)" if tok.kind == "word" else ""
            raise self.fail(
                f"expected a quoted string after '{field}:', got {tok.describe()}{hint}", tok
            )
        return tok.value


def parse_label_map(text: str, source: str = "<string>") -> LabelMap:
    """Parse label-map text; errors name ``source`` and the line."""
    if not isinstance(text, str):
        raise TypeError(f"parse_label_map() takes text (str), got {type(text).__name__}")
    return _Parser(text, source).parse()


def load_label_map(path: str | os.PathLike) -> LabelMap:
    """Read and parse a ``.pbtxt`` label map (UTF-8); every error names the path."""
    source = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise LabelMapError(f"cannot read label map: {e.strerror or e}", source) from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LabelMapError(
            f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})", source, line
        ) from e
    return parse_label_map(text, source)


def pets_label_map() -> LabelMap:
    """The 37 Oxford-IIIT Pet breeds, ids 1..37 (CLASS-ID order), from ``breeds.BREEDS``."""
    return LabelMap(LabelMapItem(i, name) for i, name in enumerate(BREEDS, start=1))
