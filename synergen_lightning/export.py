"""Conversion commands: `synergen export` (a run's checkpoint out, for inference) and `synergen import-hf` (a local
Hugging Face LLM in, as an MMoELLM checkpoint: `import_hf_main`, through `hf_import`).

`synergen export --ckpt CKPT --out DIR`: one consolidated safetensors file + config for inference.

CKPT is any checkpoint a run writes: a single-file `.ckpt` (one process, DDP) or a sharded FSDP2 checkpoint
directory (Lightning DCP: `.metadata`, `*.distcp`, `meta.pt`). DIR gets `model.safetensors` (the full, unsharded
weights, fp32 unless --dtype), `config.json` (the SynerGenVL constructor arguments: `SynerGenVL(**config)` rebuilds
the model) and `export.json` (source, step, stage history, the data's hyper-parameters). Every command reads DIR
back through the one loader, `synergen_lightning.system.load_synergen`. torch, Lightning and the model load when an
export runs, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

__all__ = ["export"]


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def export(ckpt: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    import torch
    from safetensors.torch import save_file

    from synergen_lightning.checkpoint import (
        EXPORT_CONFIG,
        EXPORT_INFO,
        EXPORT_WEIGHTS,
        checkpoint_kind,
        model_hparams,
        read_checkpoint_meta,
        read_state_dict,
    )
    from synergen_lightning.distributed import check_compatible, to_dtype
    from synergen_lightning.io import atomic_directory
    from synergen_lightning.system import SynerGenVL

    export_files = {EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_INFO}

    ckpt, out = Path(ckpt), Path(out)
    if checkpoint_kind(ckpt) == "export":
        raise ValueError(f"{str(ckpt)!r} is already an export directory: load it directly, or pass the run's "
                         "checkpoint (e.g. runs/tiny/stage1/last.ckpt) to export it again")
    meta = read_checkpoint_meta(ckpt)
    hp = model_hparams(ckpt, SynerGenVL)
    state = read_state_dict(ckpt)
    # rebuild the model from its config on the meta device (no weights, no tokenizer files needed) to check shapes
    with torch.device("meta"):
        model = SynerGenVL(**hp)
    check_compatible(state, model, str(ckpt))
    dt = to_dtype(dtype)
    tensors = {k: (v.to(dt) if dt is not None and v.is_floating_point() else v).contiguous() for k, v in state.items()}
    if model.llm.model.config.tie_word_embeddings:  # safetensors refuses shared storage: keep one copy
        tensors.pop("llm.model.lm_head.weight", None)
    others = sorted(p.name for p in out.iterdir() if p.name not in export_files) if out.is_dir() else []
    if others or (out.exists() and not out.is_dir()):
        raise ValueError(f"--out {str(out)!r} holds other files than an export ({', '.join(others[:3]) or 'a file'}): "
                         "pick a new directory (an export replaces its directory whole)")
    # all or nothing: a crash mid-write leaves the previous export as it was, never new weights beside its old config
    with atomic_directory(out) as tmp:
        save_file(tensors, str(tmp / EXPORT_WEIGHTS), metadata={"format": "pt", "source": str(ckpt)})
        (tmp / EXPORT_CONFIG).write_text(json.dumps(_jsonable(hp), indent=2))
        (tmp / EXPORT_INFO).write_text(json.dumps({
            "source": str(ckpt), "sharded": ckpt.is_dir(), "global_step": meta.get("global_step"),
            "stage_history": meta.get("synergen_stage_history"), "tensors": len(tensors),
            "parameters": int(sum(v.numel() for v in tensors.values())), "dtype": dtype or "as trained",
            "datamodule_hyper_parameters": _jsonable(constructor_args(meta.get("datamodule_hyper_parameters") or {}))},
            indent=2))
    return out / EXPORT_WEIGHTS


def constructor_args(hparams: dict) -> dict:
    """Saved hyper-parameters without the CLI's bookkeeping keys (`_class_path`, `_instantiator`, ...)."""
    return {k: v for k, v in dict(hparams).items() if not str(k).startswith("_")}


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
    from synergen_lightning.checkpoint import EXPORT_INFO

    path = export(args.ckpt, args.out, args.dtype)
    info = json.loads((Path(args.out) / EXPORT_INFO).read_text())
    print(f"wrote {path} ({info['tensors']} tensors, {info['parameters']:,} parameters, step {info['global_step']}) "
          f"and {Path(args.out) / 'config.json'}")
    return 0


def import_hf_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="synergen import-hf",
        description="Convert a local Hugging Face Llama/Qwen2/InternLM2 directory (config.json + safetensors) into an "
                    "MMoELLM checkpoint (vision FFNs initialised as copies of the text FFNs). Loadable with "
                    "MMoELLM.load_from_checkpoint(CKPT).",
    )
    p.add_argument("--hf-dir", required=True, help="local directory with config.json and model.safetensors (no download)")
    p.add_argument("--out", required=True, help="output checkpoint path (.ckpt)")
    p.add_argument("--tokenizer-dir", default=None,
                   help="directory with tokenizer.json to record in the checkpoint (default: --hf-dir if it has one)")
    args = p.parse_args(argv)
    from synergen_lightning.llm import MMoELLM  # Lightning: after parsing, so --help answers at once

    tok_dir = args.tokenizer_dir or (args.hf_dir if (Path(args.hf_dir) / "tokenizer.json").is_file() else None)
    llm = MMoELLM.from_hf(args.hf_dir, tokenizer_dir=tok_dir)
    out = Path(args.out)
    llm.save_checkpoint_file(out)  # creates the directory
    n = sum(p.numel() for p in llm.parameters())
    print(f"wrote {out}: {n / 1e6:.2f}M parameters, config {dataclasses.asdict(llm.model.config)}")
    return 0
