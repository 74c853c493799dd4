"""`bench/standins_2b.py`: the stand-ins carry what the 2b recipes check them for (the trunk's vocabulary and the
reduced widths in InternLM2's layout, Emu3's codebook and downsampling through either image tokenizer) and name a bad
choice. The recipes' chain on them: tests/test_user_paths.py and `make gpu-check`."""

import pytest
import torch

from standins_2b import WIDTHS, env, make_2b_standins


@pytest.mark.parametrize("kind", ["emu3", "vq"])
def test_standins_load_as_the_recipes_read_them(kind, tmp_path):
    if kind == "emu3":
        pytest.importorskip("transformers")
    from synergen_lightning.hf_import import load_hf
    from synergen_lightning.image_tokenizer.loading import load_image_tokenizer

    variables = env(make_2b_standins(tmp_path, samples_per_source=2, image_tokenizer=kind))
    tok = load_image_tokenizer(variables["SYNERGEN_EMU3_TOKENIZER"], expected_codebook_size=32768)
    assert (tok.codebook_size, tok.downsample) == (32768, 8)
    assert tok.encode(torch.rand(2, 3, 64, 64)).shape == (2, 8, 8)
    trunk = load_hf(variables["SYNERGEN_BASE_LLM"])  # InternLM2's names and packed wqkv, read by the importer
    assert trunk.config.vocab_size == 92544 and trunk.config.hidden_size == WIDTHS["hidden_size"]
    assert trunk.config.num_kv_heads == WIDTHS["num_kv_heads"] and len(trunk.layers) == WIDTHS["num_layers"]
    shards = sorted(p.parent.name for p in (tmp_path / "data").glob("*/shards.txt"))
    assert len(shards) == 9  # every source of the three recipes


def test_an_unknown_image_tokenizer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'emu3' or 'vq'"):
        make_2b_standins(tmp_path, image_tokenizer="chameleon")
