"""Optuna studies that several workers share, with trials claimed like grid cells.

A study of budget N has N slots. A worker claims a slot (spard.training.claims: an atomic file, a
heartbeat, taken over when its worker died), asks the study for a trial, runs it and tells the
result with the slot number in the trial's user attributes. So two workers never run one slot
twice, a killed worker's slot is run again by whoever takes its claim over (its dangling
RUNNING trial is marked FAIL first), and a rerun with a larger budget runs only the slots that
have no finished trial. The storage is any Optuna storage URL: SQLite (the default, one file
per study) for processes on one machine, a server database (PostgreSQL, MySQL) for a Slurm
array, or ``journal:PATH`` (Optuna's journal file, with file locks) on a shared file system.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence

from tqdm.auto import tqdm

from .training.claims import ClaimBoard


def require_optuna(option: str = "--adaptive"):
    try:
        import optuna
    except ImportError:
        raise ValueError(f"{option}: the search needs Optuna (pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_for(url: Optional[str], root: Path, name: str, option: str = "--study-storage"):
    """The study's storage: ``url`` as given (``journal:PATH`` for a journal file), else
    ``sqlite:///ROOT/NAME.db``. A folder or file that cannot be written is refused naming
    ``option``."""
    require_optuna(option)
    if url is None:
        _check_writable(root, option)
        return f"sqlite:///{(root / f'{name}.db').resolve()}"
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"{option}: expected a storage URL (sqlite:///PATH, postgresql://..., journal:PATH), got {url!r}")
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):])
        _check_writable(path.parent if str(path.parent) else Path("."), option)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        _check_writable(Path(url[len("sqlite:///"):]).parent, option)
    if "://" not in url:
        raise ValueError(f"{option}: expected a storage URL (sqlite:///PATH, postgresql://..., journal:PATH), got {url!r}")
    return url


def _check_writable(folder: Path, option: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{option}: cannot create the folder {folder} ({e.strerror or e})") from None
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option}: the folder {folder} is not writable")


def open_study(name: str, storage, *, direction: str, seed: int, startup_trials: int):
    """The shared study ``name`` (created on first use). TPE with ``startup_trials`` random
    trials first, seeded per study (so two defenses' studies do not draw the same start), and
    the constant liar, so workers running at once do not all try the same point."""
    optuna = require_optuna()

    def sampler_for(slot: int):
        # Seeded per study and per slot: workers that run at once draw different points (one
        # seed per process made two workers draw the same random start-up trials), and a slot's
        # draw does not depend on how many workers there are.
        return optuna.samplers.TPESampler(seed=(seed + zlib.crc32(f"{name}/{slot}".encode())) % 2**31,
                                          n_startup_trials=startup_trials, constant_liar=True)

    sampler = sampler_for(-1)
    # Workers starting together race to create the SQLite schema: one at a time per file.
    lock = None
    if isinstance(storage, str) and storage.startswith("sqlite:///"):
        lock = Path(storage[len("sqlite:///"):] + ".lock")
    with _file_lock(lock):
        study = optuna.create_study(study_name=name, storage=storage, direction=direction, load_if_exists=True,
                                    sampler=sampler)
    study.spard_sampler_for = sampler_for
    return study


class _file_lock:
    """An exclusive fcntl lock on ``path`` for the block (no-op for None)."""

    def __init__(self, path: Optional[Path]):
        self.path, self.fd = path, None

    def __enter__(self):
        if self.path is not None:
            import fcntl
            self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock


def study_name(prefix: str, key: str, depends_on: dict) -> str:
    """``<prefix>-<key>-<hash>``: a study per state of what its trials depend on (the bench's
    settings and data, the space, the judge, the accuracy limit), so a rerun after a change
    starts a study of its own instead of counting trials made under other settings (as a
    stale grid cell runs again). The budget is not part of it: a larger one resumes."""
    import hashlib
    import json
    digest = hashlib.sha256(json.dumps(depends_on, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{prefix}-{key}-{digest}"


def finished(study) -> list:
    """The study's completed trials, one per slot (the first completed one)."""
    optuna = require_optuna()
    out: dict = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        out.setdefault(t.user_attrs.get("slot"), t)
    return [out[k] for k in sorted(k for k in out if k is not None)]


def done_slots(study) -> set:
    """The slots that have a finished trial."""
    return {t.user_attrs.get("slot") for t in finished(study)}


def trial_rows(study, budget: int) -> list[dict]:
    """The finished trials of the first ``budget`` slots as dicts: number, parameters, and the
    user attributes the objective set (slot, worker, scores)."""
    rows = [{"number": t.number, **t.params, **t.user_attrs} for t in finished(study)]
    return [r for r in rows if r.get("slot") is not None and r["slot"] < budget]


def run_slots(study, budget: int, objective: Callable, *, board: ClaimBoard, key: str,
              enqueue: Sequence[dict] = (), wait: bool = True, poll_s: float = 5.0, progress: bool = True,
              desc: str = "trials") -> dict:
    """Runs this worker's share of the study's ``budget`` slots: every slot without a finished
    trial that no live worker holds. ``enqueue``: parameters of the first slots' trials (a
    defense's defaults, the grid's fixed attack). With ``wait``, returns only when every slot
    is finished or failed here (waiting on the slots that other workers run and taking over
    those of dead ones). Returns {"ran", "failed", "waited_s"}."""
    optuna = require_optuna()
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"trials: expected a budget >= 1, got {budget!r}")
    ran, failed, waited = [], [], 0.0
    bar = tqdm(total=budget, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    while True:
        done = done_slots(study)
        bar.n = len(done & set(range(budget)))
        bar.refresh()
        todo = [i for i in range(budget) if i not in done and i not in failed]
        if not todo:
            break
        held_elsewhere = False
        for i in todo:
            claim = board.claim(f"{key}/slot{i}")
            if claim is None:
                held_elsewhere = True
                continue
            with claim:
                if i in done_slots(study):
                    continue  # finished by another worker since we looked
                for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                    if t.user_attrs.get("slot") == i:  # a dead worker's trial
                        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                if i < len(enqueue) and not any(t.user_attrs.get("enqueued_slot") == i for t in study.get_trials(deepcopy=False)):
                    study.enqueue_trial(dict(enqueue[i]), user_attrs={"enqueued_slot": i}, skip_if_exists=False)
                if _run_trial(study, objective, i, board.worker):
                    ran.append(i)
                else:
                    failed.append(i)
            bar.n = len(done_slots(study) & set(range(budget)))
            bar.refresh()
        if not held_elsewhere or not wait:
            break
        time.sleep(poll_s)
        waited += poll_s
    bar.close()
    return {"ran": ran, "failed": failed, "waited_s": waited}


def _run_trial(study, objective: Callable, slot: int, worker: str) -> bool:
    optuna = require_optuna()
    if hasattr(study, "spard_sampler_for"):
        study.sampler = study.spard_sampler_for(slot)
    trial = study.ask()
    trial.set_user_attr("slot", slot)
    trial.set_user_attr("worker", worker)
    try:
        value = float(objective(trial))
    except (RuntimeError, ValueError, ArithmeticError) as e:  # one broken trial must not stop the study
        from .apikey import redact
        trial.set_user_attr("error", redact(repr(e))[:2000])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        tqdm.write(redact(f"study {study.study_name}: slot {slot} failed: {e!r} (rerun to retry)"))
        return False
    if not math.isfinite(value):
        trial.set_user_attr("error", f"objective returned {value}")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return False
    study.tell(trial, value)
    return True


def once(path: Path, board: ClaimBoard, key: str, compute: Callable[[], dict], *, match: Optional[dict] = None,
         poll_s: float = 5.0) -> dict:
    """A result computed by one worker and shared through ``path`` (a reference cell, a
    confirmation seed): read when there and made for ``match`` (its items equal), else computed
    under a claim, while other workers wait for it."""
    import json

    from .io import write_json_atomic

    def read() -> Optional[dict]:
        try:
            r = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return r if all(r.get(k) == v for k, v in (match or {}).items()) else None

    while True:
        r = read()
        if r is not None:
            return r
        claim = board.claim(key)
        if claim is None:
            time.sleep(poll_s)
            continue
        with claim:
            r = read()
            if r is None:
                r = {**compute(), **(match or {})}
                write_json_atomic(path, r)
            return r


__all__ = ["done_slots", "finished", "once", "open_study", "require_optuna", "run_slots", "storage_for",
           "study_name", "trial_rows"]
