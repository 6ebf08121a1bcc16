"""The `spard` command line. Each subcommand lives in `spard.commands.<name>`, a module with
`add_arguments(parser)` and `run(args) -> int`; it is imported only when used.

One error policy for every command: bad input (a bad argument, config key, data row, model
folder, unreachable judge, ...) ends in one line ``spard <command>: error: <what and where>``
on stderr and exit code 2; an unexpected failure ends in one line and exit code 1. The
traceback is printed only with ``--debug``. Ctrl-C ends with exit code 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": "the synthetic safety world end to end: align, attack, defend, evaluate",
    "select": "pick a safety subset with RD-DPP (or a baseline) and measure its quality",
    "train": "fine-tune with LoRA under SPAG (or plain SFT)",
    "eval": "generate and judge: attack success rate and task accuracy",
    "bench": "every defense on a grid of attacks, ratios and seeds",
}

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
# Commands that pay for remote work (the rubric judge): SIGTERM stops them like Ctrl-C, so queued
# requests are cancelled and the replies in flight are still stored.
GRACEFUL_SIGTERM = ("eval", "bench")


class _Parser(argparse.ArgumentParser):
    """argparse with the command line's error format: one line, exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _module(name: str):
    return importlib.import_module(f"spard.commands.{name}")


def _add_debug(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="print the full traceback when a command fails")
    parser.add_argument("--verbose", action="store_true", default=default,
                        help="keep transformers' model-loading reports and progress bars")


def _quiet_transformers() -> None:
    """transformers prints a loading bar and report on every model load (a bench loads models
    per cell): quieted, but for warnings that are errors; hub downloads keep their bars. peft's
    read of a property transformers 5 deprecated warns on every LoRA model (a bench makes one per
    cell) and the user can do nothing about it: filtered too."""
    import os
    import warnings
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        import huggingface_hub.utils as hub
        import transformers.utils.logging as tlog
    except ImportError:
        return
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    hub.enable_progress_bars()  # disable_progress_bar turned the download bars off too


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="spard", description=importlib.import_module("spard").__doc__.strip())
    parser.add_argument("--version", action="version", version="%(prog)s " + importlib.import_module("spard").__version__)
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)
    parser.command_parsers = {}
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        parser.command_parsers[name] = p
        _add_debug(p, argparse.SUPPRESS)  # `spard train --debug` works as well as `spard --debug train`
        # Only the chosen command's module is imported (keeps `spard --help` fast).
        if name == wanted:
            _module(name).add_arguments(p)
    return parser


def _input_error_types() -> tuple[type, ...]:
    """Exception types that mean bad input (exit code 2). ValueError covers the project's own
    checks (ConfigError, AdapterError, data errors, SecretError); OSError covers files and
    folders (missing, unreadable, not a model folder)."""
    types: list[type] = [ValueError, OSError]
    for module, name in (("yaml", "YAMLError"), ("spard.eval.rubric", "JudgeUnavailable"),
                         ("spard.eval.serving", "ServerUnavailable")):
        mod = sys.modules.get(module)  # only what the command imported can have been raised
        if mod is not None and hasattr(mod, name):
            types.append(getattr(mod, name))
    return tuple(types)


def error_line(command: str, exc: BaseException) -> str:
    """The one line a failed command prints: whitespace collapsed, secrets redacted."""
    from spard.apikey import redact

    text = " ".join(redact(str(exc)).split()) or type(exc).__name__
    return f"spard {command}: error: {text}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(argv)
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # reported by the command's parser, so the line names the command
            parser.command_parsers.get(args.command, parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:  # argparse: --help (0) or a bad argument (2, its line already printed)
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    if args.command is None:
        parser.print_help()
        return EXIT_BAD_INPUT
    if not getattr(args, "verbose", False):
        _quiet_transformers()
    restore = _sigterm_as_interrupt() if args.command in GRACEFUL_SIGTERM else None
    try:
        return int(_module(args.command).run(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"spard {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - the command line's single error policy
        if args.debug:
            raise
        if isinstance(e, _input_error_types()):
            print(error_line(args.command, e), file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"{error_line(args.command, e)} [{type(e).__name__}; rerun with --debug for the traceback]",
              file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if restore is not None:
            restore()


def _sigterm_as_interrupt():
    """Makes SIGTERM raise KeyboardInterrupt (main thread, default handler only); returns the
    function that puts the previous handler back, or None."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
