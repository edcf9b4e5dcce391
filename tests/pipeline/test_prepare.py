import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.config import validate_params
from pipeline.data import PreparedSplit
from pipeline.prepare import prepare
from pipeline.shards import DataError
from pipeline.sources import SourceError, seeded_split, to_square
from tests.conftest import clone_project, project_env, shell, tree_digest


def params_for(tmp_path, model=None, **prepare_keys):
    prepare_keys.setdefault("out_dir", str(tmp_path / "prepared"))
    return validate_params({"prepare": prepare_keys, "model": model or {}})


def test_digits_prepare_verify_and_read_back_bit_exactly(tmp_path):
    params = params_for(tmp_path, resolution=16, shard_rows=500)
    manifest = prepare(params, progress=False)
    assert manifest["shape"] == [16, 16, 1]
    assert {k: v["rows"] for k, v in manifest["splits"].items()} == {"train": 1438, "test": 359}
    assert [s["rows"] for s in manifest["splits"]["train"]["shards"]] == [500, 500, 438]
    assert sum(manifest["splits"]["train"]["class_counts"].values()) == 1438
    assert manifest["class_names"] == [str(i) for i in range(10)]
    assert manifest["task"] == "class_conditional"  # the data carries a label per image
    assert len(manifest["dataset_hash"]) == 64
    assert manifest["skipped_files"]["count"] == 0

    digits = load_digits()
    test = seeded_split(1797, 0.2, 0)
    scaled = np.round(digits.images * (255 / 16)).astype(np.uint8)
    expected = np.stack([to_square(Image.fromarray(im), 1, 16) for im in scaled[~test]])
    images, labels = PreparedSplit(tmp_path / "prepared", "train").read()
    assert images.dtype == np.uint8 and images.shape == (1438, 16, 16, 1)
    assert np.array_equal(images, expected)
    assert np.array_equal(labels, digits.target[~test])


def test_same_params_same_dataset_hash_and_different_params_differ(tmp_path):
    a = prepare(params_for(tmp_path, out_dir=str(tmp_path / "a")), progress=False)
    b = prepare(params_for(tmp_path, out_dir=str(tmp_path / "b"), shard_rows=100), progress=False)
    c = prepare(params_for(tmp_path, out_dir=str(tmp_path / "c"), seed=1), progress=False)
    assert a["dataset_hash"] == b["dataset_hash"]  # content, not sharding, names the version
    assert a["dataset_hash"] != c["dataset_hash"]


def test_image_folder_with_classes_reads_back_bit_exactly(tmp_path, image_folder):
    params = params_for(
        tmp_path, source="imagefolder", image_dir=str(image_folder), channels=3, resolution=8
    )
    manifest = prepare(params, progress=False)
    assert manifest["class_names"] == ["cat", "dog", "emu"]
    assert manifest["splits"]["train"]["rows"] + manifest["splits"]["test"]["rows"] == 21
    files = [
        (f, c)
        for c, d in enumerate(["cat", "dog", "emu"])
        for f in sorted((image_folder / d).iterdir())
    ]
    test = seeded_split(len(files), 0.2, 0)
    expected = [
        to_square(Image.open(f), 3, 8) for (f, _), t in zip(files, test, strict=True) if not t
    ]
    images, labels = PreparedSplit(tmp_path / "prepared", "train").read()
    assert np.array_equal(images, np.stack(expected))
    assert labels.tolist() == [c for (_, c), t in zip(files, test, strict=True) if not t]


def test_flat_image_folder_is_unlabeled_and_grayscale_conversion_works(tmp_path, image_folder):
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in (image_folder / "cat").iterdir():
        shutil.copy(f, flat / f.name)
    params = params_for(
        tmp_path,
        source="imagefolder",
        image_dir=str(flat),
        image_labels="none",
        channels=1,
        test_fraction=0.3,  # 7 images: 5 train, 2 test (each split needs 2)
    )
    manifest = prepare(params, progress=False)
    assert manifest["class_names"] == [] and manifest["task"] == "unconditional"
    images, labels = PreparedSplit(tmp_path / "prepared", "train").read()
    assert set(labels.tolist()) == {-1}
    assert images.shape[1:] == (16, 16, 1)


def test_to_square_resizes_the_shorter_side_and_centre_crops():
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, 10:20] = 255  # a white centre third
    out = to_square(Image.fromarray(wide), channels=3, resolution=10)
    assert out.shape == (10, 10, 3)
    assert out.min() == 255  # only the centre third survives the crop
    gray = to_square(Image.fromarray(wide), channels=1, resolution=5)
    assert gray.shape == (5, 5, 1)


# --- bad input: a clear error, and the previous output untouched


@pytest.fixture
def previous_output(tmp_path):
    prepare(params_for(tmp_path), progress=False)
    return tmp_path / "prepared", tree_digest(tmp_path / "prepared")


def assert_untouched(previous):
    out_dir, digest = previous
    assert tree_digest(out_dir) == digest
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(".prepared.")]


def test_empty_folder(tmp_path, previous_output):
    (tmp_path / "empty").mkdir()
    params = params_for(
        tmp_path, source="imagefolder", image_dir=str(tmp_path / "empty"), image_labels="none"
    )
    with pytest.raises(SourceError, match="holds no images"):
        prepare(params, progress=False)
    assert_untouched(previous_output)


def test_folder_without_images(tmp_path, previous_output):
    folder = tmp_path / "docs" / "a"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("not an image")
    params = params_for(tmp_path, source="imagefolder", image_dir=str(tmp_path / "docs"))
    with pytest.raises(SourceError, match=r"holds no images \(looked for .png, .jpg"):
        prepare(params, progress=False)
    assert_untouched(previous_output)


def test_flat_folder_with_folder_labels_is_explained(tmp_path, image_folder, previous_output):
    params = params_for(tmp_path, source="imagefolder", image_dir=str(image_folder / "cat"))
    with pytest.raises(SourceError, match="no class subfolders"):
        prepare(params, progress=False)
    assert_untouched(previous_output)


def test_corrupt_images_fail_listing_them_or_are_skipped_and_counted(
    tmp_path, image_folder, previous_output
):
    (image_folder / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (image_folder / "emu" / "empty.jpg").write_bytes(b"")
    params = params_for(tmp_path, source="imagefolder", image_dir=str(image_folder))
    with pytest.raises(SourceError) as info:
        prepare(params, progress=False)
    message = str(info.value)
    assert "2 unreadable image file(s)" in message
    assert "broken.png" in message and "empty.jpg" in message
    assert "prepare.skip_bad_images: true" in message
    assert_untouched(previous_output)

    skipping = params_for(
        tmp_path, source="imagefolder", image_dir=str(image_folder), skip_bad_images=True
    )
    manifest = prepare(skipping, progress=False)
    assert manifest["skipped_files"]["count"] == 2
    assert sum(s["rows"] for s in manifest["splits"].values()) == 21


def test_single_class_with_a_conditional_model(tmp_path, image_folder, previous_output):
    single = tmp_path / "single"
    shutil.copytree(image_folder / "cat", single / "cat")
    params = params_for(
        tmp_path, model={"conditional": True}, source="imagefolder", image_dir=str(single)
    )
    with pytest.raises(SourceError, match="one class subfolder \\('cat', 7 images\\)"):
        prepare(params, progress=False)
    assert_untouched(previous_output)
    (single / "dog").mkdir()  # a second class whose images are all skipped as unreadable
    for i in range(7):
        (single / "dog" / f"broken{i}.png").write_bytes(b"not a png")
    params = params_for(
        tmp_path,
        model={"conditional": True},
        source="imagefolder",
        image_dir=str(single),
        skip_bad_images=True,
        test_fraction=0.5,
    )
    with pytest.raises(DataError, match="only class 'cat'.*at least two classes"):
        prepare(params, progress=False)
    assert_untouched(previous_output)


def test_torchvision_source_offline_says_which_files_to_place_where(tmp_path):
    params = params_for(tmp_path, source="mnist", raw_dir=str(tmp_path / "raw"))
    try:
        prepare(params, progress=False)
    except SourceError as exc:
        message = str(exc)
    else:
        pytest.skip("this machine could download MNIST, so the offline error cannot show")
    assert "train-images-idx3-ubyte.gz" in message
    assert str(tmp_path / "raw" / "MNIST" / "raw") in message


def ganpipe(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("prepare.resolution=12", "prepare.resolution: must be a power of two"),
        ("prepare.channels=2", "prepare.channels: Input should be 1 or 3"),
        (
            "prepare.source=imagenet",
            "'digits', 'mnist', 'fashion_mnist', 'cifar10' or 'imagefolder'",
        ),
    ],
)
def test_bad_prepare_params_exit_2_and_leave_the_output(
    tmp_path, previous_output, override, message
):
    (tmp_path / "params.yaml").write_text(f"prepare:\n  out_dir: {tmp_path / 'prepared'}\n")
    result = ganpipe("prepare", "--set", override, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert_untouched(previous_output)


def test_source_errors_exit_1_without_a_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text(
        f"prepare:\n  source: imagefolder\n  image_dir: {tmp_path / 'nowhere'}\n"
    )
    result = ganpipe("prepare", cwd=tmp_path)
    assert result.returncode == 1
    assert "is not a directory" in result.stderr and "Traceback" not in result.stderr


def test_interrupted_preparation_leaves_previous_output(tmp_path, previous_output, monkeypatch):
    """Ctrl-C after 700 of 1,797 images: no half-written shard, the old output stays."""
    import pipeline.prepare as stage

    real_load = stage.load_source

    def interrupted(p):
        source = real_load(p)
        items = source.items

        def cut():
            for i, item in enumerate(items):
                if i == 700:
                    raise KeyboardInterrupt
                yield item

        source.items = cut()
        return source

    monkeypatch.setattr(stage, "load_source", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(params_for(tmp_path, seed=5), progress=False)
    assert_untouched(previous_output)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="DVC needs git")
def test_dvc_repro_twice_runs_prepare_once(tmp_path):
    root = clone_project(tmp_path / "ganpipe")
    sh = shell(root, project_env(root))
    first = sh("dvc", "repro", "prepare")
    assert "Running stage 'prepare'" in first.stdout
    manifest = json.loads((root / "data" / "prepared" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 1438
    second = sh("dvc", "repro", "prepare")
    assert "Running stage" not in second.stdout
    assert "didn't change" in second.stdout or "up to date" in second.stdout
    changed = sh("dvc", "repro", "--dry", "prepare")
    assert "Running stage" not in changed.stdout
