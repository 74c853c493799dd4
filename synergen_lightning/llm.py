"""`MMoELLM`: the MMoE trunk as a LightningModule. On its own it trains text only (the tiny base LLM) and holds an
imported Hugging Face LLM; inside `SynerGenVL` it is the `llm` component: the system calls its pure
`MMoETransformer` (`.model`), takes its parameter groups (`parameter_groups`: vision FFNs, self-attention, the
rest) for the stage table and logs its validation metric (`val_loss`). Also `evaluate_text_skill`, the held-out text-skill
check other stages reuse to show they keep the base LLM's text ability (`synergen import-hf`, a Hugging Face
directory -> an MMoELLM checkpoint, is in export.py)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from synergen_lightning.checkpoint import save_checkpoint_file, save_own_hyperparameters
from synergen_lightning.hf_import import load_hf
from synergen_lightning.io import iter_jsonl
from synergen_lightning.models.config import LLMConfig, LLMConfigDict
from synergen_lightning.models.decoding import left_pad
from synergen_lightning.models.mmoe import MMoETransformer
from synergen_lightning.stages import StageSchedule, decay_split
from synergen_lightning.text_tokenizer import TextTokenizer, load_or_train

# name substrings the base LLM's AdamW never decays, beside every 1-D parameter
LLM_NO_DECAY = ("embed_tokens",)

TINY_CONFIG = dict(vocab_size=2048, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
                   intermediate_size=688, rope_theta=10000.0, max_position_embeddings=1024)


def resolve_llm_parts(init_args: dict) -> dict:
    """`MMoELLM`'s constructor arguments (a copy) with `config.vocab_size` set to the text tokenizer's, the BPE
    trained into `tokenizer_dir` from `bpe_train_files` first when that directory has none: the constructor then
    reads no file."""
    args = dict(init_args)
    if args.get("tokenizer_dir") is not None:
        tok = load_or_train(args["tokenizer_dir"], args.get("bpe_train_files"), args.get("bpe_vocab_size", 2048))
        args["config"] = {**(args.get("config") or {}), "vocab_size": tok.vocab_size}
    return args


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token CE in the HF convention: `labels[t]` is the target of the prediction at t-1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


class MMoELLM(L.LightningModule):
    def __init__(
        self,
        config: LLMConfigDict | None = None,
        tokenizer_dir: str | None = None,
        bpe_train_files: list[str] | None = None,
        bpe_vocab_size: int = 2048,
        vision_experts: bool = True,
        lr: float = 3e-3,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 50,
        skill_eval_jsonl: str | None = None,
        skill_eval_max: int = 200,
    ):
        """
        Args:
            config: LLMConfig fields (vocab_size, hidden_size, num_layers, num_heads, num_kv_heads,
                intermediate_size, rope_theta, rms_norm_eps, qkv_bias, tie_word_embeddings, ...);
                missing keys take the tiny defaults.
            tokenizer_dir: directory with tokenizer.json; `from_paths` (and `synergen fit`) sets vocab_size to the
                tokenizer's before the model is built. Loaded on first use (text-skill checks).
            bpe_train_files: if tokenizer_dir has no tokenizer.json, `from_paths` trains a BPE there on these files.
            bpe_vocab_size: vocabulary size of that BPE.
            vision_experts: build the vision FFNs (False: a plain dense Llama).
            lr: peak AdamW learning rate; linear warmup for `warmup_steps`, cosine to lr * min_lr_ratio.
            skill_eval_jsonl: {"prompt","answer"} lines scored by greedy decoding at each validation.
            skill_eval_max: at most this many of them.
        """
        init_locals = dict(locals())
        super().__init__()
        cfg = dict(TINY_CONFIG, **(config or {}))
        self._tokenizer: TextTokenizer | None = None
        self.model = MMoETransformer(LLMConfig(**cfg), vision_experts=vision_experts)
        save_own_hyperparameters(self, init_locals)
        self.hparams["config"] = asdict(self.model.config)  # the resolved config, so checkpoints rebuild it
        # token-weighted mean of the next-token loss over a validation epoch (the system logs it as val/loss_text)
        self.val_loss = MeanMetric()

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """The trunk's parameters in the stage table's groups (names relative to this module): the vision FFNs,
        the self-attention, and everything else (embeddings, text FFNs, norms, LM head) as the text backbone."""
        groups: dict[str, list] = {"vision_ffn": [], "self_attention": [], "text_backbone": []}
        for name, p in self.named_parameters():
            g = "vision_ffn" if ".vision_ffn." in name else "self_attention" if ".attn." in name else "text_backbone"
            groups[g].append((name, p))
        return groups

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_paths(cls, **init_args) -> MMoELLM:
        """The model a recipe's init args describe, its vocabulary read from `tokenizer_dir` first
        (`resolve_llm_parts`)."""
        return cls(**resolve_llm_parts(init_args))

    @property
    def tokenizer(self) -> TextTokenizer | None:
        """The text tokenizer of `tokenizer_dir`, loaded on first use (None without one)."""
        if self._tokenizer is None and self.hparams.get("tokenizer_dir") is not None:
            self._tokenizer = TextTokenizer(self.hparams.tokenizer_dir)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: TextTokenizer | None) -> None:
        self._tokenizer = tokenizer

    def setup(self, stage: str) -> None:
        tok = self.tokenizer
        if tok is not None and tok.vocab_size > self.model.config.vocab_size:
            raise ValueError(f"tokenizer_dir {self.hparams.tokenizer_dir!r} has {tok.vocab_size} tokens but the model's "
                             f"vocab_size is {self.model.config.vocab_size}: build it with MMoELLM.from_paths(...), "
                             "which reads the vocabulary from the tokenizer (`synergen fit` does)")

    @classmethod
    def from_hf(cls, hf_dir: str | Path, tokenizer_dir: str | None = None, **kwargs) -> MMoELLM:
        """Import a local HF Llama / Qwen2 / InternLM2 directory; with `tokenizer_dir`, the
        embedding and LM head grow to the tokenizer's vocabulary (new rows = mean of old rows)."""
        trunk = load_hf(hf_dir, vision_experts=kwargs.get("vision_experts", True))
        llm = cls(config=asdict(trunk.config), **kwargs)
        llm.model.load_state_dict(trunk.state_dict())
        if tokenizer_dir is not None:
            llm.tokenizer = TextTokenizer(tokenizer_dir)
            llm.model.resize_token_embeddings(max(llm.tokenizer.vocab_size, trunk.vocab_size))
            llm.hparams["tokenizer_dir"] = str(tokenizer_dir)
            llm.hparams["config"] = asdict(llm.model.config)
        return llm

    def save_checkpoint_file(self, path: str | Path) -> None:
        """A checkpoint `MMoELLM.load_from_checkpoint(path)` reads, without a Trainer."""
        save_checkpoint_file(self, path)

    # ---- forward / training -------------------------------------------------------------------
    def forward(self, input_ids: Tensor, image_mask=None, position_ids=None, attention_mask=None, kv_cache=None) -> Tensor:
        hidden = self.model(self.model.embed(input_ids), image_mask=image_mask, position_ids=position_ids,
                            attention_mask=attention_mask, kv_cache=kv_cache)
        return self.model.logits(hidden)

    def _loss(self, batch: dict) -> Tensor:
        logits = self(batch["input_ids"], image_mask=batch.get("image_mask"), position_ids=batch.get("position_ids"),
                      attention_mask=batch.get("attention_mask"))
        return lm_loss(logits, batch.get("labels", batch["input_ids"]))

    @staticmethod
    def supervised_tokens(batch: dict) -> int:
        """How many next-token targets `lm_loss` averages over in `batch`."""
        labels = batch.get("labels", batch["input_ids"])
        return int((labels[:, 1:] != -100).sum())

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_loss.update(self._loss(batch), weight=self.supervised_tokens(batch))
        self.log("val/loss", self.val_loss, prog_bar=True, on_step=False, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        if self.hparams.skill_eval_jsonl and self.tokenizer is not None and not self.trainer.sanity_checking:
            acc = evaluate_text_skill(self.model, self.tokenizer, self.hparams.skill_eval_jsonl,
                                      max_examples=self.hparams.skill_eval_max)
            self.log("val/skill_acc", acc, prog_bar=True)

    def configure_optimizers(self):
        # no weight decay on norms, biases (1-D) and the embedding table
        decay, no_decay = decay_split(((n, p) for n, p in self.named_parameters() if p.requires_grad), LLM_NO_DECAY)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=self.hparams.lr, betas=tuple(self.hparams.betas), fused=False)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = StageSchedule("cosine", min(self.hparams.warmup_steps, total), total,
                                 min_lr_ratio=self.hparams.min_lr_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def read_skill_jsonl(path: str | Path) -> list[dict]:
    rows = []
    for n, row in iter_jsonl(path):
        if not isinstance(row, dict) or "prompt" not in row or "answer" not in row:
            raise ValueError(f"{path} line {n}: a skill line needs 'prompt' and 'answer' keys; fix or delete that line")
        rows.append(row)
    return rows


@torch.no_grad()
def evaluate_text_skill(model, tokenizer: TextTokenizer, jsonl: str | Path, max_examples: int | None = None,
                        max_new_tokens: int = 16, batch_size: int = 64) -> float:
    """Exact-match accuracy of KV-cached greedy answers to held-out `{"prompt", "answer"}` lines.

    The prompt is fed as `<s> prompt` (as the corpus packs documents); the answer is the decoded
    continuation up to `</s>` or the first newline, whitespace-stripped. `model` is an
    `MMoETransformer` or anything with `.model` being one (`MMoELLM`)."""
    trunk = model.model if hasattr(model, "model") and isinstance(model.model, MMoETransformer) else model
    rows = read_skill_jsonl(jsonl)[:max_examples]
    if not rows:
        raise ValueError(f"{jsonl}: no skill lines to evaluate")
    was_training = trunk.training
    trunk.eval()
    device = next(trunk.parameters()).device
    correct = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        prompts = [[tokenizer.bos_id] + tokenizer.encode(r["prompt"]) for r in chunk]
        ids, mask = left_pad(prompts, tokenizer.pad_id, device=device)  # every row ends where generation starts
        out = trunk.generate_greedy(ids, max_new_tokens, eos_id=tokenizer.eos_id, attention_mask=mask).cpu()
        for row, gen in zip(chunk, out.tolist()):
            if tokenizer.eos_id in gen:
                gen = gen[: gen.index(tokenizer.eos_id)]
            text = tokenizer.decode(gen).strip().split("\n")[0].strip()
            correct += text == str(row["answer"]).strip()
    trunk.train(was_training)
    return correct / len(rows)
