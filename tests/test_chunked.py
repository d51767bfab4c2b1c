"""Chunked work resumes after a crash without redoing finished chunks."""

import pytest

from megapairs_dagster.synthesis.chunked import config_hash, run_in_chunks


class Crash(Exception):
    pass


def run(items, saved, calls, crash_at=None, digest="cfg"):
    def work(chunk):
        calls.append(list(chunk))
        if crash_at is not None and len(calls) == crash_at:
            raise Crash
        return [item * 10 for item in chunk]

    return run_in_chunks(
        items, 3, item_id=str, config_digest=digest, load=saved.get,
        save=saved.__setitem__, work=work,
    )


def test_rerun_after_a_crash_only_computes_unfinished_chunks():
    saved, calls = {}, []
    with pytest.raises(Crash):
        run(list(range(10)), saved, calls, crash_at=3)
    assert len(saved) == 2  # chunks 0 and 1 finished before the crash
    calls.clear()
    results = run(list(range(10)), saved, calls)
    assert calls == [[6, 7, 8], [9]]
    assert [x for chunk in results for x in chunk] == [i * 10 for i in range(10)]


def test_changed_inputs_or_configuration_recompute():
    saved, calls = {}, []
    run([1, 2, 3], saved, calls)
    run([1, 2, 4], saved, calls)
    run([1, 2, 3], saved, calls, digest="other")
    assert len(calls) == 3


def test_config_hash_is_stable_and_order_free():
    assert config_hash({"a": 1, "b": [2]}) == config_hash({"b": [2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
