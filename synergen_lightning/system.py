"""`SynerGenVL`: the frozen image tokenizer + the MMoE LLM + the TokenFolder + the unfolding head.

The system holds three component LightningModules, each fit/validate-able on its own and each owning its parameter
groups and its validation metric, with the pure-torch modules inside them:

    llm              MMoELLM (llm.py)               .model: MMoETransformer     groups vision_ffn, self_attention,
                                                                                text_backbone; metric val_loss
    head             UnfoldingHeadModule (head.py)  .model: UnfoldingHead       group unfolding_head; metric val_loss
    image_tokenizer  the frozen tokenizer: a VQTokenizer LightningModule (image_tokenizer/vq_tokenizer.py) or an
                     HF adapter; loaded from its own path on first use, never a submodule (not trained, not
                     checkpointed with the system)

and owns what joins them: the `folder` (TokenFolder, group image_embed_fold) and the special-token table
(group special_token_embeddings). The stage table (stages.py) freezes and unfreezes by those groups.

One `training_step` serves mixed generation / understanding / text batches (the batch contract of
docs/architecture.md):

    embeddings = LLM text embedding (special tokens from their own small table)
                 with the image slots filled, view by view, by TokenFolder(codes)
    hidden     = MMoE LLM(embeddings, image_mask)          (text FFN / vision FFN per token)
    L_text     = CE(LM head(hidden[t-1]), labels[t])        mean over supervised text tokens
    L_img      = CE(head(hidden before patch i), codes_i)   mean over the supervised views' codes
    loss       = L_text + image_loss_weight * L_img         (lambda = 2 in the paper)

Every sub-module runs every step, on zero rows if need be (a text-only batch still calls the
folder, the vision FFNs and the head): FSDP needs every sharded unit on every rank every step.

Special tokens (`<boi>`, `<eoi>`, `<UNCOND>`): their *input* embeddings live in a separate small
table `special_embed` (group `special_token_embeddings`) that overrides the rows of the shared text
table at those ids; it starts as a copy of those rows. A separate table rather than a gradient mask
on the shared matrix, because AdamW's weight decay (and Adam's moments) would move the frozen rows
of a partially-masked matrix; with a separate table the text table stays bit-identical while frozen.
The LM-head rows of those tokens belong to `text_backbone`.

Stage hand-off: `init_from` loads the previous stage's weights (weights only: the optimizer is
built fresh for the new stage's trainable set, so optimizer state from a stage with other trainable
parameters is never loaded into the wrong groups). Resuming *within* a stage uses Lightning's
`--ckpt_path` as usual.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric

from synergen_lightning.checkpoint import load_checkpoint_model, read_checkpoint_meta, read_state_dict
from synergen_lightning.data.batch import add_indices
from synergen_lightning.distributed import (
    is_sharded,
    is_sharded_checkpoint,
    load_base_into_sharded,
    load_sharded_into,
    parallelize,
    total_grad_norm,
)
from synergen_lightning.head import UnfoldingHeadModule
from synergen_lightning.image_tokenizer.loading import load_image_tokenizer
from synergen_lightning.inference import answer, generate_images
from synergen_lightning.llm import MMoELLM
from synergen_lightning.model_parts import (
    base_llm_rows,
    load_base_llm,
    load_text_tokenizer,
    resolve_model_parts_and_tokenizers,
)
from synergen_lightning.models.config import HeadConfigDict, LLMConfig, LLMConfigDict
from synergen_lightning.models.folding import TokenFolder, check_fold, codebook_patches, fold_codes
from synergen_lightning.models.mmoe import MMoETransformer, Routing
from synergen_lightning.nonfinite import NonFiniteGuard
from synergen_lightning.stages import (
    PARAMETER_GROUPS,
    StageSchedule,
    apply_stage,
    get_stage,
    optimizer_param_groups,
    validate_groups,
)
from synergen_lightning.state_keys import current_keys

SPECIAL_TOKENS = ("boi", "eoi", "uncond")  # their input rows train from stage 1 (group special_token_embeddings)


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


class SynerGenVL(LightningModule):
    def __init__(
        self,
        llm: LLMConfigDict | None = None,
        base_llm: str | None = None,
        text_tokenizer: str | None = None,
        special_token_ids: dict[str, int] | None = None,
        image_tokenizer: str | None = None,
        codebook_size: int | None = None,
        image_size: int = 512,
        downsample: int = 8,
        fold: tuple[int, int] = (2, 8),
        code_dim: int = 256,
        code_embed_init: str = "random",
        fold_output_rms: float | None = None,
        fold_output_rms_learnable: bool = True,
        fold_reconstruction_weight: float = 0.0,
        fold_reconstruction_views: int | None = None,
        head: HeadConfigDict | None = None,
        image_loss_weight: float = 2.0,
        text_loss: str = "token",
        stage: str = "stage1",
        lr: float | dict[str, float] | None = None,
        weight_decay: float | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup_steps: int = 200,
        schedule: str | None = None,
        min_lr_ratio: float = 0.0,
        lr_scale: dict[str, float] | None = None,
        init_from: str | None = None,
        init_from_base_llm: bool = False,
        max_context: int | None = None,
        max_nonfinite_steps: int = 5,
        question_first: bool = False,
    ):
        """
        Args:
            llm: LLMConfig fields of the trunk (vocab_size, hidden_size, num_layers, ...). A recipe may leave them
                unset: `from_paths` (and `synergen fit`) reads them from `base_llm` before the model is built.
            base_llm: the base LLM whose weights start the trunk: an `MMoELLM` .ckpt (tiny default) or a
                local HF Llama/Qwen2/InternLM2 directory. Loaded at fit start (not by load_from_checkpoint).
            text_tokenizer: directory (or tokenizer.json) of the `TextTokenizer`; gives the special-token ids
                and is used by `generate_images` / `answer`.
            special_token_ids: {"boi", "eoi", "uncond", ...} ids; `from_paths` reads them from `text_tokenizer`.
            image_tokenizer: frozen image tokenizer (VQTokenizer .ckpt or Emu3/Chameleon HF dir); encodes
                `pixel_values` when a batch has no `image_codes`, decodes generated codes.
            codebook_size: VQ codebook size; `from_paths` reads it (and `downsample`) from `image_tokenizer`; checked
                against it at fit start.
            image_size: side of every image view in pixels (generation views and understanding tiles).
            downsample: the image tokenizer's spatial downsample; code grid = image_size / downsample.
            fold: (m, n) token folding: m rows x n columns of codes -> one LLM token (paper: 2x8).
            code_dim: width of the folder's code embedding.
            code_embed_init: how a run that starts from the base LLM (stage 1, full) initialises the folder's code
                embedding: "random" (N(0, 1)) or "codebook" (principal components of each code's decoded pixels,
                from `image_tokenizer`: colour is linearly readable from the folded tokens from step 0).
            fold_output_rms: folded image tokens leave the folder through an RMSNorm at this scale (e.g. 0.02, the text
                embeddings' RMS; the tiny recipes use 0.1), so image and text tokens enter the LLM at one scale;
                None (default) = the paper's plain MLP, whose output may grow far above the text embeddings.
            fold_output_rms_learnable: True = that RMSNorm's gain trains (starts at `fold_output_rms`); False = the
                scale stays `fold_output_rms` (a buffer), so the folder cannot grow image tokens above text ones.
            fold_reconstruction_weight: > 0 adds this weight times a loss that reads every code of a view back from
                its folded token (`TokenFolder.reconstruction_loss`, beside the paper's losses): the folded tokens
                keep what their codes show (an object's colour), which next-patch generation alone lets the folder
                drop. The read-out belongs to the folder's parameter group. 0 (default): the paper's losses only.
            fold_reconstruction_views: that loss reads back at most this many views of a batch (evenly spread): its
                cost is views x codebook, a large share of a step with many Q/A views. None (default): every view.
            head: the UnfoldingHead's blocks: {num_layers: 4, hidden_size, num_heads, num_kv_heads,
                intermediate_size}; unset keys follow the LLM. `condition`: how h_i enters the head, "first"
                (the first input, default) or "every" (added to every input; `UnfoldingHead`).
            image_loss_weight: lambda in loss = L_text + lambda * L_img (paper: 2).
            text_loss: how L_text averages its supervised tokens: "token" = one mean over every supervised text
                token of the batch; "task" = the mean of each task's own token mean (rows grouped by batch["task"]),
                so the 1-3 answer tokens of a Q/A row are not outweighed by the ~200 tokens of a text row.
            stage: stage1 | stage2 | sft | full (see synergen_lightning/stages.py); the StageCallback sets it.
            lr: peak learning rate; a float, or {stage: lr}; unset -> the stage table's (paper Table 8).
            weight_decay: AdamW weight decay; unset -> the stage table's.
            betas / eps: AdamW (paper: 0.9, 0.95, 1e-8).
            warmup_steps: linear warm-up steps of every stage's schedule (paper: 200).
            schedule: constant | cosine; unset -> the stage table's (stage 1 constant, later cosine).
            min_lr_ratio: floor of the cosine decay, as a fraction of the peak.
            lr_scale: {parameter group: factor} on the stage lr, e.g. {self_attention: 0.1, text_backbone: 0.1}: the
                pretrained LLM's parts move slower than the new image-specific ones (measured: stage 2 at one lr for
                every part loses the held-out text skill; RESULTS.md).
            init_from: the previous stage's checkpoint (weights only) to start from.
            init_from_base_llm: allow stage2 / sft to start from the base LLM without `init_from`
                (the paper's "S.2 only" ablation); otherwise that is an error.
            max_context: longest sequence the model may see; unset -> the LLM's max_position_embeddings.
            max_nonfinite_steps: an optimizer step whose loss or gradient norm is NaN/inf on any rank makes no update
                (counted as `train/skipped_nonfinite`, logged with the batch's sources); this many in a row stop the
                run with a checkpoint of the last good state (synergen_lightning/nonfinite.py).
            question_first: understanding prompts put the question before the image (`user\\n{question}\\n<boi>[IMG]<eoi>`):
                the image tokens then see the question, so each can mark whether it holds the object asked about, and
                the answer reads the marked one. False: the paper's image-first template. The training data
                (`MixedDataModule`) and `answer` follow the model's setting.
        """
        super().__init__()
        # the resolved parts are saved with the weights: load_from_checkpoint needs neither the base LLM nor the
        # tokenizers on disk
        if llm is None or special_token_ids is None or codebook_size is None:
            raise ValueError("SynerGenVL needs `llm`, `special_token_ids` and `codebook_size`: build it with "
                             "SynerGenVL.from_paths(...), which reads them from `base_llm`, `text_tokenizer` and "
                             "`image_tokenizer` (`synergen fit` does that before it builds the model)")
        config = LLMConfig(**llm)
        missing = [s for s in SPECIAL_TOKENS if s not in special_token_ids]
        if missing:
            raise ValueError(f"special_token_ids lacks {missing}: give ids for {list(SPECIAL_TOKENS)}")
        if image_size % downsample:
            raise ValueError(f"image_size {image_size} is not divisible by the tokenizer downsample {downsample}")
        if code_embed_init not in ("random", "codebook"):
            raise ValueError(f"code_embed_init={code_embed_init!r}: use 'random' or 'codebook' (from the image tokenizer's decoded codes)")
        if fold_reconstruction_weight < 0:
            raise ValueError(f"fold_reconstruction_weight={fold_reconstruction_weight}: must be >= 0 (0 turns it off)")
        if text_loss not in ("token", "task"):
            raise ValueError(f"text_loss={text_loss!r}: use 'token' (one mean over the batch's text tokens) or 'task'")
        grid = (image_size // downsample, image_size // downsample)
        fold = tuple(fold)
        check_fold(grid, fold)
        self.save_hyperparameters()
        self.hparams.update({"text_tokenizer": text_tokenizer, "llm": asdict(config), "special_token_ids": dict(special_token_ids),
                             "codebook_size": codebook_size, "downsample": downsample, "fold": list(fold)})

        self.llm = MMoELLM(config=asdict(config), vision_experts=True)
        self.folder = TokenFolder(codebook_size, grid, fold, config.hidden_size, code_dim=code_dim,
                                  output_rms=fold_output_rms, output_rms_learnable=fold_output_rms_learnable,
                                  reconstruct=fold_reconstruction_weight > 0,
                                  reconstruct_max_views=fold_reconstruction_views)
        hc = {"num_layers": 4, "hidden_size": config.hidden_size, "num_heads": config.num_heads,
              "num_kv_heads": config.num_kv_heads, "intermediate_size": config.intermediate_size}
        hc.update(head or {})
        self.head = UnfoldingHeadModule(codebook_size, fold, cond_dim=config.hidden_size,
                                        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, **hc)
        self.register_buffer("special_ids", torch.tensor([special_token_ids[s] for s in SPECIAL_TOKENS]),
                             persistent=False)
        self.special_embed = nn.Embedding(len(SPECIAL_TOKENS), config.hidden_size)
        with torch.no_grad():
            if not self.llm.model.embed_tokens.weight.is_meta:
                self.special_embed.weight.copy_(self.llm.model.embed_tokens.weight[self.special_ids])
        self.grid, self.fold_size = grid, fold
        self.stage = get_stage(stage)["name"]
        self.stage_history: list[tuple[int, str]] = [(0, self.stage)]  # (first step, stage): switches inside a run
        self._stage_applied = False
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self.val_loss = MeanMetric()  # row-weighted over the epoch and every rank

    @classmethod
    def from_paths(cls, **init_args) -> "SynerGenVL":
        """The model a recipe's init args describe: what `base_llm`, `text_tokenizer` and `image_tokenizer` hold is
        read first (`model_parts.resolve_model_parts`), then the constructor builds from it; the tokenizers read on
        the way are kept (not loaded a second time)."""
        args, loaded = resolve_model_parts_and_tokenizers(init_args)
        model = cls(**args)
        if "text_tokenizer" in loaded:
            model.set_text_tokenizer(loaded["text_tokenizer"])
        if "image_tokenizer" in loaded:
            model.set_image_tokenizer(loaded["image_tokenizer"])
        return model

    # ------------------------------------------------------------------ structure
    @property
    def tokens_per_view(self) -> int:
        return self.folder.tokens_per_view

    @property
    def context_limit(self) -> int:
        """The longest sequence the model may see: `max_context`, else the LLM's `max_position_embeddings`."""
        return int(self.hparams.get("max_context") or self.llm.model.config.max_position_embeddings)

    @property
    def question_first(self) -> bool:
        """Whether understanding prompts put the question before the image (checkpoints without it: image first)."""
        return bool(self.hparams.get("question_first", False))

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """The partition into the named groups of the stage table (every parameter exactly once): the components'
        own groups under their prefixes, and the system's folder and special-token table."""
        groups: dict[str, list] = {g: [] for g in PARAMETER_GROUPS}
        for prefix, component in (("llm.", self.llm), ("head.", self.head)):
            for g, members in component.parameter_groups().items():
                groups[g] += [(prefix + n, p) for n, p in members]
        groups["image_embed_fold"] += [("folder." + n, p) for n, p in self.folder.named_parameters()]
        groups["special_token_embeddings"] += [("special_embed." + n, p) for n, p in self.special_embed.named_parameters()]
        placed = {n for members in groups.values() for n, _ in members}
        stray = [n for n, _ in self.named_parameters() if n not in placed]
        if stray or len(placed) != sum(len(m) for m in groups.values()):
            raise RuntimeError(f"parameters {stray[:3]} belong to no group (or one to two): extend "
                               "SynerGenVL.parameter_groups or the component's")
        return groups

    def param_counts(self) -> dict[str, int]:
        """total / activated (one FFN expert per token) parameter counts."""
        total = sum(p.numel() for p in self.parameters())
        vision = sum(p.numel() for _, p in self.parameter_groups()["vision_ffn"])
        return {"total": total, "activated": total - vision}

    @property
    def image_tokenizer(self):
        """The frozen image tokenizer, loaded on first use; never a submodule (not trained, not checkpointed)."""
        tok = self.__dict__.get("_image_tokenizer")
        if tok is None:
            path = self.hparams.get("image_tokenizer")
            if path is None:
                raise ValueError("this batch has pixel_values but no image_codes, and the model has no image_tokenizer: "
                                 "set model.image_tokenizer or pretokenize the shards")
            tok = load_image_tokenizer(path)
            self.__dict__["_image_tokenizer"] = tok
        if tok.codebook_size != self.folder.codebook_size:
            raise ValueError(f"image tokenizer codebook_size {tok.codebook_size} != the model's code embedding table "
                             f"{self.folder.codebook_size}: use the tokenizer the model was trained with or set "
                             f"codebook_size: {tok.codebook_size} in the recipe")
        if isinstance(tok, nn.Module):
            tok.to(self.device).eval().requires_grad_(False)
        return tok

    def set_image_tokenizer(self, tokenizer) -> None:
        self.__dict__["_image_tokenizer"] = tokenizer

    # views per call of the frozen tokenizer: its activations at full resolution grow with the views of a call
    ENCODE_VIEWS = 8

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """uint8 [N,3,S,S] (or float in [0,1]) -> Long[N,h,w] with the frozen tokenizer, `ENCODE_VIEWS` views per
        call and outside autocast: the codes of online tokenization are those `synergen data pretokenize` writes
        (a bf16 encoder moves some features across the boundary between two codes)."""
        if pixel_values.shape[0] == 0:
            return torch.zeros(0, *self.grid, dtype=torch.long, device=self.device)
        tok, codes = self.image_tokenizer, []
        with torch.autocast(self.device.type, enabled=False):
            for start in range(0, pixel_values.shape[0], self.ENCODE_VIEWS):
                x = pixel_values[start:start + self.ENCODE_VIEWS].to(self.device)
                x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
                codes.append(tok.encode(x).long())
        return torch.cat(codes)

    # ------------------------------------------------------------------ forward pieces
    def embed_text(self, input_ids: Tensor, check: bool = True) -> Tensor:
        """Text embedding, with <boi>/<eoi>/<UNCOND> taken from `special_embed` (always runs, for FSDP). `check`: the
        ids' range check (a read-back; off for ids the model sampled itself)."""
        x = self.llm.model.embed(input_ids, check=check)
        match = input_ids[..., None] == self.special_ids
        special = self.special_embed(match.long().argmax(-1)).to(x.dtype)
        return torch.where(match.any(-1, keepdim=True), special, x)

    def embed_inputs(self, input_ids: Tensor, image_mask: Tensor, codes: Tensor, slots: Tensor | None = None,
                     folded: Tensor | None = None) -> Tensor:
        """Text embeddings with every image slot filled by the folded views, in slot order. `slots`: the flat [B*T]
        indices of the image slots when already known (a collated batch's `image_idx`); `folded`: the folder's
        output for `codes` when the caller already has it."""
        x = self.embed_text(input_ids)
        if folded is None:
            folded = self.folder(codes)  # [N, P, D]; N may be 0 (called via __call__ so FSDP hooks fire)
        folded = folded.to(x.dtype)
        n_slots = slots.numel() if slots is not None else int(image_mask.sum())
        n_tok = folded.shape[0] * folded.shape[1]
        if n_slots != n_tok:
            raise ValueError(f"batch has {n_slots} image slots but {folded.shape[0]} views x {self.tokens_per_view} "
                             f"folded tokens = {n_tok}: the data's fold/grid must match the model's "
                             f"(grid {self.grid}, fold {self.fold_size})")
        if slots is not None:
            b, t, d = x.shape
            return x.reshape(b * t, d).index_copy(0, slots, folded.reshape(-1, d)).view(b, t, d)
        return x.masked_scatter(image_mask[..., None], folded.reshape(-1, x.shape[-1]))

    def patch_conditions(self, hidden: Tensor, image_mask: Tensor, n_views: int, slots: Tensor | None = None) -> Tensor:
        """Hidden state just before each folded patch: [N, P, D] (row-major slot order)."""
        b, t, d = hidden.shape
        if slots is None:
            slots = torch.nonzero(image_mask.reshape(-1)).squeeze(1)
        return hidden.reshape(b * t, d)[slots.view(n_views, self.tokens_per_view) - 1]

    def batch_codes(self, batch: dict) -> Tensor:
        codes = batch.get("image_codes")
        if codes is None:
            pv = batch.get("pixel_values")
            if pv is None:
                return torch.zeros(0, *self.grid, dtype=torch.long, device=self.device)
            codes = self.encode_images(pv)
        return codes.long()

    def forward_losses(self, batch: dict) -> dict[str, Tensor]:
        """The losses of a batch. A collated batch carries its selections as index tensors (`data.batch.add_indices`),
        so the step never reads a mask back from the device; a batch without them (tests, hand-made batches) has
        them derived from its masks here, by the same function."""
        if "image_idx" not in batch:
            batch = add_indices(dict(batch))
        input_ids, image_mask = batch["input_ids"], batch["image_mask"].bool()
        codes = self.batch_codes(batch)
        slots = batch["image_idx"]
        folded, loss_fold = self.folder(codes, reconstruct=True) if self.folder.recon is not None else (None, None)
        embeds = self.embed_inputs(input_ids, image_mask, codes, slots, folded)
        hidden = self.llm.model(embeds, image_mask=image_mask, position_ids=batch.get("position_ids"),
                                attention_mask=batch.get("attention_mask"),
                                routing=Routing.from_indices(batch["text_idx"], slots),
                                right_padded=batch["right_padded"], document_ids=batch.get("document_ids"))
        # text: HF convention, labels[t] is the target of the prediction made at t-1; LM head on supervised rows
        # only, its logits and loss in row chunks (the [N, vocab] logits never exist at once)
        b, t, d = hidden.shape
        positions = batch["text_positions"]
        n_text = positions.numel()
        rows = positions // max(t - 1, 1)
        at = positions + rows  # position p of the [B, T-1] predictions is token p + row of the [B, T] sequence
        token_losses = self.llm.model.token_losses(hidden.reshape(b * t, d).index_select(0, at),
                                                   batch["labels"].reshape(-1).index_select(0, at + 1))
        loss_text = self.text_loss_mean(token_losses, batch.get("text_samples", rows), batch.get("task"))
        # image: the head unfolds the hidden state before each patch of every supervised view
        views = batch["loss_views"]
        cond = self.patch_conditions(hidden, image_mask, codes.shape[0], slots).index_select(0, views)
        target_codes = fold_codes(codes.index_select(0, views), self.fold_size)
        n_img = target_codes.numel()
        # the head's classifier and loss in row chunks: the [codes, codebook] logits never exist at once
        loss_image = self.head(cond.flatten(0, 1), target_codes.flatten(0, 1), reduction="sum") / max(n_img, 1)
        loss = loss_text + self.hparams.image_loss_weight * loss_image
        out = {"loss": loss, "loss_text": loss_text, "loss_image": loss_image, "text_tokens": n_text, "image_codes": n_img}
        if loss_fold is not None:
            out["loss"] = loss + self.hparams.fold_reconstruction_weight * loss_fold
            out["loss_fold_reconstruction"] = loss_fold
        return out

    def text_loss_mean(self, token_losses: Tensor, samples: Tensor, tasks: list[str] | None) -> Tensor:
        """L_text from the per-token losses and the sample of each token (`tasks[sample]` its task)."""
        if token_losses.numel() == 0:
            return token_losses.sum()
        if self.hparams.text_loss == "token" or not tasks:
            return token_losses.mean()
        names = sorted(set(tasks))
        task_of_sample = torch.tensor([names.index(t) for t in tasks], device=samples.device)
        task_of_token = task_of_sample[samples]
        # sums and counts by index_add (bincount and boolean indexing would read sizes back from the device)
        zeros = torch.zeros(len(names), device=token_losses.device, dtype=token_losses.dtype)
        counts = zeros.index_add(0, task_of_token, torch.ones_like(token_losses))
        sums = zeros.index_add(0, task_of_token, token_losses)
        return (sums / counts.clamp(min=1)).sum() / (counts > 0).sum()

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """The training/validation losses of a batch; steps call it through `self(batch)` so that FSDP2's
        root hooks (gather before, reduce-scatter after the backward) fire when the model is sharded."""
        return self.forward_losses(batch)

    # ------------------------------------------------------------------ Lightning hooks
    def configure_model(self) -> None:
        """FSDP2 sharding under `synergen_lightning.distributed.FSDP2Strategy` (or Lightning's
        ModelParallelStrategy); a no-op for single-device strategies. Runs after `setup`, so the stage's
        `requires_grad` and the loaded weights are in place before sharding (freeze before sharding)."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or is_sharded(self):
            return
        strategy = self.trainer.strategy if self._trainer is not None else None
        if "data_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError(f"SynerGenVL shards with FSDP only: the mesh has tensor_parallel_size "
                             f"{mesh['tensor_parallel'].size()}; use synergen_lightning.distributed.FSDP2Strategy "
                             "(data_parallel_size = world size, tensor_parallel_size = 1)")
        dp = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        if hasattr(strategy, "shard_mesh"):
            dp = strategy.shard_mesh(dp)  # HSDP when the strategy sets a shard_size
        parallelize(self, dp, **getattr(strategy, "parallelize_kwargs", {}))
        base = self.__dict__.pop("_base_llm_after_sharding", None)
        if base is not None:
            load_base_into_sharded(self, base_llm_rows(base))
            rank_zero_info(f"{self.stage}: trunk initialised from base LLM {base} (each rank read its own rows)")
        pending = self.__dict__.pop("_init_from_after_sharding", None)
        if pending is not None:
            load_sharded_into(self, pending)
            rank_zero_info(f"{self.stage}: initialised from {pending} (each rank read its own shards)")

    def setup(self, stage: str) -> None:
        self._check_data_geometry()
        if stage != "fit":
            return
        spec = get_stage(self.stage)
        if not self._stage_applied:
            apply_stage(self, spec)  # no StageCallback in the trainer: the hparam stage applies
        self._init_weights_for_fit(spec["name"])
        self._check_data_tokenizer()
        path = self.hparams.get("image_tokenizer")
        if path and Path(path).exists():
            _ = self.image_tokenizer  # fail at the start, not mid-run, on a codebook-size mismatch

    def _init_weights_for_fit(self, stage: str) -> None:
        hp = self.hparams
        if self.__dict__.get("_resuming"):  # `synergen fit --ckpt_path`: the checkpoint holds every weight
            rank_zero_info(f"{stage}: resuming: the weights come from the checkpoint (init_from / base_llm not loaded)")
            return
        if hp.get("init_from"):
            path = Path(hp.init_from)
            if not path.exists():
                raise FileNotFoundError(f"init_from {str(path)!r} does not exist: train the previous stage first "
                                        f"(e.g. `make stage1`) or fix model.init_from")
            self._check_init_from_geometry(path)
            if is_sharded_checkpoint(path) and getattr(self, "_device_mesh", None) is not None:
                # FSDP2: shard first, then every rank reads only its own shards (configure_model)
                self.__dict__["_init_from_after_sharding"] = path
                return
            state = read_state_dict(path)  # a .ckpt file, a sharded (FSDP2) checkpoint directory or an export
            result = self.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise ValueError(f"init_from {str(path)!r} does not match this model: missing {result.missing_keys[:5]}, "
                                 f"unexpected {result.unexpected_keys[:5]}; was it trained with the same recipe sizes?")
            rank_zero_info(f"{stage}: initialised from {path}")
            return
        if stage not in ("stage1", "full") and not hp.get("init_from_base_llm"):
            raise ValueError(f"stage {stage!r} needs the previous stage's weights: set model.init_from to its checkpoint "
                             "(e.g. runs/tiny/stage1/last.ckpt), or set model.init_from_base_llm: true to start from "
                             "the base LLM on purpose")
        if hp.get("base_llm") and getattr(self, "_device_mesh", None) is not None:
            # FSDP2: shard first, then every rank reads only its own rows of the base weights (configure_model)
            self.__dict__["_base_llm_after_sharding"] = hp.base_llm
        elif hp.get("base_llm"):
            self.load_base_weights(load_base_llm(hp.base_llm))
            rank_zero_info(f"{stage}: trunk initialised from base LLM {hp.base_llm}")
        if hp.get("code_embed_init", "random") == "codebook":
            self.init_code_embed_from_tokenizer()

    def _check_data_geometry(self) -> None:
        """The DataModule's view side and folded tokens per view, where its recipe sets them, must be the model's:
        otherwise every batch has the wrong number of image slots, or views of another scale (or Lightning stops
        later, when it logs both hyper-parameters). A DataModule that leaves them unset follows the model."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        theirs = getattr(dm, "hparams", None) or {}
        mine = {"image_size": int(self.hparams.image_size), "tokens_per_view": int(self.tokens_per_view)}
        why = {"image_size": f"the model reads {mine['image_size']}-px views",
               "tokens_per_view": f"the model folds each view into {mine['tokens_per_view']} tokens ((image_size "
                                  f"{mine['image_size']} / downsample {self.hparams.downsample})^2 / fold "
                                  f"{self.fold_size[0]}x{self.fold_size[1]})"}
        for key, value in mine.items():
            if theirs.get(key) is not None and int(theirs[key]) != value:
                raise ValueError(f"data.init_args.{key} {theirs[key]} does not match the model's {key} {value} "
                                 f"({why[key]}): remove {key} from the data recipe (the data then follows the model) "
                                 f"or set it to {value}")

    def _check_data_tokenizer(self) -> None:
        """The DataModule's text tokenizer must be the model's: same token -> id map. Otherwise the data's ids index
        the wrong embedding rows, quietly (e.g. a base LLM checkpoint whose relative tokenizer path resolves against
        another run's directory)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data_tok = getattr(dm, "tokenizer", None)
        if data_tok is None or not hasattr(data_tok, "tokenizer") or self.hparams.get("text_tokenizer") is None:
            return
        mine = self.text_tokenizer
        if mine is data_tok or not hasattr(mine, "tokenizer"):
            return
        ours, theirs = mine.tokenizer.get_vocab(with_added_tokens=True), data_tok.tokenizer.get_vocab(with_added_tokens=True)
        if ours != theirs:
            differ = sorted(set(ours.items()) ^ set(theirs.items()), key=str)[:3]
            raise ValueError(f"the data's text tokenizer {str(getattr(data_tok, 'dir', '?'))!r} ({len(theirs)} tokens) is not "
                             f"the model's {str(getattr(mine, 'dir', '?'))!r} ({len(ours)} tokens; differ e.g. {differ}): "
                             "point model.text_tokenizer and data.tokenizer at the same directory (the tiny recipes use "
                             "SYNERGEN_TINY_TEXT_TOKENIZER for both)")

    # hyper-parameters that change what a folded token means without changing any weight's shape: a stage started
    # from a checkpoint that disagrees on one of them would train quietly on scrambled image tokens
    GEOMETRY_HPARAMS = ("fold", "image_size", "downsample", "codebook_size")

    def _check_init_from_geometry(self, path: Path) -> None:
        ckpt = read_checkpoint_meta(path)
        step, of = ckpt.get("global_step"), ckpt.get("synergen_max_steps")
        if isinstance(step, int) and isinstance(of, int) and 0 < of and step < of:
            # e.g. the mid-run last.ckpt of a stage that was stopped: legitimate on purpose (a step-* ablation), never
            # by accident
            rank_zero_warn(f"init_from {str(path)!r} stopped at step {step} of its run's {of}: starting from an "
                           "unfinished run. To finish it first, resume it (`make stage1` / `make stage2` do; or "
                           f"`synergen fit --config <its recipe> --ckpt_path {path}`)")
        theirs = ckpt.get("hyper_parameters") or {}
        bad = [f"{k}: checkpoint {theirs[k]} vs recipe {self.hparams.get(k)}" for k in self.GEOMETRY_HPARAMS
               if k in theirs and theirs[k] is not None and self.hparams.get(k) is not None
               and _as_tuple(theirs[k]) != _as_tuple(self.hparams[k])]
        if bad:
            raise ValueError(f"init_from {str(path)!r} was trained with another image geometry ({'; '.join(bad)}): "
                             "its folded tokens mean something else here; use the same values as the previous stage")

    def init_code_embed_from_tokenizer(self) -> None:
        """The folder's code embedding from the principal components of each code's decoded pixels."""
        if self.hparams.get("image_tokenizer") is None and "_image_tokenizer" not in self.__dict__:
            raise ValueError("code_embed_init='codebook' needs model.image_tokenizer (it decodes every code); "
                             "set it or use code_embed_init='random'")
        tok = self.image_tokenizer
        k = self.folder.init_code_embed_from_patches(
            codebook_patches(tok, self.folder.codebook_size, int(self.hparams.downsample)))
        rank_zero_info(f"folder code embedding: {k} principal components of the decoded codebook")

    @torch.no_grad()
    def load_base_weights(self, base: MMoETransformer) -> None:
        """Copy a base LLM into the trunk; vision FFNs start as copies of the text FFNs; special rows re-copied."""
        trunk = self.llm.model
        if base.config.vocab_size < trunk.config.vocab_size:  # tokenizer added <boi> <eoi> <UNCOND>
            base.resize_token_embeddings(trunk.config.vocab_size)
        if base.config.vocab_size != trunk.config.vocab_size:
            raise ValueError(f"base LLM vocab {base.config.vocab_size} != the model's {trunk.config.vocab_size}: "
                             "build the model from the base LLM's config (leave model.llm unset)")
        mine = {k: tuple(v.shape) for k, v in trunk.state_dict().items()}
        bad = [k for k, v in base.state_dict().items() if k in mine and tuple(v.shape) != mine[k]]
        if bad:
            raise ValueError(f"base LLM shapes differ from model.llm at {bad[:3]}: make model.llm match the base "
                             "LLM's config.json (or leave it unset to read it from there)")
        sd = base.state_dict()
        if not base.vision_experts:
            sd = {k: v for k, v in sd.items() if ".vision_ffn." not in k}
        trunk.load_state_dict(sd, strict=base.vision_experts)
        trunk.init_vision_experts_from_text()
        self.special_embed.weight.copy_(trunk.embed_tokens.weight[self.special_ids])

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self(batch)
        self.nonfinite.note(out["loss"], batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=bs)
        self.log("train/loss_text", out["loss_text"], prog_bar=True, batch_size=bs)
        self.log("train/loss_image", out["loss_image"], prog_bar=True, batch_size=bs)
        if "loss_fold_reconstruction" in out:
            self.log("train/loss_fold_reconstruction", out["loss_fold_reconstruction"], batch_size=bs)
        counts = {"train/text_tokens": float(out["text_tokens"]), "train/image_codes": float(out["image_codes"])}
        tasks = batch.get("task") or []
        real = batch.get("attention_mask")
        # real tokens per sample, counted with the batch on the CPU: no read-back from the device
        sample_tokens = batch.get("sample_tokens") or batch.get("row_tokens")
        if sample_tokens is None:
            sample_tokens = real.sum(-1).tolist() if real is not None else [batch["input_ids"].shape[1]] * bs
        for task in ("generation", "understanding", "text"):
            counts[f"train/samples_{task}"] = float(sum(t == task for t in tasks))
            counts[f"train/tokens_{task}"] = float(sum(n for n, t in zip(sample_tokens, tasks) if t == task))
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:  # the micro-batch's counts over every rank: one all-reduce
            summed = trainer.strategy.reduce(torch.tensor(list(counts.values()), dtype=torch.float64,
                                                          device=self.device), reduce_op="sum")
            counts = dict(zip(counts, summed))
        self.log_dict(counts, batch_size=bs, reduce_fx="sum")
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self(batch)
        # a batch a rank reads again to run as many batches as the others (`ValStream`, capped validation over
        # several ranks) runs for the collectives and weighs nothing: each sample counts once
        weight = 0.0 if batch.get("val_repeat") else 1.0
        self.val_loss.update(out["loss"].detach(), weight=batch["input_ids"].shape[0] * weight)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True)
        # the components' metrics, token- and code-weighted over the epoch: a val batch holds one task, and the other
        # task's absent loss must not enter the mean as a 0
        self.llm.val_loss.update(out["loss_text"].detach(), weight=out["text_tokens"] * weight)
        self.head.val_loss.update(out["loss_image"].detach(), weight=out["image_codes"] * weight)
        self.log("val/loss_text", self.llm.val_loss, on_step=False, on_epoch=True)
        self.log("val/loss_image", self.head.val_loss, on_step=False, on_epoch=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        total = total_grad_norm(self.parameters())  # on the gradients' device, sharded or not
        if total is not None:
            self.log("train/grad_norm", total)
        # a NaN/inf loss or gradient on any rank: no update this step (every rank agrees; nonfinite.py). Under fp16's
        # GradScaler (precision 16-mixed) an inf gradient is the scaler's own overflow signal: it skips the step and
        # lowers its scale, often several steps in a row at the start, so only the loss counts there
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        self.nonfinite.check(self, total if scaler is None else None)
        self.log("train/skipped_nonfinite", float(self.nonfinite.skipped))

    def stage_settings(self, spec: dict) -> dict:
        """Optimizer settings of a stage: recipe values override the stage table."""
        hp = self.hparams
        lr = hp.lr.get(spec["name"], spec["lr"]) if isinstance(hp.lr, dict) else (hp.lr or spec["lr"])
        wd = hp.weight_decay if hp.weight_decay is not None else spec.get("weight_decay", 0.0)
        return {"lr": float(lr), "weight_decay": float(wd), "schedule": hp.schedule or spec.get("schedule", "constant"),
                "warmup_steps": int(hp.warmup_steps)}

    def configure_optimizers(self):
        """AdamW param groups per stage of `stage_history`, in the order a run with step-scheduled switches
        created them (so a resumed run's saved optimizer state fits), each with its stage's lr and schedule."""
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else None
        groups, lambdas, seen = [], [], set()
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        for start, name in self.stage_history:
            spec = get_stage(name)
            in_stage = {n for g in spec["trainable"] for n, _ in self.parameter_groups()[g]}
            named = [(n, p) for n, p in self.named_parameters() if n in in_stage and n in trainable and n not in seen]
            seen.update(n for n, _ in named)
            s = self.stage_settings(spec)
            scale = dict(self.hparams.get("lr_scale") or {})
            validate_groups(scale, PARAMETER_GROUPS)
            group_of = {n: g for g, members in self.parameter_groups().items() for n, _ in members}
            for factor in sorted({float(scale.get(group_of[n], 1.0)) for n, _ in named}, reverse=True):
                part = [(n, p) for n, p in named if float(scale.get(group_of[n], 1.0)) == factor]
                tag = spec["name"] if factor == 1.0 else f"{spec['name']}/x{factor:g}"
                new = optimizer_param_groups(part, s["lr"] * factor, s["weight_decay"], tag=tag)
                groups += new
                lambdas += [StageSchedule(s["schedule"], s["warmup_steps"], total, start_step=start,
                                          min_lr_ratio=self.hparams.min_lr_ratio)] * len(new)
        if not groups:
            raise ValueError(f"stage {self.stage!r} leaves no trainable parameter")
        optimizer = torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=tuple(self.hparams.betas), eps=self.hparams.eps,
                                      fused=False)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["synergen_stage_history"] = [list(x) for x in self.stage_history]
        checkpoint["synergen_skipped_nonfinite"] = int(self.nonfinite.skipped)
        if self._trainer is not None:  # the next stage warns when it starts from an unfinished run (global_step < this)
            checkpoint["synergen_max_steps"] = int(self.trainer.max_steps)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming a run: restore the stage (and its switches) before the optimizer is rebuilt; a flat-layout
        state dict (state_keys.py) is mapped to this model's keys before Lightning loads it."""
        if isinstance(checkpoint.get("state_dict"), dict):
            checkpoint["state_dict"] = current_keys(checkpoint["state_dict"])
        history = checkpoint.get("synergen_stage_history")
        if history:
            self.stage_history = [(int(s), str(n)) for s, n in history]
            apply_stage(self, self.stage_history[-1][1])
        self.nonfinite.skipped = int(checkpoint.get("synergen_skipped_nonfinite", 0))

    # ------------------------------------------------------------------ loading
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only=None, **kwargs):
        """The model of any checkpoint `synergen fit` or `synergen export` writes, in eval mode: a single-file
        `.ckpt` (one process, DDP), a sharded FSDP2 directory or an export directory (synergen_lightning/checkpoint.py).
        Keyword arguments override constructor arguments (e.g. `text_tokenizer`); the weights come from the checkpoint."""
        if hparams_file is not None:
            raise ValueError(f"hparams_file={str(hparams_file)!r}: a SynerGenVL checkpoint carries its own "
                             "hyper-parameters; pass overrides as keyword arguments (e.g. text_tokenizer=...)")
        return load_checkpoint_model(checkpoint_path, cls, map_location="cpu" if map_location is None else map_location,
                                     strict=True if strict is None else strict, **kwargs)

    # ------------------------------------------------------------------ inference (inference.py)
    def generate_images(self, prompts, num: int = 1, cfg_scale: float = 7.5, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None, seed: int | None = None, **kw):
        return generate_images(self, prompts, num=num, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed, **kw)

    def answer(self, images, questions, max_new_tokens: int = 32, **kw):
        return answer(self, images, questions, max_new_tokens=max_new_tokens, **kw)

    @property
    def text_tokenizer(self):
        tok = self.__dict__.get("_text_tokenizer")
        if tok is None:
            path = self.hparams.get("text_tokenizer")
            if path is None:
                raise ValueError("this model has no text_tokenizer: set model.text_tokenizer (a TextTokenizer directory)")
            tok = load_text_tokenizer(path)
            self.__dict__["_text_tokenizer"] = tok
        return tok

    def set_text_tokenizer(self, tokenizer) -> None:
        self.__dict__["_text_tokenizer"] = tokenizer


def load_synergen(path: str | Path, map_location: str | torch.device | None = "cpu", strict: bool = True,
                  text_tokenizer: str | Path | None = None, image_tokenizer: str | Path | None = None,
                  dtype: str | torch.dtype | None = None, **overrides) -> SynerGenVL:
    """The one loader of a trained SynerGenVL (every command, the eval room, `SynerGenVL.load_from_checkpoint`): eval
    mode, from any checkpoint form (synergen_lightning/checkpoint.py). `text_tokenizer` / `image_tokenizer` replace the
    tokenizer paths the checkpoint names (None or "": the checkpoint's); `overrides` replace other constructor
    arguments. The weights always come from `path`. `dtype`: "auto" (bf16 on a GPU that has it, else fp32), "bf16",
    "fp32", or None (fp32): the parameters' dtype (`checkpoint.inference_dtype`)."""
    tokenizers = {k: v for k, v in (("text_tokenizer", text_tokenizer), ("image_tokenizer", image_tokenizer)) if v}
    return load_checkpoint_model(path, SynerGenVL, map_location=map_location, strict=strict, dtype=dtype,
                                 **tokenizers, **overrides)
