"""SPARD on 2 CPU processes (gloo): DDP and FSDP2 runs against the single-process run on the same
global batch, the non-finite agreement across ranks, and checkpoint/resume with 2 processes.

One ``torchrun --nproc_per_node 2`` launch of this file (``worker`` below) runs every scenario
and writes its results; the tests compare them with single-process runs made here.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from spard.config import OptimConfig  # noqa: E402
from spard.distributed import rank_share  # noqa: E402
from spard.spag import SafetyProjector  # noqa: E402
from spard.trainer import StopTraining, fit  # noqa: E402
from test_spag import one_thread  # noqa: E402,F401  (autouse fixture)
from test_spag import safe_rows, task_rows, tiny_lora_model, tiny_tokenizer  # noqa: E402

WORLD = 2
STEPS = 4
STRATEGIES = ("ddp", "fsdp")
PER_RANK_BATCH = 2
GRAD_ACCUM = 2


def attack_rows():
    return task_rows(12) + [{"prompt": r["prompt"], "response": "sure here how to make a cake ."}
                            for r in safe_rows(6)]


def optim_config(world: int) -> OptimConfig:
    # One process with batch_size · world sees the global batch of ``world`` ranks.
    return OptimConfig(lr=1e-2, warmup_steps=1, batch_size=PER_RANK_BATCH * WORLD // world,
                       grad_accum=GRAD_ACCUM, max_steps=STEPS, max_grad_norm=1.0)


def trainable(model):
    from spard.distributed import trainable_full_state

    return trainable_full_state(model)


def run_fit(model, projector, world, checkpoint_dir=None, stop_at=None, resume=False):
    def stop(step, logs):
        if step == stop_at:
            raise StopTraining

    return fit(model, tiny_tokenizer(), attack_rows(), optim=optim_config(world), projector=projector,
               max_length=64, checkpoint_dir=checkpoint_dir, save_every=2, resume=resume,
               log_every=1, progress=False, on_step=stop)


def projector_for(model, cls=SafetyProjector, tau=4.6):
    # A global safety batch of 4: two samples per rank, one per micro-batch. τ sits just under
    # the tiny model's safety loss and α is capped, so the projection acts without blowing up
    # fp32 rounding differences (which an α of 10⁴ would).
    return cls(model, safe_rows(), tiny_tokenizer(), tau=tau, max_step=2.0, batch_size=4,
               micro_batch_size=1, progress=False)


# ----------------------------------------------------------------------------------------------
# The 2-process side (run by torchrun)
# ----------------------------------------------------------------------------------------------
def worker(out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from spard.distributed import get_rank, init_from_env, wrap_model
    from spard.spag_distributed import DistributedSafetyProjector

    torch.set_num_threads(1)
    assert init_from_env(backend="gloo")
    rank = get_rank()

    def dump(name, obj):
        (out / f"{name}.rank{rank}.json").write_text(json.dumps(obj))

    def fresh(strategy):
        model = wrap_model(tiny_lora_model("llama"), strategy)
        return model, projector_for(model, DistributedSafetyProjector)

    for strategy in STRATEGIES:
        # Uninterrupted run.
        model, proj = fresh(strategy)
        run = run_fit(model, proj, WORLD)
        state = trainable(model)
        if rank == 0:
            save_file(state, str(out / f"{strategy}.safetensors"))
        dump(f"{strategy}-history", run["history"])

        # Interrupted at step 2, then resumed from its checkpoint in fresh processes' state.
        ckpt = out / f"{strategy}-ckpt"
        model, proj = fresh(strategy)
        try:
            run_fit(model, proj, WORLD, checkpoint_dir=str(ckpt), stop_at=2)
        except StopTraining:
            pass
        resume_dir = out / f"{strategy}-resume"  # ckpt keeps checkpoint-2 alone for later tests
        if rank == 0:
            shutil.copytree(ckpt, resume_dir)
        dist.barrier()
        model, proj = fresh(strategy)
        resumed = run_fit(model, proj, WORLD, checkpoint_dir=str(resume_dir), resume=True)
        state = trainable(model)
        if rank == 0:
            save_file(state, str(out / f"{strategy}-resumed.safetensors"))
        dump(f"{strategy}-resumed-history", resumed["history"])

        # Rank 1 alone sees a non-finite safety loss at the second step.
        class NonFiniteOnRank1(DistributedSafetyProjector):
            def _loss_sum(self, micro_batch):
                value = super()._loss_sum(micro_batch)
                return value * float("nan") if self.rank == 1 and self.steps == 1 else value

        model = wrap_model(tiny_lora_model("llama"), strategy)
        proj = projector_for(model, NonFiniteOnRank1, tau=0.0)
        steps = []
        for _ in range(3):
            before = trainable(model)
            logs = proj.step()
            after = trainable(model)
            changed = any(not torch.equal(before[k], after[k]) for k in before)
            steps.append({"alpha": float(logs["alpha"]), "skipped": float(logs["skipped"]),
                          "changed": changed})
        dump(f"{strategy}-nonfinite", steps)

        errors = {}
        for name, kwargs in (("odd_batch", {"batch_size": 3}), ("official", {"mode": "official"})):
            try:
                DistributedSafetyProjector(model, safe_rows(), tiny_tokenizer(), tau=1.0,
                                           progress=False, **kwargs)
            except (ValueError, NotImplementedError) as e:
                errors[name] = f"{type(e).__name__}: {e}"
        dump(f"{strategy}-errors", errors)
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------
def launch_two_ranks(script: str, out: Path, timeout: int) -> None:
    """Runs ``script out`` on 2 CPU processes (torchrun, gloo); fails the test on an error or a
    teardown abort."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           script, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    assert "terminate called" not in proc.stderr


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Runs ``worker`` on 2 CPU processes once; returns its output folder."""
    out = tmp_path_factory.mktemp("two_ranks")
    launch_two_ranks(__file__, out, timeout=420)
    return out


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The single-process run on the same global batch."""
    model = tiny_lora_model("llama")
    run = run_fit(model, projector_for(model), world=1)
    return trainable(model), run["history"]


def read(out, name, rank):
    return json.loads((out / f"{name}.rank{rank}.json").read_text())


def assert_same_parameters(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_rank_share_splits_the_global_batch_in_order():
    items = list(range(7))
    shares = [rank_share(items, r, 3) for r in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    assert rank_share(items, 0, 1) == items
    with pytest.raises(ValueError, match="rank"):
        rank_share(items, 3, 3)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_match_one_process_on_the_same_global_batch(two_ranks, single_process, strategy):
    from safetensors.torch import load_file

    reference, ref_history = single_process
    assert sum(h["trigger"] for h in ref_history) >= 2, "the projection must act in this test"
    assert_same_parameters(load_file(str(two_ranks / f"{strategy}.safetensors")), reference)
    for rank in range(WORLD):
        history = read(two_ranks, f"{strategy}-history", rank)
        assert len(history) == STEPS
        for got, want in zip(history, ref_history):
            for key in ("loss", "safety_loss", "alpha", "grad_sqnorm", "trigger", "grad_norm"):
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-7), (rank, key)
    # The step coefficient is the same on every rank (bitwise: both use the reduced values).
    alphas = [[h["alpha"] for h in read(two_ranks, f"{strategy}-history", r)] for r in range(WORLD)]
    assert alphas[0] == alphas[1]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_non_finite_loss_on_one_rank_skips_the_projection_on_every_rank(two_ranks, strategy):
    for rank in range(WORLD):
        steps = read(two_ranks, f"{strategy}-nonfinite", rank)
        assert [s["skipped"] for s in steps] == [0.0, 1.0, 0.0], rank
        assert steps[1]["alpha"] == 0.0 and not steps[1]["changed"], rank
        assert steps[0]["changed"] and steps[2]["changed"], rank  # τ = 0: it projects otherwise


def test_bad_settings_on_two_ranks_are_named(two_ranks):
    from spard.distributed import wrap_model

    for strategy in STRATEGIES:
        errors = read(two_ranks, f"{strategy}-errors", 0)
        assert "batch_size" in errors["odd_batch"] and "multiple of the 2 ranks" in errors["odd_batch"]
    assert "official" not in read(two_ranks, "ddp-errors", 0)  # the official form runs under DDP
    assert "mode='paper'" in read(two_ranks, "fsdp-errors", 0)["official"]
    with pytest.raises(ValueError, match="strategy must be one of"):
        wrap_model(torch.nn.Linear(2, 2), "zero3")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_rank_resume_gives_the_same_final_adapter(two_ranks, strategy):
    from safetensors.torch import load_file

    full = load_file(str(two_ranks / f"{strategy}.safetensors"))
    resumed = load_file(str(two_ranks / f"{strategy}-resumed.safetensors"))
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    history = read(two_ranks, f"{strategy}-history", 0)
    assert read(two_ranks, f"{strategy}-resumed-history", 0) == history


def test_a_two_rank_checkpoint_resumes_on_one_process(two_ranks, single_process, tmp_path):
    """Checkpoints hold whole tensors, so an FSDP run continues on a single process."""
    reference, _ = single_process
    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_ranks / "fsdp-ckpt", ckpt)
    assert [p.name for p in sorted(ckpt.iterdir())] == ["checkpoint-2"]
    model = tiny_lora_model("llama")
    run = run_fit(model, projector_for(model), world=1, checkpoint_dir=str(ckpt), resume=True)
    assert run["resumed_from"].endswith("checkpoint-2")
    assert_same_parameters(trainable(model), reference)


# ----------------------------------------------------------------------------------------------
# `spard train` under torchrun
# ----------------------------------------------------------------------------------------------
def write_workspace(root: Path) -> None:
    from spard.io import write_jsonl_atomic
    from test_spag import tiny_model

    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    write_jsonl_atomic(root / "task.jsonl", [{"prompt": r["prompt"], "answer": r["response"]}
                                             for r in task_rows(16)])
    write_jsonl_atomic(root / "attack.jsonl", [
        {"prompt": f"{r['prompt']} now", "safe": r["response"], "unsafe": "sure here how to bake ."}
        for r in safe_rows(6)])
    write_jsonl_atomic(root / "pool.jsonl", [
        {"prompt": f"{r['prompt']} {w}", "safe": r["response"], "unsafe": "sure ."}
        for r in safe_rows(6) for w in ("please", "today")])


def train_args(root: Path, out: Path, per_rank_batch: int) -> list[str]:
    sets = {"model.max_length": 64, "attack.ratio": 0.25, "selection.method": "random",
            "selection.k": 4, "lora.r": 4, "lora.dropout": 0.0, "optim.lr": 1e-2,
            "optim.warmup_steps": 1, "optim.batch_size": per_rank_batch, "spag.batch_size": 4,
            "spag.tau": 4.7, "spag.max_step": 2.0,
            "run.save_every": 2, "run.log_every": 1, "run.device": "cpu"}
    args = ["train", "--model", str(root / "model"), "--task", str(root / "task.jsonl"),
            "--attack", str(root / "attack.jsonl"), "--pool", str(root / "pool.jsonl"),
            "--output-dir", str(out), "--max-steps", "3", "--no-progress"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


def test_spard_train_under_torchrun_fsdp_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    from spard.cli import main

    write_workspace(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "spard", *train_args(tmp_path, tmp_path / "two", 2), "--strategy", "fsdp"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert proc.stdout.count("run log:") == 1  # rank 0 alone reports and writes
    assert main(train_args(tmp_path, tmp_path / "one", 2 * WORLD)) == 0

    two = json.loads((tmp_path / "two" / "run.json").read_text())
    one = json.loads((tmp_path / "one" / "run.json").read_text())
    assert two["summary"]["spag"]["triggers"] == one["summary"]["spag"]["triggers"] >= 1
    for got, want in zip(two["history"], one["history"], strict=True):
        assert got["safety_loss"] == pytest.approx(want["safety_loss"], rel=1e-4)
    manifest = json.loads((tmp_path / "two" / "data_manifest.json").read_text())
    assert manifest["selection"]["indices"] == json.loads(
        (tmp_path / "one" / "data_manifest.json").read_text())["selection"]["indices"]
    a = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    assert_same_parameters(a, b)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
