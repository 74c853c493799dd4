"""LLMConfig field types: integers arrive as integers from any source (command line, YAML, checkpoints)."""

from pathlib import Path

import pytest
import yaml

from synergen_lightning.cli import lightning_cli
from synergen_lightning.models.config import LLMConfig

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


def test_numeric_strings_and_whole_floats_are_coerced():
    c = LLMConfig(**{**BASE, "num_layers": "4", "intermediate_size": 128.0, "rope_theta": "5e5",
                     "rms_norm_eps": "1.0e-5", "qkv_bias": "true", "tie_word_embeddings": 0, "head_dim": "16"})
    assert (c.num_layers, c.intermediate_size, c.head_dim) == (4, 128, 16)
    assert all(type(v) is int for v in (c.num_layers, c.intermediate_size, c.head_dim))
    assert (c.rope_theta, c.rms_norm_eps, c.qkv_bias, c.tie_word_embeddings) == (5e5, 1e-5, True, False)
    assert type(c.rope_theta) is float


@pytest.mark.parametrize("field,value", [("num_layers", "four"), ("num_layers", 4.5), ("num_layers", True),
                                         ("hidden_size", None), ("rope_theta", "x"), ("qkv_bias", "yes"),
                                         ("qkv_bias", 2)])
def test_bad_values_name_the_field_and_the_value(field, value):
    with pytest.raises(ValueError, match=rf"LLMConfig\.{field}={value!r}.*write it as one"):
        LLMConfig(**{**BASE, field: value})


def test_2b_cli_num_layers_override_arrives_as_an_int(capsys):
    """`synergen fit --config recipes/synergen_vl_2b/stage1.yaml --print_config --model.init_args.llm.num_layers 4`
    printed num_layers: '4' (a string) while `llm` was typed as a loose dict."""
    with pytest.raises(SystemExit) as exit_:
        lightning_cli(["fit", "--config", str(ROOT / "recipes/synergen_vl_2b/stage1.yaml"), "--print_config",
                       "--model.init_args.llm.num_layers", "4", "--model.init_args.llm.rope_theta", "5e5"])
    assert exit_.value.code in (0, None)
    llm = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["llm"]
    assert llm["num_layers"] == 4 and type(llm["num_layers"]) is int
    assert llm["rope_theta"] == 5e5 and llm["hidden_size"] == 2048 and llm["tie_word_embeddings"] is False


@pytest.mark.parametrize("override,error", [
    (["--model.init_args.llm.num_layer", "4"], "num_layer"),  # misspelt key
    (["--model.init_args.head", "{num_layers: four}"], "four"),
    (["--model.init_args.head", "{condition: all}"], "first', 'every"),
    (["--model.init_args.head", "{num_layer: 2}"], "num_layer"),
])
def test_a_bad_size_in_a_recipe_fails_at_parse_naming_it(override, error, capsys):
    with pytest.raises(SystemExit) as exit_:
        lightning_cli(["fit", "--config", str(ROOT / "recipes/synergen_vl_2b/stage1.yaml"), "--print_config"] + override)
    assert exit_.value.code == 2 and error in capsys.readouterr().err
