"""`LLMConfig`: the Llama / Qwen2 micro-architecture of a trunk or an unfolding head, with every field checked and
typed whatever its source (a recipe, the command line, a HF config.json, a checkpoint)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Literal, TypedDict, get_type_hints


class HeadConfigDict(TypedDict, total=False):
    """The unfolding head's blocks (unset keys follow the LLM) and how h_i enters them (`UnfoldingHead`)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    condition: Literal["first", "every"]


@dataclass
class LLMConfig:  # Llama / Qwen2 micro-architecture
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    head_dim: int | None = None  # None: hidden_size // num_heads (some HF models set it explicitly)

    def __post_init__(self):
        self._coerce_types()
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LLMConfig.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (GQA)")

    _INT_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                   "max_position_embeddings", "head_dim")
    _FLOAT_FIELDS = ("rope_theta", "rms_norm_eps")
    _BOOL_FIELDS = ("qkv_bias", "tie_word_embeddings")

    def _coerce_types(self) -> None:
        """Integers as int, floats as float, flags as bool, whatever the source (a command line may hand over '4');
        a value that is none of these raises, naming the field, the value and the fix."""
        def bad(name, value, want, example):
            return ValueError(f"LLMConfig.{name}={value!r} ({type(value).__name__}) is not {want}; "
                              f"write it as one, e.g. {name}: {example}")

        for name in self._INT_FIELDS:
            v = getattr(self, name)
            if v is None and name == "head_dim":
                continue
            if isinstance(v, str):
                try:
                    v = float(v.strip())  # '4' and '4.0' (what a YAML/CLI round trip may give)
                except ValueError:
                    raise bad(name, getattr(self, name), "an integer", 4) from None
            if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) and float(v).is_integer():
                v = int(v)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise bad(name, getattr(self, name), "an integer", 4)
            setattr(self, name, int(v))
        for name in self._FLOAT_FIELDS:
            v = getattr(self, name)
            try:
                if isinstance(v, bool):
                    raise ValueError
                setattr(self, name, float(v))
            except (TypeError, ValueError):
                raise bad(name, v, "a number", "1.0e-6" if name == "rms_norm_eps" else "10000.0") from None
        for name in self._BOOL_FIELDS:
            v = getattr(self, name)
            if isinstance(v, str) and v.strip().lower() in ("true", "false"):
                v = v.strip().lower() == "true"
            elif isinstance(v, numbers.Integral) and v in (0, 1):
                v = bool(v)
            if not isinstance(v, bool):
                raise bad(name, v, "true or false", "true")
            setattr(self, name, v)


# An LLMConfig or a head's sizes as recipes write them (`llm: {...}`, `--model.init_args.llm.num_layers 4`): typed
# dicts, so jsonargparse checks every key and value (a misspelt key or `num_layers: four` fails naming the recipe key)
# and hands over numbers and flags, while checkpoints keep plain dicts (weights-only loadable)
LLMConfigDict = TypedDict("LLMConfigDict", get_type_hints(LLMConfig), total=False)
