"""
Train a Vision Transformer with LayerNorm or DyT, from Fashion-MNIST on a laptop CPU to the
DyT paper's ImageNet recipes.

    python train_vit.py --norm dyt              # small ViT on Fashion-MNIST, a few CPU minutes
    python train_vit.py --norm ln               # the LayerNorm baseline
    torchrun --nproc_per_node=8 train_vit.py --preset vit_b_in1k --data_dir /data/imagenet

The generic trainer machinery (flags and presets, distributed setup, LR schedule, AdamW,
DDP wrapping, accumulation arithmetic, atomic checkpoints, logging, NaN guard, alpha readout)
is shared with train_gpt.py in train_common.py. This file holds what is specific to images:

  1. the recipes (presets),
  2. the data: Fashion-MNIST (IDX), CIFAR-10/100 (python pickles), ImageNet (ImageFolder),
  3. augmentation on batches of tensors: crop/flip, RandAugment, random erasing, mixup/cutmix,
  4. the data order: one global permutation per epoch, cut into global batches, then into
     micro-batches that the ranks share, so 1 process and N processes see the same batches,
  5. EMA of the weights, top-1/top-5 evaluation with exact counts across ranks, and the
     DyT readout of the paper's Figure 8 (each layer's alpha against 1/std of its input),
  6. the training loop.

Randomness: every micro-batch draws its augmentation and its stochastic depth from a seed
made of (seed, step, micro-batch index). A micro-batch is then the same whichever rank runs
it and however the run was interrupted, which makes N-process runs equal 1-process runs
(with the same micro-batches) and resumed runs equal uninterrupted ones.
"""

import copy
import dataclasses
import gzip
import math
import os
import pickle
import sys
import tarfile
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import dataclass, field, asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import train_common as tc
from dyt import NORMS
from model import ViT, ViTConfig, VIT_PRESETS, dyt_layers, num_params


class DataError(tc.UserError):
    """Bad or missing data: tc.main_guard prints the message as one line and exits 2."""


# ---------------------------------------------------------------------------------------------
# 1. Config and recipes

DATASETS = {  # name: (classes, channels, image size, per-channel mean, std)
    "fashion_mnist": (10, 1, 28, (0.2860,), (0.3530,)),
    "cifar10": (10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": (100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": (1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet100": (100, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class ViTTrainConfig(tc.TrainConfig):
    """The shared fields of tc.TrainConfig (with ViT defaults) plus data, model and recipe."""
    # tc.TrainConfig's schedule in epochs: warmup_steps and max_steps are derived from these
    # (a --max_steps > 0 cuts the run short and makes the cosine end there)
    epochs: float = 4
    warmup_epochs: float = 0.5
    lr: float = 2e-3
    min_lr_ratio: float = field(default=0.01, metadata={"help": "cosine decays to lr * this"})
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = field(default=1.0, metadata={"help": "0 disables clipping"})
    stop_at: int = field(default=0, metadata={
        "help": "checkpoint and stop after this step, as if interrupted; --resume continues"})
    log_interval: int = 50
    ckpt_interval: int = field(default=100, metadata={
        "help": "steps between checkpoints (0: final only); SIGINT/SIGTERM also save"})
    eval_interval: int = field(default=0, metadata={"help": "steps between evaluations; 0: each epoch"})
    # data
    dataset: str = field(default="fashion_mnist", metadata={"choices": list(DATASETS)})
    data_dir: str = field(default="", metadata={"help": "where the dataset is (see the docs)"})
    download: bool = field(default=True, metadata={
        "help": "Fashion-MNIST only: download once into ~/.cache when not installed"})
    workers: int = field(default=8, metadata={"help": "DataLoader workers (ImageNet)"})
    batch_size: int = field(default=128, metadata={"help": "global batch, over all ranks"})
    micro_batch: int = field(default=0, metadata={
        "help": "per rank and forward pass; 0: batch_size / world size (no accumulation)"})
    eval_batch: int = 500
    # model (model.ViTConfig)
    norm: str = field(default="dyt", metadata={"choices": list(NORMS)})
    alpha0: float = field(default=0.5, metadata={"help": "DyT's alpha init"})
    dyt_gamma0: float = field(default=1.0, metadata={"help": "DyT/Derf gamma init (the papers': 1)"})
    img_size: int = 28
    patch_size: int = 7
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    pool: str = field(default="cls", metadata={"choices": ["cls", "avg"]})
    drop_path: float = field(default=0.0, metadata={"help": "stochastic depth of the last block"})
    # augmentation and regularisation
    crop_pad: int = field(default=2, metadata={"help": "small images: pad and random-crop; 0: off"})
    hflip: bool = True
    randaug_n: int = field(default=0, metadata={"help": "RandAugment ops per image; 0: off"})
    randaug_m: float = field(default=9.0, metadata={"help": "RandAugment magnitude, of 10"})
    reprob: float = field(default=0.0, metadata={"help": "random erasing probability"})
    mixup: float = field(default=0.0, metadata={"help": "mixup Beta alpha; 0: off"})
    cutmix: float = field(default=0.0, metadata={"help": "cutmix Beta alpha; 0: off"})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "cutmix instead of mixup"})
    label_smoothing: float = 0.1
    ema_decay: float = field(default=0.0, metadata={"help": "EMA of the weights; 0: off"})
    dyt_std_interval: int = field(default=0, metadata={
        "help": "steps between DyT alpha & 1/std readouts; 0: at each evaluation"})

    def model_config(self, num_classes, in_chans):
        return ViTConfig(img_size=self.img_size, patch_size=self.patch_size, in_chans=in_chans,
                         num_classes=num_classes, dim=self.dim, depth=self.depth, heads=self.heads,
                         mlp_ratio=self.mlp_ratio, pool=self.pool, drop_path=self.drop_path,
                         norm=self.norm, alpha0=self.alpha0, gamma0=self.dyt_gamma0)


# The DyT paper's ImageNet-1K recipe (from ConvNeXt's codebase), and the ViT study's
# ImageNet-100 one. RandAugment rand-m9-mstd0.5, random erasing 0.25, no gradient clipping.
_IMAGENET = dict(dataset="imagenet", img_size=224, patch_size=16, epochs=300, warmup_epochs=20,
                 weight_decay=0.05, randaug_n=2, randaug_m=9, mixup=0.8, cutmix=1.0,
                 label_smoothing=0.1, reprob=0.25, crop_pad=0, grad_clip=0.0,
                 eval_batch=250, log_interval=100, ckpt_interval=1000)
PRESETS = {
    # the default: a 4-block ViT on 28x28 Fashion-MNIST (16 patches of 7x7), CPU minutes
    "fashion_mnist": dict(),
    "cifar10": dict(dataset="cifar10", img_size=32, patch_size=4, dim=192, depth=6, heads=3,
                    epochs=200, warmup_epochs=10, batch_size=128, lr=1e-3, min_lr_ratio=0.01,
                    crop_pad=4, randaug_n=2, randaug_m=9, mixup=0.8, cutmix=1.0, reprob=0.25,
                    drop_path=0.1, label_smoothing=0.1),
    "vit_b_in1k": dict(_IMAGENET, **VIT_PRESETS["vit_base"], batch_size=4096, lr=4e-3,
                       min_lr_ratio=1e-6 / 4e-3, drop_path=0.1, beta2=0.999, ema_decay=0.9999),
    "vit_l_in1k": dict(_IMAGENET, **VIT_PRESETS["vit_large"], batch_size=4096, lr=4e-3,
                       min_lr_ratio=1e-6 / 4e-3, drop_path=0.4, beta2=0.95, ema_decay=0.9999),
    "vit_t_in100": dict(_IMAGENET, **VIT_PRESETS["vit_tiny"], dataset="imagenet100",
                        batch_size=128, lr=1e-3, min_lr_ratio=1e-6 / 1e-3, drop_path=0.1),
}
PRESETS["cifar100"] = dict(PRESETS["cifar10"], dataset="cifar100")


# ---------------------------------------------------------------------------------------------
# 2. Data. Each loader returns uint8 arrays [N, C, H, W] and int64 labels [N] (train, test),
# kept in memory: the small datasets are a few hundred MB at most.

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


def load_imagenet(data_dir, cfg, classes):
    """ImageFolder datasets (train, val) from data_dir/train/<class>/* and data_dir/val/<class>/*."""
    tv = import_torchvision()
    T = tv.transforms
    if not data_dir:
        raise DataError("ImageNet needs --data_dir DIR with DIR/train/<class>/*.JPEG and "
                        "DIR/val/<class>/*.JPEG (ImageFolder layout)")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(data_dir, split)):
            raise DataError(f"{os.path.join(data_dir, split)} is not a directory; --data_dir "
                            "must hold train/<class>/ and val/<class>/ (ImageFolder layout)")
    _, _, _, mean, std = DATASETS[cfg.dataset]
    train_tf = [T.RandomResizedCrop(cfg.img_size, interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip()]
    if cfg.randaug_n > 0:  # torchvision's magnitude has 31 bins; timm's m9 of 10 is about 27
        train_tf.append(T.RandAugment(cfg.randaug_n, round(cfg.randaug_m * 3),
                                      interpolation=T.InterpolationMode.BICUBIC))
    train_tf += [T.ToTensor(), T.Normalize(mean, std)]
    val_tf = T.Compose([T.Resize(int(cfg.img_size / 0.875), interpolation=T.InterpolationMode.BICUBIC),
                        T.CenterCrop(cfg.img_size), T.ToTensor(), T.Normalize(mean, std)])
    train = tv.datasets.ImageFolder(os.path.join(data_dir, "train"))
    val = tv.datasets.ImageFolder(os.path.join(data_dir, "val"), transform=val_tf)
    if len(train.classes) != len(val.classes):
        raise DataError(f"{data_dir}: train has {len(train.classes)} classes, val "
                        f"{len(val.classes)}; both need the same class folders")
    if len(train.classes) != classes:
        print(f"note: {data_dir} has {len(train.classes)} classes ({cfg.dataset} has {classes}); "
              "using the folder's", file=sys.stderr)
    return SeededImageFolder(train, T.Compose(train_tf)), val, len(train.classes)


# ---------------------------------------------------------------------------------------------
# 3. Augmentation of a batch of float images [B, C, H, W] in [0, 1] (before normalising) or
# normalised (random erasing, mixup/cutmix). All randomness comes from `rng`, a numpy
# Generator seeded per micro-batch.


def random_crop_flip(x, rng, pad, flip):
    """Pad by `pad` pixels and crop back at a random offset (zeros fill); flip left-right
    with probability 1/2. The standard small-image augmentation."""
    B, C, H, W = x.shape
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))
        oy = torch.as_tensor(rng.integers(0, 2 * pad + 1, B), device=x.device)
        ox = torch.as_tensor(rng.integers(0, 2 * pad + 1, B), device=x.device)
        rows = (oy[:, None] + torch.arange(H, device=x.device))[:, :, None]  # [B, H, 1]
        cols = (ox[:, None] + torch.arange(W, device=x.device))[:, None, :]  # [B, 1, W]
        x = xp[torch.arange(B, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = torch.as_tensor(rng.random(B) < 0.5, device=x.device)[:, None, None, None]
        x = torch.where(mask, x.flip(3), x)
    return x


def _affine(x, theta):
    """Apply per-sample 2x3 affine matrices (normalised coordinates), grey (0.5) fill."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x - 0.5, grid, align_corners=False) + 0.5


def _blend(x, other, factor):
    return (other + factor[:, None, None, None] * (x - other)).clamp(0, 1)


def _grey(x):
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def _op_geometric(kind):
    def op(x, level, sign):
        n = x.shape[0]
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        v = level * sign
        if kind == "rotate":  # up to 30 degrees
            a = v * math.radians(30)
            theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin()
            theta[:, 1, 0], theta[:, 1, 1] = a.sin(), a.cos()
        elif kind == "shear_x":  # shear factor up to 0.3
            theta[:, 0, 1] = 0.3 * v
        elif kind == "shear_y":
            theta[:, 1, 0] = 0.3 * v
        elif kind == "translate_x":  # up to 45% of the size (timm's translate_pct); x2 in [-1, 1]
            theta[:, 0, 2] = 2 * 0.45 * v
        elif kind == "translate_y":
            theta[:, 1, 2] = 2 * 0.45 * v
        return _affine(x, theta)
    return op


def _op_autocontrast(x, level, sign):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)


def _op_solarize(x, level, sign):  # invert the pixels above a threshold that falls with level
    return torch.where(x >= (1 - level)[:, None, None, None], 1 - x, x)


def _op_posterize(x, level, sign):  # keep 8 - 4*level bits
    bits = (8 - (4 * level).floor()).clamp(4, 8)[:, None, None, None]
    step = 2.0 ** (8 - bits)
    return ((x * 255).floor() / step).floor() * step / 255


def _op_sharpness(x, level, sign):
    kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype, device=x.device) / 13
    C = x.shape[1]
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(C, 1, 3, 3), groups=C)
    return _blend(x, smooth, 1 + 0.9 * level * sign)


RANDAUG_OPS = {  # level in [0, 1] (magnitude / 10), sign in {-1, 1}
    "identity": lambda x, level, sign: x,
    "autocontrast": _op_autocontrast,
    "rotate": _op_geometric("rotate"),
    "shear_x": _op_geometric("shear_x"),
    "shear_y": _op_geometric("shear_y"),
    "translate_x": _op_geometric("translate_x"),
    "translate_y": _op_geometric("translate_y"),
    "solarize": _op_solarize,
    "posterize": _op_posterize,
    "color": lambda x, level, sign: _blend(x, _grey(x), 1 + 0.9 * level * sign),
    "contrast": lambda x, level, sign: _blend(
        x, _grey(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), 1 + 0.9 * level * sign),
    "brightness": lambda x, level, sign: _blend(x, torch.zeros_like(x), 1 + 0.9 * level * sign),
    "sharpness": _op_sharpness,
}


def rand_augment(x, rng, num_ops, magnitude, magnitude_std=0.5):
    """RandAugment on tensors: each image gets `num_ops` ops drawn uniformly, at magnitude
    `magnitude` of 10 (jittered by a normal of std magnitude_std, timm's 'mstd0.5'), with a
    random sign for the signed ops. timm's op list without equalize (a per-image histogram,
    not worth it here)."""
    names = list(RANDAUG_OPS)
    B = x.shape[0]
    for _ in range(num_ops):
        choice = rng.integers(0, len(names), B)
        level = np.clip(magnitude + magnitude_std * rng.standard_normal(B), 0, 10) / 10
        sign = np.where(rng.random(B) < 0.5, -1.0, 1.0)
        level_t = torch.as_tensor(level, dtype=torch.float32, device=x.device)
        sign_t = torch.as_tensor(sign, dtype=torch.float32, device=x.device)
        out = x.clone()
        for j, name in enumerate(names):
            sel = torch.as_tensor(np.flatnonzero(choice == j), device=x.device)
            if len(sel):
                out[sel] = RANDAUG_OPS[name](x[sel], level_t[sel], sign_t[sel]).to(x.dtype)
        x = out
    return x


def random_erasing(x, rng, prob, area=(0.02, 1 / 3), log_ratio=(math.log(0.3), math.log(1 / 0.3))):
    """timm's random erasing ('pixel' mode, one box): with probability `prob` per image,
    replace a box of random area and aspect ratio by normal noise. x is normalised."""
    B, C, H, W = x.shape
    erase = rng.random(B) < prob
    target = rng.uniform(*area, B) * H * W
    ratio = np.exp(rng.uniform(*log_ratio, B))
    h = np.clip(np.round(np.sqrt(target * ratio)), 1, H).astype(np.int64)
    w = np.clip(np.round(np.sqrt(target / ratio)), 1, W).astype(np.int64)
    top = (rng.random(B) * (H - h + 1)).astype(np.int64)
    left = (rng.random(B) * (W - w + 1)).astype(np.int64)
    dev = x.device
    t = lambda a: torch.as_tensor(a, device=dev)[:, None]
    ys, xs = torch.arange(H, device=dev)[None], torch.arange(W, device=dev)[None]
    in_rows = (ys >= t(top)) & (ys < t(top + h))        # [B, H]
    in_cols = (xs >= t(left)) & (xs < t(left + w))      # [B, W]
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & t(erase)[:, :, None])[:, None]
    noise = torch.as_tensor(rng.standard_normal(x.shape), dtype=x.dtype, device=dev)
    return torch.where(mask, noise, x)


def smooth_one_hot(labels, classes, smoothing):
    """Soft targets: 1 - smoothing on the label, smoothing spread over all classes."""
    out = torch.full((len(labels), classes), smoothing / classes, device=labels.device)
    return out.scatter_add_(1, labels[:, None], torch.full_like(out[:, :1], 1 - smoothing))


def mixup_cutmix(x, targets, rng, mixup_alpha, cutmix_alpha, switch_prob=0.5):
    """timm's batch-mode Mixup: pair each image with the batch reversed, lam ~ Beta(a, a).
    Mixup blends the images; cutmix pastes a box of area (1 - lam) and corrects lam to the
    box's exact area. The targets are blended with the same lam, so each row still sums to 1."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return x, targets
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
    if use_cutmix:
        H, W = x.shape[2:]
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(0, H)), int(rng.integers(0, W))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        x = lam * x + (1 - lam) * x.flip(0)
    return x, lam * targets + (1 - lam) * targets.flip(0)


def soft_cross_entropy(logits, targets):
    """Mean over the batch of -sum(targets * log_softmax(logits)): cross-entropy with soft
    targets (label smoothing and mixup both produce them)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


# ---------------------------------------------------------------------------------------------
# 4. The data order. Epoch e shuffles the training set with a permutation seeded by (seed, e);
# step s of the epoch takes the global batch perm[s*B:(s+1)*B] (the incomplete last batch is
# dropped); the global batch is cut into world*accum micro-batches, numbered k, and rank r runs
# k = r*accum ... r*accum + accum-1. A micro-batch's randomness is seeded by (seed, step, k).


def derived_seed(*parts):
    """A 63-bit seed mixed from integers (numpy's SeedSequence: nearby inputs give unrelated
    seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def epoch_permutation(seed, epoch, n):
    return np.random.default_rng([seed, epoch]).permutation(n)


def micro_batch_indices(perm, step_in_epoch, k, global_batch, micro_batch):
    start = step_in_epoch * global_batch + k * micro_batch
    return perm[start:start + micro_batch]


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

    def batch(self, indices, cfg=None, rng=None):
        """Images (normalised float) and labels; augmented when cfg and rng are given."""
        idx = torch.as_tensor(indices, device=self.images.device)
        x = self.images[idx].float() / 255
        if rng is not None:
            x = random_crop_flip(x, rng, cfg.crop_pad, cfg.hflip)
            if cfg.randaug_n > 0:
                x = rand_augment(x, rng, cfg.randaug_n, cfg.randaug_m)
        return self.normalize(x), self.labels[idx]


class MicroBatchSampler:
    """This rank's micro-batches of one epoch from `start_step` on, as lists of (index, seed)
    for SeededImageFolder: the ImageNet counterpart of micro_batch_indices."""

    def __init__(self, n, cfg, epoch, start_step, steps, rank, accum, micro_batch):
        self.perm = epoch_permutation(cfg.seed, epoch, n)
        self.cfg, self.epoch, self.start, self.steps = cfg, epoch, start_step, steps
        self.rank, self.accum, self.micro = rank, accum, micro_batch

    def __len__(self):
        return (self.steps - self.start) * self.accum

    def __iter__(self):
        for s in range(self.start, self.steps):
            for a in range(self.accum):
                k = self.rank * self.accum + a
                idx = micro_batch_indices(self.perm, s, k, self.cfg.batch_size, self.micro)
                yield [(int(i), derived_seed(self.cfg.seed, self.epoch, int(i), 7)) for i in idx]


def rank_shard(n, rank, world):
    """[start, end) of this rank's contiguous share of n evaluation items; the shares differ
    by at most one item and cover everything exactly once (no padding, no duplicates)."""
    return n * rank // world, n * (rank + 1) // world


# ---------------------------------------------------------------------------------------------
# 5. EMA, evaluation and the DyT readout


class EMA:
    """An exponential moving average of the weights (and buffers), in fp32, updated after every
    optimizer step: ema = decay * ema + (1 - decay) * weights."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        for e, p in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(p.detach(), 1 - self.decay)
            else:
                e.copy_(p)


@torch.no_grad()
def evaluate(model, test, cfg, dist, ctx):
    """(top-1, top-5, loss) on the whole test set: each rank takes its shard and the exact
    counts (correct, total, summed loss) are summed over ranks."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64)  # top-1 correct, top-5 correct, n, loss sum
    for x, y in test_batches(test, cfg, dist):
        with ctx:
            logits = model(x)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == y[:, None]
        counts += torch.tensor([hits[:, 0].sum().item(), hits.any(1).sum().item(), len(y),
                                F.cross_entropy(logits, y, reduction="sum").item()],
                               dtype=torch.float64)
    tc.all_reduce_sum(counts)
    model.train(was_training)
    n = max(counts[2].item(), 1)
    return counts[0].item() / n, counts[1].item() / n, counts[3].item() / n


def test_batches(test, cfg, dist):
    """This rank's share of the test set in batches of eval_batch: normalised, not augmented."""
    start, end = rank_shard(len(test), dist.rank, dist.world_size)
    if isinstance(test, InMemoryImages):
        for i in range(start, end, cfg.eval_batch):
            yield test.batch(np.arange(i, min(i + cfg.eval_batch, end)))
    else:
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(test, range(start, end)), batch_size=cfg.eval_batch,
            num_workers=cfg.workers, pin_memory=dist.device.type == "cuda")
        for x, y in loader:
            yield x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)


@torch.no_grad()
def dyt_readout(model, probe, ctx):
    """Each DyT layer's alpha and 1/std of its input on a fixed probe batch (the DyT paper's
    Figure 8: alpha tracks 1/std during training), with the model in eval mode (no drop path)."""
    if not dyt_layers(model):
        return {}
    was_training = model.training
    model.eval()

    def forward():
        with ctx:
            model(probe)
    try:
        out = tc.dyt_input_inv_stds(model, forward)
    finally:
        model.train(was_training)
    return {**tc.dyt_alphas(model), **out}


# ---------------------------------------------------------------------------------------------
# 6. Training


def load_data(cfg, device):
    """(train, test, num_classes, in_chans): InMemoryImages for the small datasets, seeded
    ImageFolders for ImageNet."""
    classes, chans, size, mean, std = DATASETS[cfg.dataset]
    if cfg.dataset.startswith("imagenet"):
        train, test, classes = load_imagenet(cfg.data_dir, cfg, classes)
        return train, test, classes, chans
    if cfg.dataset == "fashion_mnist":
        arrays = load_fashion_mnist(cfg.data_dir, cfg.download)
    else:
        arrays = load_cifar(cfg.data_dir, classes)
    train_x, train_y, test_x, test_y = arrays
    if train_x.shape[2:] != (size, size):
        raise DataError(f"{cfg.dataset}: images are {train_x.shape[2:]}, expected {size}x{size}")
    if cfg.img_size != size:
        raise tc.UserError(f"--img_size {cfg.img_size}: {cfg.dataset} images are {size}x{size}; "
                           f"use --preset {cfg.dataset}, or --img_size {size}")
    return (InMemoryImages(train_x, train_y, mean, std, device),
            InMemoryImages(test_x, test_y, mean, std, device), classes, chans)


def check_flags(cfg):
    """One-line errors for flag values the parser's types cannot catch."""
    if cfg.img_size % cfg.patch_size:
        raise tc.UserError(f"--img_size {cfg.img_size} is not a multiple of --patch_size "
                           f"{cfg.patch_size}; pick a patch size that divides it")
    if cfg.dim % cfg.heads:
        raise tc.UserError(f"--dim {cfg.dim} is not a multiple of --heads {cfg.heads}")
    for name in ("epochs", "batch_size", "eval_batch", "depth", "dim", "heads", "alpha0", "dyt_gamma0"):
        if getattr(cfg, name) <= 0:
            raise tc.UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("reprob", "label_smoothing", "mixup_switch_prob", "drop_path"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise tc.UserError(f"--{name} must be in [0, 1], got {getattr(cfg, name)}")
    if not 0 <= cfg.ema_decay < 1:
        raise tc.UserError(f"--ema_decay must be in [0, 1), got {cfg.ema_decay}")


@tc.trainer
def main(argv=None):
    cfg, preset, given = tc.parse_config(ViTTrainConfig, PRESETS, argv, default_preset="fashion_mnist",
                                     description="Train a ViT with LayerNorm or DyT.")
    check_flags(cfg)
    cfg.out_dir = cfg.out_dir or os.path.join("out", f"vit_{cfg.norm}")
    if cfg.fsdp:
        raise tc.UserError("--fsdp is for train_gpt.py; ViTs up to L train with DDP")
    _, signals = tc.start_run(cfg.out_dir, os.path.join(cfg.out_dir, "ckpt.pt"), cfg.resume)
    dist = tc.setup_distributed(cfg.device)
    device, main_rank = dist.device, dist.is_main
    tc.seed_everything(cfg.seed, dist.rank)
    if device.type == "cuda":
        tc.setup_tf32()
    ctx = tc.autocast_context(device, cfg.dtype)
    train, test, classes, chans = load_data(cfg, device)

    # Batch arithmetic and the schedule in steps.
    micro = cfg.micro_batch or cfg.batch_size // dist.world_size
    accum = tc.accumulation_steps(cfg.batch_size, micro, dist.world_size, unit="images")
    steps_per_epoch = len(train) // cfg.batch_size
    if steps_per_epoch == 0:
        raise tc.UserError(f"--batch_size {cfg.batch_size} is larger than the training set "
                           f"({len(train)} images); lower it")
    total_steps = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if "warmup_steps" in given else round(cfg.warmup_epochs * steps_per_epoch)
    schedule = dataclasses.replace(cfg, max_steps=total_steps, warmup_steps=warmup)

    # The model: the same seed on every rank gives the same initial weights.
    model_cfg = cfg.model_config(classes, chans)
    torch.manual_seed(cfg.seed)
    model = ViT(model_cfg).to(device)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    optimizer = tc.build_optimizer(model, cfg, device)
    guard = tc.LossGuard(cfg.explode_factor)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    step = 0
    if cfg.resume:
        state = tc.load_checkpoint(ckpt_path, config=asdict(model_cfg))
        if state.get("batch_size") != cfg.batch_size:
            raise tc.UserError(f"{ckpt_path} was trained with --batch_size {state.get('batch_size')}; "
                               "resume with the same global batch (or another --out_dir)")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.model.load_state_dict(state["ema"])
        guard.load_state_dict(state["guard"])
        step = state["step"]
        tc.restore_rng_state(state["rng"])
        if step >= total_steps:
            if main_rank:
                print(tc.finished_message(ckpt_path, step, total_steps), flush=True)
            tc.teardown_distributed()
            return {}
    train_model = tc.wrap_ddp(model, dist)
    if cfg.compile:
        train_model = torch.compile(train_model)

    logger = tc.RunLogger(cfg.out_dir, cfg, enabled=main_rank, use_wandb=cfg.wandb,
                          project=cfg.wandb_project, name=cfg.run_name,
                          resume_step=step if cfg.resume else None)
    probe = (test.batch(np.arange(min(256, len(test))))[0] if isinstance(test, InMemoryImages)
             else next(iter(torch.utils.data.DataLoader(test, batch_size=64)))[0].to(device))
    if main_rank:
        print(f"preset {preset}: ViT {model_cfg.dim}x{model_cfg.depth} norm={cfg.norm}, "
              f"{num_params(model):,} parameters; {cfg.dataset} {len(train)} train / {len(test)} "
              f"test; global batch {cfg.batch_size} = {dist.world_size} ranks x {micro} x {accum} "
              f"accumulation; {total_steps} steps ({steps_per_epoch}/epoch); device {device}",
              flush=True)

    def checked_save(step, x, targets):
        # the loss of the weights about to be saved, on the step's last micro-batch: a
        # checkpoint is written only from a finite, non-exploding state (tc.checkpoint_problem)
        model.eval()
        with torch.no_grad(), ctx:
            probe = soft_cross_entropy(model(x), targets).item()
        model.train()
        last = ckpt_path if os.path.exists(ckpt_path) else None
        tc.guarded_save(save, step, last, model, optimizer, guard, probe)

    def save(step):
        if main_rank:
            tc.save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "ema": ema.model.state_dict() if ema is not None else None,
                "step": step, "batch_size": cfg.batch_size, "guard": guard.state_dict(),
                "rng": tc.capture_rng_state(), "model_config": asdict(model_cfg),
                "config": tc.config_dict(cfg)})
        tc.barrier()

    def run_eval(step, final=False):
        # The plain model, not DDP's wrapper: ranks may run different numbers of eval batches.
        row = {"step": step, "epoch": step / steps_per_epoch}
        row["test_top1"], row["test_top5"], row["test_loss"] = evaluate(model, test, cfg, dist, ctx)
        if ema is not None:
            row["ema_top1"], row["ema_top5"], row["ema_loss"] = evaluate(ema.model, test, cfg, dist, ctx)
        if main_rank:
            row.update(dyt_readout(model, probe, ctx))
            logger.log(row)
            ema_text = f", EMA top-1 {row['ema_top1']:.4f}" if ema is not None else ""
            print(f"{'final' if final else 'eval'} step {step} epoch {row['epoch']:.2f}: test "
                  f"top-1 {row['test_top1']:.4f} top-5 {row['test_top5']:.4f} loss "
                  f"{row['test_loss']:.4f}{ema_text}", flush=True)
        return row

    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=step, disable=not main_rank, dynamic_ncols=True,
               desc=f"train {cfg.norm}")
    is_folder = not isinstance(train, InMemoryImages)
    timer, images_since, perm, perm_epoch, loader_iter = time.perf_counter(), 0, None, -1, None
    row = {}
    train_model.train()
    while step < total_steps:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:  # a new epoch, or the first one after a resume
            perm_epoch = epoch
            if is_folder:
                steps_this_epoch = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
                sampler = MicroBatchSampler(len(train), cfg, epoch, step_in_epoch, steps_this_epoch,
                                            dist.rank, accum, micro)
                loader_iter = iter(torch.utils.data.DataLoader(
                    train, batch_sampler=sampler, num_workers=cfg.workers,
                    pin_memory=device.type == "cuda", persistent_workers=False))
            else:
                perm = epoch_permutation(cfg.seed, epoch, len(train))
        lr = tc.lr_at(step, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for a in range(accum):
            k = dist.rank * accum + a
            # This micro-batch's randomness (augmentation, mixup, drop path): from (seed, step, k).
            rng = np.random.default_rng(derived_seed(cfg.seed, step, k))
            torch.manual_seed(derived_seed(cfg.seed, step, k, 1))
            if is_folder:
                x, y = next(loader_iter)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            else:
                x, y = train.batch(micro_batch_indices(perm, step_in_epoch, k, cfg.batch_size, micro),
                                   cfg, rng)
            if cfg.reprob > 0:
                x = random_erasing(x, rng, cfg.reprob)
            targets = smooth_one_hot(y, classes, cfg.label_smoothing)
            x, targets = mixup_cutmix(x, targets, rng, cfg.mixup, cfg.cutmix, cfg.mixup_switch_prob)
            # DDP all-reduces gradients only on the last micro-batch of the step.
            skip_sync = a < accum - 1 and hasattr(train_model, "no_sync")
            with train_model.no_sync() if skip_sync else nullcontext():
                with ctx:
                    loss = soft_cross_entropy(train_model(x), targets) / accum
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = tc.clip_grad_norm(model, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        # The step's loss: the mean over the global batch (each rank's mean, averaged).
        loss_value = float(tc.all_reduce_sum(loss_sum.clone()).item()) / dist.world_size
        step += 1
        images_since += cfg.batch_size
        guard.check(loss_value, step, ckpt_path if os.path.exists(ckpt_path) else None)
        bar.update(1)
        if step % cfg.log_interval == 0 or step == total_steps:
            elapsed = time.perf_counter() - timer
            row = {"step": step, "epoch": step / steps_per_epoch, "loss": loss_value, "lr": lr,
                   "grad_norm": grad_norm, "images_per_s": images_since / max(elapsed, 1e-9)}
            if cfg.dyt_std_interval == 0:
                row.update(tc.dyt_alphas(model))
            if main_rank:
                logger.log(row)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                                img_s=f"{row['images_per_s']:.0f}")
            timer, images_since = time.perf_counter(), 0
        if cfg.dyt_std_interval and step % cfg.dyt_std_interval == 0 and main_rank:
            logger.log({"step": step, **dyt_readout(model, probe, ctx)})
        end_of_epoch = step % steps_per_epoch == 0 and step < total_steps
        if (cfg.eval_interval and step % cfg.eval_interval == 0) or (not cfg.eval_interval and end_of_epoch):
            run_eval(step)
            timer = time.perf_counter()  # images/s counts training only
        if signals.should_stop(device) and step < total_steps:
            checked_save(step, x, targets)
            bar.close()
            logger.close()
            raise tc.Interrupted(f"{signals.name()} at step {step}: saved {ckpt_path}; continue "
                                 "with the same command and --resume", signals.exit_code())
        if step == cfg.stop_at and step < total_steps:
            checked_save(step, x, targets)
            bar.close()
            logger.close()
            tc.teardown_distributed()
            return row
        if cfg.ckpt_interval and step % cfg.ckpt_interval == 0 and step < total_steps:
            checked_save(step, x, targets)
            timer = time.perf_counter()
    bar.close()
    final = run_eval(step, final=True)
    checked_save(step, x, targets)
    logger.close()
    tc.teardown_distributed()
    return final


if __name__ == "__main__":
    tc.main_guard(main)
