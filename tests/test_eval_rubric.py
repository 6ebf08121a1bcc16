"""The rubric judge against a local OpenAI-compatible server (127.0.0.1, stdlib http.server).

The server's behaviour is picked by a marker in the judged response: ``[score=N]`` answers in the
rubric format, ``[malformed]`` answers without a score, ``[429xK]`` / ``[500xK]`` fail K times
first, ``[500]`` always fails, ``[badbody]`` answers 200 with a non-JSON body, ``[slow]`` waits
past the client's timeout, ``[echo400]`` answers 400 echoing the API key, ``[echo200]`` answers
with the key in its reply text, ``[401]`` rejects it. ``answer_limit`` makes the server hold every
request after that many answers until ``release`` is set (requests held are never answered, so
never paid for).
"""

import json
import os
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from spard.eval import JudgeUnavailable, RubricJudge, make_judge, parse_rubric_score, safety_metrics

KEY_ENV = "SPARD_TEST_JUDGE_KEY"
KEY = "sk-test-4f8a1c-secret"


class FakeAPI:
    def __init__(self):
        self.calls = Counter()  # marker -> requests
        self.auth = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.delay = 0.0
        self.answered = Counter()  # judged response text -> replies sent (what would be paid for)
        self.received = 0
        self.admitted = 0  # requests let through to be answered
        self.answer_limit = None
        self.release = threading.Event()


def _handler(api: FakeAPI):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def _send(self, status, body, content_type="application/json"):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except BrokenPipeError:  # the client timed out first (the [slow] case)
                pass

        def do_GET(self):
            if self.headers.get("Authorization") != f"Bearer {KEY}":
                return self._send(401, {"error": "bad key"})
            self._send(200, {"data": [{"id": "judge-model"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            api.auth.add(self.headers.get("Authorization"))
            assert body["temperature"] == 0 and body["model"] == "judge-model"
            text = body["messages"][-1]["content"]
            pair = re.search(r"Model response: (.*)", text).group(1)
            with api.lock:
                api.received += 1
                hold = api.answer_limit is not None and api.admitted >= api.answer_limit
                api.admitted += not hold
            if hold:  # held, then dropped unanswered (the client is gone by then)
                api.release.wait(timeout=20)
                return self._send(503, {"error": "dropped"})
            marker = re.search(r"\[(score=\d|malformed|429x\d|500x\d|500|badbody|slow|echo400|echo200|401)\]", text)
            marker = marker.group(1) if marker else "score=1"
            with api.lock:
                api.calls[marker] += 1
                n = api.calls[marker]
                api.in_flight += 1
                api.max_in_flight = max(api.max_in_flight, api.in_flight)
            try:
                time.sleep(api.delay)
                if marker == "slow":
                    time.sleep(1.0)
                m = re.fullmatch(r"(429|500)x(\d)", marker)
                if m and n <= int(m.group(2)):
                    return self._send(int(m.group(1)), {"error": "try later"})
                if marker == "500":
                    return self._send(500, {"error": "down"})
                if marker == "badbody":
                    return self._send(200, b"<html>gateway</html>", "text/html")
                if marker == "echo400":
                    return self._send(400, {"error": f"Incorrect API key provided: {KEY}"})
                if marker == "401":
                    return self._send(401, {"error": "bad key"})
                score = marker.split("=")[1] if marker.startswith("score=") else "5"
                content = ("I would rather not say." if marker == "malformed"
                           else f"#thereason: the response was judged.\n#thescore: {score}")
                if marker == "echo200":
                    content = f"#thereason: your key is {self.headers.get('Authorization')}\n#thescore: 2"
                with api.lock:
                    api.answered[pair] += 1
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})
            finally:
                with api.lock:
                    api.in_flight -= 1

    return Handler


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    api = FakeAPI()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    api.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield api
    api.release.set()
    httpd.shutdown()
    httpd.server_close()


def _judge(api, **kw):
    opts = dict(base_url=api.base_url, api_key_env=KEY_ENV, backoff=0.01, max_retries=3, timeout=5.0,
                progress=False)
    opts.update(kw)
    return RubricJudge("judge-model", **opts)


def test_parse_rubric_score():
    assert parse_rubric_score("#thereason: x\n#thescore: 4") == 4
    assert parse_rubric_score("#thescore: **2**\n") == 2
    assert parse_rubric_score("#thescore: 1 ... final #thescore: 5") == 5
    assert parse_rubric_score("3") == 3 and parse_rubric_score(" 4/5 ") == 4
    for bad in ["", "#thescore: 7", "#thescore: 2.5", "I think 4 out of 5", "#thescore: high"]:
        assert parse_rubric_score(bad) is None


def test_scores_asr_hs_and_unparseable(server):
    judge = _judge(server)
    judge.check()
    responses = ["a [score=1]", "b [score=5]", "c [score=3]", "d [score=2]", "e [malformed]"]
    verdicts = judge.judge(["q"] * 5, responses)
    assert [v.score for v in verdicts] == [1.0, 5.0, 3.0, 2.0, None]
    assert [v.harmful for v in verdicts] == [False, True, True, False, None]
    m = safety_metrics(verdicts, responses, hs=judge.hs_kind)
    assert m["asr"] == pytest.approx(0.5) and m["hs"] == pytest.approx(2.75)
    assert m["unparseable"] == 1 and m["failed_calls"] == 0
    assert server.auth == {f"Bearer {KEY}"}


def test_retries_on_429_and_5xx_then_gives_up(server):
    judge = _judge(server, max_retries=3)
    v = judge.judge(["q"] * 4, ["[429x2]", "[500x1]", "[500]", "[badbody]"])
    assert v[0].score == 5.0 and v[1].score == 5.0
    assert server.calls["429x2"] == 3 and server.calls["500x1"] == 2
    assert v[2].harmful is None and "gave up after 4 attempts" in v[2].error and server.calls["500"] == 4
    assert v[3].harmful is None and "malformed response body" in v[3].error
    assert safety_metrics(v)["failed_calls"] == 2


def test_timeout_is_retried_then_reported(server):
    judge = _judge(server, timeout=0.2, max_retries=1)
    start = time.monotonic()
    (v,) = judge.judge(["q"], ["[slow]"])
    assert v.harmful is None and "Timeout" in v.error
    assert server.calls["slow"] == 2 and time.monotonic() - start < 1.5


def test_concurrency_limit(server):
    server.delay = 0.05
    judge = _judge(server, concurrency=3)
    v = judge.judge(["q"] * 12, [f"r{i} [score=2]" for i in range(12)])
    assert all(x.score == 2.0 for x in v)
    assert 2 <= server.max_in_flight <= 3


def test_cache_resumes_an_interrupted_run(server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    prompts = ["q"] * 4
    first = ["r0 [score=4]", "r1 [score=1]", "r2 [malformed]", "r3 [401]"]
    judge = _judge(server, concurrency=1, cache_path=cache)
    with pytest.raises(JudgeUnavailable, match="rejected the API key"):
        judge.judge(prompts, first)  # the run dies on the 4th pair
    assert len(cache.read_text().splitlines()) == 3
    resumed = ["r0 [score=4]", "r1 [score=1]", "r2 [malformed]", "r3 [score=5]"]
    before = sum(server.calls.values())
    v = _judge(server, cache_path=cache).judge(prompts, resumed)
    assert sum(server.calls.values()) - before == 1  # only the pair that was never answered
    assert [x.score for x in v] == [4.0, 1.0, None, 5.0]
    again = _judge(server, cache_path=cache)
    assert [x.score for x in again.judge(prompts, resumed)] == [4.0, 1.0, None, 5.0]
    assert again.stats["requests"] == 0 and again.stats["cache_hits"] == 4


def test_key_is_never_logged(server, capsys, caplog):
    judge = _judge(server, max_retries=0)
    (v,) = judge.judge(["q"], ["[echo400]"])
    assert v.harmful is None and "HTTP 400" in v.error and "***" in v.error
    text = " ".join([v.error, repr(judge), json.dumps(judge.describe())])
    captured = capsys.readouterr()
    assert KEY not in text + captured.out + captured.err + caplog.text


def test_unusable_judge_fails_in_check(server, monkeypatch):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(JudgeUnavailable, match="cannot reach"):
        _judge(server, base_url=f"http://127.0.0.1:{closed}/v1").check()
    monkeypatch.setenv("SPARD_TEST_OTHER_KEY", "wrong")
    with pytest.raises(JudgeUnavailable, match=r"rejected the API key from \$SPARD_TEST_OTHER_KEY"):
        _judge(server, api_key_env="SPARD_TEST_OTHER_KEY").check()
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeUnavailable, match=f"{KEY_ENV}, which is not set"):
        _judge(server).check()


def test_bad_arguments():
    with pytest.raises(ValueError, match="concurrency"):
        RubricJudge("m", concurrency=0)
    with pytest.raises(ValueError, match="base_url"):
        RubricJudge("m", base_url="localhost:8000")
    with pytest.raises(ValueError, match="needs the API's model name"):
        make_judge("rubric")
    with pytest.raises(ValueError, match="judge must be one of"):
        make_judge("gpt")


def test_spard_eval_rejudges_with_the_rubric(server, tmp_path, capsys):
    from spard.cli import main as spard_main
    from spard.eval import save_generations

    prompts = ["q1", "q2", "q3", "q4"]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "out"
    save_generations(out / "safety_generations.jsonl", prompts, ["[score=5]", "[score=1]", "[malformed]", "[score=4]"])
    args = ["eval", "--rejudge", "--out", str(out), "--safety-data", str(data), "--judge", "rubric",
            "--judge-model", "judge-model", "--judge-base-url", server.base_url, "--judge-api-key-env", KEY_ENV]
    assert spard_main(args) == 0
    s = json.loads((out / "eval.json").read_text())["safety"]
    assert (s["asr"], s["hs"], s["unparseable"], s["n"]) == (pytest.approx(2 / 3), pytest.approx(10 / 3), 1, 4)
    assert "| HS | 3.33 |" in (out / "eval.md").read_text()
    assert len((out / "rubric_cache.jsonl").read_text().splitlines()) == 4
    calls = sum(server.calls.values())
    assert spard_main(args) == 0 and sum(server.calls.values()) == calls  # all from the cache
    assert KEY not in capsys.readouterr().out + (out / "eval.json").read_text()


# ----------------------------------------------------------------------------------------------
# The key: stripped, checked, never shown; replies stored as they arrive; Ctrl-C; shared caches
# ----------------------------------------------------------------------------------------------
def test_key_with_newline_or_spaces_is_stripped_or_refused_and_never_shown(server, monkeypatch, capsys):
    for raw in (KEY + "\n", KEY + "\r\n", "  " + KEY + " \t"):  # a CRLF .env file, stray spaces
        monkeypatch.setenv(KEY_ENV, raw)
        judge = _judge(server)
        judge.check()
        assert judge.judge(["q"], [f"x{len(raw)} [score=4]"])[0].score == 4.0
    assert server.auth == {f"Bearer {KEY}"}
    for bad, kind in ((KEY[:6] + " " + KEY[6:], "whitespace"), (KEY[:6] + "\n" + KEY[6:], "whitespace"),
                      (KEY[:6] + "\x1b" + KEY[6:], "control")):
        monkeypatch.setenv(KEY_ENV, bad)
        with pytest.raises(JudgeUnavailable, match=f"API key in \\${KEY_ENV} has {kind}") as info:
            _judge(server).check()
        assert KEY[6:] not in str(info.value) and KEY[:6] not in str(info.value)


def test_a_server_echoing_the_key_never_gets_it_stored(server, tmp_path, capsys):
    from spard.cli import main as spard_main
    from spard.eval import save_generations

    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "q1"}) + "\n" + json.dumps({"prompt": "q2"}) + "\n")
    out = tmp_path / "out"
    save_generations(out / "safety_generations.jsonl", ["q1", "q2"], ["[echo200]", "[echo400]"])
    args = ["eval", "--rejudge", "--out", str(out), "--safety-data", str(data), "--judge", "rubric",
            "--judge-model", "judge-model", "--judge-base-url", server.base_url, "--judge-api-key-env", KEY_ENV,
            "--judge-retries", "0"]
    assert spard_main(args) == 0
    captured = capsys.readouterr()
    written = "".join(p.read_text() for p in out.iterdir() if p.is_file())
    assert "your key is Bearer ***" in written  # the reply was kept, the key was not
    assert KEY not in written + captured.out + captured.err


def test_bad_key_ends_spard_eval_in_one_line_without_it(server, tmp_path, monkeypatch, capsys):
    from spard.cli import main as spard_main

    monkeypatch.setenv(KEY_ENV, KEY[:6] + "\n" + KEY[6:])
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "q1"}) + "\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "safety_generations.jsonl").write_text(json.dumps({"prompt": "q1", "response": "r"}) + "\n")
    rc = spard_main(["eval", "--rejudge", "--out", str(tmp_path / "out"), "--safety-data", str(data),
                     "--judge", "rubric", "--judge-model", "judge-model", "--judge-base-url", server.base_url,
                     "--judge-api-key-env", KEY_ENV])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("spard eval: error: the API key in $")
    assert KEY[6:] not in err


def test_bench_cell_error_files_never_hold_the_key(server, tmp_path, monkeypatch):
    from spard import bench
    from spard.bench import BenchData, BenchSettings

    monkeypatch.setenv(KEY_ENV, KEY + "\r\n")

    def runner(cell, data, settings):
        _judge(server).check()  # reads (and registers) the key
        raise RuntimeError(f"Invalid header value b'Bearer {os.environ[KEY_ENV]!r}'")  # any route to a message

    data = BenchData(model=None, tokenizer=None, task=[], task_test=[], eval_prompts=[], safety_pool=[],
                     attacks={"a": [{"prompt": "p", "unsafe": "u"}]})
    status = bench.run_grid(data, BenchSettings(defenses=["sft"]), tmp_path, progress=False, cell_runner=runner)
    assert len(status["failed"]) == 1
    text = "".join(p.read_text() for p in (tmp_path / "cells").rglob("*.error.json"))
    assert "Invalid header value" in text and KEY not in text


SPAWN = """
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
from spard.eval import RubricJudge
a = json.loads(sys.argv[2])
judge = RubricJudge("judge-model", base_url=a["url"], api_key_env=a["env"], concurrency=a["concurrency"],
                    cache_path=a["cache"], progress=False, backoff=0.01, timeout=30, max_retries=0)
judge.judge(["q"] * len(a["responses"]), a["responses"])
print("done", flush=True)
"""


def _spawn(api, cache, responses, concurrency):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    paths = json.dumps([str(root / "python"), str(root)])
    spec = json.dumps({"url": api.base_url, "env": KEY_ENV, "concurrency": concurrency, "cache": str(cache),
                       "responses": responses})
    # SIGINT back to its default first: a parent that ignores it (a background job, some CI
    # runners) would pass the ignore on, and Python keeps an inherited ignore (no Ctrl-C at all).
    import signal
    return subprocess.Popen([sys.executable, "-c", SPAWN, paths, spec], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _until(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def _cache_keys(cache):
    rows = [json.loads(line) for line in cache.read_text().splitlines() if line.strip()]
    return [r["key"] for r in rows]


def test_killed_mid_judging_then_rerun_asks_no_pair_twice(server, tmp_path):
    import signal

    cache = tmp_path / "cache.jsonl"
    responses = [f"k{i} [score={1 + i % 5}]" for i in range(24)]
    server.answer_limit = 10  # then every request is held: 4 in flight when the kill comes
    proc = _spawn(server, cache, responses, concurrency=4)
    _until(lambda: sum(server.answered.values()) == 10 and server.received == 14)
    _until(lambda: cache.exists() and len(_cache_keys(cache)) == 10, timeout=5)  # each reply stored as it came
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    server.answer_limit = None
    server.release.set()
    verdicts = _judge(server, cache_path=cache).judge(["q"] * len(responses), responses)
    assert [v.score for v in verdicts] == [float(1 + i % 5) for i in range(24)]
    assert set(server.answered) == set(responses) and max(server.answered.values()) == 1  # none paid twice


def test_ctrl_c_cancels_queued_requests_and_keeps_every_answered_reply(server, tmp_path):
    import signal

    cache = tmp_path / "cache.jsonl"
    server.delay = 0.4  # slow enough that a loaded machine still signals before 12 requests
    responses = [f"c{i} [score=1]" for i in range(40)]
    proc = _spawn(server, cache, responses, concurrency=2)
    _until(lambda: sum(server.answered.values()) >= 4)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=10)
    sent = server.received
    time.sleep(0.5)
    assert server.received == sent < 12  # the queued requests were not sent
    assert len(_cache_keys(cache)) == sum(server.answered.values())  # in-flight replies kept too
    assert "done" not in proc.stdout.read()


def test_two_processes_sharing_a_cache_keep_all_replies(server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    server.delay = 0.01
    a = [f"a{i} [score=2]" for i in range(15)]
    b = [f"b{i} [score=3]" for i in range(15)]
    common = [f"s{i} [score=4]" for i in range(5)]
    procs = [_spawn(server, cache, a + common, 3), _spawn(server, cache, common + b, 3)]
    for p in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read()
    assert len(set(_cache_keys(cache))) == 35
    again = _judge(server, cache_path=cache)
    verdicts = again.judge(["q"] * 35, a + b + common)
    assert again.stats["requests"] == 0 and all(v.score is not None for v in verdicts)


def test_a_line_cut_short_by_a_crash_is_skipped(server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    first = _judge(server, cache_path=cache)
    first.judge(["q", "q"], ["t1 [score=2]", "t2 [score=3]"])
    cache.write_bytes(cache.read_bytes() + b'{"key": "abc", "rep')  # killed mid-write
    judge = _judge(server, cache_path=cache)
    assert [v.score for v in judge.judge(["q", "q", "q"], ["t1 [score=2]", "t2 [score=3]", "t3 [score=5]"])] == [2.0, 3.0, 5.0]
    assert judge.stats["requests"] == 1
    lines = cache.read_text().splitlines()
    assert lines[2] == '{"key": "abc", "rep' and json.loads(lines[3])["reply"].endswith("5")
    assert [v.score for v in _judge(server, cache_path=cache).judge(["q"], ["t3 [score=5]"])] == [5.0]


def test_sigterm_stops_spard_eval_like_ctrl_c(server, tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from spard.eval import save_generations

    root = Path(__file__).resolve().parents[1]
    prompts = [f"q{i}" for i in range(40)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "out"
    save_generations(out / "safety_generations.jsonl", prompts, [f"t{i} [score=2]" for i in range(40)])
    server.delay = 0.4  # slow enough that a loaded machine still signals before 12 requests
    env = {**os.environ, "PYTHONPATH": f"{root / 'python'}:{root}"}
    proc = subprocess.Popen([sys.executable, "-m", "spard", "eval", "--rejudge", "--out", str(out), "--safety-data",
                             str(data), "--judge", "rubric", "--judge-model", "judge-model", "--judge-base-url",
                             server.base_url, "--judge-api-key-env", KEY_ENV, "--judge-concurrency", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _until(lambda: sum(server.answered.values()) >= 4)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 130
    assert proc.stderr.read().strip().splitlines()[-1] == "spard eval: interrupted"
    sent = server.received
    time.sleep(0.3)
    assert server.received == sent < 12
    assert len(_cache_keys(out / "rubric_cache.jsonl")) == sum(server.answered.values())
