"""Shared pieces of the demo pair tooling: tokenizer, chat formatting, configs, batching.

Used by ``train_pair.py`` and ``eval_pair.py``; the constants here are the contract the
Rust side relies on (image size, image token count, special token ids).
"""

from __future__ import annotations

import json


import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import gen_data

IMAGE_SIZE = 48
PATCH_SIZE = 8
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # CLS dropped ("default" strategy)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_ID = range(5)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{{ c['text'] }}{% endfor %}{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def prompt_text(prompt: str) -> str:
    """The LLaVA-1.5 single-turn prompt, with one ``<image>`` placeholder."""
    return f"USER: <image>\n{prompt} ASSISTANT:"


def _english_corpus() -> list[str]:
    """Plain English from the docstrings of a fixed set of standard-library modules."""
    import argparse
    import collections
    import logging
    import random
    import string
    import textwrap

    texts = []
    for mod in [argparse, collections, json, logging, random, string, textwrap]:
        for name in sorted(dir(mod)):
            doc = getattr(getattr(mod, name, None), "__doc__", None)
            if isinstance(doc, str):
                texts.append(doc)
    return texts


def train_tokenizer(vocab_size: int = 2048) -> Tokenizer:
    """BPE with Metaspace pre-tokenization and byte fallback, like Llama's tokenizer.json."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS + byte_tokens,
        min_frequency=2,
        show_progress=False,
    )
    corpus = gen_data.corpus(20000) + _english_corpus()
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    # The byte tokens were passed as special tokens only to reserve their ids; like Llama's
    # they must be ordinary vocabulary entries (so decoding keeps them), not added tokens.
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in SPECIALS]
    tok = Tokenizer.from_str(json.dumps(spec))
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def encode_prompt(tok: Tokenizer, prompt: str) -> list[int]:
    """BOS + chat prompt with the ``<image>`` token expanded to NUM_IMAGE_TOKENS copies."""
    ids = tok.encode(prompt_text(prompt)).ids
    out: list[int] = []
    for t in ids:
        out.extend([IMAGE_ID] * NUM_IMAGE_TOKENS if t == IMAGE_ID else [t])
    return out


def encode_answer(tok: Tokenizer, answer: str) -> list[int]:
    """Answer tokens as they follow ``ASSISTANT:`` (leading space), then ``</s>``."""
    full = tok.encode(prompt_text("x") + " " + answer, add_special_tokens=False).ids
    pre = tok.encode(prompt_text("x"), add_special_tokens=False).ids
    assert full[: len(pre)] == pre
    return full[len(pre) :] + [EOS_ID]


def pixels(images: list[np.ndarray]) -> torch.Tensor:
    """CLIP normalisation of uint8 HxWx3 images already at IMAGE_SIZE (what the processor does)."""
    x = torch.from_numpy(np.stack(images)).float().div_(255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_conversation(tok: Tokenizer, turns: list[tuple[str, str]]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids (BOS, image expanded) of a whole conversation encoded as one string, as the
    serving side encodes it, and the [start, end) spans of answer tokens (each ending with
    ``</s>``)."""
    spans = []
    text = ""
    for i, (q, a) in enumerate(turns):
        img = "<image>\n" if i == 0 else ""
        text += f"USER: {img}{q} ASSISTANT:"
        start = len(tok.encode(text).ids)
        text += f" {a}</s>"
        end = len(tok.encode(text).ids)
        spans.append((start, end))
    ids = tok.encode(text).ids
    assert ids.count(IMAGE_ID) == 1 and ids[-1] == EOS_ID
    pos = ids.index(IMAGE_ID)
    shift = NUM_IMAGE_TOKENS - 1
    ids = ids[:pos] + [IMAGE_ID] * NUM_IMAGE_TOKENS + ids[pos + 1 :]
    return ids, [(s + shift, e + shift) for s, e in spans]


def make_batch(tok: Tokenizer, convs, pad_multiple: int = 16) -> dict:
    """Right-padded batch of conversations (``gen_data.Conversation``); ``answer_mask[b, t]``
    marks answer tokens. Lengths are rounded up to ``pad_multiple`` so that few distinct
    shapes reach the CPU kernels."""
    seqs, masks = [], []
    for c in convs:
        ids, spans = encode_conversation(tok, c.turns)
        seqs.append(ids)
        masks.append(spans)
    L = max(len(x) for x in seqs)
    L = -(-L // pad_multiple) * pad_multiple
    ids = torch.full((len(seqs), L), PAD_ID, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    tgt = torch.zeros((len(seqs), L), dtype=torch.bool)
    for b, (x, spans) in enumerate(zip(seqs, masks)):
        ids[b, : len(x)] = torch.tensor(x)
        att[b, : len(x)] = 1
        for s, e in spans:
            tgt[b, s:e] = True
    return {
        "input_ids": ids,
        "attention_mask": att,
        "answer_mask": tgt,
        "pixel_values": pixels([c.image for c in convs]),
    }
