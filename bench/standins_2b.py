"""Stand-ins for what the 2b recipes read, so that `synergen fit --config recipes/synergen_vl_2b/STAGE.yaml` runs as
shipped on a machine without the paper's models and data: an InternLM2-layout Hugging Face directory (packed `wqkv`, two
safetensors files, the recipe's 92,544-token vocabulary) at reduced widths, a `tokenizer.json`, a random Emu3 VQ-VAE
directory (32,768 codes, downsample 8, in Emu3-VisionTokenizer's published layout) and webdataset shards for every
source the recipes name (img2dataset layout: JPEGs of several aspect ratios with captions or LLaVA conversations, listed
in `shards.txt`). The recipes read them through their environment variables (`env`); `fit_args` overrides what a small
machine needs (devices and one node, the reduced widths and view size, a global batch of 2 + 2 rows, a few steps, one
data worker; fp32 on the CPU). The recipes' strategy (FSDP2, bf16 on CUDA, activation checkpointing, micro-batches by
`tokens_per_gpu`), callbacks, data module and stage chain (`model.init_from`) run as on the cluster; their HSDP groups
of 8 do not form on 1 or 2 ranks.

Used by tests/test_user_paths.py (the chain through `synergen`, FSDP2 on 2 CPU processes) and `make gpu-check`.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("stage1", "stage2", "sft")
# reduced widths of the InternLM2-1.8B trunk: its vocabulary, GQA ratio (2 query heads per KV head) and SwiGLU
WIDTHS = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128}
# source directory -> what its samples carry; the recipes' `urls` are SYNERGEN_DATA/<directory>/shards.txt
SOURCES = {"laion_aesthetics": "generation", "imagenet1k": "generation", "sam_megalith_objects365": "generation",
           "und_s1": "caption", "hq_aesthetic_20m": "generation", "internal_hq_5m": "generation",
           "und_s2": "conversation", "sft_internal_10m_gen": "generation", "sft_internal_10m_und": "conversation"}
SIZES = ((96, 96), (160, 96), (96, 224), (128, 128))  # (width, height): square, landscape, tall -> several tiles
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}


def env(root: Path) -> dict[str, str]:
    """The recipes' environment variables, pointing at the stand-ins under `root`."""
    vq = root / "models/emu3_vq"
    return {"SYNERGEN_BASE_LLM": str(root / "models/internlm2"),
            "SYNERGEN_TEXT_TOKENIZER": str(root / "models/tokenizer"),
            "SYNERGEN_EMU3_TOKENIZER": str(vq / "vq.ckpt" if (vq / "vq.ckpt").exists() else vq),
            "SYNERGEN_DATA": str(root / "data")}


def image_tokenizer_kind() -> str:
    """"emu3" where transformers has Emu3's VQ-VAE (the `hf` extra), else "vq"."""
    try:
        import transformers
    except ImportError:
        return "vq"
    return "emu3" if hasattr(transformers, "Emu3VQVAE") else "vq"


def make_2b_standins(root: Path, samples_per_source: int = 8, image_tokenizer: str = "emu3") -> Path:
    """Write every stand-in under `root` (mostly the base LLM's 92,544-row embeddings, in bf16).
    `image_tokenizer`: "emu3" (a Hugging Face Emu3 VQ-VAE directory, read through transformers as the recipes'
    Emu3-VisionTokenizer is) or "vq" (the toolkit's own `VQTokenizer` checkpoint of the same codebook and downsampling,
    for a Python without transformers)."""
    if image_tokenizer not in ("emu3", "vq"):
        raise ValueError(f"image_tokenizer {image_tokenizer!r}: use 'emu3' or 'vq'")
    root.mkdir(parents=True, exist_ok=True)
    _write_data(root / "data", samples_per_source)
    _write_tokenizer(root / "models/tokenizer", root / "data")
    _write_internlm2(root / "models/internlm2")
    (_write_emu3 if image_tokenizer == "emu3" else _write_vq)(root / "models/emu3_vq")
    return root


def fit_args(stage: str, accelerator: str, devices: int, steps: int = 2, image_size: int = 512) -> list[str]:
    """`synergen fit` arguments for one stage: the shipped recipe and the overrides a small machine needs
    (`image_size` 128 on the CPU: 16x16 codes, 16 LLM tokens a view, where Emu3's encoder of 512-px views would
    take most of the time)."""
    tokens_per_view = (image_size // 8) ** 2 // 16  # the recipes' downsample 8 and 2x8 folding
    return ["fit", "--config", str(ROOT / f"recipes/synergen_vl_2b/{stage}.yaml"),
            "--trainer.accelerator", accelerator, "--trainer.devices", str(devices), "--trainer.num_nodes", "1",
            "--trainer.max_steps", str(steps), "--trainer.enable_progress_bar", "false",
            "--trainer.strategy.init_args.global_batch_size", json.dumps({"generation": 2, "understanding": 2}),
            # fp32 on the CPU (its bf16 matmuls are slow); the recipes' bf16 on CUDA
            *([] if accelerator == "gpu" else ["--trainer.precision", "32-true",
                                               "--trainer.strategy.init_args.param_dtype", "null"]),
            *[a for k, v in WIDTHS.items() for a in (f"--model.init_args.llm.{k}", str(v))],
            "--model.init_args.code_dim", str(WIDTHS["hidden_size"]), "--model.init_args.image_size", str(image_size),
            "--data.init_args.image_size", str(image_size), "--data.init_args.tokens_per_view", str(tokens_per_view),
            "--data.init_args.num_workers", "1", "--data.init_args.shuffle_buffer", "8"]


def understanding_image(root: Path, out: Path) -> Path:
    """The first JPEG of the stage-2 understanding shard, written to `out`: an image to ask `synergen answer` about."""
    with tarfile.open(root / "data/und_s2/shard-000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        out.write_bytes(tar.extractfile(member).read())
    return out


SFT_CHECKPOINT = "runs/synergen_vl_2b/sft/last.ckpt"


def user_commands(scene: Path, device: str) -> dict[str, list[str]]:
    """What a user runs after the chain, from the project: `synergen export` of the SFT checkpoint into
    `exports/sft`, `generate` of 2 images from the export into `generated/`, `answer` about `scene` from the checkpoint.
    """
    return {"export": ["export", "--ckpt", SFT_CHECKPOINT, "--out", "exports/sft"],
            "generate": ["generate", "--ckpt", "exports/sft", "--prompt", "a red box on a white background", "--num",
                         "2", "--out", "generated", "--device", device],
            "answer": ["answer", "--ckpt", SFT_CHECKPOINT, "--image", str(scene), "--question",
                       "What colour is the box?", "--max-new-tokens", "4", "--device", device]}


# what `trained_parts` finds when each stage trains what the paper's progressive alignment says
PROGRESSIVE_ALIGNMENT = {"stage1": {"attention": False, "text_ffn": False, "vision_ffn": True},
                         "stage2": {"attention": True, "text_ffn": False, "vision_ffn": True},
                         "sft": {"attention": True, "text_ffn": True, "vision_ffn": True}}


def trained_parts(root: Path, project: Path) -> dict[str, dict[str, bool]]:
    """Per stage, whether its checkpoint (`project/runs/synergen_vl_2b/STAGE/last.ckpt`, sharded) changed layer 0's
    attention output projection, text FFN and vision FFN from where the stage began: the previous stage's checkpoint,
    or for stage 1 the base LLM's safetensors (the vision FFN starts as a copy of the text FFN). Read from the files
    alone, not through the loader the runs used."""
    from safetensors import safe_open

    from synergen_lightning.distributed import load_sharded_state_dict

    parts = {"attention": ("attn.o_proj", "attention.wo"), "text_ffn": ("text_ffn.gate_proj", "feed_forward.w1"),
             "vision_ffn": ("vision_ffn.gate_proj", "feed_forward.w1")}
    previous = {}
    for f in sorted((root / "models/internlm2").glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for part, (_, theirs) in parts.items():
                if f"model.layers.0.{theirs}.weight" in st.keys():
                    previous[part] = st.get_tensor(f"model.layers.0.{theirs}.weight").float()
    out = {}
    for stage in STAGES:
        sd = load_sharded_state_dict(project / f"runs/synergen_vl_2b/{stage}/last.ckpt")
        now = {part: sd[f"llm.model.layers.0.{ours}.weight"].float() for part, (ours, _) in parts.items()}
        out[stage] = {part: not torch.equal(now[part], previous[part]) for part in parts}
        previous = now
    return out


# ------------------------------------------------------------------------------------------------ data
def _jpeg(size: tuple[int, int], colour: tuple[int, int, int], seed: int) -> bytes:
    from PIL import Image, ImageDraw

    g = torch.Generator().manual_seed(seed)
    w, h = size
    img = Image.new("RGB", size, (245, 245, 240))
    x0, y0 = int(torch.randint(0, w // 2, (1,), generator=g)), int(torch.randint(0, h // 2, (1,), generator=g))
    ImageDraw.Draw(img).rectangle((x0, y0, x0 + w // 3, y0 + h // 3), fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_data(data: Path, n: int) -> None:
    names = list(COLOURS)
    for s, (source, kind) in enumerate(SOURCES.items()):
        folder = data / source
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(folder / "shard-000000.tar", "w") as tar:
            for i in range(n):
                key, colour = f"{source}_{i:05d}", names[(i + s) % len(names)]
                caption = f"a {colour} box on a white background"
                _add(tar, f"{key}.jpg", _jpeg(SIZES[i % len(SIZES)], COLOURS[colour], seed=100 * s + i))
                _add(tar, f"{key}.txt", caption.encode())
                if kind == "conversation":
                    turns = [{"from": "human", "value": "<image>\nWhat colour is the box?"},
                             {"from": "gpt", "value": f"The box is {colour}."}]
                    _add(tar, f"{key}.json", json.dumps({"conversations": turns}).encode())
        (folder / "shards.txt").write_text("shard-000000.tar\n")


def _write_tokenizer(out: Path, data: Path) -> None:
    from synergen_lightning.text_tokenizer import train_bpe

    corpus = data / "corpus.jsonl"
    lines = [f"the box is {c}. a {c} box on a white background. what colour is the box?" for c in COLOURS]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines * 20))
    train_bpe([corpus], 320, out)
    corpus.unlink()


# ------------------------------------------------------------------------------------------------ models
def _write_internlm2(path: Path) -> None:
    """The recipes' trunk (vocabulary, RoPE, norms) at `WIDTHS`, in InternLM2's layout."""
    import yaml

    from synergen_lightning.models.config import LLMConfig

    recipe = yaml.safe_load((ROOT / "recipes/synergen_vl_2b/stage1.yaml").read_text())["model"]["init_args"]["llm"]
    write_internlm2_dir(path, LLMConfig(**dict(recipe, **WIDTHS)))


def write_internlm2_dir(path: Path, config, seed: int = 0, noise: float = 0.0) -> int:
    """A random trunk of `config` (an `LLMConfig`; `noise`: the std of Gaussian noise added to every weight) as an
    InternLM2 Hugging Face directory: `model.tok_embeddings`, packed `attention.wqkv`, `output`, bf16, two safetensors
    files and their index. Returns the bytes of its weights."""
    from safetensors.torch import save_file

    from synergen_lightning.hf_import import pack_internlm2_wqkv
    from synergen_lightning.models.mmoe import MMoETransformer

    torch.manual_seed(seed)
    sd = {k: (v + noise * torch.randn_like(v) if noise else v).to(torch.bfloat16)
          for k, v in MMoETransformer(config, vision_experts=False).state_dict().items()}
    out = {"model.tok_embeddings.weight": sd["embed_tokens.weight"], "model.norm.weight": sd["norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    names = {"attn.o_proj": "attention.wo", "text_ffn.gate_proj": "feed_forward.w1",
             "text_ffn.up_proj": "feed_forward.w3", "text_ffn.down_proj": "feed_forward.w2",
             "input_norm": "attention_norm", "post_attn_norm": "ffn_norm"}
    for i in range(config.num_layers):
        q, k, v = (sd[f"layers.{i}.attn.{n}_proj.weight"] for n in "qkv")
        out[f"model.layers.{i}.attention.wqkv.weight"] = pack_internlm2_wqkv(q, k, v, config)
        for ours, theirs in names.items():
            out[f"model.layers.{i}.{theirs}.weight"] = sd[f"layers.{i}.{ours}.weight"]
    path.mkdir(parents=True, exist_ok=True)
    keys = sorted(out)
    files = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
             "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in files.items():
        save_file({k: out[k].contiguous() for k in ks}, str(path / name))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in files.items() for k in ks}}))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta, "max_position_embeddings": config.max_position_embeddings, "bias": False,
        "hidden_act": "silu", "tie_word_embeddings": config.tie_word_embeddings}))
    return sum(v.numel() * v.element_size() for v in out.values())


def _write_emu3(path: Path) -> None:
    """A random Emu3 VQ-VAE of Emu3-VisionTokenizer's codebook and downsampling, a few channels wide, in that
    repository's published layout (what the recipes' `/models/Emu3-VisionTokenizer` holds)."""
    import transformers

    cfg = transformers.Emu3VQVAEConfig(codebook_size=32768, embed_dim=4, latent_channels=4, base_channels=32,
                                       channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[],
                                       temporal_downsample_factor=4, hidden_size=32)
    torch.manual_seed(0)
    write_published_emu3_dir(transformers.Emu3VQVAE(cfg).eval(), path)


def write_published_emu3_dir(model, path: Path) -> Path:
    """`model` (a `transformers.Emu3VQVAE`) as BAAI/Emu3-VisionTokenizer publishes its VQ-VAE: the remote-code
    config's keys (`ch`, `ch_mult`, `z_channels`, ...) and one `model.safetensors` of the same weight names
    (transformers' conversion of that checkpoint renames nothing inside the VQ-VAE)."""
    from safetensors.torch import save_file

    c = model.config
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["Emu3VisionVQModel"], "model_type": "Emu3VisionVQ",
        "auto_map": {"AutoConfig": "configuration_emu3visionvq.Emu3VisionVQConfig",
                     "AutoModel": "modeling_emu3visionvq.Emu3VisionVQModel"},
        "ch": c.base_channels, "ch_mult": list(c.channel_multiplier), "codebook_size": c.codebook_size,
        "double_z": c.double_latent, "dropout": 0.0, "embed_dim": c.embed_dim, "in_channels": c.in_channels,
        "out_channels": c.out_channels, "num_res_blocks": c.num_res_blocks,
        "attn_resolutions": list(c.attn_resolutions), "temporal_downsample_factor": c.temporal_downsample_factor,
        "z_channels": c.latent_channels}))
    return path


def _write_vq(path: Path) -> None:
    """The tiny recipes' `VQTokenizer` (8x8 pixel patches) with Emu3's 32,768 codes, untrained, as one .ckpt file:
    the recipes' `image_tokenizer` takes either kind. `env` names the file inside `path`."""
    from tiny_world import write_untrained_vq

    torch.manual_seed(0)
    write_untrained_vq(path / "vq.ckpt", codebook_size=32768)
