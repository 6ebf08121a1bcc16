"""BOS goes first exactly when the tokenizer puts it there by itself, whatever transformers says
about it: transformers 4.x has no ``add_bos_token`` on a PreTrainedTokenizerFast, and reading that
attribute with a default put a BOS before every example there that 5.x leaves out (the cause of
the training-dynamics and FSDP-parity failures on transformers 4.56-4.57)."""

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from spard.formatting import encode_example, prompt_ids
from test_spag import tiny_tokenizer


class WithoutAddBosToken:
    """A tokenizer as transformers 4.x shows a PreTrainedTokenizerFast: no ``add_bos_token``."""

    def __init__(self, tok):
        self._tok = tok

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def __getattr__(self, name):
        if name == "add_bos_token":
            raise AttributeError(name)
        return getattr(self._tok, name)


def bos_adding_tokenizer():
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "what": 4, "is": 5, "one": 6}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_no_bos_when_the_tokenizer_adds_none_even_without_add_bos_token():
    tok = tiny_tokenizer()
    assert tok("what is one")["input_ids"][0] != tok.bos_token_id  # this tokenizer adds no BOS
    for t in (tok, WithoutAddBosToken(tok)):
        ids = encode_example(t, "what is one", "one", 64).input_ids
        assert ids[0] != tok.bos_token_id, type(t).__name__
    assert encode_example(WithoutAddBosToken(tok), "what is one", "one", 64) == encode_example(tok, "what is one",
                                                                                                 "one", 64)


def test_one_bos_when_the_tokenizer_adds_it():
    tok = bos_adding_tokenizer()
    for t in (tok, WithoutAddBosToken(tok)):
        ids = prompt_ids(t, "what is one")
        assert ids[0] == 1 and ids.count(1) == 1
