"""HF import/export parity against transformers' own Llama and Qwen2 (tiny random models)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from synergen_lightning.hf_import import (
    HFImportError,
    export_hf,
    load_hf,
    pack_internlm2_wqkv,
    read_hf_config,
    unpack_internlm2_wqkv,
)

transformers = pytest.importorskip("transformers")

KW = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-5)


def make_hf(kind, path, **extra):
    torch.manual_seed(0)
    cfg_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                          "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    model = model_cls(cfg_cls(**dict(KW, **extra))).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial weights: norms != 1, biases != 0, logits of order 1
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, make_hf(request.param, path), path


def test_logits_match_transformers_text_and_all_image(hf_pair):
    kind, hf, path = hf_pair
    ours = load_hf(path).eval()
    assert ours.config.qkv_bias == (kind == "qwen2") and ours.config.rope_theta == 5000.0
    ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        ref = hf(ids).logits
        assert ref.std() > 0.1
        torch.testing.assert_close(ours.forward_ids(ids), ref, atol=1e-5, rtol=1e-5)
        everything_image = torch.ones_like(ids, dtype=torch.bool)
        torch.testing.assert_close(ours.forward_ids(ids, image_mask=everything_image), ref, atol=1e-5, rtol=1e-5)


def test_cached_greedy_decoding_matches_generate(hf_pair):
    kind, hf, path = hf_pair
    ours = load_hf(path).eval()
    ids = torch.randint(0, 97, (3, 6))
    ref = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)[:, 6:]
    assert torch.equal(ours.generate_greedy(ids, 12), ref)


def test_export_round_trips_through_transformers(hf_pair, tmp_path):
    kind, hf, path = hf_pair
    ours = load_hf(path).eval()
    export_hf(ours, tmp_path / "out", model_type=kind)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
    a, b = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tied_embeddings_import(tmp_path):
    hf = make_hf("qwen2", tmp_path, tie_word_embeddings=True)
    ours = load_hf(tmp_path).eval()
    assert ours.lm_head.weight is ours.embed_tokens.weight
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_ids(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_internlm2_packed_wqkv_layout(tmp_path):
    """Pack a Llama checkpoint into InternLM2's names and per-KV-group wqkv layout; same logits."""
    src = tmp_path / "llama"
    hf = make_hf("llama", src)
    config, _ = read_hf_config(src)
    sd = load_file(str(src / "model.safetensors"))
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    names = {"self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
             "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        q, k, v = (sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv")
        out[p + "attention.wqkv.weight"] = packed = pack_internlm2_wqkv(q, k, v, config)
        # the documented layout, written out by hand for one group: [q heads of group 0, k0, v0, q heads of group 1, ...]
        d, qpk = config.head_dim, config.num_heads // config.num_kv_heads
        assert torch.equal(packed[: qpk * d], q[: qpk * d]) and torch.equal(packed[qpk * d:(qpk + 1) * d], k[:d])
        assert torch.equal(packed[(qpk + 1) * d:(qpk + 2) * d], v[:d])
        for a, b in zip((q, k, v), unpack_internlm2_wqkv(packed, config)):
            assert torch.equal(a, b)
        for old, new in names.items():
            out[p + new + ".weight"] = sd[p + old + ".weight"]
    dst = tmp_path / "internlm2"
    dst.mkdir()
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"))
    cfg = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": 97, "hidden_size": 64,
           "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "rms_norm_eps": 1e-5, "rope_theta": 5000.0, "bias": False, "hidden_act": "silu"}
    (dst / "config.json").write_text(json.dumps(cfg))
    ours = load_hf(dst).eval()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_ids(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.fixture
def llama_dir(tmp_path):
    make_hf("llama", tmp_path / "m")
    return tmp_path / "m"


def _edit_weights(d, fn):
    sd = load_file(str(d / "model.safetensors"))
    fn(sd)
    save_file(sd, str(d / "model.safetensors"))


def test_bad_directories_are_refused_with_file_and_tensor(llama_dir, tmp_path):
    with pytest.raises(HFImportError, match="config.json: missing"):
        load_hf(tmp_path)
    (llama_dir / "model.safetensors").rename(tmp_path / "w.safetensors")
    with pytest.raises(HFImportError, match="no model.safetensors"):
        load_hf(llama_dir)
    (tmp_path / "w.safetensors").rename(llama_dir / "model.safetensors")

    cfg = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(HFImportError, match="model_type='gpt2'.*not supported"):
        load_hf(llama_dir)
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    (llama_dir / "config.json").write_text("{not json")
    with pytest.raises(HFImportError, match=r"config.json: not JSON \(Expecting property name"):
        load_hf(llama_dir)
    (llama_dir / "config.json").write_text(json.dumps(cfg))

    _edit_weights(llama_dir, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(HFImportError, match=r"missing tensors: layers\.1\.text_ffn\.up_proj\.weight \(HF model\.layers\.1\.mlp\.up_proj\.weight, expected shape \(96, 64\)"):
        load_hf(llama_dir)


def test_unexpected_and_misshapen_tensors_are_refused(llama_dir):
    _edit_weights(llama_dir, lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(HFImportError, match=r"unexpected tensors.*model\.layers\.0\.extra\.weight.*model\.safetensors"):
        load_hf(llama_dir)
    _edit_weights(llama_dir, lambda sd: sd.pop("model.layers.0.extra.weight"))
    _edit_weights(llama_dir, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(65)))
    with pytest.raises(HFImportError, match=r"model\.safetensors: tensor model\.norm\.weight has shape \(65,\), expected \(64,\)"):
        load_hf(llama_dir)


def test_import_hf_cli_writes_a_loadable_checkpoint(llama_dir, tmp_path):
    from synergen_lightning.cli import main
    from synergen_lightning.llm import MMoELLM

    assert main(["import-hf", "--hf-dir", str(llama_dir), "--out", str(tmp_path / "llm.ckpt")]) == 0
    llm = MMoELLM.load_from_checkpoint(tmp_path / "llm.ckpt").eval()
    ref = load_hf(llama_dir).eval()
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(llm(ids), ref.forward_ids(ids))
    for layer in llm.model.layers:
        assert torch.equal(layer.vision_ffn.gate_proj.weight, layer.text_ffn.gate_proj.weight)
