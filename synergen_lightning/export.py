"""`synergen export --ckpt CKPT --out DIR`: one consolidated safetensors file + config for inference.

CKPT is a sharded FSDP2 checkpoint directory (Lightning DCP: `.metadata`, `*.distcp`, `meta.pt`) or a
single-file `.ckpt`. DIR gets `model.safetensors` (the full, unsharded weights, fp32 unless --dtype),
`config.json` (the SynerGenVL hyper-parameters: everything `SynerGenVL(**config)` needs to rebuild the
model) and `export.json` (source, step, stage history). `load_export(DIR)` rebuilds the model;
`load_model(PATH)` reads any of the three forms (file, sharded directory, export directory).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from synergen_lightning.distributed import check_compatible, load_model_state_dict, read_checkpoint_meta, to_dtype


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def export(ckpt: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    from safetensors.torch import save_file

    from synergen_lightning.system import SynerGenVL

    ckpt, out = Path(ckpt), Path(out)
    if not ckpt.exists():
        raise FileNotFoundError(f"checkpoint {str(ckpt)!r} does not exist: pass a run's last.ckpt (file or sharded directory)")
    meta = read_checkpoint_meta(ckpt)
    hp = dict(meta.get("hyper_parameters") or {})
    if "llm" not in hp:
        raise ValueError(f"{str(ckpt)!r} has no SynerGenVL hyper_parameters (llm config): is it a SynerGenVL checkpoint?")
    state = load_model_state_dict(ckpt)
    # rebuild the model from its config on the meta device (no weights, no tokenizer files needed) to check shapes
    hp_build = {k: v for k, v in hp.items() if k not in ("init_from", "base_llm", "image_tokenizer", "text_tokenizer")}
    with torch.device("meta"):
        model = SynerGenVL(**hp_build)
    check_compatible(state, model, str(ckpt))
    dt = to_dtype(dtype)
    tensors = {k: (v.to(dt) if dt is not None and v.is_floating_point() else v).contiguous() for k, v in state.items()}
    if model.llm.config.tie_word_embeddings:  # safetensors refuses shared storage: keep one copy
        tensors.pop("llm.lm_head.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "source": str(ckpt)})
    (out / "config.json").write_text(json.dumps(_jsonable(hp), indent=2))
    (out / "export.json").write_text(json.dumps({
        "source": str(ckpt), "sharded": ckpt.is_dir(), "global_step": meta.get("global_step"),
        "stage_history": meta.get("synergen_stage_history"), "tensors": len(tensors),
        "parameters": int(sum(v.numel() for v in tensors.values())), "dtype": dtype or "as trained"}, indent=2))
    return out / "model.safetensors"


def load_export(path: str | Path, **overrides):
    """A SynerGenVL from an export directory (config.json + model.safetensors)."""
    from safetensors.torch import load_file

    from synergen_lightning.system import SynerGenVL

    path = Path(path)
    hp = json.loads((path / "config.json").read_text())
    hp = {k: v for k, v in hp.items() if k not in ("init_from", "base_llm")}
    hp.update(overrides)
    model = SynerGenVL(**hp)
    state = load_file(str(path / "model.safetensors"))
    if model.llm.config.tie_word_embeddings:
        state["llm.lm_head.weight"] = state["llm.embed_tokens.weight"]
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def load_model(ckpt: str | Path, map_location: str | torch.device = "cpu", **overrides):
    """A SynerGenVL in eval mode from any checkpoint a run or `synergen export` writes: a single-file `.ckpt`, a
    sharded FSDP2 checkpoint directory (`.metadata`, `*.distcp`, `meta.pt`: read without a process group), or an
    export directory (`model.safetensors` + `config.json`). `overrides` replace hyper-parameters (e.g. tokenizer
    paths). For inference commands that must accept what a multi-process run saved."""
    from synergen_lightning.distributed import is_sharded_checkpoint, load_sharded_state_dict
    from synergen_lightning.system import SynerGenVL

    p = Path(ckpt)
    if p.is_dir() and (p / "model.safetensors").is_file():
        return load_export(p, **overrides).to(map_location)
    if is_sharded_checkpoint(p):
        hp = dict(read_checkpoint_meta(p).get("hyper_parameters") or {})
        if "llm" not in hp:
            raise ValueError(f"{str(p)!r} has no SynerGenVL hyper_parameters (llm config): is it a SynerGenVL checkpoint?")
        hp = {k: v for k, v in hp.items() if k not in ("init_from", "base_llm")}  # weights come from the shards
        hp.update(overrides)
        model = SynerGenVL(**hp)
        state = load_sharded_state_dict(p)
        check_compatible(state, model, str(p))
        model.load_state_dict(state)
        return model.to(map_location).eval()
    if p.is_file():
        return SynerGenVL.load_from_checkpoint(p, map_location=map_location, **overrides).eval()
    raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist or is neither a .ckpt file, a sharded checkpoint "
                            "directory (with .metadata) nor an export directory (with model.safetensors)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="synergen export",
        description="Consolidate a SynerGenVL checkpoint (sharded FSDP2 directory or .ckpt file) into one "
                    "model.safetensors + config.json for inference on one device.")
    parser.add_argument("--ckpt", required=True, help="sharded checkpoint directory (e.g. runs/tiny/stage1/last.ckpt) or .ckpt file")
    parser.add_argument("--out", required=True, help="output directory (model.safetensors, config.json, export.json)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="cast floating-point weights (default: as trained, fp32 master weights)")
    args = parser.parse_args(argv)
    path = export(args.ckpt, args.out, args.dtype)
    info = json.loads((Path(args.out) / "export.json").read_text())
    print(f"wrote {path} ({info['tensors']} tensors, {info['parameters']:,} parameters, step {info['global_step']}) "
          f"and {Path(args.out) / 'config.json'}")
    return 0
