"""Loading the code location imports no deep-learning library: every run worker, every step
subprocess of the multiprocess executor and every ``dagster asset materialize`` call loads it,
so torch, open_clip, transformers, peft (and what they pull in) load only inside the steps
that use them."""

import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "open_clip", "timm", "transformers", "peft", "sympy",
         "matplotlib")

# Imports the code location in a fresh interpreter and prints, for each heavy package it
# imported, the project frames that asked for it first (innermost first).
PROBE = f"""
import importlib.abc, json, sys, traceback

HEAVY = {HEAVY!r}
first = {{}}


class Witness(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.partition(".")[0]
        if top in HEAVY and top not in first:
            frames = [f for f in traceback.extract_stack()[:-1] if "megapairs_dagster" in f.filename]
            first[top] = [f"{{f.filename.rsplit('megapairs_dagster', 1)[-1]}}:{{f.lineno}}"
                          for f in reversed(frames)]
        return None  # only watches: the normal finders import it


sys.meta_path.insert(0, Witness())
import megapairs_dagster.definitions  # noqa: E402,F401

loaded = sorted({{module.partition(".")[0] for module in sys.modules}} & set(HEAVY))
print(json.dumps({{"loaded": loaded, "first": first}}))
"""


@pytest.mark.parametrize("profile", ["demo", "paper"])
def test_the_code_location_loads_without_deep_learning_libraries(profile, tmp_path):
    env = {**os.environ, "MEGAPAIRS_PROFILE": profile, "MEGAPAIRS_HOME": str(tmp_path),
           "MEGAPAIRS_STUDIES": "1", "MEGAPAIRS_DEMO_MLLM": "1"}
    env.pop("MEGAPAIRS_CONFIG", None)
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    who = {package: " <- ".join(report["first"].get(package) or ["(outside the project)"])
           for package in report["loaded"]}
    assert not report["loaded"], "importing megapairs_dagster.definitions imported " + "; ".join(
        f"{package} (from {chain})" for package, chain in who.items())


def test_the_packages_names_are_the_submodules_own():
    """``megapairs_dagster.retrieval`` loads its names on first use, as the same objects."""
    from megapairs_dagster import retrieval
    from megapairs_dagster.retrieval import data, model, train

    assert retrieval.MMRetCLIP is model.MMRetCLIP
    assert retrieval.TrainConfig is train.TrainConfig
    assert retrieval.nested_subset is data.nested_subset
    assert set(retrieval.__all__) <= set(dir(retrieval))
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        retrieval.missing  # noqa: B018
