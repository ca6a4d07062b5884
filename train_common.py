"""
The trainer machinery that train_gpt.py and train_vit.py share.

Everything here is model- and data-agnostic: a trainer defines its own config dataclass (a
subclass of TrainConfig), its model and its batches, and uses these pieces for the rest.
The API (keep these signatures stable; train_vit.py builds on them):

  Config and CLI
    TrainConfig                       the shared fields (optimiser, schedule, checkpoints, ...)
    parse_config(cls, presets, argv)  --preset NAME first, then any --flag value; bad input ->
                                      one-line `error:` and exit 2 (bools: --x / --no-x / --x=true)
    UserError                         raise it for bad input; main_guard turns it into one line
    main_guard(main)                  run main(), print `error: ...` and exit 2 on UserError
  Processes and devices
    setup_distributed(device) -> Dist torchrun env or one process; nccl on CUDA, gloo on CPU
    teardown_distributed()
    seed_everything(seed, rank)       python/numpy/torch seeded with seed + rank
    autocast_context(dev, dtype)      bf16 autocast on CUDA, a no-op on CPU
    setup_float_math(dev, flush)      TF32 on CUDA; subnormals flushed to zero on CPU
  Optimisation
    lr_at(step, cfg)                  linear warmup, cosine decay to cfg.min_lr_ratio * lr
    build_optimizer(model, cfg, dev)  AdamW on model.param_groups (fused kernel)
    accumulation_steps(global_batch, micro_batch, world_size) -> micro-steps per rank
    auto_micro_batch(global_batch, world_size, cap)  the per-rank micro batch when not given
    clip_grad_norm(model, max_norm)   works for plain, DDP and FSDP2 models; returns the norm
  Wrapping
    wrap_ddp(model, dist)
    build_fsdp_model(build, dist, param_dtype, reduce_dtype, seed)  meta -> fully_shard per
                                      block -> to_empty -> init_weights shard by shard
    apply_activation_checkpointing(model)   recompute each block in the backward pass
    unwrap(model)                     the nn.Module under DDP / torch.compile
  Checkpoints
    save_checkpoint(path, state)      one file, atomic (tmp + os.replace); a full or read-only
                                      disk is a one-line error and leaves no .tmp behind
    load_checkpoint(path, config=...) weights_only=True, one-line error on a config mismatch
    checkpoint_problem(...)           why a state must not be saved (non-finite, exploding)
    end_if_finished(dist, path, step, total)  a resumed run already at its end: say so, stop
    save_sharded / load_sharded       torch.distributed.checkpoint (DCP) directory under FSDP
    capture_rng_state() / restore_rng_state(state)   python, numpy, torch, cuda
  Logging and safety
    RunLock(out_dir, enabled)         one run per out_dir (stale locks of dead PIDs are taken over)
    StopSignals()                     SIGINT/SIGTERM -> .requested; the loop saves, then exits
    RunLogger(out_dir, cfg, enabled, resume_step)  log(dict) -> metrics.jsonl + metrics.csv
                                      (+ wandb); a resume drops the rows after its checkpoint
    LossGuard(explode_factor)         check(loss, step) raises TrainingDiverged on NaN/explosion
    dyt_alphas(model)                 {"alpha/<layer>": value} for every DyT-like layer
    peak_flops(device) / mfu(...)     model FLOPs utilisation on known GPUs
"""

import argparse
import contextlib
import csv
import dataclasses
import difflib
import functools
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field, fields, asdict

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn


# ---------------------------------------------------------------------------------------------
# Errors a user can fix: one line, no traceback.

class UserError(Exception):
    """Bad input (flag, path, data, checkpoint). Its message says what to fix."""


class TrainingDiverged(Exception):
    """The loss became NaN/inf or exploded; the run stops, keeping the last good checkpoint."""


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped the run after it saved a checkpoint; exit_code is 130 or 143."""

    def __init__(self, message, exit_code=130):
        super().__init__(message)
        self.exit_code = exit_code


def main_guard(main, argv=None):
    """Run main(argv); turn UserError (and TrainingDiverged) into `error: ...` on stderr, exit 2.

    A traceback is for bugs; a user who gave a wrong path or flag gets one line saying what to
    do. Exits 0 on success; 130/143 after SIGINT/SIGTERM (the shell's codes for them)."""
    try:
        main(argv)
    except (UserError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        teardown_distributed()
        sys.exit(2)
    except Interrupted as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        teardown_distributed()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        teardown_distributed()
        sys.exit(130)


# ---------------------------------------------------------------------------------------------
# Config and CLI

@dataclass
class TrainConfig:
    """Fields every trainer has. A trainer subclasses it and adds its model/data fields.
    field(metadata={"help": ..., "choices": [...]}) feeds the CLI."""
    out_dir: str = field(default="", metadata={"help": "checkpoints and logs go here "
                                                "(default: out/<trainer>_<norm>)"})
    seed: int = 1337
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    dtype: str = field(default="auto", metadata={
        "help": "autocast dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp32",
        "choices": ["auto", "bf16", "fp32"]})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    flush_subnormals: bool = field(default=True, metadata={
        "help": "CPU: flush subnormal floats to zero (x86 is 10-100x slower on them); "
                "--no-flush_subnormals keeps IEEE subnormals"})
    # optimiser and schedule (the DyT paper's LLaMA recipe by default)
    lr: float = 3e-4
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decays to lr * this"})
    warmup_steps: int = 100
    max_steps: int = field(default=0, metadata={"help": "0: derived by the trainer"})
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = field(default=1.0, metadata={"help": "0 disables clipping"})
    # parallelism and memory
    fsdp: bool = field(default=False, metadata={"help": "FSDP2 (fully_shard per block)"})
    activation_checkpointing: bool = False
    # checkpoints, logs
    # periodic by default: a crash or Ctrl-C must not lose a long run (SIGINT/SIGTERM also save)
    ckpt_interval: int = field(default=500, metadata={"help": "steps between checkpoints; 0: final only"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir's checkpoint"})
    log_interval: int = 10
    eval_interval: int = 100
    wandb: bool = False
    wandb_project: str = "dyt"
    run_name: str = ""
    explode_factor: float = field(default=4.0, metadata={
        "help": "stop when the loss exceeds this times its best smoothed value; 0: NaN check only"})


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump), naming the closest valid flag."""

    def error(self, message):
        if "unrecognized arguments" in message:
            bad = message.split(":", 1)[1].split()
            flags = [a for a in self._option_string_actions if a.startswith("--")]
            hints = []
            for b in bad:
                if b.startswith("-"):
                    close = difflib.get_close_matches(b.split("=")[0], flags, n=1)
                    hints.append(f"{b} (did you mean {close[0]}?)" if close else b)
            if hints:
                message = f"unknown flag {', '.join(hints)}; see --help"
        self.exit(2, f"error: {message}\n")


def _parse_bool(text):
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on", "y"):
        return True
    if t in ("0", "false", "no", "off", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _type_for(f):
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str,
                                                   "bool": bool}.get(str(f.type), str)
    return kind


def build_parser(cls, presets, description=""):
    parser = _Parser(description=description, allow_abbrev=False)
    parser.add_argument("--preset", default=None, choices=None,
                        help=f"applied first, then any flag overrides it: {', '.join(presets)}")
    for f in fields(cls):
        kind = _type_for(f)
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{help_text} (default {default})".strip()
        name = f"--{f.name}"
        if kind is bool:
            # --flag, --flag=true/false, --no-flag
            parser.add_argument(name, dest=f.name, nargs="?", const=True, type=_parse_bool,
                                default=argparse.SUPPRESS, metavar="BOOL", help=help_text)
            parser.add_argument(f"--no-{f.name}", f"--no_{f.name}", dest=f.name,
                                action="store_false", default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)
        else:
            parser.add_argument(name, dest=f.name, type=kind, default=argparse.SUPPRESS,
                                choices=f.metadata.get("choices"), help=help_text)
    return parser


def parse_config(cls, presets, argv=None, description="", default_preset=None):
    """A `cls` instance from the command line.

    presets: {name: {field: value}}. The preset (--preset, else default_preset) is applied on
    top of the dataclass defaults, then every flag given on the command line overrides it.
    Unknown flags, wrong types and unknown presets exit with a one-line error (code 2).
    Returns (config, preset_name, set_flags) where set_flags are the fields given explicitly.
    """
    parser = build_parser(cls, presets, description)
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset") or default_preset
    values = {}
    if preset is not None:
        if preset not in presets:
            close = difflib.get_close_matches(preset, list(presets), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            parser.error(f"unknown preset {preset!r}{hint}; choose one of {', '.join(presets)}")
        known = {f.name for f in fields(cls)}
        for k in presets[preset]:
            if k not in known:
                raise KeyError(f"preset {preset} sets {k}, which {cls.__name__} has not")
        values.update(presets[preset])
    values.update(args)
    cfg = cls(**values)
    check_common(cfg)
    return cfg, preset, set(args)


def check_common(cfg):
    """One-line errors for values of the shared fields that would crash later (a zero
    division, say) or silently do nothing (--max_steps -5 used to exit 0 having trained
    nothing). Each names the flag and the range it takes."""
    def need(ok, flag, rule):
        if not ok:
            raise UserError(f"--{flag} {getattr(cfg, flag)!r} is out of range: it must be {rule}")
    need(cfg.lr > 0 and math.isfinite(cfg.lr), "lr", "a positive number")
    need(0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
    need(cfg.warmup_steps >= 0, "warmup_steps", ">= 0")
    need(cfg.max_steps >= 0, "max_steps", ">= 0 (0: derived by the trainer)")
    need(cfg.weight_decay >= 0, "weight_decay", ">= 0")
    need(0 <= cfg.beta1 < 1, "beta1", "in [0, 1)")
    need(0 <= cfg.beta2 < 1, "beta2", "in [0, 1)")
    need(cfg.grad_clip >= 0, "grad_clip", ">= 0 (0 disables clipping)")
    need(cfg.ckpt_interval >= 0, "ckpt_interval", ">= 0 (0: final checkpoint only)")
    need(cfg.log_interval >= 1, "log_interval", ">= 1")
    need(cfg.eval_interval >= 0, "eval_interval", ">= 0")
    need(cfg.explode_factor == 0 or cfg.explode_factor > 1, "explode_factor",
         "0 (NaN check only) or above 1")


def require_positive(cfg, names):
    """UserError naming the first of `names` (int/float fields) that is not positive."""
    for name in names:
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")


def config_dict(cfg):
    return asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


# ---------------------------------------------------------------------------------------------
# Processes and devices

@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    initialized_here: bool

    @property
    def is_main(self):
        return self.rank == 0


def _resolve_device(device, local_rank):
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here; use --device cpu")
    return torch.device(device)


def setup_distributed(device="auto", force_group=False):
    """Join the torchrun process group (env RANK/WORLD_SIZE/LOCAL_RANK) or run as one process.

    Backend: nccl when the device is CUDA, gloo on CPU. force_group=True creates a one-process
    gloo group even without torchrun (FSDP2 needs a process group). Idempotent: an existing
    group is reused (and then not destroyed by teardown_distributed)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = _resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    here = False
    if torch_dist.is_available() and not torch_dist.is_initialized() and (
            "RANK" in os.environ or force_group):
        if "MASTER_ADDR" not in os.environ:  # a one-process group without torchrun
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                              RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        torch_dist.init_process_group(backend, **kwargs)
        here = True
    if torch_dist.is_available() and torch_dist.is_initialized():
        rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    return Dist(rank, local_rank, world, dev, here)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teardown_distributed():
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier():
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


def all_reduce_sum(tensor):
    """Sum a tensor over ranks in place (no-op in one process); returns it."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def seed_everything(seed, rank=0):
    """Seed python, numpy and torch (all devices) with seed + rank: ranks draw different
    dropout/augmentation noise, and a run is reproducible for a given world size."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def setup_float_math(device, flush_subnormals=True):
    """The float settings a training run wants on its device.

    CUDA: TF32 matmuls and convolutions on Ampere+ GPUs (fp32 range, 10-bit mantissa).
    CPU: subnormal floats (|x| < 1.2e-38 in fp32) flushed to zero. x86 handles a subnormal
    operand or result in microcode, 10-100x slower than a normal one, and a training run
    makes many: a peaked attention softmax gives
    probabilities exp(s - max) that underflow into that range, and their gradients follow
    them through every matmul of the backward pass. Measured at nanoGPT's shape with DyT
    (README "Speed against nanoGPT"): the step grows from ~1.5 to 3.3 s by step 20 without
    the flush (--no-flush_subnormals) and stays at ~1.6 s with it. Values that small are ~0
    to any loss here. The flag is per thread; torch sets it on its intra-op worker threads
    too (tests/test_common.py).
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    elif device.type == "cpu" and flush_subnormals:
        torch.set_flush_denormal(True)  # False on a CPU without the flags (nothing to do then)


def autocast_dtype(device, dtype="auto"):
    """The autocast dtype: bf16 on CUDA for 'auto', None (no autocast) for fp32/CPU-auto."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp32": None}[dtype]


def autocast_context(device, dtype="auto"):
    dt = autocast_dtype(device, dtype)
    if dt is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dt)


# ---------------------------------------------------------------------------------------------
# Optimisation

def lr_at(step, cfg):
    """Learning rate for `step` (0-based): linear warmup from lr/warmup to lr over
    warmup_steps, then cosine from lr to min_lr_ratio * lr at max_steps (flat after)."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def build_optimizer(model, cfg, device):
    """AdamW(betas, weight_decay) over the model's param_groups (no decay on 1-d parameters:
    norm/DyT alpha, gamma, beta, biases, the embedding scale). The fused kernel, on CUDA and on
    the CPU too: there it is one pass per tensor where the default takes a dozen (7 ms against
    32 ms a step for nanoGPT's 10M-parameter shape on one core)."""
    from model import param_groups
    groups = param_groups(unwrap(model), cfg.weight_decay)
    groups = [g for g in groups if g["params"]]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def accumulation_steps(global_batch, micro_batch, world_size, unit="sequences"):
    """Micro-steps per rank so that world_size * micro_batch * steps == global_batch.

    Raises UserError naming the numbers when the global batch does not divide."""
    per_step = micro_batch * world_size
    if global_batch <= 0 or micro_batch <= 0:
        raise UserError(f"batch sizes must be positive (global {global_batch}, micro {micro_batch})")
    if global_batch % per_step:
        raise UserError(f"global batch of {global_batch} {unit} is not a multiple of "
                        f"micro_batch {micro_batch} x world size {world_size} = {per_step}; "
                        "change --micro_batch or the global batch")
    return global_batch // per_step


def auto_micro_batch(global_batch, world_size, cap=16, unit="sequences", flag="the global batch"):
    """The micro batch when the user gave none: this rank's share of the global batch,
    split into equal micro-steps of at most `cap`. 16 sequences over 1, 2, 4, 8 or 16
    processes all work with no --micro_batch; a world size that does not divide the global
    batch is a one-line error naming the flag to change."""
    if global_batch <= 0:
        raise UserError(f"{flag} must be positive")
    if global_batch % world_size:
        raise UserError(f"{flag} ({global_batch} {unit}) does not split over {world_size} "
                        f"processes; make it a multiple of {world_size}")
    share = global_batch // world_size
    return max(d for d in range(1, min(cap, share) + 1) if share % d == 0)


def clip_grad_norm(model, max_norm):
    """Clip the total gradient norm (DDP/FSDP2-aware; DTensor norms are reduced across ranks).
    max_norm <= 0 only measures it. Returns the norm before clipping as a float."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


# ---------------------------------------------------------------------------------------------
# Wrapping: DDP, FSDP2, activation checkpointing

def unwrap(model):
    """The plain module under torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model) if isinstance(
        model, nn.parallel.DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def wrap_ddp(model, dist):
    """DistributedDataParallel when more than one process, else the model itself."""
    if dist.world_size == 1:
        return model
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def build_fsdp_model(build, dist, param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                     seed=0, activation_checkpointing=False):
    """An FSDP2 model built without ever holding it whole on one rank.

    build(): returns the model (must have .blocks and .init_weights()); it is called under the
    meta device, so no memory is used. Each block is fully_shard-ed (its parameters gathered
    just for its forward/backward), then the root; MixedPrecisionPolicy computes in
    param_dtype and reduces gradients in reduce_dtype. to_empty allocates only each rank's
    shards, and init_weights() initialises them in place.

    On CUDA, DTensor's RNG tracker makes the sharded init a proper draw of the full tensors.
    On CPU (gloo) torch has no DTensor RNG (each rank would repeat the same local draw), so the
    CPU path builds the model whole on rank 0 with `seed` and broadcasts it into the shards:
    fine for the small models that run on CPU, and the same init as the unsharded model.
    """
    from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, StateDictOptions
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = build()
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.to_empty(device=dist.device)
    if dist.device.type == "cuda":
        torch.manual_seed(seed)
        model.init_weights()
    else:
        model.init_weights()  # buffers (e.g. rotary tables) and deterministic parameters
        full = None
        if dist.rank == 0:
            torch.manual_seed(seed)
            full = build().state_dict()
        set_model_state_dict(model, full or {}, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))
    return model


def apply_activation_checkpointing(model):
    """Recompute each block's activations in the backward pass instead of storing them.

    Patches block.forward in place (parameter names and checkpoints stay the same); apply it
    before fully_shard/DDP."""
    from torch.utils.checkpoint import checkpoint
    for block in model.blocks:
        inner = block.forward
        block.forward = functools.partial(checkpoint, inner, use_reentrant=False)
    return model


# ---------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(path, state):
    """torch.save(state, path) atomically: write path.tmp, fsync, os.replace. A crash at any
    moment leaves either the old complete checkpoint or the new complete one.

    A disk that is full or read-only is a UserError (one line) and the half-written .tmp is
    removed; the previous checkpoint, if any, is untouched. A kill -9 can still leave a .tmp:
    the next run in this out_dir removes it (remove_stale_tmp, under the run lock)."""
    tmp = f"{path}.tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and _is_os_error(e)):
            keep = f"; the previous checkpoint {path} is intact" if os.path.isfile(path) else ""
            raise UserError(f"cannot write checkpoint {path}: {_os_reason(e)}{keep}; "
                            "free space or pick a writable --out_dir, then --resume") from None
        raise


def _is_os_error(e):
    # torch.save's zip writer wraps the OS error of a failed write in a RuntimeError
    # ("[enforce fail at inline_container.cc] . unexpected pos ..."): look for its cause.
    return isinstance(e.__cause__ or e.__context__, OSError) or "unexpected pos" in str(e)


def _os_reason(e):
    cause = e if isinstance(e, OSError) else (e.__cause__ or e.__context__)
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    if isinstance(cause, OSError) and cause.errno:
        return os.strerror(cause.errno)
    return "the write failed (is the disk full?)"


def remove_stale_tmp(path):
    """Remove what an interrupted save of `path` left behind (path.tmp, a file or a DCP
    directory). Call it only while holding the run lock: then no other run is writing it."""
    tmp = f"{path}.tmp"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.exists(tmp):
        with contextlib.suppress(OSError):
            os.remove(tmp)


def check_fresh_start(path, resume):
    """A new run must not overwrite an earlier run's checkpoint at `path` (a file, or a DCP
    directory): the user continues it with --resume or starts elsewhere."""
    if not resume and (os.path.isfile(path) or find_sharded(path)):
        raise UserError(f"{path} holds an earlier run's checkpoint; continue it with --resume, "
                        "or start a new run with another --out_dir (or delete it)")


def check_config(saved, expected, keys=None, path=""):
    """UserError if the saved config differs from the expected on `keys` (default: all)."""
    keys = keys if keys is not None else sorted(set(saved) | set(expected))
    diffs = [f"{k}={saved.get(k)!r} (now {expected.get(k)!r})" for k in keys
             if saved.get(k) != expected.get(k)]
    if diffs:
        raise UserError(f"checkpoint {path} was trained with a different model: "
                        f"{', '.join(diffs[:4])}; use the same flags or another --out_dir")


def _first_sentence(text, limit=300):
    """The first line of an error message, cut at a sentence end rather than mid-word."""
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    if len(line) <= limit:
        return line
    cut = max(line.rfind(". ", 0, limit), line.rfind("; ", 0, limit))
    return line[:cut + 1] if cut > 0 else line[:limit].rsplit(" ", 1)[0] + " ..."


def load_checkpoint(path, config=None, config_key="model_config", map_location="cpu",
                    missing_hint="check the path (or drop --resume)"):
    """torch.load(path, weights_only=True), checking state[config_key] == config if given.
    Missing, unreadable or mismatched checkpoints raise UserError with one line."""
    import zipfile
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; {missing_hint}")
    # torch.save writes a zip archive. Anything else (random bytes, a file cut short by a full
    # disk) is not a checkpoint at all, and torch.load's weights_only advice would mislead.
    if not zipfile.is_zipfile(path):
        raise UserError(f"cannot read checkpoint {path}: not a PyTorch checkpoint (corrupt or truncated, "
                        f"{os.path.getsize(path):,} bytes); restore it from a copy, or delete it "
                        "and start a new run")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if "weights_only" in str(e):
            raise UserError(f"cannot read checkpoint {path}: it holds Python objects other than "
                            "tensors and plain values, so it was not written by this code's "
                            "trainers; load it with torch.load(weights_only=False) only if you "
                            "trust its source") from None
        raise UserError(f"cannot read checkpoint {path}: {_first_sentence(str(e))}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a trainer checkpoint")
    if config is not None:
        check_config(state.get(config_key, {}), config, path=path)
    return state


@torch.no_grad()
def checkpoint_problem(model, optimizer, probe_loss, guard):
    """Why the current state must not become a checkpoint, or None when it is healthy.

    A training step's loss is measured before its update, so a loss that passed the guard says
    nothing about the weights the update produced: with a huge lr they can already be
    exploding (val loss 3e5) or non-finite, and a checkpoint of them is useless to resume.
    So before each save: every parameter and optimizer tensor must be finite, and
    probe_loss (the loss of the weights about to be saved, on the last training batch; None
    to skip) must be finite and within the guard's explode factor of its best average.
    Under DDP/FSDP every rank must call it (the verdict is all-reduced)."""
    bad = 0
    tensors = [p for p in model.parameters()]
    for st in optimizer.state.values():
        tensors += [v for v in st.values() if torch.is_tensor(v) and v.is_floating_point()]
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        bad += int(not bool(torch.isfinite(t).all()))
    flag = torch.tensor([float(bad), 0.0 if probe_loss is None else float(probe_loss)],
                        dtype=torch.float64,
                        device=next(model.parameters()).device)
    all_reduce_sum(flag)
    world = torch_dist.get_world_size() if torch_dist.is_available() and \
        torch_dist.is_initialized() else 1
    bad, probe = int(flag[0].item()), flag[1].item() / world
    if bad:
        return f"{bad} parameter/optimizer tensors are not finite"
    if probe_loss is not None:
        if not math.isfinite(probe):
            return f"its loss is {probe}"
        limit = guard.factor * guard.best if guard.factor and math.isfinite(guard.best) else None
        if limit is not None and probe > limit:
            return (f"its loss {probe:.4g} is over {guard.factor}x the best average "
                    f"{guard.best:.4g} (exploding)")
    return None


def _replace_dir(tmp, final):
    # Directories cannot be swapped atomically; keep the old one as final.old until the new
    # one is in place, and let find_sharded fall back to it.
    old = f"{final}.old"
    if os.path.exists(final):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if os.path.exists(old):
        shutil.rmtree(old)


def find_sharded(path):
    """The DCP directory to load: path, or path.old if a save was interrupted mid-swap."""
    for p in (path, f"{path}.old"):
        if os.path.isfile(os.path.join(p, ".metadata")):
            return p
    return None


def save_sharded(path, model, optimizer, extra, dist):
    """A DCP checkpoint directory for an FSDP2 model: every rank writes its shards of the
    model and optimizer; rank 0 writes `extra` (step, config, data position, RNG of every
    rank...) to extra.pt. Written to path.tmp and swapped in, like save_checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    tmp = f"{path}.tmp"
    if dist.is_main and os.path.exists(tmp):
        shutil.rmtree(tmp)
    barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    if dist.is_main:
        save_checkpoint(os.path.join(tmp, "extra.pt"), extra)
    barrier()
    if dist.is_main:
        _replace_dir(tmp, path)
    barrier()


def load_sharded(path, model, optimizer, config=None, config_key="model_config"):
    """Load a save_sharded directory into an FSDP2 model/optimizer (any world size: DCP
    reshards). Returns `extra`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    found = find_sharded(path)
    if found is None:
        raise UserError(f"no sharded checkpoint at {path}; check the path (or drop --resume)")
    extra = load_checkpoint(os.path.join(found, "extra.pt"), config, config_key)
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=found)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    return extra


def capture_rng_state():
    """The RNG state of this process as tensors and ints only (loadable with weights_only)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_objects(obj, dist):
    """[obj of rank 0, obj of rank 1, ...] on every rank (a list of one without a group)."""
    if dist.world_size == 1 or not torch_dist.is_initialized():
        return [obj]
    out = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# Logging and safety

def ensure_writable_dir(path, flag="--out_dir"):
    """Create `path` if needed and check that files can be written in it; UserError (one
    line naming the flag) when it cannot: read-only file system, no permission, a file in
    the way, disk full."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to {flag} {path}: {e.strerror or e}; "
                        f"pick a writable {flag}") from None


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class RunLock:
    """One run at a time per out_dir: a lock file (out_dir/run.lock) holding the owner's
    host and PID, created with O_EXCL so that two runs starting together cannot both win.

    A second run in the same out_dir is refused with one line naming the PID. A lock left by
    a killed run (kill -9, a crashed node) is stale when its PID is dead on this host; it is
    taken over with a note. A lock from another host cannot be checked from here: the
    message says to delete it if that run is gone. Only rank 0 takes it (enabled)."""

    NAME = "run.lock"

    def __init__(self, out_dir, enabled=True):
        self.path = os.path.join(out_dir, self.NAME)
        self.held = False
        if not enabled:
            return
        import socket
        ensure_writable_dir(out_dir)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None or (owner.get("host") == me["host"]
                                     and not _pid_alive(int(owner.get("pid", -1)))):
                    print(f"note: taking over the stale lock {self.path} "
                          f"(its run, pid {owner and owner.get('pid')}, is gone)", file=sys.stderr)
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path)
                    continue
                where = "" if owner.get("host") == me["host"] else f" on host {owner.get('host')}"
                raise UserError(f"another run (pid {owner.get('pid')}{where}) is using "
                                f"{out_dir}; wait for it to finish, use another --out_dir, or "
                                f"delete {self.path} if that run is gone") from None
            except OSError as e:
                raise UserError(f"cannot write to --out_dir {out_dir}: {e.strerror or e}; "
                                "pick a writable --out_dir") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            import atexit
            atexit.register(self.release)
            return
        raise UserError(f"cannot take the lock {self.path}; delete it if no run is using "
                        f"{out_dir}")

    def _owner(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            # half-written (the owner was killed between create and write): stale if old
            try:
                return None if time.time() - os.path.getmtime(self.path) > 10 else {"pid": "?"}
            except OSError:
                return None

    def release(self):
        if self.held:
            self.held = False
            with contextlib.suppress(OSError):
                os.remove(self.path)


_RUN_RESOURCES = []  # locks and signal handlers taken by the trainer call now running


def trainer(fn):
    """Decorate a trainer's main: whatever way it ends (return, error, Ctrl-C), the run lock
    it took is released and the signal handlers it installed are restored, so that tests (and
    notebooks) can run trainers one after another in one process."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        depth = len(_RUN_RESOURCES)
        try:
            return fn(*args, **kwargs)
        finally:
            while len(_RUN_RESOURCES) > depth:
                _RUN_RESOURCES.pop().release()
    return run


def start_run(out_dir, ckpt, resume, is_main=None):
    """What every run does first, in this order: take the out_dir lock (so that a second run
    cannot interleave with this one), refuse to overwrite an earlier run's checkpoint unless
    resuming, and remove a .tmp that a killed save left (safe: we hold the lock). Only rank 0
    (env RANK) touches the directory. Returns (RunLock, StopSignals)."""
    is_main = int(os.environ.get("RANK", 0)) == 0 if is_main is None else is_main
    lock = RunLock(out_dir, enabled=is_main)
    _RUN_RESOURCES.append(lock)
    check_fresh_start(ckpt, resume)
    if is_main:
        remove_stale_tmp(ckpt)
    signals = StopSignals()
    _RUN_RESOURCES.append(signals)
    return lock, signals


def finished_message(path, step, total):
    return (f"{path} is already finished ({step} of {total} steps): nothing to do; raise "
            "--max_steps to train on, or start a new run with another --out_dir")


def end_if_finished(dist, path, step, total):
    """A resumed run that is already at its last step: say so (rank 0), release the process
    group this run set up, and return True; the trainer then returns without training."""
    if step < total:
        return False
    if dist.is_main:
        print(finished_message(path, step, total), flush=True)
    if dist.initialized_here:
        teardown_distributed()
    return True


def guarded_save(save, step, last_ckpt, model, optimizer, guard, probe_loss):
    """save(step) only when checkpoint_problem finds nothing wrong with the state; otherwise
    raise TrainingDiverged naming the last good checkpoint (which resumes). Returns the path
    save() returns."""
    problem = checkpoint_problem(model, optimizer, probe_loss, guard)
    if problem:
        keep = (f"the last good checkpoint is {last_ckpt} (resume it with --resume and a lower "
                "--lr)") if last_ckpt else "no checkpoint was written yet"
        raise TrainingDiverged(f"the weights after step {step} are diverging ({problem}), so "
                               f"they were not saved; {keep}")
    return save(step)


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (a pre-empted or cancelled job) set .requested instead of
    killing the run; the training loop checks it once per step, saves a checkpoint and exits
    (Interrupted: 130 for SIGINT, 143 for SIGTERM). A second signal kills the run at once,
    as usual. Under torchrun every rank gets the signal; should_stop() all-reduces the flag
    so that all ranks stop after the same step."""

    def __init__(self):
        import signal
        self.requested = None
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: keep the default behaviour
                pass

    def _handle(self, signum, frame):
        import signal
        self.requested = signum
        for sig, old in self._old.items():  # a second signal acts normally
            signal.signal(sig, old)

    def should_stop(self, device):
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        return bool(all_reduce_sum(flag).item() > 0)

    def exit_code(self):
        import signal
        return 143 if self.requested == signal.SIGTERM else 130

    def name(self):
        import signal
        return "SIGTERM" if self.requested == signal.SIGTERM else "SIGINT"

    def release(self):
        import signal
        for sig, old in self._old.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, old)
        self._old = {}


class RunLogger:
    """metrics.jsonl (one JSON object per log call) and metrics.csv in out_dir, plus wandb when
    asked for and installed. Only the main rank writes (enabled=False elsewhere). New keys
    (val loss appearing later, say) rewrite the CSV header from the JSONL.

    The logs hold the run's true history: a fresh run (resume_step None) moves the logs of an
    earlier run that never checkpointed aside to metrics.jsonl.old; a run resumed from the
    checkpoint of step S drops the rows logged after S (they are logged again), so no step
    appears twice."""

    def __init__(self, out_dir, cfg=None, enabled=True, use_wandb=False, project="dyt", name="",
                 resume_step=None):
        self.enabled = enabled
        self.jsonl = os.path.join(out_dir, "metrics.jsonl")
        self.csv = os.path.join(out_dir, "metrics.csv")
        self.columns = []
        self.wandb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(self.jsonl) and resume_step is None:
            os.replace(self.jsonl, self.jsonl + ".old")
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.csv)
        if os.path.exists(self.jsonl):  # resuming: keep the columns seen so far
            rows = self._rows()
            kept = [r for r in rows if r.get("step", 0) <= resume_step]
            for row in kept:
                self.columns += [k for k in row if k not in self.columns]
            if len(kept) != len(rows) or not os.path.exists(self.csv):
                self._rewrite(kept)
        if use_wandb:
            try:
                import wandb
                self.wandb = wandb.init(project=project, name=name or None,
                                        config=config_dict(cfg) if cfg is not None else None)
            except ImportError:
                print("warning: --wandb given but wandb is not installed; logging to files only",
                      file=sys.stderr)

    def _rows(self):
        rows = []
        with open(self.jsonl) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line cut short by a kill: not part of the history
                    pass
        return rows

    def _rewrite(self, rows):
        # both files via tmp + os.replace: a kill during the rewrite loses no rows
        for path, write in ((self.jsonl, lambda f: f.writelines(json.dumps(r) + "\n" for r in rows)),
                            (self.csv, lambda f: self._write_csv(f, rows))):
            with open(path + ".tmp", "w", newline="") as f:
                write(f)
            os.replace(path + ".tmp", path)

    def _write_csv(self, f, rows):
        w = csv.DictWriter(f, fieldnames=self.columns)
        w.writeheader()
        w.writerows(rows)

    def log(self, row):
        if not self.enabled:
            return
        row = {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v)
               for k, v in row.items()}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        new = [k for k in row if k not in self.columns]
        if new or not os.path.exists(self.csv):
            self.columns += new
            with open(self.csv, "w", newline="") as f:
                self._write_csv(f, self._rows())
        else:
            with open(self.csv, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(row)
        if self.wandb is not None:
            self.wandb.log(row, step=row.get("step"))

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


class LossGuard:
    """Stops a run whose loss is NaN/inf or has exploded (above explode_factor times the
    lowest exponential moving average of the loss seen so far; after `patience` steps, so the
    noisy first steps never trigger it). explode_factor 0: only the NaN/inf check."""

    def __init__(self, explode_factor=4.0, patience=5, ema=0.9):
        self.factor, self.patience, self.beta = explode_factor, patience, ema
        self.ema, self.best, self.seen = None, float("inf"), 0

    def check(self, loss, step, last_ckpt=None):
        keep = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else \
            "; no checkpoint was written yet"
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss is {loss} at step {step}: training diverged{keep} "
                                   "(try a lower --lr or longer --warmup_steps)")
        self.seen += 1
        self.ema = loss if self.ema is None else self.beta * self.ema + (1 - self.beta) * loss
        if self.seen > self.patience and self.factor and loss > self.factor * self.best:
            raise TrainingDiverged(f"loss {loss:.4g} at step {step} is over {self.factor}x "
                                   f"its best average {self.best:.4g}: training exploded"
                                   f"{keep} (try a lower --lr)")
        self.best = min(self.best, self.ema)
        return loss

    def state_dict(self):
        return {"ema": self.ema, "best": self.best, "seen": self.seen}

    def load_state_dict(self, s):
        self.ema, self.best, self.seen = s["ema"], s["best"], s["seen"]


def dyt_alphas(model):
    """{"alpha/<layer name>": alpha} for every DyT-like layer (mean over channels for
    per-channel alphas). Under FSDP2 every rank must call it (the alphas are gathered)."""
    from model import dyt_layers
    out = {}
    for name, layer in dyt_layers(unwrap(model)):
        a = getattr(layer, "alpha", None)
        if a is None:
            continue
        a = a.detach()
        if hasattr(a, "full_tensor"):
            a = a.full_tensor()
        out[f"alpha/{name}"] = float(a.float().mean())
    return out


# bf16 dense peak FLOP/s per GPU, for MFU (no sparsity)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}


def peak_flops(device):
    """The GPU's bf16 peak FLOP/s from PEAK_FLOPS by name, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def mfu(flops_per_token, tokens_per_second_per_device, device):
    """Model FLOPs utilisation of one device, or None where its peak is unknown."""
    peak = peak_flops(device)
    return None if peak is None else flops_per_token * tokens_per_second_per_device / peak


class Timer:
    """Wall time between calls to lap(); synchronises CUDA so that times are real."""

    def __init__(self, device):
        self.device, self.t = device, time.perf_counter()

    def lap(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


# ---------------------------------------------------------------------------------------------
# The other half of the DyT paper's Figure 8 (added for train_vit.py; usable by any trainer)

@torch.no_grad()
def dyt_input_inv_stds(model, run_forward):
    """{"inv_std/<layer name>": 1/std of its input} for every DyT-like layer.

    Forward hooks record the std (over all elements) of each layer's input while
    run_forward() runs the model once, e.g. on a fixed probe batch in eval mode. The DyT paper
    plots each layer's alpha against this (Figure 8: alpha tracks 1/std of its input);
    dyt_alphas gives the alphas under the same layer names."""
    from model import dyt_layers
    stds, hooks = {}, []
    for name, layer in dyt_layers(unwrap(model)):
        hooks.append(layer.register_forward_hook(
            lambda mod, inputs, out, name=name: stds.__setitem__(name, inputs[0].float().std().item())))
    try:
        run_forward()
    finally:
        for h in hooks:
            h.remove()
    return {f"inv_std/{name}": 1.0 / max(std, 1e-12) for name, std in stds.items()}
