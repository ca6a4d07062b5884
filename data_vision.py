"""
Image data for train_vit.py: the datasets, and the order in which the trainer sees them.

  - Fashion-MNIST (IDX files: --data_dir, else Debian's dataset-fashion-mnist, else one
    download), CIFAR-10/100 (the python-pickle archive or its folder) and ImageNet
    (ImageFolder; needs torchvision). Every file is checked; a missing or corrupt one is a
    one-line DataError naming it and the fix.
  - InMemoryImages: the small datasets as uint8 tensors on the training device, cut into
    batches by indexing (a DataLoader would only add copies).
  - The data order, like data.TokenLoader for text: epoch e shuffles the training set with a
    permutation seeded by (seed, e); step s of the epoch takes the global batch
    perm[s*B:(s+1)*B] (an incomplete last batch is dropped); the global batch is cut into
    world*accum micro-batches, numbered k, and rank r runs k = r*accum ... r*accum + accum-1.
    A micro-batch's randomness is seeded by (seed, step, k), so it is the same whichever rank
    runs it and whether or not the run was resumed. ImageLoader yields a rank's micro-batches;
    test_batches its share of the test set.
"""

import gzip
import math
import os
import pickle
import sys
import tarfile
import urllib.request

import numpy as np
import torch

from train_common import UserError


class DataError(UserError):
    """Bad or missing data: train_common.main_guard prints the message as one line, exits 2."""


DATASETS = {  # name: (classes, channels, image size, per-channel mean, std)
    "fashion_mnist": (10, 1, 28, (0.2860,), (0.3530,)),
    "cifar10": (10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": (100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": (1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet100": (100, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


# ---------------------------------------------------------------------------------------------
# Datasets. Each small-dataset loader returns uint8 arrays [N, C, H, W] and int64 labels [N]
# (train, test), kept in memory: they are a few hundred MB at most.


FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian: dataset-fashion-mnist
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 0x00000803, 0x00000801  # unsigned bytes, 3 / 1 dims


def read_idx(path, magic):
    """An IDX file (gzip or raw) as a uint8 array, its header checked against its size."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip raises OSError (BadGzipFile) or EOFError if cut
        raise DataError(f"{path}: cannot read it ({e}); delete it and reinstall or re-download")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path}: not an IDX file of the expected kind (bad magic number); "
                        "delete it and reinstall or re-download")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != math.prod(shape):
        raise DataError(f"{path}: header says {shape} ({math.prod(shape)} bytes) but the file "
                        f"holds {len(raw) - header}; it is truncated or corrupt, re-download it")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_idx(directory, stem):
    """The path of an IDX file under its usual names (.gz or raw, '-' or '.' before idx)."""
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def download_fashion_mnist(cache_dir):
    """Best effort, once: fetch the four .gz files into cache_dir. Returns True on success."""
    os.makedirs(cache_dir, exist_ok=True)
    try:
        for stems in FASHION_MNIST_FILES.values():
            for stem in stems:
                target = os.path.join(cache_dir, stem + ".gz")
                if not os.path.exists(target):
                    print(f"downloading {stem}.gz to {cache_dir}", file=sys.stderr)
                    with urllib.request.urlopen(FASHION_MNIST_URL + stem + ".gz", timeout=20) as r:
                        data = r.read()
                    with open(target + ".tmp", "wb") as f:
                        f.write(data)
                    os.replace(target + ".tmp", target)  # never leave a half file under the name
        return True
    except OSError:
        return False


def load_fashion_mnist(data_dir, download=True):
    """(train_x, train_y, test_x, test_y) from --data_dir, else the Debian package's
    directory, else a cache filled by one download (when online and allowed)."""
    cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "dyt", "fashion-mnist")
    if data_dir:
        candidates = [data_dir]
    else:
        candidates = [FASHION_MNIST_SYSTEM_DIR, cache_dir]
    directory = next((d for d in candidates if find_idx(d, FASHION_MNIST_FILES["train"][0])), None)
    if directory is None and not data_dir and download and download_fashion_mnist(cache_dir):
        directory = cache_dir
    if directory is None:
        where = data_dir or f"{FASHION_MNIST_SYSTEM_DIR} or {cache_dir}"
        raise DataError(f"Fashion-MNIST not found in {where}: install it with "
                        "`apt-get install dataset-fashion-mnist`, or pass --data_dir DIR holding "
                        "train-images-idx3-ubyte.gz and the other three IDX files")
    arrays = []
    for split, (images_stem, labels_stem) in FASHION_MNIST_FILES.items():
        paths = [find_idx(directory, images_stem), find_idx(directory, labels_stem)]
        for path, stem in zip(paths, (images_stem, labels_stem)):
            if path is None:
                raise DataError(f"{directory}: {stem}(.gz) is missing; reinstall "
                                "dataset-fashion-mnist or put all four IDX files there")
        images, labels = read_idx(paths[0], IDX_IMAGES_MAGIC), read_idx(paths[1], IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise DataError(f"{paths[1]}: {len(labels)} labels for {len(images)} images in "
                            f"{paths[0]}; one of them is corrupt, re-download both")
        if labels.size and labels.max() >= 10:
            raise DataError(f"{paths[1]}: label {labels.max()} is out of range 0-9; the file is "
                            "corrupt, re-download it")
        arrays += [images[:, None], labels.astype(np.int64)]
    return tuple(arrays)


def load_cifar(data_dir, classes):
    """CIFAR-10/100 from the standard python-pickle archive: the .tar.gz, or its extracted
    folder (cifar-10-batches-py / cifar-100-python), or a directory holding either."""
    folder = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
    archive = "cifar-10-python.tar.gz" if classes == 10 else "cifar-100-python.tar.gz"
    train_names = [f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else ["train"]
    test_names = ["test_batch"] if classes == 10 else ["test"]
    label_key = b"labels" if classes == 10 else b"fine_labels"
    hint = (f"pass --data_dir pointing at {archive} or the folder {folder} "
            f"(from https://www.cs.toronto.edu/~kriz/cifar.html)")
    if not data_dir:
        raise DataError(f"CIFAR-{classes} needs its data: {hint}")
    members = {}
    if os.path.isfile(data_dir) or os.path.isfile(os.path.join(data_dir, archive)):
        path = data_dir if os.path.isfile(data_dir) else os.path.join(data_dir, archive)
        try:
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    if os.path.basename(m.name) in train_names + test_names:
                        members[os.path.basename(m.name)] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable CIFAR archive ({e}); re-download it")
    else:
        base = data_dir if os.path.basename(data_dir.rstrip("/")) == folder else os.path.join(data_dir, folder)
        for name in train_names + test_names:
            if os.path.isfile(os.path.join(base, name)):
                with open(os.path.join(base, name), "rb") as f:
                    members[name] = f.read()
    out = []
    for names in (train_names, test_names):
        xs, ys = [], []
        for name in names:
            if name not in members:
                raise DataError(f"{data_dir}: CIFAR-{classes} file {name} is missing; {hint}")
            try:
                d = pickle.loads(members[name], encoding="bytes")
                x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                y = np.asarray(d[label_key], dtype=np.int64)
            except Exception as e:  # any unpickling failure means the same thing to the user
                raise DataError(f"{name} in {data_dir}: not a CIFAR-{classes} batch "
                                f"({type(e).__name__}); re-download the archive")
            if len(x) != len(y) or (y.size and (y.min() < 0 or y.max() >= classes)):
                raise DataError(f"{name} in {data_dir}: labels do not match the images; "
                                "re-download the archive")
            xs.append(x)
            ys.append(y)
        out += [np.concatenate(xs), np.concatenate(ys)]
    return tuple(out)


def import_torchvision():
    try:
        import torchvision  # optional: only the ImageNet path decodes JPEGs
        return torchvision
    except ImportError:
        raise DataError("ImageNet needs torchvision to decode JPEGs: pip install torchvision")


class SeededImageFolder(torch.utils.data.Dataset):
    """An ImageFolder whose random transform is seeded per item: items are (index, seed)
    pairs from MicroBatchSampler, so a sample's augmentation does not depend on which worker
    or rank loads it, nor on whether the run was resumed."""

    def __init__(self, folder, transform):
        self.folder, self.transform = folder, transform

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, item):
        index, seed = item
        path, label = self.folder.samples[index]
        image = self.folder.loader(path)
        torch.manual_seed(seed)  # torchvision's random transforms draw from torch's RNG
        return self.transform(image), label


def load_imagenet(data_dir, dataset, img_size, randaug_n, randaug_m):
    """ImageFolder datasets (train, val, classes) from data_dir/train/<class>/* and
    data_dir/val/<class>/*; train's transform is seeded per image (SeededImageFolder)."""
    tv = import_torchvision()
    T = tv.transforms
    if not data_dir:
        raise DataError("ImageNet needs --data_dir DIR with DIR/train/<class>/*.JPEG and "
                        "DIR/val/<class>/*.JPEG (ImageFolder layout)")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(data_dir, split)):
            raise DataError(f"{os.path.join(data_dir, split)} is not a directory; --data_dir "
                            "must hold train/<class>/ and val/<class>/ (ImageFolder layout)")
    classes, _, _, mean, std = DATASETS[dataset]
    train_tf = [T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip()]
    if randaug_n > 0:  # torchvision's magnitude has 31 bins; timm's m9 of 10 is about 27
        train_tf.append(T.RandAugment(randaug_n, round(randaug_m * 3),
                                      interpolation=T.InterpolationMode.BICUBIC))
    train_tf += [T.ToTensor(), T.Normalize(mean, std)]
    val_tf = T.Compose([T.Resize(int(img_size / 0.875), interpolation=T.InterpolationMode.BICUBIC),
                        T.CenterCrop(img_size), T.ToTensor(), T.Normalize(mean, std)])
    train = tv.datasets.ImageFolder(os.path.join(data_dir, "train"))
    val = tv.datasets.ImageFolder(os.path.join(data_dir, "val"), transform=val_tf)
    if len(train.classes) != len(val.classes):
        raise DataError(f"{data_dir}: train has {len(train.classes)} classes, val "
                        f"{len(val.classes)}; both need the same class folders")
    if len(train.classes) != classes:
        print(f"note: {data_dir} has {len(train.classes)} classes ({dataset} has {classes}); "
              "using the folder's", file=sys.stderr)
    return SeededImageFolder(train, T.Compose(train_tf)), val, len(train.classes)




class InMemoryImages:
    """A small dataset held as uint8 [N, C, H, W] on the training device. Batches are cut by
    indexing and augmented on the device, whole-batch: a DataLoader would only add copies."""

    def __init__(self, images, labels, mean, std, device):
        self.images = torch.from_numpy(np.array(images)).to(device)  # a writable copy
        self.labels = torch.from_numpy(np.array(labels)).to(device)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __len__(self):
        return len(self.labels)

    def normalize(self, x):
        return (x - self.mean) / self.std

    def batch(self, indices, augment=None):
        """Images (normalised float) and labels; augment(x) acts on the [0, 1] images first."""
        idx = torch.as_tensor(indices, device=self.images.device)
        x = self.images[idx].float() / 255
        if augment is not None:
            x = augment(x)
        return self.normalize(x), self.labels[idx]


def load_images(dataset, data_dir, device, img_size, download=True, randaug_n=0, randaug_m=9.0):
    """(train, test, classes, channels): InMemoryImages for the small datasets, ImageFolders
    for ImageNet (whose RandAugment is torchvision's, set by randaug_n/randaug_m)."""
    classes, chans, size, mean, std = DATASETS[dataset]
    if dataset.startswith("imagenet"):
        train, test, classes = load_imagenet(data_dir, dataset, img_size, randaug_n, randaug_m)
        return train, test, classes, chans
    if dataset == "fashion_mnist":
        arrays = load_fashion_mnist(data_dir, download)
    else:
        arrays = load_cifar(data_dir, classes)
    train_x, train_y, test_x, test_y = arrays
    if train_x.shape[2:] != (size, size):
        raise DataError(f"{dataset}: images are {train_x.shape[2:]}, expected {size}x{size}")
    if img_size != size:
        raise UserError(f"--img_size {img_size}: {dataset} images are {size}x{size}; "
                        f"use --preset {dataset}, or --img_size {size}")
    return (InMemoryImages(train_x, train_y, mean, std, device),
            InMemoryImages(test_x, test_y, mean, std, device), classes, chans)


# ---------------------------------------------------------------------------------------------
# The data order


def derived_seed(*parts):
    """A 63-bit seed mixed from integers (numpy's SeedSequence: nearby inputs give unrelated
    seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def epoch_permutation(seed, epoch, n):
    return np.random.default_rng([seed, epoch]).permutation(n)


def micro_batch_indices(perm, step_in_epoch, k, global_batch, micro_batch):
    start = step_in_epoch * global_batch + k * micro_batch
    return perm[start:start + micro_batch]


class MicroBatchSampler:
    """This rank's micro-batches of one epoch from `start_step` on, as lists of (index, seed)
    for SeededImageFolder: the folder counterpart of micro_batch_indices."""

    def __init__(self, n, seed, global_batch, epoch, start_step, steps, rank, accum, micro_batch):
        self.perm = epoch_permutation(seed, epoch, n)
        self.seed, self.global_batch, self.epoch = seed, global_batch, epoch
        self.start, self.steps = start_step, steps
        self.rank, self.accum, self.micro = rank, accum, micro_batch

    def __len__(self):
        return (self.steps - self.start) * self.accum

    def __iter__(self):
        for s in range(self.start, self.steps):
            for a in range(self.accum):
                k = self.rank * self.accum + a
                idx = micro_batch_indices(self.perm, s, k, self.global_batch, self.micro)
                yield [(int(i), derived_seed(self.seed, self.epoch, int(i), 7)) for i in idx]


class ImageLoader:
    """This rank's micro-batches of each training step, the image counterpart of
    data.TokenLoader. next_step(step) yields accum (x, y, rng) where rng is the micro-batch's
    numpy Generator, seeded by (seed, step, k), for the trainer's batch-level augmentation
    (random erasing, mixup); torch's RNG is seeded from the same numbers just before each
    micro-batch is yielded, for the model's stochastic depth. The step is the whole state,
    so a resumed run continues exactly.

    In-memory datasets are indexed and augmented by `augment(x, rng)` on [0, 1] images before
    normalising; folders are read by a DataLoader per epoch with per-image seeded transforms."""

    def __init__(self, data, global_batch, micro_batch, accum, rank, seed, total_steps, device,
                 augment=None, workers=0):
        self.data, self.global_batch, self.micro, self.accum = data, global_batch, micro_batch, accum
        self.rank, self.seed, self.total_steps, self.device = rank, seed, total_steps, device
        self.augment, self.workers = augment, workers
        self.steps_per_epoch = len(data) // global_batch
        self._epoch, self._perm, self._folder_iter, self._next = None, None, None, None

    def next_step(self, step):
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch or step != self._next:  # a new epoch, or a resume
            self._start_epoch(epoch, step_in_epoch)
        self._next = step + 1
        for a in range(self.accum):  # lazily: each micro-batch's seeds are set just before use
            k = self.rank * self.accum + a
            rng = np.random.default_rng(derived_seed(self.seed, step, k))
            torch.manual_seed(derived_seed(self.seed, step, k, 1))
            if isinstance(self.data, InMemoryImages):
                idx = micro_batch_indices(self._perm, step_in_epoch, k, self.global_batch, self.micro)
                augment = None if self.augment is None else lambda x: self.augment(x, rng)
                x, y = self.data.batch(idx, augment)
            else:
                x, y = next(self._folder_iter)
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield x, y, rng

    def _start_epoch(self, epoch, step_in_epoch):
        self._epoch = epoch
        if isinstance(self.data, InMemoryImages):
            self._perm = epoch_permutation(self.seed, epoch, len(self.data))
            return
        last = min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)
        sampler = MicroBatchSampler(len(self.data), self.seed, self.global_batch, epoch,
                                    step_in_epoch, last, self.rank, self.accum, self.micro)
        self._folder_iter = iter(torch.utils.data.DataLoader(
            self.data, batch_sampler=sampler, num_workers=self.workers,
            pin_memory=self.device.type == "cuda"))


def rank_shard(n, rank, world):
    """[start, end) of this rank's contiguous share of n evaluation items; the shares differ
    by at most one item and cover everything exactly once (no padding, no duplicates)."""
    return n * rank // world, n * (rank + 1) // world


def test_batches(test, batch, rank, world, device, workers=0):
    """This rank's share of the test set in batches: normalised, not augmented."""
    start, end = rank_shard(len(test), rank, world)
    if isinstance(test, InMemoryImages):
        for i in range(start, end, batch):
            yield test.batch(np.arange(i, min(i + batch, end)))
    else:
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(test, range(start, end)), batch_size=batch,
            num_workers=workers, pin_memory=device.type == "cuda")
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
