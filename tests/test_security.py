"""Security checks as tests: each one fails when the property it guards is lost.

The web server stays on loopback, secrets never reach the event log, nothing is unpickled or
run from a checkpoint's own code by default, SQL is built only from checked names, and keys
from outside (shard names, partition keys) cannot write outside the artifact store.
"""

from __future__ import annotations

import ast
import re
import shlex
from itertools import pairwise
from pathlib import Path

import pytest
from conftest import small_demo_resources
from dagster import DagsterInstance, materialize
from dagster._serdes import serialize_value
from test_triplet_store import image_rows, triplet_rows

from megapairs_dagster.artifacts import artifact_relpath
from megapairs_dagster.definitions import defs
from megapairs_dagster.demo import write_demo_shard
from megapairs_dagster.resources import settings
from megapairs_dagster.resources.profiles import resources_for
from megapairs_dagster.storage import ArtifactStoreClient
from megapairs_dagster.synthesis.megapairs_format import MegaPairsFormatError, image_relpath
from megapairs_dagster.synthesis.triplet_store import TripletStore

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megapairs_dagster"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def package_trees() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted(PACKAGE.rglob("*.py"))]


def calls(tree: ast.AST):
    return (node for node in ast.walk(tree) if isinstance(node, ast.Call))


def dotted(node: ast.AST) -> str:
    """``torch.load`` for an attribute chain, ``load`` for a bare name, else ""."""
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}".lstrip(".")
    return node.id if isinstance(node, ast.Name) else ""


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


# --- the web server ----------------------------------------------------------------------------


def host_of(command: list[str]) -> str | None:
    """The ``-h`` / ``--host`` value of a ``dagster dev`` command line (None: not given)."""
    for flag, value in pairwise(command):
        if flag in ("-h", "--host"):
            return value
    return next((arg.split("=", 1)[1] for arg in command if arg.startswith("--host=")), None)


def test_the_shipped_ui_command_binds_the_web_server_to_loopback():
    """``make ui`` names a loopback host: dagster dev on 0.0.0.0 would show the launchpad
    (which runs code) to the whole network."""
    recipe = re.search(r"^ui:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert recipe, "Makefile has no ui target"
    commands = [shlex.split(line) for line in recipe.group(1).splitlines()]
    dev = [command for command in commands if command[1:2] == ["dev"]]
    assert dev and all(host_of(command) in LOOPBACK for command in dev), commands


# --- secrets ------------------------------------------------------------------------------------

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-5f1c2e",
    "OPENAI_API_KEY": "sk-fake-openai-9d8e7f",
    "VLLM_API_KEY": "fake-vllm-key-3a4b5c",
    "MEGAPAIRS_API_KEY": "fake-generation-key-7e6d",
}


def test_no_secret_reaches_metadata_logs_or_the_event_log(tmp_path, monkeypatch, capfd, caplog):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake-access-key-id")
    write_demo_shard(tmp_path / "demo_corpus", 0, 12, seed=0)
    resources = small_demo_resources(tmp_path)
    resources["generation"] = resources["generation"].model_copy(
        update={"api_key_env": "MEGAPAIRS_API_KEY"}
    )
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", ["00000"])
    result = materialize(list(defs.assets), selection=["corpus_images", "corpus_rejects"],
                         partition_key="00000", resources=resources, instance=instance)
    assert result.success
    records = instance.all_logs(result.run_id)
    written = "\n".join([
        *(serialize_value(record) for record in records),
        serialize_value(instance.get_run_by_id(result.run_id)),
        caplog.text, *capfd.readouterr(),
    ])
    # The search covers the run's real records: its metadata is there.
    assert "dagster/row_count" in written and "00000" in written
    assert [name for name, value in SECRETS.items() if value in written] == []


# --- unpickling and remote code -----------------------------------------------------------------


def test_every_torch_load_in_the_package_is_weights_only():
    loads = [(path, call) for path, tree in package_trees() for call in calls(tree)
             if dotted(call.func) == "torch.load"]
    assert loads, "no torch.load found: the scan is looking at the wrong thing"
    unsafe = [f"{path.name}:{call.lineno}" for path, call in loads
              if not is_true(keyword(call, "weights_only"))]
    assert unsafe == []


def test_nothing_in_the_package_unpickles():
    unpickling = {"pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads",
                  "cloudpickle.load", "cloudpickle.loads", "joblib.load", "pd.read_pickle",
                  "pandas.read_pickle"}
    found = []
    for path, tree in package_trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [alias.name for alias in node.names]
                module = getattr(node, "module", None) or ""
                if {"pickle", "dill", "cloudpickle", "_pickle"} & {module, *names}:
                    found.append(f"{path.name}:{node.lineno} imports pickle")
            if isinstance(node, ast.Call) and (
                dotted(node.func) in unpickling or is_true(keyword(node, "allow_pickle"))
            ):
                found.append(f"{path.name}:{node.lineno} {dotted(node.func)}")
    assert found == []


def test_trust_remote_code_defaults_to_false_everywhere():
    found = []
    for path, tree in package_trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                positional = args.posonlyargs + args.args
                pairs = [*zip(positional[len(positional) - len(args.defaults):], args.defaults),
                         *zip(args.kwonlyargs, args.kw_defaults)]
                found += [f"{path.name}:{node.lineno} default {ast.unparse(default)}"
                          for arg, default in pairs if arg.arg == "trust_remote_code"
                          and not (isinstance(default, ast.Constant) and default.value is False)]
            elif isinstance(node, ast.Call) and is_true(keyword(node, "trust_remote_code")):
                found.append(f"{path.name}:{node.lineno} passes True")
            elif (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                  and node.target.id == "trust_remote_code" and node.value is not None
                  and "False" not in ast.unparse(node.value)):
                found.append(f"{path.name}:{node.lineno} field {ast.unparse(node.value)}")
    assert found == []

    def trusting(resources) -> set[str]:
        return {type(r).__name__ for r in resources if getattr(r, "trust_remote_code", False)}

    defaults = [settings.Encoders(), settings.Generation()]
    assert all(hasattr(r, "trust_remote_code") for r in defaults) and not trusting(defaults)
    assert not trusting(resources_for("demo", "/tmp/unused-home").values())
    # The paper profile opts in for its generators alone: InternVL2 ships its own code.
    assert trusting(resources_for("paper", "/tmp/unused-home").values()) == {"Generation"}


# --- SQL ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shard", ["../x", "a/b", "..\\x", ".hidden", "x*", "x[0]", "{x}", ""])
def test_hostile_shard_names_are_refused_before_anything_is_written(tmp_path, shard):
    store = TripletStore(ArtifactStoreClient(str(tmp_path / "store")))
    with pytest.raises(ValueError, match="cannot name a table file"):
        store.replace_shard(shard, triplet_rows(0, 2), image_rows(shard, 0, 2))
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.parquet"))


def test_column_names_go_into_sql_only_when_they_are_the_tables(tmp_path):
    store = TripletStore(ArtifactStoreClient(str(tmp_path / "store")))
    shard = "o'brien; DROP TABLE triplets; --"  # a quote is fine in a name: paths are quoted
    store.replace_shard(shard, triplet_rows(0, 3), image_rows(shard, 0, 3))
    assert list(store.triplets_frame([shard], ["query_id"])["query_id"]) == [0, 1, 2]
    assert store.counts() == {"triplets": 3, "images": 3, "shards": 1}
    for column in ['query_id" FROM triplets; DROP TABLE triplets; --', "1; SELECT 2", "*"]:
        with pytest.raises(ValueError, match="has no column"):
            store.triplets_frame(columns=[column])


# --- paths --------------------------------------------------------------------------------------

HOSTILE_KEYS = ["../x", "a/../../x", "..\\x", "..", "/tmp/megapairs-outside", "\\x", "C:\\x",
                "s3://another-bucket/x", "x\0y"]


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_keys_from_outside_cannot_write_outside_the_store(tmp_path, key):
    """The key alone is refused; as a partition key inside an artifact path it is refused or
    lands inside the root (``corpus_images/...parquet`` is a file name there)."""
    root = tmp_path / "store"
    client = ArtifactStoreClient(str(root))
    outside = Path("/tmp/megapairs-outside")
    for target in (key, artifact_relpath(["corpus_images"], key) + ".parquet"):
        try:
            written = Path(client.write_bytes(target, b"x").path)
        except ValueError as error:
            assert "not a relative path inside the store" in str(error)
        else:
            assert target != key, f"{key!r} was written"
            assert written.resolve().is_relative_to(root.resolve()), written
    with pytest.raises(ValueError, match="not a relative path inside the store"):
        client.local_dir(key)
    with pytest.raises(ValueError, match="not a relative path inside the store"):
        ArtifactStoreClient("memory://bucket/prefix").write_bytes(key, b"x")
    assert not outside.exists() and not (tmp_path / "x").exists()


def test_ordinary_keys_stay_inside_the_store(tmp_path):
    client = ArtifactStoreClient(str(tmp_path / "store"))
    for key in ("corpus_images/00000.parquet", "a..b/..c/x", "shard-1/x.y"):
        written = Path(client.write_bytes(key, b"x").path)
        assert written.is_relative_to(tmp_path / "store") and written.read_bytes() == b"x"


@pytest.mark.parametrize("image_id", ["../x", "/etc/passwd", 1.5, True, None])
def test_export_image_paths_come_only_from_integer_ids(image_id):
    with pytest.raises(MegaPairsFormatError):
        image_relpath(image_id)
    assert image_relpath(42) == "images/42.jpg"
