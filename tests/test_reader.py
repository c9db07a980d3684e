"""PreparedDataset: random access by global index equals reading the shards in order (datasets_prep.reader)."""

import io
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datasets_prep.prepare import PrepareOptions, prepare
from datasets_prep.reader import PreparedDataset
from prep_images import good_samples, write_imagefolder
from trainers.errors import UserError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    source = write_imagefolder(root / "src", good_samples())
    prepare([str(source)], root / "out", PrepareOptions(resolution=256, shard_rows=4, group_rows=3))
    return root / "out"


def shard_rows(out):
    return [row for path in sorted((out / "shards").glob("*.parquet")) for row in pq.read_table(path).to_pylist()]


def test_random_access_matches_iterating_the_shards(prepared):
    dataset, expected = PreparedDataset(prepared), shard_rows(prepared)
    assert len(dataset) == len(expected) == 10
    for i in np.random.default_rng(0).permutation(len(dataset)):
        record, row = dataset.record(int(i)), expected[i]
        for field in ("key", "caption", "width", "height", "original_width", "original_height", "crop_top",
                      "crop_left", "bucket", "sha256"):
            assert record[field] == row[field], field
        assert record["image"].tobytes() == Image.open(io.BytesIO(row["image"])).convert("RGB").tobytes()
        assert record["conditioning_image"] is None
        assert dataset.bucket_of(int(i)) == row["bucket"]
    assert dataset.record(-1)["key"] == expected[-1]["key"]
    with pytest.raises(IndexError):
        dataset.record(10)


def test_bucket_column_and_pickling(prepared):
    dataset = PreparedDataset(prepared)
    dataset.record(5)
    copy = pickle.loads(pickle.dumps(dataset))  # what a DataLoader worker receives
    assert copy.record(5)["key"] == dataset.record(5)["key"]
    assert copy.bucket_column.tolist() == [r["bucket"] for r in shard_rows(prepared)]


def test_few_open_files(prepared):
    dataset = PreparedDataset(prepared, max_open_files=1)
    assert [dataset.record(i)["key"] for i in (0, 9, 0, 5)] == [shard_rows(prepared)[i]["key"] for i in (0, 9, 0, 5)]
    assert len(dataset._open) == 1


def test_not_a_prepared_dataset(tmp_path):
    with pytest.raises(UserError, match="not a prepared dataset"):
        PreparedDataset(tmp_path)
