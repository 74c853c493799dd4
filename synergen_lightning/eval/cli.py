"""`synergen eval report`, `synergen eval fid`, `synergen eval cosine`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from synergen_lightning.cli_args import check_at_least_one, device_arg
from synergen_lightning.eval.fid import INCEPTION_KEY, EvalInputError
from synergen_lightning.inference_cli import add_checkpoint_args, add_dtype_arg
from synergen_lightning.sharing import WHOLE, Share, join


def _csv_suites(value: str) -> tuple[str, ...]:
    from synergen_lightning.eval.report import SUITES

    if value.strip() == "none":  # external results only
        return ()
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in SUITES]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown suite {', '.join(map(repr, bad)) or '(empty)'}; "
                                         f"choose from {','.join(SUITES)} (or none: --external results only)")
    return items


def _recipe_value(config: Path | None, key: str):
    """`key` at the top level of a recipe YAML, or under `eval:` / `model.init_args:` (None if absent)."""
    if config is None:
        return None
    if not config.is_file():
        raise EvalInputError(f"--config {config} does not exist; pass a recipe YAML that sets {key}")
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(config), resolve=True) or {}
    for scope in (cfg, cfg.get("eval") or {}, (cfg.get("model") or {}).get("init_args") or {}):
        if isinstance(scope, dict) and scope.get(key) is not None:
            return scope[key]
    return None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", type=device_arg, help="auto: cuda when available, else cpu")
    add_dtype_arg(p)
    p.add_argument("--text-tokenizer", help="override the text tokenizer directory stored in the checkpoint")
    p.add_argument("--image-tokenizer", help="override the image tokenizer path stored in the checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="synergen eval report",
        description="Evaluate a SynerGenVL checkpoint and write OUT/report.json + OUT/report.md with metric tables, "
                    "a sample grid PNG and PNG plots of the run's TensorBoard curves. Suites: geneval (shape-world "
                    "GenEval), und (val Q/A exact match), text (held-out text skill, retention vs the base LLM), fid "
                    "(FID/IS/KID via torch-fidelity, local Inception weights), grounding (caption gain and image "
                    "gain: teacher-forced nats the true caption / image saves over a swapped one; ~0 = the input is "
                    "ignored). Written atomically: a failed run leaves no report.")
    p.add_argument("--ckpt", required=True, help="SynerGenVL checkpoint (e.g. runs/tiny/sft/last.ckpt)")
    p.add_argument("--suite", type=_csv_suites, default=("geneval", "und", "text", "grounding"),
                   help="comma-separated suites: geneval,und,text,grounding,fid (default: geneval,und,text,grounding); "
                        "none: only the --external results")
    p.add_argument("--external", type=Path, action="append", default=[],
                   help="results of the field's evaluators to include (repeat): GenEval's results.jsonl, fid.json of "
                        "`synergen eval mjhq-fid/coco-fid`, an lm-eval or lmms-eval results JSON")
    p.add_argument("--out", type=Path, required=True, help="report directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--data", type=Path, default=Path("data/tiny"),
                   help="shape-world data root (`make data`): eval_prompts.jsonl, val/shard-*.tar, text/skill_val.jsonl")
    p.add_argument("--eval-prompts", type=Path, help="GenEval prompts (default: DATA/eval_prompts.jsonl)")
    p.add_argument("--val-shards", help="val shards with Q/A in any shard URL form: glob, braces, list file, pipe:, "
                                        "http(s)://, ... (default: DATA/val/shard-*.tar)")
    p.add_argument("--skill", type=Path, help="held-out text skill jsonl (default: DATA/text/skill_val.jsonl)")
    p.add_argument("--base-llm", help="base LLM for text retention (default: the checkpoint's model.base_llm)")
    p.add_argument("--num-geneval", type=int, default=48, help="GenEval prompts used (default: 48)")
    p.add_argument("--num-und", type=int, default=64, help="val Q/A items used (default: 64)")
    p.add_argument("--num-grounding", type=int, default=64, help="val samples for the grounding suite (default: 64)")
    p.add_argument("--num-fid", type=int, default=64, help="images per FID set (default: 64; MSCOCO-30K uses 30000)")
    p.add_argument("--max-text", type=int, default=200, help="skill lines used (default: 200)")
    p.add_argument("--max-tiles", type=int, default=None, help="understanding views: InternVL-1.5 tiles (default: "
                   "what the checkpoint's last stage trained with, as `synergen demo report` uses; 1 when unknown)")
    p.add_argument("--thumbnail", action=argparse.BooleanOptionalAction, default=None,
                   help="append a thumbnail view (default: as the checkpoint's last stage trained)")
    p.add_argument("--inception-weights", help=f"local torch-fidelity Inception weights (.pth) for fid; default: the "
                   f"recipe key {INCEPTION_KEY} of --config")
    p.add_argument("--config", type=Path, help=f"a recipe YAML to read {INCEPTION_KEY} from")
    p.add_argument("--fid-prompts", type=Path, help="captions to generate for FID (.txt or .jsonl), MSCOCO-30K style")
    p.add_argument("--fid-reference", type=Path, help="directory of reference images for FID (one size)")
    p.add_argument("--logdir", type=Path, help="TensorBoard directory of the run (default: the checkpoint's directory)")
    p.add_argument("--grid-prompt", action="append", help="sample-grid prompt (repeat; default: the first 6 GenEval prompts)")
    p.add_argument("--grid-seeds", default="0,1,2,3", help="sample-grid seeds, one column each (default: 0,1,2,3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=float, default=7.5, help="CFG scale of every generation (paper: 7.5)")
    p.add_argument("--batch-size", type=int, default=16)
    _common(p)
    return p


def report_main(argv: list[str] | None = None, model=None) -> int:
    """`model`: an already built SynerGenVL (tests); otherwise --ckpt is loaded."""
    parser = report_parser()
    a = parser.parse_args(argv)
    from synergen_lightning.checkpoint import checkpoint_kind
    from synergen_lightning.eval.report import ReportInputs, build_report, check_system_checkpoint
    from synergen_lightning.eval.suites import tile_policy

    try:
        grid_seeds = tuple(int(s) for s in a.grid_seeds.split(",") if s.strip())
    except ValueError:
        parser.error(f"--grid-seeds {a.grid_seeds!r}: comma-separated integers, e.g. 0,1,2,3")
    if not grid_seeds:
        parser.error("--grid-seeds is empty; give at least one seed, e.g. 0")
    check_at_least_one(parser, a, "num_geneval", "num_und", "num_grounding", "num_fid", "batch_size")
    if model is None:
        checkpoint_kind(a.ckpt)  # a missing --ckpt stops the command here, in one line, as `synergen demo report` does
    max_tiles, thumbnail = tile_policy(a.ckpt, a.max_tiles, a.thumbnail)
    try:
        ckpt = check_system_checkpoint(a.ckpt) if model is None else None
        hp = (ckpt or {}).get("hyper_parameters") or (dict(model.hparams) if model is not None else {})
        weights = a.inception_weights or _recipe_value(a.config, INCEPTION_KEY)
        inputs = ReportInputs(
            suites=a.suite, eval_prompts=a.eval_prompts or a.data / "eval_prompts.jsonl",
            val_shards=a.val_shards or str(a.data / "val" / "shard-*.tar"),
            skill_jsonl=a.skill or a.data / "text" / "skill_val.jsonl",
            base_llm=a.base_llm or hp.get("base_llm"), inception_weights=weights, fid_prompts=a.fid_prompts,
            fid_reference=a.fid_reference, logdir=a.logdir or Path(a.ckpt).resolve().parent,
            num_geneval=a.num_geneval, num_und=a.num_und, max_tiles=max_tiles, thumbnail=thumbnail,
            num_grounding=a.num_grounding, num_fid=a.num_fid, max_text=a.max_text,
            grid_prompts=a.grid_prompt or [], external=a.external, grid_seeds=grid_seeds, seed=a.seed, cfg_scale=a.cfg,
            batch_size=a.batch_size, device=a.device,
            progress=not a.no_progress and sys.stderr.isatty())
        inputs.validate()  # every input checked before the model is even loaded
        del ckpt
        if model is None and ("geneval" in a.suite or "und" in a.suite):
            from synergen_lightning.eval.demo_report import warn_level_mismatch

            warn_level_mismatch(a.ckpt, Path(inputs.eval_prompts).parent)
        if model is None:
            from synergen_lightning.system import load_synergen

            model = load_synergen(a.ckpt, map_location=a.device, text_tokenizer=a.text_tokenizer,
                                  image_tokenizer=a.image_tokenizer, dtype=a.dtype)
        out = build_report(model, inputs, a.out, ckpt_name=a.ckpt, overwrite=a.overwrite)
    except EvalInputError as exc:
        parser.error(str(exc))
    report = json.loads((out / "report.json").read_text())
    summary = []
    r = report["results"]
    if "geneval" in r:
        summary.append(f"geneval={r['geneval']['overall']:.3f}")
    if "und" in r:
        summary.append(f"und={r['und']['accuracy']:.3f}")
    if "text" in r:
        ret = r["text"].get("retention")
        summary.append(f"text={r['text']['accuracy']:.3f}" + (f" (retention {ret:.3f})" if ret is not None else ""))
    if "grounding" in r:
        g = r["grounding"]
        summary.append(f"caption_gain={g['caption_gain_nats']:+.4f}"
                       + (f" image_gain={g['image_gain_nats']:+.4f}" if g["image_gain_nats"] is not None else ""))
    if "fid" in r:
        summary.append(f"fid={r['fid']['fid']:.2f} is={r['fid']['isc_mean']:.2f} kid={r['fid']['kid_mean']:.4f}")
    if "external" in r:
        summary.append(f"external={len(r['external'])} results file(s)")
    print(f"eval report: {' '.join(summary)} -> {out}/report.md ({report['seconds']:.1f}s)")
    return 0


def fid_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="synergen eval fid", description="FID / IS / KID (torch-fidelity) between a "
                                "directory of generated images and a directory of reference images (each one size). "
                                "Nothing is downloaded: the Inception weights come from a local file.")
    p.add_argument("--generated", type=Path, required=True, help="directory of generated images")
    p.add_argument("--reference", type=Path, required=True, help="directory of reference images")
    p.add_argument("--inception-weights", help=f"torch-fidelity Inception weights (.pth); default: {INCEPTION_KEY} of --config")
    p.add_argument("--config", type=Path, help=f"a recipe YAML to read {INCEPTION_KEY} from")
    p.add_argument("--metrics", default="fid,isc,kid", help="comma-separated subset of fid,isc,kid")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", type=device_arg, help="auto: cuda when available, else cpu")
    p.add_argument("--out", type=Path, help="also write the metrics JSON here")
    a = p.parse_args(argv)
    from synergen_lightning.eval.fid import compute_fidelity

    metrics = {m.strip() for m in a.metrics.split(",") if m.strip()}
    if not metrics or metrics - {"fid", "isc", "kid"}:
        p.error(f"--metrics {a.metrics!r}: choose from fid,isc,kid")
    try:
        weights = a.inception_weights or _recipe_value(a.config, INCEPTION_KEY)
        out = compute_fidelity(a.generated, a.reference, weights, fid="fid" in metrics, isc="isc" in metrics,
                               kid="kid" in metrics, batch_size=a.batch_size, device=a.device)
    except EvalInputError as exc:
        p.error(str(exc))
    text = json.dumps(out, indent=2)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    print(text)
    return 0


def cosine_main(argv: list[str] | None = None, model=None) -> int:
    """Paper Fig. 4 on shape-world val images (or an image directory)."""
    p = argparse.ArgumentParser(prog="synergen eval cosine", description="Per-layer cosine similarity between "
                                "understanding and generation visual features (paper Fig. 4): the same images fed as "
                                "understanding input and as generation target; mean-pooled image-token hidden states "
                                "per layer. Writes OUT/cosine.json and OUT/cosine.png.")
    p.add_argument("--ckpt", required=True, help="SynerGenVL checkpoint")
    p.add_argument("--val-shards", default="data/tiny/val/shard-*.tar",
                   help="shards with KEY.jpg + KEY.txt captions: a glob, brace pattern, list file, directory or URL "
                        "(default: data/tiny/val/shard-*.tar)")
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--question", default="Describe the image.", help="the understanding prompt's question")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    _common(p)
    a = p.parse_args(argv)
    if a.num_images < 1:
        p.error(f"--num-images {a.num_images} must be >= 1")
    from synergen_lightning.eval.analysis import images_to_codes, layer_cosine_similarity, plot_layer_similarity
    from synergen_lightning.eval.suites import load_reference_images

    try:
        model = _load_checked(a, model)
        size = model.grid[0] * model.hparams.downsample
        captions, views = load_reference_images(a.val_shards, size, a.num_images, suite="cosine")
    except EvalInputError as exc:
        p.error(str(exc))
    from PIL import Image

    codes = images_to_codes(model, [Image.fromarray(v.permute(1, 2, 0).numpy()) for v in views])
    result = layer_cosine_similarity(model, codes, captions, question=a.question)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "cosine.json").write_text(json.dumps({"ckpt": a.ckpt, "num_images": len(captions), **result}, indent=2) + "\n")
    plot_layer_similarity(result, a.out / "cosine.png")
    print("cosine per layer: " + " ".join(f"{v:.3f}" for v in result["mean"]) + f" -> {a.out}/cosine.png")
    return 0


ZERO_GAIN_HELP = ("a gain of ~0 nats means the model ignores that input (its output comes from the prior); "
                  "clearly > 0 means it reads it")


def grounding_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="synergen eval grounding",
        description="Does the model use its inputs? Teacher-forced losses on val shard samples, each through the "
                    "training sequence builder and the training loss: the image loss (nats per code) after the true "
                    "caption vs after a wrong caption (another sample's) and vs the <UNCOND> prompt, and the answer "
                    "loss (nats per answer token) of val Q/A with the true image vs another sample's image. "
                    f"A gain is loss(swapped) - loss(true): {ZERO_GAIN_HELP}. Prints one JSON object "
                    "(and writes it to --out).")
    p.add_argument("--ckpt", required=True, help="SynerGenVL checkpoint (.ckpt, sharded directory or export)")
    p.add_argument("--val-shards", default="data/tiny/val/shard-*.tar",
                   help="val shards (a glob, brace pattern, list file, directory or URL) with KEY.txt captions, KEY.json Q/A and KEY.codes.npy (pretokenized, at the "
                        "model's image size) or KEY.jpg (encoded with the image tokenizer) "
                        "(default: data/tiny/val/shard-*.tar)")
    p.add_argument("--max-items", type=int, default=64, help="val samples used: one caption item and one Q/A item "
                   "each (default: 64)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default: 32)")
    p.add_argument("--max-tiles", type=int, default=1, help="understanding views of image shards: InternVL-1.5 tiles, "
                   "as the model was trained (the tiny recipes: 1)")
    p.add_argument("--thumbnail", action="store_true", help="append a thumbnail view (when the model trained with one)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    _common(p)
    return p


def grounding_main(argv: list[str] | None = None, model=None) -> int:
    """`model`: an already built SynerGenVL (tests); otherwise --ckpt is loaded."""
    p = grounding_parser()
    a = p.parse_args(argv)
    from synergen_lightning.eval.grounding import grounding_suite, load_grounding_samples, markdown_line, report_block

    check_at_least_one(p, a, "max_items", "batch_size", "max_tiles")
    try:
        samples = load_grounding_samples(a.val_shards, a.max_items)  # bad shards fail before the model loads
        model = _load_checked(a, model)
        block = report_block(grounding_suite(model, samples, batch_size=a.batch_size, max_tiles=a.max_tiles,
                                             thumbnail=a.thumbnail))
    except EvalInputError as exc:
        p.error(str(exc))
    result = {"ckpt": a.ckpt, "val_shards": a.val_shards, **block}
    text = json.dumps(result, indent=2)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    print(text)
    print("grounding: " + markdown_line(block), file=sys.stderr)
    return 0


LM_EVAL_USAGE = """\
synergen eval lm-eval: lm-eval's own command line (EleutherAI's harness) with the `synergen` model registered, for
the text skill a SynerGenVL checkpoint keeps (MMLU, CMMLU, any lm-eval text task):

  synergen eval lm-eval run --model synergen --model_args pretrained=runs/tiny/sft/last.ckpt --tasks mmlu,cmmlu \\
      --batch_size 8 --output_path lm_eval_results

--model_args (comma-separated): pretrained (the checkpoint, any form), dtype (auto, bf16, fp32), max_gen_toks
(default 256), text_tokenizer / image_tokenizer (override the paths the checkpoint holds). The batch size and the
device are lm-eval's own --batch_size (default 1) and --device (default: cuda when available). Over N GPUs:
torchrun --nproc-per-node N -m synergen_lightning.cli eval lm-eval run ... (each GPU scores a share).
Pass the results JSON to `synergen eval report --external`. lm-eval's own help follows.
"""


def lm_eval_main(argv: list[str] | None = None) -> int:
    """`synergen eval lm-eval ARGS`: lm-eval's command line with the `synergen` model registered; `--help` (or no
    argument) first says how to name the model and its arguments, which lm-eval's own help cannot."""
    args = sys.argv[1:] if argv is None else argv
    if not args or "-h" in args or "--help" in args:
        print(LM_EVAL_USAGE)
    try:
        from synergen_lightning.eval.lm_eval_adapter import main
    except ImportError as exc:
        print(f"synergen eval lm-eval: error: {exc}", file=sys.stderr)
        return 2
    return main(argv)


def _load_checked(a, model):
    """`model` if given (tests), else --ckpt through the one loader once the eval room's check names a wrong kind of
    checkpoint (EvalInputError)."""
    from synergen_lightning.eval.report import check_system_checkpoint
    from synergen_lightning.system import load_synergen

    if model is not None:
        return model
    check_system_checkpoint(a.ckpt)
    return load_synergen(a.ckpt, map_location=a.device, text_tokenizer=a.text_tokenizer,
                         image_tokenizer=a.image_tokenizer, dtype=a.dtype)


def geneval_official_main(argv: list[str] | None = None, model=None) -> int:
    """`model`: an already built SynerGenVL (tests); otherwise --ckpt is loaded."""
    p = argparse.ArgumentParser(
        prog="synergen eval geneval-official",
        description="Generate images for GenEval's prompts in the folder layout its official scorer reads: "
                    "OUT/<N:05d>/metadata.jsonl (the N-th metadata line) and OUT/<N:05d>/samples/<k:05d>.png. "
                    "Resumable: prompts whose samples exist are skipped (prompt N is drawn with seed SEED+N); OUT "
                    "records the checkpoint and settings, and another checkpoint's or settings' run is refused. Score "
                    "with GenEval's evaluation/evaluate_images.py OUT, then pass its results.jsonl to "
                    "`synergen eval report --external`. Over N GPUs: torchrun --nproc-per-node N -m "
                    "synergen_lightning.cli eval geneval-official ... (each process draws every N-th prompt).")
    p.add_argument("--ckpt", required=True, help="SynerGenVL checkpoint (any form)")
    p.add_argument("--metadata", type=Path, required=True, help="GenEval's prompts/evaluation_metadata.jsonl")
    p.add_argument("--out", type=Path, required=True, help="image folder (GenEval's <IMAGE_FOLDER>)")
    p.add_argument("--samples", type=int, default=4, help="images per prompt (GenEval: 4)")
    p.add_argument("--cfg", type=float, default=7.5, help="CFG scale (paper: 7.5)")
    p.add_argument("--seed", type=int, default=0, help="prompt N is drawn with seed SEED+N")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16, help="rows decoded together (x2 with CFG)")
    _common(p)
    a = p.parse_args(argv)
    from synergen_lightning.eval.geneval_official import read_metadata, write_layout
    from synergen_lightning.io import MadeByError, check_made_by, path_identity

    share = WHOLE
    try:
        metadata = read_metadata(a.metadata)  # a malformed line fails before the model loads
        if a.samples < 1:
            raise EvalInputError(f"--samples {a.samples} must be >= 1 (GenEval: 4)")
        share = _share_of(a, model)
        record = {"checkpoint": path_identity(a.ckpt), "samples": a.samples, "cfg_scale": a.cfg, "seed": a.seed,
                  "temperature": a.temperature}
        share.lead_first(lambda _: check_made_by(a.out, record, "GenEval samples"))  # rank 0 writes the record
        model = _load_checked(a, model)
        res = write_layout(model, metadata, a.out, samples=a.samples, cfg_scale=a.cfg, seed=a.seed,
                           temperature=a.temperature, batch_size=a.batch_size,
                           progress=not a.no_progress and sys.stderr.isatty() and share.lead, share=share)
        generated = share.total(res["generated"])  # each prompt is drawn by the one rank that takes it
    except (EvalInputError, MadeByError) as exc:
        p.error(str(exc))
    if share.lead:
        print(f"geneval-official: {generated} prompts generated, {len(metadata) - generated} already done -> {a.out}")
    return 0


def _share_of(a: argparse.Namespace, model) -> Share:
    """This process's share of a benchmark's prompts under torchrun (`sharing.join`; `a.device` becomes its GPU); the
    whole work for a model handed in (tests)."""
    if model is not None:
        return WHOLE
    share, a.device = join(a.device)
    return share


def _fid_protocol_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description + " Over N GPUs: torchrun --nproc-per-node N -m "
                                "synergen_lightning.cli eval ... (each process draws every N-th prompt chunk; rank "
                                "0 scores).")
    p.add_argument("--ckpt", required=True, help="SynerGenVL checkpoint (any form)")
    p.add_argument("--reference", type=Path, required=True, help="the benchmark's reference image folder")
    p.add_argument("--out", type=Path, required=True, help="OUT/generated/ (reused by reruns) and OUT/fid.json")
    p.add_argument("--inception-weights", help=f"torch-fidelity Inception weights (.pth); default: {INCEPTION_KEY} of --config")
    p.add_argument("--config", type=Path, help=f"a recipe YAML to read {INCEPTION_KEY} from")
    p.add_argument("--size", type=int, help="reference images: short edge to SIZE, centre crop (default: the model's image size)")
    p.add_argument("--feature-layer", default="2048", help="Inception feature layer (FID: 2048)")
    p.add_argument("--cache-dir", type=Path, help="reference feature cache (default: ~/.cache/synergen_lightning/fid)")
    p.add_argument("--cfg", type=float, default=7.5, help="CFG scale (paper: 7.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    _common(p)
    return p


def _run_fid_protocol(p, a, protocol, items, model) -> int:
    from synergen_lightning.eval.fid_protocols import reference_paths, run_protocol

    weights = a.inception_weights or _recipe_value(a.config, INCEPTION_KEY)
    from synergen_lightning.eval.fid import check_inception_weights

    check_inception_weights(weights)
    reference_paths(items, a.reference, protocol)  # every reference image found before the model loads
    from synergen_lightning.io import MadeByError, check_made_by, path_identity

    share = _share_of(a, model)
    # what sets the generated images' distribution (a subset of the prompts, or another seed, may resume)
    try:
        record = {"checkpoint": path_identity(a.ckpt), "cfg_scale": a.cfg, "temperature": a.temperature}
        share.lead_first(lambda _: check_made_by(a.out / "generated", record, "generated images"))
    except MadeByError as exc:
        p.error(str(exc))
    model = _load_checked(a, model)
    res = run_protocol(model, protocol, items, a.reference, a.out, weights, size=a.size, layer=a.feature_layer,
                       cache_dir=a.cache_dir, cfg_scale=a.cfg, seed=a.seed, batch_size=a.batch_size,
                       temperature=a.temperature, device=a.device,
                       progress=not a.no_progress and sys.stderr.isatty() and share.lead, share=share)
    if res is None:  # another rank's share: rank 0 scores
        return 0
    cats = res.get("per_category") or {}
    print(f"{protocol} FID {res['fid']:.3f} over {res['num_images']} images"
          + ("; " + " ".join(f"{c}={v['fid'] if v['fid'] is None else round(v['fid'], 2)}" for c, v in cats.items())
             if cats else "") + f" -> {a.out}/fid.json")
    return 0


def mjhq_fid_main(argv: list[str] | None = None, model=None) -> int:
    p = _fid_protocol_parser("synergen eval mjhq-fid", "MJHQ-30K FID, overall and per category: one image per prompt "
                             "of meta_data.json, against REFERENCE/<category>/<id>.jpg (torch-fidelity, local "
                             "Inception weights; resize policy in docs/evaluation.md).")
    p.add_argument("--meta", type=Path, required=True, help="MJHQ-30K's meta_data.json ({id: {category, prompt}})")
    p.add_argument("--categories", help="comma-separated subset of categories (default: all)")
    a = p.parse_args(argv)
    from synergen_lightning.eval.fid_protocols import read_mjhq_meta

    try:
        cats = [c.strip() for c in a.categories.split(",") if c.strip()] if a.categories else None
        return _run_fid_protocol(p, a, "mjhq", read_mjhq_meta(a.meta, cats), model)
    except EvalInputError as exc:
        p.error(str(exc))


def coco_fid_main(argv: list[str] | None = None, model=None) -> int:
    p = _fid_protocol_parser("synergen eval coco-fid", "MSCOCO-30K FID: NUM images of a COCO captions file drawn "
                             "(seeded), one random caption each, generated and compared with those images "
                             "(REFERENCE/<file_name>) (torch-fidelity, local Inception weights).")
    p.add_argument("--captions", type=Path, required=True, help="COCO captions annotations (captions_val2014.json)")
    p.add_argument("--num", type=int, default=30000, help="images drawn (MSCOCO-30K: 30000)")
    a = p.parse_args(argv)
    from synergen_lightning.eval.fid_protocols import read_coco_captions

    if a.num < 2:
        p.error(f"--num {a.num} must be >= 2 (MSCOCO-30K: 30000)")
    try:
        return _run_fid_protocol(p, a, "coco", read_coco_captions(a.captions, a.num, a.seed), model)
    except EvalInputError as exc:
        p.error(str(exc))


def demo_report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synergen demo report", description="The `make demo` report of a trained tiny "
                                "SynerGenVL (OUT/report.json, samples.png, curve.png; eval/demo_report.py). Scores the "
                                "final checkpoint on every eval prompt and val question, and each --curve checkpoint "
                                "on the first --curve-prompts / --curve-questions of them.")
    add_checkpoint_args(p)
    p.add_argument("--base-llm", required=True, help="the base LLM checkpoint (text.accuracy_base)")
    p.add_argument("--data", default="data/tiny", help="shape-world directory (eval_prompts.jsonl, val/, text/)")
    p.add_argument("--out", default="runs/demo", help="report directory: report.json, samples.png, curve.png "
                   "(default: runs/demo)")
    p.add_argument("--curve", nargs="*", default=[], metavar="CKPT",
                   help="earlier stage checkpoints, in training order (e.g. runs/tiny/stage1/last.ckpt "
                        "runs/tiny/stage2/last.ckpt): the learning curve; named by their directory")
    p.add_argument("--curve-prompts", type=int, default=120, help="eval prompts per curve point (default: 120)")
    p.add_argument("--curve-questions", type=int, default=140, help="val questions per curve point (default: 140)")
    p.add_argument("--num-prompts", type=int, default=None, help="first N eval prompts (default: all)")
    p.add_argument("--cfg", type=float, default=7.5, help="CFG scale (paper: 7.5)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; above 1 the tiny model scatters more blobs and GenEval rises by clutter "
                        "alone (geneval.objects_per_image / rejected_per_image show it), so compare scores at one "
                        "temperature")
    p.add_argument("--caption-floor", action="store_true",
                   help="also score images drawn from the unconditional prompt against the eval prompts "
                        "(geneval_uncond_floor: the score of a model that ignores captions; one more GenEval pass)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--und-questions", type=int, default=500, help="val Q/A pairs to answer")
    p.add_argument("--text-examples", type=int, default=500, help="held-out text-skill items")
    p.add_argument("--grounding-items", type=int, default=64,
                   help="val samples for the grounding block (caption gain / image gain: teacher-forced nats the true "
                        "caption / image saves over a swapped one; ~0 = the input is ignored); 0 = skip")
    return p


def demo_report_main(argv: list[str] | None = None) -> int:
    p = demo_report_parser()
    a = p.parse_args(argv)
    if a.num_prompts is not None and a.num_prompts < 1:
        p.error(f"--num-prompts {a.num_prompts} must be >= 1 (or left out: all)")
    from synergen_lightning.eval.demo_report import run  # the model and Lightning: after --help

    return run(p, a)
