"""The independent reference models of bench/reference are what their docstrings say they are: the
text-to-image reference's KV-cached CFG sampler decodes exactly what its teacher-forced forward predicts, and both
references are causal (a later token never changes an earlier prediction)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "reference"))

from gen_reference import ReferenceT2I  # noqa: E402
from und_reference import ReferenceVQA, answer_hits  # noqa: E402


def test_t2i_cached_greedy_sampling_matches_teacher_forced_argmax():
    torch.manual_seed(0)
    m = ReferenceT2I(text_vocab=50, codebook=37, d=32, layers=2).eval()
    prompt = torch.randint(0, 50, (3, 6))
    uncond = torch.randint(0, 50, (3, 6))
    n = 7
    # cfg 1 keeps only the conditional logits; a tiny temperature makes sampling the argmax
    sampled = m.sample(prompt, uncond, n, cfg=1.0, generator=torch.Generator().manual_seed(0), temperature=1e-6)
    greedy = torch.zeros(3, 0, dtype=torch.long)
    with torch.no_grad():
        for t in range(n):
            logits = m(prompt, torch.cat([greedy, torch.zeros(3, 1, dtype=torch.long)], 1))  # last slot is a dummy
            greedy = torch.cat([greedy, logits[:, t].argmax(-1, keepdim=True)], 1)
    assert torch.equal(sampled, greedy)


def test_t2i_cfg_mixes_conditional_and_unconditional_logits():
    """With a huge guidance scale, the sample follows argmax(cond - uncond), not argmax(cond)."""
    torch.manual_seed(1)
    m = ReferenceT2I(text_vocab=50, codebook=37, d=32, layers=2).eval()
    prompt, uncond = torch.randint(0, 50, (4, 5)), torch.randint(0, 50, (4, 5))
    first = m.sample(prompt, uncond, 1, cfg=1e6, generator=torch.Generator().manual_seed(0), temperature=1e-6)[:, 0]
    with torch.no_grad():
        dummy = torch.zeros(4, 1, dtype=torch.long)
        expect = (m(prompt, dummy)[:, 0] - m(uncond, dummy)[:, 0]).argmax(-1)
    assert torch.equal(first, expect)


def test_t2i_is_causal_over_codes():
    torch.manual_seed(2)
    m = ReferenceT2I(text_vocab=50, codebook=37, d=32, layers=2).eval()
    prompt, codes = torch.randint(0, 50, (2, 4)), torch.randint(0, 37, (2, 9))
    changed = codes.clone()
    changed[:, 5] = (codes[:, 5] + 1) % 37
    with torch.no_grad():
        a, b = m(prompt, codes), m(prompt, changed)
    assert torch.allclose(a[:, :6], b[:, :6])  # predictions of codes 0..5 never see code 5
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_vqa_reference_is_causal_and_reads_the_image():
    torch.manual_seed(3)
    m = ReferenceVQA(text_vocab=30, codebook=20, d=32, layers=2, grid=4, fold=2, code_dim=8).eval()
    # 2 rows: 2 text tokens, 4 image slots (a 4x4 grid folded 2x2), 3 text tokens
    image_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 0]] * 2, dtype=torch.bool)
    batch = {"input_ids": torch.randint(0, 30, (2, 9)), "image_mask": image_mask,
             "image_codes": torch.randint(0, 20, (2, 4, 4)),
             "labels": torch.tensor([[-100] * 7 + [5, 6]] * 2)}
    with torch.no_grad():
        base = m(batch)
        later = dict(batch, input_ids=batch["input_ids"].clone())
        later["input_ids"][:, 8] = (batch["input_ids"][:, 8] + 1) % 30
        assert torch.allclose(m(later)[:, :8], base[:, :8])  # the last token changes no earlier prediction
        other = dict(batch, image_codes=(batch["image_codes"] + 1) % 20)
        assert not torch.allclose(m(other)[:, 6:], base[:, 6:])  # text after the image reads it


def test_vqa_exact_match_needs_every_answer_token():
    """A digit answer is [word-start, digit, end]: its first token is shared by every count, so only a row whose every
    supervised token is right counts (= greedy decoding returns the answer)."""
    labels = torch.tensor([[-100, -100, -100, 4, 9, 1], [-100, -100, -100, 4, 8, 1]])
    logits = torch.zeros(2, 6, 12)
    logits[0, torch.arange(5), torch.tensor([3, 3, 4, 9, 1])] = 1.0  # row 0: 4, 9, 1 at positions 2-4 (the rest unsupervised)
    logits[1, torch.arange(5), torch.tensor([0, 0, 4, 9, 1])] = 1.0  # row 1: first token right, digit wrong (9 for 8)
    right, answers = answer_hits(logits, labels)
    assert right.tolist() == [True, False]
    assert answers == [(4, 9, 1), (4, 8, 1)]


def test_binding_errors_sorts_true_swapped_and_inverted_renders():
    """binding_errors' outcomes on the world's own renders: a prompt's render is "right"; the render of the prompt
    with the two colours exchanged is "swapped"; the render of the opposite relation is "inverted"."""
    from binding_errors import colour_attribution_outcome, position_outcome

    from synergen_lightning.world.prompts import render_prompt
    from synergen_lightning.world.scorer import detect_objects

    def attr(c1, c2):
        return {"tag": "color_attr", "prompt": f"a {c1} circle and a {c2} square", "exclude": [],
                "include": [{"class": "circle", "count": 1, "color": c1}, {"class": "square", "count": 1, "color": c2}]}

    def pos(rel):
        return {"tag": "position", "prompt": f"a circle {rel} a square", "exclude": [],
                "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": [rel, 0]}]}

    for seed in range(3):
        asked = attr("red", "blue")
        assert colour_attribution_outcome(asked, detect_objects(render_prompt(asked, seed))) == "right"
        assert colour_attribution_outcome(asked, detect_objects(render_prompt(attr("blue", "red"), seed))) == "swapped"
        for rel, opposite in (("left of", "right of"), ("above", "below")):
            assert position_outcome(pos(rel), detect_objects(render_prompt(pos(rel), seed))) == "right"
            assert position_outcome(pos(rel), detect_objects(render_prompt(pos(opposite), seed))) == "inverted"
