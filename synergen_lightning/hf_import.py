"""Import a local Hugging Face Llama / Qwen2 / InternLM2 directory into an `MMoETransformer`, and
export the text weights back to the Hugging Face Llama / Qwen2 layout.

Reads `config.json` and `model.safetensors` (or a sharded `model.safetensors.index.json`); never
downloads. Every tensor name is checked both ways (missing and unexpected) and every shape is
checked against what the config implies; errors name the file, the tensor and the expected shape.
The vision FFNs start as copies of the text FFNs. `hf_row_sources` reads the same tensors by row ranges, so a rank
of a sharded model reads only the rows of its own shards.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from synergen_lightning.models.config import LLMConfig
from synergen_lightning.models.mmoe import MMoETransformer

SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "internlm2": "InternLM2ForCausalLM"}

# HF name (regex on the per-layer suffix) -> our name; InternLM2's wqkv is unpacked separately
_LAYER_MAP = {
    "llama": {
        "self_attn.q_proj.weight": "attn.q_proj.weight",
        "self_attn.k_proj.weight": "attn.k_proj.weight",
        "self_attn.v_proj.weight": "attn.v_proj.weight",
        "self_attn.q_proj.bias": "attn.q_proj.bias",
        "self_attn.k_proj.bias": "attn.k_proj.bias",
        "self_attn.v_proj.bias": "attn.v_proj.bias",
        "self_attn.o_proj.weight": "attn.o_proj.weight",
        "mlp.gate_proj.weight": "text_ffn.gate_proj.weight",
        "mlp.up_proj.weight": "text_ffn.up_proj.weight",
        "mlp.down_proj.weight": "text_ffn.down_proj.weight",
        "input_layernorm.weight": "input_norm.weight",
        "post_attention_layernorm.weight": "post_attn_norm.weight",
    },
    "internlm2": {
        "attention.wo.weight": "attn.o_proj.weight",
        "feed_forward.w1.weight": "text_ffn.gate_proj.weight",
        "feed_forward.w3.weight": "text_ffn.up_proj.weight",
        "feed_forward.w2.weight": "text_ffn.down_proj.weight",
        "attention_norm.weight": "input_norm.weight",
        "ffn_norm.weight": "post_attn_norm.weight",
    },
}
_LAYER_MAP["qwen2"] = _LAYER_MAP["llama"]
_TOP_MAP = {
    "llama": {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight"},
    "internlm2": {"model.tok_embeddings.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight", "output.weight": "lm_head.weight"},
}
_TOP_MAP["qwen2"] = _TOP_MAP["llama"]
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # old checkpoints saved the RoPE buffer


class HFImportError(ValueError):
    """A local HF directory that cannot be imported (the message says which file/tensor and why)."""


def read_hf_config(hf_dir: str | Path) -> tuple[LLMConfig, str]:
    """config.json -> (LLMConfig, model_type); refuses what the trunk does not implement."""
    hf_dir = Path(hf_dir)
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise HFImportError(f"{hf_dir}: not a directory; pass the local folder that holds config.json and *.safetensors")
    if not path.is_file():
        raise HFImportError(f"{path}: missing; a Hugging Face model directory needs config.json (save it with save_pretrained)")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as exc:
        raise HFImportError(f"{path}: not JSON ({exc}); save the model again with save_pretrained") from None
    if not isinstance(cfg, dict):
        raise HFImportError(f"{path}: not a JSON object; save the model again with save_pretrained")
    model_type = cfg.get("model_type", "")
    archs = cfg.get("architectures") or []
    if model_type not in SUPPORTED:
        raise HFImportError(
            f"{path}: model_type={model_type!r} (architectures={archs}) is not supported; supported: {sorted(SUPPORTED)}"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise HFImportError(f"{path}: hidden_act={cfg['hidden_act']!r} is not supported; the trunk's FFN is SwiGLU (silu)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise HFImportError(f"{path}: rope type {rope_type!r} is not supported; only plain RoPE (rope_type 'default')")
    if cfg.get("use_sliding_window"):
        raise HFImportError(f"{path}: use_sliding_window=true is not supported; set it false (full attention)")
    if model_type == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise HFImportError(f"{path}: attention_bias/mlp_bias=true (bias on o_proj/MLP) is not supported by the trunk")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    heads = cfg["num_attention_heads"]
    config = LLMConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        intermediate_size=cfg["intermediate_size"],
        rope_theta=float(theta),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias") or cfg.get("bias")),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        head_dim=cfg.get("head_dim"),
    )
    if model_type == "internlm2" and cfg.get("bias"):
        raise HFImportError(f"{path}: InternLM2 with bias=true (bias on wqkv/wo) is not supported")
    return config, model_type


def _safetensors_files(hf_dir: Path) -> list[str]:
    """The safetensors files of a HF directory (from its index when it has one), each checked to exist."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if not files:
        extra = " (found pytorch_model.bin: re-save with save_pretrained(safe_serialization=True))" if list(
            hf_dir.glob("*.bin")) else ""
        raise HFImportError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json{extra}")
    for name in files:
        if not (hf_dir / name).is_file():
            raise HFImportError(f"{hf_dir / name}: listed in model.safetensors.index.json but missing")
    return files


def read_hf_tensors(hf_dir: str | Path) -> dict[str, tuple[Tensor, str]]:
    """All tensors of the safetensors files -> {name: (tensor, file name)}."""
    hf_dir = Path(hf_dir)
    out: dict[str, tuple[Tensor, str]] = {}
    for name in _safetensors_files(hf_dir):
        with safe_open(str(hf_dir / name), framework="pt") as f:
            for key in f.keys():
                out[key] = (f.get_tensor(key), name)
    return out


def unpack_internlm2_wqkv(wqkv: Tensor, config: LLMConfig) -> tuple[Tensor, Tensor, Tensor]:
    """InternLM2's packed `wqkv` [(kv * (q_per_kv + 2) * head_dim), hidden], grouped per KV head:
    its q heads, then its k head, then its v head -> q, k, v weights in the Llama layout."""
    q_per_kv = config.num_heads // config.num_kv_heads
    w = rearrange(wqkv, "(g s d) h -> g s d h", g=config.num_kv_heads, s=q_per_kv + 2, d=config.head_dim)
    q = rearrange(w[:, :q_per_kv], "g s d h -> (g s d) h")
    k = rearrange(w[:, -2], "g d h -> (g d) h")
    v = rearrange(w[:, -1], "g d h -> (g d) h")
    return q, k, v


def pack_internlm2_wqkv(q: Tensor, k: Tensor, v: Tensor, config: LLMConfig) -> Tensor:
    """Inverse of `unpack_internlm2_wqkv` (used to test the layout and to export)."""
    q = rearrange(q, "(g s d) h -> g s d h", g=config.num_kv_heads, d=config.head_dim)
    k = rearrange(k, "(g d) h -> g 1 d h", g=config.num_kv_heads)
    v = rearrange(v, "(g d) h -> g 1 d h", g=config.num_kv_heads)
    return rearrange(torch.cat([q, k, v], dim=1), "g s d h -> (g s d) h")


def _hf_plan(shapes: dict[str, tuple[tuple[int, ...], str]], config: LLMConfig, model_type: str, hf_dir: Path,
             expected: dict[str, torch.Size]) -> dict[str, tuple[str, int | None]]:
    """{our key: (HF name, part)} for HF tensors given as {name: (shape, file name)}, strictly: every HF tensor used,
    every ours found, every shape the config's. part: None = the whole tensor; 0 / 1 / 2 = the q / k / v rows of
    InternLM2's packed wqkv."""
    top, per_layer = _TOP_MAP[model_type], _LAYER_MAP[model_type]
    layer_re = re.compile(r"model\.layers\.(\d+)\.(.+)$")
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    plan: dict[str, tuple[str, int | None]] = {}
    unexpected = []
    for name, (shape, fname) in shapes.items():
        if _IGNORED.match(name):
            continue
        m = layer_re.match(name)
        if name in top:
            ours = [(top[name], None, shape)]
        elif m and m.group(2) in per_layer:
            ours = [(f"layers.{m.group(1)}.{per_layer[m.group(2)]}", None, shape)]
        elif m and model_type == "internlm2" and m.group(2) == "attention.wqkv.weight":
            i = m.group(1)
            want = (q_rows + 2 * kv_rows, config.hidden_size)
            if tuple(shape) != want:
                raise HFImportError(f"{hf_dir / fname}: tensor {name} has shape {tuple(shape)}, expected {want}")
            ours = [(f"layers.{i}.attn.{p}_proj.weight", part, (rows, config.hidden_size))
                    for part, (p, rows) in enumerate((("q", q_rows), ("k", kv_rows), ("v", kv_rows)))]
        else:
            unexpected.append(f"{name} (in {hf_dir / fname})")
            continue
        for key, part, value_shape in ours:
            if key not in expected:
                unexpected.append(f"{name} (in {hf_dir / fname}; maps to {key}, which this config does not have)")
                continue
            if tuple(value_shape) != tuple(expected[key]):
                raise HFImportError(
                    f"{hf_dir / fname}: tensor {name} has shape {tuple(value_shape)}, expected {tuple(expected[key])} "
                    f"from config.json; the config and the weights disagree"
                )
            plan[key] = (name, part)
    if unexpected:
        raise HFImportError(f"unexpected tensors for model_type={model_type!r}: {', '.join(unexpected[:5])}"
                            + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""))
    if config.tie_word_embeddings:
        plan.pop("lm_head.weight", None)  # tied: the embedding is the head
    missing = [k for k in expected if k not in plan and not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing:
        inv_top = {v: k for k, v in top.items()}
        inv_layer = {v: k for k, v in per_layer.items()}
        names = []
        for k in missing[:5]:
            m = re.match(r"layers\.(\d+)\.(.+)$", k)
            if m and m.group(2) in inv_layer:
                hf = f"model.layers.{m.group(1)}.{inv_layer[m.group(2)]}"
            elif m and model_type == "internlm2" and ".attn." in k:
                hf = f"model.layers.{m.group(1)}.attention.wqkv.weight"
            else:
                hf = inv_top.get(k, k)
            names.append(f"{k} (HF {hf}, expected shape {tuple(expected[k])})")
        raise HFImportError(f"{hf_dir}: missing tensors: {', '.join(names)}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return plan


def hf_to_state_dict(tensors: dict[str, tuple[Tensor, str]], config: LLMConfig, model_type: str,
                     hf_dir: Path, expected: dict[str, torch.Size]) -> dict[str, Tensor]:
    """Map HF names to ours (text side only), strictly: every HF tensor used, every ours found."""
    plan = _hf_plan({n: (tuple(t.shape), f) for n, (t, f) in tensors.items()}, config, model_type, hf_dir, expected)
    unpacked: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    sd: dict[str, Tensor] = {}
    for key, (name, part) in plan.items():
        t = tensors[name][0]
        if part is None:
            sd[key] = t
        else:
            if name not in unpacked:
                unpacked[name] = unpack_internlm2_wqkv(t, config)
            sd[key] = unpacked[name][part]
    return sd


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsRows:
    """Row ranges of the tensors of one safetensors file, read with plain file reads (no mmap): safetensors stores
    each tensor contiguously, so rows [start, stop) are one byte range, and a rank that holds those rows of a sharded
    model reads those bytes only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.data_start, self.tensors = 8 + size, header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of a tensor (of a 1-D tensor: its elements), in the stored dtype."""
        info = self.tensors[name]
        dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], list(info["shape"]) or [1]
        start, stop = max(0, start), min(stop, shape[0])
        count = max(0, stop - start)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        if count == 0:
            return torch.empty((0, *shape[1:]), dtype=dtype)
        buf = bytearray(count * row_bytes)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + info["data_offsets"][0] + start * row_bytes)
            if f.readinto(buf) != len(buf):
                raise HFImportError(f"{self.path}: tensor {name} is cut short (file truncated?)")
        return torch.frombuffer(buf, dtype=dtype).reshape(count, *shape[1:])


@dataclass(frozen=True)
class RowSource:
    """One stored tensor readable by row ranges: `read(start, stop)` returns rows [start, stop) of the full tensor of
    shape `shape` (of a 1-D tensor: its elements)."""

    shape: tuple[int, ...]
    read: Callable[[int, int], Tensor]


def _wqkv_part_reader(file: SafetensorsRows, name: str, config: LLMConfig, part: int) -> Callable[[int, int], Tensor]:
    """Rows of q (part 0), k (1) or v (2) read straight from InternLM2's packed wqkv (`unpack_internlm2_wqkv`'s
    layout: per KV group its q heads, its k head, its v head), one file read per contiguous run of packed rows."""
    q_per_kv, d = config.num_heads // config.num_kv_heads, config.head_dim
    group = (q_per_kv + 2) * d

    def read(start: int, stop: int) -> Tensor:
        r = torch.arange(start, stop)
        if part == 0:
            packed = r // (q_per_kv * d) * group + r % (q_per_kv * d)
        else:
            packed = r // d * group + (q_per_kv + part - 1) * d + r % d
        if packed.numel() == 0:
            return file.rows(name, 0, 0)
        breaks = (torch.nonzero(packed[1:] != packed[:-1] + 1).squeeze(1) + 1).tolist()
        return torch.cat([file.rows(name, int(run[0]), int(run[-1]) + 1) for run in torch.tensor_split(packed, breaks)])

    return read


def hf_row_sources(hf_dir: str | Path) -> tuple[LLMConfig, dict[str, RowSource]]:
    """(config, {our trunk key: RowSource}) of a local HF directory, checked as `load_hf` checks it (names, shapes,
    config) while reading no weight: loading them into a sharded model, each rank reads only its own rows. The vision
    FFNs are not among them (they start as copies of the text FFNs)."""
    hf_dir = Path(hf_dir)
    config, model_type = read_hf_config(hf_dir)
    files = {name: SafetensorsRows(hf_dir / name) for name in _safetensors_files(hf_dir)}
    shapes = {t: (f.shape(t), name) for name, f in files.items() for t in f.tensors}
    with torch.device("meta"):
        expected = {k: v.shape for k, v in MMoETransformer(config, vision_experts=False).state_dict().items()}
    out = {}
    for key, (name, part) in _hf_plan(shapes, config, model_type, hf_dir, expected).items():
        file = files[shapes[name][1]]
        read = (lambda a, b, f=file, n=name: f.rows(n, a, b)) if part is None else _wqkv_part_reader(file, name, config, part)
        out[key] = RowSource(tuple(expected[key]), read)
    return config, out


def load_hf(hf_dir: str | Path, vision_experts: bool = True, dtype: torch.dtype = torch.float32) -> MMoETransformer:
    """A local HF directory -> MMoETransformer (vision FFNs = copies of the text FFNs)."""
    hf_dir = Path(hf_dir)
    config, model_type = read_hf_config(hf_dir)
    tensors = read_hf_tensors(hf_dir)
    model = MMoETransformer(config, vision_experts=vision_experts)
    expected = {k: v.shape for k, v in model.state_dict().items() if ".vision_ffn." not in k}
    sd = hf_to_state_dict(tensors, config, model_type, hf_dir, expected)
    result = model.load_state_dict(sd, strict=False)
    leftover = [k for k in result.missing_keys if ".vision_ffn." not in k and not (config.tie_word_embeddings and k == "lm_head.weight")]
    assert not leftover and not result.unexpected_keys, (leftover, result.unexpected_keys)
    model.init_vision_experts_from_text()
    return model.to(dtype)


def export_hf(model: MMoETransformer, out_dir: str | Path, model_type: str = "llama") -> Path:
    """Write the text weights (vision FFNs dropped) as a HF Llama / Qwen2 directory."""
    if model_type not in ("llama", "qwen2"):
        raise ValueError(f"export model_type={model_type!r} is not supported; use 'llama' or 'qwen2'")
    c = model.config
    if model_type == "llama" and c.qkv_bias:
        raise ValueError("this model has qkv biases, which HF Llama cannot hold without o_proj bias; export as 'qwen2'")
    if model_type == "qwen2" and not c.qkv_bias:
        raise ValueError("HF Qwen2 always has qkv biases and this model has none; export as 'llama'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inv_layer = {v: k for k, v in _LAYER_MAP[model_type].items()}
    inv_top = {v: k for k, v in _TOP_MAP[model_type].items()}
    tensors = {}
    for key, t in model.state_dict().items():
        if ".vision_ffn." in key or (c.tie_word_embeddings and key == "lm_head.weight"):
            continue
        m = re.match(r"layers\.(\d+)\.(.+)$", key)
        hf = f"model.layers.{m.group(1)}.{inv_layer[m.group(2)]}" if m else inv_top[key]
        tensors[hf] = t.detach().contiguous().cpu()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "architectures": [SUPPORTED[model_type]], "model_type": model_type,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim, "hidden_act": "silu", "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": c.tie_word_embeddings, "torch_dtype": "float32",
    }
    if model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir
