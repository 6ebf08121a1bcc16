"""The `spard` command line. Each subcommand lives in `spard.commands.<name>`, a module with
`add_arguments(parser)` and `run(args) -> int`; it is imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": "the synthetic safety world end to end: align, attack, defend, evaluate",
    "select": "pick a safety subset with RD-DPP (or random / relevance-only)",
    "train": "fine-tune with LoRA under SPAG (or plain SFT)",
    "eval": "generate and judge: attack success rate and task accuracy",
    "bench": "every defense on a grid of attacks, ratios and seeds",
}


def _module(name: str):
    return importlib.import_module(f"spard.commands.{name}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spard", description=importlib.import_module("spard").__doc__.strip())
    parser.add_argument("--version", action="version", version="%(prog)s " + importlib.import_module("spard").__version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen command's module is imported (keeps `spard --help` fast).
        if name == wanted:
            _module(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(_module(args.command).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
