"""
Augmentation for train_vit.py, on whole batches of tensors on the training device.

  - random_crop_flip: pad-and-crop and left-right flip, the standard small-image augmentation
  - rand_augment: timm's RandAugment (rand-mN-mstd0.5), its 14 ops on [0, 1] images
  - random_erasing: timm's random erasing ('pixel' mode, one box), on normalised images
  - smooth_one_hot, mixup_cutmix: soft targets (label smoothing) and timm's batch Mixup/CutMix
  - augment_images: the in-memory datasets' per-batch pipeline (crop/flip, then RandAugment)

All randomness comes from `rng`, a numpy Generator the trainer seeds per micro-batch, so a
micro-batch is augmented the same whichever rank runs it and whether or not the run resumed.
ImageNet's per-image augmentation is torchvision's (data_vision.load_imagenet).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F


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
    # bilinear weights sum to 1, so only rounding could leave [0, 1]; the clamp removes it
    return (F.grid_sample(x - 0.5, grid, align_corners=False) + 0.5).clamp(0, 1)


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


def _to_uint8_levels(x):
    """The 0-255 integer levels of [0, 1] images (PIL's ops work on these)."""
    return (x * 255).round()


def _op_equalize(x, level, sign):
    """PIL's ImageOps.equalize (timm's Equalize; no magnitude), per image and channel: map
    each of the 256 levels through the histogram's cumulative count, spread evenly over
    0-255. An image and channel whose histogram is a single level (step 0) is left as is."""
    B, C, H, W = x.shape
    levels = _to_uint8_levels(x).long().view(B * C, H * W)
    hist = torch.zeros(B * C, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(1, levels, torch.ones_like(levels))
    # PIL: step = (pixels - count of the highest level present) // 255
    last = 255 - (hist > 0).flip(1).long().argmax(1, keepdim=True)
    step = (H * W - hist.gather(1, last)) // 255                     # [B*C, 1]
    below = hist.cumsum(1) - hist                                    # pixels below each level
    lut = ((below + step // 2) // step.clamp_min(1)).clamp_max(255)
    out = lut.gather(1, levels).to(x.dtype).view(B, C, H, W) / 255
    return torch.where((step > 0).view(B, C, 1, 1), out, x)


def _op_invert(x, level, sign):
    return 1 - x


def _op_solarize(x, level, sign):
    """Invert the levels at or above a threshold that falls from 256 (nothing) at level 0 to
    0 (everything) at level 1 (timm's SolarizeIncreasing)."""
    threshold = 256 * (1 - level)[:, None, None, None]
    return torch.where(_to_uint8_levels(x) >= threshold, 1 - x, x)


def _op_solarize_add(x, level, sign):
    """Add up to 110 levels to the levels below 128, saturating at 255 (timm's SolarizeAdd)."""
    add = (110 / 255) * level[:, None, None, None]
    return torch.where(_to_uint8_levels(x) < 128, (x + add).clamp_max(1), x)


def _op_posterize(x, level, sign):
    """Keep the top 8 - 4*level bits of each level (timm's PosterizeIncreasing)."""
    bits = (8 - (4 * level).floor()).clamp(4, 8)[:, None, None, None]
    step = 2.0 ** (8 - bits)
    return (_to_uint8_levels(x) / step).floor() * step / 255


def _op_sharpness(x, level, sign):
    kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype, device=x.device) / 13
    C = x.shape[1]
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(C, 1, 3, 3), groups=C)
    return _blend(x, smooth, 1 + 0.9 * level * sign)


# timm's RandAugment ops for 'rand-mM-mstd0.5-inc1' (the DyT/ConvNeXt recipe), in timm's
# order: level in [0, 1] (magnitude / 10), sign in {-1, 1} for the signed ones. autocontrast,
# equalize and invert ignore the level; the others are the identity at level 0.
RANDAUG_OPS = {
    "autocontrast": _op_autocontrast,
    "equalize": _op_equalize,
    "invert": _op_invert,
    "rotate": _op_geometric("rotate"),
    "posterize": _op_posterize,
    "solarize": _op_solarize,
    "solarize_add": _op_solarize_add,
    "color": lambda x, level, sign: _blend(x, _grey(x), 1 + 0.9 * level * sign),
    "contrast": lambda x, level, sign: _blend(
        x, _grey(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), 1 + 0.9 * level * sign),
    "brightness": lambda x, level, sign: _blend(x, torch.zeros_like(x), 1 + 0.9 * level * sign),
    "sharpness": _op_sharpness,
    "shear_x": _op_geometric("shear_x"),
    "shear_y": _op_geometric("shear_y"),
    "translate_x": _op_geometric("translate_x"),
    "translate_y": _op_geometric("translate_y"),
}


def rand_augment(x, rng, num_ops, magnitude, magnitude_std=0.5):
    """RandAugment on tensors: each image gets `num_ops` ops drawn uniformly, at magnitude
    `magnitude` of 10 (jittered by a normal of std magnitude_std, timm's 'mstd0.5'), with a
    random sign for the signed ops: timm's RandAugment on a batch (ops in RANDAUG_OPS)."""
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


def augment_images(x, rng, crop_pad, hflip, randaug_n, randaug_m):
    """The in-memory datasets' augmentation of a batch of [0, 1] images: pad-crop and flip,
    then RandAugment (off when randaug_n is 0)."""
    x = random_crop_flip(x, rng, crop_pad, hflip)
    return rand_augment(x, rng, randaug_n, randaug_m) if randaug_n > 0 else x


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

