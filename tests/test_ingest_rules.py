"""Ingest rules: a minimum image side, caption repairs (control and bidi characters, invalid
UTF-8, excess length), each recorded as a reject reason or a repair on the row, and the
``corpus_source`` settings that steer them through the ``corpus`` asset."""

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, materialize
from fixtures_images import valid_jpeg, write_webdataset_tar

from megapairs_dagster.artifacts import read_table, write_table
from megapairs_dagster.assets.corpus import corpus
from megapairs_dagster.resources.settings import CorpusSource, domain_config
from megapairs_dagster.synthesis.ingest import ingest_shard
from megapairs_dagster.synthesis.normalize import (
    REJECT_REASONS,
    REPAIRS,
    IngestRules,
    NormalizedImage,
    Reject,
    clean_caption,
    normalize_sample,
    truncate_caption,
)
from megapairs_dagster.synthesis.readers import RawSample, Shard

LONG_CAPTION = "word " * 40_000  # 200,000 characters
HOSTILE_CAPTION = "a red\x00 car\x1b[31m parked \u202eon the left\u202c\x7f"


def hostile_shard(path) -> Shard:
    """The user's report: a 1x1 image, a 200,000-character caption, NUL/ESC/RLO in a caption."""
    write_webdataset_tar(
        path,
        [
            ("pixel", valid_jpeg((1, 1)), "a photo"),
            ("long", valid_jpeg((128, 128), color=(1, 2, 3)), LONG_CAPTION),
            ("controls", valid_jpeg((128, 128), color=(4, 5, 6)), HOSTILE_CAPTION),
            ("plain", valid_jpeg((128, 128), color=(7, 8, 9)), "a  blue\tboat"),
        ],
    )
    return Shard("hostile", str(path), "webdataset")


def by_key(frame) -> dict:
    return {row["key"]: row for row in frame.to_dict("records")}


def test_the_asset_defaults_are_the_domain_defaults():
    assert domain_config(IngestRules, CorpusSource(url="/corpus")) == IngestRules()


def test_the_hostile_shard_comes_out_repaired_or_rejected_with_reasons(tmp_path):
    images, rejects = ingest_shard(hostile_shard(tmp_path / "hostile.tar"))
    assert dict(zip(rejects["key"], rejects["reason"])) == {"pixel": "image_too_small"}
    assert "1x1" in rejects["detail"].iloc[0]
    kept = by_key(images)
    assert set(kept) == {"long", "controls", "plain"}

    long = kept["long"]
    assert long["repairs"] == "caption_truncated"
    assert long["source_caption_chars"] == 200_000
    assert 1990 <= len(long["caption"]) <= 2000 and long["caption"].endswith("word")

    controls = kept["controls"]
    assert controls["caption"] == "a red car[31m parked on the left"
    assert controls["repairs"] == "caption_control_chars,caption_bidi_controls"
    assert controls["source_caption_chars"] == len(HOSTILE_CAPTION)

    # Ordinary whitespace is normalised as before, and is no repair.
    assert (kept["plain"]["caption"], kept["plain"]["repairs"]) == ("a blue boat", "")

    # Every name used is documented, and the frames store as Parquet.
    assert set(rejects["reason"]) <= set(REJECT_REASONS)
    assert {name for row in kept.values() for name in row["repairs"].split(",") if name} <= set(
        REPAIRS
    )
    assert read_table(write_table(images, {}))["caption"].tolist() == images["caption"].tolist()


def test_long_captions_can_be_rejected_instead(tmp_path):
    rules = IngestRules(long_captions="reject")
    images, rejects = ingest_shard(hostile_shard(tmp_path / "hostile.tar"), rules)
    reasons = dict(zip(rejects["key"], rejects["reason"]))
    assert reasons == {"pixel": "image_too_small", "long": "caption_too_long"}
    assert "199999 characters > max_caption_chars 2000" in by_key(rejects)["long"]["detail"]
    assert "long" not in set(images["key"])


@pytest.mark.parametrize(
    ("size", "min_side", "kept"),
    [
        ((1, 1), 100, False),
        ((400, 99), 100, False),  # the shorter side counts, as img2dataset's min_image_size
        ((100, 100), 100, True),
        ((1, 1), 0, True),
        ((64, 48), 48, True),
    ],
)
def test_min_side_checks_the_shorter_side(size, min_side, kept):
    result = normalize_sample(
        RawSample("k", valid_jpeg(size), "a photo"), IngestRules(min_side=min_side)
    )
    assert isinstance(result, NormalizedImage) is kept
    if not kept:
        assert (result.reason, result.detail) == (
            "image_too_small",
            f"{size[0]}x{size[1]}: shorter side < min_side {min_side}",
        )


@pytest.mark.parametrize(
    ("raw", "text", "repairs"),
    [
        (b"caf\xe9 au lait", "caf\ufffd au lait", ["caption_invalid_utf8"]),
        (b"\xff\xfe", "\ufffd\ufffd", ["caption_invalid_utf8"]),
        ("a \ud800 b", "a \ufffd b", ["caption_invalid_utf8"]),  # from a JSON "\ud800" escape
        ("caf\udce9", "caf\ufffd", ["caption_invalid_utf8"]),  # from surrogateescape
        ("a genuine \ufffd", "a genuine \ufffd", []),  # valid text holding U+FFFD
        ("ok \u00e9\u4e2d\U0001f600".encode(), "ok \u00e9\u4e2d\U0001f600", []),
        ("a\x00b\x07c\x1bd\x7fe\x80f\x9fg", "abcdefg", ["caption_control_chars"]),
        ("a\tb\nc\rd\x0be\x0cf\x1cg\x85h", "a b c d e f g h", []),  # whitespace, as before
        ("x\u202ay\u202bz\u202c\u202d\u202e\u2066\u2067\u2068\u2069w", "xyzw",
         ["caption_bidi_controls"]),
        ("\u05e9\u05dc\u05d5\u05dd\u200f \u200e\u061c", "\u05e9\u05dc\u05d5\u05dd\u200f \u200e\u061c",
         []),  # the one-character marks LRM, RLM and ALM stay
        (b"\xe9\x00" + "\u202e".encode(), "\ufffd",
         ["caption_invalid_utf8", "caption_control_chars", "caption_bidi_controls"]),
    ],
)
def test_caption_repairs(raw, text, repairs):
    cleaned = clean_caption(raw)
    assert (cleaned.text, cleaned.repairs) == (text, repairs)


def test_source_caption_chars_counts_decoded_characters():
    assert clean_caption("\u00e9t\u00e9".encode()).source_chars == 3
    assert clean_caption("  a  b  ").source_chars == 8


def test_a_caption_of_only_control_characters_is_empty():
    result = normalize_sample(RawSample("k", valid_jpeg((128, 128)), "\x00\x1b\u202e"))
    assert isinstance(result, Reject) and result.reason == "empty_caption"


@pytest.mark.parametrize(
    ("caption", "max_chars", "expected"),
    [
        ("short", 10, "short"),
        ("one two three", 7, "one two"),  # the cut falls on a space
        ("one two three", 9, "one two"),  # mid-word: back to the last space
        ("abcdefghij", 4, "abcd"),  # no space at all: a hard cut
        ("one twothree", 5, "one"),
    ],
)
def test_truncation_keeps_whole_words_when_it_can(caption, max_chars, expected):
    assert truncate_caption(caption, max_chars) == expected


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    tar.addfile(member, io.BytesIO(data))


def test_invalid_utf8_in_every_layout_is_repaired_and_recorded(tmp_path):
    tar_path = tmp_path / "tar.tar"
    with tarfile.open(tar_path, "w") as tar:
        add_member(tar, "t.jpg", valid_jpeg((128, 128)))
        add_member(tar, "t.txt", b"caf\xe9 sign")
        add_member(tar, "j.jpg", valid_jpeg((128, 128), color=(9, 9, 9)))
        add_member(tar, "j.json", b'{"caption": "lone \\ud800 surrogate"}')
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "s.jpg").write_bytes(valid_jpeg((128, 128), color=(5, 5, 5)))
    (folder / "s.txt").write_bytes(b"sidecar \xff\xfe")
    (folder / "l.jpg").write_bytes(valid_jpeg((128, 128), color=(6, 6, 6)))
    (folder / "captions.jsonl").write_bytes(b'{"file": "l.jpg", "caption": "jsonl \xe9"}\n')

    tar_images, _ = ingest_shard(Shard("tar", str(tar_path), "webdataset"))
    folder_images, _ = ingest_shard(Shard("folder", str(folder), "folder"))
    captions = {
        row["key"]: (row["caption"], row["repairs"])
        for frame in (tar_images, folder_images)
        for row in frame.to_dict("records")
    }
    assert captions == {
        "t": ("caf\ufffd sign", "caption_invalid_utf8"),
        "j": ("lone \ufffd surrogate", "caption_invalid_utf8"),
        "s": ("sidecar \ufffd\ufffd", "caption_invalid_utf8"),
        "l": ("jsonl \ufffd", "caption_invalid_utf8"),
    }
    write_table(folder_images, {})  # lone surrogates would fail here


def test_undecodable_file_names_become_storable_keys(tmp_path):
    tar_path = tmp_path / "names.tar"
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        add_member(tar, "caf\u00e9.jpg", valid_jpeg((128, 128)))  # written as the byte 0xE9
        add_member(tar, "caf\u00e9.txt", b"a cafe")
    images, _ = ingest_shard(Shard("names", str(tar_path), "webdataset"))
    assert images["key"].tolist() == ["caf\\udce9"]
    write_table(images, {})


def test_the_asset_applies_the_settings_and_counts_reasons_and_repairs(tmp_path):
    hostile_shard(tmp_path / "hostile.tar")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", ["hostile"])

    def run(**settings) -> tuple[dict, dict]:
        result = materialize(
            [corpus], partition_key="hostile", instance=instance,
            resources={"corpus_source": CorpusSource(url=str(tmp_path), **settings)},
        )
        events = {
            event.asset_key.to_user_string(): {k: v.value for k, v in event.metadata.items()}
            for event in result.asset_materializations_for_node("corpus")
        }
        return events["corpus_images"], events["corpus_rejects"]

    images, rejects = run()
    assert (images["dagster/row_count"], rejects["dagster/row_count"]) == (3, 1)
    assert rejects["reason/image_too_small"] == 1
    assert {k: v for k, v in images.items() if k.startswith("repair/")} == {
        "repair/caption_bidi_controls": 1,
        "repair/caption_control_chars": 1,
        "repair/caption_truncated": 1,
    }
    images, rejects = run(min_side=0, long_captions="reject", max_caption_chars=500_000)
    assert (images["dagster/row_count"], rejects["dagster/row_count"]) == (4, 0)
    assert "repair/caption_truncated" not in images


def test_meta_that_json_cannot_encode_is_kept_as_text(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(
        pa.table({"image": [valid_jpeg((128, 128))], "caption": ["a"], "extra": [b"\x00\x01"]}),
        path,
    )
    images, _ = ingest_shard(Shard("p", str(path), "parquet"))
    assert json.loads(images["meta"].iloc[0]) == {"extra": str(b"\x00\x01")}
