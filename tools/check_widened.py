#!/usr/bin/env python3
"""Check under Hugging Face ``transformers`` that a widened checkpoint computes its source's function.

The bench's wide pair is the demo target widened by ``specllava-bench widen`` (the model crate's
``widen`` module: every decoder width tiled, each Linear tiled and divided along its input). This
loads both checkpoints with ``LlavaForConditionalGeneration``, runs the same image + prompt through
both through the processor of the source checkpoint, and compares the logits at every position.

Run from the repository root (pinned versions: ``tools/requirements.txt``)::

    target/release/specllava-bench widen --model models/target --factor 4 --out target/wide-models/target-x4
    /work/pyenv/bin/python tools/check_widened.py --source models/target --widened target/wide-models/target-x4

Exits non-zero when the largest absolute logit difference exceeds ``--tol`` (default 1e-4).
"""

from __future__ import annotations

import argparse
import sys

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="models/target")
    ap.add_argument("--widened", default="target/wide-models/target-x4")
    ap.add_argument("--image", default="examples/ood/astronaut.png")
    ap.add_argument("--prompt", default="Describe the image.")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    processor = AutoProcessor.from_pretrained(args.source)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": args.prompt}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=Image.open(args.image).convert("RGB"), text=text, return_tensors="pt")

    logits = []
    for folder in (args.source, args.widened):
        model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
        model.eval()
        with torch.no_grad():
            logits.append(model(**inputs).logits[0])
        params = sum(p.numel() for n, p in model.named_parameters() if "language_model" in n or "lm_head" in n)
        print(f"{folder}: decoder + head {params / 1e6:.2f}M parameters")
    diff = (logits[0] - logits[1]).abs().max().item()
    same_argmax = bool((logits[0].argmax(-1) == logits[1].argmax(-1)).all())
    print(f"{inputs['input_ids'].shape[1]} positions: max |logit difference| {diff:.3g}, argmax equal everywhere: {same_argmax}")
    return 0 if diff <= args.tol and same_argmax else 1


if __name__ == "__main__":
    sys.exit(main())
