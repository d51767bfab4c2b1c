"""Two-step instruction generation: ``pair_descriptions`` (MLLM), then ``instructions`` (LLM).

Separate assets so a new LLM prompt or model recomputes only the second step. Both work in
saved chunks: a crashed or cancelled run resumes where it stopped, and a rerun with the same
inputs and settings reproduces the same output.
"""

import contextlib
from collections.abc import Callable, Iterator, Sequence

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    AssetOut,
    Output,
    multi_asset,
)

from megapairs_dagster.artifacts import read_table, write_table
from megapairs_dagster.assets.code_versions import versioned_by
from megapairs_dagster.assets.conditions import UpdatedAfter, per_shard
from megapairs_dagster.assets.partitions import shards
from megapairs_dagster.assets.policies import GPU_POOL, GPU_TAGS, SHARDS_PER_RUN, TRANSIENT_RETRY
from megapairs_dagster.resources.generation_server import GenerationServer
from megapairs_dagster.resources.settings import Generation, domain_config
from megapairs_dagster.resources.store import ArtifactStore
from megapairs_dagster.synthesis.chunked import config_hash, run_in_chunks
from megapairs_dagster.synthesis.generation.backends import (
    BackendSettings,
    make_describer,
    make_instructor,
)
from megapairs_dagster.synthesis.generation.base import PairInput
from megapairs_dagster.synthesis.generation.prompts import load_demonstrations
from megapairs_dagster.synthesis.generation.run import (
    DESCRIPTION_COLUMNS,
    INSTRUCTION_COLUMNS,
    REJECT_COLUMNS,
    generate_descriptions,
    generate_instructions,
)
from megapairs_dagster.synthesis.image_index import read_images

Tables = tuple[pd.DataFrame, pd.DataFrame]

# The settings that shape each step's output: each step reads its own model, so a new
# instruction model leaves the descriptions alone.
_SHARED = ("backend", "prompt_version", "max_attempts", "max_new_tokens", "temperature", "seed")
DESCRIBE = tuple(
    f"generation.{name}" for name in (
        *_SHARED, "description_model", "word_budget_min", "word_budget_max", "max_caption_changes",
        "image_max_side",
    )
)
INSTRUCT = tuple(
    f"generation.{name}" for name in (*_SHARED, "instruction_model", "min_instructions")
)


def _step_outs(settings: tuple[str, ...], **descriptions: str) -> dict[str, AssetOut]:
    """A step's table and its rejects: versioned by the step's settings, and run once the image
    index holds the shard (both steps read the images of every pair, which may live in other
    shards, through it)."""
    condition = per_shard(
        global_deps=["image_index"], fresh=UpdatedAfter("image_index", "corpus_images")
    )
    return {
        name: AssetOut(description=text, metadata=versioned_by(*settings),
                       automation_condition=condition)
        for name, text in descriptions.items()
    }


@contextlib.contextmanager
def _backend(generation: Generation, server: GenerationServer, step: str) -> Iterator:
    """The step's backend, built once for the whole run (every shard of a batched backfill
    goes through it) and closed when the step ends, failed or not: a vllm engine gives its GPU
    memory back, a ``vllm serve`` started here for the openai backend stops."""
    make = make_describer if step == "description" else make_instructor
    with contextlib.ExitStack() as stack:
        overrides = {}
        if generation.backend == "openai":
            model = getattr(generation, f"{step}_model")
            if not model:
                raise ValueError(f"the openai backend needs generation.{step}_model")
            overrides["endpoint_url"] = stack.enter_context(server.endpoint(
                model, step, dtype=generation.dtype,
                trust_remote_code=generation.trust_remote_code,
            ))
        backend = make(domain_config(BackendSettings, generation, **overrides))
        if hasattr(backend, "close"):  # the vllm backend: its engine
            stack.callback(backend.close)
        yield backend


def _pair_inputs(
    store: ArtifactStore, index: pd.DataFrame, pairs: pd.DataFrame, with_pixels: bool
) -> list[PairInput]:
    """The captions (and pixels) of each pair's images, which may live in any shard."""
    ids = set(pairs["query_id"]) | set(pairs["target_id"])
    rows = read_images(store.client(), index, ids, ["caption", "jpeg"] if with_pixels else ["caption"])
    jpeg = rows["jpeg"] if with_pixels else None
    return [
        PairInput(
            pair_id=pair_id,
            query_jpeg=jpeg[q] if with_pixels else b"",
            target_jpeg=jpeg[t] if with_pixels else b"",
            query_caption=rows.at[q, "caption"],
            target_caption=rows.at[t, "caption"],
        )
        for pair_id, q, t in zip(pairs["pair_id"], pairs["query_id"], pairs["target_id"])
    ]


def _code_version(context: AssetExecutionContext, asset: str) -> str | None:
    """Part of the saved chunks' key: chunks made by older code are not reused."""
    return context.assets_def.code_versions_by_key.get(AssetKey(asset))


def _chunked(
    context: AssetExecutionContext,
    store: ArtifactStore,
    asset: str,
    shard: str,
    items: Sequence,
    item_id: Callable,
    digest: str,
    chunk_size: int,
    work: Callable[[Sequence], Tables],
    row_columns: list[str],
) -> Tables:
    """Run ``work`` over saved chunks of ``items`` of ``shard``; concatenate the results."""
    client = store.client()
    folder = f"{asset}/{shard}.chunks"

    def load(key: str) -> Tables | None:
        rows_path = f"{folder}/{key}.rows.parquet"
        if not client.exists(rows_path):
            return None
        rejects = read_table(client.read_bytes(f"{folder}/{key}.rejects.parquet"))
        return read_table(client.read_bytes(rows_path)), rejects

    def save(key: str, tables: Tables) -> None:
        produced_by = {"asset": asset, "partition": shard, "config_hash": digest}
        # Rejects first: the rows file is what marks a chunk as finished.
        client.write_bytes(f"{folder}/{key}.rejects.parquet", write_table(tables[1], produced_by))
        client.write_bytes(f"{folder}/{key}.rows.parquet", write_table(tables[0], produced_by))

    def report(index: int, total: int, reused: bool) -> None:
        context.log.info(f"{asset}[{shard}]: chunk {index + 1}/{total} {'reused' if reused else 'done'}")

    results = run_in_chunks(
        items, chunk_size, item_id=item_id, config_digest=digest, load=load, save=save,
        work=work, on_chunk=report,
    )
    if not results:
        return pd.DataFrame(columns=row_columns), pd.DataFrame(columns=REJECT_COLUMNS)
    return (
        pd.concat([r[0] for r in results], ignore_index=True),
        pd.concat([r[1] for r in results], ignore_index=True),
    )


def _per_shard(context: AssetExecutionContext, value) -> dict:
    """``{shard: input}`` of this run: one shard, or several when a backfill batches them."""
    return value if isinstance(value, dict) else {context.partition_key: value}


def _per_run(context: AssetExecutionContext, by_shard: dict, batched: bool):
    """What the run returns: ``{shard: output}`` for a batch of shards, else the one output."""
    return by_shard if batched else by_shard[context.partition_key]


def _provenance(frame: pd.DataFrame, identity: dict, prompt_version: str, digest: str) -> None:
    frame["backend"] = identity.get("backend", "")
    frame["model"] = identity.get("model", identity.get("backend", ""))
    frame["prompt_version"] = prompt_version
    frame["config_hash"] = digest


def _reject_metadata(rejects: pd.DataFrame, total: int) -> dict:
    counts = rejects["reason"].value_counts().to_dict() if len(rejects) else {}
    return {
        "dagster/row_count": len(rejects),
        "reject_rate": len(rejects) / total if total else 0.0,
        **{f"reason/{reason}": int(n) for reason, n in sorted(counts.items())},
    }


@multi_asset(
    outs=_step_outs(
        DESCRIBE,
        pair_descriptions="What each pair shares and how it differs.",
        description_rejects="Pairs whose description was rejected.",
    ),
    ins={"image_pairs": AssetIn(), "image_index": AssetIn()},
    partitions_def=shards,
    group_name="synthesis",
    code_version="1",
    pool=GPU_POOL,
    op_tags=GPU_TAGS,
    retry_policy=TRANSIENT_RETRY,
    backfill_policy=SHARDS_PER_RUN,
)
def pair_descriptions(
    context: AssetExecutionContext,
    image_pairs,  # a DataFrame, or {shard: DataFrame} when the run spans several shards
    image_index: pd.DataFrame,
    generation: Generation,
    generation_server: GenerationServer,
    store: ArtifactStore,
):
    with _backend(generation, generation_server, "description") as describer:
        config = {
            "step": "describe",
            "backend": describer.identity,
            "prompt_version": generation.prompt_version,
            "seed": generation.seed,
            "word_budget": [generation.word_budget_min, generation.word_budget_max],
            "max_attempts": generation.max_attempts,
            "max_caption_changes": generation.max_caption_changes,
            "code_version": _code_version(context, "pair_descriptions"),
        }
        digest = config_hash(config)

        def work(chunk: Sequence[PairInput]) -> Tables:
            return generate_descriptions(
                chunk, describer, seed=generation.seed,
                word_budget_range=(generation.word_budget_min, generation.word_budget_max),
                max_attempts=generation.max_attempts, batch_size=generation.batch_size,
                max_caption_changes=generation.max_caption_changes,
            )

        rows_by_shard, rejects_by_shard = {}, {}
        for shard, shard_pairs in _per_shard(context, image_pairs).items():
            pairs = _pair_inputs(store, image_index, shard_pairs, with_pixels=generation.backend != "template")
            rows, rejects_by_shard[shard] = _chunked(
                context, store, "pair_descriptions", shard, pairs, lambda p: p.pair_id, digest,
                generation.chunk_size, work, DESCRIPTION_COLUMNS,
            )
            rows = shard_pairs[["pair_id", "query_id", "target_id"]].merge(rows, on="pair_id")
            _provenance(rows, describer.identity, generation.prompt_version, digest)
            rows_by_shard[shard] = rows
    batched = isinstance(image_pairs, dict)
    total = sum(len(frame) for frame in _per_shard(context, image_pairs).values())
    rejects = pd.concat(rejects_by_shard.values(), ignore_index=True)
    yield Output(_per_run(context, rows_by_shard, batched), output_name="pair_descriptions",
                 metadata={"dagster/row_count": sum(len(r) for r in rows_by_shard.values()),
                           "config_hash": digest, "pairs": total})
    yield Output(_per_run(context, rejects_by_shard, batched), output_name="description_rejects",
                 metadata=_reject_metadata(rejects, total))


@multi_asset(
    outs=_step_outs(
        INSTRUCT,
        instructions="≥ 3 validated retrieval instructions per pair.",
        instruction_rejects="Pairs whose LLM output was rejected.",
    ),
    ins={"pair_descriptions": AssetIn(), "image_index": AssetIn()},
    partitions_def=shards,
    group_name="synthesis",
    # 2: descriptions go into the prompt on one line; instructions are cleaned of control
    # characters, and markup or word-less ones are rejected (markup, no_content)
    code_version="2",
    # A low parse rate flags the generator; the instructions kept are valid, so it only warns.
    check_specs=[AssetCheckSpec("parse_rate", asset="instructions")],
    pool=GPU_POOL,
    op_tags=GPU_TAGS,
    retry_policy=TRANSIENT_RETRY,
    backfill_policy=SHARDS_PER_RUN,
)
def instructions(
    context: AssetExecutionContext,
    pair_descriptions,  # a DataFrame, or {shard: DataFrame} when the run spans several shards
    image_index: pd.DataFrame,
    generation: Generation,
    generation_server: GenerationServer,
    store: ArtifactStore,
):
    with _backend(generation, generation_server, "instruction") as instructor:
        demonstrations = load_demonstrations(generation.prompt_version)
        config = {
            "step": "instruct",
            "backend": instructor.identity,
            "prompt_version": generation.prompt_version,
            "seed": generation.seed,
            "min_instructions": generation.min_instructions,
            "max_attempts": generation.max_attempts,
            "descriptions": sorted(
                {h for frame in _per_shard(context, pair_descriptions).values()
                 for h in frame.get("config_hash", [])}
            ),
            "code_version": _code_version(context, "instructions"),
        }
        digest = config_hash(config)

        def work(chunk: Sequence[tuple[PairInput, str]]) -> Tables:
            return generate_instructions(
                chunk, instructor, demonstrations=demonstrations, seed=generation.seed,
                min_count=generation.min_instructions, max_attempts=generation.max_attempts,
                batch_size=generation.batch_size,
            )

        rows_by_shard, rejects_by_shard = {}, {}
        for shard, descriptions in _per_shard(context, pair_descriptions).items():
            pairs = _pair_inputs(store, image_index, descriptions, with_pixels=False)
            described = list(zip(pairs, descriptions["description"]))
            rows, rejects_by_shard[shard] = _chunked(
                context, store, "instructions", shard, described, lambda item: item[0].pair_id,
                digest, generation.chunk_size, work, INSTRUCTION_COLUMNS,
            )
            rows = descriptions[["pair_id", "query_id", "target_id"]].merge(rows, on="pair_id")
            _provenance(rows, instructor.identity, generation.prompt_version, digest)
            rows_by_shard[shard] = rows
    batched = isinstance(pair_descriptions, dict)
    total = sum(len(frame) for frame in _per_shard(context, pair_descriptions).values())
    produced = sum(len(rows) for rows in rows_by_shard.values())
    parse_rate = produced / total if total else 1.0
    rejects = pd.concat(rejects_by_shard.values(), ignore_index=True)
    yield Output(_per_run(context, rows_by_shard, batched), output_name="instructions",
                 metadata={"dagster/row_count": produced, "parse_rate": parse_rate, "config_hash": digest})
    yield Output(_per_run(context, rejects_by_shard, batched), output_name="instruction_rejects",
                 metadata=_reject_metadata(rejects, total))
    yield AssetCheckResult(
        check_name="parse_rate", asset_key="instructions", severity=AssetCheckSeverity.WARN,
        passed=parse_rate >= generation.min_parse_rate,
        metadata={"parse_rate": parse_rate, "threshold": generation.min_parse_rate},
    )
