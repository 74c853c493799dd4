"""`model_parts.resolve_model_parts`: a recipe's paths become the constructor's parts (the base LLM's shape, the
text tokenizer's ids, the codebook), read here and checked against the files read directly; the constructor reads
no file and names the resolver when a part is missing; `synergen fit`'s CLI resolves before it builds the model;
the base LLM (`MMoELLM`) reads its tokenizer's vocabulary the same way."""

import json

import pytest
import torch

from synergen_lightning.cli import lightning_cli
from synergen_lightning.image_tokenizer.vq_tokenizer import VQTokenizer
from synergen_lightning.llm import MMoELLM
from synergen_lightning.model_parts import resolve_model_parts
from synergen_lightning.system import SynerGenVL
from tests.test_image_tokenizer import SMALL
from tests.test_system_helpers import HEAD


@pytest.fixture(scope="module")
def files(tiny_base):
    """The base LLM, its text tokenizer and an image tokenizer checkpoint, as `make` writes them."""
    vq = VQTokenizer(**SMALL)
    vq.save_checkpoint_file(tiny_base / "vq.ckpt")
    return tiny_base


def test_parts_come_from_the_files(files):
    base = torch.load(files / "base.ckpt", weights_only=False)["hyper_parameters"]
    tok = json.loads((files / "tok" / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    got = resolve_model_parts({"base_llm": str(files / "base.ckpt"), "image_tokenizer": str(files / "vq.ckpt")})
    assert got["text_tokenizer"] == base["tokenizer_dir"] == str(files / "tok")  # named by the base checkpoint
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
        assert got["llm"][field] == base["config"][field], field
    assert got["special_token_ids"]["boi"] == ids["<boi>"] and got["special_token_ids"]["uncond"] == ids["<UNCOND>"]
    assert (got["codebook_size"], got["downsample"]) == (SMALL["codebook_size"], 2 ** (len(SMALL["channel_multiplier"]) - 1))


def test_a_wider_tokenizer_widens_the_vocabulary_and_given_parts_are_kept(files):
    small = dict(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    got = resolve_model_parts({"llm": small, "text_tokenizer": str(files / "tok"), "codebook_size": 32,
                               "image_tokenizer": str(files / "nowhere.ckpt")})
    tok = json.loads((files / "tok" / "tokenizer.json").read_text())
    words = set(tok["model"]["vocab"].values()) | {t["id"] for t in tok["added_tokens"]}
    assert got["llm"]["vocab_size"] == len(words) > 100 == small["vocab_size"]  # a copy: the caller's dict unchanged
    assert got["codebook_size"] == 32  # given: the image tokenizer is not read (it does not exist)


@pytest.mark.parametrize("args,names", [({}, "`base_llm`"),
                                        ({"llm": {"vocab_size": 8}}, "`text_tokenizer`"),
                                        ({"llm": {"vocab_size": 8}, "special_token_ids": {}}, "`image_tokenizer`")])
def test_a_missing_part_names_its_argument(args, names):
    with pytest.raises(ValueError, match=names):
        resolve_model_parts(args)


def test_the_constructor_reads_no_file(files):
    with pytest.raises(ValueError, match="SynerGenVL.from_paths"):
        SynerGenVL(base_llm=str(files / "base.ckpt"), image_tokenizer=str(files / "vq.ckpt"))
    model = SynerGenVL.from_paths(base_llm=str(files / "base.ckpt"), image_tokenizer=str(files / "vq.ckpt"),
                                  image_size=16, fold=(2, 2), code_dim=8, head=HEAD)
    base = torch.load(files / "base.ckpt", weights_only=False)["hyper_parameters"]["config"]
    assert model.llm.model.config.vocab_size == base["vocab_size"] and model.hparams.text_tokenizer == str(files / "tok")
    # the tokenizers the resolver read are the model's (not loaded again on first use)
    assert {"_text_tokenizer", "_image_tokenizer"} <= set(model.__dict__)
    assert model.image_tokenizer.codebook_size == SMALL["codebook_size"] and model.text_tokenizer.boi_id == model.hparams.special_token_ids["boi"]


def test_the_cli_resolves_a_recipe_before_it_builds_the_model(files, tmp_path):
    recipe = {"model": {"class_path": "synergen_lightning.system.SynerGenVL",
                        "init_args": {"base_llm": str(files / "base.ckpt"), "image_tokenizer": str(files / "vq.ckpt"),
                                      "image_size": 16, "fold": [2, 2], "code_dim": 8, "head": HEAD}},
              "data": {"class_path": "lightning.pytorch.demos.boring_classes.BoringDataModule"},
              "trainer": {"logger": False, "default_root_dir": str(tmp_path)}}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    cli = lightning_cli(["--config", str(tmp_path / "r.yaml")], run=False)
    assert cli.model.hparams.llm["hidden_size"] == 32 and cli.model.hparams.codebook_size == SMALL["codebook_size"]
    assert cli.model.hparams.special_token_ids == resolve_model_parts(recipe["model"]["init_args"])["special_token_ids"]


def test_the_base_llm_reads_its_tokenizer_before_it_is_built(files, tmp_path):
    """MMoELLM: the constructor touches no file (its tokenizer loads on first use); `from_paths` trains the BPE into
    an empty `tokenizer_dir` and takes its vocabulary; a model narrower than its tokenizer is refused at fit start."""
    sizes = dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64)
    MMoELLM(config={**sizes, "vocab_size": 50}, tokenizer_dir=str(tmp_path / "nowhere"))
    assert not (tmp_path / "nowhere").exists()
    llm = MMoELLM.from_paths(config=sizes, tokenizer_dir=str(tmp_path / "tok"), bpe_train_files=[str(files / "corpus.jsonl")],
                             bpe_vocab_size=300)
    vocab = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]["vocab"]
    assert llm.model.config.vocab_size == llm.tokenizer.vocab_size >= len(vocab)
    narrow = MMoELLM(config={**sizes, "vocab_size": 50}, tokenizer_dir=str(tmp_path / "tok"))
    with pytest.raises(ValueError, match=r"has \d+ tokens but the model's vocab_size is 50: .*MMoELLM.from_paths"):
        narrow.setup("fit")
