"""`make check-extras`: installing an optional extra keeps torch, torchvision and the toolkit's own dependencies.

In a fresh virtualenv (outside the repository, removed afterwards unless `--venv DIR` names one to keep) this
installs what `make install` installs first (torch and torchvision at the Makefile's pins, then the toolkit without
extras), then asks pip what installing each extra would do (`pip install --dry-run --report`): every extra alone,
and all of them together. It fails when the answer changes the installed version of torch, torchvision or a package
of `project.dependencies`; the other packages an extra would change (a downgrade of a dependency of a dependency,
say) are listed, not failed.

    .venv/bin/python bench/check_extras.py [--torch "torch==2.14.1 torchvision==0.29.1"] [--extras dev,lmms-eval]
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TORCH = "torch==2.14.1 torchvision==0.29.1"
# run in the virtualenv: the installed toolkit's name, its dependencies without the extras' and its extras
PROJECT_METADATA = """
import importlib.metadata as m, json
d = m.metadata("synergen-lightning")
print(json.dumps({"name": d["Name"], "extras": d.get_all("Provides-Extra") or [],
                  "requires": [r for r in m.requires("synergen-lightning") or [] if "extra ==" not in r]}))
"""


def canonical(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def guarded(requirements: list[str], torch_spec: str) -> set[str]:
    """The packages an extra must not change: torch, torchvision and every `project.dependencies` entry."""
    return {requirement_name(r) for r in [*shlex.split(torch_spec), *requirements]}


def changes(report: dict, installed: dict[str, str], project: str) -> list[tuple[str, str | None, str]]:
    """(name, installed version or None, version pip would install) of every package a dry-run report installs."""
    out = []
    for item in report.get("install", []):
        name, version = canonical(item["metadata"]["name"]), item["metadata"]["version"]
        if name != project and installed.get(name) != version:
            out.append((name, installed.get(name), version))
    return sorted(out)


def verdict(found: list[tuple[str, str | None, str]], pins: set[str]) -> tuple[list[str], list[str], int]:
    """(changed pins, other changed packages, count of new packages) of one extra's changes."""
    broken = [f"{n} {old} -> {new}" for n, old, new in found if n in pins and old is not None]
    broken += [f"{n} (not installed) -> {new}" for n, old, new in found if n in pins and old is None]
    other = [f"{n} {old} -> {new}" for n, old, new in found if n not in pins and old is not None]
    return broken, other, sum(1 for n, old, _ in found if n not in pins and old is None)


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"check-extras: `{shlex.join(cmd)}` failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="check_extras", description=__doc__.split("\n\n")[0])
    p.add_argument("--torch", default=DEFAULT_TORCH, help="the torch pins `make install` installs first")
    p.add_argument("--extras", help="comma-separated extras to check (default: every optional extra)")
    p.add_argument("--venv", help="build the virtualenv here and keep it (default: a temporary one, removed)")
    args = p.parse_args(argv)

    venv = Path(args.venv) if args.venv else Path(tempfile.mkdtemp(prefix="check-extras-")) / "venv"
    try:
        print(f"check-extras: a fresh virtualenv in {venv}: {args.torch}, then the toolkit without extras", flush=True)
        _run([sys.executable, "-m", "venv", "--clear", str(venv)])
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        _run([*pip, "install", "-q", "--upgrade", "pip"])
        _run([*pip, "install", "-q", *shlex.split(args.torch)])
        _run([*pip, "install", "-q", "-e", str(ROOT)])
        # the toolkit's dependencies and extras as installed (project.dependencies, project.optional-dependencies)
        meta = json.loads(_run([str(venv / "bin" / "python"), "-c", PROJECT_METADATA]))
        project = canonical(meta["name"])
        extras = args.extras.split(",") if args.extras else meta["extras"]
        pins = guarded(meta["requires"], args.torch)
        installed = {canonical(d["name"]): d["version"]
                     for d in json.loads(_run([*pip, "list", "--format", "json", "--exclude-editable"]))}
        print(f"  installed: {len(installed)} packages; guarded: {', '.join(sorted(pins))}", flush=True)
        failed = []
        cases = [[e] for e in extras] + ([extras] if len(extras) > 1 else [])
        for case in cases:
            label = ",".join(case)
            report_path = venv / f"report-{label.replace(',', '+')}.json"
            _run([*pip, "install", "-q", "--dry-run", "--report", str(report_path), "-e", f"{ROOT}[{label}]"])
            broken, other, new = verdict(changes(json.loads(report_path.read_text()), installed, project), pins)
            print(f"[{label}] {'FAIL' if broken else 'ok'}: {new} new packages"
                  + (f"; changes pins: {'; '.join(broken)}" if broken else "")
                  + (f"; changes other installed packages: {'; '.join(other)}" if other else ""), flush=True)
            if broken:
                failed.append(label)
        if failed:
            print(f"check-extras: installing {', '.join(failed)} changes torch, torchvision or the toolkit's pins")
            return 1
        print("check-extras: every extra keeps torch, torchvision and the toolkit's pins")
        return 0
    finally:
        if not args.venv:
            shutil.rmtree(venv.parent, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
