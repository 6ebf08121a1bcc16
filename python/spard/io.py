"""Atomic file output: write to a temporary file in the same folder, then rename.

A crash while writing leaves the previous file (or none), never a half-written one. JSON is
written strictly (RFC 8259): a non-finite number (NaN, ±Infinity), which strict parsers reject,
is written as null.

Text input is read as UTF-8 (`read_text_utf8`, `read_jsonl`): a leading UTF-8 byte-order mark
(many editors write one) is dropped, and a file in another encoding raises ValueError naming the
file, the line and the column ("data.jsonl:3: not UTF-8 (byte 0xff at column 5); save the file
as UTF-8"), or saying that it looks like UTF-16 / UTF-32.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; renames it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by None, recursively through
    dicts, lists and tuples (tuples become lists, as JSON has no tuples)."""
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps_strict(obj: Any, **kwargs) -> str:
    """``json.dumps`` that never writes NaN or Infinity (they become null)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    write_text_atomic(path, dumps_strict(obj, indent=indent, sort_keys=False, default=str) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(dumps_strict(row, ensure_ascii=False) + "\n")


def write_figure_atomic(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """Saves a matplotlib figure as PNG (atomically) and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def _wide_encoding(head: bytes) -> str | None:
    """"UTF-16" / "UTF-32" when the first bytes of a file are in one of them (a byte-order mark,
    or the NUL bytes that ASCII text has in them), else None."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "UTF-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "UTF-16"
    if b"\x00" in head:
        return "UTF-32" if head[:4].count(b"\x00") == 3 else "UTF-16"
    return None


def _decode_line(raw: bytes, path, lineno: int) -> str:
    """One line of a file as UTF-8 (the line number counts from 1); ValueError naming the file,
    line and column when it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        column = len(raw[:e.start].decode("utf-8", errors="replace")) + 1
        raise ValueError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); "
                         "save the file as UTF-8") from None


def _utf8_lines(path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of ``path`` read as UTF-8 (see the module docstring)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                wide = _wide_encoding(raw[:64])
                if wide:
                    raise ValueError(f"{path}: looks like {wide}, not UTF-8; save the file as UTF-8")
                if raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
            yield lineno, _decode_line(raw, path, lineno)


def read_text_utf8(path: str | os.PathLike) -> str:
    """The text of ``path`` read as UTF-8 (a leading byte-order mark dropped); a file in another
    encoding raises ValueError naming the file, line and column."""
    return "".join(text for _, text in _utf8_lines(path))


def read_jsonl_numbered(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """`read_jsonl`'s rows with the line number of each (blank lines are skipped)."""
    rows = []
    for lineno, line in _utf8_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    return rows


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads JSON Lines (UTF-8, a byte-order mark accepted); a malformed line or one that is not
    UTF-8 raises ValueError naming the file and line number."""
    return [row for _, row in read_jsonl_numbered(path)]
