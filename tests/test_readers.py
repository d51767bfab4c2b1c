import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from fixtures_images import valid_jpeg, write_webdataset_tar
from s3_server import moto_s3

from megapairs_dagster.synthesis.readers import (
    CorpusReadError,
    RawSample,
    Shard,
    discover_shards,
    read_shard,
)

JPG_A = valid_jpeg(color=(1, 1, 1))
JPG_B = valid_jpeg(color=(2, 2, 2))
JPG_C = valid_jpeg(color=(3, 3, 3))


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(payload)
    tar.addfile(member, io.BytesIO(payload))


def by_key(samples) -> dict[str, RawSample]:
    return {sample.key: sample for sample in samples}


# --- discovery ---------------------------------------------------------------


def test_discover_webdataset_ignores_temp_and_hidden_files(tmp_path):
    for name in ["00001.tar", "00000.tar", "00002.tar.tmp", ".00003.tar", "README.md"]:
        (tmp_path / name).write_bytes(b"")
    shards = discover_shards(str(tmp_path))
    assert [(s.name, s.format) for s in shards] == [
        ("00000", "webdataset"),
        ("00001", "webdataset"),
    ]
    assert shards[0].url == f"{tmp_path}/00000.tar"


def test_discover_folders_and_parquet(tmp_path):
    (tmp_path / "folders" / "b").mkdir(parents=True)
    (tmp_path / "folders" / "a").mkdir()
    (tmp_path / "folders" / ".cache").mkdir()
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "part-1.parquet").write_bytes(b"")
    (tmp_path / "pq" / "part-0.parquet").write_bytes(b"")
    folders = discover_shards(str(tmp_path / "folders"))
    assert [(s.name, s.format) for s in folders] == [("a", "folder"), ("b", "folder")]
    parquets = discover_shards(str(tmp_path / "pq") + "/", format="parquet")
    assert [s.name for s in parquets] == ["part-0", "part-1"]
    assert parquets[1].url == f"{tmp_path}/pq/part-1.parquet"


def test_discover_errors_name_the_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        discover_shards(str(tmp_path / "nowhere"))
    (tmp_path / "notes.txt").write_text("no shards here")
    with pytest.raises(ValueError, match=str(tmp_path)):
        discover_shards(str(tmp_path))
    (tmp_path / "0.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="parquet"):
        discover_shards(str(tmp_path), format="parquet")
    (tmp_path / "1.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="mixes layouts"):
        discover_shards(str(tmp_path))


# --- webdataset ----------------------------------------------------------------


def test_webdataset_groups_members_and_handles_missing_parts(tmp_path):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        add_member(tar, "a.jpg", JPG_A)
        add_member(tar, "a.txt", b"caption a")
        add_member(tar, "a.json", json.dumps({"caption": "ignored", "url": "u-a"}).encode())
        add_member(tar, "b.jpg", JPG_B)
        add_member(tar, "b.json", json.dumps({"caption": "from json"}).encode())
        add_member(tar, "c.jpg", JPG_C)
        add_member(tar, "d.txt", b"caption without image")
        add_member(tar, "sub/dir/e.0.jpg", JPG_A)
        add_member(tar, "sub/dir/e.0.txt", b"nested")
    samples = list(read_shard(Shard("00000", str(path), "webdataset")))
    assert [s.key for s in samples] == ["a", "b", "c", "d", "sub/dir/e"]
    a, b, c, d, e = samples
    assert (a.image_bytes, a.caption, a.meta["url"]) == (JPG_A, b"caption a", "u-a")
    assert (b.image_bytes, b.caption) == (JPG_B, "from json")
    assert (c.image_bytes, c.caption, c.meta) == (JPG_C, None, {})
    assert (d.image_bytes, d.caption) == (None, b"caption without image")
    assert (e.image_bytes, e.caption) == (JPG_A, b"nested")


def test_webdataset_fixture_writer_round_trips(tmp_path):
    path = write_webdataset_tar(
        tmp_path / "x.tar", [("k1", JPG_A, "one"), ("k2", None, "two"), ("k3", JPG_B, None)]
    )
    samples = list(read_shard(Shard("x", str(path), "webdataset")))
    assert [(s.key, s.image_bytes, s.caption) for s in samples] == [
        ("k1", JPG_A, b"one"),
        ("k2", None, b"two"),
        ("k3", JPG_B, None),
    ]


def test_truncated_tar_yields_earlier_samples_then_raises(tmp_path):
    big = bytes(range(256)) * 200  # 51 KB member so the cut lands inside it
    whole = tmp_path / "whole.tar"
    write_webdataset_tar(whole, [("k1", JPG_A, "one"), ("k2", JPG_B, "two"), ("k3", big, "x")])
    data = whole.read_bytes()
    cut = tmp_path / "00007.tar"
    cut.write_bytes(data[: len(data) // 2])
    reader = read_shard(Shard("00007", str(cut), "webdataset"))
    assert [next(reader).key, next(reader).key] == ["k1", "k2"]
    with pytest.raises(CorpusReadError, match="00007"):
        next(reader)


def test_garbage_tar_raises_corpus_read_error(tmp_path):
    path = tmp_path / "bad.tar"
    path.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(CorpusReadError, match="bad"):
        list(read_shard(Shard("bad", str(path), "webdataset")))


# --- image folders -------------------------------------------------------------


def test_folder_with_sidecars_jsonl_and_subfolders(tmp_path):
    shard_dir = tmp_path / "shard-a"
    (shard_dir / "nested").mkdir(parents=True)
    (shard_dir / "one.jpg").write_bytes(JPG_A)
    (shard_dir / "one.txt").write_text("sidecar wins")
    (shard_dir / "two.PNG").write_bytes(JPG_B)
    (shard_dir / "three.webp").write_bytes(JPG_C)
    (shard_dir / "nested" / "four.jpeg").write_bytes(JPG_A)
    (shard_dir / "orphan.txt").write_text("caption of a missing image")
    (shard_dir / ".DS_Store").write_bytes(b"junk")
    (shard_dir / "captions.jsonl").write_text(
        "\n".join(
            json.dumps(record)
            for record in [
                {"file": "one.jpg", "caption": "jsonl loses"},
                {"image": "two.PNG", "text": "from jsonl"},
                {"file": "nested/four.jpeg", "caption": "nested caption"},
                {"file": "gone.jpg", "caption": "image never arrived"},
            ]
        )
        + "\n"
    )
    [shard] = discover_shards(str(tmp_path))
    samples = by_key(read_shard(shard))
    assert set(samples) == {"one", "two", "three", "nested/four", "orphan", "gone"}
    assert (samples["one"].image_bytes, samples["one"].caption) == (JPG_A, b"sidecar wins")
    assert (samples["two"].image_bytes, samples["two"].caption) == (JPG_B, "from jsonl")
    assert (samples["three"].image_bytes, samples["three"].caption) == (JPG_C, None)
    assert samples["nested/four"].caption == "nested caption"
    assert samples["orphan"].image_bytes is None
    assert (samples["gone"].image_bytes, samples["gone"].caption) == (None, "image never arrived")


# --- parquet -------------------------------------------------------------------


def test_parquet_with_hf_struct_images_and_row_index_keys(tmp_path):
    table = pa.table(
        {
            "image": [{"bytes": JPG_A, "path": "a.jpg"}, {"bytes": None, "path": None}],
            "caption": ["first", None],
            "url": ["http://a", "http://b"],
        }
    )
    pq.write_table(table, tmp_path / "train-0.parquet")
    [shard] = discover_shards(str(tmp_path))
    samples = list(read_shard(shard))
    assert [(s.key, s.image_bytes, s.caption) for s in samples] == [
        ("0", JPG_A, "first"),
        ("1", None, None),
    ]
    assert samples[0].meta == {"url": "http://a"}


def test_parquet_with_custom_columns_and_keys(tmp_path):
    table = pa.table({"jpg": [JPG_A, JPG_B], "txt": ["x", "y"], "id": ["k-a", "k-b"]})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=1)
    shard = Shard("p", str(tmp_path / "p.parquet"), "parquet")
    samples = list(read_shard(shard, image_column="jpg", caption_column="txt", key_column="id"))
    assert [(s.key, s.image_bytes, s.caption) for s in samples] == [
        ("k-a", JPG_A, "x"),
        ("k-b", JPG_B, "y"),
    ]
    with pytest.raises(CorpusReadError, match="lacks column"):
        list(read_shard(shard))


def test_corrupt_parquet_raises_corpus_read_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(CorpusReadError, match="broken"):
        list(read_shard(Shard("broken", str(path), "parquet")))


# --- S3 ------------------------------------------------------------------------


def test_webdataset_and_folder_shards_on_s3(tmp_path):
    local_tar = write_webdataset_tar(tmp_path / "00000.tar", [("k1", JPG_A, b"on s3")])
    with moto_s3() as (endpoint_url, storage_options):
        fs = s3fs.S3FileSystem(**storage_options)
        fs.mkdir("corpus")
        fs.put_file(str(local_tar), "corpus/tars/00000.tar")
        fs.pipe_file("corpus/tars/00001.tar.tmp", b"partial upload")
        fs.pipe_file("corpus/folders/s1/img.jpg", JPG_B)
        fs.pipe_file("corpus/folders/s1/img.txt", b"folder on s3")

        shards = discover_shards("s3://corpus/tars", storage_options)
        assert [(s.name, s.url) for s in shards] == [("00000", "s3://corpus/tars/00000.tar")]
        samples = list(read_shard(shards[0], storage_options))
        assert [(s.key, s.image_bytes, s.caption) for s in samples] == [("k1", JPG_A, b"on s3")]

        [folder] = discover_shards("s3://corpus/folders/", storage_options)
        assert (folder.name, folder.format) == ("s1", "folder")
        [sample] = read_shard(folder, storage_options)
        assert (sample.key, sample.image_bytes, sample.caption) == ("img", JPG_B, b"folder on s3")
        assert endpoint_url.startswith("http://127.0.0.1:")
