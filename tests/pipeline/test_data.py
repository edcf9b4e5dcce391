import numpy as np
import pytest
import torch

from gan.tasks import TASKS, Task, task_for
from pipeline.config import validate_params
from pipeline.data import (
    PreparedSplit,
    RankLoader,
    check_data_for_task,
    data_task,
    rank_rows,
    to_float,
)
from pipeline.prepare import prepare
from pipeline.shards import DataError


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare(validate_params({"prepare": {"out_dir": str(out), "shard_rows": 300}}), progress=False)
    return PreparedSplit(out, "train")


@pytest.mark.parametrize(("n", "world"), [(1438, 2), (1438, 3), (10, 4), (7, 1)])
def test_rank_shares_are_disjoint_equal_and_cover_everything(n, world):
    shares = [rank_rows(n, r, world, seed=0, epoch=3) for r in range(world)]
    assert len({len(s) for s in shares}) == 1
    joined = np.concatenate(shares)
    assert set(joined.tolist()) == set(range(n))  # every image this epoch
    assert len(joined) - n == (-n) % world  # only the padding repeats
    if n % world == 0:
        assert len(set(joined.tolist())) == len(joined)


def test_shares_reshuffle_per_epoch_and_repeat_per_seed():
    assert np.array_equal(rank_rows(100, 1, 2, 7, 0), rank_rows(100, 1, 2, 7, 0))
    assert not np.array_equal(rank_rows(100, 1, 2, 7, 0), rank_rows(100, 1, 2, 7, 1))
    assert not np.array_equal(rank_rows(100, 1, 2, 7, 0), rank_rows(100, 1, 2, 8, 0))
    with pytest.raises(ValueError, match="outside a world"):
        rank_rows(100, 2, 2, 0, 0)


def test_to_float_maps_0_and_255_to_the_ends_exactly():
    pixels = np.array([[[[0], [255]], [[128], [64]]]], dtype=np.uint8)  # 1x2x2x1 NHWC
    out = to_float(pixels)
    assert out.shape == (1, 1, 2, 2) and out.dtype == torch.float32
    torch.testing.assert_close(
        out[0, 0], torch.tensor([[-1.0, 1.0], [128 / 127.5 - 1, 64 / 127.5 - 1]])
    )


def test_read_by_rows_matches_read_all(split):
    everything, labels = split.read()
    rows = np.array([5, 1437, 0, 300, 299, 5])  # across shards, out of order, repeated
    images, picked = split.read(rows)
    assert np.array_equal(images, everything[rows]) and np.array_equal(picked, labels[rows])


def test_rank_loaders_together_see_each_image_once_per_epoch(split):
    everything, labels = split.read()
    loaders = [RankLoader(split, 100, rank=r, world_size=2, seed=1, labeled=True) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 7  # 719 rows per rank -> 7 full batches
    seen = []
    for loader in loaders:
        for images, y in loader.epoch(0):
            assert images.shape == (100, 1, 16, 16) and images.dtype == torch.float32
            assert images.min() >= -1 and images.max() <= 1
            seen.append((images, y))
    pixels = torch.cat([s[0] for s in seen])
    as_uint8 = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    # every batch row is one real image with its own label, and no image repeats
    index = {row.tobytes(): i for i, row in enumerate(everything.reshape(len(everything), -1))}
    found = [index[r.tobytes()] for r in as_uint8.reshape(len(as_uint8), -1)]
    assert len(set(found)) == len(found) == 1400
    assert np.array_equal(labels[found], torch.cat([s[1] for s in seen]).numpy())


def test_unlabeled_loader_yields_no_labels_and_forever_crosses_epochs(split):
    loader = RankLoader(split, 700, seed=0)
    batches = loader.forever()
    first = [next(batches) for _ in range(len(loader))]
    assert all(y is None for _, y in first)
    next_epoch, _ = next(batches)
    assert not torch.equal(next_epoch, first[0][0])  # reshuffled


def test_too_small_a_split_is_a_clear_error(split):
    with pytest.raises(DataError, match="too few for 2 worker"):
        RankLoader(split, 1000, world_size=2)


def test_the_data_must_carry_what_the_model_s_task_conditions_on():
    labeled = {"class_names": ["a", "b"], "splits": {"train": {"class_counts": {"0": 3, "1": 2}}}}
    unlabeled = {"task": "unconditional", "class_names": [], "splits": {"train": {}}}
    assert data_task(labeled).name == "class_conditional"  # a manifest from before tasks
    check_data_for_task(labeled, task_for(True))
    check_data_for_task(labeled, task_for(False))  # labels may be left unused
    with pytest.raises(DataError, match="model.conditional is true but the prepared train split"):
        check_data_for_task(unlabeled, task_for(True))
    # a paired task (a test-made entry: the real ones are not available yet) plugs in as is
    paired = Task("paired", "image", ("input_image",), True, (), ())
    with pytest.raises(DataError, match="task paired needs prepared data with input_image per"):
        check_data_for_task(labeled, paired)
    with pytest.raises(NotImplementedError, match="'image_to_image' is declared but not"):
        check_data_for_task(labeled, TASKS["image_to_image"])
