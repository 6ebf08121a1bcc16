"""The `openai` generation backend against a real OpenAI-compatible server on 127.0.0.1
(spard.eval.mini_server, a subprocess serving the world's model and a LoRA adapter trained on
it): the same answers as the hf backend, an ignored adapter caught, a killed server resumed
asking only for what is missing, and bad servers refused in one line with nothing cached."""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from spard.eval import evaluate
from spard.eval.evaluate import GENERATION_CACHE
from spard.eval.generate import load_model, write_base_fingerprint
from spard.eval.serving import (AdapterIgnored, OpenAIGenerator, Served, ServerError, ServerUnavailable,
                                adapter_name, check_servable, load_for_serving, serving_refusal)

N_SAFETY, N_TASK, NEW = 12, 8, 24


@pytest.fixture(scope="module")
def world_files(tmp_path_factory):
    """The world's model and tokenizer as a folder, and an SFT adapter trained on its harmful rows."""
    from spard.config import LoraConfig, OptimConfig
    from spard.defenses import DefenseData, make_defense
    from spard.trainer import run_defense
    from spard.world import WorldSettings, build_world

    w = build_world(WorldSettings(), progress=False)
    root = tmp_path_factory.mktemp("served")
    w.model.save_pretrained(root / "model")
    w.tokenizer.save_pretrained(root / "model")
    rows = [{"prompt": r["prompt"], "response": r["unsafe"]} for r in w.data["harmful_train"][:48]]
    torch.manual_seed(0)
    peft_model, _ = run_defense(make_defense("sft"), copy.deepcopy(w.model), w.tokenizer,
                                DefenseData(user=rows, max_length=96),
                                optim=OptimConfig(lr=1e-2, epochs=8.0, batch_size=16, warmup_steps=0),
                                lora=LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
                                progress=False)
    peft_model.save_pretrained(root / "adapter")
    write_base_fingerprint(root / "adapter", peft_model)
    return {"model": root / "model", "adapter": root / "adapter",
            "safety": [r["prompt"] for r in w.data["harmful_test"][:N_SAFETY]], "task": w.data["task_test"][:N_TASK]}


class Server:
    def __init__(self, model: Path, *extra: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "spard.eval.mini_server", "--model", str(model),
                                      "--served-model-name", "world", "--port", "0", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("serving"):
            self.proc.kill()
            raise RuntimeError(f"the test server did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.url = line.split(" on ")[1].strip()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def server(world_files):
    s = Server(world_files["model"])
    yield s
    s.stop()


def _client(url, **kw):
    return OpenAIGenerator(url, batch_size=4, concurrency=2, timeout=60, max_retries=1, backoff=0.01,
                           progress=False, **kw)


def _evaluate(model, tok, files, out=None, backend=None):
    return evaluate(model, tok, safety_prompts=files["safety"], task_rows=files["task"], max_new_tokens=NEW,
                    task_max_new_tokens=NEW, batch_size=4, out_dir=out, backend=backend)


def _answers(out: Path) -> list[str]:
    rows = [json.loads(x) for x in (out / "safety_generations.jsonl").read_text().splitlines()]
    rows += [json.loads(x) for x in (out / "task_generations.jsonl").read_text().splitlines()]
    return [r["response"] for r in rows]


def test_openai_backend_gives_the_hf_backends_answers(world_files, server, tmp_path):
    files = world_files
    shim, tok = load_for_serving(str(files["model"]), str(files["adapter"]))
    client = _client(server.url)
    client.check("world")
    name = client.register_adapter(files["adapter"])
    assert name == adapter_name(files["adapter"]) and name in client.served_models()
    served = Served(client, base="world", adapter=name)
    res = _evaluate(shim, tok, files, tmp_path / "openai", served)
    assert res["generation"]["adapter_check"] == "passed" and res["generation"]["backend"] == "openai"
    # hf: the same adapter, unmerged (as the bench evaluates a cell) and merged (as spard eval loads it)
    for merge in (False, True):
        model, tok_hf = load_model(str(files["model"]), str(files["adapter"]), device="cpu", merge=merge)
        _evaluate(model, tok_hf, files, tmp_path / f"hf{merge}")
        assert _answers(tmp_path / f"hf{merge}") == _answers(tmp_path / "openai"), f"merge={merge}"
    # the base model alone, and prompts sent as text instead of token ids
    base_hf, _ = load_model(str(files["model"]), device="cpu")
    _evaluate(base_hf, tok, files, tmp_path / "hf-base")
    _evaluate(shim, tok, files, tmp_path / "openai-base", Served(client, base="world"))
    assert _answers(tmp_path / "hf-base") == _answers(tmp_path / "openai-base")
    assert _answers(tmp_path / "hf-base") != _answers(tmp_path / "openai")  # the adapter matters
    text = Served(_client(server.url, prompt_format="text"), base="world", adapter=name)
    _evaluate(shim, tok, files, tmp_path / "openai-text", text)
    assert _answers(tmp_path / "openai-text") == _answers(tmp_path / "openai")


def test_an_ignored_adapter_is_caught_and_the_check_can_be_turned_off(world_files, tmp_path):
    files = world_files
    s = Server(files["model"], "--ignore-adapters")
    try:
        shim, tok = load_for_serving(str(files["model"]), str(files["adapter"]))
        client = _client(s.url)
        name = client.register_adapter(files["adapter"])
        with pytest.raises(AdapterIgnored, match=f"ignored adapter '{name}': its answers to all 4 probe prompts"):
            _evaluate(shim, tok, files, tmp_path / "a", Served(client, base="world", adapter=name))
        cache = tmp_path / "a" / GENERATION_CACHE
        assert len(cache.read_text().splitlines()) == 4  # the base's probe answers only
        res = _evaluate(shim, tok, files, tmp_path / "b", Served(client, base="world", adapter=name, check=False))
        assert res["generation"]["adapter_check"] == "off"
    finally:
        s.stop()


def test_a_server_killed_mid_evaluation_is_asked_only_for_what_is_missing(world_files, tmp_path):
    files = world_files
    shim, tok = load_for_serving(str(files["model"]), str(files["adapter"]))
    out = tmp_path / "eval"
    s = Server(files["model"], "--exit-after", "4")  # probes (2 requests), then 2 of the safety requests
    try:
        client = _client(s.url, )
        client.concurrency = 1
        name = client.register_adapter(files["adapter"])
        with pytest.raises(ServerError, match="gave up after 2 attempts"):
            _evaluate(shim, tok, files, out, Served(client, base="world", adapter=name))
    finally:
        s.stop()
    kept = len((out / GENERATION_CACHE).read_text().splitlines())
    assert kept == 4 + 4 + 8  # the probes of the base and the adapter, then 2 safety requests x 4
    s = Server(files["model"])
    try:
        client = _client(s.url)
        name = client.register_adapter(files["adapter"])
        res = _evaluate(shim, tok, files, out, Served(client, base="world", adapter=name))
    finally:
        s.stop()
    assert client.stats["prompts"] == N_SAFETY + N_TASK - 12  # the probes and the answered rows not asked again
    assert res["generation"]["adapter_check"] == "passed"
    assert len(_answers(out)) == N_SAFETY + N_TASK


def test_defenses_that_change_the_forward_pass_are_refused():
    from spard.defenses import make_defense

    assert serving_refusal(make_defense("sft")) is None and serving_refusal(make_defense("antibody")) is None
    assert "alignment stage" in serving_refusal(make_defense("booster"))
    assert "alignment stage" in serving_refusal(make_defense("antibody-align"))
    assert "after fine-tuning" in serving_refusal(make_defense("antidote"))  # a post-training repair
    assert serving_refusal(make_defense("antibody+spard")) is None  # composed: each member's stages
    assert "'antidote' edits the weights" in serving_refusal(make_defense("spard+antidote"))
    with pytest.raises(ValueError, match="^--gen-backend openai: defense 'booster' changes"):
        check_servable([make_defense("spard"), make_defense("booster")])


# ------------------------------------------------------------------------------------ bad servers
class _Fake:
    """A server on 127.0.0.1 answering every GET and POST with ``reply(method, path, body)``."""

    def __init__(self, reply):
        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _go(self, method):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                status, ctype, data = reply(method, self.path, body)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._go("GET")

            def do_POST(self):
                self._go("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _models(*names):
    return json.dumps({"object": "list", "data": [{"id": n, "object": "model"} for n in names]}).encode()


def test_a_server_that_does_not_answer_is_one_line():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts connections, never replies
    try:
        client = OpenAIGenerator(f"http://127.0.0.1:{silent.getsockname()[1]}/v1", timeout=0.5)
        with pytest.raises(ServerUnavailable, match="^cannot reach the generation server at .*timed out"):
            client.check("world")
    finally:
        silent.close()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(ServerUnavailable, match="^cannot reach the generation server at .*refused"):
        OpenAIGenerator(f"http://127.0.0.1:{port}/v1", timeout=2).check("world")


def test_a_wrong_model_name_is_one_line(server):
    with pytest.raises(ServerUnavailable, match=r"^model 'wrld' is not served at .* \(it serves: world\)"):
        _client(server.url).check("wrld")


def _one_row_eval(world_files, url, tmp_path):
    shim, tok = load_for_serving(str(world_files["model"]))
    client = _client(url)
    client.max_retries = 0
    return evaluate(shim, tok, safety_prompts=world_files["safety"][:2], max_new_tokens=4, batch_size=4,
                    out_dir=tmp_path, backend=Served(client, base="m"))


def test_an_endpoint_that_is_not_openai_compatible_is_one_line_and_nothing_is_cached(world_files, tmp_path):
    html = _Fake(lambda m, p, b: (200, "text/html", b"<html>welcome</html>"))
    try:
        with pytest.raises(ServerUnavailable, match="is not an OpenAI-compatible endpoint: GET /models gave a reply"):
            _client(html.url).check("m")
        with pytest.raises(ServerError, match="is not a completion"):
            _one_row_eval(world_files, html.url, tmp_path)
    finally:
        html.close()
    missing = _Fake(lambda m, p, b: (404, "application/json", b'{"detail": "Not Found"}'))
    try:
        with pytest.raises(ServerUnavailable, match="GET /models gave HTTP 404"):
            _client(missing.url).check("m")
    finally:
        missing.close()
    no_lora = _Fake(lambda m, p, b: (200, "application/json", _models("m")) if p.endswith("/models")
                    else (404, "application/json", b'{"detail": "Not Found"}'))
    try:  # an engine without run-time adapter loading
        with pytest.raises(ServerUnavailable, match="cannot load adapters at run time .* --gen-adapter-name NAME$"):
            _client(no_lora.url).register_adapter(world_files["adapter"])
    finally:
        no_lora.close()
    assert not (tmp_path / GENERATION_CACHE).exists()


def test_fewer_choices_than_prompts_is_one_line_and_nothing_is_cached(world_files, tmp_path):
    def reply(method, path, body):
        if path.endswith("/models"):
            return 200, "application/json", _models("m")
        return 200, "application/json", json.dumps({"object": "text_completion", "choices": [
            {"index": 0, "text": "Sure."}]}).encode()

    fake = _Fake(reply)
    try:
        with pytest.raises(ServerError, match="has 1 choices for 2 prompts; nothing of it was kept"):
            _one_row_eval(world_files, fake.url, tmp_path)
    finally:
        fake.close()
    assert not (tmp_path / GENERATION_CACHE).exists()


def test_spard_eval_with_the_openai_backend(world_files, server, tmp_path, capsys):
    from spard.cli import main

    data = tmp_path / "harm.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in world_files["safety"][:8]))
    base = ["eval", "--model", str(world_files["model"]), "--adapter", str(world_files["adapter"]),
            "--safety-data", str(data), "--max-new-tokens", "16", "--batch-size", "4"]
    assert main(base + ["--gen-backend", "openai", "--gen-base-url", server.url, "--gen-model", "world",
                        "--out", str(tmp_path / "o")]) == 0
    rec = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert rec["generation"]["adapter_check"] == "passed" and rec["inputs"]["gen_backend"] == "openai"
    assert main(base + ["--out", str(tmp_path / "h")]) == 0
    assert [json.loads(x)["response"] for x in (tmp_path / "o" / "safety_generations.jsonl").read_text().splitlines()] \
        == [json.loads(x)["response"] for x in (tmp_path / "h" / "safety_generations.jsonl").read_text().splitlines()]
    capsys.readouterr()
    assert main(base + ["--gen-backend", "openai", "--gen-base-url", server.url, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not served at" in err[0] and "(it serves: world" in err[0]
    assert main(base + ["--gen-backend", "openai", "--do-sample", "--out", str(tmp_path / "y")]) == 2
    assert "--do-sample: the openai backend decodes greedily only" in capsys.readouterr().err


def _one_sft_cell():
    """A small world bench: its data, settings and its one SFT cell."""
    from spard import bench
    from spard.config import LoraConfig, OptimConfig

    data = bench.world_data(n_task=40, n_eval=8, n_task_test=8, progress=False)
    settings = bench.BenchSettings(defenses=["sft"], ratios=[0.1], max_length=96, max_new_tokens=16,
                                   task_max_new_tokens=16, eval_batch_size=4, save_every=0,
                                   optim=OptimConfig(lr=1e-2, epochs=1.0, batch_size=16, warmup_steps=0),
                                   lora=LoraConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    return data, settings, bench.grid(settings, ["world"])[0]


def test_a_bench_cell_on_the_server_scores_as_the_hf_cell(world_files, server, tmp_path):
    from spard import bench
    from spard.eval.serving import CellServing

    data, settings, cell = _one_sft_cell()
    client = _client(server.url)
    served = bench.run_cell(cell, data, settings, out_dir=tmp_path / "o", fingerprint="f",
                            serving=CellServing(client, base="world", check=False))
    local = bench.run_cell(cell, data, settings, out_dir=tmp_path / "h", fingerprint="f")
    assert (served["asr"], served["accuracy"]) == (local["asr"], local["accuracy"])
    gen = served["evaluation"]["generation"]
    assert gen["backend"] == "openai" and gen["adapter_check"] == "off" and gen["adapter"].startswith("spard-")
    rows = (tmp_path / "o" / "generations" / cell.key / "safety_generations.jsonl").read_text().splitlines()
    assert len(rows) == 8 and "harmful" in json.loads(rows[0])  # answers and verdicts, for rejudging
    assert client.served_models() == ["world"]  # the cell's adapter was unloaded


def test_a_bench_cell_on_the_server_in_separate_stages(world_files, server, tmp_path):
    from spard import bench
    from spard.eval.serving import CellServing

    data, settings, cell = _one_sft_cell()
    client = _client(server.url)
    records = {}
    for mode in ("together", "separate"):  # the client goes to the generation process as plain data
        st = bench.run_grid(data, settings, tmp_path / mode, progress=False, stages=mode,
                            serving=CellServing(client, base="world", check=False))
        assert st["failed"] == [] and st["done"] == [cell.key]
        records[mode] = json.loads(cell.path(tmp_path / mode).read_text())
    assert records["separate"]["stages"] == "separate"
    for r in records.values():  # the adapter's served name hashes its folder, which differs between the runs
        assert r["evaluation"]["generation"].pop("adapter").startswith("spard-")
    for k in ("asr", "accuracy", "evaluation"):
        assert records["separate"][k] == records["together"][k]
    assert records["separate"]["evaluation"]["generation"]["backend"] == "openai"
    assert client.served_models() == ["world"]  # the generation process unloaded the cell's adapter


def test_spard_bench_refuses_the_openai_backend_for_a_defense_that_changes_the_forward_pass(tmp_path, capsys):
    from spard.cli import main

    code = main(["bench", "--world", "--defenses", "sft,booster", "--gen-backend", "openai", "--gen-model", "world",
                 "--gen-base-url", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("spard bench: error: --gen-backend openai: defense 'booster' changes the base model's")
