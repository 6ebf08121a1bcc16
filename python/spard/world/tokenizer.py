"""A word-level tokenizer for the world, built locally (no download).

Words, numbers and punctuation are single tokens; a leading ``▁`` marks a preceding space, so
decoding gives the text back exactly. The vocabulary is every piece the world's templates and
word lists can produce, so no generated text ever hits ``<unk>``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import string
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from . import text

PAD, UNK, BOS, EOS, USER, ASSISTANT = "<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, USER, ASSISTANT]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}" + USER + " {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + " {{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", "isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        pre_tokenizers.Punctuation("isolated"),
    ])


def _template_texts() -> Iterator[str]:
    """Texts covering every word the world can say (each slot filled with each of its values)."""
    yield " ".join(str(n) for n in range(text.MAX_NUMBER + 1))
    yield " " + " ".join(string.digits) + " + - * = #### " + "\n#### 0"
    for op_templates in text.TASK_TEMPLATES.values():
        for question, worked in op_templates:
            for name in text.NAMES:
                for items in text.ITEMS:
                    for friend in text.FRIENDS:
                        f = dict(name=name, pron=text.PRONOUN[name], items=items, friend=friend,
                                 a=1, b=2, c=3)
                        yield question.format(**f)
                        yield worked.format(**f) + "\n#### 3"
    yield text.FACT_TEMPLATE[0].format(a=1, s="+", b=2) + " " + text.FACT_TEMPLATE[1].format(a=1, s="*", b=2, c=3)
    frames = text.ALIGN_FRAMES + text.ATTACK_FRAMES + text.EVAL_FRAMES + text.POOL_FRAMES
    answers = text.REFUSALS + text.COMPLIANT
    for actions in text.CATEGORIES.values():
        for action in actions:
            for t in frames + answers:
                yield t.format(a=action)
    for q, r in text.BENIGN:
        for topic in text.BENIGN_TOPICS:
            yield q.format(t=topic)
            yield r.format(t=topic)


def _pieces(texts: Iterable[str]) -> set[str]:
    pre = _pre_tokenizer()
    words: set[str] = set()
    for t in texts:
        for variant in (t, f" {t} "):
            words.update(piece for piece, _ in pre.pre_tokenize_str(variant))
    return words


@functools.lru_cache(maxsize=1)
def _template_pieces() -> frozenset[str]:
    return frozenset(_pieces(_template_texts()))  # the templates are constants: compute once


def world_words(extra_texts: Iterable[str] = ()) -> list[str]:
    """The sorted vocabulary (without special tokens). Texts are pre-tokenized the way the chat
    template presents them: a prompt as `` prompt `` (spaces around it), a response as is."""
    return sorted(_template_pieces() | _pieces(extra_texts))


def build_tokenizer(extra_texts: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """The world's tokenizer: a ``PreTrainedTokenizerFast`` with a chat template."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in world_words(extra_texts):
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = _pre_tokenizer()
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def vocabulary_hash(tokenizer) -> str:
    """Short digest of the vocabulary and template (part of the model cache key)."""
    payload = json.dumps([sorted(tokenizer.get_vocab().items()), CHAT_TEMPLATE])
    return hashlib.sha256(payload.encode()).hexdigest()[:12]
