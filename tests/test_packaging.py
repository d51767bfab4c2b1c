"""faiss comes from exactly one extra: faiss-cpu and faiss-gpu-cu12 both install `faiss`."""

import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
FAISS = re.compile(r"faiss(-cpu|-gpu\S*)$")
# `.[a,b]` or `megapairs-dagster[a,b]` in an install line, and the Makefile's EXTRAS default.
EXTRAS_IN_TEXT = re.compile(r"(?:megapairs-dagster|\.)\[([a-z0-9_,-]+)\]|^EXTRAS \?= (\S+)", re.MULTILINE)


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~; ]", requirement, maxsplit=1)[0].lower()


def installed_by(extras: set[str], project: dict) -> set[str]:
    """Requirement names that installing the project with ``extras`` pulls in (self-extras
    such as ``megapairs-dagster[deploy]`` followed)."""
    names = {_name(r) for r in project["dependencies"]}
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in project["optional-dependencies"][extra]:
            name = _name(requirement)
            if name.startswith(project["name"] + "["):
                todo.extend(name[len(project["name"]) + 1 : -1].split(","))
            else:
                names.add(name)
    return names


def documented_extra_sets() -> set[frozenset[str]]:
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / ".ci" / "run",
             *sorted((ROOT / "docs").rglob("*.md"))]
    return {
        frozenset(e.strip() for e in (match[0] or match[1]).split(","))
        for path in files if path.exists()
        for match in EXTRAS_IN_TEXT.findall(path.read_text())
    }


def test_no_documented_install_brings_two_faiss_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not {n for n in installed_by(set(), project) if FAISS.match(n)}, "faiss in the core"
    combos = documented_extra_sets()
    assert frozenset({"cpu", "dev"}) in combos  # what `make install` (and so CI) uses
    for combo in combos | {frozenset({"gpu", "dev"})}:
        faiss = {n for n in installed_by(set(combo), project) if FAISS.match(n)}
        assert len(faiss) == 1, (sorted(combo), faiss)
    assert installed_by({"cpu", "dev"}, project) & {"faiss-cpu"}
    assert installed_by({"gpu"}, project) & {"faiss-gpu-cu12"}


def test_missing_faiss_names_both_extras():
    code = "import sys; sys.modules['faiss'] = None; import megapairs_dagster.synthesis.knn"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "megapairs-dagster[cpu]" in result.stderr and "megapairs-dagster[gpu]" in result.stderr
