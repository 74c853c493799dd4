"""`TextDataModule`: a text corpus (`{"text": ...}` jsonl lines) tokenized with the `TextTokenizer`
and packed into fixed-length sequences for next-token training of the trunk."""

from __future__ import annotations

import random

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from synergen_lightning.text_tokenizer import TextTokenizer, iter_corpus_text, load_or_train


def pack_documents(docs: list[list[int]], seq_len: int, bos_id: int, eos_id: int,
                   whole_documents: bool = False, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`<s> doc </s>` back to back in rows of `seq_len` -> (input_ids, labels), both long[rows, seq_len].

    whole_documents=False: one stream cut every `seq_len` tokens (the ragged tail is dropped), labels = ids.
    whole_documents=True: a document that does not fit the rest of a row starts the next one, so a question never
    loses the passage it asks about; the rest of the row is `pad_id` with label -100. Documents longer than a row
    are still cut."""
    if not whole_documents:
        flat = [t for d in docs for t in ([bos_id] + d + [eos_id])]
        n = len(flat) // seq_len
        if n == 0:
            raise ValueError(f"the corpus has {len(flat)} tokens, fewer than one sequence of seq_len={seq_len}; "
                             "lower seq_len or add text")
        ids = torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)
        return ids, ids.clone()
    rows: list[list[int]] = []
    row: list[int] = []
    for d in docs:
        doc = [bos_id] + d + [eos_id]
        if row and len(row) + len(doc) > seq_len:
            rows.append(row)
            row = []
        while len(doc) > seq_len:  # longer than a row: cut, as the stream packing does
            rows.append(doc[:seq_len])
            doc = doc[seq_len:]
        row += doc
    if row:
        rows.append(row)
    if not rows:
        raise ValueError("the corpus has no documents to pack; add text")
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(r)
    return ids, labels


class PackedTextDataset(Dataset):
    def __init__(self, rows: torch.Tensor, labels: torch.Tensor | None = None):
        self.rows = rows
        self.labels = rows if labels is None else labels

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int) -> dict:
        ids = self.rows[i]
        return {"input_ids": ids, "labels": self.labels[i], "attention_mask": torch.ones_like(ids, dtype=torch.bool),
                "task": "text"}


class TextDataModule(L.LightningDataModule):
    def __init__(
        self,
        train_files: list[str],
        val_files: list[str] | None = None,
        tokenizer_dir: str = "runs/tiny/text_tokenizer",
        bpe_vocab_size: int = 2048,
        seq_len: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        train_repeats: list[int] | None = None,
        shuffle_seed: int = 0,
        whole_documents: bool = False,
    ):
        """
        Args:
            train_files: corpus files (`.jsonl` with {"text": ...} lines, or `.txt`).
            val_files: held-out corpus files for val/loss.
            tokenizer_dir: tokenizer.json directory; trained there on train_files if missing.
            bpe_vocab_size: vocabulary size of that BPE.
            seq_len: tokens per packed training row.
            train_repeats: how many times each of `train_files` is included (oversampling: e.g. a
                skill file listed after the main corpus with 3 triples its share of the tokens).
            shuffle_seed: the training documents are shuffled with this seed before packing, so
                repeated files spread over all rows instead of filling the last ones.
            whole_documents: start a row rather than cut a document that does not fit (padding unsupervised), so a
                passage and the question about it stay in one row (`pack_documents`).
        """
        super().__init__()
        if train_repeats is not None:
            if len(train_repeats) != len(train_files):
                raise ValueError(f"train_repeats={train_repeats} has {len(train_repeats)} entries for "
                                 f"{len(train_files)} train_files; give one repeat count per file")
            if any(not isinstance(r, int) or r < 0 for r in train_repeats):
                raise ValueError(f"train_repeats={train_repeats}: each must be an integer >= 0 (0 drops the file)")
        self.save_hyperparameters()
        self.tokenizer: TextTokenizer | None = None

    @property
    def batch_size(self) -> int:
        """Rows per step and process (a data-parallel strategy with `global_batch_size` sets it per rank)."""
        return int(self.hparams.batch_size)

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.hparams.batch_size = int(value)

    def prepare_data(self) -> None:
        load_or_train(self.hparams.tokenizer_dir, self.hparams.train_files, self.hparams.bpe_vocab_size)

    def _rows(self, files, repeats=None, shuffle_seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        docs = []
        for f, k in zip(files, repeats or [1] * len(files)):
            docs += self.tokenizer.encode_batch(list(iter_corpus_text([f]))) * k
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(docs)
        return pack_documents(docs, self.hparams.seq_len, self.tokenizer.bos_id, self.tokenizer.eos_id,
                              whole_documents=self.hparams.whole_documents, pad_id=self.tokenizer.pad_id)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_or_train(self.hparams.tokenizer_dir, self.hparams.train_files, self.hparams.bpe_vocab_size)
            self.train_set = PackedTextDataset(*self._rows(self.hparams.train_files, self.hparams.train_repeats,
                                                           self.hparams.shuffle_seed))
            self.val_set = PackedTextDataset(*self._rows(self.hparams.val_files)) if self.hparams.val_files else None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self):
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.hparams.num_workers)
