"""The README and docs/*.md say what the repository holds: their claims are checked here.

- The README's notebook snippet ("The domain packages never import Dagster") runs as written
  in a fresh interpreter where ``import dagster`` fails, against an artifact written with
  ``megapairs_dagster.artifacts``.
- Every repository path the README and docs cite (in backticks, in links, Markdown files named
  in prose, in the README's "Layout" block) is a file or folder that ``git ls-files`` lists, unless the allow-lists
  below name it as generated or as not a repository path.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import pytest

from megapairs_dagster.artifacts import TABLE_SUFFIX, artifact_relpath, write_table
from megapairs_dagster.storage import ArtifactStoreClient

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

# Paths the docs cite that no checkout holds: outputs the pipeline, the tests or a deployment
# write, and names of files in data this repository does not ship.
GENERATED_OR_EXTERNAL = {
    # written by `make demo` / `make ui` (both git-ignored)
    "data/demo_corpus/",
    ".dagster_home/",
    # screenshots of tests/test_browser.py (git-ignored)
    "tests/artifacts/",
    # inside an artifact store, below its root (`<store>/tables/...`)
    "tables/",
    "tables/triplets/",
    "tables/images/",
    # members of a corpus shard (img2dataset layout) and caption sidecars of an image folder
    "KEY.txt",
    "KEY.json",
    "NAME.txt",
    # files of the official benchmark downloads (CIRCO, CIRR, GeneCIS with COCO and Visual Genome)
    "val.json",
    "cap.rc2.val.json",
    "split.rc2.val.json",
    "img_raw/",
    "genecis/",
    "val2017/",
    "VG_100K_all/",
    # the user's own one-off run config for `dagster asset materialize -c`
    "run_config.yaml",
    # files of a transformers CLIPModel checkpoint (released weights, or an export of ours)
    "config.json",
    "transformers/",
}

# Backticked words with a slash that are not file paths at all.
NOT_PATHS = {
    "dagster/dagster",  # the Helm chart
    "dagster-k8s/config",  # an op tag
    "dagster/backfill",  # a run tag
    "dagster/partition",  # a run tag
    "config_paper.yaml",  # the ConfigMap key in `--from-file=config_paper.yaml=<your copy>`
    "nvidia.com/gpu",  # a Kubernetes resource and taint
}

_PATH_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".json", ".png", ".cfg")


def _snippet_after(text: str, marker: str) -> str:
    start = text.index(marker)
    match = re.compile(r"```python\n(.*?)```", re.DOTALL).search(text, start)
    assert match, f"no ```python block after {marker!r}"
    return match.group(1)


NO_DAGSTER = """
import json, sys
sys.modules["dagster"] = None  # `import dagster` now raises ImportError
exec(compile(sys.stdin.read(), "README.md", "exec"))
loaded = sorted(m for m, module in sys.modules.items() if m.startswith("dagster") and module)
print(json.dumps({
    "dagster_modules": loaded,
    "image_id": neighbors["image_id"].tolist(),
    "neighbor_ids": [list(map(int, ids)) for ids in neighbors["neighbor_ids"]],
    "produced_by": neighbors.attrs.get("produced_by"),
}))
"""


def test_readme_notebook_snippet_runs_without_dagster(tmp_path):
    snippet = _snippet_after(README.read_text(), "The domain packages never import Dagster")
    frame = pd.DataFrame({
        "image_id": np.array([11, 12], dtype=np.int64),
        "neighbor_ids": [np.array([12], dtype=np.int64), np.array([11], dtype=np.int64)],
        "scores": [np.array([0.9], dtype=np.float32), np.array([0.9], dtype=np.float32)],
    })
    store = ArtifactStoreClient(str(tmp_path / "data" / "artifacts"))
    store.write_bytes(artifact_relpath(["neighbors_dino_image"], "00000") + TABLE_SUFFIX,
                      write_table(frame, {"view": "dino_image"}))
    assert (tmp_path / "data/artifacts/neighbors_dino_image/00000.parquet").is_file()

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(ROOT), os.environ.get("PYTHONPATH")]))}
    # The snippet's relative "data/artifacts" resolves against the temporary folder.
    result = subprocess.run([sys.executable, "-c", NO_DAGSTER], input=snippet, cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    read = json.loads(result.stdout.strip().splitlines()[-1])
    assert read == {"dagster_modules": [], "image_id": [11, 12],
                    "neighbor_ids": [[12], [11]], "produced_by": {"view": "dino_image"}}


@pytest.fixture(scope="module")
def repository_paths() -> set[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    folders = {str(parent) + "/" for name in files for parent in PurePosixPath(name).parents
               if str(parent) != "."}
    return set(files) | folders


def _cited_paths(doc: Path) -> list[tuple[int, str]]:
    """(line, path) for every word in backticks that looks like a relative file path, every
    Markdown file named in prose, and every relative link target."""
    text = doc.read_text()
    cited = []
    for match in re.finditer(r"`([^`\n]+)`", text):
        line = text.count("\n", 0, match.start()) + 1
        for word in re.split(r"[\s=]+", match.group(1)):
            word = word.strip("()[],;:'\"")
            if not word or word[0] in "/~$<." and not word.startswith(".dagster"):
                continue  # absolute, home, variable, placeholder or relative-to-here paths
            if re.search(r"[<>{}*|@]|://", word):
                continue  # a placeholder, a pattern or a URL
            if "/" in word or word.endswith(_PATH_SUFFIXES):
                cited.append((line, word))
    # A Markdown file named in prose (README.md, docs/demo.md) is cited from the repository root.
    for match in re.finditer(r"(?<![\w/.`(-])([\w-]+(?:/[\w.-]+)*\.md)\b", text):
        cited.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    for match in re.finditer(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        target = match.group(1)
        if "://" not in target and not target.startswith("mailto:"):
            resolved = os.path.normpath(doc.parent.relative_to(ROOT) / target)
            cited.append((text.count("\n", 0, match.start()) + 1, resolved.replace(os.sep, "/")))
    return cited


def _in_repository(path: str, repository: set[str]) -> bool:
    return path in repository or path.rstrip("/") in repository or (
        path.rstrip("/") + "/" in repository)


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: str(doc.relative_to(ROOT)))
def test_every_cited_path_is_in_the_repository(doc, repository_paths):
    dead = [
        f"{doc.relative_to(ROOT)}:{line}: {path}"
        for line, path in _cited_paths(doc)
        if path not in GENERATED_OR_EXTERNAL and path not in NOT_PATHS
        and not _in_repository(path, repository_paths)
    ]
    assert not dead, "cited but not in `git ls-files`:\n" + "\n".join(dead)


def test_readme_layout_names_what_the_repository_holds(repository_paths):
    """The README's "Layout" block: top-level entries, and entries of megapairs_dagster/."""
    text = README.read_text()
    block = re.search(r"## Layout\n+```\n(.*?)```", text, re.DOTALL)
    assert block, "no Layout block in README.md"
    parent, entries = "", []
    for line in block.group(1).splitlines():
        indent = len(line) - len(line.lstrip(" "))
        if not line.strip() or indent not in (0, 2):
            continue  # a description's continuation line
        name = line.split()[0]
        if indent == 0:
            parent = name if name.endswith("/") else ""
            entries.append(name)
        else:
            entries.append(parent + name)
    assert "megapairs_dagster/evaluation/" in entries and "bench/" in entries, entries
    missing = [entry for entry in entries if not _in_repository(entry, repository_paths)]
    assert not missing, f"README's Layout names what `git ls-files` does not hold: {missing}"
