"""The `synergen` command.

`synergen fit|validate --config recipes/X.yaml` is LightningCLI (OmegaConf interpolation
in recipes, any LightningModule / DataModule / callback plugged by `class_path`). Every other
sub-command lives in the room that owns it and is registered in `COMMANDS` below as
"module:function"; the function receives the remaining argv and owns its own argparse `--help`.
Modules are imported only when their command runs, so `synergen --help` stays fast.

`--trust-checkpoint`, anywhere on the line, lets every checkpoint read by the command run code while loading
(synergen_lightning/safe_load.py: by default a checkpoint that is not plain data is refused).
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
import warnings
from pathlib import Path

LIGHTNING_SUBCOMMANDS = ("fit", "validate")
# LightningCLI's other two subcommands: no module here has a test split or a predict step; what does their job
INSTEAD_OF = {
    "test": "`synergen validate --config RECIPE --ckpt_path CKPT` (the val losses) or `synergen eval report --ckpt "
            "CKPT` (the benchmarks)",
    "predict": "`synergen generate` (images from prompts) or `synergen answer` (a question about an image)",
}

# command words -> (entry point "module:function", one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("data", "synth"): ("synergen_lightning.world.cli:synth_main", "write the synthetic shape world as webdataset shards"),
    ("data", "train-bpe"): ("synergen_lightning.text_tokenizer:train_bpe_main", "train the tiny default byte-level BPE text tokenizer on a corpus"),
    ("data", "pretokenize"): ("synergen_lightning.image_tokenizer.pretokenize:main", "add .codes.npy (VQ code grids) to every sample of a shard set"),
    ("eval", "tokenizer"): ("synergen_lightning.image_tokenizer.evaluate:main", "PSNR/SSIM, codebook usage and round-trip stability of an image tokenizer on val shards"),
    ("eval", "geneval"): ("synergen_lightning.world.cli:geneval_main", "score generated images against shape-world prompts (GenEval's six categories)"),
    ("eval", "report"): ("synergen_lightning.eval.cli:report_main", "GenEval / understanding / text retention / FID report with sample grid and training curves"),
    ("eval", "fid"): ("synergen_lightning.eval.cli:fid_main", "FID / IS / KID (torch-fidelity, local Inception weights) between two image directories"),
    ("eval", "cosine"): ("synergen_lightning.eval.cli:cosine_main", "per-layer cosine of understanding vs generation visual features (paper Fig. 4)"),
    ("eval", "grounding"): ("synergen_lightning.eval.cli:grounding_main", "does the model use its inputs? caption gain and image gain (teacher-forced nats; ~0 = ignored)"),
    ("eval", "geneval-official"): ("synergen_lightning.eval.cli:geneval_official_main", "GenEval prompts -> the folder layout GenEval's official scorer reads (resumable)"),
    ("eval", "mjhq-fid"): ("synergen_lightning.eval.cli:mjhq_fid_main", "MJHQ-30K FID, overall and per category (local meta_data.json and images)"),
    ("eval", "coco-fid"): ("synergen_lightning.eval.cli:coco_fid_main", "MSCOCO-30K FID from a local captions_val2014.json and val images"),
    ("eval", "lm-eval"): ("synergen_lightning.eval.cli:lm_eval_main", "lm-eval (EleutherAI harness) with the `synergen` model: MMLU, CMMLU, any text task (extra: lm-eval)"),
    ("import-hf",): ("synergen_lightning.export:import_hf_main", "convert a local Hugging Face Llama/Qwen2/InternLM2 directory into an MMoE LLM checkpoint"),
    ("generate",): ("synergen_lightning.inference_cli:generate_main", "generate images from text prompts with a trained SynerGenVL checkpoint"),
    ("answer",): ("synergen_lightning.inference_cli:answer_main", "answer a question about an image with a trained SynerGenVL checkpoint"),
    ("export",): ("synergen_lightning.export:main", "consolidate a sharded (FSDP2) or single-file checkpoint into one safetensors file + config"),
    ("ablations",): ("synergen_lightning.ablations:main", "the paper's ablations in miniature (token folding, progressive alignment, the head's width) -> runs/ablations/"),
    ("plan",): ("synergen_lightning.plan:main", "per-GPU memory of a recipe's training step under FSDP2 (meta-device model, measured activations)"),
    ("demo", "report"): ("synergen_lightning.eval.cli:demo_report_main", "score a trained tiny SynerGenVL (GenEval, Q/A, text skill) into report.json + a sample grid"),
}


def _usage() -> str:
    lines = [
        "usage: synergen <command> [options]",
        "",
        "Training (LightningCLI; `synergen fit --help` lists every key of a recipe):",
        "  fit --config recipes/tiny/stage1.yaml [--trainer.max_steps 100 ...]",
        "  validate --config ... --ckpt_path CKPT      (the val losses of a checkpoint)",
        "",
        "Other commands (each has --help):",
    ]
    tail = ["", "Any command: --trust-checkpoint loads checkpoints that would run code (only from a source you trust).",
            "synergen --version: the installed version."]
    for words, (_, help_) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<18} {help_}")
    return "\n".join(lines + tail)


def _group_usage(group: str) -> str:
    """`synergen eval --help`: the group's commands, each with its one-line help."""
    lines = [f"usage: synergen {group} <command> [options]", "", "Commands (each has --help):"]
    lines += [f"  {' '.join(w):<22} {h}" for w, (_, h) in COMMANDS.items() if w[0] == group]
    return "\n".join(lines)


def _resolve(argv: list[str]):
    """Longest registered command-word prefix of argv -> (function, rest of argv)."""
    for n in (2, 1):
        key = tuple(argv[:n])
        if key in COMMANDS:
            module_name, func_name = COMMANDS[key][0].split(":")
            return getattr(importlib.import_module(module_name), func_name), argv[n:]
    return None, argv


def resolve_recipe_parts(model) -> None:
    """A recipe's model (a class_path / init_args namespace), with what its files hold filled into its init args: a
    SynerGenVL's trunk shape, special-token ids and codebook (`model_parts.resolve_model_parts`), an MMoELLM's
    vocabulary (`llm.resolve_llm_parts`). The constructors then read no file. Other models: unchanged."""
    if model is None or not model.get("class_path"):
        return
    module_name, _, class_name = str(model["class_path"]).rpartition(".")
    from synergen_lightning.llm import MMoELLM, resolve_llm_parts
    from synergen_lightning.model_parts import resolve_model_parts
    from synergen_lightning.system import SynerGenVL

    cls = getattr(importlib.import_module(module_name), class_name)
    resolve = resolve_model_parts if issubclass(cls, SynerGenVL) else resolve_llm_parts if issubclass(cls, MMoELLM) else None
    if resolve is None:
        return
    init_args = model["init_args"]
    given = init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args)
    for key, value in resolve(given).items():
        if value is not given.get(key):
            init_args[key] = value


def quiet_lightning_notices() -> None:
    """Drop lines Lightning prints that a user cannot act on: its advert for a cloud logger, the FutureWarning its own
    pytree helper triggers under torch >= 2.10 (`isinstance(treespec, LeafSpec)`), and its hint on a first start with
    `--ckpt_path last`."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    # `--ckpt_path last` (`make stage1 RECIPE=...`) on a run's first start: there is nothing to resume, as expected
    warnings.filterwarnings("ignore", message=r'.*ckpt_path="last"\) is set, but there is no last checkpoint')
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: not str(record.msg).startswith("💡 Tip:"))


def lightning_cli(args: list[str] | None = None, run: bool = True):
    """LightningCLI with OmegaConf recipes; model and data are chosen by `class_path`."""
    quiet_lightning_notices()
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.strategies import ModelParallelStrategy

    class SynerGenCLI(LightningCLI):
        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            # `test` and `predict` are not synergen commands (`synergen validate` / `generate` do their jobs)
            return {k: v for k, v in LightningCLI.subcommands().items() if k in LIGHTNING_SUBCOMMANDS}

        def instantiate_trainer(self, **kwargs):
            # a recipe that keeps the progress bar on and names none gets the step-counting one (progress.py)
            from lightning.pytorch.callbacks import ProgressBar

            from synergen_lightning.progress import default_progress_bar

            config = self._get(self.config_init, "trainer", default={}) or {}
            given = config.get("callbacks") or []
            given = list(given) if isinstance(given, (list, tuple)) else [given]
            if "callbacks" not in kwargs and config.get("enable_progress_bar") is not False \
                    and not any(isinstance(c, ProgressBar) for c in given):
                kwargs["callbacks"] = given + [default_progress_bar()]
            return super().instantiate_trainer(**kwargs)

        def _parse_ckpt_path(self) -> None:
            # LightningCLI reads --ckpt_path's hyper-parameters as plain data (weights_only): a checkpoint that is not
            # is refused in one line; one the user trusts skips this read (fit loads it later, trusted)
            import pickle

            from synergen_lightning.safe_load import refusal, trusted

            subcommand = self.config.get("subcommand")
            recipe_stage = self._recipe_stage(subcommand) if subcommand == "fit" else None
            ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
            in_config = bool(ckpt) and Path(str(ckpt)).is_file()  # Lightning reads a file's hyper-parameters into it
            try:
                super()._parse_ckpt_path()
            except pickle.UnpicklingError as exc:
                if not trusted():
                    raise refusal(ckpt, exc) from None
                in_config = False  # a trusted file is read later, by fit
            except Exception as exc:  # noqa: BLE001 - a file that is no checkpoint fails in many ways inside torch
                raise ValueError(f"--ckpt_path {str(ckpt)!r} is not a readable checkpoint ({type(exc).__name__}: "
                                 f"{str(exc)[:200]}); pass a run's last.ckpt (file or sharded directory)") from None
            if recipe_stage is not None:
                self._check_resumed_stage(ckpt, recipe_stage, in_config)

        def _recipe_stage(self, subcommand: str) -> str | None:
            """The stage a SynerGenVL recipe trains, as given (before --ckpt_path's hyper-parameters replace it)."""
            model = self.config[subcommand].get("model")
            if model is None or not str(model.get("class_path", "")).endswith("SynerGenVL"):
                return None
            stage = (model.get("init_args") or {}).get("stage")
            return stage if isinstance(stage, str) else None

        def _check_resumed_stage(self, ckpt, recipe_stage: str, in_config: bool) -> None:
            # --ckpt_path resumes a run with its own hyper-parameters: another stage's checkpoint would quietly train
            # that stage on, under this recipe's name and directory
            from synergen_lightning.checkpoint import read_checkpoint_meta
            from synergen_lightning.preflight import LIGHTNING_CKPT_ALIASES

            if not ckpt or str(ckpt) in LIGHTNING_CKPT_ALIASES:
                return  # an alias resumes this recipe's own run
            if in_config:  # the checkpoint's stage, as Lightning has just put it in the config: not read again
                theirs = self._recipe_stage("fit")
            else:  # a sharded directory (its meta.pt alone), or a trusted file Lightning left unread
                try:
                    theirs = (read_checkpoint_meta(ckpt).get("hyper_parameters") or {}).get("stage")
                except Exception:  # noqa: BLE001 - missing or unreadable: the preflight names it
                    return
            if isinstance(theirs, str) and theirs != recipe_stage:
                raise ValueError(
                    f"--ckpt_path {str(ckpt)!r} is a checkpoint of a {theirs!r} run and the recipe trains "
                    f"{recipe_stage!r}: resuming would train {theirs!r} on. To start {recipe_stage!r} from its "
                    f"weights, pass it as --model.init_args.init_from {ckpt} (and leave --ckpt_path out); to resume "
                    f"that run, use its {theirs!r} recipe")

        def before_instantiate_classes(self) -> None:
            # before any model is built: every input of the recipe, the outputs, the disk (synergen_lightning/preflight.py)
            config = self.config[self.subcommand] if self.subcommand else self.config
            if self.subcommand == "fit":
                from synergen_lightning.preflight import preflight

                preflight(config.as_dict())
            resolve_recipe_parts(config.get("model"))

        def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
            # Lightning's own checkpoint read (`--ckpt_path`) as plain data too, unless the user trusts the file
            from synergen_lightning.safe_load import allow_project_types, trusted

            allow_project_types()
            kwargs = super()._prepare_subcommand_kwargs(subcommand)
            if "weights_only" in self._subcommand_method_arguments.get(subcommand, ()) and kwargs.get("weights_only") is None:
                kwargs["weights_only"] = not trusted()
            return kwargs

        def before_fit(self) -> None:
            from lightning.pytorch.callbacks import ModelCheckpoint

            ckpt = self.config[self.subcommand].get("ckpt_path")
            if ckpt == "last":  # as Lightning resolves it: the newest last*.ckpt of the run's checkpoint callbacks
                found = [p for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)
                         for p in cb._find_last_checkpoints(self.trainer)]
                ckpt = max(found, key=os.path.getmtime) if found else None
            # a resumed run takes every weight from its checkpoint: the stage's `init_from` / `base_llm` weights are not
            # loaded (that costs a whole checkpoint per replica, and the previous stage's files may be gone)
            self.model.__dict__["_resuming"] = bool(ckpt)
            # a sharded (directory) checkpoint only loads under FSDP2; say so instead of an IsADirectoryError
            if ckpt and Path(str(ckpt)).is_dir() and not isinstance(self.trainer.strategy, ModelParallelStrategy):
                raise SystemExit(f"--ckpt_path {ckpt!r} is a sharded (FSDP2) checkpoint directory: resume it with "
                                 "--trainer.strategy.class_path synergen_lightning.distributed.FSDP2Strategy "
                                 "(any --trainer.devices), or consolidate it first with `synergen export`")

    return SynerGenCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


# The rooms whose own `raise ValueError / OSError(...)` messages are written for the user: the bad value and the fix.
OWN_CODE = tuple(str(Path(__file__).resolve().parents[1] / room) + os.sep
                 for room in ("synergen_lightning", "datamodules", "callbacks"))
TRACEBACK_ENV = "SYNERGEN_TRACEBACK"


def user_error(exc: BaseException) -> BaseException | None:
    """The exception in `exc`'s chain that names a bad input: a ValueError or OSError raised by our own code (the root
    cause first: jsonargparse and Lightning re-raise a recipe's error wrapped in their own). None for anything else
    (a RuntimeError, an error raised inside a library): those are bugs and keep their traceback."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in reversed(chain):
        if isinstance(e, (ValueError, OSError)) and e.__traceback__ is not None:
            where = traceback.extract_tb(e.__traceback__)[-1].filename
            if str(Path(where).resolve()).startswith(OWN_CODE):
                return e
        # the file system's own refusals name the path the user gave (a file where a directory goes, no permission)
        if isinstance(e, OSError) and getattr(e, "filename", None) is not None:
            return e
    return None


def print_config_with_plan(argv: list[str]) -> int:
    """`--print_config`, followed by what the strategy will derive from it (world size, micro-batch, gradient
    accumulation, worst-case tokens per GPU, clipping) as YAML comments, so a recipe's per-GPU load is read before
    any GPU is asked for."""
    import contextlib
    import io

    import yaml

    from synergen_lightning.distributed import batch_plan

    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out):
        try:
            lightning_cli(argv)
        except SystemExit as exc:
            code = exc.code or 0
    text = out.getvalue()
    sys.stdout.write(text)
    try:
        plan = batch_plan(yaml.safe_load(text) or {})
    except (yaml.YAMLError, ValueError, TypeError, AttributeError) as exc:
        plan = {"error": str(exc)}
    if plan:
        sys.stdout.write("# derived by the strategy at this world size:\n")
        for key, value in plan.items():
            sys.stdout.write(f"#   {key}: {value}\n")
    return int(code)


def config_paths(argv: list[str]) -> list[str]:
    """The recipe files a command line names: `--config FILE` (or `-c FILE`) and `--config=FILE`, in order."""
    return [argv[i + 1] if arg in ("--config", "-c") else arg.split("=", 1)[1] for i, arg in enumerate(argv)
            if (arg in ("--config", "-c") and i + 1 < len(argv)) or arg.startswith("--config=")]


def check_config_files(argv: list[str]) -> None:
    """Each `--config FILE` of a Lightning command read as YAML first: jsonargparse's error names no file."""
    from synergen_lightning.io import check_yaml

    for path in config_paths(argv):
        if Path(path).is_file():
            check_yaml(path)


def check_fit_recipe(argv: list[str]) -> int:
    """`synergen plan`'s recipe read by `synergen fit`'s parser first (nothing built): a key or value fit would refuse
    is refused here in its words, not planned around. 0, or the parser's exit code after its message."""
    import contextlib
    import io

    configs = config_paths(argv)
    if not configs or any(a in ("-h", "--help") for a in argv) or not all(Path(c).is_file() for c in configs):
        return 0  # plan's own parser answers --help and names a missing file
    check_config_files(argv)
    said = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(said), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LightningCLI's note that sys.argv (the plan command) differs from its args
        try:
            lightning_cli(["fit", *[x for c in configs for x in ("--config", c)], "--print_config"])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    if code:
        why = [ln.removeprefix("error:").strip() for ln in said.getvalue().splitlines() if ln.startswith("error:")]
        print(f"synergen plan: error: {' + '.join(configs)} is not a recipe synergen fit accepts: "
              f"{'; '.join(why or said.getvalue().strip().splitlines()[-1:])}", file=sys.stderr)
        return 2
    return 0


def _run(argv: list[str]) -> int:
    if argv[0] == "plan":
        code = check_fit_recipe(argv)
        if code:
            return code
    if argv[0] in LIGHTNING_SUBCOMMANDS:
        check_config_files(argv)
        if argv[0] == "fit" and any(a.startswith("--print_config") for a in argv):
            return print_config_with_plan(argv)
        # from the shell LightningCLI reads sys.argv itself (given both, it warns on every run that they may differ)
        lightning_cli(None if argv == sys.argv[1:] else argv)
        return 0
    if argv[0] in INSTEAD_OF:
        print(f"synergen {argv[0]}: not a synergen command; use {INSTEAD_OF[argv[0]]}", file=sys.stderr)
        return 2
    func, rest = _resolve(argv)
    is_group = any(len(w) > 1 and w[0] == argv[0] for w in COMMANDS)
    if func is None and is_group and argv[1:2] in ([], ["-h"], ["--help"]):
        # a group alone asks for a command (exit 2); with --help it lists them
        asked = bool(argv[1:])
        print(_group_usage(argv[0]) if asked else f"synergen {argv[0]}: name a command\n\n{_group_usage(argv[0])}",
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    if func is None:
        group = [" ".join(w) for w in COMMANDS if w[0] == argv[0]]
        hint = f" Did you mean one of: {', '.join(group)}?" if group else ""
        asked = " ".join(argv[:2] if argv[0] in {w[0] for w in COMMANDS if len(w) > 1} else argv[:1])
        print(f"synergen: unknown command {asked!r}.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    return int(func(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    from synergen_lightning.safe_load import TRUST_ENV, TRUST_FLAG

    argv = list(sys.argv[1:] if argv is None else argv)
    if TRUST_FLAG in argv:  # for every checkpoint this command (and the processes it starts) reads
        argv = [a for a in argv if a != TRUST_FLAG]
        os.environ[TRUST_ENV] = "1"
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"synergen {version('synergen-lightning')}")
        except PackageNotFoundError:  # run from a checkout on PYTHONPATH, not installed
            print("synergen (not installed: run from a checkout)")
        return 0
    try:
        return _run(argv)
    except (ValueError, OSError) as exc:
        # a bad recipe value, path or file: its one-line message (value + fix), not 70 lines of wrapped tracebacks
        cause = user_error(exc)
        if cause is None or os.environ.get(TRACEBACK_ENV):
            raise
        command = " ".join(argv[:2] if argv[0] in ("data", "eval", "demo") else argv[:1])
        print(f"synergen {command}: error: {cause}\n({TRACEBACK_ENV}=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
