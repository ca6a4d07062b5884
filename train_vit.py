"""
Train a Vision Transformer with LayerNorm or DyT, from Fashion-MNIST on a laptop CPU to the
DyT paper's ImageNet recipes.

    python train_vit.py --norm dyt              # small ViT on Fashion-MNIST, a few CPU minutes
    python train_vit.py --norm ln               # the LayerNorm baseline
    python train_vit.py eval --ckpt out/vit_dyt # a checkpoint's test top-1/top-5/loss
    torchrun --nproc_per_node=8 train_vit.py --preset vit_b_in1k --data_dir /data/imagenet

The recipe is the DyT paper's (ConvNeXt's codebase): AdamW, linear warmup then cosine, label
smoothing, RandAugment, random erasing, mixup/cutmix, stochastic depth, EMA of the weights.
The schedule is given in epochs; a run shorter than twice its warmup has the warmup clipped
to half the run (and says so), so that the learning rate always reaches its peak. The global
batch is given in images; each rank runs batch / (world * micro_batch) micro-steps and the
loss is averaged over them, so any world size trains the same model. The images and their
order are in data_vision.py, augmentation in augment.py; what the trainers share is in
train_common.py, a run's safety in run.py, its checkpoints in checkpoint.py.
"""

import copy
import dataclasses
import os
import sys
from dataclasses import dataclass, field, asdict

import numpy as np
import torch
import torch.nn.functional as F

import data_vision
import train_common as tc
from run import Run
from train_common import UserError
from augment import augment_images, mixup_cutmix, random_erasing, smooth_one_hot
from data_vision import DATASETS, ImageLoader, InMemoryImages
from dyt import fold_norms, use_kernel
from model import ViT, ViTConfig, VIT_PRESETS, dyt_layers, num_params

# A run shorter than twice its warmup would spend most of itself (or all of it) below the peak
# lr: its warmup is clipped to this fraction of the run. Half leaves the recipes' own runs
# unchanged, and the 1-epoch ablations too (0.5 warmup epochs of 1).
MAX_WARMUP_FRACTION = 0.5


@dataclass
class ViTTrainConfig(tc.TrainConfig):
    """The shared fields of tc.TrainConfig (with ViT defaults) plus data, model and recipe."""
    # tc.TrainConfig's schedule in epochs: warmup_steps and max_steps are derived from these
    # (a --max_steps > 0 cuts the run short and makes the cosine end there)
    epochs: float = 16
    warmup_epochs: float = 0.5
    lr: float = 2e-3
    min_lr_ratio: float = field(default=0.01, metadata={"help": "cosine decays to lr * this"})
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = field(default=1.0, metadata={"help": "0 disables clipping"})
    log_interval: int = 50
    ckpt_interval: int = field(default=500, metadata={
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
    # the model: a 4-block ViT of width 64 on 28x28 images (16 patches of 7x7), mean-pooled.
    # Tuned for a short CPU run (docs/vit.md): at a fixed cost, a narrower model for more
    # epochs beat the width-128 one for fewer, and alpha0 1 beat the papers' 0.5
    model: ViTConfig = field(default_factory=lambda: ViTConfig(img_size=28, patch_size=7, dim=64,
                                                               depth=4, heads=4, pool="avg", norm="dyt",
                                                               alpha0=1.0))
    # augmentation and regularisation: none by default; at 16 epochs on Fashion-MNIST a shifted
    # crop, a flip (its shoes all face left) or label smoothing each cost accuracy (docs/vit.md)
    crop_pad: int = field(default=0, metadata={"help": "small images: pad and random-crop; 0: off"})
    hflip: bool = False
    randaug_n: int = field(default=0, metadata={"help": "RandAugment ops per image; 0: off"})
    randaug_m: float = field(default=9.0, metadata={"help": "RandAugment magnitude, of 10"})
    reprob: float = field(default=0.0, metadata={"help": "random erasing probability"})
    mixup: float = field(default=0.0, metadata={"help": "mixup Beta alpha; 0: off"})
    cutmix: float = field(default=0.0, metadata={"help": "cutmix Beta alpha; 0: off"})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "cutmix instead of mixup"})
    label_smoothing: float = 0.0
    ema_decay: float = field(default=0.0, metadata={"help": "EMA of the weights; 0: off"})
    dyt_std_interval: int = field(default=0, metadata={
        "help": "steps between DyT alpha & 1/std readouts; 0: at each evaluation"})

    def model_config(self, num_classes, in_chans):
        return dataclasses.replace(self.model, num_classes=num_classes, in_chans=in_chans)


# The DyT paper's ImageNet-1K recipe (from ConvNeXt's codebase), and the ViT study's
# ImageNet-100 one. RandAugment rand-m9-mstd0.5, random erasing 0.25, no gradient clipping.
_IMAGENET = dict(dataset="imagenet", img_size=224, patch_size=16, epochs=300, warmup_epochs=20,
                 weight_decay=0.05, randaug_n=2, randaug_m=9, mixup=0.8, cutmix=1.0,
                 label_smoothing=0.1, reprob=0.25, crop_pad=0, grad_clip=0.0, pool="cls", alpha0=0.5,
                 eval_batch=250, log_interval=100, ckpt_interval=1000)
PRESETS = {
    # the default: a 4-block ViT on 28x28 Fashion-MNIST (16 patches of 7x7), CPU minutes
    "fashion_mnist": dict(),
    "cifar10": dict(dataset="cifar10", img_size=32, patch_size=4, dim=192, depth=6, heads=3,
                    epochs=200, warmup_epochs=10, batch_size=128, lr=1e-3, min_lr_ratio=0.01,
                    crop_pad=4, hflip=True, randaug_n=2, randaug_m=9, mixup=0.8, cutmix=1.0, reprob=0.25,
                    drop_path=0.1, label_smoothing=0.1, pool="cls", alpha0=0.5),
    "vit_b_in1k": dict(_IMAGENET, **VIT_PRESETS["vit_base"], batch_size=4096, lr=4e-3,
                       min_lr_ratio=1e-6 / 4e-3, drop_path=0.1, beta2=0.999, ema_decay=0.9999),
    "vit_l_in1k": dict(_IMAGENET, **VIT_PRESETS["vit_large"], batch_size=4096, lr=4e-3,
                       min_lr_ratio=1e-6 / 4e-3, drop_path=0.4, beta2=0.95, ema_decay=0.9999),
    "vit_t_in100": dict(_IMAGENET, **VIT_PRESETS["vit_tiny"], dataset="imagenet100",
                        batch_size=128, lr=1e-3, min_lr_ratio=1e-6 / 1e-3, drop_path=0.1),
}
PRESETS["cifar100"] = dict(PRESETS["cifar10"], dataset="cifar100")


def check_flags(cfg):
    """One-line errors for flag values the parser's types cannot catch."""
    m = cfg.model
    if m.img_size % m.patch_size:
        raise UserError(f"--img_size {m.img_size} is not a multiple of --patch_size "
                        f"{m.patch_size}; pick a patch size that divides it")
    if m.dim % m.heads:
        raise UserError(f"--dim {m.dim} is not a multiple of --heads {m.heads}")
    for flag, value in (("epochs", cfg.epochs), ("batch_size", cfg.batch_size),
                        ("eval_batch", cfg.eval_batch), ("depth", m.depth), ("dim", m.dim),
                        ("heads", m.heads), ("alpha0", m.alpha0), ("dyt_gamma0", m.gamma0)):
        tc.need(value > 0, flag, value, "positive")
    for flag, value in (("reprob", cfg.reprob), ("label_smoothing", cfg.label_smoothing),
                        ("mixup_switch_prob", cfg.mixup_switch_prob), ("drop_path", m.drop_path)):
        tc.need(0 <= value <= 1, flag, value, "in [0, 1]")
    tc.need(0 <= cfg.ema_decay < 1, "ema_decay", cfg.ema_decay, "in [0, 1)")
    if cfg.fsdp:
        raise UserError("--fsdp is for train_gpt.py; ViTs up to L train with DDP")


def derive_steps(cfg, steps_per_epoch, given):
    """(steps, warmup steps, note) from the epochs, or from --max_steps / --warmup_steps when
    given. A warmup longer than MAX_WARMUP_FRACTION of the run is clipped to it; the note
    says so (None otherwise)."""
    steps = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if "warmup_steps" in given else round(cfg.warmup_epochs * steps_per_epoch)
    cap = int(MAX_WARMUP_FRACTION * steps)
    if warmup <= cap:
        return steps, warmup, None
    note = (f"note: the warmup ({warmup} steps) is longer than {MAX_WARMUP_FRACTION:.0%} of this "
            f"{steps}-step run; clipped to {cap} steps so that the lr reaches its peak")
    return steps, cap, note


def batch_plan(cfg, n_train, world_size):
    """(steps per epoch, micro-batch per rank, micro-steps per rank) from the global batch."""
    steps_per_epoch = n_train // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch_size {cfg.batch_size} is larger than the training set "
                        f"({n_train} images); lower it")
    micro = cfg.micro_batch or cfg.batch_size // world_size
    return steps_per_epoch, micro, tc.accumulation_steps(cfg.batch_size, micro, world_size, unit="images")


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


def soft_cross_entropy(logits, targets):
    """Mean over the batch of -sum(targets * log_softmax(logits)): cross-entropy with soft
    targets (label smoothing and mixup both produce them)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


@torch.no_grad()
def evaluate(model, test, cfg, dist, autocast):
    """(top-1, top-5, loss) on the whole test set: each rank takes its shard and the exact
    counts (correct, total, summed loss) are summed over ranks."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64)  # top-1 correct, top-5 correct, n, loss sum
    for x, y in data_vision.test_batches(test, cfg.eval_batch, dist.rank, dist.world_size,
                                         dist.device, cfg.workers):
        with autocast:
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


@torch.no_grad()
def dyt_readout(model, probe, autocast):
    """Each DyT layer's alpha and 1/std of its input on a fixed probe batch (the DyT paper's
    Figure 8: alpha tracks 1/std during training), with the model in eval mode (no drop path)."""
    if not dyt_layers(model):
        return {}
    was_training = model.training
    model.eval()

    def forward():
        with autocast:
            model(probe)
    try:
        out = tc.dyt_input_inv_stds(model, forward)
    finally:
        model.train(was_training)
    return {**tc.dyt_alphas(model), **out}


def load_data(cfg, device):
    """(train, test, classes, channels) for the config's dataset (data_vision.load_images)."""
    return data_vision.load_images(cfg.dataset, cfg.data_dir, device, cfg.model.img_size,
                                   cfg.download, cfg.randaug_n, cfg.randaug_m)


@torch.no_grad()
def probe_loss(model, x, targets, autocast):
    """The loss of the weights about to be saved, on the step's last micro-batch: a checkpoint
    is written only from a state that is finite and not exploding (checkpoint_problem)."""
    model.eval()
    with autocast:
        loss = soft_cross_entropy(model(x), targets)
    model.train()
    return loss.item()


def soft_targets(x, y, rng, cfg, classes):
    """The batch-level augmentation, drawn from the micro-batch's own rng (see ImageLoader):
    random erasing, then label smoothing and mixup/cutmix into soft targets."""
    if cfg.reprob > 0:
        x = random_erasing(x, rng, cfg.reprob)
    targets = smooth_one_hot(y, classes, cfg.label_smoothing)
    return mixup_cutmix(x, targets, rng, cfg.mixup, cfg.cutmix, cfg.mixup_switch_prob)


def probe_batch(test_set, device):
    """A fixed batch of test images for the DyT readout (alpha against 1/std of each input)."""
    if isinstance(test_set, InMemoryImages):
        return test_set.batch(np.arange(min(256, len(test_set))))[0]
    return next(iter(torch.utils.data.DataLoader(test_set, batch_size=64)))[0].to(device)


def resume(ckpt, cfg, ema):
    """The step to continue from out_dir's checkpoint, or from --branch_from's (weights,
    optimizer and EMA restored)."""
    state = tc.resume_state(ckpt, cfg)
    if state.get("batch_size") != cfg.batch_size:
        raise UserError(f"{ckpt.path} was trained with --batch_size {state.get('batch_size')}; "
                        "resume with the same global batch (or another --out_dir)")
    if ema is not None and state.get("ema") is not None:
        ema.model.load_state_dict(state["ema"])
    return state["step"]


def eval_row(model, ema, test_set, probe, done, steps, steps_per_epoch, cfg, run, autocast):
    """The metrics row of an evaluation: test top-1/top-5/loss (and the EMA's), the DyT
    readout; printed in one line. The plain model, not DDP's wrapper: ranks may run different
    numbers of eval batches."""
    dist = run.dist
    row = {"step": done, "epoch": done / steps_per_epoch}
    row["test_top1"], row["test_top5"], row["test_loss"] = evaluate(model, test_set, cfg, dist, autocast)
    if ema is not None:
        row["ema_top1"], row["ema_top5"], row["ema_loss"] = evaluate(ema.model, test_set, cfg, dist, autocast)
    if dist.is_main:
        row.update(dyt_readout(model, probe, autocast))
    ema_text = f", EMA top-1 {row['ema_top1']:.4f}" if ema is not None else ""
    run.print(f"{'final' if done == steps else 'eval'} step {done} epoch {row['epoch']:.2f}: test top-1 "
              f"{row['test_top1']:.4f} top-5 {row['test_top5']:.4f} loss {row['test_loss']:.4f}{ema_text}")
    return row


def describe(preset, mcfg, model, cfg, train_set, test_set, steps, steps_per_epoch, warmup, micro, accum, dist):
    return (f"preset {preset}: ViT {mcfg.dim}x{mcfg.depth} norm={mcfg.norm}, {num_params(model):,} parameters; "
            f"{cfg.dataset} {len(train_set)} train / {len(test_set)} test; {steps} steps ({steps_per_epoch}/epoch, "
            f"warmup {warmup}) of {cfg.batch_size} images = {dist.world_size} rank(s) x {accum} micro-steps x "
            f"{micro}; device {dist.device}")


# ---------------------------------------------------------------------------------------------

def train(argv=None):
    cfg, preset, given = tc.parse_config(ViTTrainConfig, PRESETS, argv, default_preset="fashion_mnist",
                                         description="Train a ViT with LayerNorm or DyT.")
    check_flags(cfg)
    cfg.out_dir = cfg.out_dir or os.path.join("out", f"vit_{cfg.model.norm}")
    with Run(cfg) as run:
        dist, device = run.dist, run.dist.device
        autocast = tc.autocast_context(device, cfg.dtype)
        train_set, test_set, classes, chans = load_data(cfg, device)
        steps_per_epoch, micro, accum = batch_plan(cfg, len(train_set), dist.world_size)
        steps, warmup, warmup_note = derive_steps(cfg, steps_per_epoch, given)
        cfg.max_steps, cfg.warmup_steps = steps, warmup
        mcfg = cfg.model_config(classes, chans)
        torch.manual_seed(cfg.seed)  # the same seed on every rank: the same initial weights
        model = use_kernel(ViT(mcfg), cfg.kernel).to(device)
        if cfg.activation_checkpointing:
            tc.apply_activation_checkpointing(model)
        ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        optimizer = tc.build_optimizer(model, cfg, device)
        augment = lambda x, rng: augment_images(x, rng, cfg.crop_pad, cfg.hflip, cfg.randaug_n, cfg.randaug_m)
        loader = ImageLoader(train_set, cfg.batch_size, micro, accum, dist.rank, cfg.seed, steps,
                             device, augment=augment, workers=cfg.workers)
        ckpt = run.checkpointer(model, optimizer, asdict(mcfg))
        tc.seed_everything(cfg.seed, dist.rank)
        start = resume(ckpt, cfg, ema) if cfg.resume or cfg.branch_from else 0
        if run.finished(start, steps):
            return None
        stepped = tc.wrap_ddp(model, dist)  # what the steps run
        if cfg.compile:
            stepped = torch.compile(stepped)
        probe = probe_batch(test_set, device)
        if dist.is_main:
            print(describe(preset, mcfg, model, cfg, train_set, test_set, steps, steps_per_epoch, warmup,
                           micro, accum, dist), flush=True)
            if warmup_note:
                print(warmup_note, flush=True)
        final = None
        model.train()
        run.begin(start, steps, desc=f"train {mcfg.norm}")
        for step in run.steps():
            lr = tc.set_lr(optimizer, tc.lr_at(step, cfg))
            loss_sum = torch.zeros((), device=device)
            for j, (x, y, rng) in enumerate(loader.next_step(step)):
                x, targets = soft_targets(x, y, rng, cfg, classes)
                with tc.grad_sync(stepped, j == accum - 1):
                    with autocast:
                        loss = soft_cross_entropy(stepped(x), targets) / accum
                    loss.backward()
                loss_sum += loss.detach()
            grad_norm = tc.optimizer_step(stepped, optimizer, cfg.grad_clip)
            if ema is not None:
                ema.update(model)
            # the step's loss: the mean over the global batch (each rank's mean, averaged)
            train_loss = tc.all_reduce_sum(loss_sum).item() / dist.world_size
            images_per_s = cfg.batch_size / run.step_seconds()
            done = step + 1
            run.check(train_loss, lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")
            if run.due(done, cfg.log_interval):
                run.log({"step": done, "epoch": done / steps_per_epoch, "loss": train_loss, "lr": lr,
                         "grad_norm": grad_norm, "images_per_s": images_per_s,
                         **(tc.dyt_alphas(model) if cfg.dyt_std_interval == 0 else {})})
            if cfg.dyt_std_interval and done % cfg.dyt_std_interval == 0 and dist.is_main:
                run.log({"step": done, **dyt_readout(model, probe, autocast)})
            if run.due(done, cfg.eval_interval or steps_per_epoch):
                final = eval_row(model, ema, test_set, probe, done, steps, steps_per_epoch, cfg, run, autocast)
                run.log(final)
            if run.save_due(done):
                ckpt.save(done, probe_loss(model, x, targets, autocast), batch_size=cfg.batch_size,
                          ema=ema.model.state_dict() if ema is not None else None,
                          train_config=asdict(cfg))
        return final


def evaluate_checkpoint(argv=None):
    """`train_vit.py eval`: a checkpoint's test top-1, top-5 and loss on its dataset's test set,
    exactly as the trainer evaluates (under torchrun each rank takes its share)."""
    from checkpoint import load_checkpoint, load_into
    p = tc._Parser(prog="train_vit.py eval", description="a checkpoint's test top-1/top-5/loss")
    p.add_argument("--ckpt", required=True, help="a ckpt.pt written by train_vit.py, or its out_dir")
    p.add_argument("--data_dir", default="", help="where the dataset is (default: where it trained)")
    p.add_argument("--ema", action="store_true", help="the EMA weights (runs with --ema_decay)")
    p.add_argument("--fold", action="store_true", help="fold each norm's affine into the next linears first")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    a = p.parse_args(argv)
    path = os.path.join(a.ckpt, "ckpt.pt") if os.path.isdir(a.ckpt) else a.ckpt
    state = load_checkpoint(path, missing_hint="check --ckpt (training writes out/vit_<norm>/ckpt.pt)")
    if "patch_size" not in state.get("model_config", {}):
        raise UserError(f"{path} has no ViT model config; is it a train_vit.py checkpoint?")
    if a.ema and state.get("ema") is None:
        raise UserError(f"{path} holds no EMA weights (the run had --ema_decay 0); drop --ema")
    run_cfg = state.get("train_config", {})
    cfg, _, _ = tc.parse_config(ViTTrainConfig, PRESETS, [], default_preset="fashion_mnist")
    for k in ("dataset", "eval_batch", "workers", "download", "randaug_n", "randaug_m"):
        setattr(cfg, k, run_cfg.get(k, getattr(cfg, k)))
    cfg.data_dir = a.data_dir or run_cfg.get("data_dir", "")
    cfg.model = ViTConfig(**state["model_config"])
    dist = tc.setup_distributed(a.device)
    try:
        _, test_set, _, _ = load_data(cfg, dist.device)
        model = ViT(cfg.model)
        load_into(model, state["ema"] if a.ema else state["model"], path)
        model.to(dist.device).eval()
        if a.fold:
            fold_norms(model)
        top1, top5, loss = evaluate(model, test_set, cfg, dist, tc.autocast_context(dist.device, run_cfg.get("dtype", "auto")))
        if dist.is_main:
            print(f"{a.ckpt}: test top-1 {top1:.4f} top-5 {top5:.4f} loss {loss:.4f} on {cfg.dataset} "
                  f"({len(test_set)} images){' (folded)' if a.fold else ''}")
        return top1, top5, loss
    finally:
        if dist.initialized_here:
            tc.teardown_distributed()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "eval":
        return evaluate_checkpoint(argv[1:])
    return train(argv)


if __name__ == "__main__":
    tc.main_guard(main)
