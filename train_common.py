"""
What train_gpt.py and train_vit.py share: the errors a user can fix, the config and its
flags, processes and devices, the optimiser and schedule, DDP/FSDP2 wrapping, and the
readouts a run logs besides its loss. A run's safety (lock, signals, divergence guard, logs,
progress bar) is run.py's; its checkpoints are checkpoint.py's.

A trainer's config is a TrainConfig subclass whose `model` field is the model's own config
(model.GPTConfig, model.ViTConfig): each model field is a flag too (--dim sets cfg.model.dim),
so a shape is declared once. 0 means "automatic" wherever a number has a rule.
"""

import argparse
import contextlib
import dataclasses
import difflib
import functools
import math
import os
import random
import sys
from types import SimpleNamespace
from dataclasses import asdict, dataclass, field, fields

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
    """The fields every trainer has. A trainer subclasses it, adds its data and recipe fields
    and `model`, its model's config. field(metadata={"help": ..., "choices": [...]}) feeds
    the CLI."""
    out_dir: str = field(default="", metadata={"help": "checkpoints and logs go here "
                                                "(default: out/<trainer>_<norm>)"})
    seed: int = 1337
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N"})
    dtype: str = field(default="auto", metadata={
        "help": "autocast dtype: auto (bf16 on CUDA, fp32 on CPU), bf16, fp32",
        "choices": ["auto", "bf16", "fp32"]})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    kernel: bool = field(default=True, metadata={
        "help": "CUDA: DyT/Derf as kernel.py's fused Triton kernel; false: as the formula in "
                "dyt.py's forward (what an edit there changes)"})
    flush_subnormals: bool = field(default=True, metadata={
        "help": "CPU: flush subnormal floats to zero (x86 is 10-100x slower on them); "
                "--no-flush_subnormals keeps IEEE subnormals"})
    # optimiser and schedule (the DyT paper's LLaMA recipe by default)
    optimizer: str = field(default="adamw", metadata={
        "choices": ["adamw", "muon"], "help": "muon: torch.optim.Muon on the blocks' matrices, AdamW "
        "(--lr) on the rest: embeddings, head, every 1-d parameter (norm and DyT/Derf ones included)"})
    muon_lr: float = field(default=0.02, metadata={
        "help": "--optimizer muon: the matrices' lr (0.02 as modded-nanogpt and nanochat, momentum 0.95)"})
    lr: float = 3e-4
    min_lr_ratio: float = field(default=0.1, metadata={"help": "the schedule decays to lr * this"})
    schedule: str = field(default="cosine", metadata={
        "choices": ["cosine", "wsd"], "help": "after the warmup: cosine to the end, or wsd (warmup-"
        "stable-decay: the peak lr, then linear to lr * min_lr_ratio over the last --decay_steps)"})
    decay_fraction: float = field(default=0.2, metadata={"help": "wsd: the decay's share of the run "
                                                         "(as nanochat's warmdown), unless --decay_steps"})
    decay_steps: int = field(default=0, metadata={"help": "wsd: the decay's steps (0: --decay_fraction)"})
    keep_ckpts: str = field(default="", metadata={"help": "steps whose checkpoints are kept as "
                                                  "ckpt_step<N>.pt, e.g. 450,1800 (branch from them)"})
    branch_from: str = field(default="", metadata={
        "help": "a kept checkpoint of a wsd run's stable phase: continue from it into this run's own "
        "out_dir and schedule (a shorter budget's decay)"})
    warmup_steps: int = 100
    max_steps: int = field(default=0, metadata={"help": "0: derived by the trainer"})
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = field(default=1.0, metadata={"help": "0 disables clipping"})
    # parallelism and memory
    fsdp: bool = field(default=False, metadata={"help": "FSDP2 (fully_shard per block)"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each block in the backward pass instead of storing its activations"})
    # checkpoints, logs
    # periodic by default: a crash or Ctrl-C must not lose a long run (SIGINT/SIGTERM also save)
    ckpt_interval: int = field(default=500, metadata={"help": "steps between checkpoints; 0: final only"})
    resume: bool = field(default=False, metadata={"help": "continue from out_dir's checkpoint"})
    stop_at: int = field(default=0, metadata={"help": "checkpoint and stop after this step, as a "
                                              "preempted job would (continue with --resume)"})
    log_interval: int = 10
    eval_interval: int = 100
    wandb: bool = False
    wandb_project: str = "dyt"
    run_name: str = ""
    explode_factor: float = field(default=4.0, metadata={
        "help": "stop when the loss exceeds this times its best smoothed value; 0: NaN check only"})


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump), naming the closest valid flag. No
    abbreviations, in subcommands too: a prefix silently taken for a longer flag (--seed for
    --seeds) runs something other than what was typed."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        self._parsed, extras = super().parse_known_args(args, namespace)
        return self._parsed, extras

    def _parsers_used(self):
        """This parser and the subcommand's, whose flags a hint may name."""
        parsed = getattr(self, "_parsed", None)
        subs = [action.choices.get(getattr(parsed, action.dest, None) or "") for action in self._actions
                if isinstance(action, argparse._SubParsersAction)]
        return [self] + [sub for sub in subs if sub is not None]

    def error(self, message):
        if "unrecognized arguments" in message:
            bad = message.split(":", 1)[1].split()
            flags = [a for p in self._parsers_used() for a in p._option_string_actions if a.startswith("--")]
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


def config_flags(cls):
    """{flag: (field, default, in_model)} for a TrainConfig subclass: its own fields, and the
    fields of its model config flattened (--dim is cfg.model.dim). A model field may name its
    flag otherwise in metadata["flag"] (GPTConfig.block_size is --seq_len), or None for a
    field the data sets."""
    flags = {}
    for f in fields(cls):
        if f.name != "model":
            default = f.default if f.default is not dataclasses.MISSING else None
            flags[f.name] = (f, default, False)
            continue
        model = f.default_factory()
        for mf in fields(model):
            flag = mf.metadata.get("flag", mf.name)
            if flag:
                flags[flag] = (mf, getattr(model, mf.name), True)
    return flags


def build_parser(cls, presets, description=""):
    parser = _Parser(description=description)
    parser.add_argument("--preset", default=None, choices=None,
                        help=f"applied first, then any flag overrides it: {', '.join(presets)}")
    for flag, (f, default, _) in config_flags(cls).items():
        kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str,
                                                       "bool": bool}.get(str(f.type), str)
        help_text = f"{f.metadata.get('help', '')} (default {default})".strip()
        if kind is bool:
            # --flag, --flag=true/false, --no-flag
            parser.add_argument(f"--{flag}", dest=flag, nargs="?", const=True, type=_parse_bool,
                                default=argparse.SUPPRESS, metavar="BOOL", help=help_text)
            parser.add_argument(f"--no-{flag}", f"--no_{flag}", dest=flag, action="store_false",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            parser.add_argument(f"--{flag}", dest=flag, type=kind, default=argparse.SUPPRESS,
                                choices=f.metadata.get("choices"), help=help_text)
    return parser


def parse_config(cls, presets, argv=None, description="", default_preset=None, renamed=None):
    """A `cls` instance from the command line.

    presets: {name: {field: value}}, the fields the trainer's or its model config's (by field
    name: block_size, not seq_len). The preset (--preset, else default_preset) is applied on top
    of the dataclass defaults, then every flag given overrides it. Unknown flags, wrong types
    and unknown presets exit with a one-line error (code 2); so does a preset in `renamed`
    ({old: new}), naming its new name. Returns (config, preset name, the flags given).
    """
    parser = build_parser(cls, presets, description)
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset") or default_preset
    flags = config_flags(cls)
    values = {}
    if preset is not None:
        if preset in (renamed or {}):
            parser.error(f"--preset {preset} is now --preset {renamed[preset]}")
        if preset not in presets:
            close = difflib.get_close_matches(preset, list(presets), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            parser.error(f"unknown preset {preset!r}{hint}; choose one of {', '.join(presets)}")
        values.update(presets[preset])
    values.update({flags[flag][0].name: value for flag, value in args.items()})
    model_fields = {f.name for f, _, in_model in flags.values() if in_model}
    own = {f.name for f in fields(cls)}
    for k in values:
        if k not in own | model_fields:
            raise KeyError(f"preset {preset} sets {k}, which {cls.__name__} has not")
    kwargs = {k: v for k, v in values.items() if k not in model_fields}
    if "model" in own:
        default_model = next(f for f in fields(cls) if f.name == "model").default_factory()
        kwargs["model"] = dataclasses.replace(default_model, **{k: v for k, v in values.items()
                                                                if k in model_fields})
    cfg = cls(**kwargs)
    check_common(cfg)
    return cfg, preset, set(args)


def need(ok, flag, value, rule):
    """UserError naming the flag, its value and the rule it breaks, unless ok."""
    if not ok:
        raise UserError(f"--{flag} {value!r} is out of range: it must be {rule}")


def check_common(cfg):
    """One-line errors for values of the shared fields that would crash later (a zero
    division, say) or silently do nothing (--max_steps -5 used to exit 0 having trained
    nothing). Each names the flag and the range it takes."""
    for flag, ok, rule in (
            ("lr", cfg.lr > 0 and math.isfinite(cfg.lr), "a positive number"),
            ("min_lr_ratio", 0 <= cfg.min_lr_ratio <= 1, "in [0, 1]"),
            ("warmup_steps", cfg.warmup_steps >= 0, ">= 0"),
            ("max_steps", cfg.max_steps >= 0, ">= 0 (0: derived by the trainer)"),
            ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
            ("beta1", 0 <= cfg.beta1 < 1, "in [0, 1)"),
            ("beta2", 0 <= cfg.beta2 < 1, "in [0, 1)"),
            ("grad_clip", cfg.grad_clip >= 0, ">= 0 (0 disables clipping)"),
            ("ckpt_interval", cfg.ckpt_interval >= 0, ">= 0 (0: final checkpoint only)"),
            ("stop_at", cfg.stop_at >= 0, ">= 0 (0: run to the end)"),
            ("log_interval", cfg.log_interval >= 1, ">= 1"),
            ("eval_interval", cfg.eval_interval >= 0, ">= 0"),
            ("explode_factor", cfg.explode_factor == 0 or cfg.explode_factor > 1,
             "0 (NaN check only) or above 1"),
            ("muon_lr", cfg.muon_lr > 0 and math.isfinite(cfg.muon_lr), "a positive number"),
            ("decay_fraction", 0 <= cfg.decay_fraction <= 1, "in [0, 1]"),
            ("decay_steps", cfg.decay_steps >= 0, ">= 0 (0: --decay_fraction of the run)")):
        need(ok, flag, getattr(cfg, flag), rule)
    if cfg.optimizer == "muon" and cfg.fsdp:  # before a model is built, not after
        raise UserError("--optimizer muon with --fsdp: Muon's Newton-Schulz step needs each matrix "
                        "whole and FSDP2 shards them; drop --fsdp (DDP works) or use --optimizer adamw")


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
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        if "RANK" not in os.environ:  # a one-process group without torchrun: nothing put in the
            # environment, which child processes would inherit as a torchrun's
            kwargs.update(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
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
    them through every matmul of the backward pass (at nanoGPT's shape with DyT the step
    doubled within 20 steps: docs/speed.md). Values that small are ~0 to any loss here. The flag is per thread; torch sets it on its intra-op worker threads
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

def decay_start(cfg):
    """The first step of a wsd schedule's decay."""
    steps = cfg.decay_steps or round(cfg.decay_fraction * cfg.max_steps)
    return max(cfg.max_steps - steps, cfg.warmup_steps)


def lr_at(step, cfg):
    """Learning rate for `step` (0-based): linear warmup from lr/warmup to lr over
    warmup_steps; then cosine from lr to min_lr_ratio * lr at max_steps (flat after), or with
    --schedule wsd the peak until decay_start, then linear down to min_lr_ratio * lr at the
    last step. A wsd run's lr before its decay does not depend on its length: a shorter
    budget can branch from a longer run's stable phase (--branch_from)."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        start = decay_start(cfg)
        if step < start:
            return peak
        return peak + (floor - peak) * min((step - start + 1) / max(cfg.max_steps - start, 1), 1.0)
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    """Every group at lr, times its lr_ratio (Muon's groups: --muon_lr / --lr)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)
    return lr


def keep_steps(cfg):
    """The steps of --keep_ckpts, checked against the run: a step beyond it is one line."""
    try:
        steps = {int(s) for s in cfg.keep_ckpts.split(",") if s.strip()}
    except ValueError:
        raise UserError(f"--keep_ckpts {cfg.keep_ckpts!r}: give steps, e.g. 450,1800") from None
    late = sorted(s for s in steps if not 0 < s <= cfg.max_steps)
    if late:
        raise UserError(f"--keep_ckpts {','.join(map(str, late))}: outside this {cfg.max_steps}-step run")
    return steps


def resume_state(ckpt, cfg):
    """What a run continues from: its own checkpoint (--resume), or a branch's (--branch_from:
    another run's kept checkpoint, continued under this run's schedule into this out_dir)."""
    if cfg.resume:
        return ckpt.load()
    state = ckpt.load(cfg.branch_from)
    check_branch(state, cfg, cfg.branch_from)
    return state


def check_branch(state, cfg, path):
    """A branch starts from a wsd run's stable phase, before both runs' decays."""
    src = state.get("train_config", {})
    step = state["step"]
    if src.get("schedule") != "wsd":
        raise UserError(f"--branch_from {path}: that run's schedule is {src.get('schedule', 'cosine')}, "
                        "not wsd; branch from a --schedule wsd run's kept checkpoint")
    src_start = decay_start(SimpleNamespace(**{k: src.get(k, 0) for k in
                                               ("decay_steps", "decay_fraction", "max_steps", "warmup_steps")}))
    if step > src_start:
        raise UserError(f"--branch_from {path}: step {step} is past that run's decay start ({src_start}); "
                        "branch from a checkpoint of its stable phase")
    if step >= cfg.max_steps or decay_start(cfg) < step:
        raise UserError(f"--branch_from {path} is at step {step}: this run's --max_steps {cfg.max_steps} and "
                        f"decay (from step {decay_start(cfg)}) must come after it; raise --max_steps")
    for key in ("lr", "warmup_steps", "optimizer", "muon_lr", "min_lr_ratio", "weight_decay", "seed"):
        if key in src and src[key] != getattr(cfg, key):
            raise UserError(f"--branch_from {path} was trained with --{key} {src[key]}; branch with the same")


class MuonAdamW:
    """torch.optim.Muon on the matrices of the transformer blocks and AdamW on every other
    parameter, stepped as one optimizer (param_groups, state, state_dict as the trainers use)."""

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self):
        return self.adamw.param_groups + self.muon.param_groups

    @property
    def state(self):
        return {**self.adamw.state, **self.muon.state}

    def step(self):
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none=True):
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state):
        if set(state) != {"adamw", "muon"}:
            raise UserError("the checkpoint's optimizer is AdamW alone; resume with --optimizer adamw")
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])


def build_optimizer(model, cfg, device):
    """AdamW(betas, weight_decay) over the model's param_groups (no decay on 1-d parameters:
    norm/DyT alpha, gamma, beta, biases, the embedding scale). The fused kernel, on CUDA and on
    the CPU too: there it is one pass per tensor where the default takes a dozen (the step's
    time, measured: docs/speed.md). With --optimizer muon the blocks' 2-d matrices (attention
    and MLP weights) go to torch.optim.Muon instead (Keller Jordan's lr adjustment by shape)."""
    from model import param_groups
    module = unwrap(model)
    matrices = ({id(p) for n, p in module.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
                if cfg.optimizer == "muon" else set())
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in matrices]}
              for g in param_groups(module, cfg.weight_decay)]
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                              fused=device.type in ("cuda", "cpu"))
    if not matrices:
        return adamw
    muon = torch.optim.Muon([p for p in module.parameters() if id(p) in matrices], lr=cfg.muon_lr,
                            weight_decay=cfg.weight_decay, momentum=0.95, adjust_lr_fn="original")
    for g in muon.param_groups:
        g["lr_ratio"] = cfg.muon_lr / cfg.lr
    return MuonAdamW(muon, adamw)


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


def grad_sync(model, last):
    """The context of one micro-step's backward: gradients are reduced across ranks once per
    step, on its last micro-step. FSDP2 is told so (set_requires_gradient_sync); DDP skips the
    all-reduce inside no_sync(); without either it is a no-op."""
    module = unwrap(model)
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()


def optimizer_step(model, optimizer, grad_clip):
    """Clip the gradients (0: measure only), step, zero them; the norm before clipping."""
    grad_norm = clip_grad_norm(model, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


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
# What a run logs besides its loss

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
