"""`spard train`'s output folder: owned by one run, written by one process, checked before the
work; checkpoints carry the run's identity; a damaged newest checkpoint falls back to the
previous one; a killed session's temporary files are removed."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

from spard.training.checkpoint import checkpoint_problem, latest_checkpoint, list_checkpoints
from spard.cli import main
from spard.training.runfolder import (LOCK_FILE, RUN_FILE, OutputLock, check_output_dir, claim_run_folder, identity_hash,
                             remove_stale_temps, run_identity)
from test_spag import one_thread  # noqa: F401  (autouse fixture)
from test_train_cli import workspace, write_config  # noqa: F401  (fixture)


def adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train(ws, out, *extra, **sections):
    return main(["train", "--config", str(write_config(ws, out, **sections)), *extra])


def last_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_another_runs_folder_is_refused_unless_overwrite(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(workspace, out) == 0
    first = adapter(out)
    # Another run (other settings) into the same folder: refused, nothing touched.
    assert train(workspace, out, optim={"lr": 2e-2}) == 2
    line = last_error(capsys)
    assert line.startswith("spard train: error: run.output_dir: ") and "holds another run" in line
    assert "optim.lr: 0.01 -> 0.02" in line and "--overwrite" in line
    assert same(adapter(out), first)
    # After a kill of that other run, --resume must not continue from the first run's checkpoint.
    assert train(workspace, out, "--resume", optim={"lr": 2e-2}) == 2
    assert "--resume: " in last_error(capsys)
    assert same(adapter(out), first)
    # --overwrite replaces the first run; its checkpoints are gone, so rotation keeps the new ones.
    assert train(workspace, out, "--overwrite", optim={"lr": 2e-2}) == 0
    assert [c.name for c in list_checkpoints(out / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]
    assert not same(adapter(out), first)
    owner = json.loads((out / RUN_FILE).read_text())
    assert owner["identity"]["optim"]["lr"] == 2e-2


def test_rerun_without_resume_is_refused_and_resume_with_changed_settings_too(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(workspace, out) == 0
    assert train(workspace, out) == 2
    assert "already holds this run's outputs" in last_error(capsys)
    # --resume --set optim.lr=...: the old checkpoint with new settings would train the old ones
    # and record the new ones; refused, naming what changed.
    assert main(["train", "--config", str(write_config(workspace, out)), "--resume", "--set", "optim.lr=0.5"]) == 2
    line = last_error(capsys)
    assert line.startswith("spard train: error: --resume: ") and "optim.lr: 0.01 -> 0.5" in line
    # What may change between sessions (how often to log or save) does not make it another run.
    shutil.rmtree(out / "adapter")
    assert train(workspace, out, "--resume", run={"log_every": 2, "output_dir": str(out), "save_every": 2,
                                                "progress": False}) == 0


def test_checkpoint_of_another_run_is_refused(workspace, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(workspace, a) == 0
    assert train(workspace, b, optim={"lr": 2e-2}) == 0
    # b's folder, with a's checkpoints copied in (its spard_run.json still says b).
    shutil.rmtree(b / "checkpoints")
    shutil.copytree(a / "checkpoints", b / "checkpoints")
    assert train(workspace, b, "--resume", optim={"lr": 2e-2}) == 2
    assert "was made by another run" in last_error(capsys)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(workspace, tmp_path, caplog):
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(workspace, full) == 0
    assert train(workspace, part) == 0
    newest = part / "checkpoints" / "checkpoint-4"
    tensors = newest / "trainable.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-10])  # truncated: a full disk, a copy cut short
    assert "truncated" in checkpoint_problem(newest)
    # A killed writer's temporary files, to be removed on the next start.
    stale_dir = part / "checkpoints" / ".checkpoint-6.k2j_9x.tmp"
    stale_dir.mkdir()
    stale_file = part / ".run.json.ab12cd.tmp"
    stale_file.write_text("half")
    shutil.rmtree(part / "adapter")
    with caplog.at_level(logging.WARNING):
        assert train(workspace, part, "--resume") == 0
    assert "checkpoint-4 is damaged" in caplog.text and "falling back" in caplog.text
    assert json.loads((part / "run.json").read_text())["resumed_from"].endswith("checkpoint-2")
    assert same(adapter(full), adapter(part))
    assert not stale_dir.exists() and not stale_file.exists()


def test_damaged_files_are_detected(tmp_path):
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    from safetensors.torch import save_file
    save_file({"w": torch.ones(3, 3)}, str(ckpt / "trainable.safetensors"))
    torch.save({"x": torch.arange(100)}, ckpt / "optimizer.pt")
    (ckpt / "state.json").write_text('{"step": 1}')
    assert checkpoint_problem(ckpt) is None and latest_checkpoint(tmp_path) == ckpt
    data = (ckpt / "optimizer.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(data[: len(data) // 2])
    assert "optimizer.pt" in checkpoint_problem(ckpt)
    with pytest.raises(ValueError, match=r"no whole checkpoint to resume from \(checkpoint-1: optimizer\.pt is damaged"):
        latest_checkpoint(tmp_path)  # none whole: an error, not a silent start from scratch
    (ckpt / "optimizer.pt").write_bytes(data)
    (ckpt / "state.json").write_text('{"step": 1')
    assert "state.json" in checkpoint_problem(ckpt)


def test_second_process_on_one_folder_is_detected(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    code = ("import sys, time; sys.path[:0] = sys.argv[2:]; from spard.training.runfolder import OutputLock; "
            "OutputLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out), *sys.path[:3]], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train(workspace, out) == 2
        line = last_error(capsys)
        assert f"is being written by another spard process (pid {holder.pid})" in line
        assert not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    # The kernel drops the lock with the process: no stale lock after a kill.
    with OutputLock(out):
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_output_paths_are_checked_before_the_work(workspace, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert train(workspace, blocker) == 2
    assert last_error(capsys) == f"spard train: error: run.output_dir: {blocker} exists and is not a folder"
    assert train(workspace, blocker / "sub") == 2
    assert "run.output_dir: cannot write to" in last_error(capsys)
    out = tmp_path / "o"
    (out / "run.json").mkdir(parents=True)
    assert train(workspace, out) == 2
    assert "run.json is a folder" in last_error(capsys)
    with pytest.raises(ValueError, match="--out: cannot write to /proc/spard-test"):
        check_output_dir("/proc/spard-test", "--out")  # not writable, even by root


def test_identity_ignores_where_and_how_often_to_write():
    from spard.config import TrainConfig
    a, b = TrainConfig().to_dict(), TrainConfig().to_dict()
    b["run"]["log_every"], b["run"]["output_dir"], b["selection"]["cache_dir"] = 99, "elsewhere", "/c"
    assert identity_hash(run_identity(a)) == identity_hash(run_identity(b))
    b["optim"]["lr"] = 1.0
    assert identity_hash(run_identity(a)) != identity_hash(run_identity(b))


def test_claim_and_stale_temps(tmp_path):
    ident = {"optim": {"lr": 1}}
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ValueError, match=f"no {RUN_FILE} naming it"):
        claim_run_folder(tmp_path, ident, resume=False, overwrite=False)
    claim_run_folder(tmp_path, ident, resume=False, overwrite=True)
    assert not (tmp_path / "checkpoints").exists()
    (tmp_path / ".adapter.x1_y.old").mkdir()
    (tmp_path / "notes.tmp").write_text("mine")  # not a temp file of ours
    assert [p.name for p in remove_stale_temps(tmp_path)] == [".adapter.x1_y.old"]
    assert (tmp_path / "notes.tmp").exists()


# ----------------------------------------------------------------------------------------------
# Issue 24: checkpoint manifests, the umask, the data a run was started with
# ----------------------------------------------------------------------------------------------
def _tiny_checkpoint(directory, step):
    from spard.training.checkpoint import save_checkpoint

    torch.manual_seed(step)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return save_checkpoint(directory, step, model=model, optimizer=optimizer, scheduler=scheduler,
                           state={"total_steps": 4}, keep=0)


def _flip_last_bit(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # the last byte of a safetensors file lies in its tensor data, not the header
    path.write_bytes(bytes(data))


def test_a_checkpoint_is_whole_only_with_every_file_it_was_written_with(tmp_path, caplog):
    older, newest = _tiny_checkpoint(tmp_path, 2), _tiny_checkpoint(tmp_path, 4)
    assert checkpoint_problem(older) is None and checkpoint_problem(newest) is None
    # A missing scheduler.pt: resuming would restart the schedule.
    (newest / "scheduler.pt").unlink()
    assert checkpoint_problem(newest) == "scheduler.pt is missing"
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == older
    assert "checkpoint-4 is damaged (scheduler.pt is missing); falling back to the previous one" in caplog.text
    # A flipped bit in the tensor data (the header and the size still agree).
    _flip_last_bit(older / "trainable.safetensors")
    assert "trainable.safetensors does not match its sha256" in checkpoint_problem(older)
    # None whole: an error naming the file, not a silent start from scratch.
    with pytest.raises(ValueError, match=r"no whole checkpoint to resume from \(checkpoint-4: scheduler\.pt is missing; "
                                         r"checkpoint-2: trainable\.safetensors does not match"):
        latest_checkpoint(tmp_path)
    # A checkpoint written with a manifest is not whole without it.
    (older / "manifest.json").unlink()
    assert checkpoint_problem(older) == "manifest.json is missing"


def test_resume_skips_a_checkpoint_with_a_flipped_bit_or_a_missing_file(workspace, tmp_path, capsys, caplog):
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(workspace, full) == 0
    assert train(workspace, part) == 0
    _flip_last_bit(part / "checkpoints" / "checkpoint-4" / "trainable.safetensors")
    shutil.rmtree(part / "adapter")
    with caplog.at_level(logging.WARNING):
        assert train(workspace, part, "--resume") == 0
    assert "checkpoint-4 is damaged (trainable.safetensors does not match its sha256" in caplog.text
    assert json.loads((part / "run.json").read_text())["resumed_from"].endswith("checkpoint-2")
    assert same(adapter(full), adapter(part))
    # Both checkpoints damaged: the run stops, naming the file.
    (part / "checkpoints" / "checkpoint-2" / "scheduler.pt").unlink()
    _flip_last_bit(part / "checkpoints" / "checkpoint-4" / "trainable.safetensors")
    capsys.readouterr()
    assert train(workspace, part, "--resume") == 2
    line = last_error(capsys)
    assert "no whole checkpoint to resume from" in line and "checkpoint-2: scheduler.pt is missing" in line


def test_adapter_and_checkpoint_folders_follow_the_umask(workspace, tmp_path):
    import stat

    from spard.training.checkpoint import atomic_dir

    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert train(workspace, out, optim={"max_steps": 2}) == 0
        for folder in (out / "adapter", out / "checkpoints" / "checkpoint-2"):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
        os.umask(0o027)
        with atomic_dir(tmp_path / "other") as tmp:
            (tmp / "f").write_text("x")
        assert stat.S_IMODE((tmp_path / "other").stat().st_mode) == 0o750
    finally:
        os.umask(old)


def test_resume_refuses_data_changed_since_the_run_started(workspace, tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    original = (workspace / "task.jsonl").read_bytes()
    task.write_bytes(original)
    out = tmp_path / "run"
    assert train(workspace, out, data={"task": str(task)}) == 0
    recorded = json.loads((out / "data_files.json").read_text())["data.task"]
    assert recorded["source"] == str(task)
    assert set(recorded["files"][task.name]) == {"size", "mtime", "sha256"}
    assert recorded["files"][task.name]["size"] == len(original)
    # The task file rewritten in place (as many rows: the data order alone would not notice).
    task.write_bytes(original.replace(b"the answer is", b"the answer was"))
    shutil.rmtree(out / "adapter")
    assert train(workspace, out, "--resume", data={"task": str(task)}) == 2
    line = last_error(capsys)
    assert line.startswith(f"spard train: error: --resume: data.task: {task} changed since the run started")
    assert "size " in line and "--overwrite" in line
    assert not (out / "adapter").exists()
    # The same bytes again (a new mtime only): the same data, so the run resumes.
    task.write_bytes(original)
    assert train(workspace, out, "--resume", data={"task": str(task)}) == 0
