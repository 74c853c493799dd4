"""The evaluation suites shared by `synergen eval report` and the `PeriodicEvaluator` callback.

    geneval_suite(model, prompts)           shape-world GenEval: generate one image per prompt -> score_images
    understanding_suite(model, qa_items)    greedy answers to val Q/A, exact match (overall and per Q/A kind)
    text_suite(model, skill_jsonl, base=)   held-out text skill of the trunk, and its retention vs the base LLM
    fid_suite(model, captions, reference)   FID / IS / KID of generated vs reference images (torch-fidelity)

Each returns a flat-ish dict of floats; `flatten_metrics` turns it into `eval/...` scalars. Loops show a
rich progress bar when `progress=True`. `tile_policy` decides the understanding views of a checkpoint for every
report and harness.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter, defaultdict
from pathlib import Path

import torch

from synergen_lightning.checkpoint import read_checkpoint_meta
from synergen_lightning.data.sources import SkipCounter, expand_urls, finite_samples, load_json
from synergen_lightning.data.views import decode_image, generation_view, to_uint8_tensor
from synergen_lightning.distributed import gathered_for_decoding
from synergen_lightning.eval.fid import EvalInputError, as_uint8_images, check_inception_weights, compute_fidelity
from synergen_lightning.llm import evaluate_text_skill
from synergen_lightning.model_parts import load_base_llm
from synergen_lightning.progress import progress_bar
from synergen_lightning.world.scorer import score_images

log = logging.getLogger(__name__)


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@contextlib.contextmanager
def eval_mode(model):
    """model.eval() and no grad inside, the previous train/eval mode restored after (callbacks run mid-training); a
    model sharded by FSDP2 keeps each unit's weights gathered for the whole block (`gathered_for_decoding`)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), gathered_for_decoding(model):
            yield model
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------- checkpoint settings
def trained_data_hparams(ckpt: str | Path) -> dict:
    """The datamodule settings a checkpoint (file, sharded directory or export) was trained with; {} if unknown."""
    try:
        return read_checkpoint_meta(ckpt).get("datamodule_hyper_parameters") or {}
    except (OSError, ValueError):
        return {}


def tile_policy(ckpt: str | Path, max_tiles: int | None = None, thumbnail: bool | None = None) -> tuple[int, bool]:
    """(max_tiles, thumbnail) of the understanding views: each value given, else what the checkpoint's last stage
    trained with, else one view and no thumbnail. A model answers best on the views it learnt."""
    hp = trained_data_hparams(ckpt) if max_tiles is None or thumbnail is None else {}
    return (int(hp.get("max_tiles") or 1) if max_tiles is None else int(max_tiles),
            bool(hp.get("thumbnail") or False) if thumbnail is None else bool(thumbnail))


# ---------------------------------------------------------------------------------------- GenEval
def geneval_suite(model, prompts: list[dict], seed: int = 0, cfg_scale: float = 7.5, temperature: float = 1.0,
                  batch_size: int = 16, progress: bool = False, return_images: bool = False) -> dict:
    """One image per shape-world eval prompt (seed fixed per prompt batch) scored by `world.score_images`: accuracies
    plus objects_per_image (accepted shapes) and rejected_per_image (colour blobs the scorer rejects as no shape)."""
    if not prompts:
        raise EvalInputError("geneval: no eval prompts; write eval_prompts.jsonl with `synergen data synth`")
    images = []
    with eval_mode(model), progress_bar(progress, "geneval: generating", len(prompts)) as advance:
        for k, chunk in enumerate(_chunks(prompts, batch_size)):
            images += model.generate_images([p["prompt"] for p in chunk], num=1, cfg_scale=cfg_scale,
                                            temperature=temperature, seed=seed + k, batch_size=batch_size)
            advance(len(chunk))
    report = score_images(images, prompts)
    return (report, images) if return_images else report


# ---------------------------------------------------------------------------------------- understanding
def shard_urls(shards: list[str] | str, suite: str) -> list[str]:
    """Val shards in any URL form of `data.sources.expand_urls` (glob, braces, list file, pipe:, http(s)://, ...);
    every eval reader and input check expands them here."""
    try:
        return expand_urls(shards, f"{suite} val shards")
    except ValueError as exc:
        raise EvalInputError(f"{suite}: {exc}; run `make data` or pass --val-shards") from None


def load_qa_items(shards: list[str] | str, max_items: int | None = None) -> list[dict]:
    """Val Q/A items {image: PIL, question, answer, kind, key, objects} from shape-world shards (KEY.jpg + KEY.json);
    `objects`: how many objects the scene shows (None where KEY.json lists none)."""
    from PIL import Image


    urls = shard_urls(shards, "understanding")
    counter = SkipCounter()
    items: list[dict] = []
    for sample in finite_samples(urls, counter):
        key = sample["__key__"]
        img_bytes = next((sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
        if img_bytes is None or "json" not in sample:
            counter.add("missing_image_or_json", key)
            continue
        meta = load_json(sample["json"], key)
        image = Image.open(io.BytesIO(img_bytes))
        image.load()
        objects = len(meta["objects"]) if isinstance(meta.get("objects"), list) else None
        for qa in meta.get("qa") or []:
            items.append({"image": image, "question": qa["question"], "answer": str(qa["answer"]),
                          "kind": qa.get("kind", "qa"), "key": key, "objects": objects})
            if max_items is not None and len(items) >= max_items:
                return items
    if not items:
        raise EvalInputError(f"understanding: no Q/A pair in {len(urls)} val shard(s) {shards!r} "
                             f"(skipped: {dict(counter.counts)}); the shards need KEY.json with a 'qa' list")
    return items


def understanding_suite(model, items: list[dict], max_new_tokens: int = 16, batch_size: int = 16,
                        max_tiles: int = 1, thumbnail: bool = False, progress: bool = False,
                        return_answers: bool = False) -> dict:
    """Exact match (strip, case-insensitive) of greedy answers; overall and per Q/A kind, and per kind and number of
    objects in the scene where items say it (`objects`: a model that reads one object but cannot find the one a
    question names among several is right on one-object scenes only); `return_answers`: the answer to every item
    too, under "answers"."""
    if not items:
        raise EvalInputError("understanding: no Q/A items to evaluate")
    per_kind: dict[str, list[bool]] = defaultdict(list)
    by_objects: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    predicted: dict[str, Counter] = defaultdict(Counter)
    examples, all_answers = [], []
    with eval_mode(model), progress_bar(progress, "understanding: answering", len(items)) as advance:
        for chunk in _chunks(items, batch_size):
            answers = model.answer([it["image"] for it in chunk], [it["question"] for it in chunk],
                                   max_new_tokens=max_new_tokens, max_tiles=max_tiles, thumbnail=thumbnail)
            all_answers += answers
            for it, got in zip(chunk, answers):
                ok = got.strip().lower() == it["answer"].strip().lower()
                per_kind[it["kind"]].append(ok)
                if it.get("objects") is not None:
                    by_objects[it["kind"]][int(it["objects"])].append(ok)
                predicted[it["kind"]][got.strip().lower()] += 1
                if len(examples) < 8:
                    examples.append({"question": it["question"], "answer": it["answer"], "predicted": got})
            advance(len(chunk))
    flat = [ok for oks in per_kind.values() for ok in oks]
    prior = question_type_prior(items)
    extra = {"answers": all_answers} if return_answers else {}
    return {**extra, "accuracy": sum(flat) / len(flat), "num_items": len(flat),
            "per_kind": {k: sum(v) / len(v) for k, v in sorted(per_kind.items())}, "examples": examples,
            "per_kind_by_objects": {k: {str(n): sum(v) / len(v) for n, v in sorted(by_n.items())}
                                    for k, by_n in sorted(by_objects.items())},
            # what answering from the question type alone scores, and how often the model gave its most common
            # answer per kind (1.0 = one answer whatever the image, e.g. "red" to every colour question)
            "prior_accuracy": prior["accuracy"], "prior_per_kind": prior["per_kind"],
            "top_answer": {k: c.most_common(1)[0][0] for k, c in sorted(predicted.items())},
            "top_answer_share": {k: c.most_common(1)[0][1] / sum(c.values()) for k, c in sorted(predicted.items())}}


def question_type_prior(items: list[dict]) -> dict:
    """Accuracy of the best constant answer per Q/A kind on `items` (the references' most common answer): the score
    of a model that never looks at the image. Understanding accuracy means something only above it."""
    answers: dict[str, Counter] = defaultdict(Counter)
    for it in items:
        answers[it["kind"]][it["answer"].strip().lower()] += 1
    best = {k: c.most_common(1)[0][1] for k, c in answers.items()}
    total = sum(sum(c.values()) for c in answers.values())
    return {"accuracy": sum(best.values()) / total if total else 0.0,
            "per_kind": {k: best[k] / sum(answers[k].values()) for k in sorted(answers)}}


# ---------------------------------------------------------------------------------------- text skill
def text_suite(model, skill_jsonl: str | Path, tokenizer=None, base_llm=None, base_accuracy: float | None = None,
               max_examples: int | None = None) -> dict:
    """Held-out text skill of the system's trunk, and retention = accuracy / base LLM accuracy.

    `base_llm`: an MMoETransformer or a path for `model_parts.load_base_llm`; `base_accuracy` skips running it."""
    if not Path(skill_jsonl).is_file():
        raise EvalInputError(f"text: skill file {str(skill_jsonl)!r} does not exist; run `make data` "
                             "(it writes data/tiny/text/skill_val.jsonl) or pass --skill")
    tok = tokenizer or model.text_tokenizer
    with eval_mode(model):
        acc = evaluate_text_skill(model.llm.model, tok, skill_jsonl, max_examples=max_examples)
    out = {"accuracy": acc}
    if base_accuracy is None and base_llm is not None:
        if isinstance(base_llm, (str, Path)):
            base_llm = load_base_llm(base_llm)
        base_llm = base_llm.to(model.device)
        base_accuracy = evaluate_text_skill(base_llm, tok, skill_jsonl, max_examples=max_examples)
    if base_accuracy is not None:
        out["base_accuracy"] = float(base_accuracy)
        # retention: 1.0 = the skill survived multimodal training intact
        out["retention"] = acc / base_accuracy if base_accuracy > 0 else None
    return out


# ---------------------------------------------------------------------------------------- FID
def fid_suite(model, captions: list[str], reference, inception_weights, seed: int = 0, cfg_scale: float = 7.5,
              batch_size: int = 16, progress: bool = False, device: str = "cpu") -> dict:
    """Generate one image per caption (MSCOCO-30K style) and compare with `reference` images."""
    check_inception_weights(inception_weights)  # fail before generating anything
    ref = as_uint8_images(reference, "reference images")
    if not captions:
        raise EvalInputError("fid: no captions to generate from")
    # uint8 in host memory, filled in place: a 30k-image protocol's fp32 images would not fit the GPU that draws them
    gen, done = None, 0
    with eval_mode(model), progress_bar(progress, "fid: generating", len(captions)) as advance:
        for k, chunk in enumerate(_chunks(captions, batch_size)):
            images = as_uint8_images(model.generate_images(chunk, num=1, cfg_scale=cfg_scale, seed=seed + k,
                                                           batch_size=batch_size, output="tensor"), "generated images")
            if gen is None:
                gen = torch.empty(len(captions), *images.shape[1:], dtype=torch.uint8)
            gen[done:done + len(images)] = images.cpu()
            done += len(images)
            advance(len(chunk))
    return compute_fidelity(gen[:done], ref, inception_weights, batch_size=batch_size, device=device)


def load_reference_images(shards: list[str] | str, size: int, max_images: int, suite: str = "fid"
                          ) -> tuple[list[str], torch.Tensor]:
    """(captions, uint8 [N,3,size,size]) of val shard samples, through the one generation view policy; a sample
    without a caption or a decodable image is skipped and counted (`suite` names the command in messages)."""
    urls = shard_urls(shards, suite)
    captions, views, counter = [], [], SkipCounter()
    for sample in finite_samples(urls, counter):
        img = decode_image(sample)
        if img is None or "txt" not in sample:
            counter.add("undecodable_image" if img is None else "missing_caption", str(sample.get("__key__")))
            continue
        views.append(generation_view(img, size))
        captions.append(sample["txt"].decode("utf-8", errors="replace").strip())
        if len(views) >= max_images:
            break
    if counter.counts:
        log.warning("%s: skipped %s in the reference shards, e.g. %s", suite, dict(counter.counts),
                    next(iter(counter.examples.values())))
    if not views:
        raise EvalInputError(f"{suite}: no image+caption sample in reference shards {shards!r} (skipped: "
                             f"{dict(counter.counts)})")
    return captions, to_uint8_tensor(views)


def flatten_metrics(results: dict, prefix: str = "eval") -> dict[str, float]:
    """{"geneval": {"overall": .5, "counts": {...}}, ...} -> {"eval/geneval/overall": .5, ...} (numbers only)."""
    out: dict[str, float] = {}

    def walk(obj, path):
        if isinstance(obj, bool):
            return
        if isinstance(obj, (int, float)):
            if not path.endswith(("counts", "num_images", "num_items", "skipped_files")) and "/counts/" not in path:
                out[path] = float(obj)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}/{k}")

    for suite, res in results.items():
        walk(res, f"{prefix}/{suite}")
    return out
