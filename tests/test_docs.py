"""The documentation stays a product's documentation, and what it quotes works.

- Product text (README, CHANGELOG, docs/, RESULTS.md, recipe and Makefile comments, the code's comments and docstrings)
  speaks of the product, not of how it was built: no work sessions, issue numbers, scratch paths outside the
  repository, "this machine", or git-ignored folders the product does not write. Outside RESULTS.md (the one page
  that states when and where each figure was measured) there are no dates and no commit hashes either.
- Every relative link in README, RESULTS, CHANGELOG and docs/ resolves to a file of the repository (and a heading
  of it, when it names one).
- Every `make TARGET` quoted in README and docs/ is a target of the Makefile, and every `synergen ...` command quoted
  there is a command whose `--help` parses, with each of its quoted `--options` listed in that help.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()

PROSE = [ROOT / "README.md", ROOT / "RESULTS.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("**/*.md"))]
LINKED = [ROOT / "README.md", ROOT / "RESULTS.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("**/*.md"))]
QUOTING = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
RECIPES = sorted((ROOT / "recipes").glob("**/*.yaml"))
CODE_DIRS = ("synergen_lightning", "datamodules", "callbacks", "bench", "tests")
CODE = [p for d in CODE_DIRS for p in sorted((ROOT / d).glob("**/*.py")) if p.resolve() != THIS]

# (pattern, what it is): the story of the work, not the product
PROCESS = [
    (re.compile(r"\bsessions?\b", re.I), "a work session"),
    (re.compile(r"\bissues? ?#?\d+", re.I), "an issue number"),
    (re.compile(r"(?<![\w&/])#\d+\b"), "an issue number"),
    (re.compile(r"\bthis (machine|box|VM)\b", re.I), "'this machine' (say which hardware, in RESULTS.md)"),
    (re.compile(r"(?<![\w.])/tmp/"), "a scratch path outside the repository"),
    (re.compile(r"\.\./shared|\b(PAPER|DESIGN)\.md\b"), "a file outside the repository"),
    (re.compile(r"\bnot shipped\b|\boutside git\b", re.I), "something the repository does not hold"),
    (re.compile(r"(?<![\w/])\.(gl|whl)/"), "a git-ignored folder"),
]
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
COMMIT = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b")
RUNS = re.compile(r"\bruns/([A-Za-z0-9_-]+)")
MARKDOWN = re.compile(r"(?<![\w.-])((?:[\w-]+/)*[\w-]+\.md)\b")
# markdown files the product writes: `make ablations` -> runs/ablations/ablations.md (or --doc), `make bench` ->
# bench/results.md, the reports' report.md
WRITTEN_MD = {"ablations.md", "bench/results.md", "results.md", "report.md"}


def _docstrings(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                out.append((body[0].lineno, body[0].value.value))
    return out


def _code_prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python file."""
    src = path.read_text()
    out = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(src).readline)
           if t.type == tokenize.COMMENT]
    for start, doc in _docstrings(ast.parse(src)):
        out += [(start + k, line) for k, line in enumerate(doc.splitlines())]
    return out


def _code_strings(path: Path) -> list[str]:
    """Every string literal of a Python file that is not a docstring (the paths the code itself writes)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]


def _yaml_split(path: Path) -> tuple[list[tuple[int, str]], list[str]]:
    """A recipe's (line, comment) pairs and its value lines (comments cut)."""
    comments, values = [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        m = re.search(r"(^|\s)#", line)
        if m:
            comments.append((i, line[m.start():]))
            line = line[:m.start()]
        values.append(line)
    return comments, values


def _product_run_folders() -> set[str]:
    """The runs/ folders the product itself writes: named by the Makefile, a recipe value or a string of the code."""
    text = [(ROOT / "Makefile").read_text()]
    text += ["\n".join(_yaml_split(p)[1]) for p in RECIPES]
    for d in ("synergen_lightning", "datamodules", "callbacks", "bench"):
        for p in (ROOT / d).glob("**/*.py"):
            text += _code_strings(p)
    return {m for t in text for m in RUNS.findall(t)}


def _product_texts() -> list[tuple[str, int, str, bool]]:
    """(file, line, text, dates allowed) of every piece of product prose."""
    out = []
    for p in PROSE:
        if p.exists():
            for i, line in enumerate(p.read_text().splitlines(), 1):
                # RESULTS.md and the tables `make ablations` writes state when and where they were measured
                out.append((str(p.relative_to(ROOT)), i, line, p.name in ("RESULTS.md", "ablations.md")))
    for p in RECIPES:
        out += [(str(p.relative_to(ROOT)), i, c, False) for i, c in _yaml_split(p)[0]]
    for i, line in enumerate((ROOT / "Makefile").read_text().splitlines(), 1):
        if "#" in line:
            out.append(("Makefile", i, line[line.index("#"):], False))
    for p in CODE:
        out += [(str(p.relative_to(ROOT)), i, c, True) for i, c in _code_prose(p)]
    return out


def test_product_text_speaks_of_the_product():
    runs = _product_run_folders()
    markdown = {str(p.relative_to(ROOT)) for p in ROOT.glob("**/*.md") if ".venv" not in p.parts}
    markdown |= {p.rsplit("/", 1)[-1] for p in markdown} | {p.split("/", 1)[-1] for p in markdown if "/" in p}
    bad = []
    for where, line, text, dated in _product_texts():
        found = [what for pattern, what in PROCESS if pattern.search(text)]
        found += [f"runs/{f}/ (not written by the product)" for f in RUNS.findall(text) if f not in runs]
        found += [f"{m} (no such file)" for m in MARKDOWN.findall(text)
                  if m not in markdown and m.rsplit("/", 1)[-1] not in WRITTEN_MD]
        if not dated:
            found += ["a date (dates belong in RESULTS.md)"] * bool(DATE.search(text))
            found += ["a commit hash (commits belong in RESULTS.md)"] * bool(COMMIT.search(text))
        bad += [f"{where}:{line}: {what}: {text.strip()[:120]}" for what in found]
    assert not bad, "process references in the product:\n" + "\n".join(bad)


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings (lower case, punctuation dropped, spaces -> '-')."""
    out, fence = set(), False
    for line in path.read_text().splitlines():
        fence ^= line.lstrip().startswith("```")
        m = None if fence else re.match(r"#{1,6}\s+(.*)", line)
        if m:
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def test_every_relative_link_resolves():
    bad = []
    for p in LINKED:
        if not p.exists():
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):
                    continue
                file, _, anchor = target.partition("#")
                path = (p.parent / file).resolve() if file else p
                if not path.exists() or (ROOT not in path.parents and path != ROOT):
                    bad.append(f"{p.relative_to(ROOT)}:{i}: {target}")
                elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                    bad.append(f"{p.relative_to(ROOT)}:{i}: {target} (no such heading)")
    assert not bad, "broken relative links:\n" + "\n".join(bad)


def _quoted_code(path: Path) -> list[tuple[int, str]]:
    """(line, text) of the inline code spans and fenced code blocks of a markdown file; continued lines joined."""
    out, fence, block, prose = [], False, [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            if fence:
                joined = "\n".join(t for _, t in block).replace("\\\n", " ")
                start = block[0][0] if block else i
                out += [(start, t) for t in joined.splitlines()]
                block = []
            fence = not fence
            continue
        (block if fence else prose).append((i, line))
    # inline spans may wrap onto the next line: pair the backticks over the whole prose
    text = "\n".join(t for _, t in prose)
    lines = [i for i, _ in prose]
    for m in re.finditer(r"`([^`]+)`", text):
        out.append((lines[text.count("\n", 0, m.start())], m.group(1).replace("\n", " ")))
    return out


MAKE = re.compile(r"(?:^|[;&|(]\s*|\s)make((?:\s+(?:[A-Z_]+=\S+|-\S+))*)\s+([a-z][a-z0-9_-]*)")


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    targets = set()
    for line in text.splitlines():
        m = re.match(r"^([a-z][a-z0-9_ -]*):(?!=)", line)
        if m:
            targets.update(m.group(1).split())
    return targets


def test_every_quoted_make_target_exists():
    targets = _make_targets()
    bad = []
    for p in QUOTING:
        for i, code in _quoted_code(p):
            code = code.split("#")[0]
            for m in MAKE.finditer(code):
                if m.group(2) not in targets:
                    bad.append(f"{p.relative_to(ROOT)}:{i}: make {m.group(2)}")
    assert targets >= {"demo", "test", "install", "help"}
    assert not bad, "make targets quoted but not in the Makefile:\n" + "\n".join(bad)


SYNERGEN = re.compile(r"(?:^|[\s;&|(/])synergen\s+([a-z][a-z-]*)(?:\s+([a-z][a-z-]*))?([^;&|#]*)")


def _help(words: tuple[str, ...], sub: str | None = None) -> str | None:
    """The --help text of `synergen WORDS [SUB]` (SUB: a sub-command of its own parser), or None when it is none."""
    from synergen_lightning import cli

    if words[0] in cli.LIGHTNING_SUBCOMMANDS:
        return "<lightning>"
    func, rest = cli._resolve(list(words))
    if func is None:
        return None
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        try:
            func(([sub] if sub else []) + ["--help"])
        except SystemExit as exc:
            if exc.code not in (0, None):
                return None
    return buf.getvalue()


def test_every_quoted_synergen_command_parses():
    from synergen_lightning import cli

    helps: dict = {}
    bad = []
    for p in QUOTING:
        for i, code in _quoted_code(p):
            for m in SYNERGEN.finditer(code):
                first, second, rest = m.group(1), m.group(2), m.group(3) or ""
                if first.startswith("-"):
                    continue
                words = (first, second) if (first, second) in cli.COMMANDS else (first,)
                if second and words == (first,):
                    rest = f"{second} {rest}"
                sub = re.match(r"\s*([a-z][a-z-]*)\b", rest)
                if "lm-eval" in (*words, sub and sub.group(1)) and importlib.util.find_spec("lm_eval") is None:
                    continue  # its options come with the lm-eval extra (tests/test_eval_lm_eval.py skips likewise)
                if sub and (words, sub.group(1)) not in helps:
                    helps[words, sub.group(1)] = _help(words, sub.group(1))
                if words not in helps:
                    helps[words] = _help(words)
                text = (sub and helps[words, sub.group(1)]) or helps[words]
                where = f"{p.relative_to(ROOT)}:{i}: synergen {' '.join(words)}"
                if text is None:
                    bad.append(f"{where}: no such command")
                elif text != "<lightning>":
                    for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                        if opt not in text:
                            bad.append(f"{where}: {opt} is not in its --help")
    assert helps, "no synergen command quoted in README / docs"
    assert not bad, "quoted synergen commands that do not parse:\n" + "\n".join(bad)


def test_synergen_fit_help_parses():
    """LightningCLI's own --help (the fit command every recipe header quotes)."""
    from synergen_lightning import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exc:
        cli.lightning_cli(["fit", "--help"])
    assert exc.value.code in (0, None)
    assert "--trainer" in buf.getvalue() and "--config" in buf.getvalue()


def test_readme_starts_the_user():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200)"
    first_screen = "\n".join(lines[:60])
    for needed in ("make demo", "samples.png", "report.json", "docs/plugging_data.md"):
        assert needed in first_screen, f"{needed!r} is not in the README's first screen"
