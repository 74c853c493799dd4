"""The key layout of a `SynerGenVL` state dict, and the map from the flat layout.

The trunk's and the head's weights sit inside their component LightningModules: `llm.model.<trunk key>` and
`head.model.<head key>`. Checkpoints of the flat layout (`llm.<trunk key>`, `head.<head key>`: a system that held the
pure modules directly) load too: every reader of a checkpoint maps its keys here first.
"""

from __future__ import annotations

COMPONENTS = ("llm", "head")  # the component LightningModules whose pure module is their `.model`


def current_key(key: str) -> str:
    """A flat-layout key in the component layout; any other key unchanged."""
    component, _, rest = key.partition(".")
    if component in COMPONENTS and rest and not rest.startswith("model."):
        return f"{component}.model.{rest}"
    return key


def flat_key(key: str) -> str:
    """A component-layout key in the flat layout (the inverse of `current_key`)."""
    component, _, rest = key.partition(".")
    if component in COMPONENTS and rest.startswith("model."):
        return f"{component}.{rest[len('model.'):]}"
    return key


def is_flat(keys) -> bool:
    """Whether a checkpoint's model keys are of the flat layout (some component key lacks the `.model` level)."""
    return any(current_key(k) != k for k in keys)


def current_keys(state: dict) -> dict:
    """A state dict (or {key: shape}) in the component layout, whichever layout it was saved in."""
    return {current_key(k): v for k, v in state.items()} if is_flat(state) else state
