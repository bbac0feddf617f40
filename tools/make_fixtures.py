#!/usr/bin/env python3
"""Write the model crate's parity fixtures: tiny random LLaVA checkpoints + Hugging Face reference outputs.

Run from the repository root (it deletes and rewrites ``model/tests/fixtures/``)::

    /work/pyenv/bin/python tools/make_fixtures.py

Pinned versions: see ``tools/requirements.txt`` (torch 2.15.0, transformers 5.23.0).

What it writes (the contract is ``## Parity fixture format`` in the model crate's brief):

- ``images/``: small deterministic test images drawn with PIL (several sizes and aspect ratios, PNG/JPEG/WebP).
- one directory per tiny random ``LlavaForConditionalGeneration`` checkpoint (CLIP vision tower + projector +
  Llama decoder), laid out like a Hugging Face LLaVA repository, and in it ``reference/<case>.json`` +
  ``reference/<case>.safetensors`` computed with ``transformers`` (eval mode, float32, eager attention) from the
  checkpoint *as reloaded from disk* and inputs built by the HF ``LlavaProcessor`` loaded from that directory.

Every checkpoint directory is reloaded with ``LlavaForConditionalGeneration.from_pretrained`` (no missing or
unexpected keys allowed) and must reproduce the in-memory model's logits; the raw ``tokenizers`` library must
reproduce the processor's ``input_ids`` from ``tokenizer.json`` alone; greedy decoding must have a top-2 logit gap
above ``MIN_TOP2_GAP`` at every step (otherwise the weights are re-drawn with the next seed).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import transformers
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

EXPECTED_VERSIONS = {"torch": "2.15.0", "transformers": "5.23.0"}
REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "model" / "tests" / "fixtures"
IMAGES_DIR = OUT_DIR / "images"

MIN_TOP2_GAP = 1e-2
MAX_NEW_TOKENS = 8
# Greedy continuations that repeat one token test little: re-draw unless every case emits this many distinct tokens.
MIN_DISTINCT_GREEDY = 3
RELOAD_TOLERANCE = 1e-5
MAX_SEED_TRIES = 50
SIZE_LIMIT_BYTES = 10 * 1024 * 1024

# llava-hf/llava-1.5-7b-hf's chat template, except that an assistant turn ends with "</s>" so a multi-turn
# conversation renders as `USER: <image>\np1 ASSISTANT: a1</s>USER: p2 ASSISTANT:`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + '</s>' }}{% endgeneration %}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------


def make_images() -> list[Path]:
    """Draw the test images (fixed seed; different sizes, aspect ratios, modes and formats)."""
    IMAGES_DIR.mkdir(parents=True)
    rng = np.random.default_rng(1234)
    paths = []

    # 48x48 RGB PNG: a red square on white.
    img = Image.new("RGB", (48, 48), (255, 255, 255))
    ImageDraw.Draw(img).rectangle([12, 10, 35, 33], fill=(220, 20, 30))
    paths.append(IMAGES_DIR / "red_square.png")
    img.save(paths[-1])

    # 96x64 landscape JPEG, photo-like: smooth gradients + a disc + noise. 4:4:4 chroma (no subsampling) so decoders
    # differ only by IDCT rounding.
    yy, xx = np.mgrid[0:64, 0:96].astype(np.float32)
    arr = np.stack([40 + 180 * xx / 95, 60 + 150 * yy / 63, 200 - 120 * (xx + yy) / 158], axis=-1)
    disc = (xx - 60) ** 2 + (yy - 28) ** 2 < 15**2
    arr[disc] = [250, 220, 60]
    arr += rng.normal(0, 8, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    paths.append(IMAGES_DIR / "photo.jpg")
    img.save(paths[-1], quality=92, subsampling=0)

    # 45x70 portrait lossless WebP with shapes.
    img = Image.new("RGB", (45, 70), (30, 90, 160))
    draw = ImageDraw.Draw(img)
    draw.ellipse([4, 5, 30, 31], fill=(250, 250, 250))
    draw.polygon([(22, 38), (42, 66), (3, 66)], fill=(40, 200, 80))
    draw.rectangle([30, 8, 42, 30], fill=(240, 120, 10))
    paths.append(IMAGES_DIR / "shapes.webp")
    img.save(paths[-1], lossless=True, quality=100, method=6)

    # 21x13 grayscale PNG, smaller than every crop size (the processor upsamples it).
    arr = (rng.random((13, 21)) * 255).astype(np.uint8)
    paths.append(IMAGES_DIR / "tiny_gray.png")
    Image.fromarray(arr, "L").save(paths[-1])
    return paths


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------

TOKENIZER_CORPUS = """
What is this? Describe the image in detail. What shape is it? What color is it? Is there a person in the picture?
USER: ASSISTANT: The image shows a red square on a white background. There is a yellow disc in the sky.
A green triangle, an orange rectangle and a white circle are on a blue background. The photo is taken outside.
It is a small gray picture with noise. Yes, there is. No, there is not. The colors are red, green, blue, gray.
Please answer in one word. Count the objects. How many shapes are there? Where is the circle? Why is it red?
"""


def train_tokenizer(path: Path) -> Tokenizer:
    """Train a tiny Llama-style BPE tokenizer (SentencePiece Metaspace, byte fallback) and save tokenizer.json.

    Id layout like Llama + LLaVA: 0 `<unk>`, 1 `<s>`, 2 `</s>`, 3..258 `<0x00>`..`<0xFF>`, then the learned pieces,
    then the added special tokens `<image>` and `<pad>` at the end (llava-hf puts them at 32000 and 32001).
    """
    lines = [line.strip() for line in TOKENIZER_CORPUS.strip().splitlines()] * 4
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    scratch = Tokenizer(models.BPE(unk_token="<unk>"))
    scratch.pre_tokenizer = pre
    scratch.train_from_iterator(
        lines, trainers.BpeTrainer(vocab_size=142, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    )
    learned = json.loads(scratch.to_str())["model"]
    pieces = sorted(learned["vocab"].items(), key=lambda kv: kv[1])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in pieces:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ["<unk>", "<s>", "</s>", "<image>", "<pad>"]]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    tok.save(str(path))
    return tok


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    """One tiny random checkpoint."""

    name: str
    heads: int
    kv_heads: int
    hidden: int
    intermediate: int
    strategy: str  # vision_feature_select_strategy
    feature_layer: int  # vision_feature_layer
    tied: bool
    image_size: int
    patch: int
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 4
    vision_act: str = "quick_gelu"
    layers: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    text_vocab_pad: int = 0  # text_config.vocab_size = tokenizer length + this (llava-1.5 pads 32002 -> 32064)
    dtype: str = "float32"  # dtype of the saved weights
    # Tensor-name layout: "saved" (what transformers 5.23 save_pretrained writes), "legacy" (llava-hf/llava-1.5-7b-hf),
    # "model_prefixed" (transformers 4.52-4.x save_pretrained: model.language_model.*, lm_head, model.vision_tower.
    # vision_model.*, model.multi_modal_projector.*).
    layout: str = "saved"
    # config.json text_config style: "rope_parameters" (transformers 5), "rope_theta" (transformers 4),
    # "minimal" (llava-1.5-7b-like: omits every field that has a default).
    config_style: str = "rope_parameters"
    max_shard_size: str | None = None
    seed: int = 0


SPECS = [
    Spec("mha_default_l-2_untied", heads=4, kv_heads=4, hidden=32, intermediate=64, strategy="default",
         feature_layer=-2, tied=False, image_size=32, patch=8, seed=100),
    Spec("gqa_full_l-1_tied", heads=4, kv_heads=2, hidden=32, intermediate=80, strategy="full",
         feature_layer=-1, tied=True, image_size=30, patch=6, vision_act="gelu", rope_theta=1e6,
         rms_norm_eps=1e-6, config_style="rope_theta", seed=200),
    Spec("gqa_default_l-2_sharded", heads=8, kv_heads=2, hidden=64, intermediate=96, strategy="default",
         feature_layer=-2, tied=False, image_size=48, patch=8, vision_layers=3, rope_theta=5e5,
         max_shard_size="300KB", seed=300),
    Spec("gqa_default_l-1_bf16_model_prefixed", heads=4, kv_heads=1, hidden=48, intermediate=64,
         strategy="default", feature_layer=-1, tied=False, image_size=36, patch=6, vision_hidden=48, dtype="bfloat16",
         layout="model_prefixed", seed=400),
    Spec("legacy_layout", heads=4, kv_heads=4, hidden=32, intermediate=64, strategy="default", feature_layer=-2,
         tied=False, image_size=32, patch=8, rms_norm_eps=1e-6, text_vocab_pad=16, dtype="float16",
         layout="legacy", config_style="minimal", seed=500),
]


def build_config(spec: Spec, vocab_size: int, image_token_id: int, pad_id: int) -> LlavaConfig:
    text = LlamaConfig(
        vocab_size=vocab_size + spec.text_vocab_pad,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        hidden_act="silu",
        max_position_embeddings=2048 if spec.config_style == "minimal" else 512,
        rms_norm_eps=spec.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=spec.tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch,
        projection_dim=spec.vision_hidden,
        hidden_act=spec.vision_act,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_layer=spec.feature_layer,
        vision_feature_select_strategy=spec.strategy,
        projector_hidden_act="gelu",
        tie_word_embeddings=spec.tied,
        image_seq_length=(spec.image_size // spec.patch) ** 2 + (spec.strategy == "full"),
    )


@torch.no_grad()
def init_weights(model: LlavaForConditionalGeneration, seed: int, dtype: torch.dtype) -> None:
    """Draw every parameter from a seeded generator with O(1) activations, so logits are well separated.

    HF's init (std 0.02) gives near-uniform logits whose top-2 gaps are ~1e-4: greedy parity would be fragile.
    Weights are rounded through the saved dtype so the float32 reference equals what is stored.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    # With tied embeddings the logits are `norm(h) . E`, and a large input embedding in the residual stream makes
    # the model echo its last token forever; a small embedding and a larger final norm scale avoid that.
    tied = model.config.tie_word_embeddings
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name == "model.language_model.norm.weight" and tied:
            value = 5.0 * (1.0 + 0.1 * randn(p.shape))
        elif "norm" in name and name.endswith("weight"):  # RMSNorm / LayerNorm scales
            value = 1.0 + 0.1 * randn(p.shape)
        elif name.endswith("bias"):
            value = 0.1 * randn(p.shape)
        elif "embed_tokens" in name:
            value = (0.1 if tied else 0.5) * randn(p.shape)
        elif name.endswith("class_embedding") or "position_embedding" in name:
            value = 0.5 * randn(p.shape)
        elif "patch_embedding" in name:  # conv [out, in, k, k]
            value = randn(p.shape) / np.sqrt(p.shape[1] * p.shape[2] * p.shape[3])
        elif "lm_head" in name:
            value = 3.0 * randn(p.shape) / np.sqrt(p.shape[1])
        elif p.dim() == 2:  # linear [out, in]
            value = randn(p.shape) / np.sqrt(p.shape[1])
        else:
            raise RuntimeError(f"no init rule for parameter {name} {tuple(p.shape)}")
        p.copy_(value.to(dtype).to(torch.float32))
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def layout_name(key: str, layout: str) -> str:
    """Map an in-memory state-dict key (transformers 5.23 module tree) to a checkpoint tensor name."""
    prefixes = {
        "legacy": [
            ("model.language_model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."),
            ("model.vision_tower.", "vision_tower.vision_model."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
        ],
        "model_prefixed": [
            ("model.language_model.", "model.language_model."),
            ("lm_head.", "lm_head."),
            ("model.vision_tower.", "model.vision_tower.vision_model."),
            ("model.multi_modal_projector.", "model.multi_modal_projector."),
        ],
    }[layout]
    for old, new in prefixes:
        if key.startswith(old):
            return new + key[len(old):]
    raise RuntimeError(f"unmapped state-dict key {key}")


def save_weights(model: LlavaForConditionalGeneration, spec: Spec, out: Path) -> None:
    dtype = getattr(torch, spec.dtype)
    # save_pretrained also writes config.json (with `dtype`) and generation_config.json. Convert a copy: `.to()`
    # on the model itself would also round float buffers (RoPE inv_freq) and change the in-memory reference.
    copy.deepcopy(model).to(dtype).save_pretrained(out, max_shard_size=spec.max_shard_size or "5GB")
    if spec.layout == "saved":
        return
    for f in out.glob("model*.safetensors*"):
        f.unlink()
    tensors = {}
    for key, t in model.state_dict().items():
        if spec.tied and key == "lm_head.weight":
            continue
        tensors[layout_name(key, spec.layout)] = t.detach().to(dtype).contiguous().clone()
    save_file(dict(sorted(tensors.items())), str(out / "model.safetensors"), metadata={"format": "pt"})


def rewrite_config(spec: Spec, out: Path) -> None:
    """Rewrite config.json into the spec's style (transformers writes `rope_parameters` style)."""
    path = out / "config.json"
    cfg = json.loads(path.read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    if spec.dtype != "float32":
        assert cfg.get("dtype") == spec.dtype, cfg.get("dtype")
    if spec.config_style == "rope_parameters":
        assert text["rope_parameters"] == {"rope_type": "default", "rope_theta": spec.rope_theta}, text
    elif spec.config_style == "rope_theta":  # transformers 4 style
        del text["rope_parameters"]
        text["rope_theta"] = spec.rope_theta
        text["rope_scaling"] = None
    elif spec.config_style == "minimal":  # like llava-hf/llava-1.5-7b-hf's config.json
        defaults = LlamaConfig()
        assert spec.rope_theta == 10000.0 and spec.rms_norm_eps == defaults.rms_norm_eps
        assert text["max_position_embeddings"] == defaults.max_position_embeddings and not spec.tied
        assert spec.heads == spec.kv_heads and spec.feature_layer == -2 and spec.strategy == "default"
        cfg = {
            "architectures": ["LlavaForConditionalGeneration"],
            "ignore_index": -100,
            "image_token_index": cfg["image_token_index"],
            "model_type": "llava",
            "pad_token_id": text["pad_token_id"],
            "projector_hidden_act": "gelu",
            "text_config": {
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": text["hidden_size"],
                "intermediate_size": text["intermediate_size"],
                "model_type": "llama",
                "num_attention_heads": text["num_attention_heads"],
                "num_hidden_layers": text["num_hidden_layers"],
                "torch_dtype": spec.dtype,
                "vocab_size": text["vocab_size"],
            },
            "tie_word_embeddings": False,
            "torch_dtype": spec.dtype,
            "transformers_version": cfg["transformers_version"],
            "vision_config": {
                k: vision[k]
                for k in ["hidden_act", "hidden_size", "image_size", "intermediate_size", "model_type",
                          "num_attention_heads", "num_hidden_layers", "patch_size", "projection_dim"]
            },
            "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default",
            "vocab_size": text["vocab_size"],
        }
    else:
        raise ValueError(spec.config_style)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_processor(spec: Spec, tokenizer_json: Path, out: Path) -> None:
    tokenizer = LlamaTokenizer(
        tokenizer_file=str(tokenizer_json),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        add_bos_token=True,
        add_eos_token=False,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch,
        vision_feature_select_strategy=spec.strategy,
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's CLS token
    )
    processor.save_pretrained(out)
    # transformers 5 nests the image processor in processor_config.json; llava-hf repos (and our Rust loader) also
    # have a top-level preprocessor_config.json.
    image_processor.save_pretrained(out)
    # Re-save the raw tokenizer.json: the Rust side reads exactly this file.
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")


def write_generation_config(out: Path, pad_id: int) -> None:
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=pad_id).save_pretrained(out)


# --------------------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------------------


def cases_for(index: int, images: list[Path]) -> list[dict]:
    """Three cases per checkpoint (two single-turn, one multi-turn); the images rotate across checkpoints."""
    pick = [images[(index + k) % len(images)] for k in range(3)]
    return [
        {"name": f"what_{pick[0].stem}", "image": pick[0], "turns": [["What is this?", None]]},
        {"name": f"describe_{pick[1].stem}", "image": pick[1],
         "turns": [["Describe the image in detail.", None]]},
        {"name": f"multiturn_{pick[2].stem}", "image": pick[2],
         "turns": [["What shape is it?", "a red square"], ["What color is it?", None]]},
    ]


def conversation(turns: list[list]) -> list[dict]:
    messages = []
    for i, (prompt, answer) in enumerate(turns):
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": prompt}]
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


@torch.no_grad()
def run_case(model, processor, raw_tok: Tokenizer, case: dict) -> dict:
    """Build inputs as a HF user would and record the reference outputs of one case."""
    prompt_text = processor.apply_chat_template(conversation(case["turns"]), add_generation_prompt=True)
    image = Image.open(case["image"])
    inputs = processor(images=image, text=prompt_text, return_tensors="pt")
    input_ids = inputs["input_ids"]
    image_id = model.config.image_token_id
    num_image_tokens = int((input_ids == image_id).sum())

    # tokenizer.json alone (what the Rust side has) must give the same ids, with <image> expanded before or after.
    raw = raw_tok.encode(prompt_text).ids
    expanded = []
    for t in raw:
        expanded.extend([t] * num_image_tokens if t == image_id else [t])
    assert expanded == input_ids[0].tolist(), (expanded, input_ids[0].tolist())
    assert raw_tok.encode(prompt_text.replace("<image>", "<image>" * num_image_tokens)).ids == expanded

    out = model(**inputs)
    logits_all = out.logits[0].float()
    image_features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    assert image_features.shape[0] == num_image_tokens, (image_features.shape, num_image_tokens)

    gen = model.generate(
        **inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, output_logits=True, return_dict_in_generate=True
    )
    new_tokens = gen.sequences[0, input_ids.shape[1]:].tolist()
    step_logits = [s[0].float() for s in gen.logits]
    assert torch.allclose(step_logits[0], logits_all[-1], atol=1e-5, rtol=0), "generate/forward mismatch"
    gaps = []
    for step, lg in enumerate(step_logits):
        top2 = torch.topk(lg, 2)
        assert int(top2.indices[0]) == new_tokens[step]
        gaps.append(float(top2.values[0] - top2.values[1]))

    top5 = torch.topk(logits_all[-1], 5)
    single = len(case["turns"]) == 1
    meta = {
        "image": f"../../images/{case['image'].name}",
        **({"prompt": case["turns"][0][0]} if single else {}),
        "turns": case["turns"],
        "prompt_text": prompt_text,
        "input_ids": input_ids[0].tolist(),
        "num_image_tokens": num_image_tokens,
        "greedy_tokens": new_tokens,
        "greedy_text": raw_tok.decode(new_tokens, skip_special_tokens=False),
        "max_new_tokens": MAX_NEW_TOKENS,
        "logits_last_top5": [[int(i), float(v)] for i, v in zip(top5.indices, top5.values)],
        "min_top2_gap": min(gaps),
        "image_processor_class": type(processor.image_processor).__name__,
        "tokenizer_class": type(processor.tokenizer).__name__,
        "pixel_values_shape": list(inputs["pixel_values"].shape),
    }
    tensors = {
        "pixel_values": inputs["pixel_values"].float().contiguous(),
        "logits_last": logits_all[-1].clone(),
        "logits_all": logits_all.contiguous(),
        "image_features": image_features.float().contiguous(),
    }
    return {"meta": meta, "tensors": tensors, "gaps": gaps}


def load_checkpoint(path: Path) -> LlavaForConditionalGeneration:
    model, info = LlavaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"{path.name}: from_pretrained reported {problems}")
    return model.eval()


def check_tensor_names(spec: Spec, out: Path) -> list[str]:
    """Return the stored tensor names and check their layout prefix and dtype."""
    index = out / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    if spec.max_shard_size:
        assert len(files) >= 2, f"{spec.name}: expected several shards, got {files}"
    names = []
    want_dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[spec.dtype]
    for f in files:
        with safe_open(str(out / f), "np" if spec.dtype != "bfloat16" else "pt") as st:
            for k in st.keys():
                names.append(k)
                sl = st.get_slice(k)
                assert sl.get_dtype() == want_dtype, (k, sl.get_dtype(), want_dtype)
    prefixes = {
        "saved": ("language_model.model.", "language_model.lm_head.", "vision_tower.embeddings.",
                  "vision_tower.encoder.", "vision_tower.pre_layrnorm.", "vision_tower.post_layernorm.",
                  "multi_modal_projector."),
        "legacy": ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
                   "multi_modal_projector."),
        "model_prefixed": ("model.language_model.", "lm_head.", "model.vision_tower.vision_model.",
                           "model.multi_modal_projector."),
    }[spec.layout]
    bad = [n for n in names if not n.startswith(prefixes)]
    assert not bad, f"{spec.name}: unexpected tensor names {bad[:5]}"
    has_head = any(n.endswith("lm_head.weight") for n in names)
    assert has_head != spec.tied, f"{spec.name}: lm_head stored={has_head} tied={spec.tied}"
    return sorted(names)


def make_checkpoint(index: int, spec: Spec, tokenizer_json: Path, images: list[Path]) -> dict:
    out = OUT_DIR / spec.name
    raw_tok = Tokenizer.from_file(str(tokenizer_json))
    vocab_size = raw_tok.get_vocab_size(with_added_tokens=True)
    image_id, pad_id = raw_tok.token_to_id("<image>"), raw_tok.token_to_id("<pad>")
    config = build_config(spec, vocab_size, image_id, pad_id)
    dtype = getattr(torch, spec.dtype)

    for attempt in range(MAX_SEED_TRIES):
        seed = spec.seed + attempt
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        torch.manual_seed(seed)
        source = LlavaForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
        init_weights(source, seed, dtype)
        save_weights(source, spec, out)
        rewrite_config(spec, out)
        write_generation_config(out, pad_id)
        save_processor(spec, tokenizer_json, out)
        tensor_names = check_tensor_names(spec, out)

        # References come from what a HF user gets from this directory.
        model = load_checkpoint(out)
        processor = AutoProcessor.from_pretrained(out)
        assert processor.patch_size == spec.patch and processor.vision_feature_select_strategy == spec.strategy
        results = [run_case(model, processor, raw_tok, case) for case in cases_for(index, images)]
        min_gap = min(min(r["gaps"]) for r in results)
        if min_gap <= MIN_TOP2_GAP:
            print(f"  {spec.name}: seed {seed} has a top-2 gap of {min_gap:.2e}; re-drawing", flush=True)
            continue
        distinct = min(len(set(r["meta"]["greedy_tokens"])) for r in results)
        if distinct < MIN_DISTINCT_GREEDY:
            print(f"  {spec.name}: seed {seed} repeats one token in greedy decoding; re-drawing", flush=True)
            continue

        # The reloaded checkpoint must reproduce the in-memory model exactly (up to f32 noise).
        with torch.no_grad():
            for case, r in zip(cases_for(index, images), results):
                pv = r["tensors"]["pixel_values"]
                ids = torch.tensor([r["meta"]["input_ids"]])
                want = source(input_ids=ids, pixel_values=pv).logits[0]
                diff = float((want - r["tensors"]["logits_all"]).abs().max())
                assert diff <= RELOAD_TOLERANCE, f"{spec.name}/{case['name']}: reload logits differ by {diff}"

        ref_dir = out / "reference"
        ref_dir.mkdir()
        for case, r in zip(cases_for(index, images), results):
            (ref_dir / f"{case['name']}.json").write_text(json.dumps(r["meta"], indent=1) + "\n")
            save_file(r["tensors"], str(ref_dir / f"{case['name']}.safetensors"), metadata={"format": "pt"})
        return {
            "spec": spec,
            "seed": seed,
            "min_gap": min_gap,
            "num_tensors": len(tensor_names),
            "cases": [(c["name"], r["meta"]["num_image_tokens"], len(r["meta"]["input_ids"]),
                       r["meta"]["greedy_tokens"]) for c, r in zip(cases_for(index, images), results)],
            "image_processor": results[0]["meta"]["image_processor_class"],
            "tokenizer_class": results[0]["meta"]["tokenizer_class"],
        }
    raise RuntimeError(f"{spec.name}: no seed in {MAX_SEED_TRIES} tries gives top-2 gaps > {MIN_TOP2_GAP}")


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> int:
    for pkg, want in EXPECTED_VERSIONS.items():
        have = getattr({"torch": torch, "transformers": transformers}[pkg], "__version__").split("+")[0]
        if have != want:
            print(f"warning: {pkg} {have} installed, fixtures are pinned to {want}", file=sys.stderr)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    OUT_DIR.mkdir(parents=True)
    images = make_images()
    tokenizer_json = OUT_DIR / "tokenizer.json"
    tok = train_tokenizer(tokenizer_json)
    print(f"tokenizer: {tok.get_vocab_size(with_added_tokens=True)} tokens, <image>={tok.token_to_id('<image>')}, "
          f"<pad>={tok.token_to_id('<pad>')}")

    summaries = []
    for i, spec in enumerate(SPECS):
        print(f"building {spec.name} ...", flush=True)
        summaries.append(make_checkpoint(i, spec, tokenizer_json, images))
    tokenizer_json.unlink()  # each checkpoint directory has its own copy

    total = dir_size(OUT_DIR)
    print("\nfixtures in", OUT_DIR.relative_to(REPO_ROOT))
    print(f"{'checkpoint':40} {'layout':15} {'dtype':9} {'heads':6} {'sel/layer':12} {'tied':5} {'config':16} "
          f"{'shards':6} {'seed':5} {'min gap':8} {'size':>8}")
    for s in summaries:
        spec = s["spec"]
        d = OUT_DIR / spec.name
        shards = len(list(d.glob("model*.safetensors")))
        print(f"{spec.name:40} {spec.layout:15} {spec.dtype:9} {spec.heads}/{spec.kv_heads:<4} "
              f"{spec.strategy + '/' + str(spec.feature_layer):12} {str(spec.tied):5} {spec.config_style:16} "
              f"{shards:<6} {s['seed']:<5} {s['min_gap']:<8.3f} {dir_size(d) / 1024:7.0f}K")
        for name, n_img, n_ids, greedy in s["cases"]:
            print(f"    {name:28} image tokens {n_img:3}  prompt len {n_ids:3}  greedy {greedy}")
    print(f"image processor: {summaries[0]['image_processor']}, tokenizer: {summaries[0]['tokenizer_class']}")
    print(f"images: {', '.join(p.name for p in images)}")
    du = subprocess.run(["du", "-sh", str(OUT_DIR)], capture_output=True, text=True).stdout.split()[0]
    print(f"total: {total / 1024 / 1024:.2f} MiB (du -sh: {du})")
    if total > SIZE_LIMIT_BYTES:
        raise RuntimeError(f"fixtures are {total} bytes, over the {SIZE_LIMIT_BYTES} limit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
