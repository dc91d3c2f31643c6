"""petdet_tasks.label_map: OD API StringIntLabelMap text read and written without protobuf."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from petdet_tasks.breeds import BREEDS
from petdet_tasks.label_map import (
    LabelMap,
    LabelMapError,
    LabelMapItem,
    load_label_map,
    parse_label_map,
    pets_label_map,
)

ROOT = Path(__file__).resolve().parents[2]
PETS_PBTXT = ROOT / "label_maps" / "pet_label_map.pbtxt"


def _lm(*pairs: tuple[int, str]) -> LabelMap:
    return LabelMap(LabelMapItem(i, n) for i, n in pairs)


# ------------------------------------------------------------------------- the pets label map


def test_repo_pbtxt_parses_to_pets_label_map():
    assert load_label_map(PETS_PBTXT) == pets_label_map()


def test_repo_pbtxt_is_byte_for_byte_to_pbtxt():
    assert PETS_PBTXT.read_bytes() == pets_label_map().to_pbtxt().encode("utf-8")


def test_pets_label_map_ids_and_names():
    lm = pets_label_map()
    assert len(lm) == 37
    assert lm.ids == tuple(range(1, 38))
    assert lm.max_id == 37
    assert lm.names == BREEDS
    assert all(item.display_name is None for item in lm)


@pytest.mark.parametrize(
    ("name", "id_"),
    [
        ("Abyssinian", 1),
        ("american_bulldog", 2),
        ("Bengal", 6),
        ("Siamese", 33),
        ("Sphynx", 34),
        ("yorkshire_terrier", 37),
    ],
)
def test_pets_od_api_ids(name, id_):
    lm = load_label_map(PETS_PBTXT)
    assert lm.id_of(name) == id_
    assert lm.name_of(id_) == name


# ------------------------------------------------------------------------------------ parsing


def test_parses_comments_quotes_one_line_items_display_name_blank_lines():
    text = """# label map for the test

item {   # trailing comment after the brace
  id: 2  # trailing comment after a value
  name: "b"
  display_name: "Bee # not a comment"
}
item { id: 1 name: 'a' }


item { name: 'c' id: 3 }   item: { id: 10 name: 'ten' }
# last line is a comment without a newline"""
    lm = parse_label_map(text)
    assert lm.items == (
        LabelMapItem(1, "a"),
        LabelMapItem(2, "b", "Bee # not a comment"),
        LabelMapItem(3, "c"),
        LabelMapItem(10, "ten"),
    )
    assert lm.ids == (1, 2, 3, 10)
    assert lm.names == ("a", "b", "c", "ten")
    assert lm.max_id == 10


def test_parses_escapes():
    text = r"""
item { id: 1 name: 'it\'s' }
item { id: 2 name: "say \"hi\"" }
item { id: 3 name: 'back\\slash' }
item { id: 4 name: "single ' inside double" }
item { id: 5 name: 'tab\there' }
item { id: 6 name: 'caf\303\251' display_name: "caf\xc3\xa9 \u00e9" }
"""
    lm = parse_label_map(text)
    assert lm.names == (
        "it's",
        'say "hi"',
        "back\\slash",
        "single ' inside double",
        "tab\there",
        "café",
    )
    assert lm.items[-1].display_name == "café é"


def test_parses_crlf_and_utf8_bom(tmp_path):
    text = "\ufeff" + "item {\n  id: 1\n  name: 'a'\n}\n\nitem {\n  id: 2\n  name: 'b'\n}\n"
    text = text.replace("\n", "\r\n")
    assert parse_label_map(text) == _lm((1, "a"), (2, "b"))
    path = tmp_path / "crlf.pbtxt"
    path.write_bytes(text.encode("utf-8"))
    assert load_label_map(path) == _lm((1, "a"), (2, "b"))


def test_crlf_line_numbers_are_right():
    with pytest.raises(LabelMapError, match=r"line 4: unknown field 'nam'"):
        parse_label_map("item {\r\n  id: 1\r\n\r\n  nam: 'a'\r\n}\r\n")


@pytest.mark.parametrize(
    "lm",
    [
        pets_label_map(),
        _lm((5, "five"), (1, "one"), (100, "hundred")),
        LabelMap(
            [
                LabelMapItem(1, "quote ' and \" and \\", "Display 'name'"),
                LabelMapItem(2, "new\nline\ttab\rcr\x01ctl", ""),
                LabelMapItem(3, "ünïcødé 🐈", "# not a comment"),
            ]
        ),
    ],
)
def test_round_trip(lm, tmp_path):
    text = lm.to_pbtxt()
    assert parse_label_map(text) == lm
    path = tmp_path / "m.pbtxt"
    path.write_text(text, encoding="utf-8")
    assert load_label_map(path) == lm


def test_to_pbtxt_style():
    lm = LabelMap([LabelMapItem(2, "b", "Bee"), LabelMapItem(1, "it's")])
    assert lm.to_pbtxt() == (
        "item {\n"
        "  id: 1\n"
        "  name: 'it\\'s'\n"
        "}\n"
        "\n"
        "item {\n"
        "  id: 2\n"
        "  name: 'b'\n"
        "  display_name: 'Bee'\n"
        "}\n"
    )


def test_to_json():
    lm = LabelMap([LabelMapItem(2, "b", "Bee"), LabelMapItem(1, "a")])
    assert lm.to_json() == [{"id": 1, "name": "a"}, {"id": 2, "name": "b", "display_name": "Bee"}]


# ------------------------------------------------------------------------------------- errors


def _error(text: str, source: str = "<string>") -> str:
    with pytest.raises(LabelMapError) as info:
        parse_label_map(text, source)
    return str(info.value)


def test_error_duplicate_id():
    msg = _error("item { id: 1 name: 'a' }\n\nitem {\n  id: 1\n  name: 'b'\n}\n")
    assert msg.startswith("<string>, line 3: ")
    assert "duplicate id 1" in msg
    assert "'a' (line 1)" in msg and "'b' (line 3)" in msg


def test_error_duplicate_name():
    msg = _error("item { id: 1 name: 'a' }\nitem { id: 2 name: \"a\" }\n")
    assert msg.startswith("<string>, line 2: ")
    assert "duplicate name 'a'" in msg
    assert "id 1 (line 1)" in msg and "id 2 (line 2)" in msg


@pytest.mark.parametrize("bad", ["0", "-3"])
def test_error_id_below_one(bad):
    msg = _error(f"item {{\n  id: {bad}\n  name: 'a'\n}}\n")
    assert msg.startswith("<string>, line 2: ")
    assert "id must be >= 1" in msg and f"got {bad}" in msg


@pytest.mark.parametrize("bad", ["1.5", "abc", "0x10", "07", "'3'", "99999999999"])
def test_error_non_integer_or_out_of_range_id(bad):
    msg = _error(f"item {{\n  name: 'a'\n  id: {bad}\n}}\n")
    assert msg.startswith("<string>, line 3: ")
    if bad == "99999999999":
        assert "does not fit in int32" in msg
    else:
        assert "expected a decimal integer after 'id:'" in msg
        assert bad.strip("'") in msg


def test_error_missing_id():
    msg = _error("item { id: 1 name: 'a' }\n\nitem {\n  name: 'b'\n}\n")
    assert msg.startswith("<string>, line 3: ")
    assert "item has no 'id'" in msg


def test_error_missing_name():
    msg = _error("\nitem {\n  id: 1\n}\n")
    assert msg.startswith("<string>, line 2: ")
    assert "item has no 'name'" in msg


@pytest.mark.parametrize("name", ["''", '"   "'])
def test_error_empty_name(name):
    msg = _error(f"item {{\n  id: 1\n  name: {name}\n}}\n")
    assert "line 3" in msg and "empty name for id 1" in msg


def test_error_unknown_field():
    msg = _error("item {\n  id: 1\n  name: 'a'\n  frequency: FREQUENT\n}\n")
    assert msg.startswith("<string>, line 4: ")
    assert "unknown field 'frequency'" in msg
    assert "expected id, name or display_name" in msg


def test_error_unknown_field_suggests():
    msg = _error("item {\n  id: 1\n  name: 'a'\n  displayname: 'A'\n}\n")
    assert "line 4" in msg and "did you mean 'display_name'?" in msg


def test_error_unknown_top_level():
    msg = _error("items {\n  id: 1\n  name: 'a'\n}\n")
    assert msg.startswith("<string>, line 1: expected 'item', got 'items'")
    msg = _error("id: 1\n")
    assert "expected 'item', got 'id'" in msg and "inside an 'item { ... }' block" in msg


def test_error_field_given_twice():
    msg = _error("item {\n  id: 1\n  name: 'a'\n  id: 2\n}\n")
    assert "line 4" in msg and "field 'id' given twice" in msg and "first at line 2" in msg


@pytest.mark.parametrize(
    "text", ["item {\n  id: 1;\n  name: 'a'\n}\n", "item { id: 1, name: 'a' }"]
)
def test_error_separators_refused(text):
    msg = _error(text)
    assert "unexpected character" in msg and "separated by whitespace only" in msg


def test_error_unterminated_string():
    msg = _error("item {\n  id: 1\n  name: 'abc\n}\n")
    assert msg.startswith("<string>, line 3: unterminated string")
    assert "expected a closing '" in msg
    msg = _error('item {\n  id: 1\n  name: "abc')
    assert "line 3" in msg and "unterminated string" in msg and "end of input" in msg


def test_error_unknown_escape():
    msg = _error("item {\n  id: 1\n  name: 'a\\qb'\n}\n")
    assert "line 3" in msg and "unknown escape \\q" in msg


def test_error_missing_closing_brace():
    msg = _error("item {\n  id: 1\n  name: 'a'\n")
    assert "expected '}' to close the item opened at line 1, got end of input" in msg
    msg = _error("item {\n  id: 1\n  name: 'a'\n\nitem {\n  id: 2\n  name: 'b'\n}\n")
    assert msg.startswith("<string>, line 5: ")
    assert "expected '}' to close the item opened at line 1, got 'item'" in msg


def test_error_missing_opening_brace():
    msg = _error("item\n  id: 1\n  name: 'a'\n}\n")
    assert msg.startswith("<string>, line 2: expected '{' after 'item', got 'id'")


def test_error_stray_closing_brace():
    msg = _error("item { id: 1 name: 'a' }\n}\n")
    assert msg.startswith("<string>, line 2: expected 'item', got '}'")


def test_error_missing_colon_and_unquoted_name():
    assert "expected ':' after 'id', got '1'" in _error("item { id 1 name: 'a' }")
    msg = _error("item { id: 1 name: Abyssinian }")
    assert "expected a quoted string after 'name:', got 'Abyssinian'" in msg
    assert "names must be quoted" in msg


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n\n   # another\n"])
def test_error_empty_file(text):
    msg = _error(text)
    assert msg.startswith("<string>: no items")


def test_error_names_the_file(tmp_path):
    path = tmp_path / "bad.pbtxt"
    path.write_text("item {\n  id: 1\n  name: 'a'\n  colour: 'red'\n}\n", encoding="utf-8")
    with pytest.raises(LabelMapError, match=r"bad\.pbtxt, line 4: unknown field 'colour'") as info:
        load_label_map(path)
    assert info.value.source == str(path)
    assert info.value.line == 4


def test_error_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.pbtxt"
    with pytest.raises(LabelMapError, match="nope.pbtxt: cannot read label map") as info:
        load_label_map(path)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_error_not_utf8(tmp_path):
    path = tmp_path / "latin1.pbtxt"
    path.write_bytes(b"item {\n  id: 1\n  name: 'caf\xe9'\n}\n")
    with pytest.raises(LabelMapError, match=r"latin1\.pbtxt, line 3: not UTF-8"):
        load_label_map(path)


def test_error_is_a_value_error_and_pickles():
    with pytest.raises(ValueError) as info:
        parse_label_map("item { id: 0 name: 'a' }", "x.pbtxt")
    copy = pickle.loads(pickle.dumps(info.value))
    assert str(copy) == str(info.value)
    assert (copy.source, copy.line) == ("x.pbtxt", 1)


# --------------------------------------------------------------------------- the LabelMap type


def test_constructor_validates():
    with pytest.raises(LabelMapError, match="duplicate id 1: 'a' and 'b'"):
        _lm((1, "a"), (1, "b"))
    with pytest.raises(LabelMapError, match="duplicate name 'a': id 1 and id 2"):
        _lm((1, "a"), (2, "a"))
    with pytest.raises(LabelMapError, match="id must be >= 1"):
        _lm((0, "a"))
    with pytest.raises(LabelMapError, match="empty name for id 1"):
        _lm((1, ""))
    with pytest.raises(LabelMapError, match="id must be an integer"):
        LabelMap([LabelMapItem("1", "a")])  # type: ignore[arg-type]
    with pytest.raises(LabelMapError, match="no items"):
        LabelMap([])


def test_sorted_by_id_and_equality():
    a = _lm((3, "c"), (1, "a"))
    b = _lm((1, "a"), (3, "c"))
    assert a == b and hash(a) == hash(b)
    assert [i.id for i in a] == [1, 3]
    assert a != _lm((1, "a"), (3, "C"))
    assert a != "not a label map"


def test_subset_keeps_original_ids():
    lm = pets_label_map()
    sub = lm.subset(["yorkshire_terrier", "Bengal", "Abyssinian", "Bengal"])
    assert sub.items == (
        LabelMapItem(1, "Abyssinian"),
        LabelMapItem(6, "Bengal"),
        LabelMapItem(37, "yorkshire_terrier"),
    )
    assert sub.max_id == 37
    assert sub.id_of("Bengal") == 6
    assert parse_label_map(sub.to_pbtxt()) == sub


def test_subset_unknown_name():
    with pytest.raises(LabelMapError, match=r"unknown name 'bengal'.*did you mean 'Bengal'"):
        pets_label_map().subset(["Abyssinian", "bengal"])
    with pytest.raises(TypeError):
        pets_label_map().subset("Bengal")


def test_id_of_unknown_suggests():
    lm = pets_label_map()
    with pytest.raises(KeyError) as info:
        lm.id_of("yorkshire_terier")
    assert "no class named 'yorkshire_terier'" in str(info.value)
    assert "did you mean 'yorkshire_terrier'" in str(info.value)
    with pytest.raises(KeyError, match="did you mean 'Siamese'"):
        lm.id_of("siamese")
    with pytest.raises(KeyError, match=r"known names: 'Abyssinian', .*\(37 in all\)"):
        lm.id_of("zzzzzzzz")


def test_name_of():
    lm = _lm((1, "a"), (2, "b"), (3, "c"), (7, "g"))
    assert lm.name_of(7) == "g"
    with pytest.raises(KeyError, match=r"no class with id 4 .*ids 1\.\.3, 7"):
        lm.name_of(4)
    with pytest.raises(KeyError, match=r"ids 1\.\.37"):
        pets_label_map().name_of(0)
