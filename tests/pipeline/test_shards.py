import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import validate_params
from pipeline.data import PreparedSplit
from pipeline.prepare import prepare
from pipeline.shards import MANIFEST, DataError, sha256_file, shard_schema, verify_prepared


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(validate_params({"prepare": {"out_dir": str(out), "shard_rows": 400}}), progress=False)
    return out


@pytest.fixture
def copy(prepared, tmp_path):
    import shutil

    target = tmp_path / "prepared"
    shutil.copytree(prepared, target)
    return target


SHARD = "train/part-00001.parquet"


def truncate_one_byte(path):
    path.write_bytes(path.read_bytes()[:-1])


def truncate_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zero_bytes(path):
    path.write_bytes(b"")


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def not_parquet(path):
    path.write_text("name,label\ncat,1\n")


@pytest.mark.parametrize(
    "damage", [truncate_one_byte, truncate_half, zero_bytes, flip_a_byte, not_parquet]
)
def test_damaged_shards_are_named_with_the_fix(copy, damage):
    damage(copy / SHARD)
    with pytest.raises(DataError) as info:
        verify_prepared(copy)
    message = str(info.value)
    assert str(copy / SHARD) in message
    assert "checksum mismatch" in message
    assert "dvc repro prepare" in message and "dvc checkout" in message
    with pytest.raises(DataError):
        PreparedSplit(copy, "train")  # the reader verifies before reading


def test_missing_shard(copy):
    (copy / SHARD).unlink()
    with pytest.raises(DataError, match=f"shard {copy / SHARD} is missing.*dvc repro prepare"):
        verify_prepared(copy)


def _rewrite_manifest(path, change):
    manifest = json.loads((path / MANIFEST).read_text())
    change(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_wrong_row_count(copy):
    _rewrite_manifest(copy, lambda m: m["splits"]["train"]["shards"][1].update(rows=401))
    with pytest.raises(DataError, match="has 400 rows, the manifest says 401"):
        verify_prepared(copy)


def test_wrong_schema(copy):
    path = copy / SHARD
    wrong = pa.table(
        {
            "image": pa.array([b"x" * 9] * 400, pa.binary(9)),
            "label": pa.array([0] * 400, pa.int16()),
        }
    )
    pq.write_table(wrong, path)
    _rewrite_manifest(
        copy, lambda m: m["splits"]["train"]["shards"][1].update(sha256=sha256_file(path))
    )
    with pytest.raises(DataError, match=f"shard {path} has schema"):
        verify_prepared(copy)


def test_missing_or_broken_manifest(copy):
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON.*dvc repro prepare"):
        verify_prepared(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(DataError, match="manifest.json is missing"):
        verify_prepared(copy)


def test_intact_data_verifies_and_schema_carries_the_shape(prepared):
    manifest = verify_prepared(prepared)
    schema = pq.read_schema(prepared / SHARD)
    assert schema.equals(shard_schema((16, 16, 1)), check_metadata=True)
    assert json.loads(schema.metadata[b"ganpipe.shape"]) == [16, 16, 1]
    assert schema.field("image").type == pa.binary(256)
    assert pq.read_metadata(prepared / SHARD).row_group(0).column(0).compression == "ZSTD"
    assert manifest["splits"]["train"]["shards"][1]["sha256"] == sha256_file(prepared / SHARD)
    images, _ = PreparedSplit(prepared, "train").read()
    assert images.dtype == np.uint8
