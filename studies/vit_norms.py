"""
This project's own study of the small ViT (not the papers'): LayerNorm, RMSNorm, DyT and Derf on
Fashion-MNIST, each at its own best learning rate (and DyT/Derf at their best alpha0), with
seeds, at several budgets.

    python studies/vit_norms.py --epochs 16,64 --jobs 2 --reuse --results results/analysis

For each cell (budget, norm): an lr sweep at the first seed, extended by factors of 2 past an
edge winner; for DyT-like norms then an alpha0 grid at that lr; then the other seeds at the
best (lr, alpha0) of the first seed's runs. Every run is the default `python train_vit.py` with
--norm, --epochs, --lr, --alpha0 and --seed set (and --train_args added), a child process with
its own out_dir under --out_dir, --jobs at a time. As in studies/gpt_norms.py: with --reuse a
finished run is read back (its out_dir, or the runs table committed under --results) and an
unfinished one resumes from its checkpoint; SIGINT/SIGTERM stop the study cleanly; the runs
table (vit_norms_runs.{md,csv}) and the summary (vit_norms.{md,csv,png}) are rewritten after
every run. Nothing downloads: the data is Debian's dataset-fashion-mnist or --data_dir.
"""

import argparse
import math
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import data_vision  # noqa: E402
import train_common as tc  # noqa: E402
from analyze import AnalysisError, floats, pyplot, save_figure, write_table  # noqa: E402
from dyt import NORMS, is_dynamic, make_norm  # noqa: E402
from studies.gpt_norms import Study, listed, seeds_of  # noqa: E402
from train_vit import ViTTrainConfig  # noqa: E402


def error_of(result):
    """The study's score, lower is better: test error (1 - top-1); inf unless the run is ok."""
    return 1 - result["test_top1"] if result["status"] == "ok" and "test_top1" in result else math.inf


def dynamic(norm):
    return is_dynamic(make_norm(norm, 4))


def cell_summary(runs, seeds):
    """One cell's runs -> the best (lr, alpha0) of the first seed's runs, what was swept, and
    the mean and sample std of test top-1 (in %) over the seeds run there; None before a run."""
    first = {(r["lr"], r["alpha0"]): error_of(r) for r in runs if r["seed"] == seeds[0]}
    if not first:
        return None
    lr, alpha0 = min(first, key=first.get)
    at_best = [r for r in runs if (r["lr"], r["alpha0"]) == (lr, alpha0) and r["seed"] in seeds]
    ok = [100 * r["test_top1"] for r in at_best if math.isfinite(error_of(r))]
    loss = [r["test_loss"] for r in at_best if math.isfinite(error_of(r))]
    sweep = " ".join(f"{l:g}{'@' + format(a, 'g') if a else ''}:{100 * (1 - e):.2f}"
                     for (l, a), e in sorted(first.items()))
    return {"best_lr": lr, "best_alpha0": alpha0 or "",
            f"swept (lr@alpha0: top-1 at seed {seeds[0]})": sweep,
            "seeds": len(at_best), "diverged": len(at_best) - len(ok),
            "top1_mean": round(float(np.mean(ok)), 2) if ok else math.nan,
            "top1_std": round(float(np.std(ok, ddof=1)), 2) if len(ok) > 1 else 0.0,
            "test_loss_mean": round(float(np.mean(loss)), 4) if loss else math.nan}


def summary_rows(runs, seeds, baseline="ln"):
    """One row per (epochs, norm), with the gap to the baseline norm's mean top-1 (points) and
    the standard error of that difference of means."""
    cells = {}
    for r in runs:
        cells.setdefault((r["epochs"], r["norm"]), []).append(r)
    rows = []
    for (epochs, norm), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], list(NORMS).index(kv[0][1]))):
        summary = cell_summary(rs, seeds)
        if summary is not None:
            rows.append({"epochs": epochs, "norm": norm, **summary})
    base = {r["epochs"]: r for r in rows if r["norm"] == baseline}
    for r in rows:
        b = base.get(r["epochs"])
        if b is None or r is b:
            continue
        r[f"gap_to_{baseline}"] = round(r["top1_mean"] - b["top1_mean"], 2)
        if r["seeds"] > 1 and b["seeds"] > 1:
            r["gap_se"] = round(math.sqrt(r["top1_std"] ** 2 / r["seeds"] + b["top1_std"] ** 2 / b["seeds"]), 2)
    return rows


def plot(rows, results, name):
    plt = pyplot()
    if plt is None or not rows:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, norm in enumerate(dict.fromkeys(r["norm"] for r in rows)):
        pts = sorted((r["epochs"], r["top1_mean"], r["top1_std"]) for r in rows if r["norm"] == norm)
        ax.errorbar([p[0] * (1 + 0.03 * i) for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    marker="o", capsize=3, label=norm)
    ax.set_xscale("log")
    ax.set_xlabel("epochs")
    ax.set_ylabel("test top-1 (%)")
    ax.legend(fontsize=8)
    ax.set_title("ViT on Fashion-MNIST: each norm at its best lr (and alpha0);\n"
                 "mean and std over seeds", fontsize=9)
    save_figure(fig, results, name, quiet=True)


def check_data(data_dir):
    try:
        data_vision.load_fashion_mnist(data_dir, download=False)
    except tc.UserError as e:
        raise AnalysisError(f"no Fashion-MNIST to train on ({e}); apt-get install dataset-fashion-mnist, "
                            "or give --data_dir") from None


def run_study(args):
    budgets = sorted(floats(args.epochs, "--epochs"))
    norms = listed(args.norms)
    for n in norms:
        if n not in NORMS:
            raise AnalysisError(f"unknown norm {n!r} in --norms; choose from {', '.join(NORMS)}")
    lrs, alpha0s, seeds = floats(args.lrs, "--lrs"), floats(args.alpha0s, "--alpha0s"), seeds_of(args.seeds)
    seed_epochs = set(floats(args.seed_epochs, "--seed_epochs")) if args.seed_epochs else set(budgets)
    check_data(args.data_dir)
    name = f"vit_norms{args.tag}"
    out_root = os.path.abspath(args.out_dir)

    def summarize(runs):
        rows = summary_rows(runs, seeds)
        write_table(rows, args.results, name,
                    f"ViT on Fashion-MNIST by norm: test top-1 (%), mean and sample std over seeds "
                    f"{args.seeds} at each norm's best lr and alpha0 (swept at seed {seeds[0]}); gap_to_ln "
                    f"in points with the standard error of the difference; {args.train_args}", quiet=True)
        plot(rows, args.results, name)
        return rows

    study = Study(args, name, f"Every run of `studies/vit_norms.py` (the default train_vit.py run with "
                  f"--epochs, --lr, --alpha0, --seed; {args.train_args}): test top-1, top-5, loss",
                  ("epochs", "norm", "lr", "alpha0", "seed"), summarize, trainer="train_vit", score=error_of)

    def cell(epochs, norm):
        argv = (["--norm", norm, "--epochs", f"{epochs:g}", "--download", "false", "--ckpt_interval",
                 str(args.ckpt_interval), "--device", args.device]
                + (["--data_dir", args.data_dir] if args.data_dir else []) + shlex.split(args.train_args))
        is_dyt = dynamic(norm)

        def run(lr, seed, alpha0=None):
            alpha0 = (alpha0 or args.alpha0) if is_dyt else 0.0
            fields = {"epochs": epochs, "norm": norm, "lr": lr, "alpha0": alpha0, "seed": seed}
            tag = f"e{epochs:g}_{norm}_lr{lr:g}{f'_a{alpha0:g}' if is_dyt else ''}_s{seed}"
            extra = ["--alpha0", f"{alpha0:g}"] if is_dyt else []
            return study.run(fields, argv + extra + ["--lr", f"{lr:g}", "--seed", str(seed)],
                             os.path.join(out_root, tag))

        def go():
            sweep = {lr: run(lr, seeds[0]) for lr in lrs}
            for _ in range(args.extend):  # an edge winner is not known to be the best
                best = min(sweep, key=sweep.get)
                if min(sweep) < best < max(sweep) or len(sweep) < 2:
                    break
                lr = best * 2 if best == max(sweep) else best / 2
                sweep[lr] = run(lr, seeds[0])
            lr = min(sweep, key=sweep.get)
            first = {(lr, args.alpha0 if is_dyt else 0.0): sweep[lr]}
            if is_dyt:
                first.update({(lr, a): run(lr, seeds[0], a) for a in alpha0s})
            lr, alpha0 = min(first, key=first.get)
            for seed in (seeds[1:] if epochs in seed_epochs else []):
                run(lr, seed, alpha0)
        return go

    rows = study.go([cell(e, n) for e in budgets for n in norms])
    print(open(os.path.join(args.results, f"{name}.md")).read(), flush=True)
    return rows


def build_parser():
    p = tc._Parser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", default="16,64", help="budgets in epochs (the default run's, and 4x it)")
    p.add_argument("--norms", default="ln,rms,dyt,derf", help=f"from {', '.join(NORMS)}")
    p.add_argument("--lrs", default="1e-3,2e-3,4e-3", help="the lr sweep at the first seed")
    p.add_argument("--alpha0", type=float, default=ViTTrainConfig().model.alpha0,
                   help="DyT-like norms' alpha0 during the lr sweep (default: the trainer's)")
    p.add_argument("--alpha0s", default="0.5,2", help="DyT-like norms: more alpha0 at the best lr")
    p.add_argument("--seeds", default="0,1,2", help="the first sweeps lr and alpha0")
    p.add_argument("--seed_epochs", default="", help="budgets where every seed runs (default: all)")
    p.add_argument("--extend", type=int, default=2, help="runs allowed past an edge of the lr sweep")
    p.add_argument("--train_args", default="", help="more train_vit.py flags, quoted")
    p.add_argument("--data_dir", default="", help="Fashion-MNIST's IDX files (default: Debian's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ckpt_interval", type=int, default=500, help="steps between a run's checkpoints")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    p.add_argument("--reuse", action="store_true", help="read back finished runs (their out_dir, or "
                   "the runs table in --results) and resume unfinished ones")
    p.add_argument("--out_dir", default=os.path.join("out_analysis", "vit_norms"), help="run directories")
    p.add_argument("--results", default=os.path.join("out", "analysis"),
                   help="tables and plot (the committed ones: results/analysis)")
    p.add_argument("--tag", default="", help="name suffix for the output files")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        raise AnalysisError("--jobs and --threads must be >= 1")
    tc.ensure_writable_dir(args.results, "--results")  # before the work, not after it
    return run_study(args)


if __name__ == "__main__":
    tc.main_guard(main)
