"""The data layer on small files written in the real on-disk formats (IDX .gz, CIFAR-100 pickles,
an ImageFolder tree of PNGs), and on Debian's Fashion-MNIST when it is installed."""

import gzip
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import tinyvit_lib.data as data
from tinyvit_lib import (
    AugmentConfig,
    DatasetWithIDs,
    get_CIFAR_100,
    get_dataset,
    get_ImageNet1K,
    get_imagenet_subset_loaders,
    make_loaders,
)
from tinyvit_lib.model import stage_resolutions

FASHION_TRAIN, FASHION_TEST = 12, 6


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    """Pretend Debian's Fashion-MNIST is not installed (and make any download attempt fail)."""
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "no-debian")

    def offline(self):
        raise RuntimeError("no network in the tests")

    monkeypatch.setattr(data.tv_datasets.FashionMNIST, "download", offline)


def write_fashion_mnist(root: Path) -> Path:
    """A small Fashion-MNIST copy in the official IDX .gz format in `root` (12 train, 6 test images,
    two of them identical). Returns `root`."""
    rng = np.random.default_rng(0)
    root.mkdir()
    for prefix, count in (("train", FASHION_TRAIN), ("t10k", FASHION_TEST)):
        images = rng.integers(0, 256, (count, 28, 28))
        images[5] = images[3]  # an exact duplicate, as in the real data
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return root


@pytest.fixture
def fashion_root(tmp_path, no_debian):
    return write_fashion_mnist(tmp_path / "fashion")


def write_cifar100(root: Path) -> Path:
    """A small CIFAR-100 copy in the official pickle format under `root` (10 train, 4 test images);
    its md5 differs from the official release. Returns `root`."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, count in (("train", 10), ("test", 4)):
        entry = {
            "filenames": [f"{split}_{i}.png" for i in range(count)],
            "batch_label": split,
            "fine_labels": [(7 * i) % 100 for i in range(count)],
            "coarse_labels": [i % 20 for i in range(count)],
            "data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        }
        (folder / split).write_bytes(pickle.dumps(entry))
    meta = {
        "fine_label_names": [f"fine{k}" for k in range(100)],
        "coarse_label_names": [f"coarse{k}" for k in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return root


@pytest.fixture
def cifar_root(tmp_path):
    return write_cifar100(tmp_path / "cifar")


@pytest.fixture
def folder_root(tmp_path):
    """root/{train,val}/{ant,bee,cat}/ with PNGs of different sizes and modes."""
    rng = np.random.default_rng(2)
    root = tmp_path / "imagenet"
    for split, per_class in (("train", 4), ("val", 2)):
        for c, name in enumerate(("ant", "bee", "cat")):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20 + i, 24 + c, 3), dtype=np.uint8)
                image = Image.fromarray(pixels) if i % 2 == 0 else Image.fromarray(pixels[..., 0], mode="L")
                image.save(root / split / name / f"img{i}.png")
        (root / split / "ant" / "notes.txt").write_text("not an image")
    return root


def _collect(loader: DataLoader) -> dict[int, tuple[torch.Tensor, int]]:
    return {int(i): (x, int(y)) for xs, ys, ids in loader for x, y, i in zip(xs, ys, ids)}


# ----------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_lengths_labels_ids(fashion_root):
    train = get_dataset("fashion-mnist", fashion_root, "train")
    test = get_dataset("fashion-mnist", fashion_root, "val")  # the held-out split under either name
    assert isinstance(train, DatasetWithIDs)
    assert (len(train), len(test), test.split) == (FASHION_TRAIN, FASHION_TEST, "test")
    assert train.targets == [i % 10 for i in range(FASHION_TRAIN)] and train.num_classes == 10
    image, label, sample_id = train[7]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32 and (label, sample_id) == (7, 7)
    assert train.ids[:2] == ["train/000000", "train/000001"] and test.ids[0] == "test/000000"
    # Identical images keep distinct IDs: positions are never merged.
    assert torch.equal(train.load_image(3), train.load_image(5)) and len(set(train.ids)) == len(train)


def test_grayscale_expands_to_three_identical_channels(fashion_root):
    gray = get_dataset("fashion-mnist", fashion_root, augment=AugmentConfig())
    rgb = get_dataset("fashion-mnist", fashion_root, augment=AugmentConfig(), in_chans=3)
    x1, x3 = gray[4][0], rgb[4][0]
    assert x3.shape == (3, 32, 32)
    assert all(torch.equal(channel, x1[0]) for channel in x3)  # same view for a 1-channel student and an RGB teacher
    with pytest.raises(ValueError, match="in_chans=2"):
        get_dataset("fashion-mnist", fashion_root, in_chans=2)


def test_ids_and_fingerprint_stable_and_content_sensitive(fashion_root, tmp_path):
    first, second = (get_dataset("fashion-mnist", fashion_root) for _ in range(2))
    assert first.ids == second.ids and first.fingerprint() == second.fingerprint()
    assert get_dataset("fashion-mnist", fashion_root, "test").fingerprint() != first.fingerprint()
    # Another copy with one changed pixel: same IDs, different content hash.
    other = tmp_path / "other"
    other.mkdir()
    images = np.stack([first.load_image(i)[0].numpy() for i in range(len(first))])
    images[0, 0, 0] ^= 1
    _write_idx(other / "train-images-idx3-ubyte.gz", images)
    (other / "train-labels-idx1-ubyte.gz").write_bytes((fashion_root / "train-labels-idx1-ubyte.gz").read_bytes())
    changed = get_dataset("fashion-mnist", other).fingerprint()
    assert changed["ids_sha256"] == first.fingerprint()["ids_sha256"]
    assert changed["content_sha256"] != first.fingerprint()["content_sha256"]


@pytest.mark.parametrize("in_chans", [1, 3])
def test_batched_fetch_equals_per_sample(fashion_root, in_chans):
    # A DataLoader fetches whole batches through __getitems__ (the transform's `batch`, once per
    # batch): the same items as indexing one at a time.
    for dataset in (
        get_dataset("fashion-mnist", fashion_root, in_chans=in_chans),
        data.per_class_subset(get_dataset("fashion-mnist", fashion_root, in_chans=in_chans), 2),
        get_dataset("fashion-mnist", fashion_root, in_chans=in_chans, augment=AugmentConfig()),
    ):
        indices = [5, 0, 3, 3, len(dataset) - 1]
        batch = dataset.__getitems__(indices)
        assert [sample_id for _, _, sample_id in batch] == indices
        for (image, label, _sample_id), i in zip(batch, indices):
            expected = dataset[i]
            assert image.shape == (in_chans, 32, 32) and label == expected[1]
            assert torch.equal(image, expected[0])
        with pytest.raises(IndexError, match=f"index={len(dataset)}"):
            dataset.__getitems__([0, len(dataset)])


def test_views_stable_under_shuffle_workers_and_epochs(fashion_root):
    dataset = get_dataset("fashion-mnist", fashion_root, augment=AugmentConfig(), data_seed=3)
    reference = _collect(DataLoader(dataset, batch_size=4))
    shuffled = _collect(DataLoader(dataset, batch_size=3, shuffle=True, num_workers=2))
    assert reference.keys() == shuffled.keys() == set(range(FASHION_TRAIN))
    for sample_id, (image, label) in reference.items():
        assert torch.equal(shuffled[sample_id][0], image) and shuffled[sample_id][1] == label
    # Persistent workers follow set_epoch; epoch 1 gives new views, reproducible in one process.
    loader = DataLoader(dataset, batch_size=4, shuffle=True, num_workers=2, persistent_workers=True)
    assert _collect(loader).keys() == reference.keys()
    dataset.set_epoch(1)
    epoch1 = _collect(loader)
    assert not torch.equal(epoch1[0][0], reference[0][0])
    single = _collect(DataLoader(dataset, batch_size=5))
    assert all(torch.equal(single[i][0], epoch1[i][0]) for i in single)
    assert dataset.seed_for(0) == dataset.seed_for(0, epoch=1) != dataset.seed_for(0, epoch=0)


def test_missing_fashion_mnist_says_both_ways(tmp_path, no_debian):
    for download in (False, True):  # download=True fails: the fixture makes torchvision offline
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as error:
            get_dataset("fashion-mnist", tmp_path / "empty", download=download)
        assert "download=True" in str(error.value) and "empty" in str(error.value)


def test_a_given_fashion_mnist_root_without_the_files_is_an_error_never_another_copy(tmp_path, monkeypatch, no_debian):
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN_DIR", write_fashion_mnist(tmp_path / "debian"))
    assert len(get_dataset("fashion-mnist", download=False)) == FASHION_TRAIN  # no root: Debian's copy
    a_file, empty = tmp_path / "a_file", tmp_path / "empty"
    a_file.write_text("not a folder")
    empty.mkdir()
    for root, download, says in (
        (tmp_path / "nope", True, "does not exist"),
        (a_file, True, "is not a folder"),
        (empty, False, "not found in"),
        (empty, True, "the download into"),  # an existing folder is a download target; the tests are offline
    ):
        with pytest.raises(FileNotFoundError) as error:
            get_dataset("fashion-mnist", root, download=download)
        message = str(error.value)
        assert str(root) in message and says in message, message
        assert "train-images-idx3-ubyte" in message and "train-labels-idx1-ubyte" in message
    assert not (tmp_path / "nope").exists() and list(empty.iterdir()) == []  # nothing written

    def fails_halfway(self):  # as a real download that breaks off: its folders made, then an error
        os.makedirs(self.raw_folder, exist_ok=True)
        raise RuntimeError("connection reset")

    monkeypatch.setattr(data.tv_datasets.FashionMNIST, "download", fails_halfway)
    with pytest.raises(FileNotFoundError, match="connection reset"):
        get_dataset("fashion-mnist", empty, download=True)
    assert list(empty.iterdir()) == []  # what the download made is removed


def test_an_image_folder_given_as_fashion_mnist_is_named_and_left_alone(folder_root, no_debian):
    before = sorted(p.relative_to(folder_root) for p in folder_root.rglob("*"))
    with pytest.raises(FileNotFoundError, match=r"holds an image folder \(train/<class>/...\); read it with dataset"):
        get_dataset("fashion-mnist", folder_root, download=True)
    assert sorted(p.relative_to(folder_root) for p in folder_root.rglob("*")) == before


def test_corrupt_idx_file_is_named(fashion_root):
    (fashion_root / "train-images-idx3-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        get_dataset("fashion-mnist", fashion_root)


# ----------------------------------------------------------------------------- CIFAR-100


def test_cifar100_refuses_a_differing_copy_unless_told(cifar_root):
    with pytest.raises(ValueError, match="differ from the official release") as error:
        get_dataset("cifar100", cifar_root, download=False)
    assert "verify=False" in str(error.value) and "--no-verify-files" in str(error.value)  # Python and CLI
    train = get_dataset("cifar100", cifar_root, "train", verify=False, download=False)
    test = get_dataset("cifar100", cifar_root, "test", verify=False, download=False)
    assert (len(train), len(test), train.num_classes) == (10, 4, 100)
    assert train.targets == [(7 * i) % 100 for i in range(10)] and train.classes[3] == "fine3"
    image, label, sample_id = train[2]
    assert image.shape == (3, 32, 32) and (label, sample_id) == (14, 2)
    # The pixels are the official row-major CHW layout of the pickle's "data" rows.
    row = pickle.loads((cifar_root / "cifar-100-python" / "train").read_bytes())["data"][2]
    assert torch.equal(train.load_image(2), torch.from_numpy(row.reshape(3, 32, 32)))


def test_cifar100_missing_and_loaders(cifar_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        get_dataset("cifar100", tmp_path / "nowhere", download=False)
    train_loader, test_loader = get_CIFAR_100(cifar_root, batch_size=4, verify=False, download=False)
    batches = list(train_loader)
    assert len(batches) == 2 and all(len(b[0]) == 4 for b in batches)  # full batches only
    assert sum(len(b[0]) for b in test_loader) == 4


# ----------------------------------------------------------------------------- image folders


def test_image_folder_ids_labels_and_decoding(folder_root):
    train = get_dataset("imagenet", folder_root, "train", img_size=16)
    val = get_dataset("imagenet", folder_root, "test")
    assert (len(train), len(val), val.split) == (12, 6, "val")
    assert train.classes == ["ant", "bee", "cat"] and train.targets == [0] * 4 + [1] * 4 + [2] * 4
    assert train.ids[:2] == ["train/ant/img0.png", "train/ant/img1.png"]
    assert train.ids == get_dataset("imagenet", folder_root, "train").ids
    image, label, sample_id = train[5]
    assert image.shape == (3, 16, 16) and (label, sample_id) == (1, 5)
    assert train.load_image(1).shape == (3, 21, 24)  # a grayscale PNG is read as RGB
    fingerprint = train.fingerprint()
    (folder_root / "train" / "cat" / "img3.png").write_bytes(b"\x89PNG broken")
    assert train.fingerprint()["content_sha256"] != fingerprint["content_sha256"]
    with pytest.raises(ValueError, match=r"cat/img3\.png"):
        train[11]


def test_imagenet_subset_is_deterministic(folder_root):
    subset = get_dataset("imagenet-subset", folder_root, num_classes=2, files_per_class=3)
    assert subset.classes == ["ant", "bee"] and subset.targets == [0, 0, 0, 1, 1, 1]
    assert subset.ids == [
        "train/ant/img0.png",
        "train/ant/img1.png",
        "train/ant/img2.png",
        "train/bee/img0.png",
        "train/bee/img1.png",
        "train/bee/img2.png",
    ]
    full = get_dataset("imagenet", folder_root, augment=AugmentConfig())
    part = get_dataset("imagenet-subset", folder_root, num_classes=2, files_per_class=3, augment=AugmentConfig())
    assert torch.equal(part[3][0], full[4][0])  # seeds follow the string ID, not the position
    train_loader, val_loader = get_imagenet_subset_loaders(
        folder_root, num_classes=3, max_per_class=1, batch_size=2, img_size=16
    )
    assert len(train_loader.dataset) == 3 and len(val_loader.dataset) == 3
    # The original plan's ImageNet-1k loaders: the whole train/ and val/ trees, the train side augmented
    train_loader, val_loader = get_ImageNet1K(folder_root, batch_size=2, img_size=16, augment=AugmentConfig())
    assert train_loader.dataset.ids == full.ids and val_loader.dataset.ids[0].startswith("val/")
    images, labels, ids = next(iter(val_loader))
    assert images.shape == (2, 3, 16, 16) and torch.equal(images[0], val_loader.dataset[0][0])


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(num_classes=2, files_per_class=0), "files_per_class=0"),
        (dict(num_classes=-1, files_per_class=2), "num_classes=-1"),
        (dict(num_classes=0, files_per_class=2), "num_classes=0"),
        (dict(num_classes=4, files_per_class=2), "num_classes=4"),
        (dict(num_classes=2), "needs files_per_class"),
        (dict(files_per_class=2), "needs num_classes"),
    ],
)
def test_imagenet_subset_bad_sizes(folder_root, options, match):
    with pytest.raises(ValueError, match=match):
        get_dataset("imagenet-subset", folder_root, **options)


def test_image_folder_bad_input(folder_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        get_dataset("imagenet", tmp_path / "missing")
    (folder_root / "train" / "dog").mkdir()
    with pytest.raises(FileNotFoundError, match="dog"):
        get_dataset("imagenet", folder_root)
    with pytest.raises(ValueError, match="root"):
        get_dataset("imagenet", None)


def test_image_folder_links_are_followed_except_loops_and_no_image_counts_twice(folder_root, tmp_path):
    train = folder_root / "train"
    before = get_dataset("imagenet", folder_root)
    (train / "cat" / "loop").symlink_to(".")  # a loop: its images used to be counted over and over
    (train / "bee" / "up").symlink_to("..")  # a loop through the split folder
    (train / "bee" / "self").symlink_to("self")  # a link that leads nowhere (ELOOP): not a folder, not an image
    looped = get_dataset("imagenet", folder_root)
    assert (looped.ids, looped.targets, looped.fingerprint()) == (before.ids, before.targets, before.fingerprint())
    more_ants = tmp_path / "more_ants"  # a link to a folder elsewhere is followed
    more_ants.mkdir()
    shutil.copy(train / "ant" / "img0.png", more_ants / "extra.png")
    (train / "ant" / "more").symlink_to(more_ants)
    linked = get_dataset("imagenet", folder_root)
    assert len(linked) == 13 and linked.targets[linked.ids.index("train/ant/more/extra.png")] == 0
    for link, target, first in (
        (train / "ant" / "bees", "../bee", train / "bee"),  # another class's folder: its images labelled "ant"
        (train / "ant" / "stolen.png", "../cat/img0.png", train / "cat" / "img0.png"),  # another class's image
        (train / "cat" / "ants.png", more_ants / "extra.png", train / "ant" / "more" / "extra.png"),  # reached twice
        (train / "dog", more_ants, train / "ant" / "more"),  # two class folders leading to one place
    ):
        link.symlink_to(target)
        with pytest.raises(ValueError, match="counted twice") as error:
            get_dataset("imagenet", folder_root)
        assert str(link) in str(error.value) and str(first) in str(error.value), str(error.value)
        link.unlink()


def test_class_folders_may_be_links(folder_root, tmp_path):
    farm = tmp_path / "farm"
    for split in ("train", "val"):
        (farm / split).mkdir(parents=True)
        for name in ("ant", "bee", "cat"):
            (farm / split / name).symlink_to(folder_root / split / name)
    for split in ("train", "val"):
        real, linked = get_dataset("imagenet", folder_root, split), get_dataset("imagenet", farm, split)
        assert (linked.ids, linked.targets) == (real.ids, real.targets)
        assert torch.equal(linked.load_image(3), real.load_image(3))


def test_val_class_folders_must_match_train(folder_root):
    shutil.rmtree(folder_root / "val" / "bee")  # labels of cat in val would become bee's
    for name, options in (("imagenet", {}), ("imagenet-subset", dict(num_classes=2, files_per_class=1))):
        with pytest.raises(ValueError, match="missing from val: bee; extra in val: none"):
            get_dataset(name, folder_root, "val", **options)
    (folder_root / "val" / "bee").mkdir()
    shutil.copy(folder_root / "train" / "bee" / "img0.png", folder_root / "val" / "bee")
    (folder_root / "val" / "dog").mkdir()  # would fail with an IndexError after a whole epoch
    shutil.copy(folder_root / "train" / "bee" / "img0.png", folder_root / "val" / "dog")
    with pytest.raises(ValueError, match="missing from val: none; extra in val: dog"):
        get_dataset("imagenet", folder_root, "test")
    assert len(get_dataset("imagenet", folder_root, "train")) == 12  # the training split is not compared
    shutil.rmtree(folder_root / "train")
    assert get_dataset("imagenet", folder_root, "val").classes == ["ant", "bee", "cat", "dog"]  # nothing to compare


def test_undecodable_images_are_named_when_the_dataset_is_built(folder_root):
    train = folder_root / "train"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(train / "ant" / "photo.jpg")  # a real JPEG passes
    (train / "bee" / "empty.png").write_bytes(b"")
    (train / "cat" / "text.png").write_text("not an image")
    (train / "cat" / "gone.png").symlink_to("nowhere.png")
    with pytest.raises(ValueError, match=r"3 of 16 image files") as error:
        get_dataset("imagenet", folder_root)
    message = str(error.value)
    assert "train/bee/empty.png (empty file)" in message and "train/cat/text.png (not a JPEG" in message
    assert "train/cat/gone.png (cannot be read: No such file" in message
    assert len(get_dataset("imagenet", folder_root, check_images="off")) == 16
    for bad in (train / "bee" / "empty.png", train / "cat" / "text.png", train / "cat" / "gone.png"):
        bad.unlink()
    (train / "cat" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short")  # a valid header only
    assert len(get_dataset("imagenet", folder_root)) == 14
    with pytest.raises(ValueError, match=r"1 of 14 .*train/cat/cut\.png"):
        get_dataset("imagenet", folder_root, check_images="decode")
    for i in range(12):
        (folder_root / "val" / "ant" / f"bad{i:02d}.png").write_bytes(b"")
    with pytest.raises(ValueError, match="12 of") as refused:
        get_dataset("imagenet", folder_root, "val")
    assert all(f"val/ant/bad{i:02d}.png (empty file)" in str(refused.value) for i in range(12))  # every one named
    assert "--check-images off" in str(refused.value)
    with pytest.raises(ValueError, match="check_images='fast'"):
        get_dataset("imagenet", folder_root, check_images="fast")


# ----------------------------------------------------------------------------- names, synthetic, loaders


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: get_dataset("mnist"), "name='mnist'"),
        (lambda: get_dataset("synthetic", split="dev"), "split='dev'"),
        (lambda: get_dataset("synthetic", files_per_class=3), "files_per_class=3 does not apply to synthetic"),
        (lambda: get_dataset("synthetic", num_samples=0), "num_samples=0"),
        (lambda: get_dataset("synthetic", augment=AugmentConfig(), transform=lambda x, s: x), "not both"),
    ],
)
def test_bad_names_and_options(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("img_size", [0, data.MIN_IMG_SIZE - 1, data.MAX_IMG_SIZE + 1, 10_000])
def test_img_size_outside_the_supported_range_is_refused(img_size):
    with pytest.raises(ValueError, match=rf"img_size={img_size} is outside \[16, 1024\]"):
        get_dataset("synthetic", img_size=img_size, num_samples=2)


def test_img_size_bounds_are_taken_and_the_minimum_follows_the_model():
    for img_size in (data.MIN_IMG_SIZE, data.MAX_IMG_SIZE):
        assert get_dataset("synthetic", img_size=img_size, num_samples=1)[0][0].shape == (3, img_size, img_size)
    # The first attention stage still sees 2x2 tokens at the minimum; at half of it, a single one.
    assert stage_resolutions(data.MIN_IMG_SIZE)[1] == 2 and stage_resolutions(data.MIN_IMG_SIZE // 2)[1] == 1


def test_synthetic_is_fixed_and_learnable():
    train = get_dataset("synthetic", num_samples=200, transform=lambda image, seed: image)
    test = get_dataset("synthetic", split="test", num_samples=100, transform=lambda image, seed: image)
    assert train.fingerprint() == get_dataset("synthetic", num_samples=200).fingerprint()
    assert train.fingerprint()["content_sha256"] != test.fingerprint()["content_sha256"]
    assert get_dataset("synthetic", augment=AugmentConfig()).transform.config.hflip == 0.0
    # Nearest class mean on raw pixels separates the classes of unseen images.
    x_train = torch.stack([train[i][0] for i in range(len(train))]).flatten(1).float()
    y_train = torch.tensor(train.targets)
    means = torch.stack([x_train[y_train == k].mean(0) for k in range(10)])
    x_test = torch.stack([test[i][0] for i in range(len(test))]).flatten(1).float()
    accuracy = (torch.cdist(x_test, means).argmin(1) == torch.tensor(test.targets)).float().mean()
    assert accuracy > 0.9


def test_training_order_depends_on_seed_and_epoch_only():
    def order(data_seed: int, epoch: int) -> list[int]:
        dataset = get_dataset("synthetic", num_samples=20, data_seed=data_seed)
        dataset.set_epoch(epoch)
        train_loader, _ = make_loaders(dataset, dataset, batch_size=6)
        return [int(i) for _, _, ids in train_loader for i in ids]

    assert order(0, 0) == order(0, 0) and len(order(0, 0)) == 18  # drop_last: full batches only
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    with pytest.raises(ValueError, match="batch_size=0"):
        make_loaders(get_dataset("synthetic", num_samples=4), get_dataset("synthetic", num_samples=4), batch_size=0)


@pytest.mark.skipif(
    not (data.FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_from_debian():
    train = get_dataset("fashion-mnist", download=False)
    test = get_dataset("fashion-mnist", split="test", download=False)
    assert (len(train), len(test)) == (60_000, 10_000)
    assert train.num_classes == 10 and set(train.targets) == set(test.targets) == set(range(10))
    assert train.load_image(0).shape == (1, 28, 28) and train[0][0].shape == (1, 32, 32)
    assert train.fingerprint()["size"] == 60_000


# ----------------------------------------------------------------------------- a run's data: DataSpec


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(dataset="mnist"), "unknown dataset 'mnist'"),
        (dict(augment="heavy"), "unknown augment preset 'heavy'"),
        (dict(mix="cutmix"), "unknown mix preset 'cutmix'"),
        (dict(augment="none", mix="full"), "mix='full' mixes augmented views"),
        (dict(check_images="fast"), "check_images='fast'"),
        (dict(max_per_class=0), "max_per_class=0"),
        (dict(val_per_class=0), "val_per_class=0"),
        (dict(max_val_per_class=-2), "max_val_per_class=-2"),
        # a float seed gives other views than its integer (the seed is hashed as text) under an equal spec
        (dict(data_seed=0.0), "data_seed=0.0 must be an integer"),
        (dict(max_per_class=2.5), "max_per_class=2.5 must be an integer"),
        (dict(max_per_class=True), "max_per_class=True must be an integer"),
        (dict(img_size=32.0), "img_size=32.0 must be an integer"),
    ],
)
def test_data_spec_refuses_bad_values_naming_them(fields, match):
    with pytest.raises(ValueError, match=match):
        data.DataSpec(**fields)


def test_data_spec_fills_img_size_and_a_store_records_the_store_fields_only():
    assert (data.DataSpec(dataset="synthetic").img_size, data.DataSpec(dataset="imagenet").img_size) == (32, 224)
    assert data.DataSpec(dataset="cifar100", img_size=64).img_size == 64
    spec = data.DataSpec(dataset="synthetic", root="/elsewhere", mix="full", max_per_class=3, val_per_class=2)
    assert tuple(spec.for_store()) == data.STORE_FIELDS  # not root, nor how files are checked
    assert spec.for_store() == dict(
        dataset="synthetic", img_size=32, augment="light", mix="full", max_per_class=3, val_per_class=2, data_seed=0
    )


def _per_class(dataset: DatasetWithIDs) -> list[int]:
    return np.bincount(dataset.targets, minlength=dataset.num_classes).tolist()


def test_build_gives_the_pool_the_labelled_set_and_the_validation_set():
    pool, validation = data.build(data.DataSpec(dataset="synthetic", val_per_class=4))
    whole = get_dataset("synthetic")
    assert len(pool) == len(whole) - 40 and _per_class(validation) == [4] * 10
    assert not set(pool.ids) & set(validation.ids) and set(pool.ids) | set(validation.ids) == set(whole.ids)
    assert isinstance(validation.transform, data.EvalTransform) and isinstance(pool.transform, data.TrainTransform)
    spec = data.DataSpec(dataset="synthetic", val_per_class=4, max_per_class=3, max_val_per_class=2)
    labelled, cut = data.build(spec)
    assert _per_class(labelled) == [3] * 10 and set(labelled.ids) <= set(pool.ids)
    assert _per_class(cut) == [2] * 10 and set(cut.ids) <= set(validation.ids)
    assert data.build(spec)[0].fingerprint() == labelled.fingerprint()  # the same images on every call


def test_build_mixes_the_training_views_only_when_the_spec_says():
    spec = data.DataSpec(dataset="synthetic", val_per_class=2, max_per_class=3)
    plain, _ = data.build(spec)
    assert plain.mix is None and isinstance(plain[0][1], int)
    mixed, validation = data.build(data.DataSpec(dataset="synthetic", val_per_class=2, max_per_class=3, mix="full"))
    assert mixed.mix is not None and mixed.mix.config == data.MIX_PRESETS["full"] and validation.mix is None
    targets = torch.stack([target for _, target, _ in mixed.__getitems__(list(range(len(mixed))))])
    assert targets.shape == (30, 10) and torch.allclose(targets.sum(1), torch.ones(30))
    assert (targets.max(1).values < 1).any()  # soft targets: views mixed with partners of other classes


def test_the_test_set_needs_a_carved_validation_set():
    with pytest.raises(ValueError, match="val_per_class=None: this data validates on the held-out split"):
        data.test_set(data.DataSpec(dataset="synthetic"))
    held_out = data.test_set(data.DataSpec(dataset="synthetic", val_per_class=2))
    assert (held_out.split, len(held_out)) == ("test", 256) and isinstance(held_out.transform, data.EvalTransform)


def test_hidden_entries_are_skipped_and_counted(folder_root):
    before = get_dataset("imagenet", folder_root)
    (folder_root / "train" / ".ipynb_checkpoints").mkdir()  # what JupyterLab leaves in a folder it opened
    (folder_root / "train" / ".ipynb_checkpoints" / "img0-checkpoint.png").write_bytes(b"")
    shutil.copy(folder_root / "train" / "ant" / "img0.png", folder_root / "train" / "ant" / ".hidden.png")
    with pytest.warns(UserWarning, match="skipped 1 hidden") as caught:  # both warnings match: none re-emitted
        after = get_dataset("imagenet", folder_root)
    messages = [str(w.message) for w in caught]
    assert any("1 hidden folder(s) (names" in m for m in messages) and any(
        "inside the class folders" in m for m in messages
    )
    assert (after.ids, after.targets, after.classes) == (before.ids, before.targets, before.classes)


def test_an_image_linked_from_another_split_is_refused(folder_root):
    leak = folder_root / "train" / "ant" / "from_val.png"
    leak.symlink_to(folder_root / "val" / "ant" / "img0.png")
    with pytest.raises(ValueError, match="leak between the splits") as error:
        get_dataset("imagenet", folder_root)
    assert str(leak) in str(error.value) and str(folder_root / "val") in str(error.value)
    leak.unlink()
    (folder_root / "val" / "bee" / "train_bees").symlink_to(folder_root / "train" / "bee")  # a folder, the other way
    with pytest.raises(ValueError, match="inside .*train: an image reached from both val/ and train/"):
        get_dataset("imagenet", folder_root, split="val")


def test_write_image_folder_writes_all_or_nothing_and_only_its_own(tmp_path):
    out = tmp_path / "folder"
    data.write_image_folder("synthetic", None, out, per_class=2, held_out_per_class=1)
    assert len(list((out / "train").rglob("*.png"))) == 20 and len(list((out / "val").rglob("*.png"))) == 10
    data.write_image_folder("synthetic", None, out, per_class=1, held_out_per_class=1)  # fewer: replaced whole
    assert len(list((out / "train").rglob("*.png"))) == 10 and not list(tmp_path.glob(".folder.*"))
    for name, per_class, match in (("cifar10", 2, "unknown dataset 'cifar10'"), ("synthetic", 2.5, "per_class=2.5")):
        with pytest.raises(ValueError, match=match):
            data.write_image_folder(name, None, tmp_path / "bad", per_class=per_class, held_out_per_class=1)
    assert not (tmp_path / "bad").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.png").write_bytes(b"keep")
    with pytest.raises(ValueError, match="did not write"):
        data.write_image_folder("synthetic", None, tmp_path / "mine", per_class=1, held_out_per_class=1)
    assert (tmp_path / "mine" / "photo.png").read_bytes() == b"keep"


def test_files_that_are_not_what_they_claim_are_named(tmp_path, folder_root):
    # Fashion-MNIST's IDX files must hold 28x28 images and labels 0..9
    for name, images, labels, match in (
        ("sizes", np.zeros((4, 64, 48)), np.arange(4), "images of 64x48, Fashion-MNIST's are 28x28"),
        ("labels", np.zeros((4, 28, 28)), np.arange(4) + 17, "a label 20: Fashion-MNIST's are 0..9"),
    ):
        (tmp_path / name).mkdir()
        _write_idx(tmp_path / name / "train-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / name / "train-labels-idx1-ubyte.gz", labels)
        with pytest.raises(ValueError, match=match):
            get_dataset("fashion-mnist", tmp_path / name)
    # a 16-bit image would be clipped to 8 bits, not scaled: refused, naming the file
    wide = folder_root / "train" / "bee" / "img9.png"
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(wide)
    assert Image.open(wide).mode.startswith("I")
    with pytest.raises(ValueError, match=r"img9.png.*16-bit or float\) would be clipped"):
        get_dataset("imagenet", folder_root, check_images="decode")
    wide.unlink()
    # a file name that is not UTF-8 cannot become an ID
    (folder_root / "train" / "cat" / os.fsdecode(b"caf\xe9.png")).write_bytes(
        (folder_root / "train/cat/img0.png").read_bytes()
    )
    with pytest.raises(ValueError, match=r"not UTF-8 text \(b'cat/caf\\xe9.png'\)"):
        get_dataset("imagenet", folder_root)
    # indices are integers, not rounded floats; RandAugment has 31 magnitudes
    with pytest.raises(TypeError):
        get_dataset("synthetic", split="train", num_samples=20)[1.7]
    with pytest.raises(ValueError, match=r"randaugment_magnitude=40 must be in \[0, 30\]"):
        AugmentConfig(randaugment_magnitude=40)


def test_epoch_order_shared_out_among_processes():
    dataset = get_dataset("synthetic", split="train", num_samples=103)
    alone = list(data.EpochShuffleSampler(dataset))
    shares = [list(data.EpochShuffleSampler(dataset, rank=r, world_size=2)) for r in range(2)]
    assert sorted(alone) == list(range(103)) and alone != sorted(alone)  # a shuffle of every image
    assert len(shares[0]) == len(shares[1]) == 51 and not set(shares[0]) & set(shares[1])  # disjoint, equal
    assert sorted(shares[0] + shares[1]) == sorted(alone[:102])  # together the one-process order, cut even
    dataset.set_epoch(1)
    assert list(data.EpochShuffleSampler(dataset)) != alone  # a new order each epoch
    dataset.set_epoch(0)
    sampler = data.EpochShuffleSampler(dataset, rank=1, world_size=2)
    sampler.skip(5)  # resuming mid-epoch: this pass only
    assert list(sampler) == shares[1][5:] and list(sampler) == shares[1]
    with pytest.raises(ValueError, match=r"rank=2 must be in \[0, world_size=2\)"):
        data.EpochShuffleSampler(dataset, rank=2, world_size=2)
