"""A bench cell's stages in their own processes: training, generation and judging, each in a
fresh Python process (``python -m spard.eval.stages STAGE JOB``) that ends, and so returns its
GPU memory, before the next starts.

    training    the defense trains (checkpoints under runs/<cell>/, as in process); the adapter
                is saved to runs/<cell>/adapter, or, for a defense whose model is not the base
                plus one adapter (spard.eval.serving.serving_refusal), the whole model, unmerged,
                to runs/<cell>/model.pt (so the answers are those of the in-process cell)
    generation  that model (or the server, --gen-backend openai) answers the evaluation prompts;
                the answers go to generations/<cell>/ as they come (generation_cache.jsonl, then
                safety_generations.jsonl, task_generations.jsonl, generation.json)
    judging     the judges read the saved answers (no generation model in memory) and write
                their verdicts next to them

Processes are started fresh, never forked (a fork after torch has started threads or CUDA can
hang): everything a stage needs goes through files, the bench data (torch.save, once per
worker, under stages/) and the cell's job (runs/<cell>/stage_job.pt). A stage that fails ends
the cell with one line naming the stage and the cell (its output in runs/<cell>/<stage>.log);
the cell is not marked done and a rerun resumes as in process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["STAGES", "StageFailed", "StageRunner", "judge_answers", "stages_mode"]

STAGES = ("auto", "separate", "together")
JOB = "stage_job.pt"


class StageFailed(RuntimeError):
    """A stage of a cell failed in its process."""


def stages_mode(option: str) -> str:
    """--stages: "separate" / "together", or "auto" (separate when a GPU is present)."""
    if option not in STAGES:
        raise ValueError(f"--stages: expected one of {', '.join(STAGES)}, got {option!r}")
    if option == "auto":
        return "separate" if torch.cuda.is_available() else "together"
    return option


class StageRunner:
    """Runs cells of one grid in stages; the bench data is written once, on the first cell."""

    def __init__(self, data, out_dir, *, serving=None):
        self.data, self.out, self.serving = data, Path(out_dir), serving
        self.data_file: Path | None = None

    def _data_file(self) -> Path:
        if self.data_file is None:
            folder = self.out / "stages"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"data-{socket.gethostname()}-{os.getpid()}.pt"
            torch.save(self.data, path)
            self.data_file = path
        return self.data_file

    def close(self) -> None:
        if self.data_file is not None:
            self.data_file.unlink(missing_ok=True)
            self.data_file = None

    def run(self, cell, settings, fingerprint) -> dict:
        """The cell's record, as spard.bench.run_cell gives it, from three processes."""
        import time

        from spard.bench import _cell_run_dir, cell_result

        _cell_run_dir(cell, self.out, fingerprint)  # before the job is written there (stale runs are cleared)
        folder = cell.run_dir(self.out)
        torch.save({"cell": cell, "settings": settings, "out_dir": str(self.out), "fingerprint": fingerprint,
                    "data": str(self._data_file()), "serving": _serving_spec(self.serving),
                    "threads": torch.get_num_threads()},
                   folder / JOB)
        _stage("training", cell, folder)
        trained = torch.load(folder / "trained.pt", weights_only=False)
        t = time.perf_counter()
        _stage("generation", cell, folder)
        _stage("judging", cell, folder)
        result = json.loads((folder / "judged.json").read_text(encoding="utf-8"))
        return {**cell_result(cell, trained["manifest"], result, trained["run"], time.perf_counter() - t),
                "stages": "separate"}


def _serving_spec(serving) -> dict | None:
    """The server as plain data (its client holds locks; its key stays in its variable)."""
    if serving is None:
        return None
    c = serving.client
    client = {k: getattr(c, k) for k in ("base_url", "api_key_env", "concurrency", "timeout", "max_retries",
                                         "backoff", "max_backoff", "batch_size", "prompt_format")}
    return {"client": client, "base": serving.base, "check": serving.check, "probes": serving.probes}


def _serving_of(spec: dict | None):
    if spec is None:
        return None
    from .serving import CellServing, OpenAIGenerator
    return CellServing(OpenAIGenerator(**spec["client"], progress=False), base=spec["base"], check=spec["check"],
                       probes=spec["probes"])


def _stage(stage: str, cell, folder: Path) -> None:
    log = folder / f"{stage}.log"
    with open(log, "wb") as f:
        rc = subprocess.run([sys.executable, "-m", "spard.eval.stages", stage, str(folder / JOB)],
                            stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if rc != 0:
        lines = [x for x in log.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
        why = lines[-1].strip() if lines and lines[-1].startswith("error: ") else f"exit code {rc} (killed: out of memory?)"
        raise StageFailed(f"the {stage} stage of cell {cell.key} failed: {why.removeprefix('error: ')} "
                          f"(its output: {log})")


# ------------------------------------------------------------------------------------- the stages
def _train(job, data) -> None:
    from spard.bench import train_cell
    from spard.defenses import make_defense

    from .serving import serving_refusal

    cell, settings = job["cell"], job["settings"]
    model, run, manifest = train_cell(cell, data, settings, out_dir=job["out_dir"], fingerprint=job["fingerprint"])
    folder = cell.run_dir(job["out_dir"])
    whole = serving_refusal(make_defense(cell.defense, **settings.settings_of(cell.defense))) is not None
    if whole:  # the base itself changed: the next stage loads this very module
        torch.save(model, folder / "model.pt")
    else:
        model.save_pretrained(str(folder / "adapter"))
    torch.save({"run": run, "manifest": manifest, "saved": "model" if whole else "adapter"}, folder / "trained.pt")


def _generate(job, data) -> None:
    from spard.bench import answers_dir
    from spard.eval import RefusalJudge, evaluate

    from .serving import served_cell

    cell, settings, serving = job["cell"], job["settings"], _serving_of(job["serving"])
    folder = cell.run_dir(job["out_dir"])
    saved = torch.load(folder / "trained.pt", weights_only=False)["saved"]
    if saved == "model":
        model = torch.load(folder / "model.pt", weights_only=False)
        model = (model.to(data.device) if data.device is not None else model).eval()
    else:
        from peft import PeftModel
        # on a server the weights stay there: the model lends its config only, from the host
        base = data.model if serving is not None else data.fresh_model()
        model = PeftModel.from_pretrained(base, str(folder / "adapter")).eval()
    with served_cell(serving, model, folder if serving is not None else None) as backend:
        # The refusal judge's verdicts are placeholders: the judging stage writes the grid's.
        result = evaluate(model, data.tokenizer, safety_prompts=data.eval_prompts, task_rows=data.task_test,
                          judge=RefusalJudge(), max_new_tokens=settings.max_new_tokens,
                          task_max_new_tokens=settings.task_max_new_tokens, batch_size=settings.eval_batch_size,
                          backend=backend, out_dir=answers_dir(cell, job["out_dir"]), progress=False)
    from spard.io import write_json_atomic
    write_json_atomic(folder / "generated.json", result["generation"])


def judge_answers(cell, data, settings, out_dir, generation: dict | None = None) -> dict:
    """``evaluate``'s result for the answers kept under generations/<cell>/, judged by the
    grid's judges (the judging stage, and `spard bench --rejudge`); ``generation``: the
    generation summary to report (else the one rebuilt from generation.json)."""
    from spard.bench import _judge, answers_dir

    from . import evaluate, load_generations

    where = answers_dir(cell, out_dir)
    found = []
    for name, prompts in (("safety_generations.jsonl", list(data.eval_prompts)),
                          ("task_generations.jsonl", [r["prompt"] for r in data.task_test])):
        if not (where / name).is_file():
            raise FileNotFoundError(f"cell {cell.key}: {where / name} not found (no answers kept: run the cell)")
        rows = load_generations(where / name)
        if [r["prompt"] for r in rows] != prompts:
            raise ValueError(f"cell {cell.key}: {where / name} holds answers to other prompts than the bench's")
        found.append([r["response"] for r in rows])
    result = evaluate(None, None, safety_prompts=data.eval_prompts, task_rows=data.task_test,
                      judge=_judge(settings, out_dir), safety_responses=found[0], task_responses=found[1],
                      extra_judges=[_judge(settings, out_dir, spec) for spec in settings.extra_judges], out_dir=where)
    if generation is not None:
        result["generation"] = generation
    return result


def _judge_stage(job, data) -> None:
    from spard.io import write_json_atomic

    cell = job["cell"]
    folder = cell.run_dir(job["out_dir"])
    generation = json.loads((folder / "generated.json").read_text(encoding="utf-8"))
    write_json_atomic(folder / "judged.json", judge_answers(cell, data, job["settings"], job["out_dir"], generation))


_RUN = {"training": _train, "generation": _generate, "judging": _judge_stage}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in _RUN:
        print(f"usage: python -m spard.eval.stages {{{','.join(_RUN)}}} JOB", file=sys.stderr)
        return 2
    try:
        job = torch.load(argv[1], weights_only=False)
        torch.set_num_threads(job["threads"])  # the worker's: the same sums, the same answers
        data = torch.load(job["data"], weights_only=False)
        _RUN[argv[0]](job, data)
    except Exception as e:  # noqa: BLE001 - the traceback for the log, one line for the bench
        import traceback

        from spard.apikey import redact
        print(redact(traceback.format_exc()), flush=True)
        print(redact(f"error: {type(e).__name__}: {e}").replace("\n", " "), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
