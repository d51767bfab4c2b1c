"""``mmret_clip`` in several processes: torchrun launched through Dagster Pipes (gloo, CPU).

Two processes at batch b train the same model as the step's own process at batch 2b; a worker
killed mid-run fails the step with torchrun's account of it in the Dagster log, and the rerun
resumes from the training state saved in the artifact store, ending where an uninterrupted
run ends.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from dagster import AssetKey, materialize
from safetensors.torch import load_file

from megapairs_dagster.artifacts import artifact_relpath, load_artifact
from megapairs_dagster.assets.training import build_training_asset
from megapairs_dagster.definitions import defs
from megapairs_dagster.resources.profiles import (
    DEMO_RUNS,
    DeploymentConfigError,
    TrainingRun,
    load_deployment,
)
from megapairs_dagster.resources.settings import Training
from megapairs_dagster.retrieval import nested_subset
from megapairs_dagster.synthesis.encoders import CLIP_WEIGHTS_FILE
from megapairs_dagster.synthesis.triplet_store import TripletStore

pytestmark = pytest.mark.integration

RUN = "demo"
STEPS = 6
LEARNING_RATE = 1e-4
GLOBAL_BATCH = 8


def _train(mined, processes: int, **settings):
    resources, instance = mined
    training = Training(max_steps=STEPS, batch_size=GLOBAL_BATCH // processes, warmup_steps=2,
                        learning_rate=LEARNING_RATE, caption_loss_weight=0.5, nproc_per_node=processes,
                        **settings)
    assets = [a for a in defs.assets if AssetKey("mmret_clip") not in a.keys]
    assets.append(build_training_asset(DEMO_RUNS, gpus=processes))
    return materialize(assets, selection=["mmret_clip"], partition_key=RUN, instance=instance,
                       resources={**resources, "training": training}, raise_on_error=False)


def _weights(mined) -> tuple[dict, dict[str, torch.Tensor]]:
    resources, _ = mined
    client = resources["store"].client()
    record = load_artifact(client, artifact_relpath(["mmret_clip"], RUN))
    return record, load_file(client.local_dir(record["checkpoint"]) / CLIP_WEIGHTS_FILE)


def _assert_same_training(left: tuple[dict, dict], right: tuple[dict, dict]) -> None:
    """Same losses and weights, up to float summation order: DDP sums two gradients where one
    process sums one, which Adam's first steps amplify slightly (as in test_retrieval_ddp).

    An element whose true gradient is about 0 gets a rounding-noise gradient that Adam
    normalises into a step of about the learning rate, its sign set by the summation order;
    which elements those are depends on the mined data. So all but 0.1 % of each tensor's
    elements must agree closely, and none may differ by more than two such steps per step."""
    (left_record, left_weights), (right_record, right_weights) = left, right
    assert left_record["losses"] == pytest.approx(right_record["losses"], rel=1e-4)
    assert left_weights.keys() == right_weights.keys()
    for name, value in left_weights.items():
        other = right_weights[name]
        if name.endswith("attn.in_proj_bias"):
            # The key bias cannot change attention (softmax ignores a constant added to every
            # key's score): its gradient is rounding noise, which Adam scales up to lr-sized
            # steps. Compare the query and value biases only.
            third = len(value) // 3
            value, other = torch.cat([value[:third], value[2 * third:]]), torch.cat(
                [other[:third], other[2 * third:]])
        close = torch.isclose(value, other, rtol=1e-3, atol=1e-5)
        assert close.float().mean() >= 0.999, (name, int((~close).sum()), value.numel())
        assert float((value - other).abs().max()) <= 2 * LEARNING_RATE * STEPS, name


def _logged(mined, result) -> list[str]:
    """Every message of the run's Dagster event log."""
    _, instance = mined
    return [entry.user_message or "" for entry in instance.all_logs(result.run_id)]


def _saved_states(client) -> list:
    folder = client.path("mmret_clip", RUN, "state")
    return list(folder.rglob("training_state.pt")) if folder.exists() else []


def _worker_pids(rank: str) -> list[int]:
    """Training processes of that rank on this machine (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, NotADirectoryError):
            continue
        if b"megapairs_dagster.assets.training_run" in command and (
                f"RANK={rank}".encode() in environ):
            pids.append(int(entry.name))
    return pids


def _kill_rank_1_once_the_state_is_saved(client, stop: threading.Event, killed: list) -> None:
    while not stop.is_set():
        if _saved_states(client):
            for pid in _worker_pids("1"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            if killed:
                return
        time.sleep(0.05)


def test_two_processes_through_pipes_train_like_one_and_a_killed_worker_resumes(mined):
    single = _train(mined, processes=1)
    assert single.success
    single_trained = _weights(mined)
    assert single_trained[0]["report"]["world_size"] == 1

    launched = _train(mined, processes=2)
    assert launched.success
    launched_trained = _weights(mined)
    report = launched_trained[0]["report"]
    assert report["world_size"] == 2 and report["steps"] == STEPS
    _assert_same_training(launched_trained, single_trained)
    (materialization,) = launched.asset_materializations_for_node("mmret_clip")
    assert materialization.metadata["processes"].value == 2
    assert "loss_curve" in materialization.metadata
    assert any("step 6/6 loss" in line for line in _logged(mined, launched))  # rank 0's, via Pipes

    # A worker killed after the first saved state: the step fails saying so.
    resources, _ = mined
    client = resources["store"].client()
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_rank_1_once_the_state_is_saved,
                              args=(client, stop, killed), daemon=True)
    killer.start()
    failed = _train(mined, processes=2, checkpoint_every=2)
    stop.set()
    killer.join()
    assert killed and not failed.success
    failure = failed.get_step_failure_events()[0].step_failure_data.error
    assert "torchrun (2 processes) exited with code" in str(failure), failure
    logged = "\n".join(_logged(mined, failed))
    # torchrun's account, quoted in the Dagster log: the killed rank is the root cause.
    root_cause = logged[logged.index("Root Cause"):]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root_cause), logged[-3000:]
    assert "SIGKILL" in root_cause

    # The rerun resumes from the saved state and ends where the uninterrupted run ended.
    rerun = _train(mined, processes=2, checkpoint_every=2)
    assert rerun.success
    resumed = _weights(mined)
    assert resumed[0]["report"]["resumed_from_step"] >= 2
    assert resumed[0]["report"]["resumed_from"].endswith("training_state.pt")
    _assert_same_training(resumed, launched_trained)
    assert not _saved_states(client)  # deleted once the model is saved


def test_a_run_can_train_on_one_views_pairs_without_hard_negatives(mined):
    """The paper's ablations as training runs: Table 5 (which views' pairs), Table 4 (hard
    negatives) and Fig. 2 (a fraction of the triplets), set per run beside the training
    resource's defaults."""
    resources, instance = mined
    runs = {"ablation": TrainingRun(views=("clip_caption",), hard_negatives="none", max_steps=3,
                                    triplets_fraction=0.5)}
    assets = [a for a in defs.assets
              if not {AssetKey("mmret_clip"), AssetKey("benchmark_scores")} & set(a.keys)]
    training = Training(batch_size=4, warmup_steps=0, caption_loss_weight=0.0)
    result = materialize([*assets, build_training_asset(runs)], selection=["mmret_clip"],
                         partition_key="ablation", instance=instance,
                         resources={**resources, "training": training})
    assert result.success
    client = resources["store"].client()
    record = load_artifact(client, artifact_relpath(["mmret_clip"], "ablation"))
    everything = TripletStore(client).triplets_frame()
    caption_pairs = everything[["clip_caption" in views for views in everything["views"]]]
    # the fraction of Fig. 2's scaling curve, taken from the chosen views' pairs
    half = nested_subset(caption_pairs, 0.5)
    assert 0 < record["data"]["triplets"] == len(half) < len(caption_pairs) < len(everything)
    assert record["data"]["views"] == ["clip_caption"]
    assert record["data"]["triplets_fraction"] == 0.5
    assert record["hard_negatives"] == "none"
    assert record["training"]["query_as_negative"] is False
    assert record["report"]["steps"] == 3  # the run's max_steps, not the resource's


def test_a_misspelt_ablation_is_refused_naming_the_run(tmp_path, monkeypatch):
    config = tmp_path / "config.yaml"
    config.write_text("training_runs:\n  base: {views: [dino]}\n")
    monkeypatch.setenv("MEGAPAIRS_CONFIG", str(config))
    with pytest.raises(DeploymentConfigError, match=r"training_runs.base: views must be"):
        load_deployment("paper")
    config.write_text("training_runs:\n  base: {hard_negatives: some}\n")
    with pytest.raises(DeploymentConfigError, match=r"hard_negatives must be one of"):
        load_deployment("paper")
