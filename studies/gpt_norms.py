"""
This project's own study of the small GPT (not the papers'): DyT and Derf against RMSNorm,
each norm at its own best learning rate, as the training data grows.

    python data.py prepare --input /usr/share/doc/python3.11/html/_sources --encoding byte --out data/pydocs
    python studies/gpt_norms.py budget --data data/pydocs --widths 64 --steps 450,1800,7200 \\
        --jobs 2 --reuse --results results/analysis

For each width, budget (steps of 4,096 tokens) and norm: an lr sweep at the first seed,
extended by factors of 2 past an edge winner, then the other seeds at the best lr (at the
budgets --seed_steps names; elsewhere the sweep alone). Warmup and decay scale with the
budget: warmup is --warmup_fraction of the steps (1/9: the default run's 50 of 450), then
cosine to 10% of the peak at the last step. Every run is a train_gpt.py child process with
its own out_dir under --out_dir, checkpointing as it goes, so the study spreads over
sittings: with --reuse a finished run is read back (from its out_dir, or from the committed
runs table) and an unfinished one resumes from its checkpoint. SIGINT/SIGTERM stop the study
cleanly: the running children save and the next call resumes them. The runs table and the
summary are rewritten after every run, so what has finished is never lost.
"""

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, FIRST_EXCEPTION, wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import train_common as tc  # noqa: E402
from analyze import AnalysisError, floats, norm_spec, pyplot, save_figure, width_flags, write_table  # noqa: E402

BATCH_TOKENS = 16 * 256  # the default run's global batch: 16 sequences of 256 tokens
DIVERGED = 3             # the child's exit code for a run stopped by its divergence guard

# The child: train_gpt.py's main with its one-line errors, but a divergence (a result of the
# study, not a failure of it) told apart by its exit code.
CHILD = f"""
import sys
import train_common as tc, train_gpt
def main(argv):
    try:
        train_gpt.main(argv)
    except tc.TrainingDiverged as e:
        print(f"error: {{e}}", file=sys.stderr, flush=True)
        sys.exit({DIVERGED})
tc.main_guard(main)
"""


# ---------------------------------------------------------------------------------------------
# Runs: child processes, at most --jobs at a time, resumable


class Launcher:
    """Runs train_gpt.py children, at most `jobs` at once with OMP_NUM_THREADS=threads each.

    run(argv, out_dir) returns the run's result: status ("ok" or "diverged: ..."), steps,
    train and val loss, parameters, wall seconds, tokens/s. With reuse, a run whose
    result.json exists is read back and one with a checkpoint resumes; without it a run
    starts over. stop() (SIGINT/SIGTERM, or a failure elsewhere) sends each running child
    one SIGTERM: it checkpoints and exits, and run() raises tc.Interrupted."""

    def __init__(self, jobs=1, threads=1, reuse=False):
        self.slots = threading.Semaphore(jobs)
        self.threads, self.reuse = threads, reuse
        self.children, self.lock, self.stopping = set(), threading.Lock(), False

    def run(self, argv, out_dir):
        marker = os.path.join(out_dir, "result.json")
        if self.reuse and os.path.isfile(marker):
            with open(marker) as f:
                return json.load(f)
        if not self.reuse and os.path.isdir(out_dir):
            shutil.rmtree(out_dir)  # without --reuse a run starts over
        with self.slots:
            if self.stopping:
                raise tc.Interrupted("stopped before this run started")
            resume = os.path.isfile(os.path.join(out_dir, "ckpt.pt"))
            os.makedirs(out_dir, exist_ok=True)
            cmd = [sys.executable, "-c", CHILD, *argv, "--out_dir", out_dir] + (["--resume"] if resume else [])
            env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "PYTHONWARNINGS": "ignore"}
            print(f"--- {'resume' if resume else 'start'} {out_dir}", flush=True)
            with open(os.path.join(out_dir, "train.log"), "a") as log:
                # its own session: a Ctrl-C at the terminal reaches the children once, from stop()
                child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
                with self.lock:
                    self.children.add(child)
                rc = child.wait()
                with self.lock:
                    self.children.discard(child)
        last = _last_error(os.path.join(out_dir, "train.log"))
        if rc in (130, 143):
            raise tc.Interrupted(f"{out_dir} stopped; it resumes from its checkpoint", rc)
        if rc not in (0, DIVERGED):
            raise AnalysisError(f"the run in {out_dir} failed (exit {rc}): {last or 'see its train.log'}")
        result = read_result(out_dir, "ok" if rc == 0 else "diverged: " + last.removeprefix("error: "))
        with open(marker + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(marker + ".tmp", marker)
        return result

    def stop(self):
        self.stopping = True
        with self.lock:
            for child in self.children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)


def _last_error(log_path):
    with open(log_path, errors="replace") as f:
        lines = [line.strip() for line in f if line.startswith("error:")]
    return lines[-1] if lines else ""


def read_result(out_dir, status):
    """A finished run's result from its metrics.jsonl and checkpoint."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    train = [r for r in log if "loss" in r]
    evals = [r for r in log if "val_loss" in r]
    result = {"status": status, "steps": train[-1]["step"] if train else 0,
              "train_loss": train[-1]["loss"] if train else float("nan")}
    if status == "ok" and evals:
        result.update(val_loss=evals[-1]["val_loss"], val_bpb=evals[-1]["val_bpb"])
    speeds = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    if speeds:
        result["tokens_per_s"] = round(float(np.median(speeds)))
    ckpt = os.path.join(out_dir, "ckpt.pt")
    if os.path.isfile(ckpt):
        result["params"] = sum(v.numel() for v in tc.load_checkpoint(ckpt)["model"].values())
    return result


# ---------------------------------------------------------------------------------------------
# The sweep of one cell (width, budget, norm), and the tables


def best_lr_then_seeds(run, lrs, seeds, extend):
    """run(lr, seed) -> val loss (inf unless ok). The lr sweep at seeds[0], extended by
    factors of 2 past an edge winner (at most `extend` more runs: a best lr at the edge is
    not known to be the best), then the other seeds at the best lr. Returns (sweep, best lr,
    the losses at the best lr, one per seed)."""
    sweep = {lr: run(lr, seeds[0]) for lr in lrs}
    for _ in range(extend):
        best = min(sweep, key=sweep.get)
        if min(sweep) < best < max(sweep) or len(sweep) < 2:
            break
        lr = best * 2 if best == max(sweep) else best / 2
        sweep[lr] = run(lr, seeds[0])
    best = min(sweep, key=sweep.get)
    return sweep, best, [sweep[best]] + [run(best, seed) for seed in seeds[1:]]


def val_loss_of(result):
    return result.get("val_loss", math.inf) if result["status"] == "ok" else math.inf


def parse_lrs(text):
    """'1e-3,2e-3,4e-3' (every norm) or 'rms=4e-3,8e-3;dyt=1e-3,2e-3' (per norm spec, '*' the
    rest) -> {spec or '*': [lr, ...]}."""
    out = {}
    for item in text.replace(" ", ";").split(";"):
        if item.strip():
            name, _, values = item.rpartition("=")
            out[name.strip() or "*"] = floats(values, "--lrs")
    return out


def budget_summary(runs, seeds):
    """One row per (width, steps, norm) from the runs: the best lr of the sweep at seeds[0],
    the mean and sample std over the seeds run at it, and the gap to RMSNorm with the
    standard error of that difference of means."""
    cells = {}
    for r in runs:
        cells.setdefault((r["width"], r["steps_budget"], r["norm"]), []).append(r)
    rows = []
    for (width, steps, spec), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        sweep = {r["lr"]: val_loss_of(r) for r in rs if r["seed"] == seeds[0]}
        if not sweep:
            continue
        best = min(sweep, key=sweep.get)
        at_best = [val_loss_of(r) for r in rs if r["lr"] == best and r["seed"] in seeds]
        ok = [v for v in at_best if math.isfinite(v)]
        params = [r["params"] for r in rs if r.get("params")]
        rows.append({"width": width, "steps": steps, "tokens": steps * BATCH_TOKENS,
                     "tokens_per_param": round(steps * BATCH_TOKENS / params[0], 2) if params else "",
                     "norm": spec, "best_lr": best,
                     "swept (lr: val loss at seed %d)" % seeds[0]:
                         " ".join(f"{lr:g}:{sweep[lr]:.4f}" for lr in sorted(sweep)),
                     "seeds": len(at_best), "diverged": len(at_best) - len(ok),
                     "val_loss_mean": round(float(np.mean(ok)), 4) if ok else math.nan,
                     "val_loss_std": round(float(np.std(ok, ddof=1)), 4) if len(ok) > 1 else ""})
    base = {(r["width"], r["steps"]): r for r in rows if r["norm"] == "rms"}
    for r in rows:
        b = base.get((r["width"], r["steps"]))
        if b is None or r is b:
            continue
        r["gap_to_rms"] = round(r["val_loss_mean"] - b["val_loss_mean"], 4)
        if r["val_loss_std"] != "" and b["val_loss_std"] != "":
            r["gap_se"] = round(math.sqrt(r["val_loss_std"] ** 2 / r["seeds"] +
                                          b["val_loss_std"] ** 2 / b["seeds"]), 4)
    return rows


def plot_gaps(rows, results, name):
    lines = sorted({(r["width"], r["norm"]) for r in rows if "gap_to_rms" in r})
    plt = pyplot()
    if plt is None or not lines:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for width, spec in lines:
        pts = sorted((r["tokens_per_param"], r["gap_to_rms"], r.get("gap_se", 0.0) or 0.0)
                     for r in rows if (r["width"], r["norm"]) == (width, spec) and "gap_to_rms" in r)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    marker="o", capsize=3, label=f"{spec} - rms, width {width}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens per parameter")
    ax.set_ylabel("val loss gap to RMSNorm (nats)")
    ax.legend(fontsize=8)
    ax.set_title("Small GPT: the gap to RMSNorm as the data grows (each at its best lr)", fontsize=9)
    save_figure(fig, results, name)


# ---------------------------------------------------------------------------------------------
# budget: the study


def recorded_runs(path_stem, title, key):
    """The runs of a committed runs table (NAME.csv), keyed by key(row), if its NAME.md was
    written under the same title (data, batch, train args): another setup's runs are not these."""
    md, table = f"{path_stem}.md", f"{path_stem}.csv"
    if not (os.path.isfile(md) and os.path.isfile(table)):
        return {}
    with open(md) as f:
        if f.readline().rstrip("\n") != f"## {title}":
            print(f"note: {table} was recorded under another setup; its runs are not reused")
            return {}
    import csv
    recorded = {}
    with open(table, newline="") as f:
        for row in csv.DictReader(f):
            row = {k: v for k, v in row.items() if v != ""}
            for k in ("width", "steps_budget", "seed", "steps", "params", "tokens_per_s"):
                if k in row:
                    row[k] = int(float(row[k]))
            for k in ("lr", "train_loss", "val_loss", "val_bpb", "tokens", "tokens_per_param"):
                if k in row:
                    row[k] = float(row[k])
            recorded[key(row)] = row
    return recorded


def cmd_budget(args):
    data = os.path.abspath(args.data) if args.data != "default" else "default"
    out_root = os.path.abspath(args.out_dir)
    if data != "default" and not os.path.isfile(os.path.join(data, "meta.json")):
        raise AnalysisError(f"--data {args.data} is not a prepared directory; prepare it first: "
                            f"python data.py prepare --input /usr/share/doc/python3.11/html/_sources "
                            f"--encoding byte --out {args.data}")
    widths = [int(w) for w in floats(args.widths, "--widths")]
    budgets = sorted(int(s) for s in floats(args.steps, "--steps"))
    for s in budgets:
        warmup = round(s * args.warmup_fraction)
        if not 1 <= warmup < s:
            raise AnalysisError(f"--steps {s} is too short for a warmup of {args.warmup_fraction:.4g} "
                                f"of the run ({warmup} steps): the warmup needs at least one step and "
                                "fewer than the run's; give more --steps or another --warmup_fraction")
    specs = [s.strip() for s in args.norms.split(",") if s.strip()]
    largest_only = [s.strip() for s in args.largest_only.split(",") if s.strip()]
    for s in specs + largest_only:
        norm_spec(s)
    lrs = parse_lrs(args.lrs)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    seed_steps = {int(s) for s in floats(args.seed_steps, "--seed_steps")} if args.seed_steps else {budgets[-1]}
    name = f"budget_gpt{args.tag}"
    stem = os.path.join(args.results, f"{name}_runs")
    title = (f"Every run of `studies/gpt_norms.py budget` (data {args.data}, batch {BATCH_TOKENS} tokens, "
             f"warmup {args.warmup_fraction:.4g} of the steps {args.train_args}): val loss (nats)")
    key = lambda r: (r["width"], r["steps_budget"], r["norm"], r["lr"], r["seed"])
    recorded = recorded_runs(stem, title, key) if args.reuse else {}
    runs = dict(recorded)  # every run recorded or made, by key: the table never loses one
    table_lock = threading.Lock()
    launcher = Launcher(args.jobs, args.threads, args.reuse)

    def write_tables():
        with table_lock:
            rows = sorted(runs.values(), key=lambda r: (r["width"], r["steps_budget"], r["norm"], r["lr"], r["seed"]))
            write_table(rows, args.results, f"{name}_runs", title, quiet=True)
            summary = budget_summary(rows, seeds)
            write_table(summary, args.results, name,
                        f"Small GPT by norm as the data grows: val loss (nats) on {args.data}'s validation "
                        f"split, mean and sample std over seeds {args.seeds} at each norm's best lr (swept "
                        f"at seed {seeds[0]}); gap_to_rms with the standard error of the difference", quiet=True)
            plot_gaps(summary, args.results, name)
        return summary

    def cell(width, steps, spec):
        norm, init_flags = norm_spec(spec)
        argv = (["--norm", norm] + init_flags + width_flags(width) +
                ["--data", data, "--max_steps", str(steps), "--warmup_steps", str(round(steps * args.warmup_fraction)),
                 "--eval_interval", "0", "--eval_tokens", str(10 ** 9), "--ckpt_interval", str(args.ckpt_interval),
                 "--sample_tokens", "0", "--device", args.device] + shlex.split(args.train_args))

        def run(lr, seed):
            k = (width, steps, spec, lr, seed)
            if k in recorded:
                result = recorded[k]
            else:
                out_dir = os.path.join(out_root, f"w{width}_{steps}st_{spec.replace('@', '_at')}_lr{lr:g}_s{seed}")
                result = launcher.run(argv + ["--lr", f"{lr:g}", "--seed", str(seed)], out_dir)
                result = {"width": width, "steps_budget": steps, "norm": spec, "lr": lr, "seed": seed,
                          "tokens": steps * BATCH_TOKENS, **result}
                if result.get("params"):
                    result["tokens_per_param"] = round(result["tokens"] / result["params"], 2)
                with table_lock:
                    runs[k] = result
                write_tables()
            return val_loss_of(result)
        cell_seeds = seeds if steps in seed_steps else seeds[:1]
        best_lr_then_seeds(run, lrs.get(spec, lrs.get("*")), cell_seeds, args.extend)

    cells = [(w, s, spec) for s in budgets for w in widths
             for spec in specs + (largest_only if s == budgets[-1] else [])]
    for w, s, spec in cells:
        if spec not in lrs and "*" not in lrs:
            raise AnalysisError(f"--lrs gives no learning rates for {spec}; add {spec}=... or a default")
    old = {sig: signal.signal(sig, lambda *_: launcher.stop()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(cell, *c) for c in cells]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() for f in done):
                launcher.stop()  # the first failure stops the rest (children save)
            errors = [f.exception() for f in futures if f.exception() is not None]
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    summary = write_tables()
    failure = next((e for e in errors if not isinstance(e, tc.Interrupted)), None)
    if failure is not None:
        raise failure
    if errors:
        raise tc.Interrupted(f"stopped: {len(errors)} cells unfinished; the same command with "
                             "--reuse resumes them", 143)
    return summary


# ---------------------------------------------------------------------------------------------


def build_parser():
    parser = tc._Parser(description=__doc__.split("\n\n")[1], allow_abbrev=False,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=tc._Parser)
    p = sub.add_parser("budget", help="the gap to RMSNorm as the training data grows")
    p.add_argument("--data", default="data/pydocs", help="a prepared token directory (or 'default')")
    p.add_argument("--widths", default="64", help="model widths (multiples of 32)")
    p.add_argument("--steps", default="450,1800,7200", help=f"budgets in steps of {BATCH_TOKENS} tokens")
    p.add_argument("--norms", default="rms,dyt,derf", help="at every budget; NAME@R: output RMS R at "
                   "init (--norm_out_rms), NAME@gG: --dyt_gamma0 G")
    p.add_argument("--largest_only", default="rms@2.5", help="norms run at the largest budget only")
    p.add_argument("--lrs", default="rms=4e-3,8e-3,16e-3;*=1e-3,2e-3,4e-3",
                   help="the sweep at the first seed, per norm ('NAME=...;*=...') or for all")
    p.add_argument("--seeds", default="0,1,2", help="the first sweeps the lr")
    p.add_argument("--seed_steps", default="", help="budgets where every seed runs (default: the largest)")
    p.add_argument("--extend", type=int, default=2, help="runs allowed past an edge of the lr sweep")
    p.add_argument("--warmup_fraction", type=float, default=1 / 9, help="warmup steps / steps")
    p.add_argument("--ckpt_interval", type=int, default=500, help="steps between a run's checkpoints")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--train_args", default="", help="more train_gpt.py flags, quoted")
    p.add_argument("--out_dir", default=os.path.join("out_analysis", "budget"), help="run directories")
    p.add_argument("--results", default=os.path.join("out", "analysis"), help="tables and plot")
    p.add_argument("--tag", default="", help="name suffix for the output files")
    p.add_argument("--reuse", action="store_true", help="read back finished runs (their out_dir, "
                   "or the runs table in --results) and resume unfinished ones")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        raise AnalysisError("--jobs and --threads must be >= 1")
    tc.ensure_writable_dir(args.results, "--results")
    return {"budget": cmd_budget}[args.command](args)


if __name__ == "__main__":
    tc.main_guard(main)
