#!/usr/bin/env python3
"""Evaluate the bundled demo pair with Hugging Face ``transformers``.

Reports, as JSON (and a Markdown table for the model card):

* target accuracy on the synthetic test split, per question type (captions are parsed
  back into (colour, shape, position) objects and compared with the scene's ground truth);
* draft-vs-target greedy agreement: teacher-forced top-1 agreement on the target's greedy
  answers, and the fraction of prompts where the draft's own greedy answer is identical;
* mean accepted length per verification step (accepted draft tokens + the one token the
  target always contributes) for a chain of 5 and for an EAGLE-2-style dynamic tree
  (depth D, top-K expansion, best M nodes kept), in-domain (test split) and
  out-of-domain (the photographs in ``examples/ood``).

Speculation is simulated exactly for greedy decoding: the target's greedy continuation is
computed once; at each step the draft builds its chain or tree after the tokens emitted so
far, and the accepted path is the longest root path whose tokens equal the target's next
tokens, as the lossless verifier would accept.

    python tools/eval_pair.py --models models --n-per-type 40 --n-spec 60
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gen_data  # noqa: E402
import vlm_common as vc  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402

OOD_PROMPTS = ["Describe the image.", "What do you see?", "How many shapes are there?", "What color is the circle?"]

SYN_TO_SHAPE = {syn: shape for shape, syns in gen_data.SHAPE_SYNONYMS.items() for syn in syns}
POS_PHRASES = sorted(
    ((p, key) for key, phrases in gen_data.POSITIONS.values() for p in phrases), key=lambda x: -len(x[0])
)
NUM_TO_WORD = {w: w for w in gen_data.NUMBER_WORDS.values()}


def find_pos(text: str) -> str | None:
    for phrase, key in POS_PHRASES:
        if phrase in text:
            return key
    return None


def parse_caption(text: str) -> list[tuple[str, str, str | None]]:
    """(colour, shape, position) of each object phrase ``colour shape [position]`` in a caption."""
    t = text.lower()
    colours = "|".join(gen_data.COLOURS)
    shapes = "|".join(sorted(SYN_TO_SHAPE, key=len, reverse=True))
    out = []
    matches = list(re.finditer(rf"\b({colours}) ({shapes})\b", t))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(t)
        out.append((m.group(1), SYN_TO_SHAPE[m.group(2)], find_pos(t[m.end() : end])))
    return out


def score(s: gen_data.Sample, text: str) -> dict:
    """Correctness of one generated answer against the sample's ground truth."""
    t = text.lower()
    if s.qtype == "describe":
        got = parse_caption(t)
        gt = sorted((o.colour, o.shape, o.pos) for o in s.objects)
        got_cs = sorted((c, sh) for c, sh, _ in got)
        gt_cs = sorted((c, sh) for c, sh, _ in gt)
        tp = sum(min(got_cs.count(x), gt_cs.count(x)) for x in set(gt_cs))
        return {
            "objects_exact": float(got_cs == gt_cs),
            "objects_with_pos_exact": float(sorted(got, key=str) == sorted(gt, key=str)),
            "object_precision": tp / max(len(got_cs), 1),
            "object_recall": tp / len(gt_cs),
            "count_from_caption": float(len(got) == len(gt)),
        }
    if s.qtype == "count":
        words = re.findall(r"\b(one|two|three|four)\b", t)
        return {"correct": float(bool(words) and words[0] == s.key["count"])}
    if s.qtype == "colour":
        found = [c for c in gen_data.COLOURS if re.search(rf"\b{c}\b", t)]
        return {"correct": float(found == [s.key["colour"]])}
    if s.qtype == "shape":
        found = {SYN_TO_SHAPE[w] for w in re.findall(r"[a-z]+", t) if w in SYN_TO_SHAPE}
        return {"correct": float(found == {s.key["shape"]})}
    if s.qtype == "where":
        return {"correct": float(find_pos(t) == s.key["pos"])}
    if s.qtype == "exists":
        return {"correct": float(t.strip().startswith(s.key["yes"]))}
    raise ValueError(s.qtype)


class Pair:
    """Target, draft and processor loaded from the saved folders, computing in f32."""

    def __init__(self, models: str):
        self.target = LlavaForConditionalGeneration.from_pretrained(f"{models}/target", dtype=torch.float32).eval()
        self.draft = LlavaForConditionalGeneration.from_pretrained(f"{models}/draft", dtype=torch.float32).eval()
        self.proc = AutoProcessor.from_pretrained(f"{models}/target")

    def inputs(self, image: Image.Image, prompt: str) -> dict:
        return self.proc(images=image.convert("RGB"), text=vc.prompt_text(prompt), return_tensors="pt")

    @torch.no_grad()
    def greedy(self, model, inp: dict, max_new: int) -> list[int]:
        out = model.generate(**inp, max_new_tokens=max_new, do_sample=False)
        return out[0, inp["input_ids"].shape[1] :].tolist()

    @torch.no_grad()
    def next_logprobs(self, model, inp: dict, paths: list[list[int]]) -> torch.Tensor:
        """Log-probabilities of the next token after prompt + each path (same lengths)."""
        n = len(paths)
        ids = inp["input_ids"].repeat(n, 1)
        if paths[0]:
            ids = torch.cat([ids, torch.tensor(paths, dtype=torch.long)], 1)
        logits = model(input_ids=ids, pixel_values=inp["pixel_values"].repeat(n, 1, 1, 1)).logits[:, -1]
        return torch.log_softmax(logits.float(), -1)

    @torch.no_grad()
    def teacher_forced_agreement(self, inp: dict, target_out: list[int]) -> tuple[int, int]:
        """Positions where the draft's argmax equals the target's greedy token."""
        ids = torch.cat([inp["input_ids"], torch.tensor([target_out[:-1]], dtype=torch.long)], 1)
        logits = self.draft(input_ids=ids, pixel_values=inp["pixel_values"]).logits[0]
        pred = logits[inp["input_ids"].shape[1] - 1 :].argmax(-1).tolist()
        return sum(int(a == b) for a, b in zip(pred, target_out)), len(target_out)


def build_tree(pair: Pair, inp: dict, emitted: list[int], depth: int, k: int, m: int):
    """EAGLE-2 dynamic tree: expand the top-k frontier nodes (by cumulative draft log-prob)
    with their top-k children for ``depth`` levels, then keep the best ``m`` nodes.

    Returns flat arrays (tokens, parents, scores) in topological order; parent -1 is the
    root (the last emitted token, part of ``emitted``)."""
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    paths: dict[int, list[int]] = {-1: []}
    frontier = [-1]
    for _ in range(depth):
        lp = pair.next_logprobs(pair.draft, inp, [emitted + paths[f] for f in frontier])
        top = lp.topk(k, -1)
        new = []
        for row, f in enumerate(frontier):
            base = scores[f] if f >= 0 else 0.0
            for v, t in zip(top.values[row].tolist(), top.indices[row].tolist()):
                tokens.append(t)
                parents.append(f)
                scores.append(base + v)
                paths[len(tokens) - 1] = paths[f] + [t]
                new.append(len(tokens) - 1)
        frontier = sorted(new, key=lambda i: -scores[i])[:k]
    # Rerank and keep the best m; ties broken by creation order keeps parents first.
    keep = sorted(sorted(range(len(tokens)), key=lambda i: (-scores[i], i))[:m])
    kept = set(keep)
    assert all(parents[i] == -1 or parents[i] in kept for i in keep), "kept set not ancestor-closed"
    remap = {-1: -1, **{old: new for new, old in enumerate(keep)}}
    return [tokens[i] for i in keep], [remap[parents[i]] for i in keep], [scores[i] for i in keep]


def accepted_length(tokens: list[int], parents: list[int], reference: list[int]) -> int:
    """Number of tree tokens a greedy verifier accepts when the target's next tokens are
    ``reference``."""
    node, n = -1, 0
    while n < len(reference):
        child = next((i for i, p in enumerate(parents) if p == node and tokens[i] == reference[n]), None)
        if child is None:
            break
        node, n = child, n + 1
    return n


def simulate(pair: Pair, inp: dict, target_out: list[int], depth: int, k: int, m: int) -> tuple[int, int]:
    """(tokens emitted, verification steps) for speculative greedy decoding of ``target_out``."""
    pos, steps = 0, 0
    while pos < len(target_out):
        tokens, parents, _ = build_tree(pair, inp, target_out[:pos], depth, k, m)
        acc = accepted_length(tokens, parents, target_out[pos:])
        pos += acc + 1  # accepted tokens + the target's own token
        steps += 1
    return len(target_out), steps


def spec_eval(pair: Pair, items, max_new: int, tree: tuple[int, int, int]) -> dict:
    agree, total, exact = 0, 0, 0
    chain_tok = chain_steps = tree_tok = tree_steps = 0
    for image, prompt in items:
        inp = pair.inputs(image, prompt)
        t_out = pair.greedy(pair.target, inp, max_new)
        d_out = pair.greedy(pair.draft, inp, max_new)
        a, n = pair.teacher_forced_agreement(inp, t_out)
        agree, total, exact = agree + a, total + n, exact + int(d_out == t_out)
        e, s = simulate(pair, inp, t_out, 5, 1, 5)
        chain_tok, chain_steps = chain_tok + e, chain_steps + s
        e, s = simulate(pair, inp, t_out, *tree)
        tree_tok, tree_steps = tree_tok + e, tree_steps + s
    return {
        "prompts": len(items),
        "target_tokens": total,
        "draft_top1_agreement": agree / total,
        "draft_greedy_identical": exact / len(items),
        "mean_accepted_length_chain5": chain_tok / chain_steps,
        "mean_accepted_length_tree": tree_tok / tree_steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="models")
    ap.add_argument("--ood-dir", default="examples/ood")
    ap.add_argument("--n-per-type", type=int, default=40, help="test samples per question type (accuracy)")
    ap.add_argument("--n-spec", type=int, default=60, help="test samples for agreement/acceptance")
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--tree", default="5,4,32", help="dynamic tree D,K,M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the JSON report here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    pair = Pair(args.models)
    tree = tuple(int(x) for x in args.tree.split(","))

    # 1. Accuracy per question type on the test split (balanced: the type is forced).
    acc: dict[str, dict[str, float]] = {}
    examples = []
    for qi, qt in enumerate(gen_data.QTYPES):
        rows = []
        i = -1
        while len(rows) < args.n_per_type:
            i += 1
            s = gen_data.sample("test", qi * 100_000 + i, vc.IMAGE_SIZE, qtype=qt)
            if s.qtype != qt:  # the scene does not fit this question type
                continue
            out = pair.greedy(pair.target, pair.inputs(Image.fromarray(s.image), s.prompt), args.max_new)
            text = pair.proc.tokenizer.decode(out, skip_special_tokens=True)
            rows.append(score(s, text))
            if len(rows) <= 2:
                examples.append({"qtype": qt, "prompt": s.prompt, "reference": s.answer, "target": text})
        acc[qt] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        print(qt, acc[qt], flush=True)

    # 2-3. Agreement and acceptance, in-domain (natural question mix) and out-of-domain.
    ind = []
    for i in range(args.n_spec):
        s = gen_data.sample("test", i, vc.IMAGE_SIZE)
        ind.append((Image.fromarray(s.image), s.prompt))
    in_domain = spec_eval(pair, ind, args.max_new, tree)
    print("in-domain", in_domain, flush=True)
    ood_files = sorted(glob.glob(os.path.join(args.ood_dir, "*.*")))
    ood_files = [f for f in ood_files if f.lower().endswith((".png", ".jpg", ".jpeg"))]
    ood = [(Image.open(f), p) for f in ood_files for p in OOD_PROMPTS]
    out_domain = spec_eval(pair, ood, args.max_new, tree) if ood else None
    print("out-of-domain", out_domain, flush=True)
    ood_examples = []
    for f in ood_files:
        inp = pair.inputs(Image.open(f), "Describe the image.")
        text = pair.proc.tokenizer.decode(pair.greedy(pair.target, inp, args.max_new), skip_special_tokens=True)
        ood_examples.append({"image": os.path.basename(f), "target": text})

    report = {
        "args": vars(args),
        "accuracy": acc,
        "in_domain": in_domain,
        "out_of_domain": out_domain,
        "examples": examples,
        "ood_examples": ood_examples,
        "eval_seconds": round(time.time() - t0),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
