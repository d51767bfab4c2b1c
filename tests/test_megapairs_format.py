"""The MegaPairs release format: export, reading back (ours and the official layout), S3."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from s3_server import moto_s3

from megapairs_dagster.synthesis.megapairs_format import (
    MegaPairsFormatError,
    MegaPairsRecord,
    read_megapairs,
    write_megapairs,
)


def fake_jpeg(image_id: int) -> bytes:
    """Distinct bytes per image, so a mixed-up file would be noticed."""
    return b"\xff\xd8" + f"image {image_id}".encode() * (1 + image_id % 7)


def export_rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "query_id": [10, 11, 10],
            "target_id": [20, 21, 22],
            "instructions": [
                ["make it night", "add snow", "turn the car red"],
                np.array(["zoom out", "same dog on grass", "show two of them"]),
                ["a drawing of it", "in winter", "from above"],
            ],
            "hard_negative_ids": [[10, 30, 31], np.array([11, 30], dtype=np.int64), [10]],
        }
    )


def fake_jpegs(ids: list[int]):
    """The export's image source, as the asset's: (id, bytes), here in reverse order."""
    return ((image_id, fake_jpeg(image_id)) for image_id in reversed(ids))


def expected_records() -> list[MegaPairsRecord]:
    return [
        MegaPairsRecord(
            q_img="images/10.jpg",
            q_text=["make it night", "add snow", "turn the car red"],
            t_img="images/20.jpg",
            hns=["images/10.jpg", "images/30.jpg", "images/31.jpg"],
        ),
        MegaPairsRecord(
            q_img="images/11.jpg",
            q_text=["zoom out", "same dog on grass", "show two of them"],
            t_img="images/21.jpg",
            hns=["images/11.jpg", "images/30.jpg"],
        ),
        MegaPairsRecord(
            q_img="images/10.jpg",
            q_text=["a drawing of it", "in winter", "from above"],
            t_img="images/22.jpg",
            hns=["images/10.jpg"],
        ),
    ]


def test_export_round_trips_through_jsonl_and_parquet(tmp_path):
    out_dir = tmp_path / "export"
    summary = write_megapairs(export_rows(), str(out_dir), images=fake_jpegs)

    image_ids = [10, 11, 20, 21, 22, 30, 31]
    assert summary["records"] == 3 and summary["images"] == len(image_ids)
    assert summary["image_bytes"] == sum(len(fake_jpeg(i)) for i in image_ids)
    assert sorted(p.name for p in (out_dir / "images").iterdir()) == sorted(
        f"{i}.jpg" for i in image_ids
    )
    for image_id in image_ids:
        assert (out_dir / "images" / f"{image_id}.jpg").read_bytes() == fake_jpeg(image_id)
    assert not list(out_dir.rglob("*.partial"))

    for name in ("megapairs.jsonl", "megapairs.parquet"):
        records = list(read_megapairs(str(out_dir / name)))
        assert records == expected_records(), name
        for record in records:
            for image_path in [record.q_img, record.t_img, *record.hns]:
                assert Path(record.resolve(image_path)).is_file()
    first_line = json.loads((out_dir / "megapairs.jsonl").read_text().splitlines()[0])
    assert list(first_line) == ["q_img", "q_text", "t_img", "hns"]


def test_export_names_images_its_source_did_not_supply(tmp_path):
    rows = export_rows()
    with pytest.raises(MegaPairsFormatError, match=r"2 referenced images were not supplied, e.g. \[30, 31\]"):
        write_megapairs(rows, str(tmp_path / "export"),
                        images=lambda ids: fake_jpegs([i for i in ids if i < 30]))
    with pytest.raises(MegaPairsFormatError, match=r"images \[99\] were not asked for"):
        write_megapairs(rows, str(tmp_path / "export"), images=lambda ids: fake_jpegs([*ids, 99]))
    assert not (tmp_path / "export" / "megapairs.jsonl").exists()  # no record file names them


def test_export_requires_the_query_first_among_hard_negatives(tmp_path):
    rows = export_rows()
    rows.at[1, "hard_negative_ids"] = [30, 11]
    with pytest.raises(MegaPairsFormatError, match=r"row 1 \(query 11, target 21\).*images/11.jpg"):
        write_megapairs(rows, str(tmp_path / "export"), images=fake_jpegs)
    assert not (tmp_path / "export").exists()


def test_export_rejects_missing_columns_and_empty_instructions(tmp_path):
    with pytest.raises(MegaPairsFormatError, match=r"\['instructions'\]"):
        write_megapairs(
            export_rows().drop(columns=["instructions"]), str(tmp_path), images=fake_jpegs
        )
    rows = export_rows()
    rows.at[2, "instructions"] = []
    with pytest.raises(MegaPairsFormatError, match="row 2 .*q_text is empty"):
        write_megapairs(rows, str(tmp_path), images=fake_jpegs)


def test_reads_the_official_parquet_layout(tmp_path):
    """The release's parquet, as written from pandas: extra columns, numpy arrays of paths."""
    official = pd.DataFrame(
        {
            "q_img": ["MegaPairs/images/0001/a.jpg"],
            "q_text": [np.array(["the same bird, flying", "on a branch"], dtype=object)],
            "t_img": ["MegaPairs/images/0002/b.jpg"],
            "hns": [np.array(["MegaPairs/images/0001/a.jpg", "MegaPairs/images/0003/c.jpg"])],
            "source": ["recap-datacomp"],
        }
    )
    path = tmp_path / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir()
    official.to_parquet(path)

    (record,) = read_megapairs(str(path))
    assert record == MegaPairsRecord(
        q_img="MegaPairs/images/0001/a.jpg",
        q_text=["the same bird, flying", "on a branch"],
        t_img="MegaPairs/images/0002/b.jpg",
        hns=["MegaPairs/images/0001/a.jpg", "MegaPairs/images/0003/c.jpg"],
    )
    assert type(record.q_text) is list and type(record.hns[0]) is str
    assert record.resolve(record.t_img) == f"{tmp_path}/data/MegaPairs/images/0002/b.jpg"
    assert record.resolve("s3://bucket/x.jpg") == "s3://bucket/x.jpg"


GOOD_ROW = {"q_img": "a.jpg", "q_text": ["x"], "t_img": "b.jpg", "hns": ["a.jpg"]}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            json.dumps({k: v for k, v in GOOD_ROW.items() if k != "t_img"}),
            r"missing field\(s\) \['t_img'\]",
        ),
        (json.dumps({**GOOD_ROW, "q_text": []}), "q_text is empty"),
        (json.dumps({**GOOD_ROW, "q_text": "x"}), "q_text must be a list of strings, got str"),
        (json.dumps({**GOOD_ROW, "hns": "a.jpg"}), "hns must be a list of strings, got str"),
        (
            json.dumps({**GOOD_ROW, "hns": ["a.jpg", 3]}),
            r"hns holds empty or non-string items \[3\]",
        ),
        (json.dumps({**GOOD_ROW, "q_img": ""}), "q_img must be a non-empty path"),
        ('{"q_img": "a.jpg",', "not valid JSON"),
        ("[1, 2]", "expected an object"),
    ],
)
def test_jsonl_reader_names_the_bad_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\n\n" + line + "\n")
    with pytest.raises(MegaPairsFormatError, match=f"bad.jsonl line 3: {message}"):
        list(read_megapairs(str(path)))


def test_parquet_reader_names_the_bad_row_and_missing_columns(tmp_path):
    path = tmp_path / "bad.parquet"
    rows = [GOOD_ROW, GOOD_ROW, {**GOOD_ROW, "q_text": []}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(MegaPairsFormatError, match="bad.parquet row 2: q_text is empty"):
        list(read_megapairs(str(path)))

    pq.write_table(pa.Table.from_pylist([{"q_img": "a", "q_text": ["x"], "t_img": "b"}]), path)
    with pytest.raises(MegaPairsFormatError, match=r"missing field\(s\) \['hns'\]"):
        list(read_megapairs(str(path)))

    with pytest.raises(MegaPairsFormatError, match=".jsonl or .parquet"):
        list(read_megapairs(str(tmp_path / "records.csv")))


def test_export_round_trips_through_s3():
    with moto_s3() as (_, storage_options):
        filesystem = s3fs.S3FileSystem(**storage_options)
        filesystem.mkdir("bucket")
        summary = write_megapairs(
            export_rows(),
            "s3://bucket/exports/v1",
            images=fake_jpegs,
            storage_options=storage_options,
        )
        assert summary["parquet_url"] == "s3://bucket/exports/v1/megapairs.parquet"
        for url in (summary["jsonl_url"], summary["parquet_url"]):
            records = list(read_megapairs(url, storage_options=storage_options))
            assert records == expected_records()
            target_url = records[1].resolve(records[1].t_img)
            assert target_url == "s3://bucket/exports/v1/images/21.jpg"
            assert filesystem.cat_file(target_url) == fake_jpeg(21)
        assert len(filesystem.ls("bucket/exports/v1/images")) == summary["images"]
