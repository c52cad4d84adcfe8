"""Word-level tokenizers for the toy world, built locally from its instruction grammar.

Two flavours with the special tokens and padding of the real ones, so the Kontext prompt encoding
code runs unchanged: CLIP-style (``<|startoftext|> words <|endoftext|>``, padded with
``<|endoftext|>``, pooled at the first end token) and T5-style (``words </s>``, padded with
``<pad>``). Saved with ``save_pretrained`` they load back through ``AutoTokenizer`` offline.
"""
from __future__ import annotations

from typing import Iterable

CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<unk>")  # ids 0, 1, 2: eos id 1 (not 2, see below)
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's own ids 0, 1, 2


def _vocab(words: Iterable[str], specials: tuple[str, ...]) -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in sorted({w.lower() for w in words if w}):
        if word not in vocab:
            vocab[word] = len(vocab)
    return vocab


def build_word_tokenizer(words: Iterable[str], flavour: str, max_length: int):
    """A ``PreTrainedTokenizerFast`` over ``words`` (lower-cased; unknown words map to ``<unk>``).

    ``flavour`` is ``"clip"`` or ``"t5"``. CLIPTextModel pools at the first ``eos_token_id`` unless
    that id is 2 (its legacy argmax rule), hence the end token at id 1 in the CLIP flavour.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    if flavour == "clip":
        bos, eos, unk = CLIP_SPECIALS
        pad = eos
        vocab = _vocab(words, CLIP_SPECIALS)
        post = processors.TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[(bos, 0), (eos, 1)])
    elif flavour == "t5":
        pad, eos, unk = T5_SPECIALS
        bos = None
        vocab = _vocab(words, T5_SPECIALS)
        post = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, 1)])
    else:
        raise ValueError(f"unknown tokenizer flavour {flavour!r}; use 'clip' or 't5'")
    core = Tokenizer(WordLevel(vocab, unk_token=unk))
    core.normalizer = normalizers.Lowercase()
    # Words and single punctuation marks, as the toy grammar's vocabulary lists them.
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation(behavior="isolated")])
    core.post_processor = post
    specials = {"eos_token": eos, "unk_token": unk, "pad_token": pad}
    if bos is not None:
        specials["bos_token"] = bos
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=max_length, **specials)
    tokenizer.padding_side = "right"
    return tokenizer
