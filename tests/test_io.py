import os
import stat

import pytest

from spard.io import atomic_path, read_jsonl, write_json_atomic, write_jsonl_atomic


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"a":2}'
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask  # not the 0600 of a temp file


def test_crash_while_writing_keeps_previous_file(tmp_path):
    target = tmp_path / "out.jsonl"
    write_jsonl_atomic(target, [{"x": 1}])
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert read_jsonl(target) == [{"x": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_read_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: malformed JSON"):
        read_jsonl(bad)
    bad.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object"):
        read_jsonl(bad)


def test_json_is_strict_no_nan_or_infinity(tmp_path):
    import json
    import math

    target = tmp_path / "run.json"
    write_json_atomic(target, {"loss": float("nan"), "lr": float("inf"), "h": [1.5, -math.inf, (2.0, math.nan)]})
    text = target.read_text()

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    data = json.loads(text, parse_constant=refuse)  # what a strict parser does
    assert data == {"loss": None, "lr": None, "h": [1.5, None, [2.0, None]]}
    write_jsonl_atomic(tmp_path / "r.jsonl", [{"x": float("nan")}])
    assert json.loads((tmp_path / "r.jsonl").read_text(), parse_constant=refuse) == {"x": None}


def test_read_jsonl_names_the_encoding_problem_and_accepts_a_bom(tmp_path):
    bad = tmp_path / "data.jsonl"
    bad.write_bytes(b'{"a": "x"}\n\n{"a": "\xe9t\xe9"}\n')  # Latin-1 bytes on line 3
    with pytest.raises(ValueError, match=r"^\S*data\.jsonl:3: not UTF-8 \(byte 0xe9 at column 8\); save the file as UTF-8$"):
        read_jsonl(bad)
    bad.write_bytes('{"a": "é"}\n{"a": "\ufffd'.encode() + b'\xff"}\n')  # the column counts characters
    with pytest.raises(ValueError, match=r"data\.jsonl:2: not UTF-8 \(byte 0xff at column 9\)"):
        read_jsonl(bad)
    for encoding in ("utf-16", "utf-16-le", "utf-16-be", "utf-32"):  # with and without a byte-order mark
        bad.write_bytes('{"a": 1}\n'.encode(encoding))
        with pytest.raises(ValueError, match=r"data\.jsonl: looks like UTF-(16|32), not UTF-8; save the file as UTF-8"):
            read_jsonl(bad)
    # A UTF-8 byte-order mark (many editors write one) is accepted.
    good = tmp_path / "bom.jsonl"
    good.write_bytes(b"\xef\xbb\xbf" + b'{"a": "\xc3\xa9"}\n{"a": 2}\n')
    assert read_jsonl(good) == [{"a": "é"}, {"a": 2}]
    from spard.io import read_text_utf8

    assert read_text_utf8(good).startswith('{"a"')
    (tmp_path / "x.json").write_bytes(b'[{"a": 1},\n {"a": "\xff"}]')
    with pytest.raises(ValueError, match=r"x\.json:2: not UTF-8 \(byte 0xff at column 9\)"):
        read_text_utf8(tmp_path / "x.json")
