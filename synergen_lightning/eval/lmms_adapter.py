"""lmms-eval model `synergen`: image understanding on any lmms-eval task (TextVQA, GQA, DocVQA, ChartQA, AI2D,
MMBench, MME, POPE, ...).

    pip install -e '.[lmms-eval]'
    lmms-eval --model synergen --model_args pretrained=runs/tiny/sft/last.ckpt --tasks textvqa_val,pope --batch_size 8

The package registers the model through lmms-eval's `lmms_eval.models` entry point (`model_manifest` below), so
the `lmms-eval` command finds it once both are installed. It is a "simple" model (lmms-eval's `doc_to_visual` +
`doc_to_text` interface):

- `generate_until`: requests in batches of `batch_size`, each image cut into the checkpoint's views (InternVL-1.5
  tiles and thumbnail as its data module trained; `max_tiles` / `thumbnail` in model_args override), the
  question in the model's chat template (`<image>` placeholders dropped: the views come first), greedy decoding
  (`temperature` > 0 samples) up to `max_new_tokens`, cut at `until`.
- `loglikelihood`: (loss, greedy) of the target as the assistant's answer, in lmms-eval's convention: the loss is
  the mean negative log-likelihood per answer token, as lmms-eval's own models return it, and its multiple-choice
  scoring picks the option with the smallest.
- Data parallel: `torchrun --nproc-per-node N -m lmms_eval --model synergen ...` (or `accelerate launch`): lmms-eval
  starts the process group, sets each process's GPU and deals the requests; every process holds the whole model.
- model_args: pretrained, device, max_tiles, thumbnail, max_new_tokens (default 128), text_tokenizer,
  image_tokenizer; the batch size is lmms-eval's own `--batch_size`.
"""

from __future__ import annotations

try:
    from lmms_eval.api.model import lmms
    from lmms_eval.api.registry import register_model
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError("lmms-eval is not installed: pip install 'synergen-lightning[lmms-eval]'") from None

from synergen_lightning.eval.harness import Harness

MODEL_ID = "synergen"
CLASS_PATH = "synergen_lightning.eval.lmms_adapter.SynerGenLMMS"

try:  # the evaluator passes a GenerationResult's payload through as it is
    from lmms_eval.api.instance import GenerationResult
except ImportError:  # pragma: no cover - an lmms-eval without it keeps the model's outputs as they are
    GenerationResult = None


def _as_result(score: tuple[float, bool]):
    """A (loss, greedy) pair as lmms-eval's evaluator keeps it intact: lmms-eval 0.7 turns any other output that is
    not a string into its str(), which its multiple-choice scoring cannot read."""
    return GenerationResult(text=score) if GenerationResult is not None else score


def model_manifest():
    """The `lmms_eval.models` entry point: model id -> this class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


@register_model(MODEL_ID)
class SynerGenLMMS(lmms):
    """A SynerGenVL checkpoint as an lmms-eval simple model."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, model=None, device: str | None = None, batch_size=1,
                 max_tiles=None, thumbnail=None, max_new_tokens: int = 128, text_tokenizer: str | None = None,
                 image_tokenizer: str | None = None, dtype: str = "auto", **kwargs):
        self.pretrained = str(pretrained) if pretrained is not None else "in-memory"  # names lmms-eval's cache
        super().__init__()
        bs = 1 if str(batch_size).startswith("auto") else int(batch_size)
        if model is not None:
            self.harness = Harness(model, max_tiles=max_tiles or 1, thumbnail=thumbnail or False, batch_size=bs,
                                   max_new_tokens=int(max_new_tokens))
        else:
            self.harness = Harness.from_pretrained(pretrained, device=device, max_tiles=max_tiles,
                                                   thumbnail=thumbnail, batch_size=bs,
                                                   max_new_tokens=int(max_new_tokens), text_tokenizer=text_tokenizer,
                                                   image_tokenizer=image_tokenizer, dtype=dtype)
        self._rank, self._world_size = 0, 1

    @property
    def batch_size(self) -> int:
        return self.harness.batch_size

    @property
    def device(self):
        return self.harness.model.device

    def _visuals(self, doc_to_visual, doc_id, task, split):
        return doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []

    def generate_until(self, requests) -> list[str]:
        out = [None] * len(requests)
        groups: dict[float, list[int]] = {}  # one decode setting per batch
        for i, r in enumerate(requests):
            kw = dict(r.args[1] or {})
            temperature = float(kw.get("temperature", 0.0) or 0.0) if kw.get("do_sample", True) else 0.0
            groups.setdefault(temperature, []).append(i)
        for temperature, idx in groups.items():
            contexts, images, until, budgets = [], [], [], []
            for i in idx:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = requests[i].args
                kw = dict(gen_kwargs or {})
                u = kw.get("until") or []
                contexts.append(context)
                images.append(self._visuals(doc_to_visual, doc_id, task, split))
                until.append([u] if isinstance(u, str) else list(u))
                budgets.append(int(kw.get("max_new_tokens", self.harness.max_new_tokens)))
            texts = self.harness.generate(contexts, images, until=until, max_new_tokens=budgets, chat=True,
                                          temperature=temperature)
            for i, text in zip(idx, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), text)
        return out

    def loglikelihood(self, requests) -> list:
        contexts, targets, images = [], [], []
        for r in requests:
            if len(r.args) == 2:  # ("", choice): the unconditional score of a choice (acc_mutual_info)
                (context, target), visuals = r.args, []
            else:
                context, target, doc_to_visual, doc_id, task, split = r.args
                if callable(target):  # doc_to_target, as the model guide describes it
                    target = target(self.task_dict[task][split][doc_id])
                visuals = self._visuals(doc_to_visual, doc_id, task, split)
            if isinstance(target, (list, tuple)):  # a task whose target is a list scores its first entry
                target = target[0]
            contexts.append(context)
            targets.append(str(target).lstrip())  # the assistant's answer: no target delimiter in front
            images.append(visuals)
        scores = self.harness.loglikelihood(contexts, targets, images, chat=True)
        losses = [(-lp / max(1, len(self.harness.tokenizer.encode(t))), greedy) for (lp, greedy), t in
                  zip(scores, targets)]
        return [_as_result(r) for r in losses]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("synergen: multi-round generation is not supported; choose a single-turn task")
