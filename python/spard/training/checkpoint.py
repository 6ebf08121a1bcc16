"""Resumable training state: a seeded data order, RNG states, and atomic checkpoint folders.

A checkpoint is a folder ``checkpoint-<step>`` written as a temporary folder and renamed into
place, so a crash while writing leaves the previous checkpoint usable and never a half-written
one; the folder gets the usual permissions (0777 less the umask), not a temporary folder's 0700.
A folder without ``state.json`` is never picked up. ``manifest.json``, written last, lists every
file of the checkpoint with its size and sha256 hash: a checkpoint is whole only with every file
it was written with, byte for byte. A checkpoint damaged afterwards (a missing file, a truncated
one, a flipped bit) is detected by ``checkpoint_problem``, and ``latest_checkpoint`` falls back to
the previous one with a warning, or raises ValueError naming the file when none is whole.
Checkpoints written before manifests (no ``format`` in state.json) get the structural checks only.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import logging
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors.torch import load_file, save_file

from ..distributed import (get_rank, get_world_size, is_distributed, load_trainable_full_state, run_on_main,
                          trainable_full_state)
from ..io import _umask, file_sha256, write_json_atomic

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class ResumableOrder:
    """An endless stream of indices into ``n`` items: a fresh seeded permutation each epoch.

    The state is two integers (epoch, position), so resuming needs no stored permutation: the
    permutation of epoch e is regenerated from (seed, e).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        if n <= 0:
            raise ValueError(f"ResumableOrder: n must be > 0 items, got {n}")
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.epoch, self.position = 0, 0
        self._perm: Optional[list[int]] = None

    def _permutation(self) -> list[int]:
        if self._perm is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._perm = torch.randperm(self.n, generator=g).tolist()
            else:
                self._perm = list(range(self.n))
        return self._perm

    def take(self, count: int) -> list[int]:
        """The next ``count`` indices (crossing into the next epoch when this one runs out)."""
        out = []
        while len(out) < count:
            perm = self._permutation()
            take = min(count - len(out), self.n - self.position)
            out.extend(perm[self.position:self.position + take])
            self.position += take
            if self.position == self.n:
                self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "shuffle": self.shuffle,
                "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if int(state["n"]) != self.n:
            raise ValueError(f"ResumableOrder: checkpoint was made over {state['n']} items, "
                             f"this run has {self.n} (the data changed since the checkpoint)")
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self.epoch, self.position, self._perm = int(state["epoch"]), int(state["position"]), None


# ----------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    with contextlib.suppress(ImportError):
        import numpy as np
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss)
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------------------------
# Trainable parameters
# ----------------------------------------------------------------------------------------------
def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, on the CPU (for LoRA: the adapter)."""
    return {n: p.detach().to("cpu", copy=True).contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model's trainable parameters: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            if state[name].shape != p.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(state[name].shape)}, "
                                 f"the model's has {tuple(p.shape)}")
            p.copy_(state[name])


# ----------------------------------------------------------------------------------------------
# Checkpoint folders
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary folder next to ``path``; renames it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; give the usual permissions
        yield tmp
        if path.exists():  # a rename cannot replace a non-empty folder: move the old one aside
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(directory: str | os.PathLike, step: int, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler=None, state: dict[str, Any],
                    objects: Optional[dict[str, Any]] = None, keep: int = 2) -> Path:
    """Writes ``directory/checkpoint-<step>`` atomically, then keeps only the newest ``keep``.

    ``state`` is JSON-serialisable (step, data order, history, ...); ``objects`` holds tensors
    and containers of them (the defense's state), saved with ``torch.save`` in ``objects.pt``.
    """
    if is_distributed():  # gathered on every rank, written by rank 0
        return save_checkpoint_all_ranks(directory, step, model=model, optimizer=optimizer,
                                         scheduler=scheduler, state=state, objects=objects, keep=keep)
    directory = Path(directory)
    final = directory / f"{CHECKPOINT_PREFIX}{step}"
    with atomic_dir(final) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        torch.save(_cpu(objects or {}), tmp / OBJECTS_FILE)
        write_json_atomic(tmp / "state.json", {"step": int(step), "format": CHECKPOINT_FORMAT, **state})
        write_manifest(tmp)
    if keep > 0:
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


OBJECTS_FILE = "objects.pt"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_FORMAT = 2  # 2: with manifest.json (state.json records it, so a lost manifest is noticed)


def write_manifest(folder: str | os.PathLike) -> None:
    """Writes ``manifest.json``: every other file of ``folder`` with its size and sha256 hash.
    Call it last, once every file is written."""
    folder = Path(folder)
    files = {f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)}
             for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST_FILE}
    write_json_atomic(folder / MANIFEST_FILE, {"files": files})


def _manifest_problem(path: Path, manifest_file: Path) -> Optional[str]:
    try:
        files = json.loads(manifest_file.read_text(encoding="utf-8"))["files"]
        entries = [(str(name), int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST_FILE} is unreadable ({type(e).__name__})"
    for name, size, digest in entries:
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        actual = f.stat().st_size
        if actual < size:
            return f"{name} is truncated ({actual} bytes, {size} written)"
        if actual != size:
            return f"{name} has {actual} bytes, {size} written"
        if file_sha256(f) != digest:
            return f"{name} does not match its sha256 hash (the file is damaged)"
    return None


def _cpu(obj):
    """``obj`` with every tensor copied to the CPU (checkpoints load on any device)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def load_objects(path: str | os.PathLike) -> dict[str, Any]:
    """The ``objects`` a checkpoint was saved with ({} for checkpoints without them)."""
    f = Path(path) / OBJECTS_FILE
    return torch.load(f, weights_only=True) if f.is_file() else {}


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON state of a checkpoint (step, defense, ...), without loading any tensor."""
    with open(Path(path) / "state.json", encoding="utf-8") as f:
        return json.load(f)


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        m = _CHECKPOINT_RE.match(child.name)
        if m and (child / "state.json").is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def _safetensors_problem(path: Path) -> Optional[str]:
    size = path.stat().st_size
    if size < 8:
        return f"{path.name} is truncated ({size} bytes)"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            return f"{path.name} is truncated (header of {n} bytes in a {size}-byte file)"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{path.name} has an unreadable header"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{path.name} is truncated ({size} bytes, {8 + n + end} expected)"
    return None


def checkpoint_problem(path: str | os.PathLike) -> Optional[str]:
    """Why the checkpoint folder ``path`` cannot be resumed from, or None when it is whole: a
    missing or unreadable state.json, or a file of its manifest that is missing, of another size
    or another sha256 hash (a lost, truncated or damaged file). A checkpoint written before
    manifests gets the structural checks (truncated tensor files, torch archives' CRCs).
    Reads the files once."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"state.json is unreadable ({type(e).__name__})"
    if (path / MANIFEST_FILE).is_file():
        return _manifest_problem(path, path / MANIFEST_FILE)
    if isinstance(state, dict) and int(state.get("format", 1) or 1) >= CHECKPOINT_FORMAT:
        return f"{MANIFEST_FILE} is missing"
    for f in sorted(path.iterdir()):
        try:
            if f.suffix == ".safetensors":
                problem = _safetensors_problem(f)
            elif f.suffix == ".pt":
                with zipfile.ZipFile(f) as z:  # torch.save's format: a zip archive
                    bad = z.testzip()
                problem = None if bad is None else f"{f.name}: {bad} fails its CRC check"
            else:
                continue
        except (OSError, ValueError, zipfile.BadZipFile, KeyError, TypeError) as e:
            problem = f"{f.name} is damaged ({type(e).__name__}: {e})"
        if problem:
            return problem
    if not any(f.suffix == ".safetensors" for f in path.iterdir()):
        return "no trainable.safetensors"
    return None


def latest_checkpoint(directory: str | os.PathLike) -> Optional[Path]:
    """The newest checkpoint that is whole (None when there is none at all). A damaged newer one
    is skipped with a warning; when every one is damaged, ValueError names each one's problem."""
    found = list_checkpoints(directory)
    damaged = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is damaged (%s); falling back to the previous one", path, problem)
        damaged.append(f"{path.name}: {problem}")
    if damaged:
        raise ValueError(f"{directory}: no whole checkpoint to resume from ({'; '.join(damaged)}); restore the "
                         "damaged file(s), or start again with --overwrite")
    return None


def load_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler=None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Restores model, optimizer, scheduler and RNG states; returns the JSON state."""
    path = Path(path)
    if is_distributed() or (path / FULL_OPTIMIZER_FILE).is_file():  # written by several ranks
        return load_checkpoint_all_ranks(path, model=model, optimizer=optimizer, scheduler=scheduler,
                                         restore_rng=restore_rng)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no state.json)")
    with open(path / "state.json", encoding="utf-8") as f:
        state = json.load(f)
    load_trainable_state(model, load_file(str(path / "trainable.safetensors")))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if scheduler is not None and (path / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if restore_rng:
        set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return state


# ----------------------------------------------------------------------------------------------
# Checkpoints on several ranks
# ----------------------------------------------------------------------------------------------
FULL_OPTIMIZER_FILE = "optimizer-full.pt"
"""Optimizer state keyed by parameter name with whole tensors (torch.distributed.checkpoint's
full state dict): loadable on any number of ranks, under DDP, FSDP or one process."""
RANK_RNG_FILE = "rng-ranks.pt"


def _state_dict_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def save_checkpoint_all_ranks(directory, step: int, *, model: torch.nn.Module, optimizer,
                              scheduler=None, state: dict, objects: Optional[dict] = None,
                              keep: int = 2) -> Path:
    """``spard.training.checkpoint.save_checkpoint`` for several ranks: call it on every rank.

    Whole tensors are gathered (trainable parameters, optimizer state by parameter name, every
    rank's RNG state) and rank 0 writes the folder atomically, in the single-process layout
    (``optimizer-full.pt`` replaces ``optimizer.pt``). The folder must be on a filesystem every
    rank sees. Returns the checkpoint folder on every rank.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    trainable = trainable_full_state(model)
    optim_state = get_optimizer_state_dict(model, optimizer, options=_state_dict_options(cpu_offload=True))
    rngs: list = [rng_state()]
    if is_distributed():  # each rank's RNG state, serialised by torch (it holds tensors)
        import torch.distributed as dist

        buf = io.BytesIO()
        torch.save(rngs[0], buf)
        blobs = [None] * get_world_size()
        dist.all_gather_object(blobs, buf.getvalue())
        rngs = [torch.load(io.BytesIO(b), weights_only=True) for b in blobs]
    final = Path(directory) / f"{CHECKPOINT_PREFIX}{step}"

    def write() -> None:
        with atomic_dir(final) as tmp:
            save_file(trainable, str(tmp / "trainable.safetensors"))
            torch.save(optim_state, tmp / FULL_OPTIMIZER_FILE)
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rngs[0], tmp / "rng.pt")
            torch.save(rngs, tmp / RANK_RNG_FILE)
            torch.save(_cpu(objects or {}), tmp / OBJECTS_FILE)
            write_json_atomic(tmp / "state.json", {"step": int(step), "world_size": len(rngs),
                                                   "format": CHECKPOINT_FORMAT, **state})
            write_manifest(tmp)
        if keep > 0:
            for old in list_checkpoints(directory)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    run_on_main(write)  # an error while writing is raised on every rank
    return final


def load_checkpoint_all_ranks(path, *, model: torch.nn.Module, optimizer, scheduler=None,
                              restore_rng: bool = True) -> dict:
    """``spard.training.checkpoint.load_checkpoint`` for checkpoints with ``optimizer-full.pt`` (written by
    several ranks); call it on every rank. Works on any number of ranks, one included. Each rank
    gets its own RNG state back when the number of ranks is the one that wrote it."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no state.json)")
    with open(path / "state.json", encoding="utf-8") as f:
        state = json.load(f)
    load_trainable_full_state(model, load_file(str(path / "trainable.safetensors")))
    if (path / FULL_OPTIMIZER_FILE).is_file():
        optim_state = torch.load(path / FULL_OPTIMIZER_FILE, weights_only=True)
        set_optimizer_state_dict(model, optimizer, optim_state, options=_state_dict_options())
    else:  # a single-process checkpoint: fine for replicated (DDP) parameters
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if scheduler is not None and (path / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if restore_rng:
        rngs = torch.load(path / RANK_RNG_FILE, weights_only=True) if (path / RANK_RNG_FILE).is_file() else None
        if rngs is not None and len(rngs) == get_world_size():
            set_rng_state(rngs[get_rank()])
        else:
            set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return state
