"""`synergen eval report`: one directory a researcher opens to judge a run.

    OUT/report.json       every metric (suites below), the inputs used, timings
    OUT/report.md         metric tables, the sample grid, the training-curve plots
    OUT/samples.png       fixed prompts x fixed seeds
    OUT/curves_<group>.png  TensorBoard scalars of the run (train/, val/, eval/, lr, throughput), one panel a tag

Suites: `geneval` (shape-world GenEval), `und` (val Q/A exact match), `text` (held-out text skill and its
retention vs the base LLM), `grounding` (does the model use its inputs: caption gain and image gain, teacher-forced
nats; eval/grounding.py), `fid` (FID / IS / KID with torch-fidelity); beside them, `external` results files of the
field's evaluators (GenEval's scorer, `synergen eval mjhq-fid/coco-fid`, lm-eval, lmms-eval; eval/external.py).
Everything is written into a
hidden temporary directory next to OUT and renamed to OUT at the end: a failed run leaves no report
that looks complete.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from synergen_lightning.eval.fid import EvalInputError
from synergen_lightning.io import atomic_directory

SUITES = ("geneval", "und", "text", "grounding", "fid")


# ---------------------------------------------------------------------------------------- checkpoints
def check_system_checkpoint(path: str | Path) -> dict:
    """The loaded checkpoint dict if it is a SynerGenVL system checkpoint; a clear error naming what it is otherwise."""
    p = Path(path)
    if p.is_dir():  # what a multi-process (FSDP2) run saves, or `synergen export` writes
        return _check_system_directory(p)
    if not p.is_file():
        raise EvalInputError(f"--ckpt {str(p)!r} does not exist: train one with `make sft` (runs/tiny/sft/last.ckpt)")
    from synergen_lightning.safe_load import UntrustedCheckpointError, torch_load

    try:
        ckpt = torch_load(p, mmap=True)  # mmap: a 2B checkpoint is not read twice
    except UntrustedCheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise EvalInputError(f"--ckpt {str(p)!r} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    sd = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise EvalInputError(f"--ckpt {str(p)!r} has no state_dict: not a Lightning checkpoint; pass a SynerGenVL "
                             "checkpoint such as runs/tiny/sft/last.ckpt")
    keys = list(sd)
    if all(any(k.startswith(pre) for k in keys) for pre in ("llm.", "folder.", "head.")):
        return ckpt
    if any(k.startswith(("encoder.", "quantizer.", "decoder.", "model.encoder.", "vq.")) for k in keys):
        kind = "an image-tokenizer (VQTokenizer) checkpoint"
    elif "config" in (ckpt.get("hyper_parameters") or {}):
        kind = "a text-only LLM (MMoELLM) checkpoint"
    else:
        kind = f"not a SynerGenVL checkpoint (state_dict keys like {keys[:2]})"
    raise EvalInputError(f"--ckpt {str(p)!r} is {kind}, not a SynerGenVL system checkpoint; pass the system's "
                         "checkpoint (e.g. runs/tiny/sft/last.ckpt)")


def _check_system_directory(p: Path) -> dict:
    """{"hyper_parameters": ...} of a sharded checkpoint or export directory holding a SynerGenVL."""
    from synergen_lightning.checkpoint import read_checkpoint_meta
    from synergen_lightning.distributed import is_sharded_checkpoint

    if ((p / "model.safetensors").is_file() and (p / "config.json").is_file()) or is_sharded_checkpoint(p):
        hp = dict(read_checkpoint_meta(p).get("hyper_parameters") or {})
    else:
        raise EvalInputError(f"--ckpt {str(p)!r} is a directory but neither a sharded checkpoint (.metadata) nor an "
                             "export (model.safetensors + config.json); pass e.g. runs/tiny/sft/last.ckpt")
    if "llm" not in hp or "fold" not in hp:
        raise EvalInputError(f"--ckpt {str(p)!r} holds no SynerGenVL hyper-parameters (llm, fold): not a system "
                             "checkpoint; pass the system's checkpoint (e.g. runs/tiny/sft/last.ckpt)")
    return {"hyper_parameters": hp}


def load_system(path: str | Path, device: str = "cpu", text_tokenizer: str | None = None,
                image_tokenizer: str | None = None):
    from synergen_lightning.system import load_synergen

    check_system_checkpoint(path)
    overrides = {k: v for k, v in (("text_tokenizer", text_tokenizer), ("image_tokenizer", image_tokenizer)) if v}
    return load_synergen(path, map_location=device, **overrides)


# ---------------------------------------------------------------------------------------- inputs
@dataclass
class ReportInputs:
    """Everything a report reads besides the model; `validate` fails before any model work."""

    suites: tuple[str, ...] = ("geneval", "und", "text", "grounding")
    eval_prompts: Path | None = None
    val_shards: str | None = None
    skill_jsonl: Path | None = None
    base_llm: str | None = None
    inception_weights: str | None = None
    fid_prompts: Path | None = None
    fid_reference: Path | None = None
    logdir: Path | None = None
    num_geneval: int = 48
    num_und: int = 64
    num_grounding: int = 64
    num_fid: int = 64
    max_text: int | None = 200
    max_tiles: int = 1
    thumbnail: bool = False
    grid_prompts: list[str] = field(default_factory=list)
    external: list[Path] = field(default_factory=list)
    grid_seeds: tuple[int, ...] = (0, 1, 2, 3)
    seed: int = 0
    cfg_scale: float = 7.5
    batch_size: int = 16
    device: str = "cpu"
    progress: bool = True

    def validate(self) -> dict:
        """Parse and check every input of the chosen suites; returns what was loaded."""
        from synergen_lightning.data.sources import expand_urls
        from synergen_lightning.eval.fid import check_inception_weights, load_image_dir, read_prompt_file

        bad = [s for s in self.suites if s not in SUITES]
        if bad or not (self.suites or self.external):
            raise EvalInputError(f"--suite {','.join(self.suites)!r}: unknown {bad or 'empty'}; choose from {','.join(SUITES)}")
        loaded: dict = {}
        if self.external:
            from synergen_lightning.eval.external import read_external

            loaded["external"] = [read_external(f) for f in self.external]
        if "geneval" in self.suites or (self.suites and not self.grid_prompts):
            if self.eval_prompts is None or not Path(self.eval_prompts).is_file():
                raise EvalInputError(f"eval prompts {str(self.eval_prompts)!r} do not exist; run `make data` "
                                     "(data/tiny/eval_prompts.jsonl) or pass --eval-prompts")
            from synergen_lightning.world.cli import load_prompts

            try:
                loaded["prompts"] = load_prompts(Path(self.eval_prompts))  # malformed lines name their number
            except ValueError as exc:
                raise EvalInputError(str(exc)) from None
        if "und" in self.suites or "grounding" in self.suites or ("fid" in self.suites and self.fid_reference is None):
            if not self.val_shards:
                raise EvalInputError("no val shards given; run `make data` or pass --val-shards")
            try:  # every shard URL form the readers take (braces, list files, pipe:, http(s)://, ...)
                expand_urls(self.val_shards, "--val-shards")
            except ValueError as exc:
                raise EvalInputError(f"{exc}; run `make data` or pass --val-shards") from None
        if "text" in self.suites and (self.skill_jsonl is None or not Path(self.skill_jsonl).is_file()):
            raise EvalInputError(f"skill file {str(self.skill_jsonl)!r} does not exist; run `make data` "
                                 "(data/tiny/text/skill_val.jsonl) or pass --skill")
        if "fid" in self.suites:
            check_inception_weights(self.inception_weights)
            if self.fid_reference is not None:
                loaded["fid_reference"] = load_image_dir(self.fid_reference)  # empty / mixed sizes fail here
            if self.fid_prompts is not None:
                loaded["fid_prompts"] = read_prompt_file(self.fid_prompts)[: self.num_fid]
            elif self.fid_reference is not None:
                raise EvalInputError("--fid-reference needs --fid-prompts (the captions to generate from), "
                                     "MSCOCO-30K style; or leave both unset to use the val shards")
        return loaded


# ---------------------------------------------------------------------------------------- curves
def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the TensorBoard event files under `logdir` -> [(step, value)] sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    dirs = sorted({f.parent for f in Path(logdir).rglob("events.out.tfevents.*")})
    for d in dirs:
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            series = out.setdefault(tag, {})
            for e in acc.Scalars(tag):
                series[int(e.step)] = float(e.value)  # a resumed run rewrites steps: the latest value wins
    return {tag: sorted(s.items()) for tag, s in sorted(out.items())}


def plot_curves(scalars: dict[str, list[tuple[int, float]]], out_dir: Path) -> dict[str, str]:
    """One PNG per tag group (the part before the first '/'), one panel per tag; returns {group: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[str]] = {}
    for tag in scalars:
        if tag in ("epoch", "hp_metric"):
            continue
        groups.setdefault(tag.split("/")[0] if "/" in tag else "other", []).append(tag)
    files = {}
    for group, tags in groups.items():
        cols = min(3, len(tags))
        rows = -(-len(tags) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), dpi=100, squeeze=False)
        for ax, tag in zip(axes.flat, tags):
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, lw=1.2, marker="o" if len(steps) < 20 else None, ms=3)
            ax.set_title(tag, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(tags):]:
            ax.axis("off")
        fig.tight_layout()
        name = f"curves_{group.replace(' ', '_')}.png"
        fig.savefig(out_dir / name)
        plt.close(fig)
        files[group] = name
    return files


# ---------------------------------------------------------------------------------------- report
def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def render_markdown(report: dict) -> str:
    lines = [f"# Evaluation report: `{report['ckpt']}`", "",
             f"suites: {', '.join(report['suites'])} · device: {report['device']} · "
             f"wall time: {report['seconds']:.1f} s", ""]
    r = report["results"]
    if "geneval" in r:
        g = r["geneval"]
        cats = [k for k in ("single_object", "two_objects", "counting", "colors", "position", "color_attr") if k in g]
        lines += ["## GenEval (shape world)", "", "| overall | " + " | ".join(cats) + " |",
                  "|---|" + "---|" * len(cats),
                  f"| **{_fmt(g['overall'])}** | " + " | ".join(_fmt(g[c]) for c in cats) + " |", "",
                  f"{g.get('num_images', 0)} images, one per prompt; counts per category: {g.get('counts', {})}"
                  + (f"; per image {_fmt(g['objects_per_image'])} shapes accepted, {_fmt(g['rejected_per_image'])} "
                     "coloured blobs rejected as no shape" if "rejected_per_image" in g else ""), ""]
    if "und" in r:
        u = r["und"]
        kinds = list(u["per_kind"])
        lines += ["## Understanding (val Q/A, exact match)", "", "| accuracy | " + " | ".join(kinds) + " |",
                  "|---|" + "---|" * len(kinds),
                  f"| **{_fmt(u['accuracy'])}** | " + " | ".join(_fmt(u["per_kind"][k]) for k in kinds) + " |"]
        if "prior_accuracy" in u:  # the score of answering from the question type alone, and answer diversity
            lines += [f"| question-type prior: {_fmt(u['prior_accuracy'])} | "
                      + " | ".join(_fmt(u["prior_per_kind"].get(k)) for k in kinds) + " |",
                      "| share of the most common answer | " + " | ".join(
                          f"{_fmt(u['top_answer_share'].get(k))} ({u['top_answer'].get(k) or 'empty'})" for k in kinds) + " |"]
        lines += ["",
                  f"{u['num_items']} questions. Examples:", "", "| question | answer | predicted |", "|---|---|---|"]
        lines += [f"| {e['question']} | {e['answer']} | {e['predicted'] or '(empty)'} |" for e in u.get("examples", [])]
        lines.append("")
    if "text" in r:
        t = r["text"]
        lines += ["## Text skill retention", "", "| accuracy | base LLM accuracy | retention |", "|---|---|---|",
                  f"| {_fmt(t['accuracy'])} | {_fmt(t.get('base_accuracy'))} | **{_fmt(t.get('retention'))}** |", ""]
    if "grounding" in r:
        from synergen_lightning.eval.grounding import markdown_line

        lines += ["## Grounding (does the model use its inputs?)", "", markdown_line(r["grounding"]), ""]
    if "fid" in r:
        f = r["fid"]
        lines += ["## FID / IS / KID (torch-fidelity)", "", "| FID | IS | KID (x1000) | generated | reference |",
                  "|---|---|---|---|---|",
                  f"| **{_fmt(f.get('fid'))}** | {_fmt(f.get('isc_mean'))} ± {_fmt(f.get('isc_std'))} | "
                  f"{_fmt(1000 * f['kid_mean'])} ± {_fmt(1000 * f['kid_std'])} | {f['num_generated']} | {f['num_reference']} |",
                  "", f"Inception weights: `{report['inputs'].get('inception_weights')}`", ""]
    if r.get("external"):
        from synergen_lightning.eval.external import external_markdown

        lines += external_markdown(r["external"])
    if report.get("grid"):
        lines += ["## Samples", "", f"fixed seeds {report['grid']['seeds']} (columns) for the prompts (rows):", ""]
        lines += [f"{i}. {p}" for i, p in enumerate(report["grid"]["prompts"], 1)]
        lines += ["", f"![samples]({report['grid']['file']})", ""]
    lines += ["## Training curves", ""]
    if report.get("curves"):
        lines += [f"### {g}\n\n![{g}]({f})\n" for g, f in report["curves"].items()]
    else:
        lines += [f"No TensorBoard event files under `{report['inputs'].get('logdir')}`.", ""]
    return "\n".join(lines) + "\n"


def build_report(model, inputs: ReportInputs, out: str | Path, ckpt_name: str = "(in memory)",
                 overwrite: bool = False) -> Path:
    """Run the suites, plot, write OUT/report.{json,md} atomically. Returns OUT."""
    from synergen_lightning.eval.grid import save_grid
    from synergen_lightning.eval.suites import (
        fid_suite,
        geneval_suite,
        load_qa_items,
        load_reference_images,
        text_suite,
        understanding_suite,
    )

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise EvalInputError(f"--out {out} exists and is not empty; pass --overwrite or choose another --out")
    loaded = inputs.validate()
    t0 = time.time()
    with atomic_directory(out) as tmp:
        results: dict = {}
        prompts = loaded.get("prompts", [])
        if "geneval" in inputs.suites:
            results["geneval"] = geneval_suite(model, prompts[: inputs.num_geneval], seed=inputs.seed,
                                               cfg_scale=inputs.cfg_scale, batch_size=inputs.batch_size,
                                               progress=inputs.progress)
        if "und" in inputs.suites:
            results["und"] = understanding_suite(model, load_qa_items(inputs.val_shards, inputs.num_und),
                                                 batch_size=inputs.batch_size, max_tiles=inputs.max_tiles,
                                                 thumbnail=inputs.thumbnail, progress=inputs.progress)
        if "text" in inputs.suites:
            results["text"] = text_suite(model, inputs.skill_jsonl, base_llm=inputs.base_llm,
                                         max_examples=inputs.max_text)
        if "grounding" in inputs.suites:
            from synergen_lightning.eval.grounding import grounding_suite, report_block

            results["grounding"] = report_block(grounding_suite(
                model, shards=inputs.val_shards, max_items=inputs.num_grounding, batch_size=inputs.batch_size,
                max_tiles=inputs.max_tiles, thumbnail=inputs.thumbnail))
        if "fid" in inputs.suites:
            if "fid_reference" in loaded:
                captions, reference = loaded["fid_prompts"], loaded["fid_reference"]
            else:
                size = model.grid[0] * model.hparams.downsample
                captions, reference = load_reference_images(inputs.val_shards, size, inputs.num_fid)
            results["fid"] = fid_suite(model, captions, reference, inputs.inception_weights, seed=inputs.seed,
                                       cfg_scale=inputs.cfg_scale, batch_size=inputs.batch_size,
                                       progress=inputs.progress, device=inputs.device)
        if loaded.get("external"):
            results["external"] = loaded["external"]
        grid_prompts = inputs.grid_prompts or [p["prompt"] for p in prompts[:6]]
        images = []
        with torch.no_grad():
            model.eval()
            for p in grid_prompts:
                for s in inputs.grid_seeds:
                    images.append(model.generate_images([p], num=1, cfg_scale=inputs.cfg_scale, seed=s, output="tensor"))
        if images:  # external results alone need no sample grid
            save_grid(torch.cat(images), tmp / "samples.png", nrow=len(inputs.grid_seeds))
        curves = {}
        if inputs.logdir is not None and Path(inputs.logdir).is_dir():
            scalars = read_scalars(inputs.logdir)
            curves = plot_curves(scalars, tmp)
        report = {
            "ckpt": str(ckpt_name), "suites": list(inputs.suites), "device": inputs.device,
            "results": results,
            "grid": {"file": "samples.png", "prompts": grid_prompts, "seeds": list(inputs.grid_seeds)} if images else None,
            "curves": curves,
            "inputs": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(inputs).items()
                       if k not in ("progress",)},
            "seconds": time.time() - t0,
        }
        report["inputs"]["grid_seeds"] = list(inputs.grid_seeds)
        report["inputs"]["suites"] = list(inputs.suites)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(render_markdown(report))
    return out
