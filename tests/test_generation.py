import numpy as np
import pytest
import torch

from synergen_lightning.inference import answer, generate_codes, generate_images, understanding_prompt_ids
from tests.test_system_helpers import SPECIAL, tiny_model


class CharTokenizer:
    """A stand-in TextTokenizer: one id per character (10..63), the ids of tests.test_system_helpers.SPECIAL."""

    bos_id, eos_id, pad_id, boi_id, eoi_id, uncond_id, im_start_id, im_end_id = (
        SPECIAL[k] for k in ("bos", "eos", "pad", "boi", "eoi", "uncond", "im_start", "im_end"))

    def encode(self, s):
        return [10 + ord(c) % 54 for c in s]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + (i - 10) % 26) for i in ids if i >= 10)


class GridTokenizer:
    codebook_size, downsample = 16, 4

    def encode(self, x):
        return (x.mean(1)[:, ::4, ::4] * 15).round().long()

    def decode(self, codes):
        img = codes.float().div(15).repeat_interleave(4, -1).repeat_interleave(4, -2)
        return img[:, None].expand(-1, 3, -1, -1)


def _model(**kw):
    m = tiny_model(**kw).eval()
    m.set_text_tokenizer(CharTokenizer())
    m.set_image_tokenizer(GridTokenizer())
    return m


def test_cached_equals_uncached_at_temperature_zero_with_and_without_cfg():
    model = _model()
    from synergen_lightning.data.sequences import generation_prompt_ids

    tok = CharTokenizer()
    rows = [generation_prompt_ids(tok, "a red circle"), generation_prompt_ids(tok, "two blue squares left")]
    uncond = generation_prompt_ids(tok, None)
    for cfg in (None, 3.0):
        a = generate_codes(model, rows, uncond, cfg, temperature=0.0, use_cache=True)
        b = generate_codes(model, rows, uncond, cfg, temperature=0.0, use_cache=False)
        assert a.shape == (2, 4, 4)
        assert torch.equal(a, b)


def test_seed_determinism_and_images():
    model = _model()
    a = generate_images(model, ["a red circle"], num=2, temperature=1.0, seed=3, output="codes")
    b = generate_images(model, ["a red circle"], num=2, temperature=1.0, seed=3, output="codes")
    c = generate_images(model, ["a red circle"], num=2, temperature=1.0, seed=4, output="codes")
    assert torch.equal(a, b) and not torch.equal(a, c)
    imgs = generate_images(model, ["a red circle", "a square"], num=1, seed=0)
    assert len(imgs) == 2 and imgs[0].size == (16, 16)


def test_images_are_decoded_a_batch_at_a_time_and_equal_one_decode_of_all_codes():
    """Pixels of at most `batch_size` images exist at once (Emu3's decoder holds 10 GiB per 512-px image); the
    images are those of the drawn codes decoded together, in prompt-major order."""
    model = _model()
    decoded = []
    decode = model.image_tokenizer.decode
    model.image_tokenizer.decode = lambda codes: decoded.append(len(codes)) or decode(codes)
    kwargs = dict(num=3, seed=5, batch_size=2)
    images = generate_images(model, ["a red circle", "a square"], output="tensor", **kwargs)
    assert decoded == [2, 2, 2]
    codes = generate_images(model, ["a red circle", "a square"], output="codes", **kwargs)
    torch.testing.assert_close(images, decode(codes).clamp(0, 1).float(), rtol=0, atol=0)
    pil = generate_images(model, ["a red circle", "a square"], **kwargs)
    as_pixels = torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in pil])
    assert torch.equal(as_pixels, (images * 255).round().to(torch.uint8))


def test_cfg_is_one_batched_pass_per_step():
    model = _model()
    sizes = []
    hook = model.llm.model.register_forward_hook(lambda m, i, o: sizes.append(o.shape[0]))
    generate_images(model, ["a", "b", "c"], num=1, cfg_scale=7.5, seed=0, output="codes")
    hook.remove()
    P = model.tokens_per_view
    assert sizes == [6] * (1 + P + 1)  # prefill, one step per patch, <eoi>; cond + uncond rows together


def test_prompt_longer_than_context_is_an_error():
    model = _model()
    with pytest.raises(ValueError, match=r"exceeds the context of 128 tokens; shorten the prompt"):
        generate_images(model, ["x" * 200], output="codes")


@pytest.mark.parametrize(("kw", "named"), [({"temperature": -1.0}, "temperature=-1.0"), ({"top_p": 1.5}, "top_p=1.5"),
                                           ({"top_k": 0}, "top_k=0"), ({"batch_size": 0}, "batch_size=0"),
                                           ({"num": 0}, "num=0")])
def test_a_value_no_draw_can_use_is_an_error_naming_it(kw, named):
    """A negative temperature would draw greedily and top_p > 1 truncate nothing, both without a word."""
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        generate_images(_model(), ["a"], **kw)


@pytest.mark.parametrize("question_first", [False, True])
def test_answer_matches_uncached_greedy_reference(question_first):
    """`answer` prompts in the model's own order (`question_first`), batched and cached, as the step-by-step
    uncached greedy decode of that prompt does."""
    model = _model(question_first=question_first)
    codes = torch.randint(0, 16, (2, 4, 4))
    questions = ["what colour?", "how many shapes are there"]
    got = answer(model, None, questions, max_new_tokens=5, codes=codes)
    tok = CharTokenizer()
    for r, q in enumerate(questions):
        ids, img = understanding_prompt_ids(tok, 1, model.tokens_per_view, q, question_first=question_first)
        before_image = "user\n" + (q + "\n" if question_first else "")  # then <boi> and the image's slots
        assert img.index(True) == 2 + len(tok.encode(before_image)) + 1
        out = []
        for _ in range(5):
            t = torch.tensor([ids])
            hidden = model.llm.model(model.embed_inputs(t, torch.tensor([img]), codes[r:r + 1]), image_mask=torch.tensor([img]))
            nxt = int(model.llm.model.logits(hidden[:, -1]).argmax(-1))
            if nxt in (tok.im_end_id, tok.eos_id):
                break
            out.append(nxt)
            ids, img = ids + [nxt], img + [False]
        assert got[r] == tok.decode(out).strip()


def test_none_prompt_draws_from_the_unconditional_prompt():
    from synergen_lightning.data.sequences import generation_prompt_ids

    model = _model()
    uncond = generation_prompt_ids(CharTokenizer(), None)
    ref = generate_codes(model, [uncond] * 4, None, None, temperature=1.0, generator=torch.Generator().manual_seed(0))
    got = generate_images(model, [None] * 4, cfg_scale=None, temperature=1.0, seed=0, output="codes")
    assert torch.equal(got, ref)
    seen = []  # the prefill is the <UNCOND> prompt itself
    hook = model.llm.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(i[0][:, -len(uncond):].tolist()))
    generate_images(model, [None], cfg_scale=None, temperature=1.0, seed=0, output="codes")
    hook.remove()
    assert seen[0] == [uncond]


def test_objects_per_image_counts_the_shapes_of_rendered_scenes():
    from synergen_lightning.eval.demo_report import objects_per_image
    from synergen_lightning.world.scene import render_scene, sample_scene

    scenes = [sample_scene(s, canvas=128) for s in range(6)]
    expected = sum(len(s.objects) for s in scenes) / len(scenes)
    assert objects_per_image([render_scene(s) for s in scenes]) == pytest.approx(expected)
    assert objects_per_image([]) == 0.0


def test_caption_floor_scores_the_unconditional_images_with_geneval_seeds(monkeypatch):
    import synergen_lightning.eval.demo_report as demo_report
    import synergen_lightning.world.scorer as scorer
    from synergen_lightning.eval.demo_report import caption_floor

    model = _model()
    prompts = [{"tag": "single_object", "prompt": f"a circle {i}", "include": [{"class": "circle", "count": 1}],
                "exclude": []} for i in range(5)]
    seen = []
    monkeypatch.setattr(demo_report, "score_images", lambda images, ps: seen.append(images) or scorer.summarize(
        [(p["tag"], True) for p in ps]))
    report = caption_floor(model, prompts, seed=7, batch_size=2)
    assert report["overall"] == 1.0 and report["num_images"] == 5 and "objects_per_image" in report
    # chunk k of the prompts is drawn with seed + k, as geneval_suite draws the conditional images
    chunks = [generate_images(model, [None] * n, cfg_scale=None, seed=7 + k, output="codes") for k, n in enumerate((2, 2, 1))]
    tok = model.image_tokenizer
    import numpy as np

    got = torch.stack([torch.from_numpy(np.asarray(im)[..., 0].copy()) for im in seen[0]])
    ref = (tok.decode(torch.cat(chunks)).clamp(0, 1)[:, 0] * 255).round().to(torch.uint8)
    assert torch.equal(got, ref)
