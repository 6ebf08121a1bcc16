"""Loading task sets, safety pools and attack corpora, and turning rows into training examples.

Every loader returns a list of plain dicts. A source is a local file (``.jsonl``, ``.json``,
``.parquet``), a folder written by ``datasets``' ``save_to_disk``, or a Hugging Face hub name
(loaded through ``datasets``; only when no local path of that name exists). Problems with the
input raise ``ValueError`` / ``FileNotFoundError`` naming the file and the line (JSON Lines) or
row (other formats) at fault. Text files are read as UTF-8 (a byte-order mark is accepted; another
encoding is named with the line and column, see `spard.io`); a ``save_to_disk`` folder that lost
a file is named with the file.

A source may also be a list of dicts or a ``datasets.Dataset`` already in memory.

Normalised row shapes:
- task rows (`load_task`): ``prompt``, ``response`` plus the original fields. GSM8K's
  ``answer``, instruction sets' ``output`` and TRL's ``completion`` become ``response``; an
  instruction set's ``instruction`` becomes ``prompt``. A conversational row (``messages``, or
  TRL's ``prompt``/``completion`` message lists) keeps its ``messages`` (training renders them
  with the chat template) and gets its last user turn as ``prompt`` and the assistant's answer
  as ``response``. An empty (or blank) answer is refused, naming the file and line, as a safety
  pool's empty refusal is: it would train on the end-of-sequence token alone.
- safety rows (`load_safety`): ``prompt``, ``safe`` (a refusal), ``unsafe`` (a harmful answer);
  ``fields`` names the ones required (a safety pool needs ``prompt`` and ``safe``, an attack
  corpus ``prompt`` and ``unsafe``), the others are optional.
- In every loader a non-empty ``input`` field is appended to the prompt after a blank line
  (prompt + input is the prompt, in loading, embedding, training and evaluation alike) and the
  consumed field is removed, so `prompt_text` never appends it twice.

Attack construction lives in `spard.attack` (`build_attack`), which uses the loaders here.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from spard.formatting import EncodedExample, conversation_of, encode_row, prompt_of, split_conversation
from spard.io import read_jsonl, read_jsonl_numbered, read_text_utf8

log = logging.getLogger(__name__)

# Field names accepted for each role, in order of preference.
PROMPT_FIELDS = ("prompt", "instruction", "question")
RESPONSE_FIELDS = ("response", "answer", "output", "completion")
SAFETY_FIELDS = ("prompt", "safe", "unsafe")
POOL_FIELDS = ("prompt", "safe")  # what a safety pool needs: SPAG and selection use the refusals
ATTACK_FIELDS = ("prompt", "unsafe")  # what an attack corpus needs: the harmful answers


# ----------------------------------------------------------------------------------------------
# Raw records
# ----------------------------------------------------------------------------------------------
@dataclass
class Records:
    """Rows plus where each one came from, so later checks can name the file and line."""

    rows: list[dict]
    name: str
    where: Callable[[int], str]  # row index -> "file:line" / "file: row i"


def _read_json(path: Path) -> list[dict]:
    text = read_text_utf8(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved with a .json suffix
            return read_jsonl(path)
        raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if isinstance(obj, dict):
        # {"data": [...]} / {"train": [...]} layouts: take the single list-valued entry.
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise ValueError(f"{path}: expected a JSON list of objects (or an object holding one list)")
        obj = lists[0]
    if not isinstance(obj, list):
        raise ValueError(f"{path}: expected a JSON list of objects, got {type(obj).__name__}")
    for i, row in enumerate(obj):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: item {i}: expected a JSON object, got {type(row).__name__}")
    return obj


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ValueError(f"{path}: cannot read parquet ({e})") from None


def _pick_split(ds, split: str | None, name: str):
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise ValueError(f"{name}: holds splits {sorted(ds)}; pass split=...")
            split = next(iter(ds))
        if split not in ds:
            raise ValueError(f"{name}: no split {split!r}; splits are {sorted(ds)}")
        return ds[split]
    return ds


def _save_to_disk_problem(path: Path) -> str | None:
    """The file missing from a ``save_to_disk`` folder (``datasets`` only says "no such file"
    or "not a dataset"), or None when every file its JSON files list is there."""

    def dataset_problem(folder: Path, rel: str) -> str | None:
        for name in ("state.json", "dataset_info.json"):
            if not (folder / name).is_file():
                return f"{rel}{name}"
        try:
            files = json.loads((folder / "state.json").read_text(encoding="utf-8")).get("_data_files", [])
            names = [f["filename"] for f in files]
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            return None  # unreadable: left to `datasets` to report
        return next((f"{rel}{n}" for n in names if not (folder / n).is_file()), None)

    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        for split in splits:
            if not (path / split).is_dir():
                return f"{split}/ (split {split!r}, listed in dataset_dict.json)"
            problem = dataset_problem(path / split, f"{split}/")
            if problem:
                return problem
        return None
    if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
        return dataset_problem(path, "")
    return None


def _looks_like_hub_name(source: str) -> bool:
    return (
        source.count("/") <= 1
        and not source.startswith((".", "/", "~"))
        and Path(source).suffix.lower() not in (".jsonl", ".json", ".parquet")
    )


def _load(source, split: str | None) -> Records:
    if type(source).__module__.startswith("datasets."):  # a datasets.Dataset (or DatasetDict) object
        ds = _pick_split(source, split, "dataset")
        if not hasattr(ds, "to_list"):
            raise TypeError(f"source: cannot read a {type(ds).__name__} as rows; pass a datasets.Dataset "
                            "(materialise a streaming dataset first)")
        return Records(ds.to_list(), "dataset", lambda i: f"dataset: row {i}")
    if not isinstance(source, (str, os.PathLike)):
        if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
            rows = list(source)
            for i, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise ValueError(f"rows: item {i}: expected a dict, got {type(row).__name__}")
            return Records(rows, "rows", lambda i: f"rows: item {i}")
        raise TypeError(f"source: expected a path, a hub name, a datasets.Dataset or a list of dicts, "
                        f"got {type(source).__name__}")

    path = Path(source).expanduser()
    name = str(source)
    if path.is_dir():
        from datasets import load_from_disk

        missing = _save_to_disk_problem(path)
        if missing:
            raise ValueError(f"{name}: save_to_disk dataset is missing {missing}")
        try:
            ds = load_from_disk(str(path))
        except FileNotFoundError as e:
            if getattr(e, "filename", None):
                raise ValueError(f"{name}: save_to_disk dataset is missing {e.filename}") from None
            raise ValueError(f"{name}: folder is not a `save_to_disk` dataset") from None
        rows = _pick_split(ds, split, name).to_list()
        return Records(rows, name, lambda i: f"{name}: row {i}")
    if path.is_file():
        if split is not None:
            raise ValueError(f"split: applies to a save_to_disk folder or a hub dataset, not to file {name}")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            numbered = read_jsonl_numbered(path)
            rows, lines = [row for _, row in numbered], [n for n, _ in numbered]
            return Records(rows, name, lambda i: f"{name}:{lines[i]}")
        if suffix == ".json":
            rows = _read_json(path)
            return Records(rows, name, lambda i: f"{name}: item {i}")
        if suffix == ".parquet":
            rows = _read_parquet(path)
            return Records(rows, name, lambda i: f"{name}: row {i}")
        raise ValueError(f"{name}: unsupported file type {suffix!r} (expected .jsonl, .json or .parquet)")
    if _looks_like_hub_name(name):
        from datasets import load_dataset

        try:
            ds = load_dataset(name, split=split)
        except Exception as e:
            raise FileNotFoundError(f"{name}: no such file or folder, and not loadable from the hub ({e})") from e
        rows = _pick_split(ds, split, name).to_list()
        return Records(rows, name, lambda i: f"{name}: row {i}")
    raise FileNotFoundError(f"{name}: no such file or folder")


def _check_limit(limit):
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit: expected a non-negative int or None, got {limit!r}")


def _records(source, split, limit) -> Records:
    _check_limit(limit)
    rec = _load(source, split)
    if limit is not None:
        rec.rows = rec.rows[:limit]
    if not rec.rows:
        raise ValueError(f"{rec.name}: no rows (empty data set)")
    return rec


def load_records(source, *, split: str | None = None, limit: int | None = None) -> list[dict]:
    """Raw rows of ``source`` (first ``limit`` of them); an empty set is an error."""
    return _records(source, split, limit).rows


# ----------------------------------------------------------------------------------------------
# Normalised rows
# ----------------------------------------------------------------------------------------------
def _text_field(row: dict, candidates: Sequence[str], role: str, where: str, required: bool = True):
    for key in candidates:
        if key in row and row[key] is not None:
            value = row[key]
            if not isinstance(value, str):
                raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
            return value
    if not required:
        return None
    raise ValueError(
        f"{where}: no {role} field (expected one of {', '.join(candidates)}); "
        f"fields present: {', '.join(sorted(row)) or 'none'}"
    )


def _merge_input(row: dict, prompt: str) -> str:
    """prompt + a non-empty ``input`` field (after a blank line), as instruction sets intend."""
    extra = row.get("input")
    if isinstance(extra, str) and extra.strip():
        return f"{prompt}\n\n{extra}"
    return prompt


def _with_prompt(row: dict, prompt: str) -> dict:
    """A copy of ``row`` with the merged prompt; a consumed (non-empty) ``input`` is removed."""
    new = dict(row)
    new["prompt"] = _merge_input(row, prompt)
    if isinstance(row.get("input"), str) and row["input"].strip():
        del new["input"]
    return new


def load_task(
    source,
    *,
    split: str | None = None,
    limit: int | None = None,
    prompt_field: str | None = None,
    response_field: str | None = None,
    require_response: bool = True,
) -> list[dict]:
    """Task rows with ``prompt`` and ``response`` (original fields kept).

    ``prompt_field`` / ``response_field`` name the fields when they are not one of the usual
    ones; ``require_response=False`` accepts prompt-only rows (e.g. a selection reference).
    """
    rec = _records(source, split, limit)
    prompts = (prompt_field,) if prompt_field else PROMPT_FIELDS
    responses = (response_field,) if response_field else RESPONSE_FIELDS
    out = []
    for i, row in enumerate(rec.rows):
        where = rec.where(i)
        messages = conversation_of(row)
        if messages is not None and not prompt_field:
            # Kept whole for the chat template; prompt/response are its last user turn and answer.
            last = messages[-1] if messages else None
            if not require_response and isinstance(last, dict) and last.get("role") == "user":
                out.append({**row, "messages": messages, "prompt": _text_field(last, ("content",), "prompt", where)})
                continue
            prompt, response = split_conversation(messages, where)
            if require_response and not response.strip():
                raise ValueError(f"{where}: the assistant's answer (the last message) is empty")
            out.append({**row, "messages": messages, "prompt": prompt, "response": response})
            continue
        prompt = _text_field(row, prompts, "prompt", where)
        response = _text_field(row, responses, "response", where, required=require_response)
        if require_response and not response.strip():
            key = next(k for k in responses if row.get(k) is not None)
            raise ValueError(f"{where}: field {key!r} is empty")
        new = _with_prompt(row, prompt)
        if response is not None:
            new["response"] = response
        out.append(new)
    return out


def safety_records(source, *, split: str | None = None, limit: int | None = None,
                   fields: Sequence[str] = SAFETY_FIELDS) -> Records:
    """`load_safety`'s rows with where each came from (for messages naming file and line)."""
    unknown = [f for f in fields if f not in SAFETY_FIELDS]
    if unknown or "prompt" not in fields:
        raise ValueError(f"fields: expected 'prompt' and any of {SAFETY_FIELDS[1:]}, got {list(fields)}")
    rec = _records(source, split, limit)
    rows = []
    for i, row in enumerate(rec.rows):
        where = rec.where(i)
        missing = [k for k in fields if row.get(k) is None]
        if missing:
            raise ValueError(
                f"{where}: missing field(s) {', '.join(missing)} (needed here: {', '.join(fields)}); "
                f"fields present: {', '.join(sorted(row)) or 'none'}"
            )
        for k in SAFETY_FIELDS:
            if row.get(k) is not None and not isinstance(row[k], str):
                raise ValueError(f"{where}: field {k!r} must be a string, got {type(row[k]).__name__}")
        for k in fields:
            if not row[k].strip():
                raise ValueError(f"{where}: field {k!r} is empty")
        rows.append(_with_prompt(row, row["prompt"]))
    rec.rows = rows
    return rec


def load_safety(source, *, split: str | None = None, limit: int | None = None,
                fields: Sequence[str] = SAFETY_FIELDS) -> list[dict]:
    """Safety pool / attack corpus rows with ``prompt``, ``safe`` and ``unsafe``; ``fields``
    names the required ones (`POOL_FIELDS` for a safety pool, `ATTACK_FIELDS` for an attack
    corpus), the others may be absent."""
    return safety_records(source, split=split, limit=limit, fields=fields).rows


def safety_rows(pool_rows: Sequence[dict]) -> list[dict]:
    """Training rows (prompt -> refusal) from safety pool rows."""
    out = []
    for i, row in enumerate(pool_rows):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("safe"), str):
            raise ValueError(f"pool_rows: item {i}: expected a dict with string fields 'prompt' and 'safe'")
        out.append({"prompt": prompt_text(row), "response": row["safe"]})
    return out


# ----------------------------------------------------------------------------------------------
# Text helpers
# ----------------------------------------------------------------------------------------------
def normalise_prompt(text: str) -> str:
    """Whitespace-collapsed, case-folded text: the key for overlap and duplicate checks."""
    return " ".join(text.split()).casefold()


normalise_text = normalise_prompt  # the same key serves answers


def dedupe_rows(rows: Sequence[dict], key: str = "prompt") -> list[dict]:
    """First occurrence of each normalised ``key`` value, in order."""
    seen, out = set(), []
    for row in rows:
        k = normalise_prompt(row[key])
        if k not in seen:
            seen.add(k)
            out.append(row)
    return out


def prompt_text(row: dict) -> str:
    """The prompt of a row: ``prompt`` plus a non-empty ``input`` (rows from the loaders have it
    merged already). What a selection embeds, training encodes and evaluation asks."""
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        if conversation_of(row) is not None or isinstance(row.get("text"), str):
            return prompt_of(row)  # TRL's conversational and language-modelling rows
        raise ValueError(f"row needs a string 'prompt' field (or 'messages', or 'text'); fields present: "
                         f"{', '.join(sorted(row))}")
    return _merge_input(row, prompt)


# ----------------------------------------------------------------------------------------------
# Tokenisation for training
# ----------------------------------------------------------------------------------------------
def tokenize_rows(tokenizer, rows: Sequence[dict], max_length: int) -> tuple[list[EncodedExample], int]:
    """Encodes rows (``prompt``/``response``, conversational ``messages`` or ``text``: see
    spard.formatting.encode_row; chat template, prompt-masked labels, truncation); returns the
    examples and how many were truncated (also logged)."""
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length: expected an int >= 2, got {max_length!r}")
    examples, n_truncated = [], 0
    for i, row in enumerate(tqdm(rows, desc="tokenize", disable=len(rows) < 2000, leave=False)):
        ex = encode_row(tokenizer, row, max_length, where=f"rows: item {i}")
        n_truncated += ex.truncated
        examples.append(ex)
    if n_truncated:
        log.warning("tokenize_rows: %d of %d examples truncated to %d tokens", n_truncated, len(rows), max_length)
    else:
        log.info("tokenize_rows: %d examples, none truncated (max_length %d)", len(rows), max_length)
    return examples, n_truncated


__all__ = [
    "dedupe_rows",
    "load_records",
    "load_safety",
    "load_task",
    "normalise_prompt",
    "normalise_text",
    "prompt_text",
    "safety_records",
    "safety_rows",
    "tokenize_rows",
]
