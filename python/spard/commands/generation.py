"""`spard eval` and `spard bench`'s generation-backend options (argparse only: nothing heavy is
imported while the command line is parsed; the backend is spard.eval.serving)."""

from __future__ import annotations


def add_backend_arguments(parser) -> None:
    """`spard eval` and `spard bench`'s generation-backend options."""
    g = parser.add_argument_group("generation backend (docs/evaluation.md)")
    g.add_argument("--gen-backend", choices=("hf", "openai"), default="hf",
                   help="hf: generate in this process (default); openai: ask an OpenAI-compatible completions "
                        "server (vLLM, SGLang) with the same tokens, greedy decoding, stop ids and new tokens")
    g.add_argument("--gen-base-url", default="http://127.0.0.1:8000/v1", help="openai: the server's URL up to /v1")
    g.add_argument("--gen-model", help="openai: the base model's served name (default: --model)")
    g.add_argument("--gen-api-key-env", default="",
                   help="openai: environment variable holding the server's API key (default '': no auth)")
    g.add_argument("--gen-concurrency", type=int, default=4, help="openai: requests in flight (default 4)")
    g.add_argument("--gen-timeout", type=float, default=600.0, help="openai: seconds per request (default 600)")
    g.add_argument("--gen-retries", type=int, default=3, help="openai: retries on 429/5xx/timeouts (default 3)")
    g.add_argument("--gen-prompt-format", choices=("ids", "text"), default="ids",
                   help="openai: send the rendered prompt as token ids (default: exactly hf's tokens) or as text "
                        "(for engines that take text only)")
    g.add_argument("--gen-adapter-name", help="openai: the adapter is already served under this name (vllm "
                   "--lora-modules NAME=PATH, or a merged model folder); default: load it at run time")
    g.add_argument("--no-adapter-check", action="store_true",
                   help="openai: skip the check that the server's answers with the adapter differ from the base "
                        "model's (for an adapter that legitimately changes nothing; recorded in the results)")
    g.add_argument("--adapter-probes", type=int, default=4, help="openai: probe prompts of the adapter check (default 4)")
