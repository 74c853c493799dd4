"""`PeriodicEvaluator`: shape-world GenEval, understanding accuracy and text-skill retention every N steps.

Logs `eval/geneval/overall`, `eval/geneval/<category>`, `eval/und/accuracy`, `eval/und/per_kind/<kind>`,
`eval/und/prior_accuracy` (a constant answer per question kind), `eval/und/top_answer_share/<kind>`,
`eval/text/accuracy`, `eval/text/retention` (vs the base LLM) and, from the val shards, `eval/grounding/caption_gain`,
`eval/grounding/caption_gain_vs_uncond` and `eval/grounding/image_gain` (teacher-forced nats the true caption / image
saves over a swapped one; ~0 = the model ignores that input; eval/grounding.py) to every logger of the trainer. Each
suite runs only when its inputs are given. Recipe lines (callbacks of the trainer):

    - class_path: callbacks.evaluator.PeriodicEvaluator
      init_args:
        every_n_steps: 200
        eval_prompts: data/tiny/eval_prompts.jsonl
        num_geneval: 48
        val_shards: data/tiny/val/shard-*.tar
        num_und: 64
        skill_jsonl: data/tiny/text/skill_val.jsonl
        base_llm: ${oc.env:SYNERGEN_TINY_BASE_LLM,runs/tiny/base_llm/last.ckpt}
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from synergen_lightning.eval.suites import (
    eval_mode,
    flatten_metrics,
    geneval_suite,
    load_qa_items,
    text_suite,
    understanding_suite,
)


class PeriodicEvaluator(Callback):
    def __init__(self, every_n_steps: int = 200, eval_prompts: str | list[dict] | None = None, num_geneval: int = 48,
                 val_shards: str | list[str] | None = None, num_und: int = 64, skill_jsonl: str | None = None,
                 max_text_examples: int | None = 200, base_llm: str | None = None, base_accuracy: float | None = None,
                 seed: int = 0, cfg_scale: float = 7.5, batch_size: int = 16, on_train_end: bool = True,
                 progress: bool = True, num_grounding: int = 64):
        """
        Args:
            every_n_steps: evaluate after every N optimizer steps (0 = only at the end of training).
            eval_prompts: eval_prompts.jsonl (or the prompt dicts) for shape-world GenEval; first `num_geneval` used.
            val_shards: val shard glob / list with KEY.json Q/A for understanding accuracy; first `num_und` items.
            skill_jsonl: held-out text skill (`{"prompt", "answer"}` lines) for text-skill retention.
            max_text_examples: skill lines used (None = all).
            base_llm: base LLM checkpoint / HF dir: its skill accuracy (computed once) is the retention baseline.
            base_accuracy: the baseline given directly (skips running the base LLM).
            seed / cfg_scale: generation settings (fixed: the curve shows the model, not the sampler).
            batch_size: rows per generation / answering batch.
            on_train_end: also evaluate when training ends.
            progress: rich progress bars on the generation and answering loops.
            num_grounding: val samples (from `val_shards`) for caption gain / image gain; 0 = off.
        """
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps {every_n_steps} must be >= 0 (0 = only at the end of training)")
        if eval_prompts is None and val_shards is None and skill_jsonl is None:
            raise ValueError("PeriodicEvaluator has nothing to run: give eval_prompts, val_shards and/or skill_jsonl")
        self.every_n_steps, self.seed, self.cfg_scale, self.batch_size = every_n_steps, seed, cfg_scale, batch_size
        self.eval_prompts_src, self.num_geneval = eval_prompts, num_geneval
        self.val_shards, self.num_und = val_shards, num_und
        self.skill_jsonl, self.max_text_examples = skill_jsonl, max_text_examples
        self.base_llm, self.base_accuracy = base_llm, base_accuracy
        self.log_on_train_end, self.progress = on_train_end, progress
        self._prompts: list[dict] | None = None
        self._qa: list[dict] | None = None
        self.num_grounding = num_grounding
        self._grounding_samples: list[dict] | None = None
        self._grounding_items: tuple[list, list] | None = None  # code grids, encoded once (the tokenizer is frozen)
        self.history: list[tuple[int, dict[str, float]]] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # read (and validate) the inputs once, before the first step, so a bad path fails fast
        if self.eval_prompts_src is not None and self._prompts is None:
            if isinstance(self.eval_prompts_src, (str, Path)):
                from synergen_lightning.world.cli import load_prompts

                if not Path(self.eval_prompts_src).is_file():
                    raise FileNotFoundError(f"PeriodicEvaluator eval_prompts {str(self.eval_prompts_src)!r} does not exist; "
                                            "run `make data` or fix the callback's eval_prompts")
                prompts = load_prompts(Path(self.eval_prompts_src))
            else:
                prompts = list(self.eval_prompts_src)
            self._prompts = prompts[: self.num_geneval]
        if self.val_shards is not None and self._qa is None:
            self._qa = load_qa_items(self.val_shards, self.num_und)
        if self.val_shards is not None and self.num_grounding > 0 and self._grounding_samples is None:
            from synergen_lightning.eval.grounding import load_grounding_samples

            self._grounding_samples = load_grounding_samples(self.val_shards, self.num_grounding)
        if self.skill_jsonl is not None and not Path(self.skill_jsonl).is_file():
            raise FileNotFoundError(f"PeriodicEvaluator skill_jsonl {self.skill_jsonl!r} does not exist; "
                                    "run `make data` or fix the callback's skill_jsonl")

    def evaluate(self, pl_module: LightningModule) -> dict:
        results: dict = {}
        if self._prompts:
            results["geneval"] = geneval_suite(pl_module, self._prompts, seed=self.seed, cfg_scale=self.cfg_scale,
                                               batch_size=self.batch_size, progress=self.progress)
        if self._qa:
            results["und"] = understanding_suite(pl_module, self._qa, batch_size=self.batch_size, progress=self.progress)
            results["und"].pop("examples", None)
        if self._grounding_samples:
            from synergen_lightning.eval.grounding import grounding_items, grounding_suite

            if self._grounding_items is None:
                with eval_mode(pl_module):
                    self._grounding_items = grounding_items(pl_module, self._grounding_samples)
            g = grounding_suite(pl_module, items=self._grounding_items, batch_size=self.batch_size)
            results["grounding"] = {k: g[k] for k in ("caption_gain", "caption_gain_vs_uncond", "image_gain")
                                    if g[k] is not None}
        if self.skill_jsonl is not None:
            results["text"] = text_suite(pl_module, self.skill_jsonl, base_llm=self.base_llm,
                                         base_accuracy=self.base_accuracy, max_examples=self.max_text_examples)
            # the base LLM does not change during training: run it once
            self.base_accuracy = results["text"].get("base_accuracy", self.base_accuracy)
            self.base_llm = None if self.base_accuracy is not None else self.base_llm
        return results

    def _run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if any(s == step for s, _ in self.history):
            return
        # every rank runs the (seeded, identical) forward passes: a sharded (FSDP) model needs all ranks; one
        # eval_mode around every suite gathers a sharded model's weights once for all of them
        with eval_mode(pl_module):
            metrics = flatten_metrics(self.evaluate(pl_module))
        self.history.append((step, metrics))
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        rank_zero_info(headline(step, metrics))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.log_on_train_end:
            self._run(trainer, pl_module)


def headline(step: int, metrics: dict[str, float]) -> str:
    """The console's line: each suite's own figures (`eval/SUITE/NAME`); the breakdowns by question kind and object
    count (a few dozen more) go to the loggers only."""
    top = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.count("/") == 2}
    more = len(metrics) - len(top)
    return (f"eval @ step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(top.items()))
            + (f" (+{more} per kind and object count in the loggers)" if more else ""))
