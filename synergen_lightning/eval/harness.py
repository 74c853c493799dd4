"""What the lmms-eval and lm-eval adapters share, free of either package: a loaded SynerGenVL answering batched
requests in the evaluators' terms.

    h = Harness.from_pretrained("runs/tiny/sft/last.ckpt")      # the tile policy comes from the checkpoint
    h.generate(["What colour is the circle?"], [[image]], until=["\\n"], max_new_tokens=16)     # chat template
    h.loglikelihood(["Question: ...\\nAnswer:"], [" B"], images=None, chat=False)             # raw text

Multimodal requests use the model's chat template (InternLM2's, as training builds it: views first, then the
question); text-only requests either the same template (`chat=True`) or the raw text after `<s>` (`chat=False`,
what MMLU-style log-likelihood scoring expects, as the text skill is trained). Requests run in batches of
`batch_size` rows in their given order; outputs come back in that order.
"""

from __future__ import annotations

from pathlib import Path

import torch

from synergen_lightning.checkpoint import inference_dtype
from synergen_lightning.eval.fid import EvalInputError
from synergen_lightning.eval.report import check_system_checkpoint
from synergen_lightning.eval.suites import tile_policy
from synergen_lightning.inference import decode_rows, score_continuations, understanding_rows
from synergen_lightning.system import load_synergen

IMAGE_PLACEHOLDER = "<image>"


def _as_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _as_images(visuals) -> list:
    """PIL images (or image file paths) of one request; anything else is a one-line error."""
    from PIL import Image

    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    out = []
    for v in visuals:
        if isinstance(v, Image.Image):
            out.append(v)
        elif isinstance(v, (str, Path)) and Path(v).is_file():
            with Image.open(v) as img:
                img.load()
                out.append(img.copy())
        else:
            raise EvalInputError(f"visual input {str(v)[:80]!r} ({type(v).__name__}) is neither a PIL image nor an "
                                 "image file: SynerGen-VL reads still images only; choose an image task")
    return out


class Harness:
    """A SynerGenVL in eval mode answering evaluator requests (see the module docstring)."""

    def __init__(self, model, max_tiles: int = 1, thumbnail: bool = False, batch_size: int = 8,
                 max_new_tokens: int = 32):
        if int(batch_size) < 1:
            raise EvalInputError(f"batch_size={batch_size} must be >= 1")
        self.model = model.eval()
        self.max_tiles, self.thumbnail = int(max_tiles), _as_bool(thumbnail)
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)

    @classmethod
    def from_pretrained(cls, pretrained: str | Path, device: str | None = None, max_tiles=None, thumbnail=None,
                        text_tokenizer: str | None = None, image_tokenizer: str | None = None, dtype: str = "auto",
                        **kw) -> "Harness":
        """Load any checkpoint form (a run's .ckpt, a sharded directory, an export); the tile policy is the
        checkpoint's unless `max_tiles` / `thumbnail` are given. `dtype`: the parameters' (auto: bf16 on a GPU that
        has it, else fp32; `checkpoint.inference_dtype`)."""
        if pretrained is None or not Path(str(pretrained)).exists():
            raise EvalInputError(f"pretrained={pretrained!r} does not exist: pass a SynerGenVL checkpoint, e.g. "
                                 "--model_args pretrained=runs/tiny/sft/last.ckpt")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        check_system_checkpoint(pretrained)
        try:
            dtype = inference_dtype(dtype, device)
        except ValueError as exc:
            raise EvalInputError(f"{exc}: e.g. --model_args pretrained=...,dtype=bf16") from None
        model = load_synergen(pretrained, map_location=device, text_tokenizer=text_tokenizer,
                              image_tokenizer=image_tokenizer, dtype=dtype)
        max_tiles, thumbnail = tile_policy(pretrained, max_tiles, None if thumbnail is None else _as_bool(thumbnail))
        return cls(model, max_tiles=max_tiles, thumbnail=thumbnail, **kw)

    # ------------------------------------------------------------------------------------------------ text
    @property
    def tokenizer(self):
        return self.model.text_tokenizer

    @property
    def max_length(self) -> int:
        return self.model.context_limit

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Raw-text ids (`<s>` + context, continuation); the space before a word belongs to the continuation, and
        the continuation's ids are those of the whole text past the context's (one tokenization, no seam)."""
        tok = self.tokenizer
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        ctx = tok.encode(context) if context else []
        whole = tok.encode(context + continuation)
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else tok.encode(continuation)
        return [tok.bos_id] + ctx, cont

    def _rows(self, contexts: list[str], images: list | None, chat: bool):
        """(prompt rows, codes) of a batch: the chat template with the views, or `<s>` + raw text."""
        if chat:
            imgs = [_as_images(v) for v in (images or [None] * len(contexts))]
            questions = [c.replace(IMAGE_PLACEHOLDER, "").strip() for c in contexts]
            return understanding_rows(self.model, imgs, questions, max_tiles=self.max_tiles, thumbnail=self.thumbnail)
        if images and any(_as_images(v) for v in images):
            raise EvalInputError("images need the chat template: pass chat=True (raw-text scoring is text only)")
        tok = self.tokenizer
        return [([tok.bos_id] + tok.encode(c), [False] * (1 + len(tok.encode(c)))) for c in contexts], None

    # ------------------------------------------------------------------------------------------------ requests
    @torch.no_grad()
    def generate(self, contexts: list[str], images: list | None = None, until: list[list[str]] | list[str] | None = None,
                 max_new_tokens: int | list[int] | None = None, chat: bool = True, temperature: float = 0.0,
                 seed: int = 0) -> list[str]:
        """One continuation per context, cut before the first of its `until` strings (and `<|im_end|>` / `</s>`)."""
        n = len(contexts)
        untils = until if until and isinstance(until[0], (list, tuple)) else [list(until or [])] * n
        budgets = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * n
        budgets = [int(b) if b is not None else self.max_new_tokens for b in budgets]
        generator = torch.Generator(device=self.model.device).manual_seed(seed) if temperature > 0 else None
        out = []
        for s in range(0, n, self.batch_size):
            sl = slice(s, s + self.batch_size)
            rows, codes = self._rows(contexts[sl], images[sl] if images else None, chat)
            if codes is None:
                codes = torch.zeros(0, *self.model.grid, dtype=torch.long, device=self.model.device)
            new = decode_rows(self.model, rows, codes, max_new_tokens=max(budgets[sl]), temperature=temperature,
                              generator=generator)
            for ids, stop, budget in zip(new, untils[sl], budgets[sl]):
                text = self.tokenizer.decode(ids[:budget])
                for u in stop or []:
                    if u and u in text:
                        text = text[:text.index(u)]
                out.append(text.strip() if chat else text)
        return out

    @torch.no_grad()
    def loglikelihood(self, contexts: list[str], continuations: list[str], images: list | None = None,
                      chat: bool = False) -> list[tuple[float, bool]]:
        """(log-probability, greedy) of each continuation after its context: raw text (`chat=False`) or as the
        assistant's answer to the context (and its images) in the chat template (`chat=True`)."""
        out = []
        for s in range(0, len(contexts), self.batch_size):
            sl = slice(s, s + self.batch_size)
            if chat:
                rows, codes = self._rows(contexts[sl], images[sl] if images else None, True)
                conts = [self.tokenizer.encode(c) for c in continuations[sl]]
            else:
                pairs = [self.encode_pair(c, x) for c, x in zip(contexts[sl], continuations[sl])]
                rows, codes = [(p[0], [False] * len(p[0])) for p in pairs], None
                conts = [p[1] for p in pairs]
            out += score_continuations(self.model, rows, conts, codes)
        return out

    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-probability, greedy) of token continuations after token contexts (text only), batched."""
        out = []
        for s in range(0, len(pairs), self.batch_size):
            chunk = pairs[s:s + self.batch_size]
            out += score_continuations(self.model, [(c, [False] * len(c)) for c, _ in chunk], [x for _, x in chunk])
        return out
