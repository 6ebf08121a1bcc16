"""Bad input to the five commands, through `spard.cli.main`: every case ends in exactly one line
``spard <command>: error: ...`` naming the argument (and the file and line, for data), exit code 2,
no traceback, and nothing written where it should not be.

Run alone for the count: ``pytest tests/test_bad_inputs.py -q`` (one test per bad input).
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import yaml

from spard.cli import main
from spard.io import write_jsonl_atomic
from test_spag import one_thread  # noqa: F401  (autouse fixture)
from test_spag import safe_rows, task_rows, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny saved model, good data files, and a bad file of every kind."""
    r = tmp_path_factory.mktemp("bad_inputs")
    tiny_model("llama").save_pretrained(r / "model")
    tiny_tokenizer().save_pretrained(r / "model")
    write_jsonl_atomic(r / "task.jsonl", [{"prompt": x["prompt"], "answer": x["response"] + " #### 3"}
                                          for x in task_rows(20)])
    write_jsonl_atomic(r / "attack.jsonl", [{"prompt": f"{x['prompt']} now", "unsafe": "sure here how ."}
                                            for x in safe_rows(6)])
    write_jsonl_atomic(r / "pool.jsonl", [{"prompt": f"{x['prompt']} {w}", "safe": x["response"]}
                                          for x in safe_rows(6) for w in ("please", "today")])
    write_jsonl_atomic(r / "eval.jsonl", [{"prompt": f"eval request {i}"} for i in range(4)])
    (r / "empty.jsonl").write_text("")
    (r / "malformed.jsonl").write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n')
    (r / "list_line.jsonl").write_text('{"prompt": "a", "answer": "1"}\n[1, 2]\n')
    (r / "noresponse.jsonl").write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    (r / "numprompt.jsonl").write_text('{"prompt": 7, "answer": "1"}\n')
    (r / "noprompt.jsonl").write_text('{"text": "a"}\n')
    (r / "nosafe.jsonl").write_text('{"prompt": "a", "safe": "no"}\n{"prompt": "b", "unsafe": "x"}\n')
    (r / "emptysafe.jsonl").write_text('{"prompt": "a", "safe": "   "}\n')
    (r / "emptyanswer.jsonl").write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": ""}\n')
    (r / "latin1.jsonl").write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "1"}\n')
    (r / "utf16.jsonl").write_bytes('{"prompt": "a", "answer": "1"}\n'.encode("utf-16"))
    from datasets import Dataset, DatasetDict
    two = Dataset.from_list([{"prompt": "a", "answer": "1"}])
    DatasetDict({"train": two, "test": two}).save_to_disk(str(r / "lost_split"))
    for arrow in (r / "lost_split" / "test").glob("*.arrow"):
        arrow.unlink()  # a split file lost in a copy
    (r / "task.csv").write_text("prompt,answer\na,1\n")
    (r / "twolists.json").write_text('{"a": [], "b": []}')
    (r / "bad.parquet").write_bytes(b"PAR1 not really")
    (r / "notadataset").mkdir()
    (r / "nomodel").mkdir()
    (r / "a_file").write_text("x")
    (r / "obqa.jsonl").write_text('{"prompt": "q", "answer": "a", "target_answer": "answer9"}\n')
    (r / "bad.yaml").write_text("model: [unclosed\n")
    (r / "list.yaml").write_text("- 1\n- 2\n")
    (r / "adapter").mkdir()
    (r / "adapter" / "adapter_config.json").write_text("{not json")
    (r / "gens").mkdir()
    write_jsonl_atomic(r / "gens" / "safety_generations.jsonl", [{"prompt": "other", "response": "x"}])
    # another run's folder: its identity differs from the base config's
    (r / "other_run" / "checkpoints").mkdir(parents=True)
    (r / "other_run" / "spard_run.json").write_text(json.dumps({"id": "0123456789abcdef", "identity": {}}))
    (r / "stale_run" / "checkpoints").mkdir(parents=True)  # outputs with no owner file
    base = {
        "model": {"name_or_path": str(r / "model"), "max_length": 64},
        "data": {"task": str(r / "task.jsonl")},
        "attack": {"corpus": str(r / "attack.jsonl"), "ratio": 0.2, "seed": 1},
        "safety": {"pool": str(r / "pool.jsonl")},
        "selection": {"method": "random", "k": 4},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "optim": {"lr": 1e-2, "warmup_steps": 1, "batch_size": 4, "max_steps": 2},
        "spag": {"batch_size": 2},
        "run": {"output_dir": str(r / "out"), "progress": False},
    }
    (r / "run.yaml").write_text(yaml.safe_dump(base))
    bench = {"model": str(r / "model"), "task": str(r / "task.jsonl"), "task_test": str(r / "task.jsonl"),
             "eval_prompts": str(r / "eval.jsonl"), "safety_pool": str(r / "pool.jsonl"),
             "attacks": {"a": str(r / "attack.jsonl")}, "defenses": ["sft"]}
    for name, change in {"bench": {}, "bench_lrinf": {"optim": {"lr": ".inf"}},
                         "bench_gradneg": {"optim": {"max_grad_norm": -1}}, "bench_unknown": {"warmup": 3},
                         "bench_lacks": {"task": None}, "bench_attacks_list": {"attacks": ["x"]},
                         "bench_nomodel": {"model": str(r / "nomodel")}, "bench_lora": {"lora": {"r": 0}},
                         "bench_tokens": {"max_new_tokens": 0}, "bench_notask": {"task": str(r / "missing.jsonl")},
                         "bench_booster": {"defenses": ["sft", "booster"]},
                         "bench_noprompt": {"eval_prompts": str(r / "noprompt.jsonl")},
                         "bench_overlap_eval": {"eval_prompts": str(r / "attack.jsonl")},
                         "bench_on_overlap": {"on_overlap": "ignore"}, "bench_n_task_zero": {"n_task": 0},
                         "bench_n_eval_zero": {"n_eval": 0}, "bench_judge": {"judge": "nope"},
                         "bench_judge_model": {"judge": "moderation"}, "bench_duplicates": {"duplicates": "keep"},
                         "bench_defense_setting": {"defense_settings": {"sft": {"bogus": 1}}},
                         "bench_defense_not_in_grid": {"defense_settings": {"lisa": {"rho": 1.0}}},
                         "bench_composition_setting": {"defenses": ["antibody+spard"],
                                                       "defense_settings": {"antibody+spard": {"lisa": {"rho": 1.0}}}}}.items():
        spec = {**bench, **change}
        spec = {k: v for k, v in spec.items() if v is not None}
        (r / f"{name}.yaml").write_text(yaml.safe_dump(spec).replace("'.inf'", ".inf"))
    return r


def train(*args):
    return lambda r: ["train", "--config", str(r / "run.yaml"), "--output-dir", str(r / "out_train"), *args]


def setk(key, value):
    return train("--set", f"{key}={value}")


def select(*args, pool="pool.jsonl", ref="task.jsonl"):
    return lambda r: ["select", "--pool", str(r / pool), "--reference", str(r / ref), "--out",
                      str(r / "out_select"), "--method", "random", "--k", "2", *args]


def evaluate(*args):
    return lambda r: ["eval", "--out", str(r / "out_eval"), *args]


def bench(config=None, *args):
    return lambda r: ["bench", *(["--config", str(r / f"{config}.yaml")] if config else []),
                      "--out", str(r / "out_bench"), "--no-progress", *args]


def demo(*args):
    return lambda r: ["demo", "--out", str(r / "out_demo"), "--no-progress", *args]


F = "{r}/"  # expected texts may name files under the fixture folder

CASES = [
    # ------------------------------------------------------------------------------ spard train
    ("train-config-missing", lambda r: ["train", "--config", str(r / "nope.yaml")], "config file not found: " + F + "nope.yaml"),
    ("train-config-bad-yaml", lambda r: ["train", "--config", str(r / "bad.yaml")], F + "bad.yaml: not valid YAML"),
    ("train-config-list", lambda r: ["train", "--config", str(r / "list.yaml")], "expected a mapping at the top level"),
    ("train-unknown-key", setk("spag.taux", "0.2"), "unknown config key(s): spag.taux"),
    ("train-bad-type", setk("optim.batch_size", "two"), "optim.batch_size: expected an integer"),
    ("train-lr-inf", setk("optim.lr", "inf"), "optim.lr: expected a finite number"),
    ("train-lr-inf-string", setk("optim.lr", "'inf'"), "optim.lr: expected a finite number"),
    ("train-lr-yaml-inf", setk("optim.lr", ".inf"), "optim.lr: expected a finite number"),
    ("train-lr-nan", setk("optim.lr", "nan"), "optim.lr: expected a finite number"),
    ("train-device-unknown", setk("run.device", "tpu"), "run.device: expected cpu, cuda or cuda:N (or auto), got 'tpu'"),
    ("train-lr-negative", setk("optim.lr", "-1e-4"), "optim.lr: expected a finite number > 0"),
    ("train-grad-norm-negative", setk("optim.max_grad_norm", "-1"), "optim.max_grad_norm: expected None"),
    ("train-betas-short", setk("optim.betas", "[0.9]"), "optim.betas: expected two numbers"),
    ("train-epochs-inf", setk("optim.epochs", "1e999"), "optim.epochs: expected a finite number"),
    ("train-spag-mode", setk("spag.mode", "weird"), "spag.mode: expected paper | official"),
    ("train-tau-negative", setk("spag.tau", "-1"), "spag.tau: expected None"),
    ("train-max-step-word", setk("spag.max_step", "huge"), "spag.max_step: expected None"),
    ("train-selection-method", setk("selection.method", "kmeans"), "selection.method: expected"),
    ("train-selection-p-zero", setk("selection.p", "0"), "selection.p: expected a fraction"),
    ("train-ratio-negative", setk("attack.ratio", "-0.1"), "attack.ratio: expected a finite number >= 0"),
    ("train-on-overlap", setk("attack.on_overlap", "ignore"), "attack.on_overlap: expected error | drop"),
    ("train-lora-r", setk("lora.r", "0"), "lora.r: expected an int >= 1"),
    ("train-lora-dropout", setk("lora.dropout", "1"), "lora.dropout: expected a number in [0, 1)"),
    ("train-dtype", setk("model.dtype", "int8"), "model.dtype: expected float32"),
    ("train-max-length", setk("model.max_length", "1"), "model.max_length: expected an int >= 2"),
    ("train-log-every", setk("run.log_every", "0"), "run.log_every: expected an int >= 1"),
    ("train-task-limit", setk("data.task_limit", "0"), "data.task_limit: expected None or an int >= 1"),
    ("train-dropped-share", setk("data.max_dropped_share", "2"), "data.max_dropped_share: expected a share"),
    ("train-nonfinite-policy", setk("run.on_nonfinite_loss", "ignore"), "run.on_nonfinite_loss: expected error | skip"),
    ("train-override-no-equals", train("--set", "optim.lr"), "override 'optim.lr': expected key.path=value"),
    ("train-max-steps-word", train("--max-steps", "abc"), "argument --max-steps: invalid int value: 'abc'"),
    ("train-strategy", train("--strategy", "bogus"), "argument --strategy: invalid choice: 'bogus'"),
    ("train-unknown-option", train("--foo"), "unrecognized arguments: --foo"),
    ("train-resume-and-overwrite", train("--resume", "--overwrite"), "run.resume / run.overwrite: expected one of them"),
    ("train-task-missing", setk("data.task", "{r}/missing.jsonl"), "data.task: " + F + "missing.jsonl: no such file"),
    ("train-task-malformed", setk("data.task", "{r}/malformed.jsonl"), "data.task: " + F + "malformed.jsonl:2: malformed JSON"),
    ("train-task-list-line", setk("data.task", "{r}/list_line.jsonl"), F + "list_line.jsonl:2: expected a JSON object"),
    ("train-task-no-response", setk("data.task", "{r}/noresponse.jsonl"), F + "noresponse.jsonl:2: no response field"),
    ("train-task-prompt-number", setk("data.task", "{r}/numprompt.jsonl"), F + "numprompt.jsonl:1: field 'prompt' must be a string"),
    ("train-task-empty", setk("data.task", "{r}/empty.jsonl"), "data.task: " + F + "empty.jsonl: no rows"),
    ("train-task-csv", setk("data.task", "{r}/task.csv"), F + "task.csv: unsupported file type '.csv'"),
    ("train-task-not-dataset", setk("data.task", "{r}/notadataset"), F + "notadataset: folder is not a `save_to_disk` dataset"),
    ("train-task-dataset-lost-file", setk("data.task", "{r}/lost_split"), "data.task: " + F + "lost_split: save_to_disk dataset is missing test/data-00000-of-00001.arrow"),
    ("train-task-empty-answer", setk("data.task", "{r}/emptyanswer.jsonl"), "data.task: " + F + "emptyanswer.jsonl:2: field 'answer' is empty"),
    ("train-task-not-utf8", setk("data.task", "{r}/latin1.jsonl"), "data.task: " + F + "latin1.jsonl:2: not UTF-8 (byte 0xe9 at column 16); save the file as UTF-8"),
    ("train-task-utf16", setk("data.task", "{r}/utf16.jsonl"), "data.task: " + F + "utf16.jsonl: looks like UTF-16, not UTF-8; save the file as UTF-8"),
    ("train-sft-and-defense", train("--sft", "--defense", "lisa"), "--sft / --defense: --sft trains plain SFT, --defense lisa another defense"),
    ("train-composition-unknown-member", train("--defense", "antibody+nope"), "defense: defense 'antibody+nope': unknown member 'nope'"),
    ("train-composition-conflict", train("--defense", "antibody+bds"), "defense 'antibody+bds': antibody and bds conflict: both own the step's loss"),
    ("train-composition-not-a-member", train("--defense", "antibody+spard", "--set", "defense.bds.weight_lr=0.1"), "defense 'antibody+spard': settings for 'bds', which is not a member (members: antibody, spard)"),
    ("train-shortcut-and-set", train("--max-steps", "5", "--set", "optim.max_steps=7"), "--max-steps 5 conflicts with --set optim.max_steps=7; give one of them"),
    ("train-task-json-two-lists", setk("data.task", "{r}/twolists.json"), F + "twolists.json: expected a JSON list"),
    ("train-task-bad-parquet", setk("data.task", "{r}/bad.parquet"), F + "bad.parquet: cannot read parquet"),
    ("train-pool-no-refusal", setk("safety.pool", "{r}/nosafe.jsonl"), "safety.pool: " + F + "nosafe.jsonl:2: missing field(s) safe"),
    ("train-pool-empty-refusal", setk("safety.pool", "{r}/emptysafe.jsonl"), F + "emptysafe.jsonl:1: field 'safe' is empty"),
    ("train-pool-empty", setk("safety.pool", "{r}/empty.jsonl"), "safety.pool: " + F + "empty.jsonl: no rows"),
    ("train-attack-no-unsafe", setk("attack.corpus", "{r}/pool.jsonl"), "attack.corpus: " + F + "pool.jsonl:1: missing field(s) unsafe"),
    ("train-attack-overlaps-eval", setk("data.eval_prompts", "{r}/attack.jsonl"), "overlap the evaluation items (" + F + "attack.jsonl), e.g. " + F + "attack.jsonl:1"),
    ("train-attack-too-few", setk("attack.ratio", "0.9"), "ratio: 0.9 of 20 clean rows needs 18 harmful rows"),
    ("train-eval-missing", setk("data.eval_prompts", "{r}/missing.jsonl"), "data.eval_prompts: " + F + "missing.jsonl: no such file"),
    ("train-eval-no-prompt", setk("data.eval_prompts", "{r}/noprompt.jsonl"), "data.eval_prompts: " + F + "noprompt.jsonl:1: no prompt field"),
    ("train-model-missing", setk("model.name_or_path", "{r}/missing_model"), "model.name_or_path: " + F + "missing_model: no such folder"),
    ("train-model-file", setk("model.name_or_path", "{r}/a_file"), "model.name_or_path: " + F + "a_file is a file"),
    ("train-model-no-config", setk("model.name_or_path", "{r}/nomodel"), "model.name_or_path: " + F + "nomodel is not a model folder"),
    ("train-k-beyond-pool", setk("selection.k", "99"), "k: 99 exceeds the pool size 12"),
    ("train-out-file", lambda r: ["train", "--config", str(r / "run.yaml"), "--output-dir", str(r / "a_file")], "run.output_dir: " + F + "a_file exists and is not a folder"),
    ("train-out-under-file", lambda r: ["train", "--config", str(r / "run.yaml"), "--output-dir", str(r / "a_file" / "x")], "run.output_dir: cannot write to"),
    ("train-out-other-run", lambda r: ["train", "--config", str(r / "run.yaml"), "--output-dir", str(r / "other_run"), "--resume"], "--resume: " + F + "other_run holds another run"),
    ("train-out-unowned", lambda r: ["train", "--config", str(r / "run.yaml"), "--output-dir", str(r / "stale_run")], "run.output_dir: " + F + "stale_run holds outputs of another run"),
    # ----------------------------------------------------------------------------- spard select
    ("select-pool-missing", select(pool="missing.jsonl"), "--pool: " + F + "missing.jsonl: no such file"),
    ("select-reference-missing", select(ref="missing.jsonl"), "--reference: " + F + "missing.jsonl: no such file"),
    ("select-pool-no-refusal", select(pool="nosafe.jsonl"), "--pool: " + F + "nosafe.jsonl:2: missing field(s) safe"),
    ("select-pool-malformed", select(pool="malformed.jsonl"), "--pool: " + F + "malformed.jsonl:2: malformed JSON"),
    ("select-reference-empty", select(ref="empty.jsonl"), "--reference: " + F + "empty.jsonl: no rows"),
    ("select-k-zero", select("--k", "0"), "k: the selection would be empty (k = 0)"),
    ("select-p-too-small", lambda r: ["select", "--pool", str(r / "pool.jsonl"), "--reference", str(r / "task.jsonl"), "--out", str(r / "out_select"), "--method", "random", "--p", "0.01"], "the selection would be empty (k = floor(p · |reference|) = floor(0.01 · 20) = 0)"),
    ("select-k-beyond-pool", select("--k", "99"), "k: 99 exceeds the pool size 12"),
    ("select-k-and-p", select("--p", "0.1"), "--k / --p: give one of them"),
    ("select-cache-dir-file", select("--model", "{r}/model", "--cache-dir", "{r}/a_file"), "--cache-dir: " + F + "a_file exists and is not a folder"),
    ("select-device-unknown", select("--device", "tpu"), "--device: expected cpu, cuda or cuda:N (or auto), got 'tpu'"),
    ("select-embedder-missing", select("--method", "rd-dpp", "--embedder", "./no_such_embedder"), "--embedder: ./no_such_embedder: no such folder"),
    ("select-model-is-a-file", lambda r: ["select", "--pool", str(r / "pool.jsonl"), "--reference", str(r / "task.jsonl"), "--out", str(r / "out_select"), "--k", "2", "--model", str(r / "a_file")], "--model: " + F + "a_file is a file"),
    ("select-method", select("--method", "kmeans"), "argument --method: invalid choice: 'kmeans'"),
    ("select-no-embedder", lambda r: ["select", "--pool", str(r / "pool.jsonl"), "--reference", str(r / "task.jsonl"), "--out", str(r / "out_select")], "--model / --embedder: give --model"),
    ("select-out-file", lambda r: ["select", "--pool", str(r / "pool.jsonl"), "--reference", str(r / "task.jsonl"), "--out", str(r / "a_file"), "--method", "random", "--k", "2"], "--out: " + F + "a_file exists and is not a folder"),
    ("select-beta-negative", select("--beta", "-1"), "beta: expected a finite number >= 0"),
    ("select-p-nan", lambda r: ["select", "--pool", str(r / "pool.jsonl"), "--reference", str(r / "task.jsonl"), "--out", str(r / "out_select"), "--method", "random", "--p", "nan"], "p: expected a finite number >= 0"),
    ("select-limit-negative", select("--limit-pool", "-1"), "--limit-pool: expected an int >= 1"),
    ("select-batch-size-zero", select("--batch-size", "0"), "--batch-size / --max-length: expected ints >= 1"),
    ("select-split-on-file", select("--pool-split", "train"), "split: applies to a save_to_disk folder"),
    ("select-dtype", select("--dtype", "int4"), "argument --dtype: invalid choice: 'int4'"),
    ("select-embedder-missing", lambda r: ["select", "--pool", str(r / "pool.jsonl"), "--reference", str(r / "task.jsonl"), "--out", str(r / "out_select"), "--embedder", str(r / "missing_model"), "--no-cache", "--k", "2"], "missing_model"),
    # ------------------------------------------------------------------------------- spard eval
    ("eval-no-data", evaluate("--model", "m"), "--safety-data / --task-data: give at least one"),
    ("eval-device-unknown", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "model"), "--safety-data", str(r / "eval.jsonl"), "--device", "tpu"], "--device: expected cpu, cuda or cuda:N (or auto), got 'tpu'"),
    ("eval-no-model", lambda r: ["eval", "--out", str(r / "out_eval"), "--safety-data", str(r / "eval.jsonl")], "--model: required (unless --rejudge)"),
    ("eval-safety-missing", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "model"), "--safety-data", str(r / "missing.jsonl")], F + "missing.jsonl: no such file"),
    ("eval-safety-no-prompt", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "model"), "--safety-data", str(r / "noprompt.jsonl")], F + "noprompt.jsonl:1: no prompt field"),
    ("eval-task-no-answer", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "model"), "--task-data", str(r / "noresponse.jsonl")], F + "noresponse.jsonl:2: no response field"),
    ("eval-n-negative", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "model"), "--safety-data", str(r / "eval.jsonl"), "--n-safety", "-1"], "--n-safety must be >= 0"),
    ("eval-out-file", lambda r: ["eval", "--out", str(r / "a_file"), "--model", str(r / "model"), "--safety-data", str(r / "eval.jsonl")], "--out: " + F + "a_file exists and is not a folder"),
    ("eval-rejudge-nothing-saved", lambda r: ["eval", "--out", str(r / "out_eval_empty"), "--rejudge", "--safety-data", str(r / "eval.jsonl")], "--rejudge: " + F + "out_eval_empty/safety_generations.jsonl not found"),
    ("eval-rejudge-other-prompts", lambda r: ["eval", "--out", str(r / "gens"), "--rejudge", "--safety-data", str(r / "eval.jsonl")], "--rejudge: " + F + "gens/safety_generations.jsonl holds responses to other prompts"),
    ("eval-judge-choice", evaluate("--judge", "gpt"), "argument --judge: invalid choice: 'gpt'"),
    ("eval-moderation-no-model", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "model"), "--safety-data", str(r / "eval.jsonl"), "--judge", "moderation"], "the moderation judge needs a model"),
    ("eval-rubric-no-model", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "model"), "--safety-data", str(r / "eval.jsonl"), "--judge", "rubric"], "the rubric judge needs the API's model name"),
    ("eval-rubric-key-unset", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "model"), "--safety-data", str(r / "eval.jsonl"), "--judge", "rubric", "--judge-model", "m", "--judge-api-key-env", "SPARD_TEST_UNSET_KEY"], "$SPARD_TEST_UNSET_KEY, which is not set"),
    ("eval-rubric-bad-url", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "model"), "--safety-data", str(r / "eval.jsonl"), "--judge", "rubric", "--judge-model", "m", "--judge-base-url", "localhost:8000"], "base_url must start with http:// or https://"),
    ("eval-rubric-concurrency", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "model"), "--safety-data", str(r / "eval.jsonl"), "--judge", "rubric", "--judge-model", "m", "--judge-concurrency", "0"], "concurrency >= 1"),
    ("eval-rubric-timeout-inf", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "model"), "--safety-data", str(r / "eval.jsonl"), "--judge", "rubric", "--judge-model", "m", "--judge-timeout", "inf"], "a finite timeout > 0"),
    ("eval-model-missing", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "missing_model"), "--safety-data", str(r / "eval.jsonl")], "--model: " + F + "missing_model: no such folder"),
    ("eval-model-file", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "a_file"), "--safety-data", str(r / "eval.jsonl")], "--model: " + F + "a_file is a file"),
    ("eval-adapter-missing", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "model"), "--adapter", str(r / "missing_adapter"), "--safety-data", str(r / "eval.jsonl")], "adapter not found: '" + F + "missing_adapter' does not exist"),
    ("eval-adapter-not-peft", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "model"), "--adapter", str(r / "nomodel"), "--safety-data", str(r / "eval.jsonl")], "is not a PEFT adapter folder"),
    ("eval-adapter-bad-json", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "model"), "--adapter", str(r / "adapter"), "--safety-data", str(r / "eval.jsonl")], F + "adapter/adapter_config.json: malformed JSON"),
    ("eval-max-new-tokens", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "model"), "--safety-data", str(r / "eval.jsonl"), "--max-new-tokens", "0"], "--max-new-tokens: expected an int >= 1"),
    ("eval-batch-size", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "model"), "--safety-data", str(r / "eval.jsonl"), "--batch-size", "0"], "--batch-size: expected an int >= 1"),
    ("eval-dtype", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "model"), "--safety-data", str(r / "eval.jsonl"), "--dtype", "int4"], "--dtype: expected one of"),
    ("eval-obqa-bad-target", lambda r: ["eval", "--out", str(r / "out_eval"), "--model", str(r / "model"), "--task-data", str(r / "obqa.jsonl"), "--task", "openbookqa"], "--task-data: task row 0: target_answer must be answer1..answer4"),
    ("eval-n-task-word", evaluate("--n-task", "many"), "argument --n-task: invalid int value: 'many'"),
    # ------------------------------------------------------------------------------ spard bench
    ("bench-no-source", bench(), "--world / --config: give one of them"),
    ("bench-config-missing", bench("nope"), "--config: cannot read " + F + "nope.yaml"),
    ("bench-config-bad-yaml", bench("bad"), "--config: " + F + "bad.yaml is not valid YAML/JSON"),
    ("bench-config-list", bench("list"), "--config: " + F + "list.yaml must hold a mapping"),
    ("bench-config-lacks", bench("bench_lacks"), "--config: " + F + "bench_lacks.yaml lacks task"),
    ("bench-defense-unknown", bench("bench", "--defenses", "sft,nope"), "defenses: unknown ['nope']"),
    ("bench-composition-unknown-member", bench("bench", "--defenses", "sft,antibody+nope"), "defenses: defense 'antibody+nope': unknown member 'nope'"),
    ("bench-composition-conflict", bench("bench", "--defenses", "lisa+bds"), "defenses: defense 'lisa+bds': lisa and bds conflict: both own the step's loss"),
    ("bench-composition-not-a-member", bench("bench_composition_setting"), "defense_settings.antibody+spard: defense 'antibody+spard': settings for 'lisa', which is not a member"),
    ("bench-ratios-word", bench("bench", "--ratios", "a,b"), "--ratios: expected a comma-separated list of floats"),
    ("bench-ratios-negative", bench("bench", "--ratios", "-0.1"), "ratios: expected numbers >= 0"),
    ("bench-ratios-nan", bench("bench", "--ratios", "nan"), "ratios: expected"),
    ("bench-seeds-float", bench("bench", "--seeds", "1.5"), "--seeds: expected a comma-separated list of ints"),
    ("bench-lr-inf", bench("bench_lrinf"), "optim.lr: expected a finite number"),
    ("bench-grad-norm-negative", bench("bench_gradneg"), "optim.max_grad_norm: expected None"),
    ("bench-unknown-setting", bench("bench_unknown"), "bench settings: unknown key(s) ['warmup']"),
    ("bench-attacks-list", bench("bench_attacks_list"), "attacks: name at least one attack corpus"),
    ("bench-model-no-config", bench("bench_nomodel"), "model: " + F + "nomodel is not a model folder"),
    ("bench-lora-r", bench("bench_lora"), "lora.r: expected an int >= 1"),
    ("bench-max-new-tokens", bench("bench_tokens"), "max_new_tokens: expected an int >= 1"),
    ("bench-task-missing", bench("bench_notask"), "task: " + F + "missing.jsonl: no such file"),
    ("bench-booster-needs-unsafe", bench("bench_booster"), "safety_pool: defense(s) booster train against harmful answers"),
    ("bench-eval-no-prompt", bench("bench_noprompt"), "eval_prompts: " + F + "noprompt.jsonl:1: no prompt field"),
    ("bench-attack-overlaps-eval", bench("bench_overlap_eval"), "attacks.a: attack corpus (" + F + "attack.jsonl): 6 row(s) overlap the evaluation items (" + F + "attack.jsonl), e.g. " + F + "attack.jsonl: row 0"),
    ("bench-on-overlap", bench("bench_on_overlap"), "on_overlap: expected error | drop, got 'ignore'"),
    ("bench-ratio-unfillable", bench("bench", "--ratios", "0.1,0.9"), "ratios: 0.9 of 20 clean rows needs 18 harmful rows, but " + F + "attack.jsonl has only 6 usable"),
    ("bench-n-task-zero", bench("bench_n_task_zero"), "n_task: expected an int >= 1, got 0"),
    ("bench-n-eval-zero", bench("bench_n_eval_zero"), "n_eval: expected an int >= 1, got 0"),
    ("bench-judge-unknown", bench("bench_judge"), "judge: expected one of refusal, moderation, guard, rubric, got 'nope'"),
    ("bench-judge-no-model", bench("bench_judge_model"), "judge_model: the moderation judge needs a model"),
    ("bench-duplicates", bench("bench_duplicates"), "duplicates: expected drop | error, got 'keep'"),
    ("bench-defense-setting-unknown", bench("bench_defense_setting"), "defense_settings.sft: defense 'sft': unknown setting(s) ['bogus']"),
    ("bench-defense-setting-not-in-grid", bench("bench_defense_not_in_grid"), "defense_settings: 'lisa' is not a defense of the grid (sft)"),
    ("bench-quick-and-full", lambda r: ["bench", "--world", "--quick", "--full", "--out", str(r / "out_bench")], "--quick / --full: give one of them"),
    ("bench-judges-empty", bench("bench", "--judges", ""), "--judges: empty list"),
    ("bench-out-file", lambda r: ["bench", "--world", "--out", str(r / "a_file")], "--out: " + F + "a_file exists and is not a folder"),
    ("bench-summarize-nothing", lambda r: ["bench", "--summarize-only", "--out", str(r / "out_bench_empty")], F + "out_bench_empty: no finished cells to summarise"),
    ("bench-threads-zero", bench("bench", "--threads", "0"), "--threads: expected an int >= 1"),
    ("bench-world-and-config", lambda r: ["bench", "--world", "--config", str(r / "bench.yaml"), "--out", str(r / "out_bench")], "argument --config: not allowed with argument --world"),
    # ------------------------------------------------------------------------------- spard demo
    ("demo-seeds-zero", demo("--seeds", "0"), "--seeds: expected an int >= 1"),
    ("demo-seeds-word", demo("--seeds", "abc"), "argument --seeds: invalid int value: 'abc'"),
    ("demo-ratio-high", demo("--ratio", "1.5"), "--ratio: expected a number in [0, 1]"),
    ("demo-ratio-nan", demo("--ratio", "nan"), "--ratio: expected a number in [0, 1]"),
    ("demo-lr-inf", demo("--lr", "inf"), "--lr: expected a finite number > 0"),
    ("demo-lr-zero", demo("--lr", "0"), "--lr: expected a finite number > 0"),
    ("demo-epochs-inf", demo("--epochs", "inf"), "--epochs: expected a finite number > 0"),
    ("demo-threads-zero", demo("--threads", "0"), "--threads: expected an int >= 1"),
    ("demo-max-step-negative", demo("--max-step", "-1"), "--max-step: expected 'none', 'lr' or a number >= 0"),
    ("demo-max-step-word", demo("--max-step", "huge"), "--max-step: expected 'none', 'lr' or a number >= 0"),
    ("demo-out-file", lambda r: ["demo", "--out", str(r / "a_file")], "--out: " + F + "a_file exists and is not a folder"),
    ("demo-cache-file", demo("--cache", "{r}/a_file"), "--cache: " + F + "a_file exists and is not a folder"),
    # ---------------------------------------------------------------------------- the command line
    ("cli-unknown-command", lambda r: ["trian"], "argument COMMAND: invalid choice: 'trian'"),
]


def _fill(items, r):
    return [str(x).replace("{r}", str(r)) for x in items]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_line(case, root, capsys):
    name, argv, expected = case
    argv = _fill(argv(root), root)
    command = argv[0]
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err + captured.out
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    prefix = "spard: error: " if name.startswith("cli-") else f"spard {command}: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert expected.replace("{r}", str(root)) in lines[0], lines[0]


def test_debug_shows_the_traceback(root):
    with pytest.raises(ValueError, match="optim.lr"):
        main(["--debug", "train", "--config", str(root / "run.yaml"), "--set", "optim.lr=inf"])
    with pytest.raises(ValueError, match="optim.lr"):
        main(["train", "--debug", "--config", str(root / "run.yaml"), "--set", "optim.lr=inf"])


def test_nothing_was_written_where_outputs_were_refused(root):
    assert (root / "a_file").read_text() == "x"
    assert not (root / "out_select").exists() and not (root / "out_eval").exists()
    assert not list((root / "other_run").glob("*.json"))[1:]  # only its own spard_run.json


def test_a_cuda_device_on_a_machine_without_one_is_named(monkeypatch):
    import torch

    from spard.training.preflight import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^--device: 'cuda:1' asked for, but torch sees no CUDA device here"):
        check_device("cuda:1", "--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"^run.device: 'cuda:1' asked for, but this machine has 1 CUDA device"):
        check_device("cuda:1", "run.device")
    for fine in (None, "auto", "cpu", "cuda", "cuda:0"):
        check_device(fine, "--device")
