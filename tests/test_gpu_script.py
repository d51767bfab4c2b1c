"""bench/gpu.py runs where no GPU is lent: ``--quick`` on the CPU gives every section, each
line with numbers or an explicit reason, so the script is known to work before a GPU lease
is spent on it."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"embed", "faiss", "train", "mllm", "generation"}
# Lines a CPU must measure in --quick; faiss-gpu and vLLM may only say why they did not run.
MEASURED_ON_CPU = {
    "jpeg decode (cpu, batched)": False,  # name: whether it has a FLOP count
    "EVA02-L-14 image embed [tiny]": True,
    "DINOv2-L image embed [tiny]": True,
    "faiss-cpu IndexFlatIP": True,
    "faiss-cpu IVF64,Flat nprobe=8": True,
    "MMRet train (megapairs-demo-clip, fp32)": True,
    "MMRet-MLLM train (LLaVA-NeXT, LoRA, fp32) [tiny]": True,
    "plain peft loop, ready batch (LLaVA-NeXT) [tiny]": True,
}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_bench()


@pytest.fixture(scope="module")
def quick_run(bench, tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "gpu.json"
    code = bench.main(["--quick", "--device", "cpu", "--json", str(path)])
    return code, json.loads(path.read_text())


def rows_by_name(report: dict) -> dict[str, dict]:
    return {row["name"]: row for section in report["sections"].values()
            for row in section.get("rows", [])}


@pytest.mark.slow
def test_quick_run_reports_every_section_with_numbers_or_a_reason(quick_run):
    code, report = quick_run
    assert code == 0
    assert set(report["sections"]) == SECTIONS
    assert report["header"]["quick"] is True
    assert report["header"]["peak_bf16_tflops"] is None  # the CPU has no entry: n/a
    for name, section in report["sections"].items():
        assert section["status"] == "ok", (name, section)
        assert section["rows"], name
        for row in section["rows"]:
            assert "error" not in row, row
            if "skipped" in row:
                assert row["skipped"].strip(), row
            else:
                assert math.isfinite(row["rate"]) and row["rate"] > 0, row
                assert row["peak_fraction"] is None, row


@pytest.mark.slow
def test_quick_run_measures_what_a_cpu_can(quick_run):
    rows = rows_by_name(quick_run[1])
    for name, has_flops in MEASURED_ON_CPU.items():
        row = rows[name]
        assert "skipped" not in row, row
        if has_flops:
            assert row["flops_per_item"] > 0 and row["tflops"] > 0, row
    assert rows["EVA02-L-14 image embed [tiny]"]["vs_clip_retrieval"] > 0
    assert rows["faiss-cpu IndexFlatIP"]["recall_at_k"] == 1.0  # the reference itself
    assert 0.0 < rows["faiss-cpu IVF64,Flat nprobe=8"]["recall_at_k"] <= 1.0
    assert "get_num_gpus" in rows["faiss-gpu IndexFlatIP"]["skipped"]
    mllm = rows["MMRet-MLLM train (LLaVA-NeXT, LoRA, fp32) [tiny]"]
    plain = rows["plain peft loop, ready batch (LLaVA-NeXT) [tiny]"]
    assert mllm["vs_plain_peft"] == pytest.approx(mllm["rate"] / plain["rate"])
    # a query, its positive, the query image and 3 mined negatives: one forward for all
    assert mllm["sequences_per_sample"] == 6
    assert 0 < mllm["trainable_parameters"] < mllm["parameters"]  # the LoRA adapter only
    generation = rows["vLLM generation (random Llama)"]
    assert "skipped" in generation or generation["rate"] > 0


def test_time_guard_skips_sections_whose_share_is_spent(bench, tmp_path):
    path = tmp_path / "gpu.json"
    assert bench.main(["--quick", "--device", "cpu", "--budget-s", "1e-9",
                       "--sections", "faiss,train", "--json", str(path)]) == 0
    sections = json.loads(path.read_text())["sections"]
    assert set(sections) == {"faiss", "train"}
    for section in sections.values():
        assert section["status"] == "skipped" and "time guard" in section["reason"]


def test_peak_table_matches_device_names(bench):
    assert bench.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert bench.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bench.peak_bf16_tflops("Tesla T4") is None


def test_the_mllm_line_trains_llava_v1_6_mistral_7b_s_shape(bench):
    """Built on the meta device (no memory): the parameter count of the released base and
    the image tokens a 512-px image makes there: a 24 x 24 base tile, a 2 x 2 grid of them
    (48 x 48 patches) and one newline token per grid row."""
    from megapairs_dagster.retrieval.mllm import MLLMInputs

    llava, processor = bench.llava_next(bench.FULL, torch.device("meta"))
    assert sum(p.numel() for p in llava.parameters()) == pytest.approx(7.57e9, rel=0.002)
    assert llava.config.vision_feature_layer == -2
    inputs = MLLMInputs(processor, task_instruction="Find the target image:",
                        image_side=bench.FULL.mllm_image_side)
    assert inputs.image_tokens == 24 * 24 + 48 * 48 + 48
