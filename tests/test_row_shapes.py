"""Every defense takes the row shapes the ecosystem writes (TRL's ``messages`` and
prompt/completion message lists, preference rows for the pool), and a row it cannot use is one
line naming it."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from spard.config import LoraConfig, OptimConfig
from spard.defenses import DefenseData, make_defense
from spard.select import select_safe_data
from spard.trainer import run_defense
from test_one_trainer import DEFENSES, pool_rows, user_rows
from test_spag import one_thread  # noqa: F401  (autouse fixture)
from test_spag import tiny_model, tiny_tokenizer


def as_messages(rows):
    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for r in rows]


def as_prompt_completion(rows):
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["response"]}]} for r in rows]


def as_preference(pool):
    return [{"prompt": r["prompt"], "chosen": r["safe"], "rejected": r["unsafe"]} for r in pool]


def adapter(name, user, pool):
    data = DefenseData(user=user, safety_pool=pool, seed=3, max_length=64)
    optim = OptimConfig(lr=1e-2, warmup_steps=0, batch_size=4, grad_accum=1, max_steps=3, seed=3,
                        max_grad_norm=1.0, weight_decay=0.0)
    model, _ = run_defense(make_defense(name, **DEFENSES[name]), tiny_model(), tiny_tokenizer(), data, optim=optim,
                           lora=LoraConfig(r=4, alpha=8, dropout=0.0), progress=False, log_every=1)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# Without a chat template a [user, assistant] conversation is laid out as the prompt/response
# row is, so each defense must train to the very same adapter from either shape.
@pytest.mark.parametrize("name", ["safeinstr", "antibody", "spard", "booster"])
def test_conversational_rows_train_like_prompt_response_rows(name):
    plain = adapter(name, user_rows(), pool_rows())
    for user in (as_messages(user_rows()), as_prompt_completion(user_rows())):
        other = adapter(name, user, as_preference(pool_rows()))
        for k, v in plain.items():
            torch.testing.assert_close(other[k], v, rtol=0, atol=0, msg=lambda m: f"{name} {k}: {m}")


def test_pool_rows_in_conversational_and_preference_shapes():
    pool = pool_rows(3)
    want = [{"prompt": r["prompt"], "safe": r["safe"]} for r in pool]
    chat = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["safe"]}]}
            for r in pool]
    assert DefenseData(user=user_rows(), safety_pool=chat).safety_pool == want
    pref = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["safe"]}],
             "rejected": [{"role": "assistant", "content": r["unsafe"]}]} for r in pool]
    data = DefenseData(user=user_rows(), safety_pool=pref)
    assert data.safety_pool == [dict(w, unsafe=r["unsafe"]) for w, r in zip(want, pool)]
    assert data.alignment == [{"prompt": r["prompt"], "response": r["safe"]} for r in pool]
    assert data.harmful == [{"prompt": r["prompt"], "response": r["unsafe"]} for r in pool]


def test_selection_reads_the_prompt_of_conversational_reference_rows():
    pool = [{"prompt": f"tell me about cats {i}", "safe": "i cannot help with that"} for i in range(6)]
    plain = select_safe_data(pool, user_rows(), method="random", k=2, seed=0)[0]
    assert select_safe_data(pool, as_messages(user_rows()), method="random", k=2, seed=0)[0] == plain


@pytest.mark.parametrize("where, kwargs, message", [
    ("user[1]", {"user": [{"prompt": "a", "response": "b"}, {"question": "a", "answer": "b"}]},
     r"DefenseData.user\[1\]: expected a string 'prompt' with a 'response', a 'messages' conversation.*keys: \['answer', 'question'\]"),
    ("user[0]", {"user": [{"prompt": "a"}]}, r"DefenseData.user\[0\]: no 'response'"),
    ("user[0]", {"user": [{"messages": [{"role": "user", "content": "a"}]}]},
     r"DefenseData.user\[0\]: a conversation must end with the assistant's answer"),
    ("safety_pool[0]", {"user": [{"prompt": "a", "response": "b"}], "safety_pool": [{"prompt": "a", "unsafe": "x"}]},
     r"DefenseData.safety_pool\[0\]: a safety-pool row needs a string 'prompt' and 'safe'.*keys: \['prompt', 'unsafe'\]"),
    ("safety_pool[0]", {"user": [{"prompt": "a", "response": "b"}],
                        "safety_pool": [{"prompt": [{"role": "user", "content": "a"}], "chosen": "no"}]},
     r"DefenseData.safety_pool\[0\]: a preference row needs 'prompt' and 'chosen' both strings or both message lists"),
])
def test_rows_it_cannot_use_are_one_line_naming_the_row(where, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        DefenseData(**kwargs)
    assert "\n" not in str(err.value) and where in str(err.value)
