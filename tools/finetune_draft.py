#!/usr/bin/env python3
"""Fine-tune the demo draft on the target's own answers (on-policy distillation).

``train_pair.py`` distils the draft from the target's distributions along the *training
data's* answers. Speculation, though, drafts along the answers the *target* writes, which
differ from the data wherever the target errs (positions, named-object questions). This
script continues training an existing draft with forward KL(target || draft) at every answer
position of two kinds of batches, alternating:

- off-policy: fresh training conversations of 1-3 turns, as in ``train_pair.py``;
- on-policy: fresh training scenes and questions, answered by the target itself (greedy,
  batched ``generate``), so the draft learns the target's distributions along its own text.

The target and the draft's vision tower (a copy of the target's) stay frozen; the draft's
projector and decoder train. Bounded by a wall-clock budget like ``train_pair.py``; replaces the
draft folder's ``model.safetensors`` (f16), leaving its other files as they are. The command
used for the committed draft is in ``models/README.md``::

    python tools/finetune_draft.py --models models --minutes 35 --lr 1e-3 --bf16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gen_data  # noqa: E402
import train_pair  # noqa: E402
import vlm_common as vc  # noqa: E402
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast  # noqa: E402

# Index ranges of the training stream used here: disjoint from ``train_pair.py``'s target
# (from 0) and draft (from 10,000,000) streams and from the vision pre-training (20,000,000).
OFF_POLICY_START = 30_000_000
ON_POLICY_START = 40_000_000


@torch.no_grad()
def on_policy_batch(target, tok, start: int, n: int, max_new: int) -> dict:
    """``n`` fresh single-turn training samples answered by the target (greedy), as a batch
    in ``vc.make_batch``'s layout (answer tokens up to and including ``</s>``, or
    ``max_new`` tokens when the target does not stop)."""
    convs = [gen_data.conversation("train", start + j, vc.IMAGE_SIZE) for j in range(n)]
    prompts = [vc.encode_prompt(tok, c.turns[0][0]) for c in convs]
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), vc.PAD_ID, dtype=torch.long)
    att = torch.zeros((n, width), dtype=torch.long)
    for b, p in enumerate(prompts):  # left-padded for generation
        ids[b, width - len(p) :] = torch.tensor(p)
        att[b, width - len(p) :] = 1
    pixel_values = vc.pixels([c.image for c in convs])
    out = target.generate(
        input_ids=ids,
        attention_mask=att,
        pixel_values=pixel_values,
        max_new_tokens=max_new,
        do_sample=False,
        pad_token_id=vc.PAD_ID,
        eos_token_id=vc.EOS_ID,
    )
    seqs, spans = [], []
    for b, p in enumerate(prompts):
        answer = out[b, width:].tolist()
        if vc.EOS_ID in answer:
            answer = answer[: answer.index(vc.EOS_ID) + 1]
        seqs.append(p + answer)
        spans.append((len(p), len(p) + len(answer)))
    length = -(-max(len(s) for s in seqs) // 16) * 16
    batch_ids = torch.full((n, length), vc.PAD_ID, dtype=torch.long)
    batch_att = torch.zeros((n, length), dtype=torch.long)
    answer_mask = torch.zeros((n, length), dtype=torch.bool)
    for b, (s, (lo, hi)) in enumerate(zip(seqs, spans)):
        batch_ids[b, : len(s)] = torch.tensor(s)
        batch_att[b, : len(s)] = 1
        answer_mask[b, lo:hi] = True
    return {
        "input_ids": batch_ids,
        "attention_mask": batch_att,
        "answer_mask": answer_mask,
        "pixel_values": pixel_values,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="models", help="folder holding target/ and draft/")
    ap.add_argument("--minutes", type=float, default=35)
    ap.add_argument("--steps", type=int, default=0, help="stop after N steps (0: budget only)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--max-new", type=int, default=48, help="longest on-policy answer")
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--offset", type=int, default=0, help="index offset into both sample streams (fresh samples for a second run)"
    )
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (faster on CPUs with bf16 units)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print("args:", json.dumps(vars(args)), flush=True)

    draft_dir = os.path.join(args.models, "draft")
    tok_fast = PreTrainedTokenizerFast.from_pretrained(draft_dir)
    tok = tok_fast.backend_tokenizer
    target = LlavaForConditionalGeneration.from_pretrained(
        os.path.join(args.models, "target"), dtype=torch.float32
    ).eval()
    draft = LlavaForConditionalGeneration.from_pretrained(draft_dir, dtype=torch.float32)
    for p in draft.model.vision_tower.parameters():
        p.requires_grad_(False)
    draft.train()
    draft.model.vision_tower.eval()
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)

    budget = args.minutes * 60
    t0 = time.time()
    step, off_idx, on_idx = 0, OFF_POLICY_START + args.offset, ON_POLICY_START + args.offset
    while True:
        frac = (time.time() - t0) / budget
        if frac >= 1.0 or (args.steps and step >= args.steps):
            break
        for g in opt.param_groups:
            g["lr"] = train_pair.lr_at(step, frac, args.lr, args.warmup)
        on_policy = step % 2 == 1
        if on_policy:
            batch = on_policy_batch(target, tok, on_idx, args.batch, args.max_new)
            on_idx += args.batch
        else:
            convs = [gen_data.conversation("train", off_idx + j, vc.IMAGE_SIZE) for j in range(args.batch)]
            batch = vc.make_batch(tok, convs)
            off_idx += args.batch
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            t_logits, _ = train_pair.answer_logits(target, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            d_logits, _ = train_pair.answer_logits(draft, batch)
        t_logp = F.log_softmax(t_logits.float(), -1)
        d_logp = F.log_softmax(d_logits.float(), -1)
        kl = F.kl_div(d_logp, t_logp, log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        kl.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every in (0, 1):
            agree = (d_logits.argmax(-1) == t_logits.argmax(-1)).float().mean().item()
            kind = "on " if on_policy else "off"
            print(
                f"[draft-ft] step {step} {kind} kl {kl.item():.4f} top1-agree {agree:.3f} "
                f"lr {opt.param_groups[0]['lr']:.2e} elapsed {time.time() - t0:.0f}s",
                flush=True,
            )
        step += 1
    print(
        f"[draft-ft] done: {step} steps, {off_idx - OFF_POLICY_START - args.offset} off-policy and "
        f"{on_idx - ON_POLICY_START - args.offset} on-policy samples, {time.time() - t0:.0f}s",
        flush=True,
    )
    draft.eval()
    # Only the weights change: the folder's config, tokenizer and processor files stay as
    # they are (a save from this f32 load would add dtype keys to them).
    with tempfile.TemporaryDirectory() as tmp:
        draft.to(torch.float16).save_pretrained(tmp)
        shutil.copyfile(os.path.join(tmp, "model.safetensors"), os.path.join(draft_dir, "model.safetensors"))


if __name__ == "__main__":
    main()
