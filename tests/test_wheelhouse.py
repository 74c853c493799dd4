"""`make wheelhouse`'s list (bench/wheelhouse.py): with a torch GPU image's packages, it covers every dependency of
the toolkit and of the wheels themselves, so an offline node meets no missing import."""

import sys
from importlib.metadata import requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def needs(req: Requirement) -> set[str]:
    """The distributions `req` brings in: its own and, from its installed metadata, those of it and of its extras."""
    found = {canonicalize_name(req.name)}
    for line in requires(req.name) or []:
        r = Requirement(line)
        if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
            found.add(canonicalize_name(r.name))
    return found


def test_the_wheelhouse_and_the_image_cover_every_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from wheelhouse import IMAGE_HOLDS, WHEELHOUSE

    wheels = {canonicalize_name(n) for n in WHEELHOUSE}
    covered = wheels | {canonicalize_name(n) for n in IMAGE_HOLDS}
    toolkit = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    missing = {canonicalize_name(r.name) for r in toolkit} - covered
    assert not missing, f"add to WHEELHOUSE (or IMAGE_HOLDS, if torch images ship it): {sorted(missing)}"
    # what the wheels need, and what the toolkit's extras (jsonargparse[signatures,omegaconf]) need
    brought = set().union(*(needs(r) for r in toolkit if canonicalize_name(r.name) in wheels))
    brought |= set().union(*(needs(Requirement(n)) for n in wheels))
    assert brought - covered == set(), f"the wheels need {sorted(brought - covered)}: add them to WHEELHOUSE"
    assert {"docstring-parser", "typeshed-client", "omegaconf"} <= brought  # the extras were really read
    unneeded = {canonicalize_name(n) for n in IMAGE_HOLDS} - brought - {canonicalize_name(r.name) for r in toolkit}
    assert not unneeded, f"IMAGE_HOLDS names what nothing needs: {sorted(unneeded)}"
