"""data_vision.py: the IDX, CIFAR-pickle loaders on synthetic files (and the real
Fashion-MNIST where installed); a corrupt or missing file is a DataError naming it; the
training batches are the same for any world size and after a resume; the evaluation shards
cover every test image once."""

import gzip
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch

from data_vision import (DataError, ImageLoader, InMemoryImages, load_cifar, load_fashion_mnist,
                         rank_shard, read_idx, IDX_IMAGES_MAGIC, FASHION_MNIST_SYSTEM_DIR)


def write_idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(data)


def synthetic_images(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    # class c: grey level 25c + 10 with noise, visible in every patch (learnt in a few steps)
    images = 25 * labels[:, None, None] + rng.integers(0, 20, (n, 28, 28))
    return images, labels


def write_fashion_mnist(d, n_train=40, n_test=7):
    for split, n in (("train", n_train), ("t10k", n_test)):
        images, labels = synthetic_images(n, seed=len(split))
        write_idx(str(d / f"{split}-images-idx3-ubyte.gz"), images, 0x803)
        write_idx(str(d / f"{split}-labels-idx1-ubyte.gz"), labels, 0x801)


def test_rank_shards_cover_every_item_once():
    for n, world in ((63, 2), (10, 3), (2, 4), (10000, 8)):
        shards = [rank_shard(n, r, world) for r in range(world)]
        assert sum(e - s for s, e in shards) == n
        assert all(shards[i][1] == shards[i + 1][0] for i in range(world - 1))


def test_corrupt_idx_files(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    write_fashion_mnist(bad)
    assert load_fashion_mnist(str(bad))[0].shape == (40, 1, 28, 28)
    # corrupt: truncated gzip, bad magic, wrong size, labels/images count mismatch
    images = bad / "train-images-idx3-ubyte.gz"
    good = images.read_bytes()
    images.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_fashion_mnist(str(bad))
    write_idx(str(images), np.zeros((5, 28, 28)), 0x801)  # a labels magic on an images file
    with pytest.raises(DataError, match="bad magic"):
        load_fashion_mnist(str(bad))
    with gzip.open(images, "wb") as f:  # a header promising more than the file has
        f.write((0x803).to_bytes(4, "big") + (40).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
                + bytes(100))
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_fashion_mnist(str(bad))
    write_idx(str(images), np.zeros((39, 28, 28)), 0x803)
    with pytest.raises(DataError, match="39 images"):
        load_fashion_mnist(str(bad))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path / "nowhere"))


def test_cifar_pickles_from_folder_and_archive(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (7, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, 7))}
        (folder / name).write_bytes(pickle.dumps(batch))
    train_x, train_y, test_x, test_y = load_cifar(str(tmp_path), 10)
    assert train_x.shape == (35, 3, 32, 32) and test_x.shape == (7, 3, 32, 32)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    shutil.rmtree(folder)
    from_archive = load_cifar(str(tmp_path / "cifar-10-python.tar.gz"), 10)
    np.testing.assert_array_equal(from_archive[0], train_x)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load_cifar(str(tmp_path), 10)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_SYSTEM_DIR), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    train_x, train_y, test_x, test_y = load_fashion_mnist("", download=False)
    assert train_x.shape == (60000, 1, 28, 28) and test_x.shape == (10000, 1, 28, 28)
    assert sorted(np.unique(train_y)) == list(range(10)) and len(test_y) == 10000
    images = read_idx(os.path.join(FASHION_MNIST_SYSTEM_DIR, "t10k-images-idx3-ubyte.gz"), IDX_IMAGES_MAGIC)
    assert images.dtype == np.uint8 and images.max() == 255


class SeededToyFolder(torch.utils.data.Dataset):
    """Stands in for SeededImageFolder: items are (index, seed) pairs from MicroBatchSampler."""

    def __len__(self):
        return 20

    def __getitem__(self, item):
        index, seed = item
        return torch.tensor([float(index), float(seed % 997)]), index


@pytest.mark.parametrize("kind", ["memory", "folder"])
def test_image_loader_same_batches_for_any_world_size_and_after_resume(kind):
    cpu = torch.device("cpu")
    if kind == "memory":
        images, _ = synthetic_images(20, seed=0)  # labelled by index, to count draws below
        data = InMemoryImages(images[:, None], np.arange(20), (0.5,), (0.25,), cpu)
    else:
        data = SeededToyFolder()

    def loader(accum, rank):  # global batch 8 = (world x accum) micro-batches of 2; 2 steps/epoch
        return ImageLoader(data, 8, 2, accum, rank, 1, 5, cpu,
                           augment=lambda x, rng: x + float(rng.random()))

    def step_batches(loaders, step):
        return [(x.tolist(), y.tolist(), rng.random()) for l in loaders for x, y, rng in l.next_step(step)]
    one, two = loader(4, 0), [loader(2, 0), loader(2, 1)]
    seen = []
    for step in range(5):  # across three epochs
        a = step_batches([one], step)
        assert a == step_batches(two, step)
        seen.append(a)
    assert step_batches([loader(4, 0)], 3) == seen[3]  # a fresh loader: a resumed run
    epoch0 = sorted(y for s in seen[:2] for _, ys, _ in s for y in ys)
    assert len(set(epoch0)) == 16  # an epoch draws without replacement
