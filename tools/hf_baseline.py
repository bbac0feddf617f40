#!/usr/bin/env python3
"""Peer baseline: Hugging Face ``transformers`` on the same checkpoints, prompts and machine.

Reads the JSON the Rust benchmark wrote (``specllava-bench run``): the evaluation items (image
path + prompt), ``max_new_tokens``, the model folders and our greedy tokens per item. For every
item it runs, greedy, in f32 on CPU:

* plain ``model.generate`` with the target (what target-only decoding is compared with);
* assisted generation, ``generate(..., assistant_model=draft)`` (Hugging Face's speculative
  decoding: a chain of draft tokens, batch size 1), with its default schedule.

It reports decode tokens per second (tokens after the first over the time after the first
token; the first token's time is measured with ``max_new_tokens=1``), end-to-end tokens per
second, and whether the greedy tokens equal ours. Exits with status 1 if plain greedy tokens
differ from ours (the two implementations disagree), after writing the JSON.

    /work/pyenv/bin/python tools/hf_baseline.py --bench-json bench/results/bench.json \
        --out bench/results/hf_baseline.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
from transformers import __version__ as transformers_version


def prompt_text(prompt: str) -> str:
    """The LLaVA-1.5 chat template, as the orchestrator renders a single turn."""
    return f"USER: <image>\n{prompt} ASSISTANT:"


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def strip_pad(tokens: list[int], pad: int | None) -> list[int]:
    while tokens and pad is not None and tokens[-1] == pad:
        tokens = tokens[:-1]
    return tokens


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.no_grad()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-json", required=True, help="JSON written by specllava-bench run")
    ap.add_argument("--out", required=True, help="where to write this baseline's JSON")
    ap.add_argument("--target", help="target model folder (default: the one the bench used)")
    ap.add_argument("--draft", help="draft model folder (default: the one the bench used)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per item (median kept)")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N items (0 = all)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    with open(args.bench_json) as f:
        bench = json.load(f)
    meta = bench["meta"]
    target_dir = args.target or meta["target_model"]
    draft_dir = args.draft or meta["draft_model"]
    max_new = int(meta["max_new_tokens"])
    ours = {r["id"]: r["tokens"] for r in bench["greedy_tokens"]}
    items = [it for it in bench["items"] if it["id"] in ours]
    if args.limit:
        items = items[: args.limit]

    target = LlavaForConditionalGeneration.from_pretrained(target_dir, dtype=torch.float32).eval()
    draft = LlavaForConditionalGeneration.from_pretrained(draft_dir, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(target_dir)
    gen_cfg = target.generation_config
    pad = gen_cfg.pad_token_id

    def run(inp: dict, n: int, assistant=None) -> list[int]:
        kw = {"assistant_model": assistant} if assistant is not None else {}
        out = target.generate(**inp, max_new_tokens=n, do_sample=False, **kw)
        return strip_pad(out[0, inp["input_ids"].shape[1] :].tolist(), pad)

    rows = []
    for it in items:
        image = Image.open(it["image_path"]).convert("RGB")
        inp = proc(images=image, text=prompt_text(it["prompt"]), return_tensors="pt")
        row = {"id": it["id"], "ours": ours[it["id"]]}
        # Warm-up, then time-to-first-token.
        run(inp, 1)
        row["ttft_s"] = statistics.median(timed(lambda: run(inp, 1))[0] for _ in range(args.repeats))
        for name, assistant in (("generate", None), ("assisted", draft)):
            try:
                run(inp, max_new, assistant)
                times, toks = [], None
                for _ in range(args.repeats):
                    t, toks = timed(lambda: run(inp, max_new, assistant))
                    times.append(t)
                total = statistics.median(times)
                decode = max(total - row["ttft_s"], 1e-9)
                row[name] = {
                    "tokens": toks,
                    "total_s": total,
                    "e2e_tok_s": len(toks) / total,
                    "decode_tok_s": max(len(toks) - 1, 0) / decode,
                    "first_difference": first_difference(toks, ours[it["id"]]),
                }
            except Exception as e:  # noqa: BLE001 - report the failure, keep measuring the rest
                row[name] = {"error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        g, a = row["generate"], row["assisted"]
        print(
            f"{it['id']:>24}: generate {g.get('decode_tok_s', float('nan')):7.1f} tok/s"
            f" {'==' if g.get('first_difference', 0) is None else '!='} ours;"
            f" assisted {a.get('decode_tok_s', float('nan')):7.1f} tok/s"
            f" {'==' if a.get('first_difference', 0) is None else '!='} ours",
            flush=True,
        )

    def agg(name: str) -> dict:
        ok = [(r[name], r["ttft_s"]) for r in rows if "error" not in r[name]]
        toks = sum(max(len(g["tokens"]) - 1, 0) for g, _ in ok)
        decode = sum(max(g["total_s"] - ttft, 1e-9) for g, ttft in ok)
        return {
            "items": len(ok),
            "errors": [r[name]["error"] for r in rows if "error" in r[name]],
            "decode_tok_s": toks / decode if ok else None,
            "e2e_tok_s": sum(len(g["tokens"]) for g, _ in ok) / sum(g["total_s"] for g, _ in ok) if ok else None,
            "equal_to_ours": sum(g["first_difference"] is None for g, _ in ok),
        }

    summary = {
        "transformers": transformers_version,
        "torch": torch.__version__,
        "threads": args.threads,
        "target": target_dir,
        "draft": draft_dir,
        "max_new_tokens": max_new,
        "repeats": args.repeats,
        "generate": agg("generate"),
        "assisted": agg("assisted"),
    }
    summary["assisted_speedup"] = (
        summary["assisted"]["decode_tok_s"] / summary["generate"]["decode_tok_s"]
        if summary["assisted"]["decode_tok_s"] and summary["generate"]["decode_tok_s"]
        else None
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"summary": summary, "items": rows}, f, indent=1)
    print(json.dumps(summary, indent=1))
    g = summary["generate"]
    if g["equal_to_ours"] != len(rows):
        print(
            f"ERROR: transformers greedy generate differs from our greedy output on "
            f"{len(rows) - g['equal_to_ours']} of {len(rows)} items",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
