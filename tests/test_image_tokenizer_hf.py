"""HF adapters: tiny random Emu3 / Chameleon VQ-VAEs saved with save_pretrained, loaded through the adapter,
compared with calling transformers directly."""

import json
from functools import partial

import pytest
import torch

transformers = pytest.importorskip("transformers")

from memory_check import mem_tracker_peak  # noqa: E402
from standins_2b import write_published_emu3_dir  # noqa: E402  (BAAI/Emu3-VisionTokenizer's layout)
from synergen_lightning.image_tokenizer.loading import build_image_tokenizer, load_image_tokenizer  # noqa: E402
from synergen_lightning.image_tokenizer.protocol import ImageTokenizer  # noqa: E402


def _emu3_dir(tmp_path):
    cfg = transformers.Emu3VQVAEConfig(codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32,
                                       channel_multiplier=[1, 2, 2, 2], num_res_blocks=1, attn_resolutions=[],
                                       temporal_downsample_factor=4, hidden_size=64)
    torch.manual_seed(0)
    model = transformers.Emu3VQVAE(cfg).eval()
    model.save_pretrained(tmp_path / "emu3")
    return model, tmp_path / "emu3"


def test_emu3_adapter_matches_transformers(tmp_path):
    model, path = _emu3_dir(tmp_path)
    tok = load_image_tokenizer(path)
    assert isinstance(tok, ImageTokenizer)
    assert (tok.codebook_size, tok.downsample) == (64, 8)
    images = torch.rand(2, 3, 32, 48)
    codes = tok.encode(images)
    assert codes.shape == (2, 4, 6) and codes.dtype == torch.long
    with torch.no_grad():
        ref = model.encode(images * 2 - 1, image_sizes=torch.tensor([[32, 48]] * 2)).image_tokens
        ref_pixels = model.decode(torch.stack(ref))
    assert torch.equal(codes, torch.stack(ref))
    assert len(codes.unique()) > 1  # a random model still spreads over several codes, so equality means something
    recon = tok.decode(codes)
    assert recon.shape == (2, 3, 32, 48)
    torch.testing.assert_close(recon, ((ref_pixels + 1) / 2).clamp(0, 1))


def test_emu3_adapter_holds_one_calls_activations_whatever_the_batch(tmp_path, monkeypatch):
    """A batch runs `PIXELS_PER_CALL` pixels per call of the model (Emu3 holds ~4 / 10 GiB per 512-px view encoding /
    decoding: bench/tokenizer_memory.py): the codes and pixels of transformers' one call over the whole batch, the
    activation peak of one call's views (`plan.activation_peak`'s count over real tensors; MemTracker agrees on
    one call)."""
    from synergen_lightning.image_tokenizer.hf_adapters import Emu3VQTokenizer
    from synergen_lightning.plan import activation_peak

    model, path = _emu3_dir(tmp_path)
    tok = load_image_tokenizer(path)
    monkeypatch.setattr(Emu3VQTokenizer, "PIXELS_PER_CALL", 2 * 32 * 32)  # two 32-px views per call
    images = torch.rand(6, 3, 32, 32)
    calls = []
    encode, decode = model.encode, model.decode
    monkeypatch.setattr(tok.model, "encode", lambda x, **kw: calls.append(("encode", len(x))) or encode(x, **kw))
    monkeypatch.setattr(tok.model, "decode", lambda c: calls.append(("decode", len(c))) or decode(c))
    codes = tok.encode(images)
    pixels = tok.decode(codes)
    assert calls == [("encode", 2)] * 3 + [("decode", 2)] * 3
    with torch.no_grad():
        ref = torch.stack(encode(images * 2 - 1, image_sizes=torch.tensor([[32, 32]] * 6)).image_tokens)
        ref_pixels = ((decode(ref) + 1) / 2).clamp(0, 1)
    assert torch.equal(codes, ref)
    torch.testing.assert_close(pixels, ref_pixels)

    sizes = torch.tensor([[32, 32]] * 6)
    for ours, whole, x in ((tok.encode, lambda v: encode(v * 2 - 1, image_sizes=sizes), images),
                           (tok.decode, decode, codes)):
        one_call, batch, unsplit = (activation_peak(partial(ours, x[:2])), activation_peak(partial(ours, x)),
                                    activation_peak(partial(whole, x)))
        assert one_call <= batch < 1.5 * one_call  # one call's activations (and the batch's outputs)
        assert unsplit > 2.5 * one_call  # what one call over the six views holds
        assert unsplit == pytest.approx(mem_tracker_peak(partial(whole, x), tok.model), rel=0.02)


def test_emu3_adapter_reads_the_published_vision_tokenizer_layout(tmp_path):
    model, _ = _emu3_dir(tmp_path)
    tok = load_image_tokenizer(write_published_emu3_dir(model, tmp_path / "published"), expected_codebook_size=64)
    assert (tok.codebook_size, tok.downsample) == (64, 8)
    images = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        ref = torch.stack(model.encode(images * 2 - 1, image_sizes=torch.tensor([[32, 48]] * 2)).image_tokens)
        ref_pixels = model.decode(ref)
    codes = tok.encode(images)
    assert torch.equal(codes, ref) and len(codes.unique()) > 1
    torch.testing.assert_close(tok.decode(codes), ((ref_pixels + 1) / 2).clamp(0, 1))


def test_emu3_published_layout_with_other_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = _emu3_dir(tmp_path)
    path = write_published_emu3_dir(model, tmp_path / "published")
    state = load_file(str(path / "model.safetensors"))
    state["encoder.extra.weight"] = state.pop(next(k for k in state if k.startswith("encoder.")))
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="does not match transformers' Emu3VQVAE"):
        load_image_tokenizer(path)


def test_emu3_adapter_uses_preprocessor_mean_std(tmp_path):
    model, path = _emu3_dir(tmp_path)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    tok = load_image_tokenizer(path)
    images = torch.rand(1, 3, 16, 16)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model.encode((images - m) / s, image_sizes=torch.tensor([[16, 16]])).image_tokens
    assert torch.equal(tok.encode(images), torch.stack(ref))


def test_emu3_adapter_takes_images_and_codes_from_any_device():
    """As VQTokenizer: inputs go to the tokenizer's device (a GPU in training, a CPU batch or code grid in scripts).
    The meta device stands in for the GPU: a CPU input meeting it unmoved raises."""
    from torch import nn

    from synergen_lightning.image_tokenizer.hf_adapters import Emu3VQTokenizer

    class Stub(nn.Module):
        dtype = torch.float32

        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1))

        def decode(self, codes):
            assert codes.device == self.weight.device, codes.device
            return torch.zeros(codes.shape[0], 3, 8 * codes.shape[1], 8 * codes.shape[2], device=codes.device)

    tok = Emu3VQTokenizer(Stub(), torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), codebook_size=64, downsample=8)
    tok.to("meta")
    assert tok.to_model_range(torch.rand(2, 3, 16, 16)).device.type == "meta"
    assert tok.decode(torch.zeros(2, 2, 2, dtype=torch.long)).shape == (2, 3, 16, 16)


def test_chameleon_adapter_matches_transformers(tmp_path):
    cfg = transformers.ChameleonVQVAEConfig(embed_dim=8, num_embeddings=32, latent_channels=8, resolution=32,
                                            base_channels=32, channel_multiplier=[1, 2, 2], num_res_blocks=1,
                                            attn_resolutions=[])
    torch.manual_seed(0)
    model = transformers.ChameleonVQVAE(cfg).eval()
    model.save_pretrained(tmp_path / "cham")
    tok = load_image_tokenizer(tmp_path / "cham")
    assert (tok.codebook_size, tok.downsample) == (32, 4)
    images = torch.rand(3, 3, 32, 32)
    codes = tok.encode(images)
    with torch.no_grad():
        ref = model.encode(images * 2 - 1).image_tokens.view(3, 8, 8)
    assert torch.equal(codes, ref)
    with pytest.raises(NotImplementedError, match="no decoder"):
        tok.decode(codes)


def test_hf_adapter_refusals(tmp_path):
    _, path = _emu3_dir(tmp_path)
    with pytest.raises(ValueError, match="codebook_size 64 but the recipe expects 512"):
        load_image_tokenizer(path, expected_codebook_size=512)
    tok = load_image_tokenizer(path)
    with pytest.raises(ValueError, match="not divisible by the downsample factor 8"):
        tok.encode(torch.rand(1, 3, 20, 16))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tok.decode(torch.full((1, 2, 2), 64))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama'.*'Emu3VisionVQ'"):
        load_image_tokenizer(tmp_path / "other")


def test_built_from_config_alone_the_adapters_have_the_loaded_ones_shapes(tmp_path):
    """`build_image_tokenizer` (what `synergen plan` counts) builds each layout on the meta device from its config
    alone: the same kind of adapter, codebook, downsample and every tensor's shape and dtype as the loaded one."""
    emu3, path = _emu3_dir(tmp_path)
    cfg = transformers.ChameleonVQVAEConfig(embed_dim=8, num_embeddings=32, latent_channels=8, resolution=32,
                                            base_channels=32, channel_multiplier=[1, 2, 2], num_res_blocks=1,
                                            attn_resolutions=[])
    transformers.ChameleonVQVAE(cfg).save_pretrained(tmp_path / "cham")
    for d in (path, write_published_emu3_dir(emu3, tmp_path / "published"), tmp_path / "cham"):
        loaded, built = load_image_tokenizer(d), build_image_tokenizer(d)
        assert type(built) is type(loaded)
        assert (built.codebook_size, built.downsample) == (loaded.codebook_size, loaded.downsample)
        shapes = {k: (v.shape, v.dtype, v.device.type) for k, v in built.state_dict(keep_vars=True).items()}
        assert shapes == {k: (v.shape, v.dtype, "meta") for k, v in loaded.state_dict(keep_vars=True).items()}
        assert all(t.device.type == "meta" for t in built.buffers())  # the adapter's mean and std too
