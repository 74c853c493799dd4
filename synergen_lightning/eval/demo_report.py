"""`synergen demo report`: the `make demo` report of a trained tiny SynerGenVL.

    OUT/report.json   the shape-world level; GenEval (six categories), understanding exact match (per question kind,
                      beside the question-type prior), the text skill of the base LLM and of the final model,
                      grounding (caption / image gain), and the learning curve over the stage checkpoints
    OUT/samples.png   generated images, each under its prompt and the scorer's verdict (the failed constraint),
                      and val images with a question, the true answer and the model's
    OUT/curve.png     GenEval and understanding at the end of each stage

The figures come from the eval room's suites (`synergen eval report` is the fuller report: FID, TensorBoard curves).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from synergen_lightning.checkpoint import checkpoint_kind
from synergen_lightning.eval.grounding import grounding_suite, report_block
from synergen_lightning.eval.suites import (
    geneval_suite,
    load_qa_items,
    text_suite,
    tile_policy,
    trained_data_hparams,
    understanding_suite,
)
from synergen_lightning.inference import generate_images
from synergen_lightning.system import load_synergen
from synergen_lightning.world.scorer import detect_objects, evaluate, score_images, summarize
from synergen_lightning.world.shards import find_world_info, read_world_info

NUM_GRID_IMAGES = 48  # eight of each GenEval category (the eval prompts are round-robin over the six)
NUM_GRID_ANSWERS = 16


def checkpoint_level(ckpt: str) -> str | None:
    """The shape-world level the checkpoint's last stage trained on (from its data sources' world.json), or None."""
    for source in trained_data_hparams(ckpt).get("sources") or []:
        info = find_world_info(str(source.get("urls", "")))
        if info:
            return info["level"]
    return None


def warn_level_mismatch(ckpt: str, data_dir: str | Path, out=sys.stderr) -> tuple[str | None, str | None]:
    """(trained level, eval level); prints a warning naming both when they differ."""
    info = read_world_info(data_dir)
    eval_level, trained = (info or {}).get("level"), checkpoint_level(ckpt)
    if eval_level and trained and eval_level != trained:
        print(f"warning: {ckpt} trained on shape-world level {trained!r} but {data_dir} holds level {eval_level!r}: "
              f"its scores do not measure what it learnt; pass --data with a {trained!r} directory "
              f"(synergen data synth --level {trained})", file=out)
    return trained, eval_level


def verdicts(images, prompts) -> list[tuple[bool, str, int]]:
    """Per image: (passed, the scorer's reason when not, accepted shapes)."""
    out = []
    for img, p in zip(images, prompts):
        found = detect_objects(img)
        ok, why = evaluate(found, p)
        out.append((ok, why, len(found)))
    return out


def subset_geneval(prompts, passed, n: int) -> dict:
    return summarize([(p["tag"], ok) for p, ok in zip(prompts[:n], passed[:n])])


def subset_und(items, answers, n: int) -> float:
    pairs = list(zip(items, answers))[:n]
    return sum(a.strip().lower() == it["answer"].strip().lower() for it, a in pairs) / max(len(pairs), 1)


def objects_per_image(images) -> float:
    """Mean number of shapes the shape-world scorer accepts per image (each colour blob counts once; blobs rejected
    as no shape are not counted: `score_images` reports those as `rejected_per_image`)."""
    return sum(len(detect_objects(im)) for im in images) / max(len(images), 1)


@torch.no_grad()
def caption_floor(model, prompts: list[dict], seed: int = 0, temperature: float = 1.0, batch_size: int = 16) -> dict:
    """GenEval of images drawn from the unconditional prompt, scored against `prompts` (same seeds and chunks as
    `geneval_suite`): what the model scores while ignoring every caption. The scorer passes an item when the asked
    shapes are among the detected ones, so clutter alone scores here; a conditional score near this floor means
    the captions do not reach the image."""
    images = []
    for k in range(0, len(prompts), batch_size):
        n = len(prompts[k:k + batch_size])
        images += generate_images(model, [None] * n, cfg_scale=None, temperature=temperature, seed=seed + k // batch_size,
                                  batch_size=batch_size)
    report = score_images(images, prompts)
    report["objects_per_image"] = objects_per_image(images)
    return report


def save_samples(path: Path, images, prompts, verdict, und_items, und_answers, level: str | None) -> Path:
    """One PNG a person can check by eye: each image under its prompt and verdict, then Q/A with truth and answer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 8
    gen_rows, und_rows = -(-len(images) // cols), -(-len(und_items) // cols)
    fig, axes = plt.subplots(gen_rows + und_rows, cols, figsize=(cols * 1.9, (gen_rows + und_rows) * 2.25))
    axes = axes.reshape(gen_rows + und_rows, cols)
    for ax in axes.flat:
        ax.axis("off")
    for k, (img, p, (ok, why, _)) in enumerate(zip(images, prompts, verdict)):
        ax = axes[k // cols, k % cols]
        ax.imshow(img, interpolation="nearest")
        ax.set_title(f"{_wrap(p['prompt'])}\n{'PASS' if ok else 'FAIL: ' + _wrap(why, 26)}", fontsize=6.5,
                     color="darkgreen" if ok else "firebrick")
    for k, (it, got) in enumerate(zip(und_items, und_answers)):
        ax = axes[gen_rows + k // cols, k % cols]
        ax.imshow(it["image"], interpolation="nearest")
        right = got.strip().lower() == it["answer"].strip().lower()
        ax.set_title(f"{_wrap(it['question'])}\ntruth: {it['answer']}  model: {got.strip() or '(nothing)'}",
                     fontsize=6.5, color="darkgreen" if right else "firebrick")
    n_pass = sum(v[0] for v in verdict)
    n_right = sum(g.strip().lower() == it["answer"].strip().lower() for it, g in zip(und_items, und_answers))
    fig.suptitle(f"shape-world level {level or '?'}: generated from the prompt above each image "
                 f"({n_pass}/{len(images)} pass the scorer); last {und_rows} row(s): understanding "
                 f"({n_right}/{len(und_items)} right)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grid_answers(items: list[dict], n: int) -> list[int]:
    """Indices of `n` Q/A items to show: every question kind first, each from a scene not shown yet."""
    shown, kinds, keys = [], set(), set()
    for rule in ("new kind", "new scene", "any"):
        for i, it in enumerate(items):
            if len(shown) >= n:
                return shown
            fresh = it["key"] not in keys
            if i in shown or (rule == "new kind" and (it["kind"] in kinds or not fresh)) or (rule == "new scene" and not fresh):
                continue
            shown.append(i)
            kinds.add(it["kind"])
            keys.add(it["key"])
    return shown


def _wrap(text: str, width: int = 28) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:3])


def save_curve(path: Path, curve: list[dict], prior: float | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = range(len(curve))
    ax.plot(x, [c["geneval"] for c in curve], "o-", label="GenEval overall")
    ax.plot(x, [c["und"] for c in curve], "s-", label="understanding (exact match)")
    if prior is not None:
        ax.axhline(prior, color="grey", ls=":", label="question-type prior")
    ax.set_xticks(list(x), [c["stage"] for c in curve])
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("score")
    ax.set_title(f"end of each stage ({curve[0]['prompts']} prompts, {curve[0]['questions']} questions)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(p: argparse.ArgumentParser, a: argparse.Namespace) -> int:
    """`synergen demo report` with its parsed arguments (`eval.cli.demo_report_parser`); `p` reports bad ones."""
    checkpoint_kind(a.ckpt)  # a missing --ckpt stops the command here, in one line, before any work
    data, out = Path(a.data), Path(a.out)
    prompts_file = data / "eval_prompts.jsonl"
    if not prompts_file.is_file():
        p.error(f"{prompts_file} does not exist: run `make data` (or pass --data)")
    for c in a.curve:
        if not Path(c).exists():
            p.error(f"--curve {c} does not exist; pass the stage checkpoints that exist (or none)")
    out.mkdir(parents=True, exist_ok=True)
    trained_level, level = warn_level_mismatch(a.ckpt, data)
    model = load_synergen(a.ckpt, map_location=a.device, text_tokenizer=a.text_tokenizer,
                          image_tokenizer=a.image_tokenizer, dtype=a.dtype)
    max_tiles, thumbnail = tile_policy(a.ckpt)

    prompts = [json.loads(line) for line in prompts_file.read_text().splitlines() if line.strip()][: a.num_prompts]
    geneval, images = geneval_suite(model, prompts, seed=a.seed, cfg_scale=a.cfg, temperature=a.temperature,
                                    return_images=True)
    verdict = verdicts(images, prompts)
    geneval["objects_asked"] = sum(r["count"] for p_ in prompts for r in p_["include"]) / len(prompts)
    floor = caption_floor(model, prompts, seed=a.seed, temperature=a.temperature) if a.caption_floor else None
    qa_items = load_qa_items(str(data / "val" / "*.tar"), a.und_questions)
    und = understanding_suite(model, qa_items, max_new_tokens=8, max_tiles=max_tiles, thumbnail=thumbnail,
                              return_answers=True)
    text = text_suite(model, data / "text" / "skill_val.jsonl", base_llm=a.base_llm, max_examples=a.text_examples)
    grounding = None
    if a.grounding_items > 0:
        grounding = report_block(grounding_suite(model, shards=str(data / "val" / "*.tar"), max_items=a.grounding_items,
                                                 max_tiles=max_tiles, thumbnail=thumbnail))
    shown = grid_answers(qa_items, NUM_GRID_ANSWERS)
    save_samples(out / "samples.png", images[:NUM_GRID_IMAGES], prompts[:NUM_GRID_IMAGES], verdict[:NUM_GRID_IMAGES],
                 [qa_items[i] for i in shown], [und["answers"][i] for i in shown], level)

    n_gen, n_und = min(a.curve_prompts, len(prompts)), min(a.curve_questions, len(qa_items))
    curve = []
    for c in a.curve:
        stage_model = load_synergen(c, map_location=a.device, text_tokenizer=a.text_tokenizer,
                                    image_tokenizer=a.image_tokenizer, dtype=a.dtype)
        tiles, thumb = tile_policy(c)
        g = geneval_suite(stage_model, prompts[:n_gen], seed=a.seed, cfg_scale=a.cfg, temperature=a.temperature)
        u = understanding_suite(stage_model, qa_items[:n_und], max_new_tokens=8, max_tiles=tiles, thumbnail=thumb)
        curve.append({"stage": Path(c).parent.name, "ckpt": c, "geneval": g["overall"], "und": u["accuracy"],
                      "prompts": n_gen, "questions": n_und})
        del stage_model
    curve.append({"stage": Path(a.ckpt).parent.name, "ckpt": a.ckpt,
                  "geneval": subset_geneval(prompts, [v[0] for v in verdict], n_gen)["overall"],
                  "und": subset_und(qa_items, und["answers"], n_und), "prompts": n_gen, "questions": n_und})
    save_curve(out / "curve.png", curve, und["prior_accuracy"])

    report = {
        "level": level, "trained_level": trained_level,
        "geneval": geneval,
        "und": {"accuracy": und["accuracy"], "per_kind": und["per_kind"], "questions": und["num_items"],
                "per_kind_by_objects": und["per_kind_by_objects"],
                "prior_accuracy": und["prior_accuracy"], "prior_per_kind": und.get("prior_per_kind"),
                "top_answer": und["top_answer"], "top_answer_share": und["top_answer_share"],
                "max_tiles": max_tiles, "thumbnail": thumbnail},
        "text": {"accuracy_base": text["base_accuracy"], "accuracy_final": text["accuracy"],
                 "examples": a.text_examples},
        "curve": curve,
        "settings": {"ckpt": a.ckpt, "cfg": a.cfg, "temperature": a.temperature, "seed": a.seed},
    }
    if floor is not None:
        report["geneval_uncond_floor"] = floor
    if grounding is not None:
        report["grounding"] = grounding
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({"level": level, "geneval.overall": geneval["overall"],
                      **{f"geneval.{k}": geneval[k] for k in ("single_object", "two_objects", "counting", "colors",
                                                              "position", "color_attr")},
                      **({"geneval_uncond_floor.overall": floor["overall"]} if floor else {}),
                      "und.accuracy": und["accuracy"], "und.prior_accuracy": und["prior_accuracy"],
                      **{f"und.{k}": v for k, v in und["per_kind"].items()},
                      "text.accuracy_base": text["base_accuracy"], "text.accuracy_final": text["accuracy"],
                      "curve": {c["stage"]: [round(c["geneval"], 3), round(c["und"], 3)] for c in curve},
                      **({"grounding.caption_gain_nats": grounding["caption_gain_nats"],
                          "grounding.image_gain_nats": grounding["image_gain_nats"]} if grounding else {})}, indent=2))
    print(f"wrote {out / 'report.json'}, {out / 'samples.png'} and {out / 'curve.png'}")
    return 0
