"""
This project's own studies of the small GPT (not the papers'): DyT and Derf against RMSNorm,
each norm at its own best learning rate, across widths and as the training data grows; and
why the papers' gamma 1 stalls there.

    python studies/gpt_norms.py norms --widths 64,128 --norms rms,dyt,derf    # best lr each, seeds
    python studies/gpt_norms.py budget --data data/pydocs --widths 64 --steps 450,1800,7200
    python studies/gpt_norms.py recipe --data data/pydocs --widths 64 --optimizers muon,adamw   # today's recipe
    python studies/gpt_norms.py saturation --norms dyt@g1,dyt,rms              # why gamma 1 stalls

norms and budget: for each cell (width, budget, norm) an lr sweep at the first seed, extended
by factors of 2 past an edge winner, then the other seeds at the best lr. budget's warmup is
--warmup_fraction of the steps (1/9: the default run's 50 of 450), then cosine to 10% of the
peak at the last step; it runs every seed only at the budgets --seed_steps names (elsewhere the
sweep alone). NAME@R is a norm with output RMS R at init (--norm_out_rms), NAME@gG one with
gamma0 G (--dyt_gamma0).

Every run is a train_gpt.py child process with its own out_dir under --out_dir, --jobs at a
time, checkpointing as it goes, so that a study spreads over sittings: with --reuse a finished
run is read back (from its out_dir, or from the runs table committed under --results) and an
unfinished one resumes from its checkpoint. SIGINT/SIGTERM stop a study cleanly: the running
children save, and the same command with --reuse resumes them. The runs table and the summary
are rewritten after every run, so what has finished is never lost.
"""

import argparse
import csv
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import checkpoint as ck  # noqa: E402
import train_common as tc  # noqa: E402
from analyze import (AnalysisError, floats, gpt_val_tokens, hooks_removed_after, load_model,  # noqa: E402
                     loss_and_accuracy, model_blocks, norm_layers, pyplot, save_figure,
                     squash_argument, write_table)
from dyt import NORMS  # noqa: E402

BATCH_TOKENS = 16 * 256  # the default run's global batch: 16 sequences of 256 tokens
DIVERGED = 3             # the child's exit code for a run stopped by its divergence guard

# The child: a trainer's main with its one-line errors, but a divergence (a result of the
# study, not a failure of it) told apart by its exit code.
CHILD = """
import sys
import train_common as tc, {trainer}
def main(argv):
    try:
        {trainer}.main(argv)
    except tc.TrainingDiverged as e:
        print(f"error: {{e}}", file=sys.stderr, flush=True)
        sys.exit({diverged})
tc.main_guard(main)
"""


def norm_spec(text):
    """A norm and its init, NAME[@INIT...]: 'dyt' -> ('dyt', []) (the default); '@R' sets the
    output RMS at init to R (--norm_out_rms: DyT's gamma set for it, a norm's weight); '@gG'
    gamma0 G (--dyt_gamma0; @g1 is the papers'); '@aA' alpha0 A for every DyT-like layer
    (--alpha0_attn and --alpha0_other). 'dyt@a2@1' combines them."""
    name, *inits = text.split("@")
    if name not in NORMS:
        raise AnalysisError(f"unknown norm {name!r} in {text!r}; choose from {', '.join(NORMS)}")
    flags = []
    for init in inits:
        value = init[1:] if init[:1] in ("g", "a") else init
        floats(value, f"the init of {text!r} (NAME@R: output RMS R at init; NAME@gG: gamma0 G; "
                      "NAME@aA: alpha0 A)")
        if init.startswith("g"):
            flags += ["--dyt_gamma0", value]
        elif init.startswith("a"):
            flags += ["--alpha0_attn", value, "--alpha0_other", value]
        else:
            flags += ["--norm_out_rms", value]
    return name, flags


def width_flags(width):
    """The default GPT (4 layers, head dim 32) at another width."""
    if width % 32:
        raise AnalysisError(f"--widths: {width} is not a multiple of the head dim 32")
    heads = str(width // 32)
    return ["--dim", str(width), "--n_head", heads, "--n_kv_head", heads]


def listed(text):
    return [s.strip() for s in text.split(",") if s.strip()]


def seeds_of(text):
    try:
        seeds = [int(s) for s in listed(text)]
    except ValueError:
        raise AnalysisError(f"--seeds takes comma-separated integers, got {text!r}") from None
    if not seeds:
        raise AnalysisError("--seeds needs at least one seed")
    return seeds


# ---------------------------------------------------------------------------------------------
# Runs: child processes, at most --jobs at a time, resumable


class Launcher:
    """Runs trainer children (train_gpt.py or train_vit.py), at most `jobs` at once with
    OMP_NUM_THREADS=threads each.

    run(argv, out_dir) returns the run's result (read_result): status ("ok" or "diverged:
    ..."), steps, the final evaluation, parameters, speed. With reuse, a run whose result.json exists is
    read back and one with a checkpoint resumes; without it a run starts over. stop()
    (SIGINT/SIGTERM, or a failure elsewhere) sends each running child one SIGTERM: it
    checkpoints and exits, and run() raises tc.Interrupted."""

    def __init__(self, jobs=1, threads=1, reuse=False, trainer="train_gpt"):
        self.jobs, self.threads, self.reuse = jobs, threads, reuse
        self.child = CHILD.format(trainer=trainer, diverged=DIVERGED)
        self.slots = threading.Semaphore(jobs)
        self.children, self.signaled, self.lock, self.stopping = set(), set(), threading.Lock(), False

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
            cmd = [sys.executable, "-c", self.child, *argv, "--out_dir", out_dir] + (["--resume"] if resume else [])
            env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "PYTHONWARNINGS": "ignore"}
            print(f"--- {'resume' if resume else 'start'} {out_dir}", flush=True)
            with open(os.path.join(out_dir, "train.log"), "a") as log:
                # its own session: a Ctrl-C at the terminal reaches the child once, from stop()
                child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
                with self.lock:
                    self.children.add(child)
                rc = child.wait()
                with self.lock:
                    self.children.discard(child)
                    self.signaled.discard(child)
        last = _last_error(os.path.join(out_dir, "train.log"))
        if rc in (130, 143) or (self.stopping and rc in (-signal.SIGINT, -signal.SIGTERM)):
            raise tc.Interrupted(f"{out_dir} stopped; it resumes from its checkpoint", rc)
        if rc not in (0, DIVERGED):
            raise AnalysisError(f"the run in {out_dir} failed (exit {rc}): {last or 'see its train.log'}")
        result = read_result(out_dir, "ok" if rc == 0 else "diverged: " + last.removeprefix("error: "))
        with open(marker + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(marker + ".tmp", marker)
        return result

    def stop(self):
        """One SIGTERM per child, however often stop() is called (a signal, then each cell's
        Interrupted): a child's second signal would kill it at once, mid-save."""
        self.stopping = True
        with self.lock:
            for child in self.children - self.signaled:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
                    self.signaled.add(child)


def _last_error(log_path):
    with open(log_path, errors="replace") as f:
        lines = [line.strip() for line in f if line.startswith("error:")]
    return lines[-1] if lines else ""


def read_result(out_dir, status):
    """A finished run's result from its metrics.jsonl and checkpoint: the last train loss and
    the last evaluation (a GPT's val loss and bits per byte; a ViT's test top-1, top-5, loss)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    train = [r for r in log if "loss" in r]
    result = {"status": status, "steps": train[-1]["step"] if train else 0,
              "train_loss": train[-1]["loss"] if train else math.nan}
    for keys in (("val_loss", "val_bpb"), ("test_top1", "test_top5", "test_loss")):
        evals = [r for r in log if keys[0] in r]
        if status == "ok" and evals:
            result.update({k: evals[-1][k] for k in keys})
    for speed in ("tokens_per_s", "images_per_s"):
        speeds = [r[speed] for r in train if speed in r]
        if speeds:
            result[speed] = round(float(np.median(speeds)))
    ckpt = os.path.join(out_dir, "ckpt.pt")
    if os.path.isfile(ckpt):
        result["params"] = sum(v.numel() for v in ck.load_checkpoint(ckpt)["model"].values())
    return result


def val_loss_of(result):
    return result.get("val_loss", math.inf) if result["status"] == "ok" else math.inf


# ---------------------------------------------------------------------------------------------
# A study: cells of lr sweeps over runs, their runs table and its summary


def best_lr_then_seeds(run, lrs, seeds, extend):
    """run(lr, seed) -> val loss (inf unless ok). The lr sweep at seeds[0], extended by
    factors of 2 past an edge winner (at most `extend` more runs: a best lr at the edge is not
    known to be the best), then the other seeds at the best lr."""
    sweep = {lr: run(lr, seeds[0]) for lr in lrs}
    for _ in range(extend):
        best = min(sweep, key=sweep.get)
        if min(sweep) < best < max(sweep) or len(sweep) < 2:
            break
        lr = best * 2 if best == max(sweep) else best / 2
        sweep[lr] = run(lr, seeds[0])
    best = min(sweep, key=sweep.get)
    for seed in seeds[1:]:
        run(best, seed)


def cell_summary(runs, seeds):
    """One cell's runs -> its best lr (of the sweep at seeds[0]), the sweep, and the mean and
    sample std of the val loss over the seeds run at that lr; None before the sweep has a run."""
    sweep = {r["lr"]: val_loss_of(r) for r in runs if r["seed"] == seeds[0]}
    if not sweep:
        return None
    best = min(sweep, key=sweep.get)
    at_best = [val_loss_of(r) for r in runs if r["lr"] == best and r["seed"] in seeds]
    ok = [v for v in at_best if math.isfinite(v)]
    return {"best_lr": best,
            "swept (lr: val loss at seed %d)" % seeds[0]: " ".join(f"{lr:g}:{sweep[lr]:.4f}" for lr in sorted(sweep)),
            "seeds": len(at_best), "diverged": len(at_best) - len(ok),
            "val_loss_mean": round(float(np.mean(ok)), 4) if ok else math.nan,
            "val_loss_std": round(float(np.std(ok, ddof=1)), 4) if len(ok) > 1 else 0.0}


def recorded_runs(path_stem, title, key):
    """The runs of a committed runs table (NAME.csv), keyed by key(row), if its NAME.md was
    written under the same title (budget, data, train args: another setup's runs are not these).
    Run directories are scratch that a fresh checkout lacks; the table is committed, so a later
    session or machine can add seeds or lrs to a study without retraining what it holds."""
    md, table = f"{path_stem}.md", f"{path_stem}.csv"
    if not (os.path.isfile(md) and os.path.isfile(table)):
        return {}
    with open(md) as f:
        if f.readline().rstrip("\n") != f"## {title}":
            print(f"note: {table} was recorded under another setup; its runs are not reused")
            return {}
    with open(table, newline="") as f:
        rows = [{k: _number(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    return {key(r): r for r in rows}


def _number(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class Study:
    """The runs of one study, by key (`keys`: the fields that name a run): those recorded in
    its committed runs table (with --reuse) and those made now. After every run the runs table
    (every run, also those this call did not ask for: none already paid for is lost) and
    summarize(runs) are written."""

    def __init__(self, args, name, title, keys, summarize, trainer="train_gpt", score=None):
        self.results, self.name, self.title, self.keys = args.results, name, title, keys
        self.summarize, self.score = summarize, score or val_loss_of
        key = lambda r: tuple(r[k] for k in keys)
        self.recorded = recorded_runs(os.path.join(args.results, f"{name}_runs"), title, key) if args.reuse else {}
        self.runs, self.lock = dict(self.recorded), threading.Lock()
        self.launcher = Launcher(args.jobs, args.threads, args.reuse, trainer)

    def run(self, fields, argv, out_dir):
        """The score (lower is better; val loss by default, inf unless ok) of the run named by
        `fields`: recorded, or trained."""
        key = tuple(fields[k] for k in self.keys)
        result = self.recorded.get(key)
        if result is None:
            result = {**fields, **self.launcher.run(argv, out_dir)}
            if "tokens" in result and result.get("params"):
                result["tokens_per_param"] = round(result["tokens"] / result["params"], 2)
            with self.lock:
                self.runs[key] = result
            self.write()
        return self.score(result)

    def write(self):
        with self.lock:
            rows = [self.runs[k] for k in sorted(self.runs)]
            write_table(rows, self.results, f"{self.name}_runs", self.title, quiet=True)
            return self.summarize(rows)

    def go(self, cells):
        """Run every cell (a callable that runs its runs one after another), --jobs cells at a
        time. SIGINT/SIGTERM make the children save and the study stop; a failure in one cell
        stops the others the same way. Returns the summary of every run."""
        handlers = {sig: signal.signal(sig, lambda *_: self.launcher.stop())
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            with ThreadPoolExecutor(max_workers=self.launcher.jobs) as pool:
                futures = [pool.submit(cell) for cell in cells]
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                if any(f.exception() for f in done):
                    self.launcher.stop()
                errors = [f.exception() for f in futures if f.exception() is not None]
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        summary = self.write()
        failure = next((e for e in errors if not isinstance(e, tc.Interrupted)), None)
        if failure is not None:
            raise failure
        if errors:
            raise tc.Interrupted(f"stopped: {len(errors)} cells unfinished; the same command with "
                                 "--reuse resumes them", 143)
        return summary


# ---------------------------------------------------------------------------------------------
# norms: each norm at its own best lr, per width (the default run's budget)


def cmd_norms(args):
    """For each width and norm: an lr sweep at the first seed, then the other seeds at the
    best lr. Each norm is compared at its own best lr: the fair comparison. --preset runs a
    train_gpt.py preset (its shape, steps and batch) instead of the default run at --widths."""
    import train_gpt
    if args.preset and args.widths:
        raise AnalysisError("--preset sets the width (its --dim); drop --widths")
    if args.preset and args.preset not in train_gpt.PRESETS:
        raise AnalysisError(f"--preset {args.preset!r}: choose one of {', '.join(train_gpt.PRESETS)}")
    widths = ([train_gpt.PRESETS[args.preset].get("dim", train_gpt.GPTTrainConfig().model.dim)]
              if args.preset else [int(w) for w in floats(args.widths or "128", "--widths")])
    specs = listed(args.norms)
    for s in specs:
        norm_spec(s)
    lrs, seeds = floats(args.lrs, "--lrs"), seeds_of(args.seeds)
    budget = f"--max_steps {args.steps}" if args.steps else (
        "the preset's steps" if args.preset else "the default 450 steps")
    budget = f"--preset {args.preset}, {budget}" if args.preset else budget
    name = f"norms_gpt{args.tag}"
    out_root = os.path.abspath(args.out_dir)

    def summarize(runs):
        rows = []
        for width in widths:
            for spec in specs:
                row = cell_summary([r for r in runs if (r["width"], r["norm"]) == (width, spec)], seeds)
                if row is not None:
                    rows.append({"width": width, "norm": spec, **row})
        write_table(rows, args.results, name,
                    f"GPT val loss (nats, mean and sample std over seeds {args.seeds}) per width and "
                    f"norm, each at its own best lr from the sweep {args.lrs} at seed {seeds[0]}; "
                    f"{budget} {args.train_args}; NAME@R means --norm_out_rms R, NAME@gG --dyt_gamma0 G",
                    quiet=True)
        return rows

    study = Study(args, name, f"Every run of `studies/gpt_norms.py norms` ({budget} {args.train_args}): "
                  "val loss (nats)", ("width", "norm", "lr", "seed"), summarize)

    def cell(width, spec):
        norm, init_flags = norm_spec(spec)
        shape = ["--preset", args.preset] if args.preset else width_flags(width)
        argv = (["--norm", norm] + init_flags + shape + ["--sample_tokens", "0", "--device", args.device]
                + (["--max_steps", str(args.steps)] if args.steps else []) + shlex.split(args.train_args))

        def run(lr, seed):
            tag = (f"{args.preset or 'w' + str(width)}_{spec.replace('@', '_at')}_lr{lr:g}_s{seed}"
                   f"{'_' + str(args.steps) if args.steps else ''}")
            return study.run({"width": width, "norm": spec, "lr": lr, "seed": seed},
                             argv + ["--lr", f"{lr:g}", "--seed", str(seed)], os.path.join(out_root, tag))
        return lambda: best_lr_then_seeds(run, lrs, seeds, args.extend)

    rows = study.go([cell(w, spec) for w in widths for spec in specs])
    print(open(os.path.join(args.results, f"{name}.md")).read(), flush=True)
    plt = pyplot()
    if plt is not None and len(widths) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for spec in specs:
            r = [row for row in rows if row["norm"] == spec]
            ax.errorbar([x["width"] for x in r], [x["val_loss_mean"] for x in r],
                        yerr=[x["val_loss_std"] for x in r], marker="o", capsize=3, label=spec)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("width")
        ax.set_ylabel("val loss (nats), best lr")
        ax.legend(fontsize=8)
        ax.set_title("GPT: each norm at its best lr", fontsize=10)
        save_figure(fig, args.results, name)
    return rows


# ---------------------------------------------------------------------------------------------
# budget: the gap to RMSNorm as the training data grows


def parse_lrs(text):
    """'1e-3,2e-3,4e-3' (every norm) or 'rms=4e-3,8e-3;dyt=1e-3,2e-3' (per norm spec, '*' the
    rest) -> {spec or '*': [lr, ...]}."""
    out = {}
    for item in text.replace(" ", ";").split(";"):
        if item.strip():
            name, _, values = item.rpartition("=")
            out[name.strip() or "*"] = floats(values, "--lrs")
    return out


def budget_rows(runs, seeds):
    """One row per (width, steps, norm): the cell's summary, its tokens per parameter, and the
    gap to RMSNorm's mean with the standard error of that difference of means."""
    cells = {}
    for r in runs:
        cells.setdefault((r["width"], r["steps_budget"], r["norm"]), []).append(r)
    rows = []
    for (width, steps, spec), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        summary = cell_summary(rs, seeds)
        if summary is None:
            continue
        params = [r["params"] for r in rs if r.get("params")]
        rows.append({"width": width, "steps": steps, "tokens": steps * BATCH_TOKENS,
                     "tokens_per_param": round(steps * BATCH_TOKENS / params[0], 2) if params else "",
                     "norm": spec, **summary})
    base = {(r["width"], r["steps"]): r for r in rows if r["norm"] == "rms"}
    for r in rows:
        b = base.get((r["width"], r["steps"]))
        if b is None or r is b:
            continue
        r["gap_to_rms"] = round(r["val_loss_mean"] - b["val_loss_mean"], 4)
        if r["seeds"] > 1 and b["seeds"] > 1:
            r["gap_se"] = round(math.sqrt(r["val_loss_std"] ** 2 / r["seeds"] +
                                          b["val_loss_std"] ** 2 / b["seeds"]), 4)
    return rows


def plot_gaps(rows, results, name):
    lines = sorted({(r["width"], r["norm"]) for r in rows if "gap_to_rms" in r})
    plt = pyplot()
    if plt is None or not lines:
        return
    # one colour per norm and one marker per width, so a norm reads across widths
    color = {s: f"C{i}" for i, s in enumerate(sorted({s for _, s in lines}))}
    marker = {w: "osD^v"[i % 5] for i, w in enumerate(sorted({w for w, _ in lines}))}
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for width, spec in lines:
        pts = sorted((r["tokens_per_param"], r["gap_to_rms"], r.get("gap_se", 0.0))
                     for r in rows if (r["width"], r["norm"]) == (width, spec) and "gap_to_rms" in r)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    color=color[spec], marker=marker[width], capsize=3,
                    label=f"{spec} - rms, width {width}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens per parameter")
    ax.set_ylabel("val loss gap to RMSNorm (nats)")
    ax.legend(fontsize=8)
    ax.set_title("Small GPT: the gap to RMSNorm as the data grows (each at its best lr;\n"
                 "error bars: standard error of the difference, where seeds ran)", fontsize=9)
    save_figure(fig, results, name, quiet=True)


def cmd_budget(args):
    data = os.path.abspath(args.data) if args.data != "default" else "default"
    if data != "default" and not os.path.isfile(os.path.join(data, "meta.json")):
        raise AnalysisError(f"--data {args.data} is not a prepared directory; prepare it first: "
                            f"python prepare_data.py prepare --input /usr/share/doc/python3.11/html/_sources "
                            f"--encoding byte --out {args.data}")
    widths = [int(w) for w in floats(args.widths, "--widths")]
    budgets = sorted(int(s) for s in floats(args.steps, "--steps"))
    for s in budgets:
        warmup = round(s * args.warmup_fraction)
        if not 1 <= warmup < s:
            raise AnalysisError(f"--steps {s} is too short for a warmup of {args.warmup_fraction:.4g} "
                                f"of the run ({warmup} steps): the warmup needs at least one step and "
                                "fewer than the run's; give more --steps or another --warmup_fraction")
    specs, largest_only = listed(args.norms), listed(args.largest_only)
    for s in specs + largest_only:
        norm_spec(s)
    lrs, seeds = parse_lrs(args.lrs), seeds_of(args.seeds)
    seed_steps = {int(s) for s in floats(args.seed_steps, "--seed_steps")} if args.seed_steps else {budgets[-1]}
    cells = [(w, s, spec) for s in budgets for w in widths
             for spec in specs + (largest_only if s == budgets[-1] else [])]
    for _, _, spec in cells:
        if spec not in lrs and "*" not in lrs:
            raise AnalysisError(f"--lrs gives no learning rates for {spec}; add {spec}=... or a default")
    name = f"budget_gpt{args.tag}"
    out_root = os.path.abspath(args.out_dir)

    def summarize(runs):
        rows = budget_rows(runs, seeds)
        write_table(rows, args.results, name,
                    f"Small GPT by norm as the data grows: val loss (nats) on {args.data}'s validation "
                    f"split, mean and sample std over seeds {args.seeds} at each norm's best lr (swept "
                    f"at seed {seeds[0]}); gap_to_rms with the standard error of the difference", quiet=True)
        plot_gaps(rows, args.results, name)
        return rows

    study = Study(args, name, f"Every run of `studies/gpt_norms.py budget` (data {args.data}, batch "
                  f"{BATCH_TOKENS} tokens, warmup {args.warmup_fraction:.4g} of the steps {args.train_args}): "
                  "val loss (nats)", ("width", "steps_budget", "norm", "lr", "seed"), summarize)

    def cell(width, steps, spec):
        norm, init_flags = norm_spec(spec)
        argv = (["--norm", norm] + init_flags + width_flags(width) +
                ["--data", data, "--max_steps", str(steps), "--warmup_steps", str(round(steps * args.warmup_fraction)),
                 "--eval_interval", "0", "--eval_tokens", str(10 ** 9), "--ckpt_interval", str(args.ckpt_interval),
                 "--sample_tokens", "0", "--device", args.device] + shlex.split(args.train_args))

        def run(lr, seed):
            fields = {"width": width, "steps_budget": steps, "norm": spec, "lr": lr, "seed": seed,
                      "tokens": steps * BATCH_TOKENS}
            out_dir = os.path.join(out_root, f"w{width}_{steps}st_{spec.replace('@', '_at')}_lr{lr:g}_s{seed}")
            return study.run(fields, argv + ["--lr", f"{lr:g}", "--seed", str(seed)], out_dir)
        cell_seeds = seeds if steps in seed_steps else seeds[:1]
        return lambda: best_lr_then_seeds(run, lrs.get(spec, lrs.get("*")), cell_seeds, args.extend)

    return study.go([cell(*c) for c in cells])


# ---------------------------------------------------------------------------------------------
# recipe: the budget study under today's small-LM recipe (Muon or AdamW, warmup-stable-decay),
# every budget of one (norm, lr, seed) branched from one long run


def branch_plan(budgets, decay_fraction):
    """{budget: (decay steps, branch step)}: each budget decays over its last decay_fraction;
    a shorter one branches from the longest run's checkpoint at its decay's start."""
    return {n: (round(decay_fraction * n), n - round(decay_fraction * n)) for n in budgets}


def recipe_rows(runs, seeds):
    """One row per (width, optimizer, steps, norm): the cell's summary (best lr at seed 0, mean
    and std over the seeds there) and the gap to RMSNorm under the same optimizer with its SE."""
    cells = {}
    for r in runs:
        cells.setdefault((r["width"], r["optimizer"], r["steps_budget"], r["norm"]), []).append(r)
    rows = []
    for (width, opt, steps, spec), rs in sorted(cells.items(), key=lambda kv: kv[0][:3]):
        summary = cell_summary(rs, seeds)
        if summary is None:
            continue
        params = [r["params"] for r in rs if r.get("params")]
        rows.append({"width": width, "optimizer": opt, "schedule": "wsd", "steps": steps,
                     "tokens_per_param": round(steps * BATCH_TOKENS / params[0], 2) if params else "",
                     "norm": spec, **summary})
    base = {(r["width"], r["optimizer"], r["steps"]): r for r in rows if r["norm"] == "rms"}
    for r in rows:
        b = base.get((r["width"], r["optimizer"], r["steps"]))
        if b is None or r is b:
            continue
        r["gap_to_rms"] = round(r["val_loss_mean"] - b["val_loss_mean"], 4)
        if r["seeds"] > 1 and b["seeds"] > 1:
            r["gap_se"] = round(math.sqrt(r["val_loss_std"] ** 2 / r["seeds"] + b["val_loss_std"] ** 2 / b["seeds"]), 4)
    return rows


def cmd_recipe(args):
    """For each (width, optimizer, norm) and lr: one warmup-stable-decay run at the largest
    budget that keeps its stable-phase checkpoints, and a branch from each into every smaller
    budget's decay (bit for bit that budget's run from scratch). The lr sweep at the first
    seed is extended past an edge winner at any budget; the other seeds run (long run and
    branches) at each budget's best lr."""
    data = os.path.abspath(args.data) if args.data != "default" else "default"
    if data != "default" and not os.path.isfile(os.path.join(data, "meta.json")):
        raise AnalysisError(f"--data {args.data} is not a prepared directory; prepare it first: "
                            f"python prepare_data.py prepare --input /usr/share/doc/python3.11/html/_sources "
                            f"--encoding byte --out {args.data}")
    widths = [int(w) for w in floats(args.widths, "--widths")]
    budgets = sorted(int(s) for s in floats(args.steps, "--steps"))
    plan = branch_plan(budgets, args.decay_fraction)
    warmup = round(budgets[0] * args.warmup_fraction)
    if not 1 <= warmup <= plan[budgets[0]][1]:
        raise AnalysisError(f"the warmup ({warmup} steps, --warmup_fraction of the smallest budget) must end "
                            f"before its decay (step {plan[budgets[0]][1]}); lower --warmup_fraction or --decay_fraction")
    optimizers = listed(args.optimizers)
    for o in optimizers:
        if o not in ("adamw", "muon"):
            raise AnalysisError(f"--optimizers: {o!r} is not adamw or muon")
    specs = listed(args.norms)
    for spec in specs:
        norm_spec(spec)
    lrs, seeds = parse_lrs(args.lrs), seeds_of(args.seeds)
    for o in optimizers:
        for spec in specs:
            if not any(k in lrs for k in (f"{o}:{spec}", f"{o}:*", spec, "*")):
                raise AnalysisError(f"--lrs gives no learning rates for {o}:{spec}; add {o}:{spec}=... or a default")
    name = f"recipe_gpt{args.tag}"
    out_root = os.path.abspath(args.out_dir)

    def summarize(runs):
        rows = recipe_rows(runs, seeds)
        write_table(rows, args.results, name,
                    f"Small GPT by norm under Muon or AdamW with warmup-stable-decay: val loss (nats) on "
                    f"{args.data}'s validation split, mean and sample std over seeds {args.seeds} at each "
                    f"budget's best lr (swept at seed {seeds[0]}); gap_to_rms under the same optimizer", quiet=True)
        return rows

    study = Study(args, name, f"Every run of `studies/gpt_norms.py recipe` (data {args.data}, batch {BATCH_TOKENS} "
                  f"tokens, warmup {warmup} steps, decay over the last {args.decay_fraction:g} of each budget, "
                  f"branched from the longest run {args.train_args}): val loss (nats); lr is the optimizer's --lr "
                  f"(Muon: --muon_lr, AdamW on the rest at --adamw_lr)",
                  ("width", "optimizer", "steps_budget", "norm", "lr", "seed"), summarize)

    def cell(width, opt, spec):
        norm, init_flags = norm_spec(spec)
        sweep_lrs = next(lrs[k] for k in (f"{opt}:{spec}", f"{opt}:*", spec, "*") if k in lrs)
        base = (["--norm", norm] + init_flags + width_flags(width) +
                ["--data", data, "--optimizer", opt, "--schedule", "wsd", "--warmup_steps", str(warmup),
                 "--eval_interval", "0", "--eval_tokens", str(10 ** 9), "--ckpt_interval", str(args.ckpt_interval),
                 "--sample_tokens", "0", "--device", args.device] + shlex.split(args.train_args))

        def lr_flags(lr):
            return (["--muon_lr", f"{lr:g}", "--lr", f"{args.adamw_lr:g}"] if opt == "muon" else ["--lr", f"{lr:g}"])

        def runs_at(lr, seed):
            """The long run, then a branch per shorter budget: {budget: val loss}."""
            tag = f"w{width}_{opt}_wsd_{spec.replace('@', '_at')}_lr{lr:g}_s{seed}"
            fields = lambda n: {"width": width, "optimizer": opt, "schedule": "wsd", "steps_budget": n,
                                "norm": spec, "lr": lr, "seed": seed, "tokens": n * BATCH_TOKENS}
            longest = budgets[-1]
            long_dir = os.path.join(out_root, f"{tag}_{longest}st")
            keep = ",".join(str(plan[n][1]) for n in budgets[:-1])
            out = {longest: study.run({**fields(longest), "branched_from": ""},
                                      base + lr_flags(lr) + ["--seed", str(seed), "--max_steps", str(longest),
                                                             "--decay_steps", str(plan[longest][0])]
                                      + (["--keep_ckpts", keep] if keep else []), long_dir)}
            for n in budgets[:-1]:
                kept = os.path.join(long_dir, f"ckpt_step{plan[n][1]}.pt")
                out[n] = study.run({**fields(n), "branched_from": f"{os.path.basename(long_dir)} step {plan[n][1]}"},
                                   base + lr_flags(lr) + ["--seed", str(seed), "--max_steps", str(n), "--decay_steps",
                                                          str(plan[n][0]), "--branch_from", kept],
                                   os.path.join(out_root, f"{tag}_{n}st"))
            return out

        def go():
            sweep = {lr: runs_at(lr, seeds[0]) for lr in sweep_lrs}
            for _ in range(args.extend):  # an edge winner at any budget is not known to be the best
                best = {n: min(sweep, key=lambda lr: sweep[lr][n]) for n in budgets}
                edges = {lr for lr in best.values() if lr in (min(sweep), max(sweep))}
                if not edges or len(sweep) < 2:
                    break
                for lr in edges:
                    new = lr * 2 if lr == max(sweep) else lr / 2
                    sweep[new] = runs_at(new, seeds[0])
            for lr in sorted({min(sweep, key=lambda lr: sweep[lr][n]) for n in budgets}):
                for seed in seeds[1:]:
                    runs_at(lr, seed)
        return go

    return study.go([cell(w, o, spec) for w in widths for o in optimizers for spec in specs])


# ---------------------------------------------------------------------------------------------
# saturation: why gamma 1 stalls (a trace over the first steps of the default run)


def residual_and_saturation(model, x, y):
    """One forward of a GPT on (x, y): its loss; per block the residual stream's RMS and the
    share of its energy in one token-independent vector (|mean over tokens|^2 / mean |x_t|^2:
    1 when every token carries the same vector); per DyT-like layer the fraction of
    inputs whose squash argument |alpha x + s| exceeds 2 (tanh 0.96, erf 0.995: saturated)."""
    stats = {}
    with hooks_removed_after() as handles, torch.no_grad():
        for name, block in model_blocks(model):
            def block_hook(module, inputs, output, name=name):
                h = output.float().reshape(-1, output.shape[-1])
                stats[f"{name} residual_rms"] = h.pow(2).mean().sqrt().item()
                stats[f"{name} common_share"] = (h.mean(0).pow(2).sum() / h.pow(2).sum(-1).mean()).item()
            handles.append(block.register_forward_hook(block_hook))
        for layer in norm_layers(model):
            if layer.kind != "dyt":
                continue
            def sat_hook(module, inputs, output, name=layer.name):
                z = squash_argument(module, inputs[0].float())
                stats[f"{name} saturated"] = (z.abs() > 2).float().mean().item()
            handles.append(layer.module.register_forward_hook(sat_hook))
        loss, _ = loss_and_accuracy(model, "gpt", x, y)
    return loss, stats


def cmd_saturation(args):
    """Train each configuration with the trainer itself, stopping at each step of --at
    (--stop_at, then --resume: exact), and measure the checkpoint on validation windows."""
    import train_gpt
    at = sorted({int(s) for s in floats(args.at, "--at")})
    specs = listed(args.norms)
    rows, curves = [], {}
    for spec in specs:
        name, gamma_flags = norm_spec(spec)
        out = os.path.join(args.out_dir, f"saturation_{spec.replace('@', '_at')}_s{args.seed}")
        for stale in ("metrics.jsonl", "ckpt.pt"):
            if os.path.exists(os.path.join(out, stale)):
                os.remove(os.path.join(out, stale))
        for i, step in enumerate(at):
            print(f"--- {spec}: train to step {step}", flush=True)
            argv = (["--norm", name] + gamma_flags + ["--stop_at", str(step), "--seed", str(args.seed),
                     "--sample_tokens", "0", "--ckpt_interval", "0", "--device", args.device,
                     "--out_dir", out] + (["--resume"] if i else []) + shlex.split(args.train_args))
            train_gpt.main(argv)
            model, _, state = load_model(out)
            if state["step"] != step:
                raise AnalysisError(f"{spec}: the run ended at step {state['step']}, before "
                                    f"--at {step}; give --at steps within the run's max_steps")
            x, y = gpt_val_tokens(state, args.n)
            loss, stats = residual_and_saturation(model, x, y)
            sat_inside = [v for k, v in stats.items() if k.endswith("saturated") and k.startswith("blocks")]
            sat_final = [v for k, v in stats.items() if k.endswith("saturated") and not k.startswith("blocks")]
            last = [k for k in stats if k.endswith("residual_rms")][-1].split()[0]
            rows.append({"norm": spec, "step": step, "val_loss": round(loss, 4),
                         "residual_rms_last_block": round(stats[f"{last} residual_rms"], 3),
                         "common_share_last_block": round(stats[f"{last} common_share"], 3),
                         "saturated_in_blocks": round(float(np.mean(sat_inside)), 3) if sat_inside else "",
                         "saturated_final": round(sat_final[0], 3) if sat_final else ""})
            curves.setdefault(spec, []).append((step, loss, stats))
    name = f"saturation_gpt{args.tag}"
    write_table(rows, args.results, name,
                f"GPT training trace, `studies/gpt_norms.py saturation --norms {args.norms} --at {args.at}` "
                f"{args.train_args}: val loss on {args.n} windows, the last block's residual RMS "
                "and share of one token-independent vector, fraction of DyT inputs with "
                "|alpha x + s| > 2 (mean over the blocks' layers; the final layer)")
    per_layer = [{"norm": spec, "step": step, "quantity": k, "value": round(v, 4)}
                 for spec, points in curves.items() for step, _, stats in points
                 for k, v in stats.items()]
    write_table(per_layer, args.results, f"{name}_layers", "Per-layer values of " + name)
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for spec, points in curves.items():
            steps = [p[0] for p in points]
            axes[0].plot(steps, [p[1] for p in points], "o-", label=spec)
            last = [k for k in points[0][2] if k.endswith("residual_rms")][-1]
            axes[1].plot(steps, [p[2][last] for p in points], "o-", label=spec)
            sat = [np.mean([v for k, v in p[2].items() if k.endswith("saturated")] or [np.nan])
                   for p in points]
            if not all(np.isnan(sat)):
                axes[2].plot(steps, sat, "o-", label=spec)
        axes[0].set_ylabel("val loss (nats)")
        axes[1].set_ylabel("residual RMS after the last block")
        axes[1].set_yscale("log")
        axes[2].set_ylabel("saturated DyT inputs (|arg| > 2)")
        for ax in axes:
            ax.set_xlabel("step")
            ax.legend(fontsize=8)
        fig.suptitle("GPT: why gamma 1 stalls at width 128 (this project's measurement)", fontsize=10)
        save_figure(fig, args.results, name)
    return rows


# ---------------------------------------------------------------------------------------------


def build_parser():
    parser = tc._Parser(description=__doc__.split("\n\n")[1],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=tc._Parser)

    def common(p, out_dir, runs=True):
        p.add_argument("--norms", default="rms,dyt,derf", help="norm names; NAME@R: output RMS R at "
                       "init (--norm_out_rms), NAME@gG: --dyt_gamma0 G, NAME@aA: alpha0 A")
        p.add_argument("--train_args", default="", help="more train_gpt.py flags, quoted")
        p.add_argument("--device", default="cpu")
        p.add_argument("--out_dir", default=os.path.join("out_analysis", out_dir), help="run directories")
        p.add_argument("--results", default=os.path.join("out", "analysis"), help="tables and plots "
                       "(the committed ones: results/analysis)")
        p.add_argument("--tag", default="", help="name suffix for the output files")
        if runs:
            p.add_argument("--seeds", default="0,1,2", help="the first sweeps the lr")
            p.add_argument("--extend", type=int, default=2, help="runs allowed past an edge of the lr sweep")
            p.add_argument("--jobs", type=int, default=1, help="runs at a time")
            p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
            p.add_argument("--reuse", action="store_true", help="read back finished runs (their "
                           "out_dir, or the runs table in --results) and resume unfinished ones")
        return p

    p = common(sub.add_parser("norms", help="each norm at its own best lr, per width, seeds"), "sweeps")
    p.add_argument("--widths", default="", help="model widths (multiples of 32; default 128)")
    p.add_argument("--preset", default="", help="a train_gpt.py preset (e.g. micro) in place of "
                   "--widths; on a GPU add --device cuda")
    p.add_argument("--lrs", default="1e-3,2e-3,4e-3", help="the lr sweep (at the first seed)")
    p.add_argument("--steps", type=int, default=0, help="budget in steps (--max_steps)")

    p = common(sub.add_parser("budget", help="the gap to RMSNorm as the training data grows"), "budget")
    p.add_argument("--data", default="data/pydocs", help="a prepared token directory (or 'default')")
    p.add_argument("--widths", default="64", help="model widths (multiples of 32)")
    p.add_argument("--steps", default="450,1800,7200", help=f"budgets in steps of {BATCH_TOKENS} tokens")
    p.add_argument("--largest_only", default="rms@2.5,dyt@a2,dyt@1",
                   help="norms run at the largest budget only (the control and the remedies)")
    p.add_argument("--lrs", default="rms=4e-3,8e-3,16e-3;*=1e-3,2e-3,4e-3",
                   help="the sweep at the first seed, per norm ('NAME=...;*=...') or for all")
    p.add_argument("--seed_steps", default="", help="budgets where every seed runs (default: the largest)")
    p.add_argument("--warmup_fraction", type=float, default=1 / 9, help="warmup steps / steps")
    p.add_argument("--ckpt_interval", type=int, default=500, help="steps between a run's checkpoints")

    p = common(sub.add_parser("recipe", help="the budget study under Muon/AdamW and warmup-stable-decay, "
                              "shorter budgets branched from one long run"), "recipe")
    p.set_defaults(norms="rms,dyt,derf,derf@a0.3")
    p.add_argument("--data", default="data/pydocs", help="a prepared token directory (or 'default')")
    p.add_argument("--widths", default="64", help="model widths (multiples of 32)")
    p.add_argument("--steps", default="450,1800,7200", help=f"budgets in steps of {BATCH_TOKENS} tokens")
    p.add_argument("--optimizers", default="muon,adamw")
    p.add_argument("--lrs", default="muon:*=0.01,0.02,0.04;adamw:rms=4e-3,8e-3,16e-3;adamw:*=1e-3,2e-3,4e-3",
                   help="the sweep at the first seed: OPT:NORM=... (Muon's --muon_lr; AdamW's --lr)")
    p.add_argument("--adamw_lr", type=float, default=4e-3, help="under Muon: the AdamW lr of the embedding, "
                   "head and 1-d parameters (this study's AdamW budget winners: 2e-3 to 8e-3)")
    p.add_argument("--decay_fraction", type=float, default=0.2, help="each budget's decay share (nanochat's 0.2)")
    p.add_argument("--warmup_fraction", type=float, default=1 / 9, help="warmup steps / the smallest budget")
    p.add_argument("--ckpt_interval", type=int, default=500, help="steps between a run's checkpoints")

    p = common(sub.add_parser("saturation", help="residual RMS and saturated DyT inputs over training"),
               "sweeps", runs=False)
    p.set_defaults(norms="dyt@g1,dyt,rms")
    p.add_argument("--at", default="1,10,25,50,100,150,300,450", help="steps to measure at")
    p.add_argument("--n", type=int, default=32, help="validation windows")
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "jobs", 1) < 1 or getattr(args, "threads", 1) < 1 or getattr(args, "n", 1) < 1:
        raise AnalysisError("--jobs, --threads and --n must be >= 1")
    tc.ensure_writable_dir(args.results, "--results")  # before the work, not after it
    return {"norms": cmd_norms, "budget": cmd_budget, "recipe": cmd_recipe, "saturation": cmd_saturation}[args.command](args)


if __name__ == "__main__":
    tc.main_guard(main)
