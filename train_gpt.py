"""
Pretrain the LLaMA-style GPT of model.py with RMSNorm (--norm rms), DyT (--norm dyt) or Derf
(--norm derf).

    python train_gpt.py --norm dyt                  # CPU, a few minutes, built-in corpus
    torchrun --nproc_per_node=8 train_gpt.py --preset llama7b --data data/fineweb_edu ...
    python train_gpt.py sample --ckpt out/gpt_dyt/ckpt.pt --prompt "The " --top_k 50
    python train_gpt.py eval --ckpt out/gpt_dyt --data data/pydocs   # any checkpoint, any corpus

The recipe is the DyT paper's LLaMA one: AdamW (0.9, 0.95), weight decay 0.1 on matrices
only, clipping at 1.0, linear warmup then cosine to 10% of the peak lr. The global batch is
given in tokens; each rank runs global / (world * micro_batch * seq_len) micro-steps, and the
summed loss is divided by the global token count, so any world size trains the same model.
The model's flags are model.GPTConfig's fields; what the trainers share is in train_common.py,
a run's safety in run.py, its checkpoints in checkpoint.py.
"""

import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch

import data as data_lib
import train_common as tc
from dyt import fold_norms, is_dynamic, use_kernel
from model import GPT, GPT_PRESETS, GPTConfig, num_params
from run import Run
from train_common import UserError

# DTensor on CPU warns on every random op; the CPU FSDP path does not use DTensor RNG.
warnings.filterwarnings("ignore", message="DTensor random operators")


@dataclass
class GPTTrainConfig(tc.TrainConfig):
    # the model: the default is model.py's "nano" shape with DyT, its vocabulary from the data
    model: GPTConfig = field(default_factory=lambda: GPTConfig(**GPT_PRESETS["nano"], norm="dyt",
                                                               vocab_size=0))
    # data and batch
    data: str = field(default="default", metadata={"help": "'default' (built-in corpus) or a prepared dir"})
    global_batch_tokens: int = 16 * 256
    micro_batch: int = field(default=0, metadata={"help": "sequences per micro-step per rank; 0: "
                                                 "the rank's share of the batch, in steps of <= 16"})
    train_tokens: int = field(default=0, metadata={"help": "token budget; steps = ceil(this / "
                                                   "global batch) when max_steps is 0"})
    eval_tokens: int = field(default=65536, metadata={"help": "validation tokens per evaluation"})
    # sampling at the end
    sample_tokens: int = 300
    prompt: str = "The "
    temperature: float = 0.8
    top_k: int = 40
    # the CPU run's schedule (overrides TrainConfig's defaults; the presets set their own)
    lr: float = 2e-3
    warmup_steps: int = 50
    max_steps: int = field(default=450, metadata={"help": "0: derived from --train_tokens"})
    eval_interval: int = 150
    ckpt_interval: int = 150


def _llama(shape, lr):
    # The paper's LLaMA runs: 4M-token batches of 4096-token sequences, 200B tokens, FSDP2.
    return dict(GPT_PRESETS[shape], lr=lr, global_batch_tokens=4 * 1024 * 1024, micro_batch=1,
                train_tokens=200_000_000_000, warmup_steps=2000, fsdp=True,
                activation_checkpointing=True, eval_interval=500, ckpt_interval=1000,
                eval_tokens=4 * 1024 * 1024, log_interval=1, data="data/llama", max_steps=0)


# Recipes on model.GPT_PRESETS' shapes. Without --preset: the CPU run, the nano shape with
# 450 steps of 4,096 tokens, about 3 minutes on 2 cores.
PRESETS = {
    "nano": dict(GPT_PRESETS["nano"]),
    "micro": dict(GPT_PRESETS["micro"], micro_batch=8, global_batch_tokens=32 * 256,
                  max_steps=1000, lr=1e-3),
    "gpt2_small": dict(GPT_PRESETS["gpt2_small"], lr=6e-4, global_batch_tokens=524288,
                       micro_batch=16, train_tokens=10_000_000_000, warmup_steps=700,
                       data="data/fineweb_edu_gpt2", eval_interval=250, ckpt_interval=1000,
                       eval_tokens=10 * 524288, max_steps=0),
    # lr 3e-4 (1.5e-4 for 34B/70B); the paper's alpha0 and gamma 1 come with the shapes
    "llama7b": _llama("llama7b", 3e-4),
    "llama13b": _llama("llama13b", 3e-4),
    "llama34b": _llama("llama34b", 1.5e-4),
    "llama70b": _llama("llama70b", 1.5e-4),
}
RENAMED_PRESETS = {"cpu": "nano"}  # old name -> new: --preset cpu is refused, naming nano


def check_flags(cfg):
    """One-line errors for values that would crash later (--seq_len 0: a zero division)."""
    m = cfg.model
    for flag, value in (("dim", m.dim), ("n_layer", m.n_layer), ("n_head", m.n_head),
                        ("n_kv_head", m.n_kv_head), ("seq_len", m.block_size),
                        ("global_batch_tokens", cfg.global_batch_tokens),
                        ("eval_tokens", cfg.eval_tokens), ("temperature", cfg.temperature)):
        tc.need(value > 0, flag, value, "positive")
    for flag, value in (("micro_batch", cfg.micro_batch), ("vocab_size", m.vocab_size),
                        ("ffn_dim", m.ffn_dim), ("alpha0_attn", m.alpha0_attn),
                        ("alpha0_other", m.alpha0_other), ("alpha0_final", m.alpha0_final),
                        ("dyt_gamma0", m.dyt_gamma0), ("norm_out_rms", m.norm_out_rms)):
        tc.need(value >= 0, flag, value, ">= 0 (0: automatic)")
    for flag, value, zero in (("train_tokens", cfg.train_tokens, "use --max_steps"),
                              ("sample_tokens", cfg.sample_tokens, "no sample"),
                              ("top_k", cfg.top_k, "no top-k cut")):
        tc.need(value >= 0, flag, value, f">= 0 (0: {zero})")


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
    seq_len = cfg.model.block_size
    if cfg.global_batch_tokens % seq_len:
        raise UserError(f"--global_batch_tokens {cfg.global_batch_tokens} is not a multiple of "
                        f"--seq_len {seq_len}")
    seqs = cfg.global_batch_tokens // seq_len
    micro = cfg.micro_batch or tc.auto_micro_batch(
        seqs, world_size, flag="--global_batch_tokens / --seq_len")
    return seqs, tc.accumulation_steps(seqs, micro, world_size)


def model_config(cfg, data_vocab):
    """cfg.model with the vocabulary the data needs (rounded up to 64: faster matmuls)."""
    vocab = cfg.model.vocab_size or 64 * math.ceil(data_vocab / 64)
    if vocab < data_vocab:
        raise UserError(f"the data's encoding has {data_vocab} tokens but --vocab_size is "
                        f"{vocab}; pass --vocab_size 0 to size the model from the data")
    return GPTConfig(**{**asdict(cfg.model), "vocab_size": vocab})


def load_data(name, dist):
    """(data dir, train, val); rank 0 builds the default corpus's cache, the others wait."""
    if dist.is_main:
        data_lib.resolve_data_dir(name)
    tc.barrier()
    data_dir = data_lib.resolve_data_dir(name)
    return data_dir, data_lib.TokenDataset(data_dir, "train"), data_lib.TokenDataset(data_dir, "val")


def build_model(mcfg, cfg, dist):
    """The GPT, the same init on every rank and world size: plain, or FSDP2 with the
    mixed-precision policy of the autocast dtype (bf16 on a GPU by default, and with --dtype
    bf16 on a CPU; fp32 master weights and gradient reduction). A shape the model refuses is
    one line."""
    torch.manual_seed(cfg.seed)
    try:
        if cfg.fsdp:
            param_dtype = tc.autocast_dtype(dist.device, cfg.dtype) or torch.float32
            return tc.build_fsdp_model(lambda: use_kernel(GPT(mcfg), cfg.kernel), dist, param_dtype=param_dtype,
                                       reduce_dtype=torch.float32, seed=cfg.seed,
                                       activation_checkpointing=cfg.activation_checkpointing)
        model = use_kernel(GPT(mcfg), cfg.kernel).to(dist.device)
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.activation_checkpointing:
        tc.apply_activation_checkpointing(model)
    return model


def fsdp_even_eval(val, cfg, dist):
    # FSDP2 forwards are collectives: every rank must run as many. Clip eval_tokens so the
    # windows split evenly into equal batches.
    seq_len = cfg.model.block_size
    n = min(sum(val.chunks(seq_len)), max(1, cfg.eval_tokens // seq_len))
    per_rank = n // dist.world_size
    per_rank -= per_rank % cfg.micro_batch if per_rank >= cfg.micro_batch else 0
    if per_rank == 0:
        raise UserError("too few validation windows for this world size; raise --eval_tokens")
    cfg.eval_tokens = per_rank * dist.world_size * seq_len


@torch.no_grad()
def evaluate(model, val, cfg, dist, autocast):
    """(val loss in nats/token, bits per byte) over the first eval_tokens of the val split."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=dist.device)
    for x, y in data_lib.val_windows(val, cfg.model.block_size, cfg.eval_tokens, dist.rank,
                                     dist.world_size, batch=cfg.micro_batch):
        with autocast:
            _, loss = model(x.to(dist.device), y.to(dist.device), reduction="sum")
        total[0] += loss.double()
        total[1] += y.numel()
    tc.all_reduce_sum(total)
    model.train()
    loss = (total[0] / total[1]).item()
    return loss, loss / math.log(2) / val.bytes_per_token


@torch.no_grad()
def probe_loss(model, x, y, autocast):
    """The loss of the weights about to be saved, on the step's last batch: a checkpoint is
    written only from a state that is finite and not exploding (checkpoint.checkpoint_problem)."""
    model.eval()
    with autocast:
        _, loss = model(x, y)
    model.train()
    return loss.item()


def generate_text(model, enc, prompt, n_tokens, temperature, top_k, device, seed=0, cache=True):
    """Sample from the model; every rank gets the same text (needed under FSDP)."""
    ids = enc.encode_ordinary(prompt) if prompt else [data_lib.eot_of(enc) or 10]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    g_state = torch.get_rng_state()
    torch.manual_seed(seed)  # same draws on every rank
    out = model.generate(idx, n_tokens, temperature=temperature, top_k=top_k or None, cache=cache)
    torch.set_rng_state(g_state)
    return enc.decode(out[0].tolist())


def sample_text(model, encoding, cfg, run):
    """Print a sample at the end of training (every rank samples: FSDP forwards are collectives)."""
    try:
        enc = data_lib.get_encoding(encoding)
    except UserError as e:  # a tiktoken file out of reach: the run is done all the same
        run.print(f"note: no sample ({e})")
        return
    text = generate_text(model, enc, cfg.prompt, cfg.sample_tokens, cfg.temperature, cfg.top_k,
                         run.dist.device, cfg.seed)
    run.print("-" * 60 + "\n" + text + "\n" + "-" * 60)


def describe(mcfg, cfg, params, data_dir, train_set, steps, seqs, accum, dist):
    """The run in two lines: the model, then the data, batch and devices."""
    init = (f", norm weight init {mcfg.norm_out_rms or 1:g}" if not is_dynamic(mcfg.norm) else
            f", alpha0 {tuple(round(a, 3) for a in mcfg.alpha0s())} (attn, other, final)"
            f", gamma0 ({', '.join(f'{g:.3g}' for g in mcfg.gamma0s())})")
    fsdp = ""
    if cfg.fsdp:
        compute = str(tc.autocast_dtype(dist.device, cfg.dtype) or torch.float32).removeprefix("torch.")
        fsdp = f", FSDP2 ({compute} compute, float32 weights and gradient reduction)"
    return (f"{mcfg.norm}: {params:,} parameters, {mcfg.n_layer} layers x {mcfg.dim}, vocab "
            f"{mcfg.vocab_size}{init}\n"
            f"data {data_dir} ({train_set.encoding}, {train_set.n_tokens:,} train tokens); {steps} "
            f"steps of {seqs * mcfg.block_size:,} tokens = {seqs} seqs x {mcfg.block_size} "
            f"({dist.world_size} rank(s) x {accum} micro-steps x {cfg.micro_batch}); device "
            f"{dist.device}{fsdp}")


# ---------------------------------------------------------------------------------------------

def train(argv=None):
    cfg, preset, _ = tc.parse_config(GPTTrainConfig, PRESETS, argv, renamed=RENAMED_PRESETS,
                                     description=__doc__.split("\n\n")[0])
    check_flags(cfg)
    cfg.out_dir = cfg.out_dir or os.path.join("out", f"gpt_{cfg.model.norm}")
    with Run(cfg, sharded=cfg.fsdp, process_group=cfg.fsdp,
             oom_fix="lower --micro_batch, add --activation_checkpointing, or use a shorter --seq_len") as run:
        dist, device = run.dist, run.dist.device
        autocast = tc.autocast_context(device, cfg.dtype)
        data_dir, train_set, val_set = load_data(cfg.data, dist)
        mcfg = model_config(cfg, train_set.vocab_size)
        steps = cfg.max_steps = derive_steps(cfg)
        seqs, accum = batch_plan(cfg, dist.world_size)
        cfg.micro_batch = seqs // (dist.world_size * accum)
        tokens = seqs * mcfg.block_size
        if cfg.fsdp:
            fsdp_even_eval(val_set, cfg, dist)
        model = build_model(mcfg, cfg, dist)
        optimizer = tc.build_optimizer(model, cfg, device)
        loader = data_lib.TokenLoader(train_set, mcfg.block_size, cfg.micro_batch, accum, dist.rank,
                                      dist.world_size, seed=cfg.seed)
        ckpt = run.checkpointer(model, optimizer, asdict(mcfg))
        tc.seed_everything(cfg.seed, dist.rank)
        start = 0
        if cfg.resume or cfg.branch_from:
            state = tc.resume_state(ckpt, cfg)
            start = state["step"]
            loader.load_state_dict(state["data"])
        if run.finished(start, steps):
            return None
        stepped = model if cfg.fsdp else tc.wrap_ddp(model, dist)  # what the steps run
        if cfg.compile:
            stepped = torch.compile(stepped)
        if dist.is_main:
            print(describe(mcfg, cfg, num_params(model), data_dir, train_set, steps, seqs, accum,
                           dist), flush=True)
        flops_per_token = model.flops_per_token(mcfg.block_size)
        val_loss = bpb = None
        run.begin(start, steps)
        for step in run.steps():
            lr = tc.set_lr(optimizer, tc.lr_at(step, cfg))
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for j, (x, y) in enumerate(loader.next_step()):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with tc.grad_sync(stepped, last=j == accum - 1):
                    with autocast:
                        _, loss = stepped(x, y, reduction="sum")
                    # DDP/FSDP average gradients over ranks; times world / global tokens gives
                    # d(sum of all ranks' losses / global tokens).
                    (loss * (dist.world_size / tokens)).backward()
                loss_sum += loss.detach().double()
            grad_norm = tc.optimizer_step(stepped, optimizer, cfg.grad_clip)
            train_loss = tc.all_reduce_sum(loss_sum).item() / tokens
            tokens_per_s = tokens / run.step_seconds()
            done = step + 1
            run.check(train_loss, tok_s=f"{tokens_per_s:,.0f}")
            row = {}
            if run.due(done, cfg.log_interval) or done == 1:
                mfu = tc.mfu(flops_per_token, tokens_per_s / dist.world_size, device)
                row = {"grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "tokens": done * tokens,
                       **({"mfu": mfu} if mfu is not None else {}), **tc.dyt_alphas(model)}
            if run.due(done, cfg.eval_interval):
                val_loss, bpb = evaluate(stepped, val_set, cfg, dist, autocast)
                row.update(val_loss=val_loss, val_bpb=bpb)
                run.print(f"step {done}: train loss {train_loss:.4f}, val loss {val_loss:.4f} "
                          f"({bpb:.3f} bits/byte)")
            if row:
                run.log({"step": done, "loss": train_loss, "lr": lr, **row})
            if run.save_due(done):
                ckpt.save(done, probe_loss(model, x, y, autocast), data=loader.state_dict(),
                          train_config=asdict(cfg), encoding=train_set.encoding, preset=preset or "")
        if cfg.sample_tokens and steps > start and not run.stopping:
            sample_text(model, train_set.encoding, cfg, run)
        if val_loss is not None:
            run.print(f"final val loss {val_loss:.4f} ({bpb:.4f} bits/byte); checkpoint {ckpt.last}")
        return val_loss


def load_gpt(path, device="cpu"):
    """(model in eval mode, the checkpoint's extra state) from a train_gpt.py checkpoint: a
    ckpt.pt, an FSDP2-sharded directory (read into one process: DCP reshards), or the out_dir
    holding either."""
    from checkpoint import find_sharded, load_checkpoint, load_into
    if os.path.isdir(path) and not find_sharded(path):
        path = next((p for p in (os.path.join(path, "ckpt.pt"), os.path.join(path, "ckpt_dcp"))
                     if os.path.isfile(p) or find_sharded(p)), os.path.join(path, "ckpt.pt"))
    sharded = find_sharded(path) if os.path.isdir(path) else None
    state = load_checkpoint(os.path.join(sharded, "extra.pt") if sharded else path,
                            missing_hint="check --ckpt (training writes out/gpt_<norm>/ckpt.pt)")
    try:
        model = GPT(GPTConfig(**state["model_config"]))
    except (KeyError, TypeError):
        raise UserError(f"{path} has no GPT model config; is it a train_gpt.py checkpoint?") from None
    if sharded:
        import torch.distributed.checkpoint as dcp
        weights = {"model": model.state_dict()}
        dcp.load(weights, checkpoint_id=sharded)
        load_into(model, weights["model"], path)
    else:
        load_into(model, state["model"], path)
    return model.to(device).eval(), state


def inference_parser(prog, description):
    p = tc._Parser(prog=prog, description=description)
    p.add_argument("--ckpt", required=True, help="a ckpt.pt, an FSDP-sharded checkpoint dir, or the out_dir")
    p.add_argument("--fold", action="store_true", help="fold each norm's affine into the next linears "
                   "first (dyt.fold_norms: exact to rounding, one multiply-add less per layer)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    return p


def sample(argv=None):
    p = inference_parser("train_gpt.py sample", "sample from a checkpoint")
    p.add_argument("--prompt", default="The ")
    p.add_argument("--max_new_tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=40)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=tc._parse_bool, default=True, help="a KV cache (false: every step "
                   "runs the whole prefix, as before; the same tokens)")
    a = p.parse_args(argv)
    device = tc.setup_distributed(a.device).device
    model, state = load_gpt(a.ckpt, device)
    if a.fold:
        fold_norms(model)
    enc = data_lib.get_encoding(state.get("encoding", "byte"))
    for i in range(a.num_samples):
        print(generate_text(model, enc, a.prompt, a.max_new_tokens, a.temperature, a.top_k,
                            device, a.seed + i, cache=a.cache))
        print("-" * 60)


def evaluate_checkpoint(argv=None):
    """`train_gpt.py eval`: the val loss and bits per byte of any checkpoint on any prepared
    corpus of the same encoding, the first --tokens of its validation split, exactly as the
    trainer evaluates (under torchrun each rank takes its share)."""
    p = inference_parser("train_gpt.py eval", "a checkpoint's val loss and bits per byte on a corpus")
    p.add_argument("--data", default="", help="a prepared directory or 'default' (default: the run's own)")
    p.add_argument("--tokens", type=int, default=0, help="validation tokens (default: the run's --eval_tokens)")
    p.add_argument("--batch", type=int, default=0, help="sequences per forward (default: the run's "
                   "micro batch, so that the sums are the trainer's, bit for bit)")
    a = p.parse_args(argv)
    for flag in ("tokens", "batch"):
        tc.need(getattr(a, flag) >= 0, flag, getattr(a, flag), ">= 0 (0: the run's own)")
    dist = tc.setup_distributed(a.device)
    try:
        model, state = load_gpt(a.ckpt, dist.device)
        run_cfg = state.get("train_config", {})
        data = a.data or run_cfg.get("data", "default")
        _, _, val = load_data(data, dist)
        trained_on = state.get("encoding", "byte")
        if val.encoding != trained_on or val.vocab_size > model.cfg.vocab_size:
            raise UserError(f"{data} is encoded with {val.encoding} (vocab {val.vocab_size}) but the checkpoint "
                            f"was trained with {trained_on} (vocab {model.cfg.vocab_size}); prepare the corpus "
                            f"with --encoding {trained_on}")
        if a.fold:
            fold_norms(model)
        cfg = SimpleNamespace(model=model.cfg, eval_tokens=a.tokens or run_cfg.get("eval_tokens", 10 ** 9),
                              micro_batch=a.batch or run_cfg.get("micro_batch") or 16)
        autocast = tc.autocast_context(dist.device, run_cfg.get("dtype", "auto"))
        loss, bpb = evaluate(model, val, cfg, dist, autocast)
        if dist.is_main:
            print(f"{a.ckpt}: val loss {loss:.4f} nats ({bpb:.4f} bits/byte) on {data}, "
                  f"{min(cfg.eval_tokens, val.n_tokens):,} tokens at most{' (folded)' if a.fold else ''}")
        return loss, bpb
    finally:
        if dist.initialized_here:
            tc.teardown_distributed()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "prepare":
        raise UserError("data preparation is one command now: python prepare_data.py " + " ".join(argv))
    if argv and argv[0] == "sample":
        return sample(argv[1:])
    if argv and argv[0] == "eval":
        return evaluate_checkpoint(argv[1:])
    return train(argv)


if __name__ == "__main__":
    tc.main_guard(main)
