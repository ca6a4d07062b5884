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
    autocast_context(dev, dtype)      bf16 autocast on CUDA, a no-op on CPU; setup_tf32()
  Optimisation
    lr_at(step, cfg)                  linear warmup, cosine decay to cfg.min_lr_ratio * lr
    build_optimizer(model, cfg, dev)  AdamW on model.param_groups (fused kernel)
    accumulation_steps(global_batch, micro_batch, world_size) -> micro-steps per rank
    clip_grad_norm(model, max_norm)   works for plain, DDP and FSDP2 models; returns the norm
  Wrapping
    wrap_ddp(model, dist)
    build_fsdp_model(build, dist, param_dtype, reduce_dtype, seed)  meta -> fully_shard per
                                      block -> to_empty -> init_weights shard by shard
    apply_activation_checkpointing(model)   recompute each block in the backward pass
    unwrap(model)                     the nn.Module under DDP / torch.compile
  Checkpoints
    save_checkpoint(path, state)      one file, atomic (tmp + os.replace)
    load_checkpoint(path, config=...) weights_only=True, one-line error on a config mismatch
    save_sharded / load_sharded       torch.distributed.checkpoint (DCP) directory under FSDP
    capture_rng_state() / restore_rng_state(state)   python, numpy, torch, cuda
  Logging and safety
    RunLogger(out_dir, cfg, enabled)  log(dict) -> metrics.jsonl + metrics.csv (+ wandb)
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


def main_guard(main, argv=None):
    """Run main(argv); turn UserError (and TrainingDiverged) into `error: ...` on stderr, exit 2.

    A traceback is for bugs; a user who gave a wrong path or flag gets one line saying what to
    do. Exits 0 on success."""
    try:
        main(argv)
    except (UserError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        teardown_distributed()
        sys.exit(2)
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
    ckpt_interval: int = field(default=0, metadata={"help": "steps between checkpoints; 0: final only"})
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
    return cfg, preset, set(args)


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


def setup_tf32():
    """TF32 matmuls and convolutions on Ampere+ GPUs (fp32 range, 10-bit mantissa)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")


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
    moment leaves either the old complete checkpoint or the new complete one."""
    tmp = f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def load_checkpoint(path, config=None, config_key="model_config", map_location="cpu"):
    """torch.load(path, weights_only=True), checking state[config_key] == config if given.
    Missing, unreadable or mismatched checkpoints raise UserError with one line."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; check the path (or drop --resume)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path}: {str(e).splitlines()[0][:200]}")
    if config is not None:
        check_config(state.get(config_key, {}), config, path=path)
    return state


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

class RunLogger:
    """metrics.jsonl (one JSON object per log call) and metrics.csv in out_dir, plus wandb when
    asked for and installed. Only the main rank writes (enabled=False elsewhere). New keys
    (val loss appearing later, say) rewrite the CSV header from the JSONL."""

    def __init__(self, out_dir, cfg=None, enabled=True, use_wandb=False, project="dyt", name=""):
        self.enabled = enabled
        self.jsonl = os.path.join(out_dir, "metrics.jsonl")
        self.csv = os.path.join(out_dir, "metrics.csv")
        self.columns = []
        self.wandb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(self.jsonl):  # resuming: keep the columns seen so far
            for row in self._rows():
                self.columns += [k for k in row if k not in self.columns]
        if use_wandb:
            try:
                import wandb
                self.wandb = wandb.init(project=project, name=name or None,
                                        config=config_dict(cfg) if cfg is not None else None)
            except ImportError:
                print("warning: --wandb given but wandb is not installed; logging to files only",
                      file=sys.stderr)

    def _rows(self):
        with open(self.jsonl) as f:
            return [json.loads(line) for line in f if line.strip()]

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
                w = csv.DictWriter(f, fieldnames=self.columns)
                w.writeheader()
                w.writerows(self._rows())
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
