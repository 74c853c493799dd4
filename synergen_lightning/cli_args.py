"""Option checks the commands share, in argparse's terms: each bad value is the option's one-line error, given
before any model loads. Imports nothing heavy until called, so `--help` stays instant."""

from __future__ import annotations

import argparse


def device_arg(device: str) -> str:
    """--device: "auto" is cuda when available, else cpu (argparse converts the default only after --help); a name
    torch does not know, or a GPU that is not visible, is the option's one-line error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(device)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{device!r} is not a torch device: give auto, cpu, cuda or cuda:N") from None
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise argparse.ArgumentTypeError(f"{device!r}: {seen} CUDA GPU(s) visible here; give cpu, or auto (cuda "
                                         "when there is one)")
    return device


def check_at_least_one(p: argparse.ArgumentParser, a: argparse.Namespace, *names: str) -> None:
    """Stop with the parser's one-line error for each named integer option below 1."""
    for name in names:
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)} must be >= 1")
