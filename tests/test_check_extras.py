"""`make check-extras` (bench/check_extras.py): what counts as an extra changing the toolkit's pins, on pip's
`--dry-run --report` format. The check itself builds a fresh virtualenv (minutes, downloads): `make check-extras`."""

import re
from pathlib import Path

from check_extras import DEFAULT_TORCH, canonical, changes, guarded, verdict

ROOT = Path(__file__).resolve().parents[1]


def _report(*pairs):
    return {"version": "1", "install": [{"metadata": {"name": n, "version": v}, "requested": False} for n, v in pairs]}


def test_pins_are_torch_and_the_projects_dependencies():
    # as importlib.metadata.requires lists them
    pins = guarded(["torch<2.15,>=2.11", "jsonargparse[omegaconf,signatures]>=4.32", "Torch-Fidelity>=0.3", "numpy"],
                   DEFAULT_TORCH)
    assert pins == {"torch", "torchvision", "jsonargparse", "torch-fidelity", "numpy"}
    # the Makefile installs, and checks, the same torch build
    make_torch = re.search(r"^TORCH\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1).strip()
    assert make_torch == DEFAULT_TORCH


def test_a_changed_pin_fails_and_other_changes_are_listed():
    installed = {"torch": "2.14.1", "protobuf": "7.36.2", "numpy": "2.4.6", "tensorboard": "2.21.0"}
    pins = {"torch", "numpy", "tensorboard"}
    report = _report(("synergen-lightning", "0.1.0"), ("Protobuf", "6.33.6"), ("lmms_eval", "0.7.3"),
                     ("torch", "2.14.1"), ("numpy", "1.26.4"))
    found = changes(report, installed, "synergen-lightning")
    assert found == [("lmms-eval", None, "0.7.3"), ("numpy", "2.4.6", "1.26.4"), ("protobuf", "7.36.2", "6.33.6")]
    assert verdict(found, pins) == (["numpy 2.4.6 -> 1.26.4"], ["protobuf 7.36.2 -> 6.33.6"], 1)
    # nothing of the pins touched: ok, however many packages come new
    ok = changes(_report(("protobuf", "6.33.6"), ("wandb", "0.25.0")), installed, "synergen-lightning")
    assert verdict(ok, pins) == ([], ["protobuf 7.36.2 -> 6.33.6"], 1)
    assert canonical("Torch_Fidelity") == "torch-fidelity"
