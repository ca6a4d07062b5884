"""
How fast is a training step of train_gpt.py against karpathy/nanoGPT's? A one-off study (its
results: results/bench_nanogpt_cpu.md, results/bench_nanogpt_compile_cpu.md; the README's
"Speed against nanoGPT" links them), kept apart from bench.py, which measures the layers.

    python studies/nanogpt_speed.py /path/to/nanoGPT --threads 2 --passes 40 --out results
    python studies/nanogpt_speed.py /path/to/nanoGPT --threads 2 --passes 30 --compile --out results

One training step (forward, backward, AdamW) of nanoGPT's model and of train_gpt.py's at
nanoGPT's shape (6 layers x 384, context 256, batch 8, byte vocabulary, fp32; --ffn_dim 1024
gives SwiGLU the parameter count of its 4x384 GELU MLP), in one process, the models taking
turns step by step in an order that rotates each pass: on a shared CPU two runs minutes apart
differ by more than the models do. Each side uses its own trainer's optimizer (nanoGPT's
configure_optimizers; ours, train_common.build_optimizer at train_gpt.py's defaults).
nanoGPT's code is imported from the checkout given; none of it is in this repository.

The attribution rows are train_gpt.py's LayerNorm model with parts of its LLaMA block swapped
for GPT-2's (GELU MLP, no RoPE, one qkv matrix), to see where the time between the two models
goes. None of them is a model the trainer builds (no RoPE means no position information at
all); they are for timing only.
"""

import importlib.util
import os
import sys
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import device_tag, environment, quantile  # noqa: E402
from studies.kernel_lab import separator, synchronize, write_results  # noqa: E402
from model import GPT, GPTConfig, apply_rope  # noqa: E402
from train_common import _Parser, build_optimizer, setup_float_math  # noqa: E402
from train_gpt import GPTTrainConfig  # noqa: E402

NANOGPT_HEADER = ("| model | median s/step | min s/step | median / nanoGPT's | min / nanoGPT's | "
                  "paired: median of per-step ratios (quartiles) |")


# Attribution rows: train_gpt.py's LayerNorm model with parts of its LLaMA block swapped for
# GPT-2's, to see where the time between the two models goes. None of these is a model the
# trainer builds (no RoPE means no position information at all); they are for timing only.

class GELUMLP(nn.Module):
    """GPT-2's MLP, as nanoGPT's: dim -> 4 dim, exact GELU, -> dim; no bias."""

    def __init__(self, dim):
        super().__init__()
        self.up = nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class AblatedAttention(nn.Module):
    """model.GPTAttention (full heads) with RoPE optional and q, k, v from one matrix or three."""

    def __init__(self, dim, n_head, rope, one_matrix):
        super().__init__()
        self.n_head, self.head_dim, self.rope = n_head, dim // n_head, rope
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False) if one_matrix else None
        if not one_matrix:
            self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x, rotation, cache=None):  # cache: GPTAttention's signature; timing only, unused
        B, T, C = x.shape
        heads = (B, T, self.n_head, self.head_dim)
        if self.wqkv is not None:
            q, k, v = self.wqkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        else:
            q, k, v = (w(x).view(heads) for w in (self.wq, self.wk, self.wv))
        if self.rope:
            q, k = apply_rope(q, rotation), apply_rope(k, rotation)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


def gpt2_parts(model, gelu_mlp=False, rope=True, one_qkv=False):
    """Swap the blocks' SwiGLU for GPT-2's GELU MLP and/or their attention for AblatedAttention."""
    dim, n_head = model.cfg.dim, model.cfg.n_head
    for block in model.blocks:
        if gelu_mlp:
            block.mlp = GELUMLP(dim)
        if not rope or one_qkv:
            block.attn = AblatedAttention(dim, n_head, rope, one_qkv)
    return model


def bench_nanogpt(args, device):
    setup_float_math(device)  # as both trainers do: subnormals flushed on a CPU
    path = Path(args.nanogpt_dir) / "model.py"
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    nanogpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nanogpt)
    shape = dict(n_layer=6, n_head=6, block_size=256, vocab_size=256)
    torch.manual_seed(0)
    nano = nanogpt.GPT(nanogpt.GPTConfig(n_embd=384, dropout=0.0, bias=False, **shape)).to(device)
    steps = {"nanoGPT (LayerNorm, GELU MLP)": (nano, nano.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type))}
    recipe = GPTTrainConfig()  # train_gpt.py's default lr, betas and weight decay
    ours = lambda norm: GPT(GPTConfig(dim=384, n_kv_head=6, ffn_dim=1024, norm=norm, **shape))
    for norm in ("ln", "rms", "dyt"):
        model = ours(norm).to(device)
        steps[f"train_gpt.py's, --norm {norm}"] = (model, build_optimizer(model, recipe, device))
    for label, parts in [("GELU MLP in place of SwiGLU", dict(gelu_mlp=True)),
                         ("no RoPE", dict(rope=False)),
                         ("GELU MLP, no RoPE, one qkv matrix (GPT-2's block)",
                          dict(gelu_mlp=True, rope=False, one_qkv=True))]:
        model = gpt2_parts(ours("ln"), **parts).to(device)
        steps[f"attribution: --norm ln, {label}"] = (model, build_optimizer(model, recipe, device))
    if args.compile:  # the module is compiled, the optimizer step stays eager as in the trainers
        steps = {name: (torch.compile(model), opt) for name, (model, opt) in steps.items()}
    x = torch.randint(0, 256, (8, 256), device=device)
    y = torch.randint(0, 256, (8, 256), device=device)
    times = {name: [] for name in steps}
    order = list(steps.items())
    for i in range(args.warmup + args.passes):
        # the order rotates each pass, so that no model always runs first (or last): the
        # position in a pass costs a few percent on a drifting machine
        for name, (model, opt) in order[i % len(order):] + order[:i % len(order)]:
            synchronize(device)
            t0 = time.perf_counter()
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            synchronize(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    base = times["nanoGPT (LayerNorm, GELU MLP)"]
    rows = []
    for name, t in times.items():
        # Each pass times every model once, back to back: the ratio within a pass cancels
        # most of the machine's drift (a shared VM's steal), which the medians keep.
        paired = [a / b for a, b in zip(t, base)]
        rows.append(dict(model=name, median_s=quantile(t, 0.5), min_s=min(t),
                         median_ratio=quantile(t, 0.5) / quantile(base, 0.5),
                         min_ratio=min(t) / min(base), paired_ratio=quantile(paired, 0.5),
                         paired_ratio_p25=quantile(paired, 0.25),
                         paired_ratio_p75=quantile(paired, 0.75)))
    note = (f"{args.passes} timed steps of each model after {args.warmup} untimed, taking turns "
            "in an order that rotates each pass")
    note += "; one fixed random batch; float math as in the trainers (train_common.setup_float_math)"
    if device.type == "cpu":
        note += f"; {torch.get_num_threads()} CPU threads"
    if args.compile:
        note += "; every model under torch.compile (inductor), the optimizers eager"
    return dict(rows=rows, notes=[note], nanogpt=str(path), compile=args.compile)


def format_nanogpt_row(r):
    return (f"| {r['model']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['median_ratio']:.3f} | "
            f"{r['min_ratio']:.3f} | {r['paired_ratio']:.3f} ({r['paired_ratio_p25']:.3f}-"
            f"{r['paired_ratio_p75']:.3f}) |")


def main(argv=None):
    p = _Parser(description="A training step of nanoGPT's model against train_gpt.py's.")
    p.add_argument("nanogpt_dir", help="a checkout of github.com/karpathy/nanoGPT")
    p.add_argument("--passes", type=int, default=12, help="timed steps of each model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--compile", action="store_true", help="torch.compile every model (inductor; "
                   "on a CPU it needs a C++ compiler; the untimed steps absorb compilation)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=os.path.join("out", "bench"), help="folder for the JSON and "
                   "Markdown (the committed ones are in results/: --out results replaces them)")
    args = p.parse_args(argv)
    if not (Path(args.nanogpt_dir) / "model.py").is_file():
        p.error(f"{args.nanogpt_dir}: no model.py there; give a checkout of github.com/karpathy/nanoGPT")
    if args.passes < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--passes and --threads must be at least 1, --warmup at least 0")
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    env = environment(device)
    result = bench_nanogpt(args, device)
    lines = [format_nanogpt_row(r) for r in result["rows"]]
    tag = device_tag(env)
    title = (f"A training step at nanoGPT's shape, nanoGPT's model against ours, "
             f"{'compiled, ' if args.compile else ''}on {'CPU' if tag == 'cpu' else env['device']}")
    paths = write_results(Path(args.out), f"bench_nanogpt_{'compile_' if args.compile else ''}{tag}",
                          env, result, NANOGPT_HEADER, lines, title)
    print("\n".join([NANOGPT_HEADER, separator(NANOGPT_HEADER)] + lines))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
