"""The text and JSON guard (`pipelines.guard`): record boundaries found without parsing, absurd nesting and
invalid Unicode named, never a RecursionError or a crash."""

from __future__ import annotations

import io
import json
import re

import pytest

from pipelines.guard import (
    MAX_JSON_DEPTH,
    JsonStructureError,
    escape_text,
    json_array_records,
    json_depth,
    text_problem,
    utf8_problem,
)


def records(data: bytes, **kw) -> list[tuple[bytes, str | None]]:
    return list(json_array_records(io.BytesIO(data), **kw))


def test_records_are_split_honouring_strings_and_escapes_at_every_block_size():
    values = [{"id": i, "v": "x\\" * (i % 5) + '"]}, {[' + "é" * (i % 3)} for i in range(300)]
    values += [[], {}, 1, "a,b", None, [[1, 2], {"k": "]"}]]
    data = ("\ufeff \n" + json.dumps(values, ensure_ascii=False, indent=1) + "\n\n").encode()
    for block in (1, 2, 3, 7, 64, 1 << 20):
        got = records(data, block_size=block)
        assert all(p is None for _, p in got)
        assert [json.loads(r) for r, _ in got] == values, block
    assert records(b"[]") == records(b" [ \n ] ") == []


def test_absurd_nesting_and_huge_records_are_flagged_and_the_rest_kept():
    deep = b"[" * 100_000 + b"]" * 100_000
    data = b'[{"a": 1}, {"c": ' + deep + b'}, {"b": "[[["}, {"x": "' + b"y" * 5000 + b'"}, 2]'
    got = records(data, max_bytes=4096, block_size=1000)
    assert [p for _, p in got] == [None, f"nesting deeper than {MAX_JSON_DEPTH} levels", None,
                                   "record larger than 4096 bytes", None]  # fmt: skip
    assert [json.loads(got[i][0]) for i in (0, 2, 4)] == [{"a": 1}, {"b": "[[["}, 2]
    assert got[3][0].startswith(b'{"x": "yyy') and len(got[3][0]) <= 4096  # its first max_bytes only
    nested = b"[" + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"]"  # exactly at the limit: fine
    assert records(nested) == [(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, None)]
    assert json_depth(b'{"a": "[[[", "b": [[1]]}') == 3 and json_depth(deep) == 100_000


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b'{"id": 1}', "expected a JSON array of records, found a JSON object at byte 0"),
        (b"[1,]", "empty element (a stray comma?) at byte 3"),
        (b"[,1]", "empty element"),
        (b"[1, 2", "the file ends inside the array at byte 5"),
        (b'[1, "2', "the file ends inside a string"),
        (b"[1] [2]", "data after the array's closing ']' at byte 4"),
        (b'[{"a": [1}]', "mismatched brackets: '}' at byte 9 closes a '['"),
    ],
)
def test_structure_that_hides_record_boundaries_is_an_error_with_the_byte(data, message):
    with pytest.raises(JsonStructureError, match=re.escape(message)):
        records(data)


def test_text_problems_name_the_field():
    record = json.loads(
        '{"id": "x", "conversations": [{"from": "human", "value": "ok"}, {"value": "a\\ud800"}]}'
    )
    assert text_problem(record) == "lone surrogate U+D800 in conversations[1].value"
    assert text_problem(json.loads('{"\\udc00k": 1}')) == "lone surrogate U+DC00 in the key '\\\\udc00k'"
    assert (
        text_problem(json.loads('{"a": ["\\ud83d\\ude00", "caf\\u00e9"]}')) is None
    )  # a pair is one character
    assert text_problem("\udbff", "column 'caption'") == "lone surrogate U+DBFF in column 'caption'"
    deep: list = []
    for _ in range(50_000):  # iterative: no recursion whatever the nesting
        deep = [deep]
    assert text_problem(deep) is None
    assert utf8_problem(b"caf\xe9", "column 'url'") == "invalid UTF-8 in column 'url' (byte 0xe9 at offset 3)"
    assert utf8_problem(b"\xed\xa0\x80", "x") is not None  # an encoded surrogate is not UTF-8
    assert utf8_problem("café 😀".encode(), "x") is None
    assert escape_text("a\ud800b") == "a\\ud800b" and escape_text(b"a\xffb") == "a\\xffb"
    assert escape_text("plain") == "plain"
