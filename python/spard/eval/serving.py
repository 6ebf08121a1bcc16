"""The `openai` generation backend: answers from an OpenAI-compatible completions server (vLLM,
SGLang, ...) instead of Hugging Face ``generate`` in this process.

Both backends see the same tokens: prompts are rendered here (``spard.formatting``: the chat
template, else the instruction template; left-truncated to the context like ``hf``) and sent to
``/v1/completions`` as token ids, with greedy decoding (temperature 0), the same new-token limit
and the same stop ids (the tokenizer's and the generation config's eos: vLLM's
``stop_token_ids``). Rows are grouped into requests exactly as ``hf`` groups them into batches
(longest first, ``batch_size`` per request), so an exact engine gives ``hf``'s answers.

Adapters are asked for by name: ``register_adapter`` loads a PEFT folder into the running server
(vLLM's ``POST /v1/load_lora_adapter``, under a name derived from the adapter's content, so a
retrained adapter never reuses a stale one), or the user names an adapter the server already
serves (``vllm serve --lora-modules NAME=PATH``, or a merged model folder, ``merge_adapter``).
Before a cell is evaluated, ``Served.verify`` asks a few probe prompts of the base model and of
the adapter: identical answers on every probe mean the server ignored the adapter
(lm-evaluation-harness #2432), and the cell stops.

The client is the rubric judge's (``spard.eval.api_client``: key from an environment variable,
never logged; retries with back-off); answers go through the evaluation's reply cache as they
arrive, so a killed evaluation asks only for what is missing. A reply that is not a completion
(fewer choices than prompts, not JSON, no text) stops the evaluation and nothing of it is kept.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

from tqdm.auto import tqdm

from .api_client import APIClient, Cancelled

__all__ = ["AdapterIgnored", "BACKENDS", "OpenAIGenerator", "Served", "ServerError", "ServerUnavailable",
           "adapter_name", "load_for_serving", "merge_adapter", "serving_refusal"]

BACKENDS = ("hf", "openai")
PROMPT_FORMATS = ("ids", "text")


class ServerUnavailable(RuntimeError):
    """The generation server cannot be used: unreachable, not OpenAI-compatible, key rejected,
    the model not served, adapters not loadable."""


class ServerError(RuntimeError):
    """A request failed for good (after retries), or the server's reply was not a completion."""


class AdapterIgnored(RuntimeError):
    """The server answered the adapter's probes with the base model's answers."""


# ------------------------------------------------------------------------------- which defenses
def serving_refusal(defense) -> str | None:
    """Why ``defense``'s fine-tuned model is not the base model plus one LoRA adapter, which is
    all a server can be given (None: it is). A defense that edits the base's weights before
    fine-tuning (an alignment stage that merges its own adapter: Booster, Antibody with
    ``alignment_stage``) or after it (``after_training``: Antidote-style repairs) changes the
    forward pass of the model the server would load."""
    from spard.defenses.base import Defense

    members = getattr(defense, "members", None)
    if isinstance(members, (list, tuple)) and members:  # composed defenses: each member's own stages
        return next((why for why in map(serving_refusal, members) if why), None)
    cls, name = type(defense), getattr(defense, "NAME", type(defense).__name__)
    if cls.after_training is not Defense.after_training:
        return f"defense {name!r} edits the weights after fine-tuning (after_training)"
    # Antibody's stage is a setting (off by default); other defenses that override it run it.
    if cls.alignment_stage is not Defense.alignment_stage and getattr(defense.settings, "alignment_stage", True):
        return f"defense {name!r} changes the base model's weights in its alignment stage, before the adapter"
    return None


# --------------------------------------------------------------------------------------- client
def adapter_name(adapter_dir: str | os.PathLike) -> str:
    """A served name for a PEFT folder, from its config and weights (a retrained adapter gets a
    new name: a server never answers with an adapter it loaded earlier under the same name)."""
    folder = Path(adapter_dir)
    h = hashlib.sha256()
    for fname in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        p = folder / fname
        if p.is_file():
            from spard.io import file_sha256
            h.update(fname.encode() + file_sha256(p).encode())
    return f"spard-{h.hexdigest()[:16]}"


def _error_text(raw: bytes) -> str:
    """The message of an error reply (vLLM's {"message"} or {"error": {"message"}}), else its text."""
    text = raw.decode("utf-8", "replace")
    try:
        body = json.loads(text)
        if isinstance(body, dict):
            inner = body.get("error") if isinstance(body.get("error"), dict) else body
            if isinstance(inner.get("message"), str):
                return inner["message"]
            if isinstance(body.get("detail"), str):
                return body["detail"]
    except ValueError:
        pass
    return " ".join(text.split())[:200]


class OpenAIGenerator(APIClient):
    """One OpenAI-compatible server: ``base_url`` up to and including ``/v1``; ``api_key_env``
    the variable holding its key (None: no auth); ``concurrency`` requests in flight;
    ``batch_size`` prompts per request; ``prompt_format`` "ids" (token ids: exactly the tokens
    ``hf`` sees; vLLM, SGLang) or "text" (the rendered prompt as text, sent with
    ``add_special_tokens: false``, for engines that take text only)."""

    what = "the generation server"
    Unavailable = ServerUnavailable
    Failed = ServerError

    def __init__(self, base_url: str, *, api_key_env: str | None = None, concurrency: int = 4,
                 timeout: float = 600.0, max_retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
                 batch_size: int = 8, prompt_format: str = "ids", progress: bool = True):
        self._init_client(base_url=base_url, api_key_env=api_key_env, concurrency=concurrency, timeout=timeout,
                          max_retries=max_retries, backoff=backoff, max_backoff=max_backoff)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
        self.batch_size, self.prompt_format, self.progress = batch_size, prompt_format, progress
        self.stats.update({"prompts": 0, "completion_tokens": 0})

    def __repr__(self) -> str:  # no key in here, by construction
        return f"OpenAIGenerator(base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    # ---------------------------------------------------------------------------- models, adapters
    def served_models(self) -> list[str]:
        """The names GET /models lists (the base model and the adapters loaded)."""
        status, raw, _ = self._reach("GET", "/models")
        try:
            ids = [m["id"] for m in json.loads(raw)["data"]] if status == 200 else None
        except (ValueError, KeyError, TypeError):
            ids = None
        if ids is None or not all(isinstance(i, str) for i in ids):
            got = f"HTTP {status}" if status != 200 else "a reply that is not a model list"
            raise ServerUnavailable(f"{self.base_url} is not an OpenAI-compatible endpoint: GET /models gave {got} "
                                    "(the base URL ends in /v1, e.g. http://127.0.0.1:8000/v1)")
        return ids

    def check(self, model: str | None = None) -> None:
        """Reachable, OpenAI-compatible, key accepted, and ``model`` among the served names."""
        served = self.served_models()
        if model is not None and model not in served:
            raise ServerUnavailable(f"model {model!r} is not served at {self.base_url} (it serves: "
                                    f"{', '.join(served) or 'nothing'}); give the served name")

    def register_adapter(self, adapter_dir: str | os.PathLike, name: str | None = None) -> str:
        """Loads a PEFT folder into the server (vLLM: POST /v1/load_lora_adapter; the server
        reads the folder, so it must see the same path) and returns the name to ask for."""
        name = name or adapter_name(adapter_dir)
        if name in self.served_models():
            return name
        path = str(Path(adapter_dir).resolve())
        status, raw, _ = self._reach("POST", "/load_lora_adapter", {"lora_name": name, "lora_path": path})
        message = _error_text(raw)
        if status in (404, 405):
            raise ServerUnavailable(
                f"the generation server at {self.base_url} cannot load adapters at run time (POST /load_lora_adapter: "
                f"HTTP {status}); vLLM: start it with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or "
                "serve the adapter by name (--lora-modules NAME=PATH, or a merged model folder) and pass "
                "--gen-adapter-name NAME")
        if status != 200 and "already" not in message.lower():
            raise ServerError(f"the generation server could not load adapter {path!r} as {name!r} "
                              f"(HTTP {status}: {self._redact(message)})")
        if name not in self.served_models():
            raise ServerError(f"the generation server accepted adapter {name!r} but does not list it in GET /models")
        return name

    def unload_adapter(self, name: str) -> None:
        """Frees the server's adapter slot (vLLM: POST /v1/unload_lora_adapter); quiet when the
        server has no such route or no such adapter."""
        try:
            self._reach("POST", "/unload_lora_adapter", {"lora_name": name})
        except ServerUnavailable:
            pass

    # ---------------------------------------------------------------------------------- completions
    def _body(self, model: str, rows: Sequence[Sequence[int]], tokenizer, max_new_tokens: int,
              stop_ids: Sequence[int]) -> dict:
        body = {"model": model, "max_tokens": max_new_tokens, "temperature": 0.0, "top_p": 1.0, "n": 1,
                "stream": False, "stop_token_ids": list(stop_ids), "skip_special_tokens": True, "ignore_eos": False}
        if self.prompt_format == "ids":
            body["prompt"] = [list(r) for r in rows]
        else:  # the rendered text, special tokens included: the server must not add its own
            body["prompt"] = [tokenizer.decode(list(r), skip_special_tokens=False) for r in rows]
            body["add_special_tokens"] = False
        return body

    def complete(self, model: str, rows: Sequence[Sequence[int]], *, tokenizer, max_new_tokens: int,
                 stop_ids: Sequence[int]) -> list[str]:
        """One request: the answer to each row of token ids (stripped, like ``hf``'s)."""
        n = len(rows)

        def parse(raw: bytes) -> list[str]:
            where = f"the generation server's reply to POST /completions (model {model!r})"
            try:
                reply = json.loads(raw)
                choices = reply["choices"]
                if not isinstance(choices, list):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise ServerError(f"{where} is not a completion (no choices list): is {self.base_url} an "
                                  "OpenAI-compatible endpoint?") from None
            if len(choices) != n:
                raise ServerError(f"{where} has {len(choices)} choices for {n} prompts; nothing of it was kept")
            texts: list = [None] * n
            for i, c in enumerate(choices):
                idx = c.get("index", i) if isinstance(c, dict) else None
                text = c.get("text") if isinstance(c, dict) else None
                if not isinstance(idx, int) or not 0 <= idx < n or texts[idx] is not None or not isinstance(text, str):
                    raise ServerError(f"{where}: choice {i} has no text or a bad index; nothing of it was kept")
                texts[idx] = text.strip()
            usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
            with self._lock:
                self.stats["prompts"] += n
                self.stats["completion_tokens"] += int(usage.get("completion_tokens") or 0)
            return texts

        return self._post("/completions", self._body(model, rows, tokenizer, max_new_tokens, stop_ids), parse)

    def generate_from_ids(self, model: str, ids: Sequence[Sequence[int]], *, tokenizer, max_new_tokens: int,
                          stop_ids: Sequence[int], desc: str = "generating",
                          on_batch: Callable[[list[int], list[str]], None] | None = None) -> list[str]:
        """Answers to every row, grouped into requests as ``hf`` groups its batches (longest
        first, ``batch_size`` each), at most ``concurrency`` in flight. ``on_batch(indices,
        texts)`` is called (in this thread) as each request's answers arrive. Ctrl-C drops the
        queued requests; a failed request stops the generation (ServerError)."""
        if any(len(x) == 0 for x in ids):
            raise ValueError("every input must have at least one token")
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        chunks = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        out: list = [None] * len(ids)
        self._stop.clear()
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            futures = {pool.submit(self._ask, model, [ids[i] for i in chunk], tokenizer, max_new_tokens, stop_ids):
                       chunk for chunk in chunks}
            bar = tqdm(total=len(ids), desc=desc, unit="seq", disable=not self.progress)
            for fut in as_completed(futures):
                chunk, texts = futures[fut], fut.result()
                for i, t in zip(chunk, texts):
                    out[i] = t
                if on_batch is not None:
                    on_batch(list(chunk), texts)
                bar.update(len(chunk))
            bar.close()
        except BaseException:
            self._stop.set()  # queued requests are dropped; answers already received were kept
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return out

    def _ask(self, model, rows, tokenizer, max_new_tokens, stop_ids) -> list[str]:
        if self._stop.is_set():
            raise Cancelled
        return self.complete(model, rows, tokenizer=tokenizer, max_new_tokens=max_new_tokens, stop_ids=stop_ids)


# ------------------------------------------------------------------------------- one served model
@dataclass
class Served:
    """What ``evaluate`` generates with on the ``openai`` backend: the server, the base model's
    served name and the adapter's (None: the base model itself), and the adapter check (a few
    probe prompts answered by both must differ somewhere; ``check=False`` turns it off for an
    adapter that legitimately changes nothing, and the result says so)."""

    client: OpenAIGenerator
    base: str
    adapter: str | None = None
    adapter_id: str | None = None
    """What identifies the adapter's weights in cache keys (default: its served name, which
    ``adapter_name`` derives from the weights)."""
    check: bool = True
    probes: int = 4

    @property
    def name(self) -> str:
        return self.adapter or self.base

    def model_id(self, adapter: bool = True) -> str:
        """The cache keys' model: the served base name and the adapter's identity."""
        return json.dumps(["openai", self.base, (self.adapter_id or self.adapter) if adapter else None])

    def generate(self, ids, *, tokenizer, max_new_tokens, stop_ids, desc, on_batch=None, adapter: bool = True):
        return self.client.generate_from_ids(self.name if adapter else self.base, ids, tokenizer=tokenizer,
                                             max_new_tokens=max_new_tokens, stop_ids=stop_ids, desc=desc,
                                             on_batch=on_batch)

    def describe(self) -> dict:
        return {"backend": "openai", "base_url": self.client.base_url, "model": self.base, "adapter": self.adapter,
                "prompt_format": self.client.prompt_format, "requests_batch": self.client.batch_size,
                "concurrency": self.client.concurrency}

    def verify(self, ids: Sequence[Sequence[int]], *, tokenizer, max_new_tokens: int, stop_ids, cache,
               key: Callable[[str, Sequence[int]], str]) -> dict:
        """The adapter check on the first ``probes`` rows of ``ids``. Base answers are cached as
        they come; the adapter's only once the check has passed (a rerun then asks nothing)."""
        if self.adapter is None:
            return {"adapter_check": "no adapter"}
        if not self.check:
            return {"adapter_check": "off"}
        rows = [list(r) for r in ids[:self.probes]]
        if not rows:
            return {"adapter_check": "no prompts"}

        def answers(adapter: bool) -> tuple[list[str], list[str]]:
            keys = [key(self.model_id(adapter), r) for r in rows]
            got = [cache.get(k) if cache is not None else None for k in keys]
            todo = [i for i, g in enumerate(got) if g is None]
            if todo:
                fresh = self.generate([rows[i] for i in todo], tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                                      stop_ids=stop_ids, desc="adapter check", adapter=adapter)
                for i, t in zip(todo, fresh):
                    got[i] = t
            return keys, got

        def keep(keys, got) -> None:
            for k, g in zip(keys, got):
                if cache is not None:
                    cache.add(k, g)

        base = answers(False)
        keep(*base)  # the base model's answers are right whatever the adapter does
        tuned = answers(True)
        differ = sum(a != b for a, b in zip(base[1], tuned[1]))
        if differ == 0:
            raise AdapterIgnored(
                f"the generation server at {self.client.base_url} ignored adapter {self.adapter!r}: its answers to all "
                f"{len(rows)} probe prompts are the base model {self.base!r}'s (is LoRA enabled on the server, "
                "and the adapter's path readable there?); --no-adapter-check for an adapter that changes nothing")
        keep(*tuned)  # passed: the adapter's probe answers are the evaluation's too
        return {"adapter_check": "passed", "probes": len(rows), "probes_differing": differ}


# ----------------------------------------------------------------------------- the project's side
def load_for_serving(model_name_or_path: str, adapter: str | None = None):
    """What this process needs to prompt a served model exactly as ``hf`` would, without its
    weights: the tokenizer (the adapter folder's when training saved one there, like
    ``load_model``), and a stand-in for the model carrying its config (the context for
    truncation) and generation config (the stop ids). The adapter is checked against the base's
    config.json first (``spard.eval.generate``'s recorded fingerprint)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from .generate import _check_fingerprint, _recorded_fingerprint, read_adapter_config

    tokenizer_source = model_name_or_path
    config = AutoConfig.from_pretrained(model_name_or_path)
    if adapter is not None:
        read_adapter_config(adapter)
        _check_fingerprint(Path(adapter), _recorded_fingerprint(Path(adapter)), config, model_name_or_path)
        if (Path(adapter) / "tokenizer_config.json").is_file():
            tokenizer_source = str(adapter)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    try:
        generation_config = GenerationConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError):
        generation_config = GenerationConfig.from_model_config(config)
    return SimpleNamespace(config=config, generation_config=generation_config), tokenizer


def merge_adapter(model_name_or_path: str, adapter: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """The base model with ``adapter`` merged into its weights, saved with its tokenizer as a
    model folder any server loads (``vllm serve OUT --served-model-name NAME``): for engines
    without run-time adapter loading."""
    from .generate import load_model

    model, tokenizer = load_model(model_name_or_path, str(adapter), device="cpu", merge=True)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


# ------------------------------------------------------------------------------- command line
def client_from_args(args, *, batch_size: int, progress: bool = True) -> OpenAIGenerator | None:
    """The server client the options describe (None for ``--gen-backend hf``); every number
    checked, naming its option, before anything loads."""
    if args.gen_backend == "hf":
        given = [o for o, v in (("--gen-model", args.gen_model), ("--gen-adapter-name", args.gen_adapter_name))
                 if v is not None]
        if given:
            raise ValueError(f"{given[0]}: applies to --gen-backend openai only")
        return None
    for opt, value, low in (("--gen-concurrency", args.gen_concurrency, 1), ("--gen-retries", args.gen_retries, 0),
                            ("--adapter-probes", args.adapter_probes, 1)):
        if value < low:
            raise ValueError(f"{opt}: expected an int >= {low}, got {value}")
    if not 0 < args.gen_timeout < float("inf"):
        raise ValueError(f"--gen-timeout: expected a finite number of seconds > 0, got {args.gen_timeout}")
    if not str(args.gen_base_url).startswith(("http://", "https://")):
        raise ValueError(f"--gen-base-url: expected http(s)://HOST:PORT/v1, got {args.gen_base_url!r}")
    return OpenAIGenerator(args.gen_base_url, api_key_env=args.gen_api_key_env or None,
                           concurrency=args.gen_concurrency, timeout=args.gen_timeout, max_retries=args.gen_retries,
                           batch_size=batch_size, prompt_format=args.gen_prompt_format, progress=progress)


def check_servable(defenses: Sequence, option: str = "--gen-backend openai") -> None:
    """Refuses, in one line, defenses whose model a server cannot be given (``serving_refusal``)."""
    for d in defenses:
        why = serving_refusal(d)
        if why:
            raise ValueError(f"{option}: {why}, so the server's base model plus the adapter is not the model it "
                             "trained; evaluate it with --gen-backend hf")


# ------------------------------------------------------------------------------------- the bench
@dataclass
class CellServing:
    """How `spard bench` evaluates its cells on a server: the client, the base model's served
    name, and the adapter check's switch and probes."""

    client: OpenAIGenerator
    base: str
    check: bool = True
    probes: int = 4


@contextmanager
def served_cell(serving: CellServing | None, model, folder: str | os.PathLike | None):
    """For one bench cell: its adapter saved under ``folder`` (which the server must be able to
    read), registered with the server, yielded as a ``Served`` and unloaded afterwards; None
    (the hf backend) when ``serving`` is None."""
    if serving is None:
        yield None
        return
    if folder is None:
        raise ValueError("the openai backend needs the bench's output folder (the server reads the adapter there)")
    adapter_dir = Path(folder) / "adapter"
    model.save_pretrained(str(adapter_dir))
    name = serving.client.register_adapter(adapter_dir)
    try:
        yield Served(serving.client, base=serving.base, adapter=name, check=serving.check, probes=serving.probes)
    finally:
        serving.client.unload_adapter(name)  # the server's adapter slots are few (vLLM --max-loras)


def bench_serving(args, settings, model: str | None, *, progress: bool = True) -> CellServing | None:
    """`spard bench`'s server (None for --gen-backend hf): options checked, every defense of
    the grid servable, the server reachable and serving the base model, before any model loads."""
    from spard.defenses import make_defense

    client = client_from_args(args, batch_size=settings.eval_batch_size, progress=progress)
    if client is None:
        return None
    check_servable([make_defense(d, **settings.defense_settings.get(d, {})) for d in settings.defenses])
    base = args.gen_model or model
    if base is None:
        raise ValueError("--gen-model: name the base model as the server serves it (with --world: the world's "
                         "model folder, see docs/evaluation.md)")
    if args.gen_adapter_name is not None:
        raise ValueError("--gen-adapter-name: spard bench registers each cell's adapter itself")
    client.check(base)
    return CellServing(client, base=base, check=not args.no_adapter_check, probes=args.adapter_probes)
