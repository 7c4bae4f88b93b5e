"""Image-caption data on small real files: folders, img2dataset tar shards, errors, and DataLoader workers."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import CAPTIONS, SAMPLES, SIZE, TALL, make_folder, make_shards, write_sample
from torch.utils.data import DataLoader

from ecviz.data.imagetext import FolderImageText, TarImageText, collate, expand_braces, load_imagetext


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "folder")


@pytest.fixture
def shards(folder, tmp_path) -> Path:
    return make_shards(folder, tmp_path / "shards")


def one_line_error(fn, *words: str) -> str:
    """fn() raises a ValueError whose message is one line containing every word."""
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_folder_items(folder):
    ds = FolderImageText(folder, size=SIZE)
    assert len(ds) == 3 and ds.keys == sorted(CAPTIONS)
    assert ds.skipped_no_caption == 1 and ds.skipped_examples == ["00001/000000003"]
    for i, key in enumerate(ds.keys):
        item = ds[i]
        assert item["key"] == key and item["caption"] == CAPTIONS[key]
        assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1 and item["image"].max() <= 1


def test_short_side_resized_then_centre_cropped(folder):
    ds = FolderImageText(folder, size=SIZE)
    wide = ds[0]["image"]  # 128x64 -> 64x32, crop columns 16..47: red 0..3, green 4..27, red 28..31
    assert torch.allclose(wide[:, 16, 16], torch.tensor([-1.0, 1.0, -1.0]), atol=0.02)
    assert torch.allclose(wide[:, 16, 1], torch.tensor([1.0, -1.0, -1.0]), atol=0.05)
    assert torch.allclose(wide[:, 16, 30], torch.tensor([1.0, -1.0, -1.0]), atol=0.05)
    tall = ds[1]["image"]  # 48x64 -> 32x43: red left half, blue right half
    assert torch.allclose(tall[:, 16, 4], torch.tensor([1.0, -1.0, -1.0]), atol=0.05)
    assert torch.allclose(tall[:, 16, 27], torch.tensor([-1.0, -1.0, 1.0]), atol=0.05)


def test_sixteen_bit_grey_and_exif_orientation_load_as_a_viewer_shows_them(tmp_path):
    """A 16-bit greyscale PNG went through Pillow's convert("RGB"), which clips at 255: mid-grey (32768) and even
    near-black (1000) loaded as white. A JPEG whose EXIF says "rotate 90°" loaded as stored, on its side."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "odd"
    root.mkdir()
    for name, value in (("grey", 32768), ("dark", 1000)):
        Image.fromarray(np.full((SIZE, SIZE), value, np.uint16)).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"a {name} square")
    tall = np.zeros((2 * SIZE, SIZE, 3), np.uint8)
    tall[:SIZE] = (255, 0, 0)  # stored: red on top, blue below
    tall[SIZE:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown turned 90° clockwise, so red on the right
    Image.fromarray(tall).save(root / "turned.jpg", exif=exif, quality=95)
    (root / "turned.txt").write_text("a turned photo")
    items = {item["key"]: item["image"] for item in FolderImageText(root, size=SIZE)}
    assert abs(items["grey"].mean().item()) < 0.01 and items["grey"].std() < 1e-6
    assert items["dark"].max() < -0.96
    turned = items["turned"]  # (3, SIZE, SIZE) centre crop of the shown 2S wide image: its middle, red right
    assert turned[0, :, -2].mean() > 0.8 and turned[2, :, 1].mean() > 0.8


def test_order_is_deterministic(folder, tmp_path):
    other = tmp_path / "other"
    for key in SAMPLES:  # same files written in the opposite order
        write_sample(other, key, *SAMPLES[key])
    a, b = FolderImageText(folder), FolderImageText(other)
    assert a.keys == b.keys == sorted(a.keys)
    assert [a[i]["caption"] for i in range(len(a))] == [b[i]["caption"] for i in range(len(b))]


def test_folder_errors(tmp_path):
    one_line_error(lambda: FolderImageText(tmp_path / "nope"), "data folder", "nope", "not found")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: FolderImageText(tmp_path / "empty"), "no image-caption pairs", "(0 images")
    write_sample(tmp_path / "uncaptioned", "x", TALL, "png", None)
    write_sample(tmp_path / "uncaptioned", "sub/y", TALL, "png", None)
    one_line_error(lambda: FolderImageText(tmp_path / "uncaptioned"), "(2 images without a .txt caption)")
    write_sample(tmp_path / "twice", "a", TALL, "jpg", "a red circle")  # two images, one caption: two items
    write_sample(tmp_path / "twice", "a", TALL, "png", "a red circle")  # of one key, before
    one_line_error(lambda: FolderImageText(tmp_path / "twice"), "a.jpg and a.png share the caption a.txt")


def test_an_image_deleted_after_listing_is_gone_not_corrupt(folder):
    ds = FolderImageText(folder, 16)
    ds.paths[0].unlink()
    one_line_error(lambda: ds[0], "000000000.png: gone (deleted or moved")


def test_hidden_files_are_not_items(folder, tmp_path):
    """macOS's ._name.png beside name.png (a resource fork, not an image) stopped a run as a corrupt image; hidden
    files and folders are left out, in a folder as in its shards."""
    before = FolderImageText(folder, 16).keys
    (folder / "00000" / "._000000000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / "00000" / "._000000000.txt").write_bytes(b"\x00\x05\x16\x07")
    write_sample(folder / "00001" / ".thumbs", "x", TALL, "png", "a hidden thumbnail")
    ds = FolderImageText(folder, 16)
    assert ds.keys == before
    ds.verify()
    tars = TarImageText(sorted(make_shards(folder, tmp_path / "shards").glob("*.tar")), 16)
    assert tars.keys == before
    tars.verify()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image(folder, damage):
    bad = folder / "00000" / "000000001.png"
    data = bad.read_bytes()
    bad.write_bytes(b"not an image at all" if damage == "garbage" else data[: len(data) // 2])
    ds = FolderImageText(folder)  # building does not decode images
    one_line_error(lambda: ds[1], "corrupt image", str(bad))
    assert ds[0]["image"].shape == (3, SIZE, SIZE)
    one_line_error(ds.verify, "corrupt image", str(bad))


def test_caption_not_utf8(folder):
    (folder / "00000" / "000000000.txt").write_bytes("caf\xe9".encode("latin-1"))
    ds = FolderImageText(folder)
    one_line_error(lambda: ds[0], "000000000.txt", "UTF-8")
    one_line_error(ds.verify, "000000000.txt", "UTF-8")


def test_tar_matches_folder(folder, shards):
    with tarfile.open(shards / "00000.tar") as tf:
        assert "00000/000000000.json" in tf.getnames()
    f, t = FolderImageText(folder), TarImageText(shards)
    assert t.keys == f.keys and len(t) == len(f) == 3
    assert t.skipped_no_caption == 1 and t.skipped_examples == ["00001/000000003"]
    for i in range(len(f)):
        a, b = f[i], t[i]
        assert a["caption"] == b["caption"] and a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"])
    t.verify()


def test_shard_specs(shards):
    assert expand_braces("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert expand_braces("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    one = TarImageText(shards / "00000.tar")
    assert one.keys == ["00000/000000000", "00000/000000001"]
    pattern = TarImageText(f"{shards}/{{00000..00001}}.tar")
    listed = TarImageText([shards / "00001.tar", shards / "00000.tar"])
    assert pattern.keys == listed.keys == TarImageText(shards).keys == sorted(CAPTIONS)
    assert [str(p) for p in pattern.shards] == [str(shards / "00000.tar"), str(shards / "00001.tar")]


def test_tar_errors(shards, tmp_path):
    one_line_error(lambda: TarImageText(f"{shards}/{{00000..00002}}.tar"), "shard", "00002.tar", "not found")
    (tmp_path / "fake.tar").write_text("this is not a tar archive\n" * 40)
    one_line_error(lambda: TarImageText(tmp_path / "fake.tar"), "shard", "fake.tar", "not a tar file")
    with tarfile.open(tmp_path / "nocaps.tar", "w") as tf:
        tf.add(shards / "00000.tar", arcname="x/1.json")
    one_line_error(lambda: TarImageText(tmp_path / "nocaps.tar"), "no image-caption pairs")
    data = (shards / "00001.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:2000])  # cut inside the first member's data
    one_line_error(lambda: TarImageText(tmp_path / "cut.tar"), "shard", "cut.tar", "corrupt tar")
    # cut inside a later header, or between two members: tarfile ends its listing there without a word, and the
    # run trained on the members before the cut
    with tarfile.open(shards / "00000.tar") as tf:
        members = tf.getmembers()
    head = (shards / "00000.tar").read_bytes()
    for cut, n in ((members[2].offset + 100, 2), (members[2].offset, 2)):
        (tmp_path / "short.tar").write_bytes(head[:cut])
        one_line_error(lambda: TarImageText(tmp_path / "short.tar"), "short.tar", f"cut short after {n} members")
    shrinking = tmp_path / "shrinking.tar"
    shrinking.write_bytes(data)
    ds = TarImageText(shrinking)
    shrinking.write_bytes(data[:1024])  # the file changed after indexing
    one_line_error(lambda: ds[0], "shrinking.tar", "truncated at 00001/000000002.jpg")


def test_tar_corrupt_image(tmp_path):
    src = tmp_path / "src"
    write_sample(src, "00000/000000000", TALL, "png", "fine")
    (src / "00000" / "000000001.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (src / "00000" / "000000001.txt").write_text("broken")
    ds = TarImageText(make_shards(src, tmp_path / "shards"))
    assert ds[0]["caption"] == "fine"
    one_line_error(lambda: ds[1], "corrupt image", "00000.tar:00000/000000001.jpg")
    one_line_error(ds.verify, "corrupt image", "000000001.jpg")


def test_dataloader_workers(shards):
    ds = TarImageText(shards)
    expected = {ds[i]["key"]: ds[i]["image"] for i in range(len(ds))}  # leaves cached handles in this process
    copy = pickle.loads(pickle.dumps(ds))
    assert torch.equal(copy[2]["image"], expected[copy.keys[2]])
    seen = {}
    for batch in DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate):
        assert batch["image"].shape[1:] == (3, SIZE, SIZE) and len(batch["caption"]) == len(batch["key"])
        for key, caption, image in zip(batch["key"], batch["caption"], batch["image"], strict=True):
            assert caption == CAPTIONS[key]
            seen[key] = image
    assert seen.keys() == expected.keys()
    assert all(torch.equal(seen[k], expected[k]) for k in seen)


def test_load_imagetext_dispatch(folder, shards, tmp_path):
    assert isinstance(load_imagetext(str(folder), SIZE), FolderImageText)
    assert isinstance(load_imagetext(str(shards), SIZE), TarImageText)
    assert isinstance(load_imagetext(str(shards / "00001.tar"), SIZE), TarImageText)
    pattern = load_imagetext(f"{shards}/{{00000..00001}}.tar", 16)
    assert isinstance(pattern, TarImageText) and pattern[0]["image"].shape == (3, 16, 16)
    one_line_error(lambda: load_imagetext(str(tmp_path / "missing"), SIZE), "missing", "not found")
    one_line_error(lambda: load_imagetext(str(tmp_path / "missing.tar"), SIZE), "shard", "not found")
    (tmp_path / "notes.csv").write_text("a,b\n")
    one_line_error(lambda: load_imagetext(str(tmp_path / "notes.csv"), SIZE), "notes.csv", "not a folder")
    write_sample(shards, "loose/x", TALL, "png", "a loose image")  # read as shards alone, this was left out
    one_line_error(lambda: load_imagetext(str(shards), SIZE), "holds .tar shards and loose images (loose/x.png)")
