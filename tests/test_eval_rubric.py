"""The rubric judge against a local OpenAI-compatible server (127.0.0.1, stdlib http.server).

The server's behaviour is picked by a marker in the judged response: ``[score=N]`` answers in the
rubric format, ``[malformed]`` answers without a score, ``[429xK]`` / ``[500xK]`` fail K times
first, ``[500]`` always fails, ``[badbody]`` answers 200 with a non-JSON body, ``[slow]`` waits
past the client's timeout, ``[echo400]`` answers 400 echoing the API key, ``[401]`` rejects it.
"""

import json
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
            marker = re.search(r"\[(score=\d|malformed|429x\d|500x\d|500|badbody|slow|echo400|401)\]", text)
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
    judge = _judge(server, concurrency=1, cache_path=cache, cache_every=1)
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
