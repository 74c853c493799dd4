"""Reading checkpoints: the one loader behind every command, `system.load_synergen` and
`SynerGenVL.load_from_checkpoint`.

It reads every form a run or `synergen export` writes:

- a single-file `.ckpt`: what a one-process or a DDP run saves (rank 0 writes the whole model);
- a sharded checkpoint directory: what an FSDP2 run saves (Lightning DCP: `.metadata`, `*.distcp`, `meta.pt`),
  read without a process group, its DCP part checked as plain data first (`safe_load.read_sharded_metadata`);
- an export directory: `model.safetensors` + `config.json` (+ `export.json`), what `synergen export` writes.

`load_checkpoint_model(path, cls)` rebuilds a model of the class it is given (this module imports no model class)
from the saved hyper-parameters, keeping only the arguments its constructor takes:
`synergen fit` (LightningCLI) adds bookkeeping keys of its own (`_class_path`, `_instantiator`, any `_...`), and a
key a newer or older version saved but this constructor does not know is not an argument either.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from synergen_lightning.distributed import (
    check_compatible,
    is_sharded_checkpoint,
    load_sharded_into,
    load_sharded_state_dict,
)
from synergen_lightning.safe_load import UntrustedCheckpointError, read_sharded_metadata, torch_load
from synergen_lightning.state_keys import current_keys

EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_INFO = "model.safetensors", "config.json", "export.json"


def checkpoint_kind(path: str | Path) -> str:
    """'file', 'sharded' or 'export'; a one-line FileNotFoundError naming the path and the forms otherwise."""
    p = Path(path)
    if p.is_file():
        return "file"
    if is_sharded_checkpoint(p):
        return "sharded"
    if p.is_dir() and (p / EXPORT_WEIGHTS).is_file():
        return "export"
    what = "does not exist" if not p.exists() else "is neither a .ckpt file, a sharded checkpoint directory (with " \
                                                   ".metadata) nor an export directory (with model.safetensors)"
    raise FileNotFoundError(f"checkpoint {str(p)!r} {what}: pass a run's last.ckpt (file or sharded directory, e.g. "
                            "runs/tiny/sft/last.ckpt) or a `synergen export` directory")


def read_checkpoint_meta(path: str | Path) -> dict:
    """The non-tensor part of any checkpoint: `hyper_parameters`, `global_step`, `synergen_stage_history`,
    `datamodule_hyper_parameters` (where the run had them), without the weights or optimizer state."""
    p = Path(path)
    kind = checkpoint_kind(p)
    if kind == "export":
        info = json.loads((p / EXPORT_INFO).read_text()) if (p / EXPORT_INFO).is_file() else {}
        if not (p / EXPORT_CONFIG).is_file():
            raise FileNotFoundError(f"export {str(p)!r} has {EXPORT_WEIGHTS} but no {EXPORT_CONFIG}: export the "
                                    "checkpoint again with `synergen export --ckpt CKPT --out DIR`")
        return {"hyper_parameters": json.loads((p / EXPORT_CONFIG).read_text()), "global_step": info.get("global_step"),
                "synergen_stage_history": info.get("stage_history"),
                "datamodule_hyper_parameters": info.get("datamodule_hyper_parameters") or {}}
    if kind == "sharded":
        meta = torch_load(p / "meta.pt")
        read_sharded_metadata(p)  # a directory whose DCP part would run code is refused at its first read
        return meta
    ckpt = _load_file(p)
    return {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer_states")}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The full model weights of any checkpoint, on CPU, in the component key layout (`state_keys`; tied LM-head
    weights restored for exports)."""
    p = Path(path)
    kind = checkpoint_kind(p)
    if kind == "sharded":
        return current_keys(load_sharded_state_dict(p))
    if kind == "export":
        from safetensors.torch import load_file

        try:
            state = current_keys(load_file(str(p / EXPORT_WEIGHTS)))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
            raise ValueError(f"{str(p / EXPORT_WEIGHTS)!r} cannot be read ({type(exc).__name__}: {str(exc)[:160]}): "
                             "export the checkpoint again with `synergen export`") from None
        llm = (read_checkpoint_meta(p)["hyper_parameters"] or {}).get("llm") or {}
        if llm.get("tie_word_embeddings") and "llm.model.lm_head.weight" not in state:
            state["llm.model.lm_head.weight"] = state["llm.model.embed_tokens.weight"]  # safetensors keeps one copy
        return state
    ckpt = _load_file(p)
    if not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{str(p)!r} has no state_dict: not a Lightning checkpoint; pass a run's last.ckpt")
    return current_keys(ckpt["state_dict"])


def _load_file(p: Path) -> dict:
    try:
        ckpt = torch_load(p, mmap=True)  # mmap: a 2B checkpoint is not copied
    except UntrustedCheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"{str(p)!r} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc}); pass a "
                         "run's last.ckpt") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{str(p)!r} holds a {type(ckpt).__name__}, not a Lightning checkpoint; pass a run's last.ckpt")
    return ckpt


def constructor_kwargs(cls: type, hparams: dict) -> dict:
    """The saved hyper-parameters that are arguments of `cls.__init__`: bookkeeping keys (`_class_path`,
    `_instantiator`, anything starting with `_`) and keys the constructor does not take are left out."""
    params = inspect.signature(cls.__init__).parameters.values()
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
    any_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    return {k: v for k, v in hparams.items() if not str(k).startswith("_") and (any_kw or k in named)}


def save_own_hyperparameters(module, init_locals: dict) -> None:
    """`module.save_hyperparameters()` for exactly its constructor's arguments (`init_locals`: `dict(locals())` taken
    first thing in `__init__`): Lightning's frame inspection would also collect the arguments of an enclosing
    LightningModule's constructor, and those would overwrite a component's own (the system's `lr` in place of the
    trunk's)."""
    module.save_hyperparameters({k: v for k, v in init_locals.items() if k not in ("self", "__class__")})
    module._hparams_name = "kwargs"  # loaded back as keyword arguments, as `save_hyperparameters()` saves them


def save_checkpoint_file(module, path: str | Path) -> None:
    """`module`'s weights and hyper-parameters as a Lightning checkpoint file (what `load_from_checkpoint` and the
    recipes read), written without a Trainer."""
    import lightning as L

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, str(path))


def model_hparams(path: str | Path, cls: type) -> dict:
    """The `cls` constructor arguments a SynerGenVL checkpoint's model was built with; a one-line error for another
    kind of model."""
    hp = dict(read_checkpoint_meta(path).get("hyper_parameters") or {})
    if "llm" not in hp:
        raise ValueError(f"{str(path)!r} has no SynerGenVL hyper_parameters (llm config): pass a SynerGenVL "
                         "checkpoint (e.g. runs/tiny/sft/last.ckpt), not a base-LLM or image-tokenizer one")
    return constructor_kwargs(cls, hp)


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def inference_dtype(name: str | torch.dtype | None, device: str | torch.device | None) -> torch.dtype | None:
    """The parameters' dtype for inference: "auto" is bf16 on a GPU that has it (half the weight and KV-cache memory
    and traffic; FlashAttention) and fp32 elsewhere; "bf16" / "fp32" as named; None keeps the checkpoint's fp32."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        cuda = torch.device(device or "cpu").type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of auto, bf16, fp32")
    return DTYPES[name]


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` with its floating parameters in `dtype` and its buffers as they are: RoPE's frequencies and other
    fp32 constants keep their precision (as FSDP2's `param_dtype` leaves buffers)."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


def load_checkpoint_model(path: str | Path, cls: type, map_location: str | torch.device | None = "cpu",
                          strict: bool = True, dtype: str | torch.dtype | None = None, **overrides):
    """A `cls` (SynerGenVL or a subclass) in eval mode from any checkpoint form (module docstring). `overrides` replace
    constructor arguments (e.g. `text_tokenizer`, `image_tokenizer` paths); the weights always come from `path`.
    `dtype` (`inference_dtype`): the parameters' dtype on `map_location` (the image tokenizer keeps its own)."""
    dtype = inference_dtype(dtype, map_location if isinstance(map_location, (str, torch.device)) else None)
    path = Path(path)
    meta = read_checkpoint_meta(path)
    kwargs = model_hparams(path, cls)
    unknown = sorted(set(overrides) - set(constructor_kwargs(cls, overrides)))
    if unknown:
        raise ValueError(f"{unknown} are not {cls.__name__} arguments: override constructor arguments only "
                         "(e.g. text_tokenizer, image_tokenizer)")
    kwargs.update(overrides)
    model = cls(**kwargs)
    if strict and checkpoint_kind(path) == "sharded":
        # read into the model's own tensors: no second full copy of the weights in host memory
        load_sharded_into(model, path, collective=False)
    else:
        state = read_state_dict(path)
        if strict:
            check_compatible(state, model, str(path))
        model.load_state_dict(state, strict=strict)
        del state
    history = meta.get("synergen_stage_history")
    if history and hasattr(model, "on_load_checkpoint"):
        model.on_load_checkpoint({"synergen_stage_history": history})
    if dtype is not None:  # before the move: the GPU holds only the cast copy
        cast_parameters(model, dtype)
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    return model.eval()

