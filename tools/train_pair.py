#!/usr/bin/env python3
"""Train the bundled demo draft/target LLaVA pair from scratch on CPU.

1. Train a BPE tokenizer (Metaspace pre-tokenization, byte fallback) on the synthetic corpus.
2. Pre-train the target's CLIP tower and projector alone on a per-cell colour / shape / size
   probe (cheap: no decoder), so the image tokens encode every object from the start.
3. Train the whole target ``LlavaForConditionalGeneration`` (CLIP tower + projector + Llama
   decoder) on generated scenes (``gen_data.py``), cross-entropy on answer tokens.
4. Train the draft: a much smaller Llama decoder with its own projector on top of a frozen
   copy of the target's vision tower, distilled from the target's output distributions
   (forward KL on answer positions).
5. Save both as Hugging Face folders (f16 safetensors + config, tokenizer, processor,
   generation config).

Training is bounded by wall-clock budgets (``--target-minutes``, ``--draft-minutes``): the
learning rate follows a cosine over the elapsed fraction of the budget, and the run stops
and saves when the budget is spent. Example (the command used for the committed models is
in ``models/README.md``)::

    python tools/train_pair.py --out models --vision-minutes 2 --target-minutes 45 --draft-minutes 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gen_data  # noqa: E402
import vlm_common as vc  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=192,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=vc.IMAGE_SIZE,
        patch_size=vc.PATCH_SIZE,
        projection_dim=192,
        hidden_act="quick_gelu",
    )


def text_config(kind: str, vocab: int) -> LlamaConfig:
    common = dict(
        vocab_size=vocab,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=vc.BOS_ID,
        eos_token_id=vc.EOS_ID,
        pad_token_id=vc.PAD_ID,
        tie_word_embeddings=False,
        hidden_act="silu",
    )
    if kind == "target":
        return LlamaConfig(
            hidden_size=384,
            intermediate_size=1152,
            num_hidden_layers=8,
            num_attention_heads=6,
            num_key_value_heads=2,
            **common,
        )
    return LlamaConfig(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        **common,
    )


def llava_config(kind: str, vocab: int) -> LlavaConfig:
    cfg = LlavaConfig(
        vision_config=vision_config(),
        text_config=text_config(kind, vocab),
        image_token_index=vc.IMAGE_ID,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=vc.NUM_IMAGE_TOKENS,
        tie_word_embeddings=False,
    )
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = vc.BOS_ID, vc.EOS_ID, vc.PAD_ID
    return cfg


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lr_at(step: int, frac: float, peak: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine to 10% over the time budget."""
    w = min(1.0, (step + 1) / warmup)
    return peak * w * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def answer_logits(model, batch):
    """Logits at positions that predict answer tokens, and those tokens."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        pixel_values=batch["pixel_values"],
    )
    pred = batch["answer_mask"][:, 1:]  # position t predicts token t+1
    logits = out.logits[:, :-1][pred]
    labels = batch["input_ids"][:, 1:][pred]
    return logits, labels


class CellProbe(torch.nn.Module):
    """Training aid, not saved: classifies the colour, shape and size in each cell of the 3x3
    scene grid from the projector's output (the image tokens the decoder reads). It pre-trains
    the vision tower and projector on their own (``train_vision``), and keeps giving them a
    direct signal while the decoder learns to read the image tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.colour = torch.nn.Linear(dim, len(gen_data.COLOURS) + 1)
        self.shape = torch.nn.Linear(dim, len(gen_data.SHAPES) + 1)
        self.size = torch.nn.Linear(dim, len(gen_data.SIZES) + 1)
        self.features = None

    def hook(self, _module, _inputs, output):
        self.features = output

    def logits_and_labels(self, convs):
        x = self.features.float()  # (B, 36, D), patches in raster order
        b, n, d = x.shape
        g = int(round(n**0.5))
        x = x.view(b, 3, g // 3, 3, g // 3, d).mean(dim=(2, 4)).reshape(b * 9, d)
        labels = torch.zeros(3, b, 9, dtype=torch.long)  # class 0: empty cell
        cnames = list(gen_data.COLOURS)
        for i, c in enumerate(convs):
            for o in c.objects:
                cell = o.cell[0] * 3 + o.cell[1]
                labels[0, i, cell] = cnames.index(o.colour) + 1
                labels[1, i, cell] = gen_data.SHAPES.index(o.shape) + 1
                labels[2, i, cell] = gen_data.SIZES.index(o.size) + 1
        heads = [self.colour(x), self.shape(x), self.size(x)]
        return heads, labels.view(3, -1)

    def loss(self, convs) -> torch.Tensor:
        heads, labels = self.logits_and_labels(convs)
        return sum(F.cross_entropy(h, y) for h, y in zip(heads, labels))

    def accuracy(self, convs) -> float:
        """Fraction of cells whose colour, shape and size are all classified right."""
        heads, labels = self.logits_and_labels(convs)
        ok = torch.stack([h.argmax(-1) == y for h, y in zip(heads, labels)]).all(0)
        return ok.float().mean().item()


def image_tokens(model, pixel_values) -> torch.Tensor:
    """The projector's output for ``pixel_values``, as the LLaVA forward computes it
    (``vision_feature_layer`` -2, CLS dropped)."""
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2]
    return model.model.multi_modal_projector(hidden[:, 1:])


def evaluate_loss(model, tok, n: int, bs: int) -> float:
    model.eval()
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, bs):
            batch = vc.make_batch(tok, [gen_data.conversation("val", j, vc.IMAGE_SIZE) for j in range(i, i + bs)])
            logits, labels = answer_logits(model, batch)
            tot += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            cnt += labels.numel()
    model.train()
    return tot / cnt


def train_vision(args, model, probe) -> None:
    """Stage 1: pre-train the vision tower and projector alone with the cell probe, on large
    batches of fresh scenes (cheap: no decoder), so that the image tokens already encode every
    object's colour, shape and size when the decoder starts learning to read them."""
    params = (
        list(model.model.vision_tower.parameters())
        + list(model.model.multi_modal_projector.parameters())
        + list(probe.parameters())
    )
    opt = torch.optim.AdamW(params, lr=args.vision_lr, betas=(0.9, 0.98), weight_decay=0.05)
    budget = args.vision_minutes * 60
    t0 = time.time()
    step, idx = 0, 20_000_000  # scenes disjoint from the decoder stages' streams
    while (time.time() - t0) < budget:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, (time.time() - t0) / budget, args.vision_lr, args.warmup)
        convs = [gen_data.conversation("train", idx + j, vc.IMAGE_SIZE) for j in range(args.vision_batch)]
        idx += args.vision_batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            image_tokens(model, vc.pixels([c.image for c in convs]))
        loss = probe.loss(convs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0:
            print(
                f"[vision] step {step} scenes {idx - 20_000_000} cell-probe {loss.item():.4f} "
                f"cells-right {probe.accuracy(convs):.3f} elapsed {time.time() - t0:.0f}s",
                flush=True,
            )
        step += 1
    model.eval()
    with torch.no_grad():
        convs = [gen_data.conversation("val", j, vc.IMAGE_SIZE) for j in range(args.val_n)]
        image_tokens(model, vc.pixels([c.image for c in convs]))
        print(
            f"[vision] done: {step} steps, {idx - 20_000_000} scenes, {time.time() - t0:.0f}s; "
            f"val cells right {probe.accuracy(convs):.3f}",
            flush=True,
        )
    model.train()


def train_target(args, tok, vocab: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration(llava_config("target", vocab))
    print(
        f"target: total {count(model) / 1e6:.2f}M params, decoder {count(model.model.language_model) / 1e6:.2f}M "
        f"(+ lm_head {count(model.lm_head) / 1e6:.2f}M), vision {count(model.model.vision_tower) / 1e6:.2f}M, "
        f"projector {count(model.model.multi_modal_projector) / 1e6:.2f}M",
        flush=True,
    )
    model.train()
    probe = CellProbe(model.config.text_config.hidden_size)
    handle = model.model.multi_modal_projector.register_forward_hook(probe.hook)
    if args.vision_minutes > 0:
        train_vision(args, model, probe)
    # Stage 2: the whole model on conversations; the pre-trained vision side at a lower rate.
    vision_side = list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())
    vision_ids = {id(p) for p in vision_side}
    rest = [p for p in model.parameters() if id(p) not in vision_ids]
    params = rest + vision_side + list(probe.parameters())
    lr_scale = [1.0, args.vision_lr_scale, args.vision_lr_scale]
    opt = torch.optim.AdamW(
        [{"params": rest}, {"params": vision_side}, {"params": list(probe.parameters())}],
        lr=args.target_lr,
        betas=(0.9, 0.98),
        weight_decay=0.05,
    )
    budget = args.target_minutes * 60
    t0 = time.time()
    step, idx = 0, 0
    while True:
        frac = (time.time() - t0) / budget
        if frac >= 1.0 or (args.target_steps and step >= args.target_steps):
            break
        for g, scale in zip(opt.param_groups, lr_scale):
            g["lr"] = scale * lr_at(step, frac, args.target_lr, args.warmup)
        convs = [gen_data.conversation("train", idx + j, vc.IMAGE_SIZE) for j in range(args.batch)]
        batch = vc.make_batch(tok, convs)
        idx += args.batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits, labels = answer_logits(model, batch)
        loss = F.cross_entropy(logits.float(), labels)
        aux = probe.loss(convs)
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0:
            print(
                f"[target] step {step} samples {idx} loss {loss.item():.4f} cell-probe {aux.item():.3f} "
                f"lr {opt.param_groups[0]['lr']:.2e} "
                f"elapsed {time.time() - t0:.0f}s",
                flush=True,
            )
        step += 1
    handle.remove()
    elapsed = time.time() - t0
    print(f"[target] done: {step} steps, {idx} samples, {elapsed:.0f}s", flush=True)
    print(f"[target] val answer loss {evaluate_loss(model, tok, args.val_n, args.batch):.4f}", flush=True)
    model.eval()
    return model


def train_draft(args, tok, vocab: int, target) -> LlavaForConditionalGeneration:
    torch.manual_seed(args.seed + 1)
    draft = LlavaForConditionalGeneration(llava_config("draft", vocab))
    draft.model.vision_tower.load_state_dict(target.model.vision_tower.state_dict())
    for p in draft.model.vision_tower.parameters():
        p.requires_grad_(False)
    print(
        f"draft: total {count(draft) / 1e6:.2f}M params, decoder {count(draft.model.language_model) / 1e6:.2f}M "
        f"(+ lm_head {count(draft.lm_head) / 1e6:.2f}M), projector {count(draft.model.multi_modal_projector) / 1e6:.2f}M "
        "(vision tower shared with the target, frozen)",
        flush=True,
    )
    draft.train()
    draft.model.vision_tower.eval()
    probe = CellProbe(draft.config.text_config.hidden_size)
    handle = draft.model.multi_modal_projector.register_forward_hook(probe.hook)
    params = [p for p in draft.parameters() if p.requires_grad] + list(probe.parameters())
    opt = torch.optim.AdamW(params, lr=args.draft_lr, betas=(0.9, 0.98), weight_decay=0.01)
    budget = args.draft_minutes * 60
    t0 = time.time()
    step, idx = 0, 10_000_000  # fresh training scenes, disjoint from the target's stream
    while True:
        frac = (time.time() - t0) / budget
        if frac >= 1.0 or (args.draft_steps and step >= args.draft_steps):
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, frac, args.draft_lr, args.warmup)
        convs = [gen_data.conversation("train", idx + j, vc.IMAGE_SIZE) for j in range(args.batch)]
        batch = vc.make_batch(tok, convs)
        idx += args.batch
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            t_logits, labels = answer_logits(target, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            d_logits, _ = answer_logits(draft, batch)
        t_logp = F.log_softmax(t_logits.float(), -1)
        d_logp = F.log_softmax(d_logits.float(), -1)
        kl = F.kl_div(d_logp, t_logp, log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        (kl + args.aux_weight * probe.loss(convs)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0:
            agree = (d_logits.argmax(-1) == t_logits.argmax(-1)).float().mean().item()
            print(
                f"[draft] step {step} samples {idx - 10_000_000} kl {kl.item():.4f} top1-agree {agree:.3f} "
                f"lr {opt.param_groups[0]['lr']:.2e} elapsed {time.time() - t0:.0f}s",
                flush=True,
            )
        step += 1
    handle.remove()
    print(f"[draft] done: {step} steps, {idx - 10_000_000} samples, {time.time() - t0:.0f}s", flush=True)
    draft.eval()
    return draft


def save(model, tok_fast, out_dir: str) -> None:
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    m = model.to(torch.float16)
    m.config.dtype = "float16"
    m.save_pretrained(out_dir)
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": vc.IMAGE_SIZE},
        resample=3,
        do_center_crop=True,
        crop_size={"height": vc.IMAGE_SIZE, "width": vc.IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=vc.CLIP_MEAN,
        image_std=vc.CLIP_STD,
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok_fast,
        patch_size=vc.PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=vc.CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)  # preprocessor_config.json, as llava-hf ships it
    tok_fast.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=vc.BOS_ID,
        eos_token_id=vc.EOS_ID,
        pad_token_id=vc.PAD_ID,
        do_sample=False,
        max_new_tokens=64,
    ).save_pretrained(out_dir)
    model.to(torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models")
    ap.add_argument("--vision-minutes", type=float, default=2, help="vision pre-training stage (0: skip)")
    ap.add_argument("--vision-batch", type=int, default=64)
    ap.add_argument("--vision-lr", type=float, default=2e-3)
    ap.add_argument(
        "--vision-lr-scale", type=float, default=0.2, help="vision tower + projector LR relative to the decoder's"
    )
    ap.add_argument("--target-minutes", type=float, default=45)
    ap.add_argument("--draft-minutes", type=float, default=8)
    ap.add_argument("--target-steps", type=int, default=0, help="stop after N steps (0: budget only)")
    ap.add_argument("--draft-steps", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--target-lr", type=float, default=1.5e-3)
    ap.add_argument("--draft-lr", type=float, default=3e-3)
    ap.add_argument("--aux-weight", type=float, default=1.0, help="weight of the cell-probe loss (training aid)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--val-n", type=int, default=256)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (faster on CPUs with bf16 units)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    print("args:", json.dumps(vars(args)), flush=True)

    tok = vc.train_tokenizer()
    vocab = tok.get_vocab_size()
    tok_fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        add_bos_token=True,
        add_eos_token=False,
        padding_side="left",
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    tok_fast.chat_template = vc.CHAT_TEMPLATE
    print(f"tokenizer: vocab {vocab}", flush=True)

    target = train_target(args, tok, vocab)
    save(target, tok_fast, os.path.join(args.out, "target"))
    draft = train_draft(args, tok, vocab, target)
    save(draft, tok_fast, os.path.join(args.out, "draft"))
    print(f"total wall time {time.time() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
