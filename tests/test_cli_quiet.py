"""transformers' model-loading bar and report are quiet unless --verbose."""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
LOAD = """
import sys
sys.argv = ["spard"] + sys.argv[1:]
from spard import cli
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
import torch
folder = sys.argv[-1]
LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2)).save_pretrained(folder)
args = cli.build_parser(["bench"]).parse_known_args(sys.argv[1:-1] + ["bench", "--out", "x"])[0]
if not args.verbose:
    cli._quiet_transformers()
model = AutoModelForCausalLM.from_pretrained(folder)
from spard.lora import apply_lora
apply_lora(model)  # peft reads a property transformers 5 deprecated: a FutureWarning per LoRA model
"""


def _load(tmp_path, *flags):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT)])}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    out = subprocess.run([sys.executable, "-c", LOAD, *flags, str(tmp_path / "m")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


def test_model_loading_is_quiet_unless_verbose(tmp_path):
    import pytest
    import transformers

    quiet = _load(tmp_path)
    assert "Loading weights" not in quiet and "is_gradient_checkpointing" not in quiet
    if int(transformers.__version__.split(".")[0]) < 5:  # the floor (.ci/floors) prints no such report
        pytest.skip(f"transformers {transformers.__version__} prints no loading report for --verbose to keep")
    assert "Loading weights" in _load(tmp_path, "--verbose")
