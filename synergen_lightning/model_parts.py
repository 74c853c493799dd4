"""What a `SynerGenVL` is built from, read from disk once, before the model is built.

A recipe names files: the base LLM (its trunk's shape), the text tokenizer (the special-token ids) and the image
tokenizer (the codebook). `resolve_model_parts` reads them and returns the constructor's arguments with those parts
filled in, so the constructor reads no file: `synergen fit` resolves a recipe before it builds the model, a Python
caller uses `SynerGenVL.from_paths`, and a checkpoint already holds its resolved parts. The base-LLM readers live
here too: the system loads the trunk's weights through them at fit start.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from synergen_lightning.hf_import import RowSource, hf_row_sources, load_hf, read_hf_config
from synergen_lightning.image_tokenizer.loading import load_image_tokenizer
from synergen_lightning.models.config import LLMConfig
from synergen_lightning.models.mmoe import MMoETransformer
from synergen_lightning.safe_load import torch_load
from synergen_lightning.text_tokenizer import TextTokenizer

# every special token the system needs an id for: the text ones and the image delimiters
SPECIAL_TOKEN_NAMES = ("bos", "eos", "pad", "boi", "eoi", "uncond", "im_start", "im_end")


def _read_llm_checkpoint(path: Path) -> tuple[LLMConfig, dict, bool, str | None]:
    """(config, trunk state_dict, vision_experts, tokenizer_dir) of an `MMoELLM` checkpoint, read directly (no tokenizer setup)."""
    ckpt = torch_load(path, mmap=True)  # mmap: only the config is needed for shapes
    hp = ckpt.get("hyper_parameters") or {}
    if "config" not in hp or "state_dict" not in ckpt:
        raise ValueError(f"{str(path)!r} is not an MMoELLM checkpoint (no hyper_parameters.config / state_dict); "
                         "pass the base LLM's .ckpt or a local HF model directory")
    prefix = next((k[: -len("embed_tokens.weight")] for k in ckpt["state_dict"] if k.endswith("embed_tokens.weight")), "")
    sd = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    return LLMConfig(**hp["config"]), sd, bool(hp.get("vision_experts", True)), hp.get("tokenizer_dir")


def _existing_base_llm(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"base LLM {str(path)!r} does not exist: run `make base-llm` for the tiny default "
                                "or set model.base_llm (the 2b recipes read SYNERGEN_BASE_LLM, the tiny ones "
                                "SYNERGEN_TINY_BASE_LLM) to an MMoELLM .ckpt or a local HF Llama/Qwen2/InternLM2 directory")
    return path


def load_base_llm(path: str | Path) -> MMoETransformer:
    """A base LLM: an `MMoELLM` Lightning checkpoint (the tiny base) or a local HF Llama/Qwen2/InternLM2 dir."""
    path = _existing_base_llm(path)
    if path.is_dir():
        return load_hf(path, vision_experts=True)
    config, sd, vision, _ = _read_llm_checkpoint(path)
    trunk = MMoETransformer(config, vision_experts=vision)
    trunk.load_state_dict(sd)
    return trunk


def base_llm_rows(path: str | Path) -> dict[str, RowSource]:
    """A base LLM's trunk tensors as row readers, for a sharded model whose ranks each read their own rows: a HF
    directory by file reads of the row ranges, an `MMoELLM` checkpoint memory-mapped."""
    path = _existing_base_llm(path)
    if path.is_dir():
        return hf_row_sources(path)[1]
    sd = _read_llm_checkpoint(path)[1]
    return {k: RowSource(tuple(v.shape), lambda a, b, v=v: v[a:b]) for k, v in sd.items()}


def read_base_llm_config(path: str | Path) -> LLMConfig:
    """The LLMConfig of a base LLM without building it (for shapes only)."""
    path = _existing_base_llm(path)
    if path.is_dir():
        return read_hf_config(path)[0]
    return _read_llm_checkpoint(path)[0]


def load_text_tokenizer(path: str | Path) -> TextTokenizer:
    return TextTokenizer(path)


def resolve_model_parts(init_args: dict) -> dict:
    """`SynerGenVL`'s constructor arguments with what their files hold filled in (a copy; arguments already given
    are kept and their files not read):

    - `llm`: the trunk's LLMConfig fields, from `base_llm` (an MMoELLM .ckpt or a HF directory);
    - `text_tokenizer`: the tiny base LLM's checkpoint names the one it was trained with;
    - `special_token_ids`: from the text tokenizer, whose vocabulary also widens `llm.vocab_size` when larger
      (e.g. InternLM2's 92,544 + `<boi>` `<eoi>` `<UNCOND>`);
    - `codebook_size` and `downsample`: from `image_tokenizer`.
    A missing part names the argument that would give it."""
    return resolve_model_parts_and_tokenizers(init_args)[0]


def resolve_model_parts_and_tokenizers(init_args: dict) -> tuple[dict, dict]:
    """`resolve_model_parts`, and the tokenizers it loaded on the way ({"text_tokenizer": ..., "image_tokenizer": ...},
    those it read): `SynerGenVL.from_paths` hands them to the model, which would otherwise load them again."""
    args, loaded = dict(init_args), {}
    base_llm, text_tokenizer = args.get("base_llm"), args.get("text_tokenizer")
    base_file = base_llm is not None and Path(base_llm).is_file()
    base_ckpt = _read_llm_checkpoint(Path(base_llm)) if base_file else None  # read once: shape and tokenizer name
    if args.get("llm") is None:
        if base_llm is None:
            raise ValueError("SynerGenVL needs `llm` (LLMConfig fields) or `base_llm` (a checkpoint or HF dir)")
        args["llm"] = asdict(base_ckpt[0] if base_ckpt is not None else read_base_llm_config(base_llm))
    if args.get("special_token_ids") is None:
        if text_tokenizer is None and base_ckpt is not None:
            text_tokenizer = args["text_tokenizer"] = base_ckpt[3]
        if text_tokenizer is None:
            raise ValueError("SynerGenVL needs `text_tokenizer` (a TextTokenizer directory) or `special_token_ids`")
        tok = loaded["text_tokenizer"] = load_text_tokenizer(text_tokenizer)
        args["special_token_ids"] = {name: int(getattr(tok, f"{name}_id")) for name in SPECIAL_TOKEN_NAMES}
        if tok.vocab_size > int(args["llm"]["vocab_size"]):
            args["llm"] = {**args["llm"], "vocab_size": tok.vocab_size}
    if args.get("image_tokenizer") is not None and args.get("codebook_size") is None:
        itok = loaded["image_tokenizer"] = load_image_tokenizer(args["image_tokenizer"])
        args["codebook_size"], args["downsample"] = int(itok.codebook_size), int(itok.downsample)
    if args.get("codebook_size") is None:
        raise ValueError("SynerGenVL needs `codebook_size` or an `image_tokenizer` to read it from")
    return args, loaded
