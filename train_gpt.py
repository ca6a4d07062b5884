"""
Pretrain the LLaMA-style GPT of model.py with RMSNorm (--norm rms), DyT (--norm dyt) or Derf
(--norm derf).

    python train_gpt.py --norm dyt                  # CPU, a few minutes, built-in corpus
    torchrun --nproc_per_node=8 train_gpt.py --preset llama7b --data data/fineweb_edu ...
    python train_gpt.py prepare --input docs.jsonl --encoding gpt2 --out data/mine
    python train_gpt.py sample --ckpt out/ckpt.pt --prompt "The " --top_k 50

The recipe is the DyT paper's LLaMA one: AdamW (0.9, 0.95), weight decay 0.1 on matrices
only, clipping at 1.0, linear warmup then cosine to 10% of the peak lr. The global batch is
given in tokens; each rank runs global / (world * micro_batch * seq_len) micro-steps, and the
summed loss is divided by the global token count, so any world size trains the same model.
Shared machinery (CLI, distributed, FSDP2, checkpoints, logging) lives in train_common.py.

DyT and Derf at small width (this project's finding, not the papers'): with the papers' gamma
init of 1 the default run stalls at the unigram loss (DyT's +-gamma ceiling makes the model grow
one token-independent residual vector until every tanh saturates). Below width 1024 gamma is
initialised so that every DyT-like layer's output RMS at init is 2.5 (model.DYT_OUT_RMS0;
--norm_out_rms, or --dyt_gamma0 for a fixed gamma). The measured table (each norm at its own
best lr, 3 seeds, widths 64-384) is in README.md, "DyT and Derf on the small GPT".
"""

import contextlib
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, asdict

import torch

import train_common as tc
from train_common import UserError
import data as data_lib
from model import GPT, GPTConfig, GPT_PRESETS, num_params

# DTensor on CPU warns on every random op; the CPU FSDP path does not use DTensor RNG.
warnings.filterwarnings("ignore", message="DTensor random operators")


@dataclass
class GPTTrainConfig(tc.TrainConfig):
    # model (the defaults are the CPU run: model.py's "nano" shape)
    norm: str = field(default="dyt", metadata={"help": "rms (baseline), dyt, ln, or any of dyt.NORMS"})
    dim: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    ffn_dim: int = field(default=0, metadata={"help": "0: LLaMA's 8/3*dim rule"})
    vocab_size: int = field(default=0, metadata={"help": "0: from the data"})
    seq_len: int = 256
    rope_theta: float = 10000.0
    alpha0_attn: float = field(default=0.0, metadata={"help": "DyT alpha0 before attention; 0: by width"})
    alpha0_other: float = field(default=0.0, metadata={"help": "alpha0 of the DyT before the MLP; 0: by width"})
    alpha0_final: float = field(default=None, metadata={"help": "alpha0 of the final DyT (before the head); "
                                                       "default: --alpha0_other's"})
    dyt_gamma0: float = field(default=None, metadata={"help": "DyT/Derf gamma init, every layer; "
                                                     "default: from --norm_out_rms"})
    norm_out_rms: float = field(default=None, metadata={"help": "each norm layer's output RMS at init "
                                "(DyT/Derf: gamma set to give it; RMSNorm/LN: their weight); default: "
                                "2.5 for DyT-like layers below width 1024, gamma 1 (the papers') from "
                                "1024 up, 1 for RMSNorm/LN"})
    dyt_bias: bool = False
    init_std: float = 0.02
    # data and batch
    data: str = field(default="default", metadata={"help": "'default' (built-in corpus) or a prepared dir"})
    global_batch_tokens: int = 16 * 256
    micro_batch: int = field(default=0, metadata={"help": "sequences per micro-step per rank; 0: "
                                                 "the rank's share of the batch, in steps of <= 16"})
    train_tokens: int = field(default=0, metadata={"help": "token budget; steps = ceil(this / global batch) when max_steps is 0"})
    eval_tokens: int = field(default=65536, metadata={"help": "validation tokens per evaluation"})
    # sampling at the end
    sample_tokens: int = 300
    prompt: str = "The "
    temperature: float = 0.8
    top_k: int = 40
    stop_at: int = field(default=0, metadata={"help": "checkpoint and stop after this step, as a "
                                              "preempted job would (resume with --resume)"})
    # the CPU run's schedule (overrides TrainConfig's defaults; the presets set their own)
    lr: float = 2e-3
    warmup_steps: int = 50
    max_steps: int = field(default=450, metadata={"help": "0: derived from --train_tokens"})
    eval_interval: int = 150
    ckpt_interval: int = 150


# Presets. The default (no --preset) is the CPU run: the nano shape, 450 steps of 4,096
# tokens, about 3-4 minutes on 2 cores.
PRESETS = {
    "cpu": dict(),
    "nano": dict(**{k: v for k, v in GPT_PRESETS["nano"].items() if k != "block_size"}),
    "micro": dict(dim=256, n_layer=6, n_head=8, n_kv_head=4, micro_batch=8,
                  global_batch_tokens=32 * 256, max_steps=1000, lr=1e-3),
    "gpt2_small": dict(dim=768, n_layer=12, n_head=12, n_kv_head=12, ffn_dim=2048, seq_len=1024,
                       vocab_size=50304, dyt_gamma0=1.0, lr=6e-4, global_batch_tokens=524288, micro_batch=16,
                       train_tokens=10_000_000_000, warmup_steps=700, data="data/fineweb_edu_gpt2",
                       eval_interval=250, ckpt_interval=1000, eval_tokens=10 * 524288,
                       max_steps=0),
}


def _llama(name, lr, alpha0_attn, alpha0_other):
    p = GPT_PRESETS[name]
    return dict(dim=p["dim"], n_layer=p["n_layer"], n_head=p["n_head"], n_kv_head=p["n_kv_head"],
                ffn_dim=p["ffn_dim"], vocab_size=p["vocab_size"], seq_len=p["block_size"],
                lr=lr, global_batch_tokens=4 * 1024 * 1024, micro_batch=1, dyt_gamma0=1.0,
                train_tokens=200_000_000_000, warmup_steps=2000, alpha0_attn=alpha0_attn,
                alpha0_other=alpha0_other, fsdp=True, activation_checkpointing=True,
                eval_interval=500, ckpt_interval=1000, eval_tokens=4 * 1024 * 1024, log_interval=1,
                data="data/llama", max_steps=0)


# The paper's LLaMA runs: lr 3e-4 (1.5e-4 for 34B/70B), 4M-token batches of 4096-token
# sequences, 200B tokens, alpha0 (attention / other) 0.8/0.2, 0.6/0.15, 0.2/0.05, 0.2/0.05.
PRESETS["llama7b"] = _llama("llama7b", 3e-4, 0.8, 0.2)
PRESETS["llama13b"] = _llama("llama13b", 3e-4, 0.6, 0.15)
PRESETS["llama34b"] = _llama("llama34b", 1.5e-4, 0.2, 0.05)
PRESETS["llama70b"] = _llama("llama70b", 1.5e-4, 0.2, 0.05)

def derive_steps(cfg):
    """Steps: max_steps if given, else ceil(train_tokens / global_batch_tokens)."""
    if cfg.max_steps:
        return cfg.max_steps
    if cfg.train_tokens:
        return math.ceil(cfg.train_tokens / cfg.global_batch_tokens)
    raise UserError("give --max_steps or --train_tokens")


def batch_plan(cfg, world_size):
    """(global batch in sequences, micro-steps per rank) from the token budget per step.
    --micro_batch 0 derives it from the world size (so plain `torchrun --nproc_per_node=N`
    needs no extra flag); train() writes the micro batch used back into cfg."""
    if cfg.global_batch_tokens % cfg.seq_len:
        raise UserError(f"--global_batch_tokens {cfg.global_batch_tokens} is not a multiple of "
                        f"--seq_len {cfg.seq_len}")
    seqs = cfg.global_batch_tokens // cfg.seq_len
    micro = cfg.micro_batch or tc.auto_micro_batch(
        seqs, world_size, flag="--global_batch_tokens / --seq_len")
    return seqs, tc.accumulation_steps(seqs, micro, world_size)


def check_flags(cfg):
    """One-line errors for values that would crash later (--seq_len 0: a zero division)."""
    tc.require_positive(cfg, ("dim", "n_layer", "n_head", "n_kv_head", "seq_len",
                              "global_batch_tokens", "eval_tokens", "temperature"))
    for name in ("micro_batch", "train_tokens", "vocab_size", "ffn_dim", "stop_at",
                 "sample_tokens", "top_k"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("alpha0_attn", "alpha0_other", "alpha0_final", "dyt_gamma0", "norm_out_rms"):
        value = getattr(cfg, name)
        zero_ok = name in ("alpha0_attn", "alpha0_other")  # their 0 means "by width"
        if value is not None and (value < 0 or (value == 0 and not zero_ok)):
            raise UserError(f"--{name} must be > 0{' (or 0: by width)' if zero_ok else ''}, "
                            f"got {value}")


def model_config(cfg, data_vocab):
    vocab = cfg.vocab_size or 64 * math.ceil(data_vocab / 64)  # round up: faster matmuls
    if vocab < data_vocab:
        raise UserError(f"the data's encoding has {data_vocab} tokens but --vocab_size is "
                        f"{vocab}; pass --vocab_size 0 to size the model from the data")
    return GPTConfig(vocab_size=vocab, block_size=cfg.seq_len, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, dim=cfg.dim,
                     ffn_dim=cfg.ffn_dim, rope_theta=cfg.rope_theta, norm=cfg.norm,
                     alpha0_attn=cfg.alpha0_attn, alpha0_other=cfg.alpha0_other,
                     alpha0_final=cfg.alpha0_final or 0.0, dyt_gamma0=cfg.dyt_gamma0 or 0.0,
                     norm_out_rms=cfg.norm_out_rms or 0.0, dyt_bias=cfg.dyt_bias, init_std=cfg.init_std)


def build_model(mcfg):
    try:
        return GPT(mcfg)
    except ValueError as e:
        raise UserError(str(e))


def ckpt_path(cfg):
    return os.path.join(cfg.out_dir, "ckpt_dcp" if cfg.fsdp else "ckpt.pt")


@torch.no_grad()
def evaluate(model, val, cfg, dist, autocast):
    """(val loss in nats/token, bits per byte) over the first eval_tokens of the val split."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=dist.device)
    for x, y in data_lib.val_windows(val, cfg.seq_len, cfg.eval_tokens, dist.rank,
                                     dist.world_size, batch=cfg.micro_batch):
        with autocast:
            _, loss = model(x.to(dist.device), y.to(dist.device), reduction="sum")
        total[0] += loss.double()
        total[1] += y.numel()
    tc.all_reduce_sum(total)
    model.train()
    loss = (total[0] / total[1]).item()
    return loss, loss / math.log(2) / val.bytes_per_token


def _fsdp_even(val, cfg, dist):
    # FSDP2 forwards are collectives: every rank must run as many. Clip eval_tokens so the
    # windows split evenly into equal batches.
    n = min(sum(val.chunks(cfg.seq_len)), max(1, cfg.eval_tokens // cfg.seq_len))
    per_rank = n // dist.world_size
    per_rank -= per_rank % cfg.micro_batch if per_rank >= cfg.micro_batch else 0
    if per_rank == 0:
        raise UserError("too few validation windows for this world size; raise --eval_tokens")
    cfg.eval_tokens = per_rank * dist.world_size * cfg.seq_len


def generate_text(model, enc, prompt, n_tokens, temperature, top_k, device, seed=0):
    """Sample from the model; every rank gets the same text (needed under FSDP)."""
    ids = enc.encode_ordinary(prompt) if prompt else [data_lib.eot_of(enc) or 10]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    g_state = torch.get_rng_state()
    torch.manual_seed(seed)  # same draws on every rank
    out = model.generate(idx, n_tokens, temperature=temperature, top_k=top_k or None)
    torch.set_rng_state(g_state)
    return enc.decode(out[0].tolist())


def _encoding_or_none(name):
    try:
        return data_lib.get_encoding(name)
    except UserError:
        return None


# ---------------------------------------------------------------------------------------------

@tc.trainer
def train(argv=None):
    cfg, preset, _ = tc.parse_config(GPTTrainConfig, PRESETS, argv, description=__doc__.split("\n\n")[0])
    check_flags(cfg)
    cfg.out_dir = cfg.out_dir or os.path.join("out", f"gpt_{cfg.norm}")
    _, signals = tc.start_run(cfg.out_dir, ckpt_path(cfg), cfg.resume)
    dist = tc.setup_distributed(cfg.device, force_group=cfg.fsdp)
    device = dist.device
    tc.setup_float_math(device, cfg.flush_subnormals)
    autocast = tc.autocast_context(device, cfg.dtype)

    # data (rank 0 builds the default corpus cache first, the others wait)
    if dist.is_main:
        data_dir = data_lib.resolve_data_dir(cfg.data)
    tc.barrier()
    data_dir = data_lib.resolve_data_dir(cfg.data)
    train_set = data_lib.TokenDataset(data_dir, "train")
    val_set = data_lib.TokenDataset(data_dir, "val")
    mcfg = model_config(cfg, train_set.vocab_size)
    steps = derive_steps(cfg)
    cfg.max_steps = steps
    global_seqs, accum = batch_plan(cfg, dist.world_size)
    cfg.micro_batch = global_seqs // (dist.world_size * accum)
    global_tokens = global_seqs * cfg.seq_len
    if cfg.fsdp:
        _fsdp_even(val_set, cfg, dist)

    # model: the same init on every rank and world size (seeded before the per-rank seed)
    torch.manual_seed(cfg.seed)
    if cfg.fsdp:
        # FSDP2 mixed precision: compute in the autocast dtype (bf16 on a GPU by default, and
        # on a CPU with --dtype bf16), fp32 master weights and fp32 gradient reduction
        param_dtype = tc.autocast_dtype(device, cfg.dtype) or torch.float32
        model = tc.build_fsdp_model(lambda: GPT(mcfg), dist, param_dtype=param_dtype,
                                    reduce_dtype=torch.float32, seed=cfg.seed,
                                    activation_checkpointing=cfg.activation_checkpointing)
    else:
        model = build_model(mcfg).to(device)
        if cfg.activation_checkpointing:
            tc.apply_activation_checkpointing(model)
    raw = model
    optimizer = tc.build_optimizer(raw, cfg, device)
    loader = data_lib.TokenLoader(train_set, cfg.seq_len, cfg.micro_batch, accum, dist.rank,
                                  dist.world_size, seed=cfg.seed)
    guard = tc.LossGuard(cfg.explode_factor)
    path = ckpt_path(cfg)
    start_step, last_ckpt = 0, None
    tc.seed_everything(cfg.seed, dist.rank)

    if cfg.resume:
        if cfg.fsdp:
            extra = tc.load_sharded(path, raw, optimizer, asdict(mcfg))
        else:
            extra = tc.load_checkpoint(path, asdict(mcfg), map_location=device)
            raw.load_state_dict(extra["model"])
            optimizer.load_state_dict(extra["optimizer"])
        start_step = extra["step"]
        loader.load_state_dict(extra["data"])
        guard.load_state_dict(extra["guard"])
        rngs = extra["rng"]
        if len(rngs) == dist.world_size:
            tc.restore_rng_state(rngs[dist.rank])
        last_ckpt = path
        if tc.end_if_finished(dist, path, start_step, steps):
            return None

    if not cfg.fsdp:
        model = tc.wrap_ddp(model, dist)
    if cfg.compile:
        model = torch.compile(model)

    def save(step):
        extra = {"step": step, "model_config": asdict(mcfg), "train_config": asdict(cfg),
                 "data": loader.state_dict(), "guard": guard.state_dict(),
                 "rng": tc.gather_objects(tc.capture_rng_state(), dist),
                 "encoding": train_set.encoding, "preset": preset or ""}
        if cfg.fsdp:
            tc.save_sharded(path, raw, optimizer, extra, dist)
        elif dist.is_main:
            extra.update(model=raw.state_dict(), optimizer=optimizer.state_dict())
            tc.save_checkpoint(path, extra)
        tc.barrier()
        return path

    def checked_save(step, x, y):
        # the loss of the weights about to be saved, on the step's last batch: a checkpoint is
        # written only from a state that is finite and not exploding (tc.checkpoint_problem)
        raw.eval()
        with torch.no_grad(), autocast:
            _, probe = raw(x, y)
        raw.train()
        return tc.guarded_save(save, step, last_ckpt, raw, optimizer, guard, probe.item())

    logger = tc.RunLogger(cfg.out_dir, cfg, dist.is_main, cfg.wandb, cfg.wandb_project,
                          cfg.run_name, resume_step=start_step if cfg.resume else None)
    flops_tok = raw.flops_per_token(cfg.seq_len)
    fsdp_note = (f", FSDP2 ({str(param_dtype).removeprefix('torch.')} compute, float32 "
                 "weights and gradient reduction)") if cfg.fsdp else ""
    if dist.is_main:
        alpha0 = (f", norm weight init {mcfg.norm_out_rms or 1:g}" if cfg.norm in ("rms", "ln") else
                  f", alpha0 {tuple(round(a, 3) for a in mcfg.alpha0s())} (attn, other, final)"
                  f", gamma0 ({', '.join(f'{g:.3g}' for g in mcfg.gamma0s())})")
        print(f"{cfg.norm}: {num_params(raw):,} parameters, {mcfg.n_layer} layers x {mcfg.dim}, "
              f"vocab {mcfg.vocab_size}{alpha0}")
        print(f"data {data_dir} ({train_set.encoding}, {train_set.n_tokens:,} train tokens); "
              f"{steps} steps of {global_tokens:,} tokens = {global_seqs} seqs x {cfg.seq_len} "
              f"({dist.world_size} rank(s) x {accum} micro-steps x {cfg.micro_batch}); "
              f"device {device}{fsdp_note}", flush=True)

    bar = None
    if dist.is_main:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=start_step, desc="train", dynamic_ncols=True,
                   file=sys.stdout, mininterval=1.0)
    timer = tc.Timer(device)
    tokens_per_s = 0.0
    val_loss = bpb = None
    stopping = False
    for step in range(start_step, steps):
        lr = tc.lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for j, (x, y) in enumerate(loader.next_step()):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            last = j == accum - 1
            if cfg.fsdp:
                raw.set_requires_gradient_sync(last)
            sync = model.no_sync() if (hasattr(model, "no_sync") and not last) else \
                contextlib.nullcontext()
            with sync:
                with autocast:
                    _, loss = model(x, y, reduction="sum")
                # DDP/FSDP average gradients over ranks; times world / global tokens gives
                # d(sum of all ranks' losses / global tokens).
                (loss * (dist.world_size / global_tokens)).backward()
            loss_sum += loss.detach().double()
        grad_norm = tc.clip_grad_norm(model, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = tc.all_reduce_sum(loss_sum).item() / global_tokens
        dt = timer.lap()
        tokens_per_s = global_tokens / dt

        try:
            guard.check(train_loss, step + 1, last_ckpt)
        except tc.TrainingDiverged:
            if bar is not None:
                bar.close()
            raise
        done = step + 1
        is_last = done == steps
        row = None
        if done % cfg.log_interval == 0 or is_last or done == 1:
            row = {"step": done, "loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": tokens_per_s, "tokens": done * global_tokens}
            m = tc.mfu(flops_tok, tokens_per_s / dist.world_size, device)
            if m is not None:
                row["mfu"] = m
            row.update(tc.dyt_alphas(raw))
        if (cfg.eval_interval and done % cfg.eval_interval == 0) or is_last:
            val_loss, bpb = evaluate(model, val_set, cfg, dist, autocast)
            row = row or {"step": done, "loss": train_loss, "lr": lr}
            row.update(val_loss=val_loss, val_bpb=bpb)
            if bar is not None:
                bar.write(f"step {done}: train loss {train_loss:.4f}, val loss {val_loss:.4f} "
                          f"({bpb:.3f} bits/byte)")
        if row is not None:
            logger.log(row)
        stopping = done == cfg.stop_at
        signalled = signals.should_stop(device)
        if (cfg.ckpt_interval and done % cfg.ckpt_interval == 0) or is_last or stopping \
                or signalled:
            try:
                last_ckpt = checked_save(done, x, y)
            except tc.TrainingDiverged:
                if bar is not None:
                    bar.close()
                raise
        if signalled and not is_last:
            if bar is not None:
                bar.close()
            raise tc.Interrupted(f"{signals.name()} at step {done}: saved {last_ckpt}; continue "
                                 "with the same command and --resume", signals.exit_code())
        timer.lap()  # evaluation and saving do not count against tokens/s
        if bar is not None:
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            bar.update(1)
        if stopping:
            break
    if bar is not None:
        bar.close()
    logger.close()

    if cfg.sample_tokens and steps > start_step and not stopping:
        enc = _encoding_or_none(train_set.encoding)
        if enc is not None:
            text = generate_text(raw, enc, cfg.prompt, cfg.sample_tokens, cfg.temperature,
                                 cfg.top_k, device, cfg.seed)
            if dist.is_main:
                print("-" * 60 + "\n" + text + "\n" + "-" * 60)
    if dist.is_main and val_loss is not None:
        print(f"final val loss {val_loss:.4f} ({bpb:.4f} bits/byte); checkpoint {last_ckpt}")
    if dist.initialized_here:
        tc.teardown_distributed()
    return val_loss


def sample(argv=None):
    import argparse
    p = tc._Parser(prog="train_gpt.py sample", description="sample from a checkpoint",
                   allow_abbrev=False)
    p.add_argument("--ckpt", required=True, help="a ckpt.pt written by train_gpt.py")
    p.add_argument("--prompt", default="The ")
    p.add_argument("--max_new_tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=40)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if os.path.isdir(a.ckpt):
        raise UserError(f"{a.ckpt} is a sharded (FSDP) checkpoint; sample from a single-file "
                        "ckpt.pt (train without --fsdp, or convert with "
                        "torch.distributed.checkpoint.format_utils.dcp_to_torch_save)")
    state = tc.load_checkpoint(a.ckpt, missing_hint="check --ckpt (training writes "
                               "out/gpt_<norm>/ckpt.pt)")
    try:
        mcfg = GPTConfig(**state["model_config"])
    except (KeyError, TypeError):
        raise UserError(f"{a.ckpt} has no GPT model config; is it a train_gpt.py checkpoint?")
    model = GPT(mcfg)
    model.load_state_dict(state["model"])
    model.to(a.device).eval()
    enc = data_lib.get_encoding(state.get("encoding", "byte"))
    for i in range(a.num_samples):
        print(generate_text(model, enc, a.prompt, a.max_new_tokens, a.temperature, a.top_k,
                            torch.device(a.device), a.seed + i))
        print("-" * 60)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "prepare":
        return data_lib.main(argv)
    if argv and argv[0] == "sample":
        return sample(argv[1:])
    return train(argv)


if __name__ == "__main__":
    tc.main_guard(main)
