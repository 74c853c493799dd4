"""`TextTokenizer`: a Hugging Face `tokenizer.json` (tokenizers library) + the special tokens of
SynerGen-VL + InternLM2's chat template; `train_bpe` builds the tiny default from a corpus."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

# attribute name -> token; added (as special tokens) when the loaded tokenizer lacks them
SPECIAL_TOKENS = {
    "bos": "<s>",
    "eos": "</s>",
    "pad": "<pad>",
    "boi": "<boi>",
    "eoi": "<eoi>",
    "uncond": "<UNCOND>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
}


class TextTokenizer:
    """Text <-> ids. `encode` adds no special tokens; ids of the specials are attributes
    (`bos_id`, `eos_id`, `pad_id`, `boi_id`, `eoi_id`, `uncond_id`, `im_start_id`, `im_end_id`)."""

    def __init__(self, tokenizer_dir: str | Path):
        path = Path(tokenizer_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing; pass a directory holding a Hugging Face tokenizer.json, or build one with "
                "`synergen data train-bpe --text data/tiny/text/train.jsonl --out DIR`"
            )
        self.dir = Path(tokenizer_dir)
        self.tokenizer = Tokenizer.from_file(str(path))
        self.base_vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        missing = [t for t in SPECIAL_TOKENS.values() if self.tokenizer.token_to_id(t) is None]
        # special=True: never split, and skipped by decode(skip_special_tokens=True)
        self.tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        self.added_tokens = missing
        for name, tok in SPECIAL_TOKENS.items():
            setattr(self, f"{name}_id", self.tokenizer.token_to_id(tok))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    # InternLM2's chat template (the paper's):
    # <s><|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}<|im_end|></s>
    def chat_prompt_ids(self, user: str) -> list[int]:
        """Ids up to and including `<|im_start|>assistant\\n` (what generation is conditioned on)."""
        return ([self.bos_id, self.im_start_id] + self.encode(f"user\n{user}") + [self.im_end_id]
                + self.encode("\n") + [self.im_start_id] + self.encode("assistant\n"))

    def chat_answer_ids(self, assistant: str) -> list[int]:
        return self.encode(assistant) + [self.im_end_id, self.eos_id]

    def encode_chat(self, user: str, assistant: str) -> tuple[list[int], int]:
        """(ids, n_prompt): the whole turn and how many leading ids are prompt (unsupervised)."""
        prompt = self.chat_prompt_ids(user)
        return prompt + self.chat_answer_ids(assistant), len(prompt)

    @staticmethod
    def chat_text(user: str, assistant: str | None = None) -> str:
        text = f"<s><|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        return text if assistant is None else text + f"{assistant}<|im_end|></s>"

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(out / "tokenizer.json"))
        return out


def iter_corpus_text(files) -> Iterator[str]:
    """Texts of `.jsonl` files (`{"text": ...}` or `{"prompt", "answer"}` lines) or plain `.txt` lines."""
    for f in files:
        f = Path(f)
        if not f.is_file():
            raise FileNotFoundError(f"{f}: corpus file missing; run `make data` or pass existing files")
        with f.open() as fh:
            for n, line in enumerate(fh, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if f.suffix == ".jsonl":
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{f}:{n}: not valid JSON ({e}); each line must be one JSON object") from e
                    if "text" in row:
                        yield row["text"]
                    elif "prompt" in row and "answer" in row:
                        yield f"{row['prompt']} {row['answer']}"
                    else:
                        raise ValueError(f"{f}:{n}: expected a 'text' key (or 'prompt' and 'answer'), got {sorted(row)}")
                else:
                    yield line


def train_bpe(text_files, vocab_size: int, out_dir: str | Path, min_frequency: int = 2) -> TextTokenizer:
    """Train a byte-level BPE on the corpus, with the special tokens first (ids 0..7).

    Digits are pre-split one per token (as Llama / Qwen2 / InternLM2 do), so "37" is `3`,`7`: the
    model sees each number's digits and can learn comparison compositionally instead of memorising
    one whole-number token per value (measured on the tiny skill: see recipes/tiny/base_llm.yaml).
    Every encoded segment starts a word, so chat answers are the corpus's word tokens."""
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small for byte-level BPE (256 byte symbols + specials); use >= 300")
    tok = Tokenizer(models.BPE())
    # A word opening a segment is the same token as mid-sentence ("yellow" -> `Ġyellow`, as SentencePiece's
    # dummy prefix does for Llama / InternLM2): a chat answer, encoded right after `assistant\n`, then reuses
    # the token the base LLM learnt in "A: yellow" instead of rare pieces (`ye`,`llow`) it never saw.
    # ByteLevel runs first so its prefix space is added once per segment, not once per digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=True),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    # ...and decoding drops that one added space again, so decode(encode(text)) == text
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    texts = [0]

    def counted():
        for text in iter_corpus_text(text_files):
            texts[0] += 1
            yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    if not texts[0]:  # a vocabulary of bytes and specials alone would pass for a tokenizer
        raise ValueError(f"the corpus {[str(f) for f in text_files]} holds no text: give .jsonl files of "
                         "{'text': ...} lines or .txt files with text")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return TextTokenizer(out)


def load_or_train(tokenizer_dir: str | Path, text_files=None, vocab_size: int = 2048) -> TextTokenizer:
    """Load `tokenizer_dir/tokenizer.json`, training the BPE there first if it is missing and files are given."""
    if not (Path(tokenizer_dir) / "tokenizer.json").is_file() and text_files:
        return train_bpe(text_files, vocab_size, tokenizer_dir)
    return TextTokenizer(tokenizer_dir)


def train_bpe_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="synergen data train-bpe",
                                description="Train the tiny default byte-level BPE tokenizer (tokenizer.json) on a text corpus.")
    p.add_argument("--text", nargs="+", required=True, help="corpus files: .jsonl ({'text': ...} lines) or .txt")
    p.add_argument("--vocab-size", type=int, default=2048, help="target vocabulary size including the special tokens")
    p.add_argument("--out", required=True, help="output directory (tokenizer.json is written there)")
    args = p.parse_args(argv)
    tok = train_bpe(args.text, args.vocab_size, args.out)
    print(f"wrote {Path(args.out) / 'tokenizer.json'}: vocab_size={tok.vocab_size}")
    return 0
