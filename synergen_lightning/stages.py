"""The stage table: which named parameter groups train in each stage.

The model owns the partition (`SynerGenVL.parameter_groups()`); a stage names groups, never
parameter-name substrings, so a typo is an error instead of a silent no-op. `callbacks/stages.py`
applies a stage; the learning rate and schedule of a stage live here too, so a step-scheduled
switch can give the newly trainable parameters their own optimizer param group.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

PARAMETER_GROUPS: tuple[str, ...] = (
    "image_embed_fold",  # TokenFolder: image-code embedding, 2D position embedding, fold MLP
    "vision_ffn",  # the vision-expert FFN of every LLM layer
    "unfolding_head",  # the small causal head that unfolds one LLM token into m*n codes
    "special_token_embeddings",  # input rows of <boi> <eoi> <UNCOND> (a separate small table)
    "self_attention",  # shared attention of every LLM layer
    "text_backbone",  # text FFNs, text embedding table, norms, LM head
)

IMAGE_SPECIFIC = ("image_embed_fold", "vision_ffn", "unfolding_head", "special_token_embeddings")

# lr: peak learning rate of the stage (the paper's Table 8); the tiny recipes override it.
STAGES: dict[str, dict] = {
    "stage1": {"trainable": IMAGE_SPECIFIC, "lr": 1e-4, "schedule": "constant", "weight_decay": 0.05},
    "stage2": {"trainable": IMAGE_SPECIFIC + ("self_attention",), "lr": 5e-5, "schedule": "cosine", "weight_decay": 0.05},
    "sft": {"trainable": PARAMETER_GROUPS, "lr": 5e-5, "schedule": "cosine", "weight_decay": 0.01},
    # a model that trains everything at once (the "Full" row of the paper's Table 7 ablation)
    "full": {"trainable": PARAMETER_GROUPS, "lr": 5e-5, "schedule": "cosine", "weight_decay": 0.05},
}


def get_stage(stage: str | Mapping) -> dict:
    """A stage by name (from STAGES) or as an inline dict {"trainable": [...], "lr": ...}; validated."""
    if isinstance(stage, str):
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}: valid stages are {sorted(STAGES)} (or pass an inline dict)")
        spec = dict(STAGES[stage], name=stage)
    else:
        spec = dict(stage)
        spec.setdefault("name", "custom")
    validate_groups(spec.get("trainable", ()), PARAMETER_GROUPS)
    return spec


def validate_groups(names: Iterable[str], valid: Iterable[str]) -> None:
    valid = tuple(valid)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown parameter group(s) {unknown}: valid groups are {list(valid)}")


def apply_stage(module, stage) -> dict[str, tuple[int, int]]:
    """Set requires_grad per group; return {group: (trainable, frozen)} element counts."""
    spec = get_stage(stage)
    groups = module.parameter_groups()
    validate_groups(spec["trainable"], groups.keys())
    counts = {}
    for group, named in groups.items():
        train = group in spec["trainable"]
        for _, p in named:
            p.requires_grad_(train)
        n = sum(p.numel() for _, p in named)
        counts[group] = (n if train else 0, 0 if train else n)
    if hasattr(module, "stage"):
        module.stage = spec["name"]
    return counts


class StageSchedule:
    """The toolkit's one LR multiplier (every stage's param groups, the base LLM, the image tokenizer): linear
    warm-up, then constant or cosine decay to `min_lr_ratio` at `total_steps`.

    A callable object (not a lambda) so `LambdaLR.state_dict()` can save it. `start_step` lets a
    stage that starts mid-run (a step-scheduled switch) warm up from its own first step.
    """

    def __init__(self, schedule: str = "constant", warmup_steps: int = 0, total_steps: int | None = None,
                 start_step: int = 0, min_lr_ratio: float = 0.0):
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"unknown lr schedule {schedule!r}: use 'constant' or 'cosine'")
        self.schedule, self.warmup_steps, self.total_steps = schedule, int(warmup_steps), total_steps
        self.start_step, self.min_lr_ratio = int(start_step), float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        s = step - self.start_step
        if s < 0:  # a stage scheduled later (resume rebuilds its group before its start)
            return 0.0
        if s < self.warmup_steps:
            return (s + 1) / self.warmup_steps
        if self.schedule == "constant" or not self.total_steps or self.total_steps <= 0:
            return 1.0
        span = max(1, self.total_steps - self.start_step - self.warmup_steps)
        progress = min(1.0, (s - self.warmup_steps) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# name substrings a stage's AdamW never decays, beside every 1-D parameter (biases, norm scales)
STAGE_NO_DECAY: tuple[str, ...] = ("norm",)


def decay_split(named_params: Iterable[tuple[str, "object"]], exclude: Iterable[str] = STAGE_NO_DECAY
                ) -> tuple[list, list]:
    """The one weight-decay rule: (decay, no_decay) parameter lists, in the given order. A parameter decays when it
    is at least 2-D and its name contains none of the `exclude` substrings."""
    exclude = tuple(exclude)
    decay, no_decay = [], []
    for name, p in named_params:
        (decay if p.ndim >= 2 and not any(e in name for e in exclude) else no_decay).append(p)
    return decay, no_decay


def optimizer_param_groups(named_params: Iterable[tuple[str, "object"]], lr: float, weight_decay: float,
                           tag: str) -> list[dict]:
    """Decay (matrices) / no-decay (norms, biases, 1-D) AdamW groups named `tag/...` (`decay_split`)."""
    decay, no_decay = decay_split(named_params)
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": f"{tag}/decay"})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{tag}/no_decay"})
    return groups
