"""The `spard train` config documented in docs/training.md runs as written on the real-format
data (a tiny model in place of the 7B one, one step, its own output folder)."""

import json
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import yaml

from test_spag import one_thread  # noqa: F401  (autouse fixture)
from test_spag import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def train_configs() -> list[tuple[str, str]]:
    """(where, YAML text) of every documented config with a ``model`` and an ``optim`` section."""
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for m in re.finditer(r"^```yaml\n(.*?)^```", path.read_text(encoding="utf-8"), re.M | re.S):
            doc = yaml.safe_load(m.group(1))
            if isinstance(doc, dict) and isinstance(doc.get("model"), dict) and "optim" in doc:
                out.append((str(path.relative_to(ROOT)), m.group(1)))
    return out


def tiny_model_dir(root: Path) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    folder = root / "tiny-model"
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_the_training_guide_documents_a_config():
    assert [where for where, _ in train_configs()] == ["docs/training.md"]


@pytest.mark.slow
@pytest.mark.parametrize("where, text", train_configs(), ids=lambda v: v if v.endswith(".md") else "config")
def test_a_documented_config_runs_as_written(where, text, tmp_path, shared_data, monkeypatch):
    from spard.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(text, encoding="utf-8")
    monkeypatch.chdir(ROOT)  # its data paths are relative to the project's root, as the guide says
    out = tmp_path / "out"
    code = main(["train", "--config", str(config), "--model", str(tiny_model_dir(tmp_path)), "--output-dir", str(out),
                 "--max-steps", "1", "--no-progress"])
    assert code == 0
    manifest = json.loads((out / "data_manifest.json").read_text())
    settings = yaml.safe_load(text)
    assert manifest["attack"]["n_harmful"] == int(settings["attack"]["ratio"] * manifest["clean_rows"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
