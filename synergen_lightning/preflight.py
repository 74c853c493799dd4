"""`synergen fit` preflight: the recipe's inputs and outputs are checked before any model is built, so a wrong path,
an unwritable directory or a full disk stops the run in seconds instead of at its first checkpoint.

Checked, on the parsed config (the recipe with its overrides and environment variables resolved):

- every input path the recipe names (`INPUTS`, by argument name, in the model, the data and every callback): the base
  LLM, tokenizers, `init_from`, shards (any URL form; remote ones are not fetched), eval files;
- every checkpoint it reads (`init_from`, `--ckpt_path`, a `.ckpt` base LLM or image tokenizer) loads as plain data
  (synergen_lightning/safe_load.py);
- the output directories (`trainer.default_root_dir`, a callback's `dirpath`, a logger's `save_dir`) are writable;
- pretokenized shards (a source directory holding `synergen data pretokenize`'s stamp) were made by the model's image
  tokenizer: its stamp names the tokenizer's path, size and modification time, and codes of another tokenizer (or of
  this one before it was trained again) would train on a code space the model never decodes; and at the run's view
  size (`image_size`: the data's, else the model's), since a code grid of another size fits no image slot;
- the disk under the checkpoint directory holds two checkpoints of the model's estimated size (weights + AdamW state:
  12 bytes a parameter, the parameters counted on the meta device).

Every failure is one line naming the recipe key, the path or the figure, and the fix; `PreflightError` carries them all.
A DataModule or model of your own is checked by the same argument names.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# argument name -> (what it is, how to fix it when it is missing)
INPUTS: dict[str, tuple[str, str]] = {
    "base_llm": ("base LLM", "run `make base-llm` (tiny) or point it at an MMoELLM .ckpt or a local HF model directory"),
    "text_tokenizer": ("text tokenizer", "run `make base-llm` (it trains the tiny one) or point it at a TextTokenizer "
                                         "directory"),
    "image_tokenizer": ("image tokenizer", "run `make tokenizer` or point it at a VQTokenizer .ckpt or an HF VQ directory"),
    "init_from": ("previous stage's checkpoint", "train that stage first (make stage1 / stage2) or fix the path"),
    "tokenizer": ("text tokenizer", "run `make base-llm` or point it at a TextTokenizer directory"),
    "root": ("image directory", "fix the path"),
    "val_root": ("image directory", "fix the path"),
    "eval_prompts": ("eval prompts", "run `make data` or fix the path"),
    "skill_jsonl": ("text-skill items", "run `make data` or fix the path"),
    "skill_eval_jsonl": ("text-skill items", "run `make data` or fix the path"),
    "perceptual_weights": ("VGG weights", "download them once or leave perceptual_weight at 0"),
}
FILE_LISTS = {"train_files": "text corpus", "val_files": "text corpus", "bpe_train_files": "BPE corpus"}
SHARDS = {"train_shards", "val_shards"}
SOURCES = {"sources", "val_sources"}
CHECKPOINTS = {"init_from", "base_llm", "image_tokenizer"}  # read with torch.load when they are files
OUTPUTS = {"default_root_dir", "dirpath", "save_dir"}
BYTES_PER_PARAM = 12  # fp32 weights + AdamW's two moments
LIGHTNING_CKPT_ALIASES = ("last", "best", "hpc", "registry")


class PreflightError(ValueError):
    """The run cannot start: one line per problem."""


def _parts(config: dict) -> list[tuple[str, dict]]:
    """(recipe key, init_args) of the model, the data and every callback and logger."""
    out = []
    for key in ("model", "data"):
        section = config.get(key)
        if isinstance(section, dict):
            out.append((f"{key}.init_args", section.get("init_args") or {}))
    trainer = config.get("trainer") or {}
    for group in ("callbacks", "logger"):
        items = trainer.get(group)
        items = items if isinstance(items, list) else [items]
        for i, item in enumerate(items):
            if isinstance(item, dict) and isinstance(item.get("init_args"), dict):
                out.append((f"trainer.{group}[{i}].init_args" if group == "callbacks" else f"trainer.{group}.init_args",
                            item["init_args"]))
    return out


def _check_checkpoint(path: Path, key: str, problems: list[str]) -> None:
    from synergen_lightning.safe_load import UntrustedCheckpointError, read_sharded_metadata, torch_load

    sharded = path.is_dir() and (path / ".metadata").is_file()
    target = path / "meta.pt" if sharded else path
    if not sharded and not target.is_file():
        return  # a model directory (HF, an export): read by its loader
    try:
        if target.is_file():
            torch_load(target, mmap=True)
        if sharded:
            read_sharded_metadata(path)  # DCP's own pickles: `.metadata` and the non-tensor entries
    except UntrustedCheckpointError as exc:
        problems.append(f"{key}: {exc}")
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is the same problem
        problems.append(f"{key} {str(path)!r} is not a readable checkpoint ({type(exc).__name__}: {exc}); pass a run's "
                        "last.ckpt")


SourceURLs = list[tuple[str, "list[str] | None", "str | None"]]


def expand_sources(config: dict) -> SourceURLs:
    """(recipe key, its shard URLs or None, the problem or None) of every `sources` / `val_sources` entry
    that names `urls`: expanded once, for `check_inputs` (they exist) and `check_image_codes` (their stamps)."""
    from synergen_lightning.data.sources import expand_urls

    out = []
    for where, args in _parts(config):
        for name in sorted(SOURCES):
            listed = args.get(name)
            for i, src in enumerate(listed if isinstance(listed, (list, tuple)) else []):
                if isinstance(src, dict) and src.get("urls"):
                    key = f"{where}.{name}[{i}]"
                    try:
                        out.append((key, expand_urls(src["urls"], src.get("name", key)), None))
                    except ValueError as exc:
                        out.append((key, None, f"{key}: {exc}"))
    return out


def check_inputs(config: dict, sources: SourceURLs | None = None) -> list[str]:
    from synergen_lightning.data.sources import expand_urls

    problems: list[str] = []
    # a resumed run (`--ckpt_path`) takes its weights from its checkpoint, not from the stage's `init_from` (which
    # may be gone); "last" with nothing to resume starts afresh, and then the model names a missing one
    resuming = bool(config.get("ckpt_path"))
    for where, args in _parts(config):
        for name, value in args.items():
            key = f"{where}.{name}"
            if value is None or value == "" or (resuming and name == "init_from"):
                continue
            if name in INPUTS and isinstance(value, (str, os.PathLike)):
                what, fix = INPUTS[name]
                if not Path(value).exists():
                    problems.append(f"{key}: {what} {str(value)!r} does not exist: {fix}")
                elif name in CHECKPOINTS:
                    _check_checkpoint(Path(value), key, problems)
            elif name in FILE_LISTS and isinstance(value, (list, tuple, str)):
                for f in [value] if isinstance(value, str) else value:
                    if not Path(f).exists():
                        problems.append(f"{key}: {FILE_LISTS[name]} {str(f)!r} does not exist: run `make data` or fix "
                                        "the path")
            elif name in SHARDS and isinstance(value, (str, list, tuple)):
                try:
                    expand_urls(value, key)
                except ValueError as exc:
                    problems.append(f"{key}: {exc}")
    problems += [problem for *_, problem in (expand_sources(config) if sources is None else sources) if problem]
    ckpt = config.get("ckpt_path")
    if ckpt and str(ckpt) not in LIGHTNING_CKPT_ALIASES:
        if not Path(ckpt).exists():
            problems.append(f"--ckpt_path {str(ckpt)!r} does not exist: pass a run's last.ckpt (file or sharded "
                            "directory) to resume, or leave it out to start afresh")
        else:
            _check_checkpoint(Path(ckpt), "--ckpt_path", problems)
    return problems


def check_image_codes(config: dict, sources: SourceURLs | None = None) -> list[str]:
    """Sources whose pretokenize stamp names another image tokenizer than the model's `image_tokenizer`, or views of
    another size than the data's `image_size` (module docstring). A copy of the tokenizer elsewhere (same size,
    another path) passes."""
    from synergen_lightning.data.sources import is_remote
    from synergen_lightning.image_tokenizer.pretokenize import PRETOKENIZE_STAMP, read_stamp
    from synergen_lightning.io import path_identity

    model = (config.get("model") or {}).get("init_args") or {}
    data = (config.get("data") or {}).get("init_args") or {}
    tokenizer = model.get("image_tokenizer")
    if not isinstance(tokenizer, (str, os.PathLike)) or not Path(tokenizer).exists():
        return []  # none, or missing: check_inputs says so
    ours = path_identity(tokenizer)
    image_size = data.get("image_size") or model.get("image_size")  # the data's views follow the model's when unset
    problems, seen = [], set()
    for key, urls, _ in expand_sources(config) if sources is None else sources:
        if not key.startswith("data.init_args.") or urls is None:
            continue  # another part's sources, or missing ones (check_inputs says so)
        # a remote source's stamp is not fetched
        for folder in {Path(u).parent for u in urls if not is_remote(u)} - seen:
            seen.add(folder)
            stamp = folder / PRETOKENIZE_STAMP
            try:
                made = read_stamp(folder)
            except ValueError as exc:
                problems.append(f"{key}: {exc}: pretokenize the directory again, or delete the file")
                continue
            if made is None:
                continue
            theirs, views = made["tokenizer"], made.get("views") or {}
            same_file = theirs.get("path") == ours["path"]
            if theirs.get("size") != ours["size"] or (same_file and theirs.get("mtime_ns") != ours["mtime_ns"]):
                ours_named = f"model.init_args.image_tokenizer {str(tokenizer)!r}"
                made_by = (f"{ours_named} before it last changed" if same_file
                           else f"image tokenizer {theirs.get('path')!r}, not by {ours_named}")
                problems.append(
                    f"{key}: the codes in {str(folder)!r} were made by {made_by} ({stamp}): pretokenize them again "
                    "with it (`synergen data pretokenize`; make does so when the tokenizer changes) or point "
                    "image_tokenizer at the one that made them")
            elif image_size and views.get("image_size") not in (None, image_size):
                problems.append(
                    f"{key}: the codes in {str(folder)!r} are of {views['image_size']}-px views ({stamp}), the run "
                    f"reads {image_size}-px views: pretokenize them again with `--image-size {image_size}`, or set "
                    f"image_size to {views['image_size']}")
    return problems


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def output_dirs(config: dict) -> list[tuple[str, Path]]:
    trainer = config.get("trainer") or {}
    out = [("trainer.default_root_dir", Path(trainer.get("default_root_dir") or os.getcwd()))]
    for where, args in _parts(config):
        for name in OUTPUTS:
            if isinstance(args.get(name), (str, os.PathLike)) and args.get(name):
                out.append((f"{where}.{name}", Path(args[name])))
    return out


def check_outputs(config: dict) -> list[str]:
    problems = []
    for key, path in output_dirs(config):
        if path.exists() and not path.is_dir():
            problems.append(f"{key} {str(path)!r} is a file, not a directory: choose a directory for the run's outputs")
            continue
        base = _nearest_existing(path)
        if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
            shown = "" if base == path.absolute() else f" (its nearest existing parent {str(base)!r} is not)"
            problems.append(f"{key} {str(path)!r} is not writable{shown}: choose a writable directory or fix its "
                            "permissions")
    return problems


def estimated_parameters(config: dict) -> int | None:
    """Parameters of the recipe's model, counted on the meta device (no memory, no weights read); None for a model
    this does not know (or one whose inputs are missing: check_inputs reports those)."""
    import torch

    model = config.get("model") or {}
    cls, args = str(model.get("class_path", "")), dict(model.get("init_args") or {})
    try:
        with torch.device("meta"):
            if cls.endswith("SynerGenVL"):
                from synergen_lightning.system import SPECIAL_TOKENS, SynerGenVL

                ids = {n: i for i, n in enumerate(SPECIAL_TOKENS + ("bos", "eos", "pad", "im_start", "im_end"))}
                args.update(special_token_ids=ids, text_tokenizer=None, image_tokenizer=None, init_from=None,
                            codebook_size=args.get("codebook_size") or 16384)
                if args.get("llm") is not None:
                    args["base_llm"] = None
                m = SynerGenVL.from_paths(**{k: v for k, v in args.items() if not k.startswith("_")})
            elif cls.endswith("MMoELLM") and args.get("config"):
                from synergen_lightning.models.config import LLMConfig
                from synergen_lightning.models.mmoe import MMoETransformer

                m = MMoETransformer(LLMConfig(**args["config"]), vision_experts=bool(args.get("vision_experts", True)))
            else:
                return None
        return sum(p.numel() for p in m.parameters())
    except Exception:  # noqa: BLE001 - no estimate; the build itself will say what is wrong
        return None


def check_disk(config: dict) -> list[str]:
    params = estimated_parameters(config)
    if not params:
        return []
    outs = output_dirs(config)
    key, where = next(((k, p) for k, p in outs if k.endswith(".dirpath")), outs[0])
    base = _nearest_existing(where)
    if not base.is_dir():
        return []
    need, free = 2 * BYTES_PER_PARAM * params, shutil.disk_usage(base).free
    if free >= need:
        return []
    return [f"{key} {str(where)!r}: {free / 2**30:.2f} GiB free, below two checkpoints of this model ({need / 2**30:.2f} "
            f"GiB: {params:,} parameters x {BYTES_PER_PARAM} bytes of weights and AdamW state, twice): free disk space or "
            "write the checkpoints elsewhere (the checkpoint callback's dirpath / trainer.default_root_dir)"]


def preflight(config: dict) -> None:
    """Raise `PreflightError` with one line per problem of a `fit` config (module docstring)."""
    sources = expand_sources(config)
    problems = check_inputs(config, sources) + check_outputs(config) + check_image_codes(config, sources)
    if not problems:
        problems = check_disk(config)  # the estimate needs the inputs (e.g. the base LLM's config)
    if problems:
        raise PreflightError("\n".join(problems))
