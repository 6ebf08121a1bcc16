"""The documented `spard train` options and config keys are the parser's and the config's: a new
option or key without a line in the docs fails here, and so does a documented one that is gone."""

import dataclasses
import re
from pathlib import Path

from spard.cli import build_parser
from spard.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def table_after(path: Path, heading_text: str) -> list[str]:
    """The first cells of the first markdown table after the line containing ``heading_text``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if heading_text in line)
    cells, seen_table = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            seen_table = True
            cells.append(line.split("|")[1].strip())
        elif seen_table:
            break
    return cells[2:]  # past the header and the rule


def config_keys(cls=TrainConfig, prefix=""):
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from config_keys(type(default), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_the_readme_documents_every_spard_train_option():
    parser = build_parser(["train"]).command_parsers["train"]
    options = {s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")}
    documented = {o for cell in table_after(ROOT / "README.md", "`spard train` takes a config file")
                  for o in re.findall(r"--[a-z][a-z-]*", cell)}
    assert documented == options, (f"undocumented: {sorted(options - documented)}; "
                                   f"documented but not options: {sorted(documented - options)}")


def test_the_training_guide_documents_every_config_key():
    keys = set(config_keys())
    documented = {cell.strip("`") for cell in table_after(ROOT / "docs" / "training.md", "### Every config key")}
    assert documented == keys, (f"undocumented: {sorted(keys - documented)}; "
                                f"documented but not keys: {sorted(documented - keys)}")


def test_the_readme_names_the_trial_keys():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for key in ("data.task_limit", "safety.limit", "--max-steps"):
        assert key in readme, key
    assert {"data.task_limit", "safety.limit"} <= set(config_keys())
