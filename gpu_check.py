"""
Check this project's GPU path on a CUDA machine, in one command, whatever fails:

    python gpu_check.py                          # every part, in order of value
    python gpu_check.py --budget 600 --out DIR   # the parts that fit 10 minutes
    GPU_CHECK_DRY=1 python gpu_check.py          # the same plumbing on a CPU, tiny sizes

The parts, in order of value, each under its own timeout (one that hangs or crashes is
recorded and the next runs): the fused kernel against float64 (tests/test_kernel.py's GPU
cases); bench.py's table; the trainers in their GPU configuration (bf16, --compile, FSDP2);
memory (studies/kernel_lab.py --memory); then the DyT paper's Table 7 on LLaMA 7B, the GPT
comparison at the `micro` preset, the rest of the kernel tests, and the whole kernel lab. Each
part's time is estimated beforehand from what it does (compiles x seconds per compile, passes
x seconds per pass: the constants below); with --budget, a part whose estimate exceeds the
time left is not started and the summary says so.

Into --out (default out/gpu_check), rewritten after every part, so that a kill at any moment
leaves everything finished so far:
  gpu_check.md    the summary: device, driver, versions, each part's status, seconds and
                  estimate, and its headline numbers (also printed at the end)
  gpu_check.json  the same, machine-readable
  gpu_check.tgz   every part's log and result files (JSON/JSONL/Markdown, metrics)
The work itself goes to --work (default /tmp/gpu_check_work), never into the tree's results/:
committed results are copied there by hand, with the device and date they name. On a copy of
the tree without .git, GPU_CHECK_COMMIT=<commit> names the commit in the summary.
"""

import argparse
import contextlib
import datetime
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
DRY = os.environ.get("GPU_CHECK_DRY", "") not in ("", "0")

# Estimates (seconds). The compile and pass times are assumptions for an H100/H200 with 16
# cores until a run measures them (the summary shows each part's estimate beside its time).
TRITON_COMPILE_S = 1.5    # one Triton kernel variant
INDUCTOR_GRAPH_S = 15.0   # one graph compiled by inductor (torch.compile)
PYTHON_START_S = 8.0      # a fresh python3 importing torch (and pytest)
LLAMA7B_FWD_S, LLAMA7B_FWDBWD_S = 0.09, 0.27  # one 4096-token pass of LLaMA 7B in bf16 (~60%
                                               # of ~790 TFLOP/s)


def test_kernel():
    """tests/test_kernel.py, for its GPU test cases and their compile count."""
    os.environ.setdefault("TRITON_INTERPRET", "1" if DRY else "0")
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_kernel
    return test_kernel


def plan():
    """[(part name, estimate s, command)], in order of value."""
    py = sys.executable
    if DRY:  # the same parts at CPU sizes: the plumbing, not the numbers
        return [
            ("env", 10, [py, "-c", ENV_SCRIPT]),
            ("kernel_tests", 40, [py, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                                  "tests/test_kernel.py", "-k", "fp32_against_float64 and bias-alpha1"]),
            ("bench", 150, [py, "bench.py", "--device", "cpu", "--out", "{work}"]),
            ("train_gpt", 40, [py, "train_gpt.py", "--norm", "dyt", "--dtype", "bf16", "--fsdp",
                               "--dim", "32", "--n_layer", "2", "--n_head", "2", "--n_kv_head", "2",
                               "--max_steps", "4", "--eval_interval", "0", "--eval_tokens", "2048",
                               "--sample_tokens", "20", "--log_interval", "1", "--device", "cpu",
                               "--out_dir", "{work}/gpt"]),
            ("train_vit", 40, [py, "train_vit.py", "--norm", "dyt", "--dim", "32", "--depth", "2",
                               "--heads", "2", "--max_steps", "4", "--eval_batch", "256",
                               "--log_interval", "1", "--device", "cpu", "--data_dir", "{work}/fmnist",
                               "--out_dir", "{work}/vit"]),
            ("lab_model", 40, [py, "studies/kernel_lab.py", "--model", "--device", "cpu", "--preset", "nano",
                               "--seq", "32", "--passes", "4", "--repeats", "2", "--warmup", "1",
                               "--out", "{work}"]),
        ]
    tk = test_kernel()
    compiles = lambda cases, modes=("auto",): tk.gpu_compile_plan(cases, modes)
    fused = [(fn, tk.torch.bfloat16, shape, False) for fn in ("tanh", "erf")
             for shape in ((8, 4096, 4096), (4096, 4096))]
    return [
        ("env", 15, [py, "-c", ENV_SCRIPT]),
        # 12 core cases: y and every gradient vs float64; their compiles dominate
        ("kernel_tests", PYTHON_START_S + 10 + compiles(tk.GPU_CORE) * TRITON_COMPILE_S,
         [py, "-m", "pytest", "-v", "-s", "-p", "no:cacheprovider", "tests/test_kernel.py", "-k", "gpu_core"]),
        # bench.py: 2 shapes x 10 rows in bf16; the 6 compiled kinds x 2 shapes x 3 graphs
        # (inference, forward, backward) are inductor compiles; each row's check and timing ~2 s
        ("bench", PYTHON_START_S + compiles(fused) * TRITON_COMPILE_S + 36 * INDUCTOR_GRAPH_S / 3 + 40 * 2,
         [py, "bench.py", "--out", "{work}"]),
        # bf16, --compile, FSDP2 at world size 1: the default corpus built (~10 s: data/ does not
        # travel), 4 graphs (counted on a CPU), 20 steps, sampling's recompiles as it grows
        ("train_gpt", PYTHON_START_S + 10 + 6 * INDUCTOR_GRAPH_S + 15,
         [py, "train_gpt.py", "--norm", "dyt", "--dtype", "bf16", "--compile", "--fsdp", "--max_steps", "20",
          "--eval_interval", "0", "--eval_tokens", "16384", "--log_interval", "5", "--sample_tokens", "50",
          "--out_dir", "{work}/gpt"]),
        ("train_vit", PYTHON_START_S + 3 * INDUCTOR_GRAPH_S + 10,
         [py, "train_vit.py", "--norm", "dyt", "--dtype", "bf16", "--compile", "--max_steps", "20",
          "--log_interval", "5", "--data_dir", "{work}/fmnist", "--out_dir", "{work}/vit"]),
        # ViT-B and gpt2_small, 3 norms each: build, 2 steps; the fused rows' Triton variants
        ("lab_memory", PYTHON_START_S + 6 * 5 + 12 * TRITON_COMPILE_S,
         [py, "studies/kernel_lab.py", "--memory", "--out", "{work}"]),
        # Table 7: 4 models x 50 passes (the paper's 100 do not fit) of forward,
        # forward+backward and forward with hooks, in 5 chunks for the spread
        ("lab_model", PYTHON_START_S + 4 * (20 + 50 * (2 * LLAMA7B_FWD_S + LLAMA7B_FWDBWD_S)),
         [py, "studies/kernel_lab.py", "--model", "--passes", "50", "--repeats", "5", "--out", "{work}"]),
        # the micro preset: 3 norms x 3 lrs + 2 seeds each, 4 at a time, ~30 s a run
        ("micro", PYTHON_START_S + (9 + 6) / 4 * 40,
         [py, "studies/gpt_norms.py", "norms", "--preset", "micro", "--lrs", "5e-4,1e-3,2e-3",
          "--device", "cuda", "--jobs", "4", "--threads", "4", "--tag", "_micro", "--results", "{work}/analysis",
          "--out_dir", "{work}/micro"]),
        ("kernel_tests_more", PYTHON_START_S + 30 + compiles(tk.GPU_MORE, ("auto", "portable")) * TRITON_COMPILE_S,
         [py, "-m", "pytest", "-v", "-s", "-p", "no:cacheprovider", "tests/test_kernel.py", "-k", "gpu and not core or sm90"]),
        ("lab_kernels", PYTHON_START_S + 200, [py, "studies/kernel_lab.py", "--bwd_stages", "1,3", "--out", "{work}"]),
    ]


# What the machine is: printed as JSON by the env part.
ENV_SCRIPT = r"""
import json, platform, subprocess, time
import numpy, torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
           triton=triton_version, numpy=numpy.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                        "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError):
    env["nvidia_smi"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(device=p.name, sms=p.multi_processor_count, l2_mib=getattr(p, "L2_cache_size", 0) / 2**20,
               memory_gib=p.total_memory / 2**30)
    src, dst = torch.empty(2**28, device="cuda"), torch.empty(2**28, device="cuda")  # 1 GiB each
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    torch.cuda.synchronize()
    env["copy_gbps"] = 20 * 2 * 2**30 / (time.perf_counter() - t0) / 1e9  # bytes read + written
else:
    env["device"] = "CPU " + platform.machine()
print("ENV " + json.dumps(env))
"""

# A Fashion-MNIST-format set of random images for the ViT (the machine has no network).
FMNIST_SCRIPT = r"""
import gzip, os, struct, sys
import numpy as np
d = sys.argv[1]; os.makedirs(d, exist_ok=True); rng = np.random.default_rng(0)
for stem, n in (("train", 2048), ("t10k", 512)):
    with gzip.open(os.path.join(d, f"{stem}-images-idx3-ubyte.gz"), "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, 28, 28) + rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes())
    with gzip.open(os.path.join(d, f"{stem}-labels-idx1-ubyte.gz"), "wb") as f:
        f.write(struct.pack(">II", 0x801, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes())
"""


# ---------------------------------------------------------------------------------------------
# Running the parts


def run_part(name, cmd, timeout, work, running=lambda pid: None, every=30):
    """(status, seconds): the part's command under its timeout, its whole process group
    killed at the end of it (SIGTERM, then SIGKILL 10 s later); its output in work/NAME.log.
    running(pid) is called when it starts and every `every` s while it runs."""
    hang = os.environ.get("GPU_CHECK_DRY_HANG", "")  # dry-run test: this part sleeps past its timeout
    if DRY and hang.split(":")[0] == name:
        cmd, timeout = [sys.executable, "-c", "import time; time.sleep(600)"], float(hang.split(":")[1])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "1" if DRY else "0"}
    if DRY:
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.time()
    with open(os.path.join(work, f"{name}.log"), "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        rc, deadline = None, t0 + max(timeout, 1)
        while rc is None and time.time() < deadline:
            running(proc.pid)
            try:
                rc = proc.wait(timeout=max(min(every, deadline - time.time()), 0.01))
            except subprocess.TimeoutExpired:
                pass
        rc = proc.poll() if rc is None else rc
        if rc is not None:
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            status = f"timed out after {timeout:.0f} s"
    return status, time.time() - t0


def tail(path, lines=12, chars=1200):
    try:
        with open(path, errors="replace") as f:
            text = f.read().replace("\r", "\n")
    except OSError:
        return ""
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(kept)[-chars:]


def headline(name, work):
    """The lines of the summary that say what a finished part measured."""
    log = os.path.join(work, f"{name}.log")
    if name == "env":
        env = env_of(work)
        return [f"{k}: {v}" for k, v in env.items()] if env else []
    if name.startswith("kernel_tests"):
        lines = [line for line in tail(log, 400, 100000).splitlines()
                 if "passed" in line or "failed" in line or line.startswith(("FAILED", "ERROR", "GPU kernel tests"))]
        return lines[-12:]
    if name == "bench" or name.startswith("lab_"):
        pattern, other = BENCH_FILES[name]
        rows = []
        for path in sorted(glob.glob(os.path.join(work, pattern))):
            if not any(o in os.path.basename(path) for o in other):
                with open(path) as f:
                    rows += (json.load(f)["rows"] if path.endswith(".json")
                             else [json.loads(line) for line in f if line.strip()])
        return [short_row(r) for r in rows][:40]
    if name.startswith("train_"):
        return [line for line in tail(log, 400, 100000).splitlines()
                if line.startswith(("final", "error", "eval step", "step ", "preset", "dyt:", "data "))][-6:]
    if name == "micro":
        path = os.path.join(work, "analysis", "norms_gpt_micro.md")
        return open(path).read().splitlines()[:12] if os.path.exists(path) else []
    return []


BENCH_FILES = {  # part -> (its rows' files, names of other parts' files that the pattern would take)
    "bench": ("bench_*.json", ("memory", "model")), "lab_memory": ("bench_memory_*.jsonl", ()),
    "lab_model": ("bench_model_*.jsonl", ()), "lab_kernels": ("kernel_lab_*.jsonl", ()),
}


def short_row(r):
    if "fwd_ms" in r or ("op" in r and "dims" in r):  # bench.py's table
        if "fwd_bwd_ms" not in r:
            return f"{r['shape']} {r['op']}: " + (f"skipped ({r['skipped'][:80]})" if "skipped" in r
                                                 else f"FAILED ({r.get('error', '')[:160]})")
        vs = f"{r['vs_rms']:.2f}x" if r.get("vs_rms") else "-"
        return (f"{r['shape']} {r['dims']} {r['op']}: fwd {r['fwd_ms']:.4f} ms, fwd+bwd {r['fwd_bwd_ms']:.4f} ms, "
                f"{r['gbps']:.0f} GB/s, {r['pct_copy']:.0f}% copy, vs RMSNorm {vs}, err {r['rel_err']:.1e}")
    if "op" in r:  # the lab's kernel level
        what = f"{r['shape']} {r['dtype']} {r['direction']} {r['op']}"
        if "ms" not in r:
            why = f"skipped ({r['skipped'][:80]})" if "skipped" in r else f"FAILED ({r.get('error', '')[:160]})"
            return f"{what}: {why}"
        graph = f", graph {r['graph_ms']:.4f} ms ({r['graph_pct_copy']:.0f}% copy)" if "graph_ms" in r else ""
        vs = (f"{r['vs_rms']:.2f}x" + (" (graph times)" if r.get("vs_timer") == "graph_ms" else "")
              if r.get("vs_rms") else "-")
        return (f"{what}: {r['ms']:.4f} ms, {r['gbps']:.0f} GB/s, {r['pct_copy']:.0f}% copy{graph}, "
                f"{r.get('bytes_vs_l2', 0):.1f}x L2, vs RMSNorm {vs}")
    if "forward_backward_s" in r:  # Table 7
        sub = (f"; norms fwd+bwd (subtract) {r['norm_forward_backward_s_subtract']:.3f} +- "
               f"{r['norm_forward_backward_s_subtract_ci']:.3f} s" if "norm_forward_backward_s_subtract" in r else "")
        return (f"{r['model']}: fwd {r['forward_s']:.3f} +- {2 * r['forward_se_s']:.3f} s, fwd+bwd "
                f"{r['forward_backward_s']:.3f} +- {2 * r['forward_backward_se_s']:.3f} s{sub}")
    return ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items())


def env_of(work):
    for line in tail(os.path.join(work, "env.log"), 50, 100000).splitlines():
        if line.startswith("ENV "):
            return json.loads(line[4:])
    return {}


def write_outputs(out, work, state):
    """gpu_check.md, gpu_check.json and gpu_check.tgz, each written whole (tmp + os.replace)."""
    budget = f"budget {state['budget']:.0f} s" if state["budget"] else "no budget"
    lines = [f"# GPU check {state['date']}{' (dry run on a CPU)' if DRY else ''}", "",
             f"Command: `{state['command']}` at commit {state['commit']}; {budget}, "
             f"{time.time() - state['t0']:.0f} s so far.", "",
             "| part | status | seconds | estimate | timeout |", "|---|---|---|---|---|"]
    for p in state["parts"]:
        lines.append(f"| {p['name']} | {p['status']} | {p.get('seconds', 0):.0f} | {p['estimate']:.0f} | "
                     f"{p.get('timeout', 0):.0f} |")
    lines.append("")
    for p in state["parts"]:
        if "seconds" not in p:
            continue
        lines += [f"## {p['name']}", ""] + [f"    {line}" for line in p["headline"]]
        if p["status"] != "ok":
            lines += ["", "    (log tail)"] + [f"    {line}" for line in p["tail"].splitlines()]
        lines.append("")
    text = "\n".join(lines) + "\n"
    state["summary"] = text
    for name, write in (("gpu_check.md", lambda f: f.write(text)),
                        ("gpu_check.json", lambda f: json.dump({k: v for k, v in state.items() if k != "summary"}, f, indent=1))):
        with open(os.path.join(out, name + ".tmp"), "w") as f:
            write(f)
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    tmp = os.path.join(out, "gpu_check.tgz.tmp")
    with tarfile.open(tmp, "w:gz") as tar:  # logs and results, not checkpoints
        tar.add(work, arcname="gpu_check", filter=lambda t: None if t.name.endswith((".pt", ".distcp"))
                or "ckpt_dcp" in t.name else t)
    os.replace(tmp, os.path.join(out, "gpu_check.tgz"))
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), allow_abbrev=False)
    p.add_argument("--budget", type=float, default=0, help="seconds for all parts; the parts that do "
                   "not fit the time left are not started (default 0: no limit)")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "gpu_check"), help="the summary's folder")
    p.add_argument("--work", default=os.path.join("/tmp", "gpu_check_work"), help="the parts' own files")
    args = p.parse_args(argv)
    if args.budget < 0:
        p.error(f"--budget {args.budget:g}: give seconds, or 0 for no limit")
    if os.path.abspath(args.out).startswith(os.path.join(ROOT, "results")):
        p.error("--out: not the tree's results/; copy what you keep there by hand, naming the device")
    parts = plan()
    total = sum(est for _, est, _ in parts)
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    os.makedirs(args.out, exist_ok=True)
    subprocess.run([sys.executable, "-c", FMNIST_SCRIPT, os.path.join(args.work, "fmnist")], check=True)
    commit = os.environ.get("GPU_CHECK_COMMIT", "")  # a copy of the tree may have no .git
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):  # no git on the machine
            pass
    state = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 command="python gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 commit=commit or "?", budget=args.budget, t0=time.time(), dry=DRY,
                 parts=[dict(name=n, estimate=est, status="waiting") for n, est, _ in parts])
    print(f"GPU check plan: {', '.join(f'{n} ~{est:.0f} s' for n, est, _ in parts)} "
          f"(total ~{total:.0f} s, {f'budget {args.budget:.0f} s' if args.budget else 'no budget'})", flush=True)
    write_outputs(args.out, args.work, state)
    deadline = state["t0"] + (args.budget or float("inf"))
    for (name, est, cmd), record in zip(parts, state["parts"]):
        left = deadline - time.time()
        if est > left:
            record["status"] = f"not run: estimated {est:.0f} s, {max(left, 0):.0f} s left"
            continue
        timeout = min(left, max(1.5 * est, est + 30))
        record.update(timeout=timeout, status="running")

        def running(pid):  # the outputs while it runs: a kill now keeps its log so far, marked so
            record["pid"] = pid
            write_outputs(args.out, args.work, state)
        record["status"], record["seconds"] = run_part(name, [c.replace("{work}", args.work) for c in cmd],
                                                       timeout, args.work, running)
        try:
            record["headline"] = headline(name, args.work)
        except Exception as e:  # a truncated result file, say: the part's log is in the .tgz
            record["headline"] = [f"(no headline: {type(e).__name__}: {str(e)[:200]})"]
        record["tail"] = tail(os.path.join(args.work, f"{name}.log")) if record["status"] != "ok" else ""
        write_outputs(args.out, args.work, state)
        print(f"{name}: {record['status']} in {record['seconds']:.0f} s (estimate {est:.0f} s)", flush=True)
    print(write_outputs(args.out, args.work, state), flush=True)


if __name__ == "__main__":
    main()
