"""TextTokenizer: specials, chat template, BPE training, loading a foreign tokenizer.json."""

import json
import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from synergen_lightning.text_tokenizer import SPECIAL_TOKENS, TextTokenizer, train_bpe

CORPUS = [f"the {c} {s} is on the {p} of the picture." for c in ("red", "green", "blue", "yellow")
          for s in ("circle", "square", "triangle") for p in ("left", "right", "top")]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS * 3))
    return train_bpe([d / "train.jsonl"], 320, d / "out")


def test_bpe_round_trip_and_special_ids(tok):
    assert tok.vocab_size <= 320 and tok.vocab_size > 264
    for text in CORPUS[:5] + ["unseen wörds 123 ✓"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    # merges were learnt: a frequent word is fewer tokens than bytes
    assert len(tok.encode(" triangle")) < len(" triangle")
    ids = {name: getattr(tok, f"{name}_id") for name in SPECIAL_TOKENS}
    assert sorted(ids.values()) == list(range(8))  # trained first
    assert tok.encode("<boi>") == [tok.boi_id] and tok.decode([tok.boi_id, tok.eoi_id]) == ""
    assert tok.encode("a") != [tok.bos_id] and tok.bos_id not in tok.encode("hello")  # encode adds no specials


def test_bpe_splits_numbers_into_single_digits(tmp_path):
    """Even when whole numbers are frequent (they would merge in a plain byte-level BPE), every digit
    is its own token, so number skills can be learnt digit by digit."""
    lines = [f"Q: which is larger, {a} or {b}? A: {max(a, b)}" for a in range(100) for b in range(0, 100, 7)]
    (tmp_path / "c.txt").write_text("\n".join(lines))
    tok = train_bpe([tmp_path / "c.txt"], 1024, tmp_path / "o")
    pieces = [tok.tokenizer.id_to_token(i) for i in tok.encode("Q: which is larger, 37 or 152? A: 52")]
    assert [p for p in pieces if any(ch.isdigit() for ch in p)] == ["3", "7", "1", "5", "2", "5", "2"], pieces
    assert len(tok.encode(" larger")) == 1  # words still merge
    for text in lines[:50] + ["x=2024, y=-3.5e10"]:
        assert tok.decode(tok.encode(text)) == text


def _drop_segment_spaces(text: str) -> str:
    """Our BPE opens every encoded segment with a word space (like SentencePiece after a special token)."""
    return re.sub(r"(?<=[>\n]) ", "", text)


def test_chat_template_matches_internlm2_text(tok):
    ids, n_prompt = tok.encode_chat("What color is it?", "red")
    assert _drop_segment_spaces(tok.decode(ids, skip_special_tokens=False)) == TextTokenizer.chat_text("What color is it?", "red")
    assert _drop_segment_spaces(tok.decode(ids[:n_prompt], skip_special_tokens=False)) == TextTokenizer.chat_text("What color is it?")
    assert ids[-2:] == [tok.im_end_id, tok.eos_id] and ids[0] == tok.bos_id


def test_foreign_tokenizer_gets_missing_specials_appended(tmp_path):
    vocab = {"[UNK]": 0, "<s>": 1, "hello": 2, "world": 3}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer(tmp_path)
    assert tok.bos_id == 1  # already there: reused
    assert tok.vocab_size == 4 + 7 and tok.base_vocab_size == 4
    assert {tok.eos_id, tok.pad_id, tok.boi_id, tok.eoi_id, tok.uncond_id, tok.im_start_id, tok.im_end_id} == set(range(4, 11))
    assert tok.encode("hello <UNCOND> world") == [2, tok.uncond_id, 3]


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json: missing.*train-bpe"):
        TextTokenizer(tmp_path)
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_bpe([], 100, tmp_path)


def test_train_bpe_cli(tmp_path):
    from synergen_lightning.cli import main

    (tmp_path / "c.txt").write_text("\n".join(CORPUS))
    assert main(["data", "train-bpe", "--text", str(tmp_path / "c.txt"), "--vocab-size", "300", "--out", str(tmp_path / "o")]) == 0
    assert TextTokenizer(tmp_path / "o").decode(TextTokenizer(tmp_path / "o").encode(CORPUS[0])) == CORPUS[0]
    (tmp_path / "empty.txt").write_text("\n\n")
    assert main(["data", "train-bpe", "--text", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "e")]) == 2
    assert not (tmp_path / "e").exists()


def test_chat_answer_reuses_the_corpus_word_token(tok):
    """An answer right after `assistant\n` is the token the corpus has mid-sentence ("... on the left"),
    not rarer word pieces: the base LLM's knowledge of answer words carries over to chat answers."""
    ids, n_prompt = tok.encode_chat("Where is it?", "left")
    assert ids[n_prompt:-2] == tok.encode("left") == tok.encode(" left")
    assert tok.encode("is on the left")[-1:] == tok.encode("left")
    assert len(tok.encode("left")) == 1 and tok.decode(tok.encode("left")) == "left"
    assert tok.encode("37") == tok.encode(" 37") and len(tok.encode("37")) == 3  # one space, then one digit each
