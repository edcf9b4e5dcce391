import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gan.export import sha256_file
from pipeline.config import validate_params
from pipeline.data import PreparedSplit
from pipeline.prepare import prepare
from pipeline.shards import MANIFEST, DataError, shard_schema, verify_prepared


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


# --- edited manifests: a clear error naming the manifest and the key, never a KeyError


def _drop(*keys):
    def change(manifest):
        *parents, last = keys
        for key in parents:
            manifest = manifest[key]
        del manifest[last]

    return change


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (_drop("dataset_hash"), "'dataset_hash' is missing"),
        (_drop("splits"), "'splits' is missing"),
        (
            _drop("splits", "train", "shards", 0, "sha256"),
            "'splits.train.shards[0].sha256' is missing",
        ),
        (lambda m: m["splits"]["test"].update(rows="many"), "'splits.test.rows' is 'many'"),
        (lambda m: m.update(shape=[16, 16]), "'shape' is [16, 16]"),
        (lambda m: m.update(class_names="0123456789"), "'class_names' is '0123456789'"),
    ],
)
def test_a_manifest_missing_or_mistyping_a_key_is_named(copy, change, key):
    _rewrite_manifest(copy, change)
    for read in (verify_prepared, lambda d: PreparedSplit(d, "train", verify=False)):
        with pytest.raises(DataError) as info:
            read(copy)
        assert str(copy / MANIFEST) in str(info.value)
        assert key in str(info.value) and "dvc repro prepare" in str(info.value)


def test_a_manifest_that_is_not_a_mapping(copy):
    (copy / MANIFEST).write_text("[1, 2, 3]\n")
    with pytest.raises(DataError, match=f"{copy / MANIFEST}: expected a JSON object, got a list"):
        verify_prepared(copy)


@pytest.mark.parametrize("where", ["../outside.parquet", "/tmp/outside.parquet", "train/../../x"])
def test_a_shard_path_outside_the_prepared_directory_is_refused(copy, where):
    outside = (copy / where) if not where.startswith("/") else None
    if outside is not None:
        outside.parent.mkdir(parents=True, exist_ok=True)
        outside.write_bytes((copy / SHARD).read_bytes())  # a valid shard, checksum and all
    _rewrite_manifest(copy, lambda m: m["splits"]["train"]["shards"][1].update(path=where))
    with pytest.raises(DataError) as info:
        verify_prepared(copy)
    assert f"'splits.train.shards[1].path' is {where!r}" in str(info.value)
    assert "outside" in str(info.value)


def test_a_checksum_valid_shard_with_a_label_out_of_range_is_refused(copy):
    path = copy / SHARD
    table = pq.read_table(path)
    labels = table.column("label").to_numpy().copy()
    labels[7] = 50
    table = table.set_column(1, table.schema.field("label"), pa.array(labels, pa.int16()))
    pq.write_table(table, path, compression="zstd")
    _rewrite_manifest(
        copy, lambda m: m["splits"]["train"]["shards"][1].update(sha256=sha256_file(path))
    )
    with pytest.raises(DataError) as info:
        PreparedSplit(copy, "train")
    message = str(info.value)
    assert f"shard {path} has label 50" in message
    assert "10 classes (0..9)" in message and "dvc repro prepare" in message


def test_shard_rows_are_bounded_by_the_memory_a_shard_takes():
    from pipeline.config import ParamsError

    with pytest.raises(ParamsError) as info:
        validate_params({"prepare": {"shard_rows": 1_000_000_000_000}})
    message = str(info.value)
    assert "prepare.shard_rows" in message and "1000000000000" in message
    assert "at most 8388608 rows of 16x16x1 images" in message
    validate_params({"prepare": {"shard_rows": 8_388_608}})
