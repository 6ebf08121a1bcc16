"""`spard eval --adapter` tells the base model an adapter was trained on from another one by what
identifies a model (architecture, adapted modules' shapes, a fingerprint of config.json recorded
when `spard train` saves the adapter), not by folder names."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import transformers as tf

from spard.cli import main
from spard.eval import AdapterError, load_model
from spard.eval.generate import BASE_FINGERPRINT_FILE, base_model_fingerprint
from test_spag import one_thread  # noqa: F401  (autouse fixture)
from test_spag import tiny_tokenizer
from test_train_cli import workspace, write_config  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def trained(workspace, tmp_path_factory):  # noqa: F811
    """`spard train` on the workspace's tiny model: the run folder."""
    out = tmp_path_factory.mktemp("identity") / "run"
    assert main(["train", "--config", str(write_config(workspace, out))]) == 0
    return out


def _other_base(root, **config):
    """A model with the same module shapes as the workspace's, saved in a folder also named
    "model" (what the old folder-name check compared)."""
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
    cfg.update(config)
    folder = root / "model"
    tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_train_records_the_base_models_identity_beside_the_adapter(workspace, trained):  # noqa: F811
    recorded = json.loads((trained / "adapter" / BASE_FINGERPRINT_FILE).read_text())
    assert recorded["architecture"] == "LlamaForCausalLM"
    want = base_model_fingerprint(tf.AutoConfig.from_pretrained(workspace / "model"))
    assert recorded["config_sha256"] == want["config_sha256"]
    assert recorded["config_fields"]["eos_token_id"] == 2 and recorded["config_fields"]["hidden_size"] == 64
    # The base it was trained on loads it.
    model, _ = load_model(str(workspace / "model"), str(trained / "adapter"), device="cpu")
    assert model is not None


def test_an_adapter_of_another_base_with_the_same_folder_name_is_refused(workspace, trained, tmp_path, capsys):  # noqa: F811
    other = _other_base(tmp_path, rope_theta=500000.0, eos_token_id=3)  # same shapes, another model
    with pytest.raises(AdapterError, match="trained on another base model.*config.json's"):
        load_model(str(other), str(trained / "adapter"), device="cpu")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "how to bake"}\n')
    capsys.readouterr()
    rc = main(["eval", "--model", str(other), "--adapter", str(trained / "adapter"), "--device", "cpu",
               "--safety-data", str(prompts), "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "trained on another base model" in err, err
    assert "eos_token_id" in err and "(and 1 more field(s))" in err
    assert not (tmp_path / "eval" / "safety_generations.jsonl").exists()


def test_the_recorded_architecture_is_compared(workspace, trained, tmp_path):  # noqa: F811
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(trained / "adapter", adapter)
    recorded = json.loads((adapter / BASE_FINGERPRINT_FILE).read_text())
    (adapter / BASE_FINGERPRINT_FILE).write_text(json.dumps({**recorded, "architecture": "Qwen2ForCausalLM"}))
    with pytest.raises(AdapterError, match="architecture Qwen2ForCausalLM, this model is LlamaForCausalLM"):
        load_model(str(workspace / "model"), str(adapter), device="cpu")


def test_an_adapter_without_a_record_is_checked_by_shapes_only(workspace, trained, tmp_path):  # noqa: F811
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(trained / "adapter", adapter)
    (adapter / BASE_FINGERPRINT_FILE).unlink()  # an older adapter, or one saved by another tool
    other = _other_base(tmp_path, rope_theta=500000.0)
    model, _ = load_model(str(other), str(adapter), device="cpu")  # same shapes: nothing to tell them apart
    assert model is not None
    wider = _other_base(tmp_path / "wider", hidden_size=32, intermediate_size=64)
    with pytest.raises(AdapterError, match="takes 32 inputs here, the adapter expects 64"):
        load_model(str(wider), str(adapter), device="cpu")
