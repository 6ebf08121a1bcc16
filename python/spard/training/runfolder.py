"""Output folders: checked before the expensive work, owned by one run, written by one process.

- ``check_output_dir``: the folder can be created and written (and the files to be written
  there are not folders), checked before any model is loaded or token generated.
- ``run_identity`` / ``identity_hash``: what a training run's result depends on (every config
  section except ``run``, which only says where and how often to write). Checkpoints carry the
  hash; ``--resume`` refuses a checkpoint or folder of another run and names the settings that
  differ.
- ``data_fingerprint`` / ``check_data_unchanged``: the identity covers the config, not the data
  its paths name, so each local data file's size, mtime and sha256 hash are recorded in
  ``data_files.json``; ``--resume`` refuses data whose size or content changed since, naming the
  file (a new mtime alone, the same bytes, is the same data).
- ``claim_run_folder``: a run refuses a folder that holds another run's outputs (or this run's,
  without ``--resume``), unless ``--overwrite``; the owner is recorded in ``spard_run.json``.
- ``OutputLock``: an exclusive lock file, so a second process writing the same folder is
  detected instead of silently mixing its checkpoints with the first one's.
- ``remove_stale_temps``: temporary files and folders that a killed process left behind
  (``.<name>.<random>.tmp`` / ``.old``, see `spard.io.atomic_path`,
  `spard.training.checkpoint.atomic_dir`), removed once the lock is held.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

RUN_FILE = "spard_run.json"
LOCK_FILE = ".spard.lock"
# What `spard train` writes into its output folder (a folder holding any of them belongs to a run).
DATA_FILE = "data_files.json"
RUN_OUTPUTS = ("adapter", "checkpoints", "run.json", "config.yaml", "data_manifest.json", DATA_FILE, RUN_FILE)
TRAINING_OUTPUTS = ("adapter", "checkpoints", "run.json")  # written once training has begun
# Settings that may change between the sessions of one run: where and how often to write, and
# settings that cannot change the result.
IDENTITY_EXCLUDE = ("run", "selection.cache_dir", "data.max_dropped_share")
_STALE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.(tmp|old)$")


# ----------------------------------------------------------------------------------------------
# Output paths, checked early
# ----------------------------------------------------------------------------------------------
def check_output_dir(path: str | os.PathLike, what: str, files: Iterable[str] = ()) -> Path:
    """Checks that ``path`` is (or can be created as) a folder that can be written, and that none
    of ``files`` (names to be written there later) is an existing folder. Raises ValueError
    naming ``what`` (the argument or config key). Creates nothing: a probe file is written and
    removed in the nearest existing folder. Call it before the expensive work."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what}: {p} exists and is not a folder")
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what}: cannot write to {p} ({existing} is a file)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".spard-write-test.", suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{what}: cannot write to {p} ({e.strerror or e})") from None
    for name in files:
        target = p / name
        if target.is_dir():
            raise ValueError(f"{what}: {target} is a folder; the file {name} cannot be written there")
    return p


# ----------------------------------------------------------------------------------------------
# Run identity
# ----------------------------------------------------------------------------------------------
def _drop(d: dict, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head not in d:
        return
    if rest:
        if isinstance(d[head], dict):
            _drop(d[head], rest)
    else:
        del d[head]


def run_identity(config: dict) -> dict:
    """The settings a run's result depends on: the config without ``IDENTITY_EXCLUDE``."""
    identity = json.loads(json.dumps(config, default=str))  # a deep copy with JSON types
    for key in IDENTITY_EXCLUDE:
        _drop(identity, key)
    return identity


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def diff_settings(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, as ``key: old -> new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            out += diff_settings(old.get(k, "<unset>"), new.get(k, "<unset>"), key)
        return out
    return [] if old == new else [f"{prefix or 'config'}: {old!r} -> {new!r}"]


def _describe_diff(diff: list[str], limit: int = 4) -> str:
    more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
    return "; ".join(diff[:limit]) + more


def check_resume_identity(state_identity: Optional[str], run_id: str, where: str,
                          saved_settings: Optional[dict] = None, settings: Optional[dict] = None) -> None:
    """Refuses to resume from a checkpoint made by another run (another identity hash, or none)."""
    if state_identity == run_id:
        return
    if state_identity is None:
        raise ValueError(f"--resume: {where} records no run identity (another run, or an older SPARD); "
                         "start again with --overwrite or use another output folder")
    detail = ""
    if saved_settings is not None and settings is not None:
        diff = diff_settings(saved_settings, settings)
        if diff:
            detail = f" (settings changed since: {_describe_diff(diff)})"
    raise ValueError(f"--resume: {where} was made by another run{detail}; resume with the settings the run "
                     "was started with, or start again with --overwrite")


# ----------------------------------------------------------------------------------------------
# The data a run was started with
# ----------------------------------------------------------------------------------------------
DATA_KEYS = ("data.task", "data.eval_prompts", "attack.corpus", "attack.benign", "safety.pool")


def _file_fingerprint(path: Path) -> dict:
    from ..io import file_sha256
    st = path.stat()
    return {"size": st.st_size, "mtime": st.st_mtime, "sha256": file_sha256(path)}


def data_fingerprint(sources: dict[str, Any]) -> dict:
    """``{key: {"source", "files": {name: {"size", "mtime", "sha256"}}}}`` for each local source
    in ``sources`` (config key -> path): a file, or every file under a folder (a save_to_disk
    dataset). Hub names and unset keys are left out."""
    out = {}
    for key, source in sources.items():
        if not source or not isinstance(source, (str, os.PathLike)):
            continue
        path = Path(source).expanduser()
        if path.is_file():
            files = {path.name: _file_fingerprint(path)}
        elif path.is_dir():
            files = {str(f.relative_to(path)): _file_fingerprint(f) for f in sorted(path.rglob("*")) if f.is_file()}
        else:
            continue
        out[key] = {"source": str(source), "files": files}
    return out


def config_data_sources(config: dict) -> dict[str, Any]:
    """The data paths a config (``TrainConfig.to_dict()``) names, by dotted key (`DATA_KEYS`)."""
    out = {}
    for key in DATA_KEYS:
        section, name = key.split(".")
        out[key] = (config.get(section) or {}).get(name)
    return out


def read_data_fingerprint(out: str | os.PathLike) -> Optional[dict]:
    path = Path(out) / DATA_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_data_unchanged(recorded: Optional[dict], current: dict) -> None:
    """Refuses (ValueError naming the key and file) data whose size or content differs from what
    the run recorded when it started; files added to or gone from a folder count too. Sources
    the record does not hold (an older run) pass."""
    for key, now in current.items():
        then = (recorded or {}).get(key)
        if not isinstance(then, dict) or then.get("source") != now["source"] or not isinstance(then.get("files"), dict):
            continue
        old, new = then["files"], now["files"]
        for name in sorted(set(old) | set(new)):
            shown = now["source"] if len(new) == 1 and len(old) == 1 else str(Path(now["source"]) / name)
            if name not in new:
                change = "it is gone"
            elif name not in old:
                change = "it is new"
            elif old[name].get("size") != new[name]["size"]:
                change = f"size {old[name].get('size')} -> {new[name]['size']} bytes"
            elif old[name].get("sha256") != new[name]["sha256"]:
                change = "same size, other content (sha256)"
            else:
                continue
            raise ValueError(f"--resume: {key}: {shown} changed since the run started ({change}); resume with "
                             "the data the run was started with, or start again with --overwrite")


# ----------------------------------------------------------------------------------------------
# Folder ownership
# ----------------------------------------------------------------------------------------------
def read_owner(out: str | os.PathLike) -> Optional[dict]:
    path = Path(out) / RUN_FILE
    if not path.is_file():
        return None
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _non_empty(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def run_outputs(out: str | os.PathLike) -> list[str]:
    """The run outputs present in ``out``."""
    return [name for name in RUN_OUTPUTS if (Path(out) / name).exists()]


def claim_run_folder(out: str | os.PathLike, identity: dict, *, resume: bool, overwrite: bool,
                     what: str = "run.output_dir", write: bool = True) -> str:
    """Checks that ``out`` may hold this run and returns the run id (the identity hash); with
    ``write``, also takes it (`take_run_folder`).

    A folder without run outputs may. One with another run's outputs is refused, and so is one
    with this run's outputs unless ``resume`` (a fresh run there would mix its checkpoints with
    the old ones); ``overwrite`` lets the old outputs be replaced."""
    out = Path(out)
    run_id = identity_hash(identity)
    present = run_outputs(out)
    if present and not overwrite:
        owner = read_owner(out)
        if not owner or "id" not in owner:
            raise ValueError(f"{what}: {out} holds outputs of another run ({', '.join(present)}) and no "
                             f"{RUN_FILE} naming it; use another folder, or --overwrite to replace them")
        if owner["id"] != run_id:
            diff = diff_settings(owner.get("identity", {}), identity)
            verb = "--resume" if resume else what
            raise ValueError(f"{verb}: {out} holds another run (settings differ: {_describe_diff(diff)}); "
                             + ("resume with the settings it was started with, " if resume else "use another folder, ")
                             + "or --overwrite to replace it")
        trained = [name for name in TRAINING_OUTPUTS if name in present and _non_empty(out / name)]
        if trained and not resume:  # a start that died before training left nothing to mix with
            raise ValueError(f"{what}: {out} already holds this run's outputs ({', '.join(trained)}); "
                             "--resume continues it, --overwrite starts it again")
    if write:
        take_run_folder(out, identity, overwrite=overwrite)
    return run_id


def take_run_folder(out: str | os.PathLike, identity: dict, *, overwrite: bool) -> None:
    """Records this run as the folder's owner (``spard_run.json``), first removing the old
    outputs when ``overwrite``. Called once the inputs have been read and checked, so a run that
    fails on bad input leaves the folder (and the run it held) as it was."""
    from ..io import write_json_atomic

    out = Path(out)
    if overwrite:
        for name in run_outputs(out):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    write_json_atomic(out / RUN_FILE, {"id": identity_hash(identity), "identity": identity})


# ----------------------------------------------------------------------------------------------
# One writer per folder
# ----------------------------------------------------------------------------------------------
class OutputLock:
    """An exclusive advisory lock on ``<folder>/.spard.lock`` (fcntl.flock), held from
    ``acquire`` to ``release``. The kernel drops it when the process dies, so a killed run never
    leaves a stale lock. A second process gets a ValueError naming the holder's pid."""

    def __init__(self, folder: str | os.PathLike, what: str = "output folder"):
        self.folder, self.what = Path(folder), what
        self._fd: Optional[int] = None

    def acquire(self) -> "OutputLock":
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ValueError(f"{self.what}: {self.folder} is being written by another spard process "
                                 f"(pid {holder}); wait for it to end or use another folder") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_temps(*folders: str | os.PathLike) -> list[Path]:
    """Removes the temporary files and folders a killed writer left in ``folders`` (not
    recursive). Call it only while holding the folder's ``OutputLock``."""
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            if _STALE.match(child.name):
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
                removed.append(child)
    return removed


# ----------------------------------------------------------------------------------------------
# `spard train`'s output folder, for the length of a run
# ----------------------------------------------------------------------------------------------
class RunClaim:
    """A training run's hold on its output folder (from `open_run`): ``run_id``, and ``take()``,
    which records the run as the owner once its inputs are checked (rank 0 only)."""

    def __init__(self, out: Path, identity: dict, *, overwrite: bool, main: bool):
        self.out, self.identity, self.overwrite, self.main = out, identity, overwrite, main
        self.run_id = identity_hash(identity)

    def take(self) -> None:
        if self.main:
            take_run_folder(self.out, self.identity, overwrite=self.overwrite)


@contextlib.contextmanager
def open_run(config, *, main: bool = True) -> Iterator[RunClaim]:
    """Checks and locks ``config.run.output_dir`` for a training run; yields its `RunClaim`.

    On the main process: the folder is writable (checked before any data or model is loaded),
    no other process writes it (``OutputLock``, held until the run ends), it holds no other
    run's outputs (``claim_run_folder``), and the temporary files of a killed session are
    removed. The run becomes the owner with ``claim.take()``, once its inputs are read. Other
    ranks (torchrun) only compute the id: rank 0 writes every output."""
    out = Path(config.run.output_dir)
    identity = run_identity(config.to_dict())
    claim = RunClaim(out, identity, overwrite=config.run.overwrite, main=main)
    if not main:
        yield claim
        return
    check_output_dir(out, "run.output_dir", files=("run.json", "config.yaml", "data_manifest.json", DATA_FILE))
    with OutputLock(out, "run.output_dir"):
        claim_run_folder(out, identity, resume=config.run.resume, overwrite=config.run.overwrite, write=False)
        remove_stale_temps(out, out / "checkpoints")
        yield claim
