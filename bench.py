"""
Time DyT and Derf against the norms they replace, one layer at a time, and print one table:

    python bench.py                 # on a GPU: bf16; on a CPU: fp32, the same table
    python bench.py --dtype fp32 --out results

Rows: DyT and Derf as kernel.py's fused Triton kernel (CUDA only), under torch.compile and
eager, against F.rms_norm and F.layer_norm (PyTorch's fused norms) and their compiled forms.
Shapes: the DyT paper's LLaMA 7B activations (8 sequences of 4096 x 4096 on a GPU, a working
set many times the L2; 512 x 4096 on a CPU) and ViT-B's (batch x 197 tokens x 768).
Columns: forward and forward+backward time (median), the forward+backward bandwidth against
the bytes that must move and as a % of a device-to-device copy measured in the same run, the
speed against RMSNorm, and the largest relative error against float64.

How it times, and why:
  - CUDA: triton.testing.do_bench (CUDA events around each call, warm-up excluded, L2 flushed
    before each call); CPU: a host clock around each call. Median of the repeats.
  - Inputs rotate among several random buffers (together at least 4x the L2): no call finds
    its input in cache from the previous one. Random normal data, never zeros.
  - Forward under torch.no_grad; forward+backward is y = f(x) then autograd.grad(y, [x, params],
    dy): fresh gradients every call.
  - Each row is first checked against float64 (y; for forward+backward dx and every parameter
    gradient), outputs NaN-poisoned so an unwritten one fails: a fast wrong kernel posts no time.
  - Bytes that must move (the floor): forward reads x and writes y (2 passes); forward+backward
    adds reading x and dy and writing dx (5 passes). Parameters and per-row statistics are
    under 1/C of that and not counted. The same for DyT, LayerNorm and RMSNorm.

Everything else the kernel was measured with (the paper's Table 7 on whole models, memory,
the fused call's host cost, Liger/apex, tanh.approx, pipelining depths, CUDA graphs, channel
sweeps) is studies/kernel_lab.py. The table goes to --out (default out/bench; results/ holds
the committed ones) as Markdown and JSON, with the device, versions and date.
"""

import argparse
import contextlib
import datetime
import itertools
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
EPS = 1e-6  # the norms' epsilon; irrelevant to speed


# ---------------------------------------------------------------------------------------------
# Bytes that must move through memory: pure functions, unit-tested against hand arithmetic.

def bytes_forward(n_elements, elem_bytes):
    """Forward of an element-wise layer or a norm: read x once, write y once."""
    return 2 * n_elements * elem_bytes


def bytes_backward(n_elements, elem_bytes):
    """Backward alone: read x (DyT recomputes tanh(alpha*x) from it; a norm its statistics),
    read dy, write dx."""
    return 3 * n_elements * elem_bytes


def bytes_forward_backward(n_elements, elem_bytes):
    """One forward and one backward: 5 activation-sized passes."""
    return bytes_forward(n_elements, elem_bytes) + bytes_backward(n_elements, elem_bytes)


def bytes_copy(n_elements, elem_bytes):
    """A device-to-device copy: read the source, write the destination."""
    return 2 * n_elements * elem_bytes


def bandwidth_gbps(n_bytes, ms):
    """GB/s (10^9 bytes per second) for n_bytes moved in ms milliseconds."""
    return n_bytes / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------------------------
# Timers: the 20th, 50th and 80th percentile of the per-call time in ms.

def time_cuda(fn, warmup_ms=25, rep_ms=100):
    # do_bench: CUDA events around each call, warm-up excluded, L2 flushed before each call.
    from triton.testing import do_bench
    return tuple(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8]))


def time_cpu(fn, warmup_s=0.01, rep_s=0.06, min_reps=5):
    # The CPU runs synchronously, so a host clock around each call is the call's time.
    fn()
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        fn()
    times = []
    while len(times) < min_reps or sum(times) < rep_s:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return tuple(1e3 * quantile(times, q) for q in (0.2, 0.5, 0.8))


def quantile(values, q):
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def time_call(fn, device):
    return time_cuda(fn) if device.type == "cuda" else time_cpu(fn)


# ---------------------------------------------------------------------------------------------
# The layers compared. Each builder takes (channels, dtype, device) and returns (fn, params):
# fn(x) -> y, and the parameters in the order of reference(): DyT [alpha, gamma, beta], Derf
# [alpha, shift, gamma, beta], LayerNorm [weight, bias], RMSNorm [weight]. A builder raises
# Unavailable(reason) when it cannot run here.

class Unavailable(Exception):
    pass


def random_params(kind, C, dtype, device):
    # Random, not the init values (gamma = 1, beta = 0), so no multiply or add is trivial.
    g = lambda: (1 + 0.1 * torch.randn(C, device=device)).to(dtype).requires_grad_()
    b = lambda: (0.1 * torch.randn(C, device=device)).to(dtype).requires_grad_()
    if kind == "dyt":
        return [torch.full((1,), 0.5, device=device, dtype=dtype, requires_grad=True), g(), b()]
    if kind == "derf":  # [alpha, shift, gamma, beta]
        return [torch.full((1,), 0.5, device=device, dtype=dtype, requires_grad=True),
                torch.full((1,), 0.1, device=device, dtype=dtype, requires_grad=True), g(), b()]
    if kind == "ln":
        return [g(), b()]
    return [g()]


def reference(kind, x, params):
    """The function each kind must compute (run in float64 for the checks)."""
    if kind == "dyt":  # [alpha, gamma, beta]
        alpha, gamma, beta = params
        return gamma * torch.tanh(alpha * x) + beta
    if kind == "derf":  # [alpha, shift, gamma, beta]
        alpha, shift, gamma, beta = params
        return gamma * torch.erf(alpha * x + shift) + beta
    if kind == "ln":
        return F.layer_norm(x, x.shape[-1:], *params, eps=EPS)
    return F.rms_norm(x, x.shape[-1:], *params, eps=EPS)


def load_kernel():
    """The fused Triton kernel module, or Unavailable with the reason. Imported lazily: kernel.py
    needs Triton and is only meaningful on a GPU."""
    try:
        import kernel
    except Exception as e:  # ImportError, or a Triton that cannot initialise here
        raise Unavailable(f"kernel.py did not import ({type(e).__name__}: {e})")
    return kernel


def build_fused(kind):
    """kernel.py's fused Triton kernel for DyT or Derf (CUDA only)."""
    def build(C, dtype, device):
        if device.type != "cuda":
            raise Unavailable("the fused Triton kernel needs a CUDA GPU")
        kernel = load_kernel()
        if not kernel.available(torch.empty(1, C, device=device, dtype=dtype)):
            raise Unavailable("kernel.available() is False for this tensor")
        params = random_params(kind, C, dtype, device)
        return (lambda x: (kernel.derf if kind == "derf" else kernel.dyt)(x, *params)), params
    return build


def build_plain(kind):
    # the kind's definition in eager PyTorch, under autograd
    def build(C, dtype, device):
        params = random_params(kind, C, dtype, device)
        return (lambda x: reference(kind, x, params)), params
    return build


_compiled = {}  # one torch.compile wrapper per kind


def build_compiled(kind):
    # One torch.compile wrapper per kind; it recompiles for each shape/dtype/grad mode
    # (dynamic=False: the best code for each shape, as a user with fixed shapes would get).
    def build(C, dtype, device):
        if kind not in _compiled:
            _compiled[kind] = torch.compile(lambda x, *p: reference(kind, x, p), dynamic=False)
        fn = _compiled[kind]
        params = random_params(kind, C, dtype, device)
        return (lambda x: fn(x, *params)), params
    return build


def ops(kernel=True):
    """(row name, kind, builder) of the rows, in table order."""
    rows = [("DyT fused (Triton)", "dyt", build_fused("dyt")), ("DyT compiled", "dyt", build_compiled("dyt")),
            ("DyT eager", "dyt", build_plain("dyt")),
            ("Derf fused (Triton)", "derf", build_fused("derf")), ("Derf compiled", "derf", build_compiled("derf")),
            ("Derf eager", "derf", build_plain("derf")),
            ("RMSNorm (F.rms_norm)", "rms", build_plain("rms")), ("RMSNorm compiled", "rms", build_compiled("rms")),
            ("LayerNorm (F.layer_norm)", "ln", build_plain("ln")), ("LayerNorm compiled", "ln", build_compiled("ln"))]
    return [r for r in rows if kernel or "fused" not in r[0]]


# ---------------------------------------------------------------------------------------------
# Correct before fast: each row against float64, outputs it forgets to write poisoned with NaN.

def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()


def check(kind, fn, params, x, dy):
    """Relative norm errors against float64: {"y": .., and with dy "dx" and one per parameter
    ("dalpha", "dshift", "dweight", "dbias")}. Every output the layer produces is checked."""
    with torch.no_grad() if dy is None else torch.enable_grad():
        y = fn(x)
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    y64 = reference(kind, x64, p64)
    errs = {"y": rel_err(y, y64)}
    if dy is not None:
        grads = torch.autograd.grad(y, [x] + params, dy)
        grads64 = torch.autograd.grad(y64, [x64] + p64, dy.double())
        names = ["dx"] + PARAM_GRADS[kind]
        for name, g, g64 in zip(names, grads, grads64):
            errs[name] = rel_err(g, g64)
    return errs


PARAM_GRADS = {"dyt": ["dalpha", "dweight", "dbias"], "derf": ["dalpha", "dshift", "dweight", "dbias"],
               "ln": ["dweight", "dbias"], "rms": ["dweight"]}


def tolerance(dtype, output="y"):
    """y and dx: element-wise, rounded once to the dtype. Parameter gradients are sums over
    every row (dalpha, dshift over every element), whose random-sign terms cancel: their error
    is judged relative to the result, so they get 10x (fp32) or 5x (half: PyTorch's own CPU bf16
    LayerNorm weight gradient is 7.6e-2 off at 4096 rows) more room."""
    if output in ("y", "dx"):
        return 1e-4 if dtype == torch.float32 else 2e-2
    return 1e-3 if dtype == torch.float32 else 1e-1


@contextlib.contextmanager
def nan_poisoned(device, nbytes, compiled):
    """Outputs that a kernel forgets to write must show up as NaN in the check. torch's own
    switch for that (deterministic mode fills every torch.empty with NaN) is used for the eager
    ops; a torch.compile'd function would recompile under it (Dynamo guards on that mode), so
    for those the CUDA caching allocator is poisoned instead: NaN-filled blocks of the outputs'
    sizes are freed just before the call and its outputs are carved from them (best effort)."""
    if device.type == "cuda":
        blocks = [torch.full((n // 4 + 1,), float("nan"), device=device) for n in nbytes]
        del blocks
    if compiled:
        yield
        return
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.utils.deterministic.fill_uninitialized_memory = prev[2]


def make_buffers(shape, dtype, device, with_grad, min_total_bytes):
    """Rotating input sets: random x (and dy for backward), enough of them that together they
    exceed min_total_bytes, at least 2, at most 8."""
    per_set = math.prod(shape) * torch.finfo(dtype).bits // 8 * (2 if with_grad else 1)
    n = max(2, min(8, math.ceil(min_total_bytes / per_set)))
    sets = []
    for _ in range(n):
        x = torch.randn(shape, device=device, dtype=dtype).requires_grad_(with_grad)
        dy = torch.randn(shape, device=device, dtype=dtype) if with_grad else None
        sets.append((x, dy))
    return sets


# ---------------------------------------------------------------------------------------------
# The ceiling: a device-to-device copy.

def measure_copy_bandwidth(device, n_bytes=None):
    """GB/s of a device-to-device copy of n_bytes (bytes read + written): the practical ceiling.
    Default 1 GiB on a GPU (64 MiB on a CPU); bench_kernels also measures it at each layer's own
    size (4096 x 4096 bf16 is 32 MiB, under an H200's 60 MB L2 for one buffer: rotating source
    buffers, as the layers get, keep it a DRAM number)."""
    if n_bytes is None:
        n_bytes = 2 ** 30 if device.type == "cuda" else 2 ** 26
    n = n_bytes // 4
    n_bufs = max(2, min(8, math.ceil(4 * l2_bytes(device) / n_bytes)))
    srcs = [torch.randn(n, device=device) for _ in range(n_bufs)]
    dst = torch.empty_like(srcs[0])
    rotation = itertools.cycle(srcs)
    _, ms, _ = time_call(lambda: dst.copy_(next(rotation)), device)
    del srcs, dst
    return bandwidth_gbps(bytes_copy(n, 4), ms)


def l2_bytes(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    return 32 * 2 ** 20  # a typical last-level cache; only sizes the CPU's input rotation

# ---------------------------------------------------------------------------------------------
# The timing loop: every row at every shape, forward and forward+backward.

def shapes(device):
    """{name: shape}: the paper's LLaMA 7B activations and ViT-B's (smaller on a CPU)."""
    if device.type == "cuda":
        return {"LLaMA 7B": (8, 4096, 4096), "ViT-B": (128, 197, 768)}
    return {"LLaMA 7B": (512, 4096), "ViT-B": (8, 197, 768)}


def checked_call(fn, params, kind, buffers, dtype, device, backward, compiled=False):
    """(call, errors): fn's errors against float64 on the first buffers (outputs NaN-poisoned
    first; a wrong one raises Unavailable), and a call() that runs it on the next buffers in
    turn, forward (under no_grad) or forward+backward."""
    x0, dy0 = buffers[0]
    n, elem, C = x0.numel(), x0.element_size(), x0.shape[-1]
    with nan_poisoned(device, [n * elem] * (2 if backward else 1) + [4 * 8 * C] * 8, compiled):
        errs = check(kind, fn, params, x0, dy0)
    bad = {k: v for k, v in errs.items() if not v <= tolerance(dtype, k)}  # NaN fails too
    if bad:
        raise Unavailable("wrong result against float64: " + ", ".join(f"{k} {v:.2e}" for k, v in bad.items()))
    rotation = itertools.cycle(buffers)
    if backward:
        def call():
            x, dy = next(rotation)
            torch.autograd.grad(fn(x), [x] + params, dy)
    else:
        def call():
            with torch.no_grad():
                fn(next(rotation)[0])
    return call, errs


def time_row(fn, params, kind, shape, dtype, device, backward, compiled):
    """(median ms, largest relative error against float64) of fn at one shape and direction."""
    buffers = make_buffers(shape, dtype, device, backward, 4 * l2_bytes(device))
    call, errs = checked_call(fn, params, kind, buffers, dtype, device, backward, compiled)
    return time_call(call, device)[1], max(errs.values())


def bench(device, dtype, kernel=True):
    """One row per (shape, op): fwd and fwd+bwd ms, fwd+bwd GB/s and % of a copy, speed
    against RMSNorm (fwd+bwd), the largest error against float64."""
    rows = []
    for shape_name, shape in shapes(device).items():
        n, elem = math.prod(shape), torch.finfo(dtype).bits // 8
        copy = measure_copy_bandwidth(device, n * elem)  # the ceiling at the layer's own size
        group = []
        for name, kind, build in ops(kernel):
            row = dict(shape=shape_name, dims="x".join(map(str, shape)), op=name, copy_gbps=copy)
            try:
                fn, params = build(shape[-1], dtype, device)
                timed = lambda backward: time_row(fn, params, kind, shape, dtype, device, backward, "compiled" in name)
                (row["fwd_ms"], err_f), (row["fwd_bwd_ms"], err_b) = timed(False), timed(True)
                row["rel_err"] = max(err_f, err_b)
                row["gbps"] = bandwidth_gbps(bytes_forward_backward(n, elem), row["fwd_bwd_ms"])
                row["pct_copy"] = 100 * row["gbps"] / copy
            except Unavailable as e:
                row["skipped"] = str(e)
            except Exception as e:  # a compile or launch error: the row says so, the rest run
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            group.append(row)
        base = group[[r["op"] for r in group].index("RMSNorm (F.rms_norm)")].get("fwd_bwd_ms")
        for r in group:
            r["vs_rms"] = base / r["fwd_bwd_ms"] if base and "fwd_bwd_ms" in r else None
            if "fused" not in r["op"] or "skipped" not in r:  # a CPU's fused rows: one note instead
                print(format_row(r), flush=True)
        rows += group
    return rows


HEADER = ("| shape | op | fwd ms | fwd+bwd ms | fwd+bwd GB/s | % copy | fwd+bwd vs RMSNorm | rel. err |")


def format_row(r):
    if "fwd_bwd_ms" not in r:
        why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r['error']}"
        return f"| {r['shape']} {r['dims']} | {r['op']} | {why} | | | | | |"
    vs = f"{r['vs_rms']:.2f}x" if r.get("vs_rms") else "-"
    return (f"| {r['shape']} {r['dims']} | {r['op']} | {r['fwd_ms']:.4f} | {r['fwd_bwd_ms']:.4f} | "
            f"{r['gbps']:.1f} | {r['pct_copy']:.0f}% | {vs} | {r['rel_err']:.1e} |")


# ---------------------------------------------------------------------------------------------
# Where it ran, the files, the command line

def environment(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "CPU " + (cpu_model() or platform.processor() or platform.machine())
        name += f" ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(device=name, device_type=device.type, torch=torch.__version__, triton=triton_version,
                cuda=torch.version.cuda, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                command="python " + " ".join(sys.argv),
                # other work on the machine while we ran (timings on a shared CPU depend on it)
                load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
                dyt_tanh=os.environ.get("DYT_TANH", "auto"))  # kernel.py's tanh choice


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None


def device_tag(env):
    return "cpu" if env["device_type"] == "cpu" else re.sub(r"[^a-z0-9]+", "_", env["device"].lower()).strip("_")

def write_results(out_dir, stem, env, rows, notes):
    """STEM.json (every figure, the environment) and STEM.md (the table) under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(dict(environment=env, notes=notes, rows=rows), indent=1) + "\n")
    md = [f"# DyT and Derf against the norms, one layer at a time ({env['device']})", "",
          f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}. "
          f"{env['date']}. Command: `{env['command']}`." + (f" Load average while running: "
          f"{', '.join(f'{v:.1f}' for v in env['load_average'])}." if env.get("load_average") else ""), ""]
    md += [f"- {n}" for n in notes] + ["", HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    md += [format_row(r) for r in rows if "fused" not in r["op"] or "skipped" not in r]
    (out_dir / f"{stem}.md").write_text("\n".join(md) + "\n")
    return out_dir / f"{stem}.md"


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # a bad flag gets one line, not the usage block
        self.exit(2, f"bench.py: error: {message}\n")


def parse_args(argv=None):
    p = OneLineParser(description="DyT and Derf against RMSNorm and LayerNorm, one layer at a time "
                      "(everything else: studies/kernel_lab.py).", allow_abbrev=False)
    p.add_argument("--out", default=os.path.join("out", "bench"), help="folder for the Markdown and "
                   "JSON (default out/bench; the committed ones: --out results)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when present")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--kernel", default="true", choices=["true", "false"], help="false: leave out the fused rows")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: on a small shared "
                   "machine more threads than free cores makes timings scheduler noise)")
    moved = ("--model", "--memory", "--only", "--dtypes", "--full", "--ops", "--bwd-stages", "--no-graphs",
             "--no-host-cost", "--vit-batch", "--gpt-batch", "--preset", "--passes")
    argv = sys.argv[1:] if argv is None else argv
    for flag in argv:
        if flag.split("=")[0] in moved:
            p.error(f"{flag.split('=')[0]} moved with the rest of the lab: python studies/kernel_lab.py "
                    f"{flag.split('=')[0].replace('-', '_').replace('__', '--', 1)} ...")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here")
    if args.threads < 1:
        p.error("--threads must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:  # before the timing, not after: a read-only or misspelt --out is one line
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, f".write_test.{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        print(f"bench.py: error: cannot write to --out {args.out}: {e.strerror or e}; pick a writable --out",
              file=sys.stderr)
        sys.exit(2)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch._dynamo.config.recompile_limit = 64  # one compiled graph per shape and grad mode
    torch.manual_seed(0)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    env = environment(device)
    notes = [f"{str(dtype).replace('torch.', '')}; "
             + ("median of triton.testing.do_bench (CUDA events, L2 flushed before each call)" if device.type == "cuda"
                else f"median of a host clock, {torch.get_num_threads()} thread(s)")
             + "; GB/s counts 5 activation passes for fwd+bwd (read x, write y; read x and dy, write dx); "
             "% copy is that over a device-to-device copy of the same size; rel. err is the largest of "
             "y, dx and each parameter gradient against float64"]
    if device.type != "cuda":
        notes.append("no CUDA GPU: the fused Triton rows need one (kernel.py); the rest is the same table")
    print(f"{env['device']}; torch {env['torch']}, triton {env['triton']}", flush=True)
    print(HEADER + "\n" + "|" + "---|" * (HEADER.count("|") - 1), flush=True)
    rows = bench(device, dtype, kernel=args.kernel == "true")
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {write_results(Path(args.out), f'bench_{device_tag(env)}', env, rows, notes)}")


if __name__ == "__main__":
    main()
