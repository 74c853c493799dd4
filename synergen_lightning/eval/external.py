"""Results the field's evaluators write, read into `synergen eval report --external FILE` beside the shape-world
suites:

- GenEval's scorer output `results.jsonl` (summarized as GenEval's summary_scores.py does),
- `fid.json` of `synergen eval mjhq-fid` / `coco-fid`,
- the results JSON of lm-eval or lmms-eval (`--output_path`): every task's numeric metrics.

The kind is told from the content; anything else is a one-line error naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from synergen_lightning.eval.fid import EvalInputError


def read_external(path: str | Path) -> dict:
    """{"kind": "geneval" | "fid" | "lm-eval" | "lmms-eval", "file", ...the results}."""
    from synergen_lightning.eval.geneval_official import summarize_results

    p = Path(path)
    if not p.is_file():
        raise EvalInputError(f"--external {str(p)!r} does not exist; pass GenEval's results.jsonl, a fid.json of "
                             "`synergen eval mjhq-fid/coco-fid` or an lm-eval / lmms-eval results JSON")
    if p.suffix == ".jsonl":
        return {"kind": "geneval", "file": str(p), **summarize_results(p)}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvalInputError(f"--external {p}: not JSON ({exc.msg}); pass a results file of a supported evaluator") from None
    if isinstance(data, dict) and data.get("protocol") in ("mjhq", "coco") and "fid" in data:
        return {"kind": "fid", "file": str(p), **data}
    if isinstance(data, dict) and isinstance(data.get("results"), dict):
        kind = "lmms-eval" if "lmms_eval_version" in data or "lmms_eval" in json.dumps(data.get("config", {})) \
            else "lm-eval"
        tasks = {}
        for task, metrics in data["results"].items():
            if not isinstance(metrics, dict):
                continue
            kept = {k: float(v) for k, v in metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and "_stderr" not in k}
            if kept:
                tasks[task] = kept
        model = (data.get("config") or {}).get("model_args") or (data.get("config") or {}).get("model")
        return {"kind": kind, "file": str(p), "model": str(model) if model is not None else None, "tasks": tasks}
    raise EvalInputError(f"--external {p}: neither GenEval results, a fid.json of `synergen eval mjhq-fid/coco-fid` nor "
                         "an lm-eval / lmms-eval results JSON (a 'results' object of tasks)")


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def external_markdown(entries: list[dict]) -> list[str]:
    """The report's "Benchmarks" section: one table per results file."""
    lines = ["## Benchmarks (the field's evaluators)", ""]
    for e in entries:
        if e["kind"] == "geneval":
            tags = list(e["per_tag"])
            lines += [f"GenEval (official scorer, `{e['file']}`): {e['num_images']} images, {e['num_prompts']} prompts",
                      "", "| overall | " + " | ".join(tags) + " |", "|---|" + "---|" * len(tags),
                      f"| **{_f(e['overall'])}** | " + " | ".join(_f(e["per_tag"][t]) for t in tags) + " |", ""]
        elif e["kind"] == "fid":
            name = {"mjhq": "MJHQ-30K", "coco": "MSCOCO-30K"}[e["protocol"]]
            lines += [f"{name} FID (`{e['file']}`): **{_f(e['fid'])}** over {e['num_images']} images; "
                      f"{e.get('resize_policy', '')}", ""]
            if e.get("per_category"):
                cats = list(e["per_category"])
                lines += ["| " + " | ".join(cats) + " |", "|" + "---|" * len(cats),
                          "| " + " | ".join(_f(e["per_category"][c]["fid"]) for c in cats) + " |", ""]
        else:
            lines += [f"{e['kind']} (`{e['file']}`, model {e.get('model') or 'n/a'}):", "", "| task | metric | value |",
                      "|---|---|---|"]
            lines += [f"| {t} | {m} | {_f(v)} |" for t, ms in e["tasks"].items() for m, v in ms.items()]
            lines.append("")
    return lines
