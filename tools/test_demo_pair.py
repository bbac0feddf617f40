"""Fast unit tests of the demo-pair tooling (no training): data determinism, tokenizer
contract, answer spans, caption parsing, tree building and acceptance.

    /work/pyenv/bin/python -m unittest tools/test_demo_pair.py
"""

from __future__ import annotations

import os
import sys
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import eval_pair  # noqa: E402
import finetune_draft  # noqa: E402
import gen_data  # noqa: E402
import vlm_common as vc  # noqa: E402


class DataTest(unittest.TestCase):
    def test_samples_are_deterministic_and_splits_differ(self):
        a, b = gen_data.sample("test", 7), gen_data.sample("test", 7)
        self.assertTrue(np.array_equal(a.image, b.image))
        self.assertEqual((a.prompt, a.answer), (b.prompt, b.answer))
        c = gen_data.sample("train", 7)
        self.assertFalse(np.array_equal(a.image, c.image))
        self.assertEqual(a.image.shape, (vc.IMAGE_SIZE, vc.IMAGE_SIZE, 3))

    def test_forced_question_types_and_keys(self):
        for qt in gen_data.QTYPES:
            s = gen_data.sample("val", 3, qtype=qt)
            self.assertIn(s.qtype, (qt, "describe"))
            # The reference answer scores as correct against its own scene.
            self.assertTrue(all(v == 1.0 for k, v in eval_pair.score(s, s.answer).items() if k != "object_precision"))

    def test_captions_parse_back_to_the_scene(self):
        for i in range(50):
            s = gen_data.sample("test", i, qtype="describe")
            got = sorted(eval_pair.parse_caption(s.answer), key=str)
            want = sorted(((o.colour, o.shape, o.pos) for o in s.objects), key=str)
            self.assertEqual(got, want, s.answer)


class TokenizerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tok = vc.train_tokenizer()

    def test_special_ids(self):
        for i, s in enumerate(vc.SPECIALS):
            self.assertEqual(self.tok.token_to_id(s), i)
        self.assertEqual(self.tok.encode("hi").ids[0], vc.BOS_ID)

    def test_byte_fallback_round_trip(self):
        text = "A red circle, wörld 猫!"
        self.assertEqual(self.tok.decode(self.tok.encode(text).ids), text)

    def test_answer_spans_cover_answers(self):
        conv = gen_data.conversation("train", 11)
        ids, spans = vc.encode_conversation(self.tok, conv.turns)
        self.assertEqual(ids.count(vc.IMAGE_ID), vc.NUM_IMAGE_TOKENS)
        self.assertEqual(len(spans), len(conv.turns))
        for (s, e), (_, answer) in zip(spans, conv.turns):
            self.assertEqual(ids[e - 1], vc.EOS_ID)
            self.assertEqual(self.tok.decode(ids[s : e - 1]), answer)
        # The first turn's prompt is exactly the single-turn serving prompt.
        first = vc.encode_prompt(self.tok, conv.turns[0][0])
        self.assertEqual(ids[: len(first)], first)


class TreeTest(unittest.TestCase):
    def test_accepted_length_walks_matching_children(self):
        #      root
        #     /    \
        #    5      6
        #   / \      \
        #  7   8      9
        tokens, parents = [5, 6, 7, 8, 9], [-1, -1, 0, 0, 1]
        self.assertEqual(eval_pair.accepted_length(tokens, parents, [5, 8, 1]), 2)
        self.assertEqual(eval_pair.accepted_length(tokens, parents, [6, 9]), 2)
        self.assertEqual(eval_pair.accepted_length(tokens, parents, [6, 7]), 1)
        self.assertEqual(eval_pair.accepted_length(tokens, parents, [4]), 0)
        self.assertEqual(eval_pair.accepted_length(tokens, parents, []), 0)

    def test_dynamic_tree_is_topological_ancestor_closed_and_sized(self):
        import torch

        class FakePair:
            draft = None

            def next_logprobs(self, model, inp, paths):
                # Deterministic pseudo-random distributions keyed by the path.
                rows = []
                for p in paths:
                    g = torch.Generator().manual_seed(hash(tuple(p)) % (2**31))
                    rows.append(torch.log_softmax(torch.randn(50, generator=g) * 3, -1))
                return torch.stack(rows)

        tokens, parents, scores = eval_pair.build_tree(FakePair(), {}, [1, 2], depth=5, k=4, m=32)
        self.assertEqual(len(tokens), 32)
        for i, p in enumerate(parents):
            self.assertLess(p, i)
            if p >= 0:
                self.assertLessEqual(scores[i], scores[p])
        chain, cparents, _ = eval_pair.build_tree(FakePair(), {}, [1, 2], depth=5, k=1, m=5)
        self.assertEqual(cparents, [-1, 0, 1, 2, 3])


class OnPolicyBatchTest(unittest.TestCase):
    """The draft fine-tune's on-policy batches, with the committed target (about a second)."""

    def test_answers_are_the_targets_own_greedy_answers(self):
        import torch
        from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        tok = PreTrainedTokenizerFast.from_pretrained(os.path.join(root, "models/draft")).backend_tokenizer
        target = LlavaForConditionalGeneration.from_pretrained(
            os.path.join(root, "models/target"), dtype=torch.float32
        ).eval()
        start, n, max_new = 123, 3, 24
        batch = finetune_draft.on_policy_batch(target, tok, start, n, max_new)
        for b in range(n):
            conv = gen_data.conversation("train", start + b, vc.IMAGE_SIZE)
            prompt = vc.encode_prompt(tok, conv.turns[0][0])
            ids = batch["input_ids"][b]
            mask = batch["answer_mask"][b]
            answer = ids[mask].tolist()
            # The prompt first, then the answer, then padding only.
            self.assertEqual(ids[: len(prompt)].tolist(), prompt)
            self.assertFalse(mask[: len(prompt)].any())
            self.assertTrue(mask[len(prompt) : len(prompt) + len(answer)].all())
            self.assertTrue((ids[len(prompt) + len(answer) :] == vc.PAD_ID).all())
            self.assertTrue(answer[-1] == vc.EOS_ID or len(answer) == max_new)
            # The same tokens the target's unpadded greedy decoding writes.
            alone = target.generate(
                input_ids=torch.tensor([prompt]),
                pixel_values=vc.pixels([conv.image]),
                max_new_tokens=len(answer),
                do_sample=False,
                pad_token_id=vc.PAD_ID,
                eos_token_id=vc.EOS_ID,
            )[0, len(prompt) :].tolist()
            self.assertEqual(answer, alone)


if __name__ == "__main__":
    unittest.main()
