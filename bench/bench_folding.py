"""Token folding, measured: training throughput, generation speed, CFG cost and step memory, side by side.

Two models of the SAME LLM configuration (width, depth, heads, FFN), built from the real classes:
  folded    `SynerGenVL`: TokenFolder (m x n codes -> one LLM token) + MMoE LLM + the UnfoldingHead
            (`head_layers` blocks of the LLM's micro-architecture); loss = `forward_losses`, generation =
            `inference.generate_codes` (KV caches in the LLM and the head, CFG as one batched pass)
  unfolded  `MMoETransformer` reading and writing every VQ code as one LLM token (Emu3-style: code ids
            appended to the text vocabulary, image tokens routed to the vision FFN), KV-cached decoding

Each comparison is timed in one interleaved loop (median, spread), at one torch thread count:
  train     image codes per second of a training step (fwd+bwd), one generation sample per image
  generate  wall time of one image (all h*w codes), temperature 1; folded with CFG vs without
  narrow    the same training/generation rows with a narrower head (LLM width / 2, / 4; same depth, same
            head_dim, FFN scaled alike): the paper never gives the head's width (unspecified)
  batch     images/s generating `gen_batch` images in one batch vs one at a time (separate row), and the unfolded
            model generating the same batch: folded vs unfolded at batch 1 and at `gen_batch`, each as a fraction of
            the FLOP bound (measured speed-up / `analytic_flops` ratio = folded FLOP/s over unfolded FLOP/s)
  memory    peak resident memory of a training step (fresh process per probe), with/without activation
            checkpointing (`distributed._checkpoint_block`, as FSDP2Strategy applies it) and with/without folding

    .venv/bin/python bench/bench_folding.py --out runs/bench/folding.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    TooLarge,
    check_fits,
    decoder_params,
    interleaved,
    load_average,
    machine_info,
    peak_rss_during,
    probe_in_subprocess,
    ratio,
    set_threads,
    train_flops,
    write_json,
)
from synergen_lightning.distributed import _checkpoint_block, decoder_blocks  # noqa: E402
from synergen_lightning.inference import generate_codes  # noqa: E402
from synergen_lightning.models.config import LLMConfig  # noqa: E402
from synergen_lightning.models.decoding import sample_logits  # noqa: E402
from synergen_lightning.models.mmoe import MMoETransformer  # noqa: E402
from synergen_lightning.system import SynerGenVL  # noqa: E402

TEXT_VOCAB = 256  # a small text vocabulary: both sides pay the same (tiny) text-embedding cost
SPECIAL = {"bos": 0, "eos": 1, "pad": 2, "boi": 3, "eoi": 4, "uncond": 5, "im_start": 6, "im_end": 7}
FULL = dict(hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=2, intermediate_size=688, head_layers=4,
            codebook_size=4096, grid=64, fold=(2, 8), batch_size=1, prompt_len=16, head_divisors=(2, 4), gen_batch=16)
QUICK = dict(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128, head_layers=1,
             codebook_size=256, grid=16, fold=(2, 8), batch_size=1, prompt_len=8, head_divisors=(2,), gen_batch=2)
TARGETS = {"train_speedup": 10.0, "generate_speedup": 8.0, "cfg_cost_max": 2.1, "bound_fraction": 0.85}
# the paper's model (InternLM2-1.8B trunk, 4-layer head of the same width, Emu3 codes): FLOP ratios only
PAPER_2B = dict(hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=8, intermediate_size=8192, head_layers=4,
                codebook_size=32768, grid=64, fold=(2, 8), batch_size=1, prompt_len=16, text_vocab=92547)


def head_config(c: dict, divisor: int = 1) -> dict:
    """The head's blocks at LLM width / `divisor`: same depth and head_dim (fewer heads), FFN scaled alike.
    divisor 1 is the LLM's own micro-architecture (the shipped recipes' choice)."""
    if c["hidden_size"] % divisor or c["intermediate_size"] % divisor:
        raise ValueError(f"head width divisor {divisor} does not divide hidden_size={c['hidden_size']} and intermediate_size={c['intermediate_size']}; pick a common divisor")
    heads = max(1, c["num_heads"] // divisor)
    return {"num_layers": c["head_layers"], "hidden_size": c["hidden_size"] // divisor, "num_heads": heads,
            "num_kv_heads": max(1, min(heads, c["num_kv_heads"] // divisor)),
            "intermediate_size": c["intermediate_size"] // divisor}


def analytic_flops(c: dict, divisor: int = 1) -> dict:
    """Model FLOPs of one image, both sides: a training step (fwd+bwd) and generation (forward, KV-cached).

    The folded side pays the LLM on P = hw/(mn) tokens but the head on all hw codes (head_layers blocks of
    the LLM's width + a codebook classifier per code); the unfolded side pays the LLM (and a text+code
    classifier) on all hw codes. Their ratio bounds the speed-up a compute-bound machine can show."""
    cfg = llm_config(c)
    v_text = c.get("text_vocab", TEXT_VOCAB)
    b, hw, (m, n) = c["batch_size"], c["grid"] ** 2, tuple(c["fold"])
    p, d, k = hw // (m * n), cfg.hidden_size, c["codebook_size"]
    head = LLMConfig(**{**vars(cfg), **head_config(c, divisor), "vocab_size": k, "head_dim": None})
    dh = head.hidden_size
    t_fold, t_unf = c["prompt_len"] + 3 + p, c["prompt_len"] + 3 + hw
    folder_w = m * n * d * d + d * d  # TokenFolder MLP (code_dim = width); head.cond_proj (d -> dh) below
    train_folded = (train_flops(cfg, b, t_fold, vocab_out=v_text, logits_rows=b)
                    + train_flops(head, b * p, m * n, vocab_out=k) + 6 * (folder_w + d * dh) * b * p)
    train_unfolded = train_flops(cfg, b, t_unf, vocab_out=v_text + k, logits_rows=b * (hw + 1))
    attn = 4 * cfg.head_dim * cfg.num_heads  # QK^T + AV FLOPs per (query, key) pair per layer
    gen_unfolded = 2 * (decoder_params(cfg) * cfg.num_layers + d * (v_text + k)) * hw + attn * cfg.num_layers * hw * hw / 2
    gen_folded = (2 * decoder_params(cfg) * cfg.num_layers * p + attn * cfg.num_layers * p * p / 2
                  + 2 * (decoder_params(head) * head.num_layers + dh * k) * hw + 2 * (folder_w + d * dh) * p)
    return {"train": {"folded": train_folded, "unfolded": train_unfolded, "ratio": train_unfolded / train_folded},
            "generate": {"folded": gen_folded, "unfolded": gen_unfolded, "ratio": gen_unfolded / gen_folded},
            "head_share_of_folded_train": (train_flops(head, b * p, m * n, vocab_out=k)) / train_folded}


def llm_config(c: dict) -> LLMConfig:
    return LLMConfig(vocab_size=TEXT_VOCAB, hidden_size=c["hidden_size"], num_layers=c["num_layers"],
                     num_heads=c["num_heads"], num_kv_heads=c["num_kv_heads"],
                     intermediate_size=c["intermediate_size"], max_position_embeddings=2 * c["grid"] ** 2 + 64)


def estimate_train_bytes(c: dict) -> float:
    """Rough fp32 peak of the unfolded step (the larger): weights x3 (param, grad, slack) + saved activations + logits."""
    cfg = llm_config(c)
    t = c["prompt_len"] + 3 + c["grid"] ** 2
    vocab = TEXT_VOCAB + c["codebook_size"]
    params = cfg.num_layers * (4 * cfg.hidden_size ** 2 + 6 * cfg.hidden_size * cfg.intermediate_size) + 2 * vocab * cfg.hidden_size
    acts = c["batch_size"] * t * cfg.num_layers * (20 * cfg.hidden_size + 6 * cfg.intermediate_size)
    return 4.0 * (3 * params + acts + 3 * c["batch_size"] * t * vocab)


def build_folded(c: dict, divisor: int = 1) -> SynerGenVL:
    grid, (m, n) = c["grid"], tuple(c["fold"])
    model = SynerGenVL(llm=vars(llm_config(c)), special_token_ids=SPECIAL, codebook_size=c["codebook_size"],
                       image_size=grid * 8, downsample=8, fold=(m, n), code_dim=c["hidden_size"],
                       head=head_config(c, divisor), stage="full")
    return model


def build_unfolded(c: dict) -> MMoETransformer:
    cfg = llm_config(c)
    cfg.vocab_size = TEXT_VOCAB + c["codebook_size"]  # code k is token TEXT_VOCAB + k
    return MMoETransformer(cfg)


def prompt(c: dict, generator: torch.Generator) -> list[int]:
    return [SPECIAL["bos"]] + torch.randint(8, TEXT_VOCAB, (c["prompt_len"],), generator=generator).tolist() + [SPECIAL["boi"]]


def folded_batch(c: dict, model: SynerGenVL, generator: torch.Generator) -> dict:
    """Generation samples as the data room builds them: prompt, <boi>, P folded slots, <eoi>; codes supervised."""
    b, p = c["batch_size"], model.tokens_per_view
    rows = [prompt(c, generator) + [SPECIAL["pad"]] * p + [SPECIAL["eoi"]] for _ in range(b)]
    ids = torch.tensor(rows)
    image_mask = torch.zeros_like(ids, dtype=torch.bool)
    image_mask[:, c["prompt_len"] + 2: c["prompt_len"] + 2 + p] = True
    labels = torch.full_like(ids, -100)
    labels[:, -1] = SPECIAL["eoi"]
    codes = torch.randint(0, c["codebook_size"], (b, c["grid"], c["grid"]), generator=generator)
    return {"input_ids": ids, "image_mask": image_mask, "labels": labels, "image_codes": codes,
            "image_loss_mask": torch.ones(b, dtype=torch.bool)}


def unfolded_batch(c: dict, generator: torch.Generator) -> dict:
    """The same samples with every code a token: prompt, <boi>, h*w code tokens, <eoi>; codes and <eoi> supervised."""
    b, hw = c["batch_size"], c["grid"] ** 2
    codes = torch.randint(0, c["codebook_size"], (b, hw), generator=generator)
    ids = torch.cat([torch.tensor([prompt(c, generator) for _ in range(b)]), codes + TEXT_VOCAB,
                     torch.full((b, 1), SPECIAL["eoi"])], dim=1)
    image_mask = torch.zeros_like(ids, dtype=torch.bool)
    image_mask[:, c["prompt_len"] + 2: c["prompt_len"] + 2 + hw] = True
    labels = ids.clone()
    labels[:, : c["prompt_len"] + 2] = -100
    return {"input_ids": ids, "image_mask": image_mask, "labels": labels}


def unfolded_loss(llm: MMoETransformer, batch: dict) -> torch.Tensor:
    hidden = llm(llm.embed(batch["input_ids"]), image_mask=batch["image_mask"])
    targets = batch["labels"][:, 1:]
    sup = targets != -100
    return F.cross_entropy(llm.logits(hidden[:, :-1][sup]).float(), targets[sup])


def train_steps(c: dict, checkpointing: bool = False, divisor: int = 1):
    """(folded_step, unfolded_step, models): each step is one fwd+bwd of one batch, grads freed after."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    folded, unfolded = build_folded(c, divisor).train(), build_unfolded(c).train()
    if checkpointing:
        for block in decoder_blocks(folded):
            _checkpoint_block(block)
        for block in unfolded.layers:
            _checkpoint_block(block)
    fb, ub = folded_batch(c, folded, gen), unfolded_batch(c, gen)

    def folded_step():
        folded.forward_losses(fb)["loss"].backward()
        folded.zero_grad(set_to_none=True)

    def unfolded_step():
        unfolded_loss(unfolded, ub).backward()
        unfolded.zero_grad(set_to_none=True)

    return folded_step, unfolded_step, (folded, unfolded)


@torch.no_grad()
def unfolded_generate(llm: MMoETransformer, prompt_ids: list[int], n_codes: int, generator: torch.Generator,
                      rows: int = 1, sample=sample_logits, compile: bool = False) -> torch.Tensor:
    """One code per LLM step, KV-cached (the unfolded baseline's decoding), sampled among the code logits; `rows`
    images of the same prompt decoded together. `sample`: the sampler (another revision's, in bench/ab_decode.py).
    `compile`: the LLM's decode step as the folded side's `generate_codes(compile=True)` runs it."""
    device = llm.embed_tokens.weight.device
    cache = llm.new_kv_cache()
    ids = torch.tensor([prompt_ids] * rows, device=device)
    h = llm(llm.embed(ids), image_mask=torch.zeros_like(ids, dtype=torch.bool), kv_cache=cache)[:, -1]
    is_image = torch.ones(rows, 1, dtype=torch.bool, device=device)
    out = []
    for _ in range(n_codes):
        code = sample(llm.logits(h)[:, TEXT_VOCAB:], temperature=1.0, generator=generator)
        out.append(code)
        x = llm.embed_tokens((code + TEXT_VOCAB)[:, None])  # sampled ids: no range check, as the folded head's embedding
        if hasattr(llm, "decode_step"):  # the decode path generate_codes takes; older revisions (ab_decode.py): forward
            # `compile` passed only when set: revisions before it have decode_step without that argument
            h = llm.decode_step(x, cache, image=True, **({"compile": True} if compile else {}))
        else:
            h = llm(x, image_mask=is_image, kv_cache=cache)[:, -1]
    return torch.stack(out, 1)


def bench_train(c: dict, repeats: int, warmup: int) -> dict:
    check_fits(estimate_train_bytes(c), f"training step at a {c['grid']}x{c['grid']} code grid, width {c['hidden_size']}")
    folded_step, unfolded_step, (folded, unfolded) = train_steps(c)
    variants = {"folded": folded_step, "unfolded": unfolded_step}
    narrow_models = {}
    for div in c.get("head_divisors", ()):  # narrower heads, in the same interleaved loop
        step, _, (model, _) = train_steps(c, divisor=div)
        variants[f"folded_head_w{div}"], narrow_models[div] = step, model
    timed = interleaved(variants, repeats, warmup)
    codes = c["batch_size"] * c["grid"] ** 2
    for name in timed:
        timed[name]["image_codes_per_s"] = codes / timed[name]["median_s"]
    r = ratio(timed, "unfolded", "folded")
    flops = analytic_flops(c)
    narrow = {f"w{div}": {"head": head_config(c, div), "speedup": ratio(timed, "unfolded", f"folded_head_w{div}"),
                          "flops_ratio": analytic_flops(c, div)["train"]["ratio"],
                          "flops_ratio_paper_2b": analytic_flops(PAPER_2B, div)["train"]["ratio"],
                          "head_share_of_folded_flops": analytic_flops(c, div)["head_share_of_folded_train"],
                          "head_params": sum(p.numel() for p in model.head.model.parameters())}
              for div, model in narrow_models.items()}
    return {"timed": timed, "speedup": r, "target": TARGETS["train_speedup"], "met": r["median"] >= TARGETS["train_speedup"],
            "narrow_head": narrow, "head_params": sum(p.numel() for p in folded.head.model.parameters()),
            "flops_per_image": flops["train"], "flops_ratio_paper_2b": analytic_flops(PAPER_2B)["train"]["ratio"],
            "head_share_of_folded_flops": flops["head_share_of_folded_train"],
            "llm_tokens_per_image": {"folded": folded.tokens_per_view, "unfolded": c["grid"] ** 2},
            "params": {"folded_total": sum(p.numel() for p in folded.parameters()),
                       "unfolded_total": sum(p.numel() for p in unfolded.parameters())}}


def bench_generate(c: dict, repeats: int, warmup: int, cfg_scale: float = 7.5) -> dict:
    check_fits(estimate_train_bytes(c) / 4, f"generation at a {c['grid']}x{c['grid']} code grid")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    folded, unfolded = build_folded(c).eval(), build_unfolded(c).eval()
    p = prompt(c, gen)
    uncond = [SPECIAL["bos"], SPECIAL["uncond"], SPECIAL["boi"]]
    nb = int(c.get("gen_batch") or 1)
    variants = {
        "folded": lambda: generate_codes(folded, [p], None, cfg_scale=None, generator=gen),
        "folded_cfg": lambda: generate_codes(folded, [p], uncond, cfg_scale=cfg_scale, generator=gen),
        "unfolded": lambda: unfolded_generate(unfolded, p, c["grid"] ** 2, gen),
    }
    narrow_models = {div: build_folded(c, div).eval() for div in c.get("head_divisors", ())}
    for div, model in narrow_models.items():
        variants[f"folded_head_w{div}"] = lambda model=model: generate_codes(model, [p], None, cfg_scale=None, generator=gen)
    if nb > 1:  # several images decoded together (rows of one batch): images/s, and folded vs unfolded at that batch
        variants[f"folded_batch{nb}"] = lambda: generate_codes(folded, [p] * nb, None, cfg_scale=None, generator=gen)
        variants[f"unfolded_batch{nb}"] = lambda: unfolded_generate(unfolded, p, c["grid"] ** 2, gen, rows=nb)
    timed = interleaved(variants, repeats, warmup)
    speed, cfg_cost = ratio(timed, "unfolded", "folded"), ratio(timed, "folded_cfg", "folded")
    narrow = {f"w{div}": {"head": head_config(c, div), "speedup": ratio(timed, "unfolded", f"folded_head_w{div}"),
                          "flops_ratio": analytic_flops(c, div)["generate"]["ratio"],
                          "flops_ratio_paper_2b": analytic_flops(PAPER_2B, div)["generate"]["ratio"]}
              for div in narrow_models}
    batched = None
    if nb > 1:
        one, many = timed["folded"], timed[f"folded_batch{nb}"]
        batched = {"images": nb, "images_per_s": nb / many["median_s"], "images_per_s_one_at_a_time": 1 / one["median_s"],
                   "gain": (nb / many["median_s"]) / (1 / one["median_s"]),
                   "gain_cpu_time": (nb / many["cpu_median_s"]) / (1 / one["cpu_median_s"]) if "cpu_median_s" in many else None}
    sizes = {1: ""} | ({nb: f"_batch{nb}"} if nb > 1 else {})
    bound = {str(n): bound_fraction(timed, c, n, suffix) for n, suffix in sizes.items()}
    return {"timed": timed, "speedup": speed, "cfg_cost": cfg_cost, "cfg_scale": cfg_scale,
            "narrow_head": narrow, "batched": batched, "bound": bound,
            "targets": {"speedup": TARGETS["generate_speedup"], "cfg_cost_max": TARGETS["cfg_cost_max"],
                        "bound_fraction": TARGETS["bound_fraction"]},
            "met": {"speedup": speed["median"] >= TARGETS["generate_speedup"],
                    "cfg_cost": cfg_cost["median"] <= TARGETS["cfg_cost_max"],
                    "bound_fraction": all(b["fraction"] >= TARGETS["bound_fraction"] for b in bound.values())},
            "llm_steps_per_image": {"folded": folded.tokens_per_view, "unfolded": c["grid"] ** 2},
            "flops_per_image": analytic_flops(c)["generate"],
            "flops_ratio_paper_2b": analytic_flops(PAPER_2B)["generate"]["ratio"],
            "head_steps_per_image": c["grid"] ** 2}


def bound_fraction(timed: dict, c: dict, images: int, suffix: str) -> dict:
    """Folded vs unfolded generation of `images` images in one batch, against the FLOP bound: the measured speed-up
    over the FLOP ratio, i.e. the folded side's FLOP/s over the unfolded side's (1.0: both run at one FLOP rate)."""
    flops = analytic_flops(c)["generate"]
    r = ratio(timed, "unfolded" + suffix, "folded" + suffix)
    out = {"images": images, "speedup": r, "flops_ratio": flops["ratio"], "fraction": r["median"] / flops["ratio"],
           "fraction_of_min": r["of_min"] / flops["ratio"], "gflops_per_s": {}}
    if "of_cpu_time" in r:
        out["fraction_of_cpu_time"] = r["of_cpu_time"] / flops["ratio"]
    for side in ("folded", "unfolded"):
        out["gflops_per_s"][side] = flops[side] * images / timed[side + suffix]["median_s"] / 1e9
    return out


def memory_probe(c: dict, side: str, checkpointing: bool) -> dict:
    """(child process) peak RSS of the second training step of one side."""
    folded_step, unfolded_step, _ = train_steps(c, checkpointing)
    step = folded_step if side == "folded" else unfolded_step
    step()  # first step: one-off allocations (autograd buffers, caches)
    return peak_rss_during(step)


def bench_memory(c: dict, threads: int) -> dict:
    check_fits(estimate_train_bytes(c), f"memory probes at a {c['grid']}x{c['grid']} code grid")
    rows = {}
    for side in ("folded", "unfolded"):
        for ckpt in (False, True):
            name = f"{side}{'_checkpointed' if ckpt else ''}"
            rows[name] = probe_in_subprocess("bench_folding.py", ["--probe-memory", side, "--checkpointing", str(int(ckpt)),
                                                                  "--config", json.dumps(c), "--threads", str(threads)])
    ok = all("error" not in r for r in rows.values())
    out = {"rows": rows}
    if ok:
        mb = {k: r["step_peak_bytes"] / 2**20 for k, r in rows.items()}
        out["step_peak_mib"] = mb
        out["checkpointing_saves"] = {s: 1 - mb[f"{s}_checkpointed"] / mb[s] for s in ("folded", "unfolded")}
        out["folding_saves"] = 1 - mb["folded"] / mb["unfolded"]
    return out


def run(quick: bool = False, threads: int = 1, repeats: int | None = None, warmup: int = 1, config: dict | None = None,
        parts=("train", "generate", "memory")) -> dict:
    set_threads(threads)
    c = dict(QUICK if quick else FULL, **(config or {}))
    repeats = repeats or (2 if quick else 3)
    result = {"config": c, "machine": machine_info("cpu", threads), "load_average_before": load_average()}
    for part, fn in (("train", lambda: bench_train(c, repeats, warmup)),
                     # full size: no warm-up round (each call is thousands of decode steps, and one round of
                     # every variant, the unfolded batch included, takes minutes)
                     ("generate", lambda: bench_generate(c, repeats, warmup if quick else 0)),
                     ("memory", lambda: bench_memory(c, threads))):
        if part not in parts:
            continue
        try:
            result[part] = fn()
        except TooLarge as exc:
            print(f"[skipped] {exc}", flush=True)
            result[part] = {"skipped": str(exc)}
    result["load_average_after"] = load_average()
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (16x16 codes): seconds, for tests")
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for both sides of every ratio")
    p.add_argument("--repeats", type=int, default=None, help="interleaved timed rounds (default 3; quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (training; generation at full size runs none)")
    p.add_argument("--config", default=None, help="JSON overriding sizes, e.g. '{\"num_layers\": 24}'")
    p.add_argument("--parts", default="train,generate,memory")
    p.add_argument("--out", default="runs/bench/folding.json")
    p.add_argument("--probe-memory", choices=["folded", "unfolded"], help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    config = json.loads(a.config) if a.config else None
    if a.probe_memory:
        set_threads(a.threads)
        print(json.dumps(memory_probe(config, a.probe_memory, bool(a.checkpointing))))
        return {}
    result = run(a.quick, a.threads, a.repeats, a.warmup, config, tuple(a.parts.split(",")))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1, default=str)[:3000])
    print(f"wrote {write_json(a.out, result)}")
    return result


if __name__ == "__main__":
    main()
