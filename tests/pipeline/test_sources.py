"""Image folders read as meant: links, 16-bit and transparent images, decompression bombs, and
folders too small or with too few classes, each refused or handled with a clear message."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.config import validate_params
from pipeline.data import PreparedSplit
from pipeline.prepare import prepare
from pipeline.sources import SourceError


def params_for(tmp_path, image_dir, **prepare_keys):
    keys = {"source": "imagefolder", "image_dir": str(image_dir), "resolution": 8}
    return validate_params(
        {"prepare": {"out_dir": str(tmp_path / "prepared"), **keys, **prepare_keys}}
    )


def gray_folder(root, n=10, value=100, classes=("a", "b")):
    """`n` uniform 8x8 grayscale PNGs per class."""
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (8, 8), value).save(root / name / f"{i}.png")
    return root


def all_pixels(tmp_path):
    images = [PreparedSplit(tmp_path / "prepared", s).read()[0] for s in ("train", "test")]
    return np.concatenate(images)


# --- symbolic links


def test_a_link_to_a_file_outside_the_folder_is_refused_unless_asked_for(tmp_path):
    images = gray_folder(tmp_path / "images")
    outside = tmp_path / "secret.png"
    Image.new("L", (8, 8), 255).save(outside)
    (images / "a" / "link.png").symlink_to(outside)
    with pytest.raises(SourceError) as info:
        prepare(params_for(tmp_path, images), progress=False)
    message = str(info.value)
    assert f"{images / 'a' / 'link.png'} -> {outside}" in message
    assert "prepare.follow_symlinks: true" in message
    assert not (tmp_path / "prepared").exists()
    manifest = prepare(params_for(tmp_path, images, follow_symlinks=True), progress=False)
    assert sum(s["rows"] for s in manifest["splits"].values()) == 21


def test_a_linked_class_folder_is_refused(tmp_path):
    images = gray_folder(tmp_path / "images")
    gray_folder(tmp_path / "elsewhere", classes=("c",))
    (images / "c").symlink_to(tmp_path / "elsewhere" / "c")
    with pytest.raises(SourceError, match=r"symbolic link.*images/c -> .*elsewhere/c"):
        prepare(params_for(tmp_path, images), progress=False)


# --- pixel formats


def test_a_16_bit_grayscale_png_keeps_its_tones(tmp_path):
    images = gray_folder(tmp_path / "images", value=0)
    deep = np.full((8, 8), 32896, dtype=np.uint16)  # 128 * 257: mid-gray in 16 bits
    Image.fromarray(deep).save(images / "a" / "deep.png")
    assert Image.open(images / "a" / "deep.png").mode.startswith("I")
    prepare(params_for(tmp_path, images), progress=False)
    pixels = all_pixels(tmp_path)
    assert sorted(np.unique(pixels).tolist()) == [0, 128]  # was 255: clipped to white


def test_transparency_is_composited_on_white_and_recorded(tmp_path):
    images = gray_folder(tmp_path / "images", value=0)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red...
    rgba[:4, ..., 3] = 0  # ...invisible in the top half
    rgba[4:, ..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(images / "a" / "clear.png")
    manifest = prepare(params_for(tmp_path, images, channels=3), progress=False)
    assert manifest["transparent_files"]["count"] == 1
    assert manifest["transparent_files"]["background"] == "white"
    assert str(images / "a" / "clear.png") in manifest["transparent_files"]["first"]
    pixels = all_pixels(tmp_path).reshape(-1, 8, 8, 3)
    red = [p for p in pixels if p.max() > 0]  # the only image that is not black
    assert len(red) == 1
    assert (red[0][:3] == 255).all()  # transparent: white, not red
    assert (red[0][5:] == [255, 0, 0]).all()  # opaque: red


def png_header_only(path, width, height):
    """A PNG that claims `width` x `height` pixels in a few bytes (a decompression bomb)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [10_000, 20_000])  # Pillow warns above 89M pixels, fails at 179M
def test_a_decompression_bomb_is_a_bad_image(tmp_path, side):
    images = gray_folder(tmp_path / "images")
    png_header_only(images / "b" / "bomb.png", side, side)
    with pytest.raises(SourceError) as info:
        prepare(params_for(tmp_path, images), progress=False)
    assert "1 unreadable image file(s)" in str(info.value)
    assert f"bomb.png (decompression bomb: {side * side} pixels" in str(info.value)
    manifest = prepare(params_for(tmp_path, images, skip_bad_images=True), progress=False)
    assert manifest["skipped_files"]["count"] == 1
    assert "bomb.png" in manifest["skipped_files"]["first"][0]


# --- too little data


def test_a_two_image_folder_is_refused_with_the_sizes_needed(tmp_path):
    images = gray_folder(tmp_path / "images", n=1)
    with pytest.raises(SourceError) as info:
        prepare(params_for(tmp_path, images), progress=False)
    message = str(info.value)
    assert "2 images make a train split of 2 and a test split of 0" in message
    assert "prepare.test_fraction 0.2" in message
    assert "each split needs at least 2 images" in message
    assert "at least 8 images at this test_fraction" in message
    assert not (tmp_path / "prepared").exists()


def test_too_few_images_left_after_skipping_is_refused(tmp_path):
    images = gray_folder(tmp_path / "images", n=1)
    for name in ("a", "b"):
        for i in range(4):
            (images / name / f"bad{i}.png").write_bytes(b"not a png")
    with pytest.raises(SourceError, match=r"after skipping 8 unreadable file\(s\)"):
        prepare(params_for(tmp_path, images, skip_bad_images=True), progress=False)


def test_a_train_split_smaller_than_one_batch_is_reported_at_prepare_time(tmp_path, caplog):
    images = gray_folder(tmp_path / "images")
    prepare(params_for(tmp_path, images), progress=False)
    assert "fewer than one global batch" in caplog.text
    assert "train.batch_size 128 x ray.num_workers 2" in caplog.text


def test_a_single_class_folder_says_what_labels_need(tmp_path):
    images = gray_folder(tmp_path / "images", classes=("cats",))
    with pytest.raises(SourceError) as info:
        prepare(params_for(tmp_path, images), progress=False)
    message = str(info.value)
    assert "one class subfolder ('cats', 10 images)" in message
    assert "labels need at least two" in message
    assert f"prepare.image_dir: {images / 'cats'} with prepare.image_labels: none" in message
    unlabeled = prepare(params_for(tmp_path, images / "cats", image_labels="none"), progress=False)
    assert unlabeled["class_names"] == []
