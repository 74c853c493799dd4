"""Op-level profiles (docs/benchmarks.md; torch.profiler, one thread): where the time goes.

    .venv/bin/python bench/profile_ops.py mfu     # MFU step: width 512, 8 layers, 1,024 tokens
    .venv/bin/python bench/profile_ops.py head    # UnfoldingHead.generate: CPU per code, aten calls, and compiled
    .venv/bin/python bench/profile_ops.py sample  # drawing one code of 4,096: torch.multinomial vs sample_logits
    .venv/bin/python bench/profile_ops.py llm     # the LLM's KV-cached decode step in generate_codes (CFG: 2 rows)
    .venv/bin/python bench/profile_ops.py hf      # ours vs ours-without-vision-experts vs transformers Qwen2 (CPU time)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved, ratio  # noqa: E402
from synergen_lightning.llm import lm_loss  # noqa: E402
from synergen_lightning.models.config import LLMConfig  # noqa: E402
from synergen_lightning.models.mmoe import MMoETransformer  # noqa: E402


def top(prof, per: int = 1, rows: int = 15) -> None:
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[:rows]:
        print(f"{e.key[:58]:58s} {e.count / per:8.1f} calls {100 * e.self_cpu_time_total / total:5.1f}%")


def profile_mfu() -> None:
    cfg = LLMConfig(vocab_size=4096, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1376)
    m = MMoETransformer(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (1, 1024))

    def step():
        lm_loss(m.logits(m(m.embed(ids))), ids).backward()
        m.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        step()
    top(p)


def profile_head() -> None:
    import bench_folding as bf

    model = bf.build_folded(dict(bf.FULL)).eval()
    h, g, n = torch.randn(1, model.llm.model.config.hidden_size), torch.Generator().manual_seed(0), 16
    model.head.model.generate(h, generator=g)
    c0 = time.process_time()
    for _ in range(n):
        model.head.model.generate(h, generator=g)
    steps = n * model.head.model.seq_len
    print(f"head decode: {(time.process_time() - c0) / steps * 1e3:.2f} ms CPU per code "
          f"({model.head.model.config.num_layers} blocks, width {model.head.model.config.hidden_size})")
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(n):
            model.head.model.generate(h, generator=g)
    print(f"aten calls per code: {sum(e.count for e in p.key_averages() if e.key.startswith('aten::')) / steps:.0f}")
    top(p, per=steps)
    t0 = time.perf_counter()
    first = model.head.model.generate(h, generator=torch.Generator().manual_seed(1), compile=True)
    built = time.perf_counter() - t0
    same = torch.equal(first, model.head.model.generate(h, generator=torch.Generator().manual_seed(1)))
    c0 = time.process_time()
    for _ in range(n):
        model.head.model.generate(h, generator=g, compile=True)
    print(f"compiled (generate(compile=True)): {(time.process_time() - c0) / steps * 1e3:.2f} ms CPU per code; graph "
          f"built in {built:.1f} s (first call); the eager path's codes: {same}")


def profile_sampling(rows=(1, 16), vocab: int = 4096, n: int = 2000) -> None:
    """One draw per row among `vocab` codes: torch.multinomial over the softmax (an exponential per code) vs
    `sample_logits` (the inverse CDF at one uniform), interleaved, CPU time per call."""
    from synergen_lightning.models.decoding import sample_logits

    g = torch.Generator().manual_seed(0)
    for b in rows:
        logits = torch.randn(b, vocab, generator=g)
        fns = {"multinomial": lambda x=logits: torch.multinomial(x.softmax(-1), 1, generator=g),
               "sample_logits": lambda x=logits: sample_logits(x, 1.0, generator=g)}
        spent = dict.fromkeys(fns, 0.0)
        for _ in range(3):
            for name, fn in fns.items():
                c0 = time.process_time()
                for _ in range(n):
                    fn()
                spent[name] += time.process_time() - c0
        print(f"batch {b:2d}: " + ", ".join(f"{k} {v / (3 * n) * 1e6:.1f} us" for k, v in spent.items()) +
              f" per draw of {vocab} codes ({spent['multinomial'] / spent['sample_logits']:.1f}x)")


def profile_llm_decode() -> None:
    """The LLM's decode step as `generate_codes` runs it: cond + uncond rows (left-padded prompts of different
    lengths), one folded image token per step, KV-cached, no per-step attention mask (the cache knows the padding)."""
    import bench_folding as bf
    from synergen_lightning.models.decoding import left_pad, left_pad_positions

    c = dict(bf.FULL)
    model = bf.build_folded(c).eval()
    g = torch.Generator().manual_seed(0)
    ids, mask = left_pad([bf.prompt(c, g), [0, 5, 3]], 2)
    pos = left_pad_positions(mask)
    d, steps = model.llm.model.config.hidden_size, 64
    x, col = torch.randn(2, 1, d), torch.ones(2, 1, dtype=torch.bool)

    @torch.no_grad()
    def run():
        trunk = model.llm.model
        cache = trunk.new_kv_cache(capacity=ids.shape[1] + steps)
        trunk(model.embed_text(ids), image_mask=torch.zeros_like(mask), position_ids=pos, attention_mask=mask,
              kv_cache=cache)
        nxt = pos[:, -1:] + 1
        for _ in range(steps):
            trunk(x, image_mask=col, position_ids=nxt, kv_cache=cache)
            nxt = nxt + 1

    run()
    c0 = time.process_time()
    run()
    print(f"LLM decode: {(time.process_time() - c0) / steps * 1e3:.2f} ms CPU per step incl. prefill share "
          f"({model.llm.model.config.num_layers} MMoE blocks, width {d}, 2 rows)")
    with profile(activities=[ProfilerActivity.CPU]) as p:
        run()
    print(f"aten calls per step: {sum(e.count for e in p.key_averages() if e.key.startswith('aten::')) / steps:.0f}")
    top(p, per=steps)


def ours_vs_hf(repeats: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = LLMConfig(vocab_size=4096, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=1376,
                    qkv_bias=True)
    torch.manual_seed(0)
    ours, plain = MMoETransformer(cfg).train(), MMoETransformer(cfg, vision_experts=False).train()
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                      num_key_value_heads=2, intermediate_size=1376, rms_norm_eps=1e-6, use_cache=False,
                                      attn_implementation="sdpa")).train()
    ids = torch.randint(0, 4096, (4, 128))

    def trunk(m):
        def step():
            lm_loss(m.logits(m(m.embed(ids))), ids).backward()
            m.zero_grad(set_to_none=True)
        return step

    def hf_step():
        lm_loss(hf(input_ids=ids, use_cache=False).logits, ids).backward()
        hf.zero_grad(set_to_none=True)

    t = interleaved({"ours": trunk(ours), "ours_no_vision": trunk(plain), "hf": hf_step}, repeats, 2)
    for k, v in t.items():
        print(f"{k:16s} median {v['median_s'] * 1e3:7.1f} ms  CPU {v['cpu_median_s'] * 1e3:7.1f} ms")
    for a, b in (("ours", "hf"), ("ours_no_vision", "hf"), ("ours", "ours_no_vision")):
        r = ratio(t, a, b)
        print(f"{a}/{b}: wall {r['median']:.3f}x, CPU time {r['of_cpu_time']:.3f}x")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["mfu", "head", "llm", "hf", "sample"])
    p.add_argument("--repeats", type=int, default=15, help="hf: interleaved repeats")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    {"mfu": profile_mfu, "head": profile_head, "llm": profile_llm_decode, "hf": lambda: ours_vs_hf(a.repeats),
     "sample": profile_sampling}[a.what]()


if __name__ == "__main__":
    main()
