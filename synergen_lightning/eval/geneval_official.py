"""GenEval's official protocol: images in the folder layout its scorer reads, and its summary of the scores.

    synergen eval geneval-official --ckpt CKPT --metadata evaluation_metadata.jsonl --out DIR --samples 4

writes, for the N-th line of GenEval's `prompts/evaluation_metadata.jsonl`,

    DIR/<N:05d>/metadata.jsonl        that line (one JSON object)
    DIR/<N:05d>/samples/<k:05d>.png   k = 0 .. samples-1

as GenEval's own generation script does, so its scorer runs on DIR unchanged
(`python evaluation/evaluate_images.py DIR --outfile results.jsonl --model-path OBJECT_DETECTOR_FOLDER`).
Prompt N is drawn with seed `seed + N`, so the run is resumable: a prompt whose samples all exist is skipped, and
a rerun of a missing one draws the same images. `summarize_results` is GenEval's `summary_scores.py`: the share of
correct images per tag and the overall score as the mean over tags.
"""

from __future__ import annotations

import json
from pathlib import Path

from synergen_lightning.eval.fid import EvalInputError
from synergen_lightning.io import JsonlLineError, iter_jsonl
from synergen_lightning.sharing import WHOLE, Share


def read_metadata(path: str | Path) -> list[dict]:
    """The lines of a GenEval metadata file; each needs a string 'prompt' and 'tag' (errors name the line)."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise EvalInputError(f"--metadata {str(p)!r} {what}; pass GenEval's prompts/evaluation_metadata.jsonl")
    rows = []
    try:
        for lineno, row in iter_jsonl(p):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("tag"), str):
                raise EvalInputError(f"{p} line {lineno}: needs string 'prompt' and 'tag' keys (GenEval's metadata "
                                     "format); fix or delete that line")
            rows.append(row)
    except JsonlLineError as exc:
        raise EvalInputError(str(exc)) from None
    if not rows:
        raise EvalInputError(f"--metadata {p} has no prompts")
    return rows


def prompt_dir(out: str | Path, index: int) -> Path:
    return Path(out) / f"{index:05d}"


def sample_path(out: str | Path, index: int, k: int) -> Path:
    return prompt_dir(out, index) / "samples" / f"{k:05d}.png"


def is_done(out: str | Path, index: int, samples: int) -> bool:
    return (prompt_dir(out, index) / "metadata.jsonl").is_file() and \
        all(sample_path(out, index, k).is_file() for k in range(samples))


def write_layout(model, metadata: list[dict], out: str | Path, samples: int = 4, cfg_scale: float = 7.5,
                 seed: int = 0, temperature: float = 1.0, batch_size: int = 16, progress: bool = False,
                 share: Share = WHOLE) -> dict:
    """Generate `samples` images per metadata line into GenEval's layout; prompts already complete are skipped.
    `share`: this process draws only the prompts it takes (`sharing`); "generated" counts those."""
    from synergen_lightning.eval.suites import eval_mode
    from synergen_lightning.progress import progress_bar

    if samples < 1:
        raise EvalInputError(f"--samples {samples} must be >= 1 (GenEval: 4)")
    out = Path(out)
    todo = [i for i in range(len(metadata)) if not is_done(out, i, samples)]
    for i in sorted(set(range(len(metadata))) - set(todo)):  # a done folder must hold this metadata's prompt
        stored = (prompt_dir(out, i) / "metadata.jsonl").read_text().strip()
        if json.loads(stored or "null") != metadata[i]:
            raise EvalInputError(f"{prompt_dir(out, i)} holds the samples of {stored[:80]!r}, not of line {i + 1} of "
                                 "this metadata: another metadata file's folder; delete it or choose another --out")
    mine = [i for i in todo if share.takes(i)]
    with eval_mode(model), progress_bar(progress, "geneval: generating", len(mine)) as advance:
        for i in mine:
            d = prompt_dir(out, i)
            (d / "samples").mkdir(parents=True, exist_ok=True)
            (d / "metadata.jsonl").write_text(json.dumps(metadata[i]) + "\n")
            images = model.generate_images([metadata[i]["prompt"]], num=samples, cfg_scale=cfg_scale,
                                           temperature=temperature, seed=seed + i, batch_size=batch_size)
            for k, img in enumerate(images):
                tmp = d / "samples" / f"{k:05d}.tmp"
                img.save(tmp, format="PNG")
                tmp.replace(sample_path(out, i, k))  # a killed run leaves no half-written sample that counts as done
            advance(1)
    return {"prompts": len(metadata), "generated": len(mine), "skipped": len(metadata) - len(todo),
            "samples": samples, "out": str(out)}


def summarize_results(results_jsonl: str | Path) -> dict:
    """GenEval's summary of its scorer's results.jsonl: {"overall", "per_tag": {tag: share correct}, counts}."""
    p = Path(results_jsonl)
    if not p.is_file():
        raise EvalInputError(f"GenEval results {str(p)!r} do not exist; run GenEval's evaluation/evaluate_images.py "
                             "on the generated folder first")
    per_tag: dict[str, list[bool]] = {}
    prompts: dict[str, bool] = {}
    try:
        for lineno, row in iter_jsonl(p):
            try:
                tag, ok = row["tag"], bool(row["correct"])
            except (KeyError, TypeError) as exc:
                raise EvalInputError(f"{p} line {lineno}: not a GenEval result line ({type(exc).__name__}); it needs "
                                     "'tag' and 'correct'") from None
            per_tag.setdefault(tag, []).append(ok)
            key = str(row.get("metadata", row.get("prompt")))
            prompts[key] = prompts.get(key, False) or ok
    except JsonlLineError as exc:
        raise EvalInputError(f"{exc}: not a GenEval result line") from None
    if not per_tag:
        raise EvalInputError(f"GenEval results {p} are empty")
    scores = {t: sum(v) / len(v) for t, v in per_tag.items()}
    n = sum(len(v) for v in per_tag.values())
    return {"overall": sum(scores.values()) / len(scores), "per_tag": scores, "num_images": n,
            "num_prompts": len(prompts), "correct_images": sum(sum(v) for v in per_tag.values()) / n,
            "correct_prompts": sum(prompts.values()) / len(prompts)}
