"""
The DyT papers' analyses of what normalisation and DyT do, as commands that write a table and
a picture each (PNG; matplotlib is optional: without it the tables are still written).

    python analyze.py s_curves        --ckpt out/vit_ln            # Figures 2 and 4
    python analyze.py alpha_std       --run out/vit_dyt            # Figure 8
    python analyze.py ablations       --epochs 1                   # Tables 8-9, ViT study Table 5
    python analyze.py alpha0          --model vit --alpha0 0.1,0.5,1,2,4
    python analyze.py alpha0          --model gpt --alpha0_attn 0.5,1,2 --alpha0_other 0.5,1,2
    python analyze.py robustness      --ckpt out/vit_ln --ckpt out/vit_dyt   # ViT study sec. 6
    python analyze.py representations --ckpt out/vit_ln --ckpt out/vit_dyt   # secs. 7-8
    python analyze.py curves --run out/gpt_dyt --run out/gpt_rms --x tokens  # any runs, as curves

This project's own studies (each norm at its best lr across widths and budgets, the gamma-1
stall) are in studies/gpt_norms.py.

--ckpt takes a ckpt.pt written by train_vit.py or train_gpt.py, or the directory holding it.
Everything lands in --results (default out/analysis; the committed ones are in
results/analysis, replaced only with --results results/analysis) as NAME.png, NAME.md and
NAME.csv, and the table is printed. Bad input gives a one-line `error:` and exit code 2.

The functions work on any nn.Module too (e.g. a Hugging Face model): norm layers are found
the way dyt.convert_to_dyt finds them (torch's LayerNorm/RMSNorm and, by class name, other
libraries' LayerNorm/RMSNorm/LayerNorm2d), DyT layers with dyt.is_dynamic, and the blocks are
the model's longest nn.ModuleList. Every hook is removed when an analysis ends, even on error.
"""

import argparse
import contextlib
import csv
import json
import math
import os
import shlex
import sys
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint as ck
import train_common as tc
from dyt import ABLATIONS, Derf, DyT, _norm_kind, is_dynamic
from model import GPT, GPTConfig, ViT, ViTConfig

# out/analysis by default: results/analysis holds the committed tables the README cites,
# replaced only when asked for (--results results/analysis)
RESULTS_DIR = os.path.join("out", "analysis")


class AnalysisError(tc.UserError):
    """Bad input to an analysis: printed as one `error:` line by tc.main_guard."""


# ---------------------------------------------------------------------------------------------
# 1. Checkpoints and the batches to analyse them on


def load_model(path, device="cpu"):
    """(model in eval mode, "vit" or "gpt", the checkpoint dict) from a train_vit.py or
    train_gpt.py checkpoint file, or the out_dir holding ckpt.pt."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, ".metadata")) or os.path.isdir(os.path.join(path, "ckpt_dcp")):
            raise AnalysisError(f"{path} is a sharded (FSDP) checkpoint; convert it to one file "
                                "with torch.distributed.checkpoint.format_utils.dcp_to_torch_save")
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise AnalysisError(f"no checkpoint at {path}; give a ckpt.pt from train_vit.py or "
                            "train_gpt.py, or the out_dir holding it")
    state = ck.load_checkpoint(path)
    config = state.get("model_config") or {}
    try:
        if "patch_size" in config:
            model, kind = ViT(ViTConfig(**config)), "vit"
        elif "vocab_size" in config:
            model, kind = GPT(GPTConfig(**config)), "gpt"
        else:
            raise AnalysisError(f"{path} has no ViT or GPT model_config; is it a checkpoint "
                                "from train_vit.py or train_gpt.py?")
        model.load_state_dict(state["model"])
    except (TypeError, KeyError, RuntimeError) as e:
        raise AnalysisError(f"{path}: cannot build its model ({str(e).splitlines()[0][:160]})")
    return model.to(device).eval(), kind, state


def run_name(path):
    """A short tag for file names and legends: the checkpoint's directory name."""
    path = os.path.abspath(path)
    return os.path.basename(os.path.dirname(path) if os.path.isfile(path) else path)


def vit_test_set(state, data_dir="", device="cpu"):
    """The test split the ViT was evaluated on (data_vision.InMemoryImages)."""
    import data_vision
    import train_vit
    saved = state.get("train_config") or state.get("config") or {}  # "config": older ViT checkpoints
    known = {f.name for f in fields(train_vit.ViTTrainConfig)} - {"model"}
    cfg = train_vit.ViTTrainConfig(**{k: v for k, v in saved.items() if k in known},
                                   model=ViTConfig(**state["model_config"]))
    if data_dir:
        cfg.data_dir = data_dir
    cfg.download = False  # analyses never download
    _, test, _, _ = train_vit.load_data(cfg, torch.device(device))
    if not isinstance(test, data_vision.InMemoryImages):
        raise AnalysisError(f"{cfg.dataset}: the analyses read the small in-memory datasets "
                            "(Fashion-MNIST, CIFAR) only")
    return test


def gpt_val_tokens(state, n_seqs, data=""):
    """(x, y): the first n_seqs validation windows of the GPT's data, as in its evaluation."""
    import data as data_lib
    saved = state.get("train_config") or {}
    data_dir = data_lib.resolve_data_dir(data or saved.get("data", "default"))
    val = data_lib.TokenDataset(data_dir, "val")
    seq_len = state["model_config"]["block_size"]
    xs, ys = zip(*data_lib.val_windows(val, seq_len, n_seqs * seq_len, batch=n_seqs))
    return torch.cat(xs), torch.cat(ys)


def analysis_batch(kind, state, n, data_dir="", offset=0):
    """n inputs and their targets: test images for a ViT, validation windows for a GPT."""
    if kind == "vit":
        test = vit_test_set(state, data_dir)
        if offset + n > len(test):
            raise AnalysisError(f"asked for {n} images from {offset}, the test set has {len(test)}")
        return test.batch(np.arange(offset, offset + n))
    return gpt_val_tokens(state, n, data_dir)


def loss_and_accuracy(model, kind, x, y, batch=500):
    """Mean cross-entropy and top-1 accuracy (next-token accuracy for a GPT) on (x, y)."""
    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb, yb = x[i:i + batch], y[i:i + batch]
            logits = model(xb) if kind == "vit" else model(xb)[0]
            logits, yb = logits.float().reshape(-1, logits.shape[-1]), yb.reshape(-1)
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += (logits.argmax(-1) == yb).sum().item()
            count += yb.numel()
    return loss_sum / count, correct / count


# ---------------------------------------------------------------------------------------------
# 2. Finding the layers, and hooks that always come off


@dataclass
class NormLayer:
    name: str
    module: nn.Module
    kind: str            # "ln", "rms" or "dyt" (DyT and its variants)
    channels_last: bool


def norm_layers(model):
    """Every LayerNorm/RMSNorm (as convert_to_dyt sees them) and every DyT-like layer."""
    out = []
    for name, module in model.named_modules():
        if is_dynamic(module):
            out.append(NormLayer(name, module, "dyt", module.channels_last))
        elif module is not model and _norm_kind(module) is not None:
            kind, channels_last = _norm_kind(module)
            out.append(NormLayer(name, module, kind, channels_last))
    return out


def select_layers(layers, wanted):
    """The layers named in `wanted` (names or indices, comma-separated; "all"), else all."""
    if not wanted or wanted == "all":
        return layers
    chosen = []
    for item in wanted.split(","):
        item = item.strip()
        if item.lstrip("-").isdigit() and not any(l.name == item for l in layers):
            index = int(item)
            if not -len(layers) <= index < len(layers):
                raise AnalysisError(f"layer index {index} out of range: the model has "
                                    f"{len(layers)} norm layers (0-{len(layers) - 1})")
            chosen.append(layers[index])
        else:
            match = [l for l in layers if l.name == item]
            if not match:
                raise AnalysisError(f"no norm layer {item!r}; the model has "
                                    f"{', '.join(l.name for l in layers)}")
            chosen.append(match[0])
    return chosen


def spread(items, k):
    """k items evenly spread over the list, first and last included (for plots)."""
    if len(items) <= k:
        return list(items)
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def model_blocks(model):
    """The transformer blocks: model.blocks, else the longest nn.ModuleList in the model."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        return [(f"blocks.{i}", b) for i, b in enumerate(blocks)]
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise AnalysisError(f"{type(model).__name__} has no nn.ModuleList of blocks")
    name, longest = max(lists, key=lambda nm: len(nm[1]))
    return [(f"{name}.{i}", b) for i, b in enumerate(longest)]


@contextlib.contextmanager
def hooks_removed_after():
    """Collects hook handles; removes every one on exit, whatever happened inside."""
    handles = []
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def channels_last_view(x, channels_last):
    """x with channels as the last dim (a channels-first [B, C, H, W] norm input is moved)."""
    return x if channels_last else x.movedim(1, -1)


def before_affine(layer, x):
    """What the layer computes from x before its affine (gamma, beta), channels last:
    (x - mean) / std for LayerNorm, x / rms for RMSNorm, f(alpha x) for DyT and variants."""
    m = layer.module
    x = channels_last_view(x.float(), layer.channels_last)
    eps = getattr(m, "eps", None) or getattr(m, "variance_epsilon", None) or torch.finfo(x.dtype).eps
    if layer.kind == "ln":
        return (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    if layer.kind == "rms":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return squash_of(m)(squash_argument(m, x))


def squash_argument(m, x):
    """What a DyT-like layer feeds its squashing function: alpha x (+ s for Derf)."""
    alpha = getattr(m, "alpha", None)
    scaled = x if alpha is None else alpha.detach().float() * x  # per-channel alpha broadcasts
    return scaled + m.shift.detach().float() if isinstance(m, Derf) else scaled


def squash_of(m):
    return torch.tanh if isinstance(m, DyT) else torch.erf if isinstance(m, Derf) else m.fn


def capture_norm_io(model, layers, x):
    """{name: (input, normalised value before the affine)} of each layer on one forward."""
    captured = {}
    with hooks_removed_after() as handles, torch.no_grad():
        for layer in layers:
            def hook(module, inputs, output, layer=layer):
                captured[layer.name] = (channels_last_view(inputs[0].detach().float(), layer.channels_last),
                                        before_affine(layer, inputs[0].detach()))
            handles.append(layer.module.register_forward_hook(hook))
        model(x)
    return captured


# ---------------------------------------------------------------------------------------------
# 3. Output: tables (always) and plots (when matplotlib is there)


def write_table(rows, results_dir, name, title="", quiet=False):
    """rows (list of dicts) as NAME.md and NAME.csv in results_dir; prints the markdown unless
    quiet. Each file is written whole or not at all (tmp + os.replace): a study killed while
    rewriting its runs table keeps the table as it was."""
    os.makedirs(results_dir, exist_ok=True)
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ([f"## {title}", ""] if title else []) + [
        "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    path = os.path.join(results_dir, name)
    with open(f"{path}.md.tmp", "w") as f:
        f.write(text)
    with open(f"{path}.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    os.replace(f"{path}.csv.tmp", f"{path}.csv")
    os.replace(f"{path}.md.tmp", f"{path}.md")
    if not quiet:
        print(text, flush=True)
    return text


_WARNED = []


def pyplot():
    """matplotlib.pyplot with a file-only backend, or None (with one note) when missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        if not _WARNED:
            print("note: matplotlib is not installed (pip install matplotlib): writing tables "
                  "only, no plots", file=sys.stderr)
            _WARNED.append(True)
        return None


def save_figure(fig, results_dir, name, quiet=False):
    path = os.path.join(results_dir, f"{name}.png")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    if not quiet:
        print(f"wrote {path}")
    return path


def pearson(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


# ---------------------------------------------------------------------------------------------
# 4. S-curves (DyT paper Figures 2 and 4)


def fit_tanh(x, y, free_scale=True):
    """The alpha (and scale s) minimising sum (y - s tanh(alpha x))^2 (s = 1 if not free).

    For a given alpha the best scale is closed-form, so the search is over alpha alone: a
    log-spaced grid, then golden-section refinement around the best grid point. Returns
    (alpha, scale, r2)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def sse_and_scale(alpha):
        t = np.tanh(alpha * x)
        s = (t @ y) / max(t @ t, 1e-300) if free_scale else 1.0
        return float(((y - s * t) ** 2).sum()), s

    grid = np.logspace(-4, 4, 161)
    errors = [sse_and_scale(a)[0] for a in grid]
    i = int(np.argmin(errors))
    lo, hi = math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, len(grid) - 1)])
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(60):  # golden section in log alpha: the bracket shrinks to ~1e-13
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if sse_and_scale(math.exp(a))[0] < sse_and_scale(math.exp(b))[0]:
            hi = b
        else:
            lo = a
    alpha = math.exp((lo + hi) / 2)
    sse, scale = sse_and_scale(alpha)
    total = float(((y - y.mean()) ** 2).sum())
    return alpha, scale, 1 - sse / total if total > 0 else float("nan")


def cmd_s_curves(args):
    model, kind, state = load_model(args.ckpt)
    x, _ = analysis_batch(kind, state, args.n, args.data_dir)
    all_layers = norm_layers(model)
    if not all_layers:
        raise AnalysisError(f"{args.ckpt}: the model has no LayerNorm/RMSNorm/DyT layer")
    layers = select_layers(all_layers, args.layers)
    captured = capture_norm_io(model, layers, x)
    rng = np.random.default_rng(args.seed)
    rows = []
    for layer in layers:
        inp, out = (t.reshape(-1, t.shape[-1]) for t in captured[layer.name])  # [tokens, C]
        flat = rng.permutation(inp.numel())[:args.fit_points]  # a random subset fits as well
        xi, yo = inp.flatten()[flat].numpy(), out.flatten()[flat].numpy()
        alpha, scale, r2 = fit_tanh(xi, yo)
        alpha1, _, r2_1 = fit_tanh(xi, yo, free_scale=False)
        row = {"layer": layer.name, "kind": layer.kind, "alpha_fit": alpha, "scale_fit": scale,
               "r2": r2, "alpha_fit_scale1": alpha1, "r2_scale1": r2_1,
               "inv_std_input": 1.0 / max(inp.std().item(), 1e-12),
               "frac_linear": float((inp.abs() * alpha < 0.5).float().mean())}
        if layer.kind == "dyt" and getattr(layer.module, "alpha", None) is not None:
            row["alpha_learnt"] = float(layer.module.alpha.detach().float().mean())
        rows.append(row)
    name = f"s_curves_{args.tag or run_name(args.ckpt)}"
    write_table(rows, args.results, name,
                f"S-curves of {args.ckpt} ({kind}, {args.n} inputs): least-squares fit of "
                "s*tanh(alpha*x) to the normalised output (before the affine); frac_linear: "
                "share of inputs with |alpha x| < 0.5")
    plt = pyplot()
    if plt is not None:
        plot_s_curves(plt, [l for l in layers if l.name in spread([l.name for l in layers], args.plot_layers)],
                      captured, {r["layer"]: r for r in rows}, rng, args, name)
    return rows


def plot_s_curves(plt, layers, captured, fits, rng, args, name):
    """Three rows per chosen layer: all points with the fitted tanh; coloured by token;
    coloured by channel. Points are subsampled (and rasterised) to keep the PNG small."""
    fig, axes = plt.subplots(3, len(layers), figsize=(3.2 * len(layers), 8.4), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for col, layer in enumerate(layers):
        inp, out = (t.reshape(-1, t.shape[-1]).numpy() for t in captured[layer.name])
        fit = fits[layer.name]
        ax = axes[0, col]
        pick = rng.permutation(inp.size)[:args.plot_points]
        ax.scatter(inp.flat[pick], out.flat[pick], s=1, c="0.5", alpha=0.3, rasterized=True)
        grid = np.linspace(inp.min(), inp.max(), 200)
        ax.plot(grid, fit["scale_fit"] * np.tanh(fit["alpha_fit"] * grid), "r-", lw=1.2,
                label=f"{fit['scale_fit']:.2f} tanh({fit['alpha_fit']:.3g} x)")
        ax.set_title(f"{layer.name} ({layer.kind})", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        # by token: tokens whose input std spans the batch's range (each is a straight line
        # for a norm: one token's mean and std are shared by all its channels)
        ax = axes[1, col]
        token_std = inp.std(1)
        for i, t in enumerate(np.argsort(token_std)[np.linspace(0, len(token_std) - 1, 6).astype(int)]):
            ax.scatter(inp[t], out[t], s=2, color=colors[i], rasterized=True)
        ax.set_title("coloured by token", fontsize=8)
        # by channel: the channels with the largest |input| (they make the tails) and others
        ax = axes[2, col]
        extreme = np.argsort(np.abs(inp).max(0))[::-1][:3]
        others = rng.choice(np.setdiff1d(np.arange(inp.shape[1]), extreme), 3, replace=False)
        tokens = rng.permutation(inp.shape[0])[:2000]
        for i, c in enumerate(np.concatenate([extreme, others])):
            ax.scatter(inp[tokens, c], out[tokens, c], s=2, color=colors[i], rasterized=True)
        ax.set_title("coloured by channel", fontsize=8)
        ax.set_xlabel("input x")
    axes[0, 0].set_ylabel("output before affine")
    fig.suptitle(f"{name}: input vs normalised output", fontsize=10)
    save_figure(fig, args.results, name)


# ---------------------------------------------------------------------------------------------
# 5. alpha vs 1/std of the DyT input (DyT paper Figure 8)


def read_log(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise AnalysisError(f"no metrics.jsonl in {run_dir}; pass a train_vit.py/train_gpt.py out_dir")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def dyt_readout_now(model, x):
    """{layer: (alpha, 1/std of its input)} on x: the readout train_vit.py logs (std over
    all elements of the input, eval mode), for any model with DyT layers."""
    layers = [l for l in norm_layers(model) if l.kind == "dyt" and getattr(l.module, "alpha", None) is not None]
    captured = capture_norm_io(model, layers, x)
    return {l.name: (float(l.module.alpha.detach().float().mean()),
                     1.0 / max(captured[l.name][0].std().item(), 1e-12)) for l in layers}


def cmd_alpha_std(args):
    rows, runs = [], []
    for run_dir in args.run:
        log = read_log(run_dir)
        # the DyT layers in the order the model logs them (model order)
        names = list(dict.fromkeys(k[len("alpha/"):] for r in log for k in r if k.startswith("alpha/")))
        if not names:
            raise AnalysisError(f"{run_dir}: the log has no alpha/ columns; was it a DyT run?")
        readouts = [r for r in log if any(k.startswith("inv_std/") for k in r)]
        final = {}
        ckpt = os.path.join(run_dir, "ckpt.pt")
        if os.path.isfile(ckpt):  # the end of training, measured now on analysis inputs
            model, kind, state = load_model(ckpt)
            # --data_dir is for the ViT runs (image folder); a GPT reads its own token data
            x, _ = analysis_batch(kind, state, args.n, args.data_dir if kind == "vit" else "")
            final = dyt_readout_now(model, x)
        elif readouts:
            final = {n: (readouts[-1][f"alpha/{n}"], readouts[-1][f"inv_std/{n}"]) for n in names
                     if f"inv_std/{n}" in readouts[-1]}
        tag = run_name(run_dir)
        for n in names:
            over = [(r[f"alpha/{n}"], r[f"inv_std/{n}"]) for r in readouts
                    if f"alpha/{n}" in r and f"inv_std/{n}" in r]
            a_end, s_end = final.get(n, (float("nan"), float("nan")))
            rows.append({"run": tag, "layer": n, "alpha_end": a_end, "inv_std_end": s_end,
                         "alpha_x_std": a_end / s_end if s_end == s_end else float("nan"),
                         "readouts": len(over),
                         "corr_over_training": pearson(*zip(*over)) if len(over) > 1 else float("nan")})
        runs.append((tag, log, names, readouts, final))
    summary = []
    for tag, _, names, readouts, final in runs:
        mine = [r for r in rows if r["run"] == tag]
        over = [r["corr_over_training"] for r in mine if r["corr_over_training"] == r["corr_over_training"]]
        summary.append({"run": tag, "layers": len(mine),
                        "corr_across_layers_end": pearson([r["alpha_end"] for r in mine],
                                                          [r["inv_std_end"] for r in mine]),
                        "mean_corr_over_training": float(np.mean(over)) if over else float("nan"),
                        "pooled_corr_all_readouts": pearson(
                            [r[f"alpha/{n}"] for r in readouts for n in names if f"inv_std/{n}" in r],
                            [r[f"inv_std/{n}"] for r in readouts for n in names if f"inv_std/{n}" in r])})
    name = f"alpha_std_{args.tag or '_'.join(t for t, *_ in runs)}"
    write_table(rows, args.results, name, "alpha and 1/std of each DyT layer's input")
    write_table(summary, args.results, f"{name}_summary",
                "Pearson correlation of alpha with 1/std (over training per layer; across layers at the end)")
    plt = pyplot()
    if plt is not None:
        plot_alpha_std(plt, runs, args, name)
    return rows, summary


def plot_alpha_std(plt, runs, args, name):
    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 3.6 * len(runs)), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for i, (tag, log, names, readouts, final) in enumerate(runs):
        ax = axes[i, 0]
        for j, n in enumerate(spread(names, 4)):
            steps = [r["step"] for r in log if f"alpha/{n}" in r]
            ax.plot(steps, [r[f"alpha/{n}"] for r in log if f"alpha/{n}" in r], color=colors[j],
                    label=f"alpha {n}")
            pts = [(r["step"], r[f"inv_std/{n}"]) for r in readouts if f"inv_std/{n}" in r]
            if pts:
                ax.plot(*zip(*pts), "--o", ms=2, color=colors[j], label=f"1/std {n}")
        ax.set_xlabel("step")
        ax.set_title(f"{tag}: alpha (solid) and 1/std of input (dashed) over training", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        ax = axes[i, 1]
        pts = [(final[n][1], final[n][0], k) for k, n in enumerate(names) if n in final]
        if pts:
            s, a, depth = zip(*pts)
            sc = ax.scatter(s, a, c=depth, cmap="viridis")
            fig.colorbar(sc, ax=ax, label="layer index")
            ax.set_title(f"end of training, across layers: r = {pearson(s, a):.2f}", fontsize=9)
        ax.set_xlabel("1/std of input")
        ax.set_ylabel("alpha")
    save_figure(fig, args.results, name)


# ---------------------------------------------------------------------------------------------
# 6. Training sweeps: ablations (DyT paper Tables 8-9, ViT study Table 5) and alpha0


# ablation row -> train_vit.py --norm (dyt.NORMS)
# The ablation study's layers: the two norms' baselines, DyT, Derf and every ablation of dyt.py
# (the DyT paper's Tables 8-9, the ViT study's Table 5), by their --norm names.
ABLATION_NORMS = ["ln", "dyt", "derf", *ABLATIONS]
# The names this command once used, refused with the new one: 'identity' was alpha x without
# squashing, which is --norm dyt_identity; --norm identity is no normalisation at all.
OLD_ABLATION_NAMES = {"tanh": "dyt", "identity": "dyt_identity"}


def train_one(trainer, argv, out_dir, reuse=False):
    """Train in this process with trainer.main(argv + --out_dir); return what happened:
    status ok / diverged (NaN or exploded loss: the trainer's LossGuard stops the run),
    and the last logged metrics. With reuse, a finished run in out_dir is read back."""
    done_marker = os.path.join(out_dir, "analyze_result.json")
    if reuse and os.path.isfile(done_marker):
        with open(done_marker) as f:
            return json.load(f)
    # A sweep run without --reuse starts over in its own directory: a fresh log (not appended
    # to the old one) and no old checkpoint (which the trainer would refuse to overwrite).
    for stale in ("metrics.jsonl", "ckpt.pt"):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    status = "ok"
    try:
        trainer.main(argv + ["--out_dir", out_dir])
    except tc.TrainingDiverged as e:
        status = "diverged: " + str(e).split(":")[0]
    except SystemExit as e:  # argparse in the trainer: a bad pass-through flag
        raise AnalysisError(f"the trainer rejected {' '.join(argv)} (exit {e.code})")
    log = read_log(out_dir) if os.path.exists(os.path.join(out_dir, "metrics.jsonl")) else []
    result = {"status": status}
    train_rows = [r for r in log if "loss" in r]
    if train_rows:
        result.update(steps=train_rows[-1]["step"], train_loss=train_rows[-1]["loss"])
    for key in ("test_top1", "test_top5", "test_loss", "val_loss", "val_bpb"):
        evals = [r for r in log if key in r]
        if evals and status == "ok":
            result[key] = evals[-1][key]
    if status != "ok" or any(not math.isfinite(r.get("loss", 0.0)) for r in log):
        result["status"] = status if status != "ok" else "diverged: non-finite loss"
    with open(done_marker, "w") as f:
        json.dump(result, f)
    return result


def budget_flags(args):
    flags = []
    if args.epochs is not None:
        flags += ["--epochs", str(args.epochs)]
    if args.steps:
        flags += ["--max_steps", str(args.steps)]
    if getattr(args, "data_dir", ""):
        flags += ["--data_dir", args.data_dir]
    return flags + shlex.split(args.train_args) + ["--seed", str(args.seed)]


def cmd_ablations(args):
    import train_vit
    names = [n.strip() for n in args.norms.split(",") if n.strip()]
    for n in names:
        if n in OLD_ABLATION_NAMES:
            raise AnalysisError(f"ablation {n!r} is called {OLD_ABLATION_NAMES[n]!r} now, its --norm name")
        if n not in ABLATION_NORMS:
            raise AnalysisError(f"unknown ablation {n!r}; choose from {', '.join(ABLATION_NORMS)}")
    rows = []
    for n in names:
        print(f"--- ablation --norm {n}", flush=True)
        result = train_one(train_vit, ["--norm", n] + budget_flags(args), os.path.join(args.out_dir, n), args.reuse)
        rows.append({"norm": n, **result})
    write_table(rows, args.results, f"ablations{args.tag}",
                f"ViT ablations, train_vit.py {' '.join(budget_flags(args))}: test accuracy "
                "(diverged runs marked)")
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 0.35 * len(rows) + 1))
        top1 = [r.get("test_top1", 0.0) if r["status"] == "ok" else 0.0 for r in rows]
        bars = ax.barh([r["norm"] for r in rows], top1,
                       color=["C3" if r["status"] != "ok" else "C0" for r in rows])
        for bar, r in zip(bars, rows):
            ax.text(bar.get_width() + 0.005, bar.get_y() + bar.get_height() / 2,
                    f"{r['test_top1']:.4f}" if r["status"] == "ok" else "diverged",
                    va="center", fontsize=8)
        ok = [t for t in top1 if t > 0]
        ax.set_xlim(min(ok) - 0.05 if ok else 0, 1.0)
        ax.invert_yaxis()
        ax.set_xlabel("test top-1")
        ax.set_title("ViT squashing / alpha ablations", fontsize=10)
        save_figure(fig, args.results, f"ablations{args.tag}")
    return rows


def floats(text, flag):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise AnalysisError(f"{flag} takes comma-separated numbers, got {text!r}")
    if not values or any(v <= 0 for v in values):
        raise AnalysisError(f"{flag} needs positive values, got {text!r}")
    return values


def cmd_alpha0(args):
    rows = []
    if args.model == "vit":
        import train_vit
        for a in floats(args.alpha0, "--alpha0"):
            print(f"--- alpha0 {a}", flush=True)
            result = train_one(train_vit, ["--norm", "dyt", "--alpha0", str(a)] + budget_flags(args),
                               os.path.join(args.out_dir, f"vit_alpha0_{a:g}"), args.reuse)
            rows.append({"alpha0": a, **result})
        write_table(rows, args.results, f"alpha0_vit{args.tag}",
                    f"ViT alpha0 sweep, train_vit.py --norm dyt {' '.join(budget_flags(args))}")
        plt = pyplot()
        if plt is not None:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ok = [r for r in rows if r["status"] == "ok"]
            ax.semilogx([r["alpha0"] for r in ok], [r["test_top1"] for r in ok], "o-")
            for r in rows:
                if r["status"] != "ok":
                    ax.axvline(r["alpha0"], color="C3", ls=":", label="diverged")
            ax.set_xlabel("alpha0")
            ax.set_ylabel("test top-1")
            ax.set_title("ViT: accuracy vs DyT alpha0", fontsize=10)
            save_figure(fig, args.results, f"alpha0_vit{args.tag}")
        return rows
    import train_gpt
    attn, other = floats(args.alpha0_attn, "--alpha0_attn"), floats(args.alpha0_other, "--alpha0_other")
    grid = np.full((len(attn), len(other)), np.nan)
    for i, a in enumerate(attn):
        for j, o in enumerate(other):
            print(f"--- alpha0 attention {a}, other {o}", flush=True)
            argv = ["--norm", "dyt", "--alpha0_attn", str(a), "--alpha0_other", str(o),
                    "--sample_tokens", "0", "--ckpt_interval", "0", "--device", "cpu"]
            if args.epochs is not None:
                raise AnalysisError("--epochs is for the ViT; give the GPT sweep --steps")
            # the GPT trainer reads its data from --data (a prepared directory or "default")
            flags = [f if f != "--data_dir" else "--data" for f in budget_flags(args)]
            result = train_one(train_gpt, argv + flags,
                               os.path.join(args.out_dir, f"gpt_alpha0_{a:g}_{o:g}"), args.reuse)
            rows.append({"alpha0_attn": a, "alpha0_other": o, **result})
            if result["status"] == "ok" and "val_loss" in result:
                grid[i, j] = result["val_loss"]
    write_table(rows, args.results, f"alpha0_gpt{args.tag}",
                f"GPT alpha0 sweep (attention x other), train_gpt.py --norm dyt {' '.join(budget_flags(args))}")
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(1.1 * len(other) + 2.5, 0.9 * len(attn) + 1.8))
        im = ax.imshow(grid, cmap="viridis_r")
        for i in range(len(attn)):
            for j in range(len(other)):
                ax.text(j, i, "diverged" if np.isnan(grid[i, j]) else f"{grid[i, j]:.3f}",
                        ha="center", va="center", fontsize=8,
                        color="red" if np.isnan(grid[i, j]) else "white")
        ax.set_xticks(range(len(other)), [f"{o:g}" for o in other])
        ax.set_yticks(range(len(attn)), [f"{a:g}" for a in attn])
        ax.set_xlabel("alpha0 other (MLP, final)")
        ax.set_ylabel("alpha0 attention")
        fig.colorbar(im, ax=ax, label="val loss")
        ax.set_title("GPT val loss vs DyT alpha0", fontsize=10)
        save_figure(fig, args.results, f"alpha0_gpt{args.tag}")
    return rows


# ---------------------------------------------------------------------------------------------
# 7. Robustness to perturbations of the norm input (ViT study section 6)


# Two protocols. "paper" is the ViT study's (Aggarwal, Tiwari, Aryan 2025, sec. 6.2, eqs. 3-5):
# ONE norm layer at a time, at a shallow and at a deep block; a forward pre-hook changes 50% of
# that layer's input channels, so the residual stream around it stays clean; its noise
# REPLACES those channels by N(0, sigma^2), sigma the layer input's std. "all_layers" is this
# project's own extension, not the paper's: every norm layer at once, and its noise is
# additive and sporadic (each element of the chosen channels with probability 1/2).
PERTURBATIONS = {
    "paper": ([("clean", None, 0.0), ("noise (replace, 1 std)", "replace", 1.0)]
              + [(f"scale x{s:g}", "scale", s) for s in (0.5, 2, 5, 100)]
              + [(f"bias +{b:g} std", "bias", b) for b in (0.5, 2)]),
    "all_layers": ([("clean", None, 0.0), ("noise (add, sporadic, 1 std)", "noise", 1.0)]
                   + [(f"scale x{s:g}", "scale", s) for s in (0.5, 2, 5, 100)]
                   + [(f"bias +{b:g} std", "bias", b) for b in (0.5, 2)]),
}


def paper_layers(model, layers):
    """The paper's two layers: the first norm of a shallow and of a deep block, at the same
    relative depths as its blocks 3 and 8 of 12 (1/4 and 2/3 of the depth)."""
    blocks = model_blocks(model)
    picks = dict.fromkeys(min(len(blocks) - 1, round(f * len(blocks))) for f in (3 / 12, 8 / 12))
    chosen = []
    for b in picks:
        prefix = blocks[b][0] + "."
        inside = [l for l in layers if l.name.startswith(prefix)]
        if not inside:
            raise AnalysisError(f"block {blocks[b][0]} has no norm layer; name the layers with --layers")
        chosen.append(inside[0])
    return chosen


def input_stats(model, layers, x):
    """{layer: (std of its input over all elements, channel count)} on the clean batch."""
    captured = capture_norm_io(model, layers, x)
    return {l.name: (captured[l.name][0].std().item(), captured[l.name][0].shape[-1]) for l in layers}


def channel_masks(layers, stats, seed, fraction=0.5):
    """A fixed random `fraction` of each layer's channels (the same for every perturbation
    and every model with the same layer names and widths, so LN and DyT see the same)."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for layer in layers:
        C = stats[layer.name][1]
        mask = torch.zeros(C, dtype=torch.bool)
        mask[torch.randperm(C, generator=generator)[:int(round(fraction * C))]] = True
        masks[layer.name] = mask
    return masks


@contextlib.contextmanager
def perturbed(model, layers, kind, amount, stats, masks, seed, noise_prob=0.5):
    """Forward pre-hooks that perturb each layer's input on its masked channels, sigma being
    the layer's clean input std: replace - those channels become N(0, (amount sigma)^2)
    (the paper's sporadic noise); noise - N(0, (amount sigma)^2) added to each of their
    elements with probability noise_prob (this project's variant); scale - times `amount`;
    bias - plus `amount` sigma. Removed on exit, even on error."""
    generator = torch.Generator().manual_seed(seed)
    with hooks_removed_after() as handles:
        for layer in layers:
            def pre_hook(module, inputs, layer=layer):
                x = inputs[0]
                xc = channels_last_view(x, layer.channels_last)
                mask = masks[layer.name].to(x.device)
                std = stats[layer.name][0]
                if kind in ("replace", "noise"):
                    noise = torch.randn(xc.shape, generator=generator).to(x.device, x.dtype) * (amount * std)
                    if kind == "replace":
                        new = torch.where(mask, noise, xc)
                    else:
                        sporadic = torch.rand(xc.shape, generator=generator).to(x.device) < noise_prob
                        new = xc + noise * (sporadic & mask)
                elif kind == "scale":
                    new = torch.where(mask, xc * amount, xc)
                else:
                    new = torch.where(mask, xc + amount * std, xc)
                new = new if layer.channels_last else new.movedim(-1, 1)
                return (new,) + tuple(inputs[1:])
            handles.append(layer.module.register_forward_pre_hook(pre_hook))
        yield


def robustness_rows(model, kind, x, y, groups, protocol, seed):
    """[{perturbation, layer, acc, loss}] with each group of layers perturbed together: one
    layer per group under the paper's protocol, all of them in one group otherwise."""
    everything = [l for g in groups for l in g]
    stats = input_stats(model, everything, x[:min(len(x), 256)])
    masks = channel_masks(everything, stats, seed)
    _, clean = loss_and_accuracy(model, kind, x, y)
    rows = []
    for group in groups:
        for label, what, amount in PERTURBATIONS[protocol]:
            with perturbed(model, group, what, amount, stats, masks, seed) if what else contextlib.nullcontext():
                loss, acc = loss_and_accuracy(model, kind, x, y)
            acc = acc if math.isfinite(loss) else float("nan")
            rows.append({"perturbation": label, "layer": ",".join(l.name for l in group) if protocol == "paper"
                         else "all", "acc": acc, "drop": clean - acc, "loss": loss})
    return rows


def cmd_robustness(args):
    models = [(run_name(p), *load_model(p)) for p in args.ckpt]
    kinds = {m[2] for m in models}
    if len(kinds) > 1:
        raise AnalysisError("compare models of one kind (all ViT or all GPT checkpoints)")
    table = None
    for tag, model, kind, state in models:
        x, y = analysis_batch(kind, state, args.n, args.data_dir)
        layers = norm_layers(model)
        if args.protocol == "paper":
            groups = [[l] for l in (select_layers(layers, args.layers) if args.layers else paper_layers(model, layers))]
        else:
            groups = [select_layers(layers, args.layers)]
        rows = robustness_rows(model, kind, x, y, groups, args.protocol, args.seed)
        if table is None:
            table = [{"perturbation": r["perturbation"], "layer": r["layer"]} for r in rows]
        elif [(r["perturbation"], r["layer"]) for r in rows] != [(t["perturbation"], t["layer"]) for t in table]:
            raise AnalysisError("the checkpoints' norm layers differ (names or depth); compare models of one shape")
        for t, r in zip(table, rows):
            t.update({f"{tag} acc": r["acc"], f"{tag} drop": r["drop"], f"{tag} loss": r["loss"]})
    what = "top-1" if kinds == {"vit"} else "next-token accuracy"
    protocol = ("the ViT study's protocol (sec. 6.2): one norm layer at a time, 50% of its input "
                "channels, noise replaces them" if args.protocol == "paper" else
                "this project's all-layers variant, not the paper's: every chosen norm layer at once, "
                "50% of channels, noise added to half their elements")
    name = f"robustness_{args.tag or '_vs_'.join(m[0] for m in models)}"
    write_table(table, args.results, name, f"Robustness: {what} on {args.n} inputs; {protocol}")
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(table)), 3.5))
        width = 0.8 / len(models)
        labels = [r["perturbation"] + ("" if args.protocol != "paper" else f"\n{r['layer']}") for r in table]
        for k, (tag, *_) in enumerate(models):
            ax.bar(np.arange(len(table)) + k * width, [r[f"{tag} acc"] for r in table], width, label=tag)
        ax.set_xticks(np.arange(len(table)) + 0.4 - width / 2, labels, rotation=40, ha="right", fontsize=7)
        ax.set_ylabel(what)
        ax.legend(fontsize=8)
        ax.set_title(protocol, fontsize=8)
        save_figure(fig, args.results, name)
    return table


# ---------------------------------------------------------------------------------------------
# 8. Representations: effective rank, CKA, gradient flow (ViT study sections 7-8)


def effective_rank(features, of="covariance"):
    """Shannon effective rank of a [n, d] matrix A: exp of the entropy of a spectrum
    normalised to sum 1. d for isotropic data, k for k equal directions.

    of="covariance" is the ViT study's definition (its appendix A): the eigenvalues of the
    covariance A^T A / n of the centred rows, i.e. the squared singular values of the centred
    A. of="singular_values" is Roy & Vetterli's (2007), on A as it is: the singular values
    themselves. The two differ on any spectrum that is not flat (for singular values 2 and 1:
    1.65 against 1.89), so only the first compares with the paper's numbers."""
    f = features.double().reshape(-1, features.shape[-1])
    if of == "covariance":
        s = torch.linalg.svdvals(f - f.mean(0, keepdim=True)) ** 2
    elif of == "singular_values":
        s = torch.linalg.svdvals(f)
    else:
        raise ValueError(f"of={of!r}: covariance or singular_values")
    p = s / s.sum().clamp_min(1e-300)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def linear_cka(x, y):
    """Linear CKA (Kornblith et al. 2019) of two representations of the same n examples,
    [n, d1] and [n, d2]: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred columns. 1 for
    the same representation; invariant to orthogonal transforms and isotropic scaling."""
    x = x.double().reshape(x.shape[0], -1)
    y = y.double().reshape(y.shape[0], -1)
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp_min(1e-300))


def block_outputs(model, x):
    """[(block name, output as [tokens, channels])] of every block on one forward pass."""
    outs = {}
    with hooks_removed_after() as handles, torch.no_grad():
        for name, block in model_blocks(model):
            handles.append(block.register_forward_hook(
                lambda m, i, o, name=name: outs.__setitem__(name, (o[0] if isinstance(o, tuple) else o).detach().float())))
        model(x)
    return [(name, outs[name].reshape(-1, outs[name].shape[-1])) for name, _ in model_blocks(model)]


def gradient_ratios(model, kind, x, y):
    """{layer: ||dL/d input|| / ||dL/d output||} through each norm layer, from full backward
    hooks (the gradient through the layer only, not the residual path around it). Gradients
    are taken with autograd.grad, so the parameters' .grad stay untouched."""
    norms = {}
    layers = norm_layers(model)
    with hooks_removed_after() as handles:
        for layer in layers:
            handles.append(layer.module.register_full_backward_hook(
                lambda m, gin, gout, name=layer.name: norms.__setitem__(
                    name, (gin[0].float().norm().item(), gout[0].float().norm().item()))))
        logits = model(x) if kind == "vit" else model(x)[0]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        params = [p for p in model.parameters() if p.requires_grad]
        torch.autograd.grad(loss, params, allow_unused=True)
    return {l.name: norms[l.name][0] / max(norms[l.name][1], 1e-30) for l in layers if l.name in norms}


def cmd_representations(args):
    models = [(run_name(p), *load_model(p)) for p in args.ckpt]
    if len({m[2] for m in models}) > 1:
        raise AnalysisError("compare models of one kind (all ViT or all GPT checkpoints)")
    _, _, kind, state = models[0]
    x, y = analysis_batch(kind, state, args.n, args.data_dir)
    feats, rows, grads = {}, [], {}
    for tag, model, _, _ in models:
        feats[tag] = block_outputs(model, x)
        ratios = gradient_ratios(model, kind, x[:args.grad_n], y[:args.grad_n])
        grads[tag] = ratios
        for name, f in feats[tag]:
            rows.append({"model": tag, "block": name, "effective_rank": effective_rank(f),
                         "effective_rank_sv": effective_rank(f, of="singular_values"),
                         "width": f.shape[-1]})
    base = f"representations_{args.tag or '_vs_'.join(m[0] for m in models)}"
    write_table(rows, args.results, f"{base}_erank",
                f"Shannon effective rank of each block's output ({args.n} inputs, all tokens as rows): "
                f"effective_rank is the ViT study's (eigenvalues of the centred covariance); "
                f"effective_rank_sv is Roy & Vetterli's (singular values of the raw matrix), not the paper's")
    grad_rows = [{"layer": name, **{f"{tag} ratio": grads[tag].get(name, float("nan")) for tag in grads}}
                 for name in dict.fromkeys(n for tag in grads for n in grads[tag])]
    write_table(grad_rows, args.results, f"{base}_grad",
                f"gradient-norm ratio ||dL/d input|| / ||dL/d output|| through each norm layer "
                f"({args.grad_n} inputs)")
    # CKA between the first two models (or a model and itself), tokens as examples
    tag_a, tag_b = models[0][0], models[-1][0]
    rows_n = min(args.cka_tokens, feats[tag_a][0][1].shape[0])
    pick = torch.randperm(feats[tag_a][0][1].shape[0], generator=torch.Generator().manual_seed(args.seed))[:rows_n]
    cka = np.array([[linear_cka(fa[pick], fb[pick]) for _, fb in feats[tag_b]] for _, fa in feats[tag_a]])
    cka_rows = [{"block": na, **{nb: float(cka[i, j]) for j, (nb, _) in enumerate(feats[tag_b])}}
                for i, (na, _) in enumerate(feats[tag_a])]
    write_table(cka_rows, args.results, f"{base}_cka",
                f"linear CKA between the blocks of {tag_a} (rows) and {tag_b} (columns), "
                f"{rows_n} tokens")
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        for tag in feats:
            mine = [r for r in rows if r["model"] == tag]
            axes[0].plot(range(len(mine)), [r["effective_rank"] for r in mine], "o-", label=f"{tag}")
            axes[0].plot(range(len(mine)), [r["effective_rank_sv"] for r in mine], "s--",
                         label=f"{tag} (singular values, not the paper's)")
            names = list(grads[tag])
            axes[2].plot(range(len(names)), [grads[tag][n] for n in names], "o-", label=tag)
        axes[0].set_xlabel("block")
        axes[0].set_ylabel("effective rank")
        axes[0].legend(fontsize=7)
        axes[0].set_title("Shannon effective rank per block", fontsize=10)
        im = axes[1].imshow(cka, vmin=0, vmax=1, cmap="magma")
        fig.colorbar(im, ax=axes[1])
        axes[1].set_xlabel(f"{tag_b} block")
        axes[1].set_ylabel(f"{tag_a} block")
        axes[1].set_title("linear CKA", fontsize=10)
        axes[2].set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=6)
        axes[2].set_yscale("log")
        axes[2].set_ylabel("||dL/d in|| / ||dL/d out||")
        axes[2].axhline(1, color="0.6", lw=0.8)
        axes[2].legend(fontsize=7)
        axes[2].set_title("gradient-norm ratio through each norm layer", fontsize=10)
        save_figure(fig, args.results, base)
    return rows, cka, grads


# ---------------------------------------------------------------------------------------------
# 9. Curves: runs (and seed groups) compared along training, from their metrics.jsonl


CURVE_METRICS = {"gpt": ("val_loss", "loss"), "vit": ("test_top1", "loss")}  # (evaluated, train)


def run_curves(run_dir, x):
    """{metric: [(x, value), ...]} of one run, x in steps, tokens or epochs; None if the run
    has no metrics.jsonl. Tokens come from the logged tokens per step (GPT runs)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    kind = "gpt" if any("val_loss" in r for r in rows) else "vit"
    per_step = {"step": 1.0}
    if x == "tokens":
        tok = next((r["tokens"] / r["step"] for r in rows if "tokens" in r and r.get("step")), None)
        if tok is None:
            raise AnalysisError(f"{run_dir} logs no tokens (a ViT run?); use --x step or epoch")
        per_step["tokens"] = tok
    if x == "epoch":
        ep = next((r["epoch"] / r["step"] for r in rows if "epoch" in r and r.get("step")), None)
        if ep is None:
            raise AnalysisError(f"{run_dir} logs no epochs (a GPT run?); use --x step or tokens")
        per_step["epoch"] = ep
    out = {}
    for metric in CURVE_METRICS[kind]:
        points = {r["step"] * per_step[x]: r[metric] for r in rows if metric in r and "step" in r}
        out[metric] = sorted(points.items())  # a resumed run logs each step once; last wins
    return out


def group_curve(curves):
    """(x, mean, min, max) over the runs of a group, at the x every one of them has."""
    common = sorted(set.intersection(*[{p[0] for p in c} for c in curves]))
    values = np.array([[dict(c)[x] for x in common] for c in curves])
    return common, values.mean(0), values.min(0), values.max(0)


def value_at(points, x):
    """The value at the last logged x <= the requested one (none before the first)."""
    before = [v for px, v in points if px <= x]
    return before[-1] if before else math.nan


def cmd_curves(args):
    groups = {}
    for text in args.group:
        name, _, members = text.partition("=")
        if not name or not members:
            raise AnalysisError(f"--group {text!r}: write NAME=DIR,DIR,...")
        groups[name] = [m for m in members.split(",") if m]
    lines = {os.path.basename(os.path.normpath(r)): [r] for r in args.run}
    lines.update(groups)
    if not lines:
        raise AnalysisError("give --run DIR (repeat) or --group NAME=DIR,DIR,...")
    curves, no_logs = {}, []
    for label, dirs in lines.items():
        per_run = [(d, run_curves(d, args.x)) for d in dirs]
        no_logs += [d for d, c in per_run if c is None]
        have = [c for _, c in per_run if c is not None]
        if have:
            metrics = [m for m in have[0] if all(m in c and c[m] for c in have)]
            curves[label] = {m: group_curve([c[m] for c in have]) for m in metrics}
            curves[label]["runs"] = len(have)
    for d in no_logs:
        print(f"note: {d} has no metrics.jsonl: left out (runs recorded only in a table have no curves)")
    if not curves:
        raise AnalysisError("none of the runs has a metrics.jsonl; give train_gpt.py/train_vit.py out_dirs")
    metrics = [m for m in dict.fromkeys(m for c in curves.values() for m in c if m != "runs")]
    xs = floats(args.at, "--at") if args.at else sorted({x for c in curves.values() for m in metrics
                                                         if m in c for x in c[m][0]})[-1:]
    rows = []
    for label, c in curves.items():
        row = {"run": label, "runs": c["runs"]}
        for m in metrics:
            for x in xs:
                if m in c:
                    row[f"{m} @ {x:g}"] = round(float(value_at(list(zip(c[m][0], c[m][1])), x)), 4)
        rows.append(row)
    name = f"curves{args.tag}"
    write_table(rows, args.results, name, f"Curves by {args.x}: each metric at the last logged {args.x} <= "
                f"the column's (groups: the mean over their runs){'; no logs: ' + ', '.join(no_logs) if no_logs else ''}")
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8), squeeze=False)
        for ax, m in zip(axes[0], metrics):
            for label, c in curves.items():
                if m not in c:
                    continue
                x, mean, lo, hi = c[m]
                line, = ax.plot(x, mean, label=f"{label} (n={c['runs']})" if c["runs"] > 1 else label)
                if c["runs"] > 1:
                    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
            ax.set_xlabel(args.x)
            ax.set_ylabel(m)
            if args.x == "tokens" or args.log_x:
                ax.set_xscale("log")
            ax.legend(fontsize=7)
        fig.suptitle("mean over each group's runs, band from min to max", fontsize=9)
        save_figure(fig, args.results, name)
    return rows, no_logs


# ---------------------------------------------------------------------------------------------
# 10. Command line


class OneLineParser(tc._Parser):
    """argparse whose errors are one `error:` line (train_common's parser, for subcommands)."""


def build_parser():
    parser = OneLineParser(description=__doc__.split("\n\n")[1],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=OneLineParser)

    def common(p, data=True):
        p.add_argument("--results", default=RESULTS_DIR, help="where tables and plots go")
        p.add_argument("--tag", default="", help="name suffix for the output files")
        p.add_argument("--seed", type=int, default=0)
        if data:
            p.add_argument("--data_dir", default="", help="the dataset (ViT) or prepared token dir "
                           "(GPT), if not where the checkpoint was trained from")
        return p

    p = common(sub.add_parser("s_curves", help="input vs output of each norm layer, tanh fit"))
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n", type=int, default=64, help="images / sequences in the batch")
    p.add_argument("--layers", default="", help="names or indices, comma-separated (default all)")
    p.add_argument("--plot_layers", type=int, default=4, help="layers in the plot")
    p.add_argument("--fit_points", type=int, default=100000)
    p.add_argument("--plot_points", type=int, default=20000)

    p = common(sub.add_parser("alpha_std", help="each DyT layer's alpha vs 1/std of its input"))
    p.add_argument("--run", action="append", required=True,
                   help="a DyT run's out_dir (metrics.jsonl, ckpt.pt); repeat for several")
    p.add_argument("--n", type=int, default=256)

    def sweep(p):
        p.add_argument("--epochs", type=float, default=None, help="ViT budget in epochs")
        p.add_argument("--steps", type=int, default=0, help="budget in steps (--max_steps)")
        p.add_argument("--train_args", default="", help="more trainer flags, quoted")
        p.add_argument("--out_dir", default=os.path.join("out_analysis", "sweeps"),
                       help="run directories go under here")
        p.add_argument("--reuse", action="store_true",
                       help="read back runs already finished (norms: also those in --results' runs table)")

    p = common(sub.add_parser("ablations", help="train the ViT with each squashing function"))
    sweep(p)
    p.add_argument("--norms", default=",".join(ABLATION_NORMS), help=f"from {', '.join(ABLATION_NORMS)}")

    p = common(sub.add_parser("alpha0", help="sweep DyT's alpha0 (ViT), or attention x other (GPT)"))
    sweep(p)
    p.add_argument("--model", choices=["vit", "gpt"], default="vit")
    p.add_argument("--alpha0", default="0.1,0.5,1,2,4", help="ViT values")
    p.add_argument("--alpha0_attn", default="0.5,1,2", help="GPT: before attention")
    p.add_argument("--alpha0_other", default="0.5,1,2", help="GPT: before the MLP and the final one")

    for moved in ("norms", "saturation"):  # this project's own studies: studies/gpt_norms.py
        sub.add_parser(moved, add_help=False, prefix_chars="\0").add_argument("rest", nargs="*")

    p = common(sub.add_parser("robustness", help="accuracy under perturbed norm inputs"))
    p.add_argument("--ckpt", action="append", required=True, help="repeat: e.g. LN then DyT")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--protocol", choices=list(PERTURBATIONS), default="paper",
                   help="paper: the ViT study's, one layer at a time, noise replaces; all_layers: "
                        "this project's variant, every layer at once, noise added")
    p.add_argument("--layers", default="", help="names or indices, comma-separated (default: paper: "
                   "the first norm of the blocks at 1/4 and 2/3 of the depth; all_layers: all)")

    p = common(sub.add_parser("curves", help="runs and seed groups as curves along training"), data=False)
    p.add_argument("--run", action="append", default=[], help="a run's out_dir (repeat)")
    p.add_argument("--group", action="append", default=[], help="NAME=DIR,DIR,...: their mean and band")
    p.add_argument("--x", choices=["step", "tokens", "epoch"], default="step")
    p.add_argument("--at", default="", help="x values for the table (default: the last)")
    p.add_argument("--log_x", action="store_true", help="a log x axis")

    p = common(sub.add_parser("representations", help="effective rank, CKA, gradient-norm ratios"))
    p.add_argument("--ckpt", action="append", required=True, help="one, or two to compare")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--grad_n", type=int, default=64, help="inputs for the gradient ratios")
    p.add_argument("--cka_tokens", type=int, default=4096)
    return parser


def cmd_moved(args):
    raise AnalysisError(f"`analyze.py {args.command}` moved with this project's own studies: "
                        f"python studies/gpt_norms.py {args.command} ... (its flags: --help there)")


COMMANDS = {"curves": cmd_curves, "s_curves": cmd_s_curves, "alpha_std": cmd_alpha_std, "ablations": cmd_ablations,
            "alpha0": cmd_alpha0, "norms": cmd_moved, "saturation": cmd_moved,
            "robustness": cmd_robustness, "representations": cmd_representations}


def main(argv=None):
    args = build_parser().parse_args(argv)
    for flag in ("n", "grad_n", "cka_tokens", "fit_points", "plot_points", "plot_layers"):
        if getattr(args, flag, 1) <= 0:
            raise AnalysisError(f"--{flag} must be positive")
    if COMMANDS[args.command] is cmd_moved:
        return cmd_moved(args)
    tc.ensure_writable_dir(args.results, "--results")  # before the work, not after it
    torch.manual_seed(args.seed)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    tc.main_guard(main)
