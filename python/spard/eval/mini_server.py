"""A small OpenAI-compatible completions server for one local causal LM and its LoRA adapters,
on the CPU: what the `openai` generation backend is tested and benchmarked against.

    python -m spard.eval.mini_server --model path/to/model [--port 8000] [--lora-modules NAME=PATH ...]

It answers the routes and fields the backend uses, as vLLM does: ``GET /v1/models`` (the base
model and the loaded adapters, ``parent`` naming the base), ``POST /v1/completions`` (``prompt``
as text, a list of texts, token ids or a list of token-id lists; ``max_tokens``; greedy only;
``stop_token_ids``; ``skip_special_tokens``; ``add_special_tokens`` for text; ``n`` = 1),
``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter`` (vLLM's run-time adapter
routes, with its replies: 400 for an adapter already loaded, 404 for an unknown one or model).

Why not ``transformers serve``: its ``/v1/completions`` takes a text prompt only (tokenised on the
server, with its special tokens), has no LoRA adapters and no adapter routes, and needs fastapi,
uvicorn and openai besides. vLLM and SGLang need a GPU (vLLM's CPU build is its own torch wheel).
This server uses only the standard library's ``http.server`` and the project's own model code.

Every request's prompts are decoded as one left-padded batch (the ``hf`` backend's batching),
one request at a time. Test switches: ``--ignore-adapters`` answers every adapter with the base
model (the failure lm-evaluation-harness #2432 met); ``--exit-after N`` ends the process
abruptly after N completion requests (a server killed mid-evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class _Model:
    def __init__(self, path: str, name: str, *, ignore_adapters: bool = False, exit_after: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path, self.name = path, name
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.adapters: dict[str, str] = {}
        self.ignore_adapters, self.exit_after = ignore_adapters, exit_after
        self.completions = 0
        self.lock = threading.Lock()

    # ------------------------------------------------------------------------------- adapters
    def load_adapter(self, name: str, path: str) -> tuple[int, str]:
        from peft import PeftModel

        with self.lock:
            if name in self.adapters or name == self.name:
                return 400, f"The lora adapter '{name}' has already been loaded."
            if not os.path.isfile(os.path.join(path, "adapter_config.json")):
                return 404, f"No adapter found at {path!r} (no adapter_config.json)."
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            self.adapters[name] = path
            return 200, f"Success: LoRA adapter '{name}' added successfully."

    def unload_adapter(self, name: str) -> tuple[int, str]:
        with self.lock:
            if name not in self.adapters:
                return 404, f"The lora adapter '{name}' cannot be found."
            self.model.delete_adapter(name)
            del self.adapters[name]
            return 200, f"Success: LoRA adapter '{name}' removed successfully."

    # ---------------------------------------------------------------------------- generation
    def _ids(self, prompt, add_special_tokens: bool) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("prompt must be a string, a list of strings, token ids or a list of token-id lists")
        rows = []
        for p in prompt:
            if isinstance(p, str):
                rows.append(self.tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"])
            elif isinstance(p, list) and p and all(isinstance(t, int) for t in p):
                rows.append(p)
            else:
                raise ValueError("prompt must be a string, a list of strings, token ids or a list of token-id lists")
        return rows

    @torch.no_grad()
    def complete(self, body: dict) -> tuple[int, dict]:
        from spard.formatting import pad_id_of

        model_name = body.get("model")
        if model_name != self.name and model_name not in self.adapters:
            return 404, _error(f"The model `{model_name}` does not exist.", "NotFoundError", 404)
        if int(body.get("n", 1)) != 1 or float(body.get("temperature", 1.0)) != 0.0:
            return 400, _error("this server decodes greedily only: n = 1 and temperature = 0", "BadRequestError", 400)
        try:
            rows = self._ids(body.get("prompt"), bool(body.get("add_special_tokens", True)))
        except ValueError as e:
            return 400, _error(str(e), "BadRequestError", 400)
        max_tokens = int(body.get("max_tokens", 16))
        stop = [int(t) for t in body.get("stop_token_ids") or []]
        if not body.get("ignore_eos") and self.tokenizer.eos_token_id is not None:
            stop = stop + [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id not in stop else stop
        skip = bool(body.get("skip_special_tokens", True))
        with self.lock:
            model = self.model
            use_adapter = model_name != self.name and not self.ignore_adapters
            context = model.disable_adapter() if (hasattr(model, "disable_adapter") and not use_adapter) else None
            if use_adapter:
                model.set_adapter(model_name)
            pad = pad_id_of(self.tokenizer)
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):  # left padded, as the hf backend batches
                input_ids[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
                mask[i, width - len(r):] = 1
            kwargs = dict(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_tokens, pad_token_id=pad,
                          eos_token_id=stop or None, do_sample=False, temperature=None, top_p=None, top_k=None)
            if context is not None:
                with context:
                    result = model.generate(**kwargs)
            else:
                result = model.generate(**kwargs)
            self.completions += 1
            if self.exit_after is not None and self.completions > self.exit_after:
                os._exit(1)  # killed mid-evaluation: this request gets no answer
        choices, produced = [], 0
        for i, tokens in enumerate(result[:, width:].tolist()):
            cut = next((t for t, tok in enumerate(tokens) if tok in stop), len(tokens))
            produced += cut
            choices.append({"index": i, "text": self.tokenizer.decode(tokens[:cut], skip_special_tokens=skip),
                            "logprobs": None, "finish_reason": "stop" if cut < len(tokens) else "length"})
        prompt_tokens = sum(len(r) for r in rows)
        return 200, {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                     "model": model_name, "choices": choices,
                     "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": produced,
                               "total_tokens": prompt_tokens + produced}}

    def models(self) -> dict:
        now = int(time.time())
        data = [{"id": self.name, "object": "model", "created": now, "owned_by": "spard", "root": self.path,
                 "parent": None}]
        data += [{"id": n, "object": "model", "created": now, "owned_by": "spard", "root": p, "parent": self.name}
                 for n, p in self.adapters.items()]
        return {"object": "list", "data": data}


def _error(message: str, kind: str, code: int) -> dict:
    return {"object": "error", "message": message, "type": kind, "param": None, "code": code}


def make_handler(state: _Model):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: the tests read stdout
            pass

        def _send(self, status: int, payload, content_type="application/json") -> None:
            data = (json.dumps(payload) if content_type == "application/json" else payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict | None:
            n = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(n) or b"{}")
            except ValueError:
                return None
            return body if isinstance(body, dict) else None

        def do_GET(self):
            if self.path in ("/v1/models", "/v1/models/"):
                self._send(200, state.models())
            elif self.path == "/health":
                self._send(200, "", "text/plain")
            else:
                self._send(404, {"detail": "Not Found"})

        def do_POST(self):
            body = self._body()
            if body is None:
                self._send(400, _error("the body must be a JSON object", "BadRequestError", 400))
            elif self.path == "/v1/completions":
                self._send(*state.complete(body))
            elif self.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
                name = body.get("lora_name")
                if not isinstance(name, str) or not name:
                    self._send(400, _error("lora_name is required", "BadRequestError", 400))
                elif self.path.endswith("/load_lora_adapter"):
                    status, text = state.load_adapter(name, str(body.get("lora_path") or ""))
                    self._send(status, text if status == 200 else _error(text, "BadRequestError", status),
                               "text/plain" if status == 200 else "application/json")
                else:
                    status, text = state.unload_adapter(name)
                    self._send(status, text if status == 200 else _error(text, "NotFoundError", status),
                               "text/plain" if status == 200 else "application/json")
            else:
                self._send(404, {"detail": "Not Found"})

    return Handler


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m spard.eval.mini_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a local model folder (config.json, weights, tokenizer)")
    p.add_argument("--served-model-name", help="the base model's name in requests (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed on start)")
    p.add_argument("--lora-modules", nargs="*", default=[], metavar="NAME=PATH", help="adapters loaded at start")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--ignore-adapters", action="store_true", help="test: answer every adapter with the base model")
    p.add_argument("--exit-after", type=int, default=None, metavar="N",
                   help="test: exit abruptly on the completion request after the N-th")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    state = _Model(args.model, args.served_model_name or args.model, ignore_adapters=args.ignore_adapters,
                   exit_after=args.exit_after)
    for spec in args.lora_modules:
        name, _, path = spec.partition("=")
        status, text = state.load_adapter(name, path)
        if status != 200:
            print(f"mini_server: --lora-modules {spec}: {text}", file=sys.stderr)
            return 2
    server = ThreadingHTTPServer((args.host, args.port), make_handler(state))
    print(f"serving {state.name} on http://{args.host}:{server.server_address[1]}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
