"""Sequence building and collation against the real TextTokenizer and views.py (independent references:
the tokenizer's own chat-template helpers and the pixel policies)."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from synergen_lightning.data.batch import collate
from synergen_lightning.data.sequences import CAPTION_PROMPT, IGNORE, SequenceBuilder, generation_prompt_ids
from synergen_lightning.data.sources import SkipSample
from synergen_lightning.data.views import dynamic_tiles, generation_view, to_uint8_tensor
from synergen_lightning.text_tokenizer import train_bpe
from synthetic_shards import jpeg_bytes, sample_record, write_text_jsonl

TPV = 4


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return train_bpe([write_text_jsonl(d / "corpus.jsonl", 80)], 400, d)


def raw(key="k0", size=(64, 48), codes=None, seed=0):
    rec = sample_record(np.random.default_rng(seed), key, size, codes)
    rec["__key__"] = key
    return rec


def builder(tok, **kw):
    args = dict(tokens_per_view=TPV, image_size=32, max_seq_len=512, cfg_dropout=0.0)
    args.update(kw)
    return SequenceBuilder(tok, **args)


def supervised(s):
    return [lab for lab in s.labels if lab != IGNORE]


def test_generation_matches_chat_template(tok):
    r = raw()
    s = builder(tok).build(r, "generation")
    caption = r["txt"].decode()
    prompt = tok.chat_prompt_ids("Generate an image of: " + caption) + [tok.boi_id]
    assert s.input_ids[: len(prompt)] == prompt == generation_prompt_ids(tok, caption)
    assert s.input_ids[len(prompt):] == [tok.pad_id] * TPV + [tok.eoi_id, tok.im_end_id, tok.eos_id]
    assert s.image_mask == [False] * len(prompt) + [True] * TPV + [False] * 3
    assert supervised(s) == [] and s.image_loss
    expected = to_uint8_tensor([generation_view(Image.open(io.BytesIO(r["jpg"])), 32)])
    assert torch.equal(s.pixel_values, expected)
    on = builder(tok, supervise_generation_text=True).build(r, "generation")
    assert on.labels == [IGNORE] + [i if not m else IGNORE for i, m in zip(on.input_ids[1:], on.image_mask[1:])]


def test_cfg_dropout_uses_uncond_prompt(tok):
    always = builder(tok, cfg_dropout=1.0).build(raw(), "generation")
    head = tok.chat_prompt_ids("Here is a random image <UNCOND>:") + [tok.boi_id]
    assert always.input_ids[: len(head)] == head and tok.uncond_id in always.input_ids
    assert generation_prompt_ids(tok, None) == head
    b = builder(tok, cfg_dropout=0.1)
    rec = raw()
    hits = sum(tok.uncond_id in b.build({**rec, "__key__": f"k{i}"}, "generation").input_ids for i in range(400))
    assert 20 <= hits <= 60, hits  # ~10% of 400


def test_understanding_caption_tiles_and_answer_only_supervision(tok):
    r = raw(size=(96, 40))
    b = builder(tok, max_tiles=6, thumbnail=True)
    s = b.build(r, "understanding", "caption")
    views = dynamic_tiles(Image.open(io.BytesIO(r["jpg"])), 32, 6, True)
    assert len(views) > 2 and torch.equal(s.pixel_values, to_uint8_tensor(views))
    assert sum(s.image_mask) == len(views) * TPV and s.input_ids.count(tok.boi_id) == len(views)
    text = re.sub(r"(?<=[>\n]) ", "", tok.decode(s.input_ids, skip_special_tokens=False).replace("<pad>", ""))  # segment-start spaces
    assert text == "<s><|im_start|>user\n" + "<boi><eoi>" * len(views) + f"\n{CAPTION_PROMPT}<|im_end|>\n<|im_start|>assistant\n{r['txt'].decode()}<|im_end|></s>"
    assert supervised(s) == tok.chat_answer_ids(r["txt"].decode())
    assert not s.image_loss


def test_conversation_multi_turn_supervises_every_gpt_turn(tok):
    r = raw()
    conv = json.loads(r["json"])["conversations"]
    s = builder(tok).build(r, "understanding", "conversation")
    answers = [t["value"] for t in conv if t["from"] == "gpt"]
    assert supervised(s) == sum((tok.encode(a) + [tok.im_end_id] for a in answers), []) + [tok.eos_id]
    # image where <image> was, once
    assert s.input_ids.count(tok.boi_id) == 1 and sum(s.image_mask) == TPV
    bad = {**r, "json": json.dumps({"conversations": [{"from": "gpt", "value": "x"}]}).encode()}
    with pytest.raises(SkipSample) as e:
        builder(tok).build(bad, "understanding", "conversation")
    assert e.value.reason == "bad_conversation"


def test_qa_pick_is_seeded_and_field_names_configurable(tok):
    r = raw()
    qa = json.loads(r["json"])["qa"]
    picks = {tuple(supervised(builder(tok, seed=s).build(r, "understanding", "qa"))) for s in range(30)}
    expected = {tuple(tok.chat_answer_ids(p["answer"])) for p in qa}
    assert picks == expected  # every pair reachable, nothing else
    assert builder(tok, seed=3).build(r, "understanding", "qa").input_ids == builder(tok, seed=3).build(r, "understanding", "qa").input_ids
    renamed = {**r, "json": json.dumps({"pairs": [{"q": "Is it?", "a": "yes", "kind": "yes_no"}]}).encode()}
    s = builder(tok).build(renamed, "understanding", "qa", {"qa_field": "pairs", "question_key": "q", "answer_key": "a"})
    assert supervised(s) == tok.chat_answer_ids("yes")
    with pytest.raises(SkipSample, match="missing_qa"):
        builder(tok).build(renamed, "understanding", "qa", {"qa_field": "pairs", "question_key": "q", "answer_key": "a", "qa_kinds": ["count"]})


def test_qa_pairs_per_sample_builds_one_conversation_without_answer_leaks(tok):
    """Several Q/A pairs of one image in one row; a pair whose answer the other's question names never joins it."""
    pairs = [{"question": "What color is the square in the bottom left?", "answer": "yellow", "kind": "color"},
             {"question": "Where is the yellow square?", "answer": "bottom left", "kind": "position"},
             {"question": "How many shapes are there?", "answer": "4", "kind": "count"},
             {"question": "Is the red circle above the yellow square?", "answer": "no", "kind": "relation"},
             {"question": "What character is written in the image?", "answer": "P", "kind": "text"}]
    r = {**raw(), "json": json.dumps({"qa": pairs}).encode()}
    seen = set()
    for seed in range(40):
        s = builder(tok, seed=seed).build(r, "understanding", "qa", {"pairs_per_sample": 3})
        text = re.sub(r"(?<=[>\n]) ", "", tok.decode(s.input_ids, skip_special_tokens=False).replace("<pad>", ""))
        asked = [p for p in pairs if p["question"] in text]
        assert len(asked) == 3, text  # 3 compatible pairs always exist here
        assert not ({"color", "position"} <= {p["kind"] for p in asked}), text  # the leaking pair never together
        assert not ({"color", "relation"} <= {p["kind"] for p in asked}), text  # "yellow" in the relation question
        assert supervised(s) == sum((tok.encode(p["answer"]) + [tok.im_end_id] for p in sorted(asked, key=lambda p: text.index(p["question"]))), []) + [tok.eos_id]
        assert s.input_ids.count(tok.boi_id) == 1 and text.startswith("<s><|im_start|>user\n<boi><eoi>\n")
        seen |= {p["kind"] for p in asked}
    assert seen == {p["kind"] for p in pairs}  # every pair reachable
    one = builder(tok, seed=5).build(r, "understanding", "qa")
    assert one.input_ids == builder(tok, seed=5).build(r, "understanding", "qa", {"pairs_per_sample": 1}).input_ids
    with pytest.raises(ValueError, match="pairs_per_sample=0"):
        builder(tok).build(r, "understanding", "qa", {"pairs_per_sample": 0})


def test_qa_kind_weights_ask_a_kind_in_proportion(tok):
    """`qa_kind_weights` skews the one-pair pick across many samples toward the weighted kinds, in proportion to
    weight x pairs of the kind; without it the pick is the unweighted one, unchanged."""
    pairs = [{"question": "How many shapes are there?", "answer": "2", "kind": "count"},
             {"question": "How many circles are there?", "answer": "1", "kind": "count"},
             {"question": "Where is the red circle?", "answer": "top left", "kind": "position"},
             {"question": "Is there a blue square?", "answer": "yes", "kind": "yes_no"}]
    asked = {"count": 0, "position": 0, "yes_no": 0}
    n = 800
    for i in range(n):
        r = {**raw(key=f"k{i}"), "json": json.dumps({"qa": pairs}).encode()}
        s = builder(tok).build(r, "understanding", "qa", {"qa_kind_weights": {"position": 4, "count": 0.5}})
        kind = next(p["kind"] for p in pairs if supervised(s) == tok.chat_answer_ids(p["answer"]))
        asked[kind] += 1
    # weights: count 2 x 0.5 = 1, position 4, yes_no 1 -> 1/6, 4/6, 1/6 (binomial sd at n=800 about 0.017)
    assert abs(asked["position"] / n - 4 / 6) < 0.06 and abs(asked["count"] / n - 1 / 6) < 0.05, asked
    plain = {**raw(key="k7"), "json": json.dumps({"qa": pairs}).encode()}
    assert builder(tok).build(plain, "understanding", "qa", {"qa_kind_weights": {}}).input_ids == \
        builder(tok).build(plain, "understanding", "qa").input_ids
    with pytest.raises(ValueError, match="qa_kind_weights"):
        builder(tok).build(plain, "understanding", "qa", {"qa_kind_weights": {"position": -1}})


def test_question_first_puts_the_image_after_the_question_exactly_as_answer_prompts_it(tok):
    """`question_first`: the Q/A and caption turns read `{question}\\n<boi>[IMG]<eoi>`; the training prompt (every id
    before the first supervised one) is the id list `answer` decodes from, in both orders."""
    from synergen_lightning.inference import understanding_prompt_ids

    pair = {"question": "Where is the red circle?", "answer": "top left", "kind": "position"}
    r = {**raw(), "json": json.dumps({"qa": [pair]}).encode()}
    for question_first in (False, True):
        s = builder(tok, question_first=question_first).build(r, "understanding", "qa")
        n = next(i for i, lab in enumerate(s.labels) if lab != IGNORE)
        ids, img = understanding_prompt_ids(tok, s.n_views, TPV, pair["question"], question_first=question_first)
        assert (s.input_ids[:n], s.image_mask[:n]) == (ids, img)
        boi, question = s.input_ids.index(tok.boi_id), s.input_ids.index(tok.encode("user\n" + pair["question"])[-1])
        assert (boi > question) == question_first
        assert supervised(s) == tok.chat_answer_ids(pair["answer"])
    cap = builder(tok, question_first=True).build(raw(), "understanding", "caption")
    text = tok.decode(cap.input_ids, skip_special_tokens=False)
    assert text.index("caption") < text.index("<boi>"), text
    with pytest.raises(SkipSample, match="missing_image"):  # a caption sample still needs its image
        no_image = raw()
        no_image.pop("jpg")
        builder(tok, question_first=True).build(no_image, "understanding", "caption")


def test_text_fully_supervised(tok):
    s = builder(tok).build({"__key__": "t", "json": {"text": "red circle."}}, "text")
    assert s.input_ids == [tok.bos_id] + tok.encode("red circle.") + [tok.eos_id]
    assert s.labels == [IGNORE] + s.input_ids[1:]


def test_text_prompt_answer_lines_join_as_the_base_llm_corpus(tok, tmp_path):
    """{"prompt", "answer"} lines (skill_train.jsonl) read as text rows, exactly as the base LLM's corpus reads them."""
    from synergen_lightning.text_tokenizer import iter_corpus_text

    row = {"prompt": "Q: which is smaller, 12 or 62? A:", "answer": 12}
    f = tmp_path / "skill.jsonl"
    f.write_text(json.dumps(row) + "\n")
    s = builder(tok).build({"__key__": "t", "json": row}, "text")
    assert s.input_ids == [tok.bos_id] + tok.encode(next(iter_corpus_text([f]))) + [tok.eos_id]
    assert s.labels == [IGNORE] + s.input_ids[1:]
    with pytest.raises(SkipSample, match="missing_text"):
        builder(tok).build({"__key__": "t", "json": {"prompt": "Q: no answer"}}, "text")


def test_pretokenized_codes_skip_decoding(tok):
    r = raw(size=None, codes=(1, 4, 4))
    r["jpg"] = b"not an image: never decoded"
    s = builder(tok, use_codes=True).build(r, "generation")
    assert s.pixel_values is None and s.codes.dtype == torch.long and s.codes.shape == (1, 4, 4)
    assert torch.equal(s.codes, torch.from_numpy(np.load(io.BytesIO(r["codes.npy"]))).long())
    u = builder(tok, use_codes=True).build(raw(size=None, codes=(3, 4, 4)), "understanding", "caption")
    assert u.n_views == 3 and sum(u.image_mask) == 3 * TPV
    with pytest.raises(SkipSample, match="bad_codes"):
        builder(tok, use_codes=True).build(raw(size=None, codes=(3, 4, 4)), "generation")


@pytest.mark.parametrize("edit,reason,task", [
    (lambda r: r.update(jpg=b"\xff\xd8garbage"), "undecodable_image", "generation"),
    (lambda r: r.pop("txt"), "missing_caption", "generation"),
    (lambda r: r.update(json=b"{oops"), "malformed_json", "understanding"),
    (lambda r: r.pop("jpg"), "missing_image", "generation"),
])
def test_bad_samples_raise_skip_with_reason(tok, edit, reason, task):
    r = raw()
    edit(r)
    with pytest.raises(SkipSample) as e:
        builder(tok).build(r, task, "qa")
    assert e.value.reason == reason


def test_max_seq_len_truncates_answers_never_images(tok):
    r = raw()
    long_answer = {**r, "txt": ("a very long caption " * 40).encode()}
    full = builder(tok).build(long_answer, "understanding", "caption")
    n_img_end = max(i for i, m in enumerate(full.image_mask) if m) + 2
    first_answer = next(i for i, lab in enumerate(full.labels) if lab != IGNORE)
    cut = builder(tok, max_seq_len=first_answer + 5).build(long_answer, "understanding", "caption")
    assert len(cut) == first_answer + 5 and cut.input_ids == full.input_ids[: len(cut)] and sum(cut.image_mask) == TPV
    assert len(supervised(cut)) == 5
    with pytest.raises(SkipSample, match="nothing supervised"):  # the answer would be cut away entirely
        builder(tok, max_seq_len=first_answer).build(long_answer, "understanding", "caption")
    with pytest.raises(SkipSample, match="too_long"):  # would cut the image
        builder(tok, max_seq_len=n_img_end - 1).build(long_answer, "understanding", "caption")
    with pytest.raises(SkipSample, match="too_long"):  # generation: the image is the target
        builder(tok, max_seq_len=10).build(r, "generation")
    t = builder(tok, max_seq_len=5).build({"__key__": "t", "json": {"text": "red circle " * 20}}, "text")
    assert len(t) == 5


def test_collate_pads_right_and_orders_views(tok):
    b = builder(tok, max_tiles=4, thumbnail=True)
    samples = [b.build(raw("g", seed=1), "generation"), b.build(raw("u", (96, 40), seed=2), "understanding", "caption"),
               b.build({"__key__": "t", "json": {"text": "hi"}}, "text")]
    batch = collate(samples, tok.pad_id)
    T = max(len(s) for s in samples)
    assert batch["input_ids"].shape == (3, T) and batch["task"] == ["generation", "understanding", "text"]
    for i, s in enumerate(samples):
        n = len(s)
        assert batch["attention_mask"][i].tolist() == [True] * n + [False] * (T - n)
        assert batch["input_ids"][i, n:].eq(tok.pad_id).all() and batch["labels"][i, n:].eq(IGNORE).all()
        assert batch["labels"][i, :n].tolist() == s.labels
    assert batch["position_ids"][0].tolist() == list(range(T))
    assert torch.equal(batch["pixel_values"], torch.cat([samples[0].pixel_values, samples[1].pixel_values]))
    assert batch["image_loss_mask"].tolist() == [True] + [False] * samples[1].n_views
    assert int(batch["image_mask"].sum()) == batch["pixel_values"].shape[0] * TPV
    assert "image_codes" not in batch
    coded = SequenceBuilder(tok, TPV, 32, cfg_dropout=0.0, use_codes=True).build(raw(size=None, codes=(1, 4, 4)), "generation")
    with pytest.raises(ValueError, match="mixes pretokenized"):
        collate([samples[0], coded], tok.pad_id)


def test_bad_builder_settings_refused(tok):
    with pytest.raises(ValueError, match="max_tiles=0"):
        builder(tok, max_tiles=0)
    with pytest.raises(ValueError, match="tokens_per_view"):
        builder(tok, tokens_per_view=0)
    assert jpeg_bytes(np.random.default_rng(0), 8, 8)[:2] == b"\xff\xd8"


def test_caption_field_list_picks_one_phrasing_per_sample_and_epoch(tok):
    """`caption_ext: null` + `caption_field` naming a list (the world's `captions`): each sample and epoch
    draws one phrasing, seeded; over many seeds every phrasing is reachable and nothing else."""
    phrasings = ["a red circle", "two circles", "a circle left of a square"]
    r = {**raw(), "json": json.dumps({"captions": phrasings + ["", 3]}).encode()}
    opts = {"caption_ext": None, "caption_field": "captions"}

    def drawn(b):
        ids = b.build(r, "generation", options=opts).input_ids
        return next(p for p in phrasings if ids[: len(generation_prompt_ids(tok, p))] == generation_prompt_ids(tok, p))

    assert {drawn(builder(tok, seed=s)) for s in range(40)} == set(phrasings)
    b = builder(tok, seed=1)
    first = drawn(b)
    assert drawn(builder(tok, seed=1)) == first  # seeded
    by_epoch = set()
    for e in range(20):
        b.epoch = e
        by_epoch.add(drawn(b))
    assert len(by_epoch) > 1  # re-drawn each epoch
    with pytest.raises(SkipSample, match="missing_caption"):
        builder(tok).build({**r, "json": json.dumps({"captions": []}).encode()}, "generation", options=opts)
