"""`spard train`: LoRA fine-tuning under a defense: SPARD (safe-set selection, then SPAG) by
default, or any registered one (``--defense lisa --set defense.rho=0.5``), or several composed
(``--defense antibody+spard --set defense.spard.p=0.05``, spard.defenses.composed).

    spard train --config run.yaml --set optim.lr=1e-4 --set spag.tau=0.2 --output-dir out/

Writes into the output folder: ``adapter/`` (peft LoRA adapter, safetensors), ``config.yaml``
(the resolved config), ``data_manifest.json`` (attack and selection), ``run.json`` (per-step
log and summary), ``checkpoints/`` (``--resume`` continues from the newest whole one),
``data_files.json`` (size, mtime and sha256 of each data file: ``--resume`` refuses changed
data) and ``spard_run.json`` (the run's identity: a folder holding another run is refused unless
``--overwrite``; two processes writing one folder are refused by a lock).

Options that contradict each other are refused, one line naming both: a shortcut and a ``--set``
of its key with another value (``--max-steps 5 --set optim.max_steps=7``), ``--sft`` with
another defense. ``--strategy`` outside torchrun / accelerate launch is said to have no effect.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML or JSON config file (see docs/training.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set spag.tau=0.2 (repeatable)")
    short = parser.add_argument_group("shortcuts for common keys")
    short.add_argument("--model", help="model.name_or_path")
    short.add_argument("--task", help="data.task")
    short.add_argument("--attack", help="attack.corpus")
    short.add_argument("--pool", help="safety.pool")
    short.add_argument("--output-dir", help="run.output_dir")
    short.add_argument("--max-steps", type=int, help="optim.max_steps")
    short.add_argument("--defense", help="defense.name: any registered defense (default spard; "
                       "see `spard bench --help` for the list), or several joined by + (antibody+spard: "
                       "docs/training.md); settings with --set defense.KEY=VALUE (a member's: "
                       "defense.MEMBER.KEY=VALUE)")
    short.add_argument("--sft", action="store_true", help="plain SFT: spag.enabled=false")
    short.add_argument("--resume", action="store_true", help="continue from the newest checkpoint (the same "
                       "settings only: a run refuses to resume with changed ones)")
    short.add_argument("--overwrite", action="store_true",
                       help="replace the outputs of another run (or of an earlier start of this one) in the "
                            "output folder; without it such a folder is refused")
    short.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default=None,
                        help="under torchrun / accelerate launch: DDP (replicated) or FSDP2 (sharded) "
                             "parameters; default fsdp under `accelerate launch --use_fsdp`, else ddp "
                             "(see docs/distributed.md)")


# The flag that sets each shortcut key, for messages.
_FLAGS = {"model.name_or_path": "--model", "data.task": "--task", "attack.corpus": "--attack",
          "safety.pool": "--pool", "run.output_dir": "--output-dir", "optim.max_steps": "--max-steps",
          "defense.name": "--defense", "spag.enabled": "--sft", "run.resume": "--resume",
          "run.overwrite": "--overwrite", "run.progress": "--no-progress"}


def _check_conflicts(args, shortcuts: dict) -> None:
    """Refuses a shortcut and a ``--set`` of its key with another value (the shortcut would win
    silently), and ``--sft`` with a defense that SPAG's switch does not turn into SFT."""
    from spard.config import parse_override

    for assignment in args.overrides:
        if "=" not in assignment:
            continue  # load_config names the malformed override
        key, value = parse_override(assignment)
        if key in shortcuts and value != shortcuts[key]:
            flag = _FLAGS[key]
            shown = flag if isinstance(shortcuts[key], bool) else f"{flag} {shortcuts[key]}"
            raise ValueError(f"{shown} conflicts with --set {assignment}; give one of them")
    if args.sft and args.defense is not None and args.defense != "sft":
        raise ValueError(f"--sft / --defense: --sft trains plain SFT, --defense {args.defense} another defense; "
                         "give one of them")


def _check_sft(args, config) -> None:
    from spard.config import SPAG_DEFENSES

    name = config.defense.name
    if args.sft and name != "sft" and name not in SPAG_DEFENSES:
        raise ValueError(f"--sft: plain SFT conflicts with defense.name {name!r} (the config); give one of them")


def _shortcut_values(args) -> dict:
    pairs = {"model.name_or_path": args.model, "data.task": args.task, "attack.corpus": args.attack,
             "safety.pool": args.pool, "run.output_dir": args.output_dir, "optim.max_steps": args.max_steps,
             "defense.name": args.defense}
    out = {k: v for k, v in pairs.items() if v is not None}
    if args.sft:
        out["spag.enabled"] = False
    if args.resume:
        out["run.resume"] = True
    if args.overwrite:
        out["run.overwrite"] = True
    if args.no_progress:
        out["run.progress"] = False
    return out


def run(args) -> int:
    import yaml

    from spard.config import load_config

    shortcuts = _shortcut_values(args)
    _check_conflicts(args, shortcuts)
    config = load_config(args.config, args.overrides, shortcuts)
    _check_sft(args, config)
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0

    from spard.distributed import is_main_process, shutdown
    from spard.trainer import summary_table, train

    try:
        run_dict = train(config, strategy=args.strategy)
        if is_main_process():
            print(summary_table(run_dict))
            print(f"run log: {config.run.output_dir}/run.json")
    finally:
        # The command owns the process group it started: close it before the interpreter exits,
        # or the backend's threads can abort the process at teardown.
        shutdown()
    return 0
