"""lm-eval (EleutherAI's LM Evaluation Harness) model `synergen`: the text skill kept (MMLU, CMMLU, ...).

    synergen eval lm-eval run --model synergen --model_args pretrained=runs/tiny/sft/last.ckpt --tasks mmlu,cmmlu

`synergen eval lm-eval ARGS` is `lm-eval ARGS` with this adapter registered (lm-eval finds models by import).
From Python, `lm_eval.simple_evaluate(model=SynerGenLM(pretrained=CKPT), tasks=[...])`.

- `loglikelihood`: the continuation's log-probability after `<s>` + the raw context (the text skill's format),
  batched, one forward pass per batch; `loglikelihood_rolling`: lm-eval's disjoint rolling windows of the model's
  context; `generate_until`: greedy (or sampled, `do_sample`/`temperature`), cut at `until`.
- `--apply_chat_template` formats few-shot turns with the model's chat template (InternLM2's `<|im_start|>`).
- model_args: pretrained (checkpoint, any form), dtype, max_gen_toks (default 256), text_tokenizer / image_tokenizer
  (override the paths stored in the checkpoint); the batch size and device come from lm-eval's own `--batch_size`
  and `--device` (on its command line a batch_size in model_args collides with `--batch_size`'s default).
- Data parallel: started by `torchrun --nproc-per-node N` (WORLD_SIZE in the environment), each process holds the
  whole model (on GPU LOCAL_RANK, or the CPU; `sharing.join`) and scores its share of lm-eval's requests;
  lm-eval pads the shares and gathers the per-sample metrics to rank 0, which alone writes the results.
"""

from __future__ import annotations

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError("lm-eval is not installed: pip install 'synergen-lightning[lm-eval]'") from None

from synergen_lightning.eval.harness import Harness
from synergen_lightning.sharing import WHOLE, join


@register_model("synergen")
class SynerGenLM(LM):
    """A SynerGenVL checkpoint as an lm-eval LM (text only)."""

    def __init__(self, pretrained: str | None = None, model=None, device: str | None = None, batch_size=8,
                 max_gen_toks: int = 256, text_tokenizer: str | None = None, image_tokenizer: str | None = None,
                 dtype: str = "auto", **kwargs):
        super().__init__()
        self.share = WHOLE
        if model is None:  # under torchrun, a share of the requests per process
            self.share, device = join(device)
            self._rank, self._world_size = self.share.rank, self.share.world
        bs = 8 if str(batch_size).startswith("auto") else int(batch_size)
        if model is not None:
            self.harness = Harness(model, batch_size=bs, max_new_tokens=int(max_gen_toks))
        else:
            self.harness = Harness.from_pretrained(pretrained, device=device, batch_size=bs,
                                                   max_new_tokens=int(max_gen_toks), text_tokenizer=text_tokenizer,
                                                   image_tokenizer=image_tokenizer, dtype=dtype)
        self.pretrained = str(pretrained) if pretrained is not None else "in-memory"
        self._device = self.harness.model.device

    # ------------------------------------------------------------------------------------------------ data parallel
    # lm-eval's hooks (single-process defaults in `LM`): the request counts it pads to, the metrics it gathers
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.share.gather(tensor)

    def gather_object(self, obj, dst: int = 0):
        return self.share.gather_object(obj, dst)

    def barrier(self) -> None:
        self.share.wait()

    @property
    def tokenizer_name(self) -> str:
        return f"synergen-{self.pretrained}"

    def chat_template(self, chat_template: bool | str = False) -> str:
        return "internlm2-chatml"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """`<|im_start|>role\\ncontent<|im_end|>\\n` per turn (+ the assistant's opening); `<s>` is added on scoring."""
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat_history)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    # ------------------------------------------------------------------------------------------------ requests
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        contexts, continuations = zip(*[r.args for r in requests]) if requests else ((), ())
        out = self.harness.loglikelihood(list(contexts), list(continuations), chat=False)
        for r, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        tok, out = self.harness.tokenizer, []
        for r in requests:
            (text,) = r.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=tok.encode(text), prefix_token=tok.bos_id, max_seq_len=self.harness.max_length,
                context_len=1)]
            total = sum(lp for lp, _ in self.harness.score_tokens(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}  # one decode setting per batch: the requests grouped by their kwargs
        for i, r in enumerate(requests):
            kw = dict(r.args[1] or {})
            sample = bool(kw.get("do_sample", False)) and float(kw.get("temperature", 1.0) or 0.0) > 0
            key = (float(kw.get("temperature", 1.0)) if sample else 0.0,)
            groups.setdefault(key, []).append(i)
        for (temperature,), idx in groups.items():
            contexts = [requests[i].args[0] for i in idx]
            kws = [dict(requests[i].args[1] or {}) for i in idx]
            until = [[u] if isinstance(u, str) else list(u or []) for u in (k.get("until") for k in kws)]
            budgets = [int(k.get("max_gen_toks", self.harness.max_new_tokens)) for k in kws]
            texts = self.harness.generate(contexts, until=until, max_new_tokens=budgets, chat=False,
                                          temperature=temperature)
            for i, text in zip(idx, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def main(argv: list[str] | None = None) -> int:
    """`synergen eval lm-eval ARGS`: lm-eval's own command line with the `synergen` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
