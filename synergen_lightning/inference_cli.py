"""`synergen generate` and `synergen answer`: the commands over inference.py, reading any checkpoint form.

    synergen generate --ckpt CKPT --prompt TEXT --out DIR
    synergen answer --ckpt CKPT --image FILE --question TEXT

torch, Lightning and the model are imported after the arguments parse, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from synergen_lightning.cli_args import check_at_least_one, device_arg


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """--ckpt (any form `system.load_synergen` reads: .ckpt file, sharded directory, export), --device and the
    tokenizer overrides the loader takes."""
    p.add_argument("--ckpt", required=True, help="SynerGenVL checkpoint (e.g. runs/tiny/sft/last.ckpt)")
    p.add_argument("--device", default="auto", type=device_arg, help="where the model runs (auto: cuda when available, "
                   "else cpu)")
    add_dtype_arg(p)
    p.add_argument("--text-tokenizer", help="override the text tokenizer directory stored in the checkpoint")
    p.add_argument("--image-tokenizer", help="override the image tokenizer path stored in the checkpoint")


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="the model's parameters (auto: "
                   "bf16 on a GPU that has it, half the memory and traffic of fp32; else fp32). The image tokenizer "
                   "keeps its own")


def generate_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="synergen generate", description="Generate images from text prompts with a "
                                "SynerGenVL checkpoint (KV-cached LLM + unfolding head, classifier-free guidance).")
    add_checkpoint_args(p)
    p.add_argument("--prompt", action="append", default=[], help="caption to draw; repeat for several prompts")
    p.add_argument("--prompts", type=Path, help="a text file of captions, one per line (blank lines skipped), drawn "
                   "after any --prompt")
    p.add_argument("--num", type=int, default=1, help="images per prompt (default: 1)")
    p.add_argument("--cfg", type=float, default=7.5, help="CFG scale s in l_u + s (l_c - l_u) (default 7.5, the "
                   "paper's for the 2B; the tiny models draw best at 1.5; 1 = off)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1; 0 = greedy; "
                   "tiny default: below 1 the background codes win every patch and the canvas comes out empty)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k likeliest codes (off: truncation drops objects "
                   "on the tiny default, as temperatures below 1 do)")
    p.add_argument("--top-p", type=float, default=None, help="keep the likeliest codes up to this probability mass "
                   "(off by default)")
    p.add_argument("--seed", type=int, default=0, help="the draws' seed: the same seed and settings give the same "
                   "images (default: 0)")
    p.add_argument("--batch-size", type=int, default=16, help="rows decoded together, x2 with CFG (default: 16)")
    p.add_argument("--compile", action="store_true", help="decode through torch.compile'd graphs: the same images, "
                   "faster per image once built (a minute on a CPU, which needs a C++ compiler); for many images")
    p.add_argument("--out", required=True, help="output directory: PROMPT_SAMPLE.png (000_00.png, ...) and "
                   "metadata.jsonl (each file's prompt and settings), written batch by batch")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's images and metadata.jsonl in "
                   "--out (without it such an --out is refused: its old images would stay beside the new ones)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    from synergen_lightning.inference import generated_batches, generation_arg_errors
    from synergen_lightning.progress import progress_bar
    from synergen_lightning.system import load_synergen

    # before the model loads
    errors = generation_arg_errors(a.num, a.batch_size, a.temperature, a.top_k, a.top_p, a.cfg)
    if errors:
        p.error("; ".join(f"--{name.replace('_', '-')} {value} {rule}" for name, value, rule in errors))
    prompts = list(a.prompt)
    if a.prompts is not None:
        if not a.prompts.is_file():
            p.error(f"--prompts {a.prompts} is not a file: give a text file of captions, one per line")
        from_file = [line.strip() for line in a.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not from_file:
            p.error(f"--prompts {a.prompts} holds no caption: write one per line")
        prompts += from_file
    if not prompts:
        p.error("nothing to draw: give --prompt TEXT (repeatable) or --prompts FILE")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file: give a directory for the images")
    earlier = sorted(out.glob("[0-9]*_[0-9]*.png")) + [f for f in (out / "metadata.jsonl",) if f.exists()]
    if earlier and not a.overwrite:
        p.error(f"--out {out} holds an earlier run's images ({len(earlier)} files, e.g. {earlier[0].name}): add "
                "--overwrite to replace them, or choose another --out")
    model = load_synergen(a.ckpt, map_location=a.device, text_tokenizer=a.text_tokenizer,
                          image_tokenizer=a.image_tokenizer, dtype=a.dtype)
    for f in earlier:
        f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    settings = {"ckpt": a.ckpt, "seed": a.seed, "cfg": a.cfg, "temperature": a.temperature, "top_k": a.top_k,
                "top_p": a.top_p}
    batches = generated_batches(model, prompts, num=a.num, cfg_scale=a.cfg, temperature=a.temperature, top_k=a.top_k,
                                top_p=a.top_p, seed=a.seed, batch_size=a.batch_size, compile=a.compile)
    total, k = len(prompts) * a.num, 0
    digits = max(3, len(str(len(prompts) - 1)))  # file names sort in prompt order
    # which prompt and settings drew each file (GenEval's folders keep a metadata.jsonl likewise), a line per file
    # as it is written: a run stopped half-way leaves every finished image described
    with (out / "metadata.jsonl").open("w") as meta, progress_bar(not a.no_progress, "generating", total) as advance:
        for images in batches:
            for img in images:
                path = out / f"{k // a.num:0{digits}d}_{k % a.num:02d}.png"
                img.save(path)
                meta.write(json.dumps({"file": path.name, "prompt": prompts[k // a.num], "sample": k % a.num,
                                       **settings}) + "\n")
                k += 1
            meta.flush()
            advance(len(images))
    print(f"{total} images and metadata.jsonl in {out}")
    return 0


def answer_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="synergen answer", description="Answer a question about an image with a "
                                "SynerGenVL checkpoint (greedy, KV-cached).")
    add_checkpoint_args(p)
    p.add_argument("--image", required=True, help="image file (any PIL-readable format)")
    p.add_argument("--question", required=True, help="the question, as the model was trained to read it")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest answer in text tokens (default: 32)")
    p.add_argument("--max-tiles", type=int, default=1, help="InternVL-1.5 dynamic tiles (paper: 1/6/12 per stage)")
    p.add_argument("--thumbnail", action="store_true", help="append a thumbnail view (stage 2 and SFT)")
    a = p.parse_args(argv)
    check_at_least_one(p, a, "max_new_tokens", "max_tiles")
    from PIL import Image

    from synergen_lightning.inference import answer
    from synergen_lightning.system import load_synergen

    try:
        img = Image.open(a.image)
        img.load()
    except (OSError, ValueError) as exc:
        raise ValueError(f"--image {a.image!r} cannot be read ({exc}); pass a PNG/JPEG file") from None
    model = load_synergen(a.ckpt, map_location=a.device, text_tokenizer=a.text_tokenizer,
                          image_tokenizer=a.image_tokenizer, dtype=a.dtype)
    print(answer(model, [img], [a.question], max_new_tokens=a.max_new_tokens, max_tiles=a.max_tiles,
                 thumbnail=a.thumbnail)[0])
    return 0
