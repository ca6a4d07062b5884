"""
The kernel lab: everything this project measured DyT's speed and memory with beyond bench.py's
one table (which imports nothing from here; this file builds on bench.py's timers and checks).

    python studies/kernel_lab.py            kernel level, every row: forward and forward+backward,
                                            bf16 and fp32, at LLaMA-7B and ViT-B shapes and over
                                            a sweep of channel counts (on a CPU also at nanoGPT's
                                            GPT shape); tanh.approx, Liger and apex rows where
                                            installed, CUDA-graph times, the host cost of a call
    python studies/kernel_lab.py --model    the DyT paper's Table 7: LLaMA 7B in bf16, one
                                            4096-token sequence, 100 forward and 100
                                            forward+backward passes, with RMSNorm, fused DyT and
                                            plain DyT: the whole model and the norm layers.
                                            --preset nano|micro|gpt2_small|... for any machine.
    python studies/kernel_lab.py --memory   peak GPU memory of one training step of ViT-B and of
                                            a GPT (gpt2_small, 162M) with LN/RMSNorm, plain and
                                            fused DyT, and the bytes autograd saves for backward.

(A training step against karpathy/nanoGPT's is studies/nanogpt_speed.py.)

Results are printed as a table and written as JSON and Markdown under --out (default
out/bench; results/ holds the committed ones: --out results replaces them) with the device,
the torch/triton versions and the date. The timing rules are bench.py's (its docstring); here
also: "graph ms" replays the same calls from a CUDA graph (the GPU's own time, the host's launch
cost taken out), and rows whose working set is several times the L2 are the bandwidth numbers.
"""

import argparse
import contextlib
import subprocess
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench import (DTYPES, EPS, Unavailable, bandwidth_gbps, build_compiled,  # noqa: E402
                   build_plain, bytes_forward, bytes_forward_backward, checked_call,
                   device_tag, environment, l2_bytes, load_kernel, make_buffers, measure_copy_bandwidth,
                   quantile, random_params, time_call)
from dyt import use_kernel  # noqa: E402
from model import GPT, ViT, GPT_PRESETS, gpt_config, vit_config  # noqa: E402


def bytes_moved(direction, n_elements, elem_bytes):
    if direction == "fwd":
        return bytes_forward(n_elements, elem_bytes)
    if direction == "fwd+bwd":
        return bytes_forward_backward(n_elements, elem_bytes)
    raise ValueError(f"unknown direction {direction!r}")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Timers. Both return the 20th, 50th and 80th percentile of the per-call time in ms.


def time_cuda_graph(fn, calls_per_graph, replays=20):
    """Per-call ms (p20, p50, p80) of fn replayed from a CUDA graph: the GPU's own time, with the
    host's launch cost (Python, Triton's launcher, the driver) taken out. One graph holds
    calls_per_graph calls (one per rotating input set, so no call finds its input in L2);
    each replay is timed with CUDA events and divided by calls_per_graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        for _ in range(2 * calls_per_graph):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls_per_graph)
    del graph
    return tuple(quantile(times, q) for q in (0.2, 0.5, 0.8))


# ---------------------------------------------------------------------------------------------
# The layers compared. Each builder takes (channels, dtype, device) and returns
# (fn, params): fn(x) -> y, and the parameters in the order of the reference of its kind:
# DyT [alpha, gamma, beta], LayerNorm [weight, bias], RMSNorm [weight].
# A builder raises Unavailable(reason) when it cannot run here.


def build_fused(kind="dyt", tanh="auto", bwd_stages=None):
    """The fused Triton kernel (kernel.py) for DyT or Derf. tanh: kernel.TANH for the call
    ("approx" = PTX tanh.approx.f32 for bf16/fp16); bwd_stages: the backward's pipelining depth.
    Both are set around each call, so rows with different options can share a run."""
    def build(C, dtype, device):
        if device.type != "cuda":
            raise Unavailable("the fused Triton kernel needs a CUDA GPU")
        if tanh == "approx" and dtype == torch.float32:
            raise Unavailable("tanh.approx applies to bf16/fp16 inputs; fp32 runs libdevice tanh, "
                              "the 'DyT fused (Triton)' row")
        kernel = load_kernel()
        probe = torch.empty(1, C, device=device, dtype=dtype)
        if not kernel.available(probe):
            raise Unavailable("kernel.available() is False for this tensor")
        params = random_params(kind, C, dtype, device)
        fn = (lambda x: kernel.derf(x, *params)) if kind == "derf" else (lambda x: kernel.dyt(x, *params))
        # kernel.TANH / BWD_STAGES are read at launch time, the backward's when autograd runs
        # it: bench_kernels holds them set (kernel_options) around the check and every call
        fn.options = dict(TANH=tanh, BWD_STAGES=bwd_stages or kernel.BWD_STAGES)
        return fn, params
    return build


@contextlib.contextmanager
def kernel_options(fn):
    """Set the fused kernel's module options for fn (see build_fused) while inside."""
    options = getattr(fn, "options", None)
    if not options:
        yield
        return
    kernel = load_kernel()
    saved = {k: getattr(kernel, k) for k in options}
    for k, v in options.items():
        setattr(kernel, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(kernel, k, v)


build_fused_dyt = build_fused("dyt")


def build_module(factory, kind, names):
    """Another library's layer, wrapped as (fn, params) with random parameters; `names` are
    its parameter attributes in the order of our reference."""
    def build(C, dtype, device):
        if device.type != "cuda":
            raise Unavailable("GPU-only library")
        module = factory(C).to(device=device, dtype=dtype)
        with torch.no_grad():
            for p, ours in zip([getattr(module, n) for n in names], random_params(kind, C, dtype, device)):
                p.copy_(ours)
        return module, [getattr(module, n) for n in names]
    return build


def optional_library_ops():
    """Other libraries' DyT and norm kernels, when installed; else a note saying what is absent."""
    ops, notes = [], []
    try:
        from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm
        ops += [("Liger LayerNorm", "ln", build_module(lambda C: LigerLayerNorm(C, eps=EPS), "ln", ["weight", "bias"])),
                ("Liger RMSNorm", "rms", build_module(lambda C: LigerRMSNorm(C, eps=EPS), "rms", ["weight"]))]
        try:
            from liger_kernel.transformers import LigerDyT
            ops.append(("Liger DyT", "dyt", build_module(lambda C: LigerDyT(C), "dyt", ["alpha", "gamma", "beta"])))
        except ImportError:
            notes.append("liger_kernel has no LigerDyT in this version")
    except ImportError:
        notes.append("liger_kernel not installed: its DyT/LayerNorm/RMSNorm rows skipped")
    try:
        from apex.normalization import FusedLayerNorm, FusedRMSNorm
        ops += [("apex FusedLayerNorm", "ln", build_module(lambda C: FusedLayerNorm(C, eps=EPS), "ln", ["weight", "bias"])),
                ("apex FusedRMSNorm", "rms", build_module(lambda C: FusedRMSNorm(C, eps=EPS), "rms", ["weight"]))]
    except ImportError:
        notes.append("apex not installed: its FusedLayerNorm/FusedRMSNorm rows skipped")
    return ops, notes


def kernel_ops(device, bwd_stages=()):
    """(row name, kind, builder) of every layer timed, and notes on what was skipped."""
    ops = [
        ("DyT fused (Triton)", "dyt", build_fused("dyt")),
        ("DyT fused tanh.approx", "dyt", build_fused("dyt", tanh="approx")),
        ("Derf fused (Triton)", "derf", build_fused("derf")),
        ("DyT plain", "dyt", build_plain("dyt")),   # the definition under autograd (off CUDA)
        ("DyT compile", "dyt", build_compiled("dyt")),
        ("Derf plain", "derf", build_plain("derf")),
        ("LayerNorm", "ln", build_plain("ln")),      # F.layer_norm: PyTorch's fused kernel
        ("RMSNorm", "rms", build_plain("rms")),      # F.rms_norm: fused on CUDA
    ]
    for stages in bwd_stages or ():
        ops.insert(1, (f"DyT fused bwd_stages={stages}", "dyt", build_fused("dyt", bwd_stages=stages)))
    notes = []
    if device.type == "cuda":
        # The comparison users asked for: DyT compiled against RMSNorm compiled (both Triton).
        ops.append(("RMSNorm compile", "rms", build_compiled("rms")))
    else:
        notes.append("no CUDA GPU: the 'DyT fused (Triton)' rows need a GPU and are not timed; "
                     "the CPU rows compare plain PyTorch, torch.compile and the native norms")
    lib_ops, lib_notes = optional_library_ops()
    return ops + lib_ops, notes + lib_notes


# ---------------------------------------------------------------------------------------------
# Kernel level

def shape_sets(device, vit_batch, only, full=False):
    """{set name: [shape, ...]}. The CPU gets fewer rows so that the whole run stays under a
    minute; the GPU gets the paper's shapes (one and eight sequences; the sweep with --full)."""
    if device.type == "cuda":
        sets = {
            "llama7b": [(8, 4096, 4096), (4096, 4096)],  # 8 sequences (>> L2), and one
            "vit_b": [(vit_batch, 197, 768)],                    # 196 patches + class token
            "sweep": [(2 ** 25 // C, C) for C in (256, 512, 768, 1024, 2048, 4096, 8192, 16384)],
            "gpt": [(8 * 256, 384)],
        }
    else:
        sets = {
            "llama7b": [(512, 4096)],                            # 512 tokens at LLaMA-7B width
            "vit_b": [(min(vit_batch, 8), 197, 768)],
            "sweep": [(2 ** 20 // C, C) for C in (256, 4096)],
            "gpt": [(8 * 256, 384)],  # studies/nanogpt_speed.py's shape: 8 x 256 tokens, 384 wide
        }
    return {k: v for k, v in sets.items() if k in only}


def bench_kernels(args, device, record=lambda row: None):
    ops, notes = kernel_ops(device, args.bwd_stages)
    if args.ops:
        unknown = set(args.ops) - {name for name, _, _ in ops}
        if unknown:
            print(f"kernel_lab.py: error: --ops {', '.join(sorted(unknown))}: no such row; choose from "
                  f"{', '.join(name for name, _, _ in ops)}", file=sys.stderr)
            sys.exit(2)
        ops = [op for op in ops if op[0] in args.ops]
    cuda = device.type == "cuda"
    l2 = l2_bytes(device)
    notes = [
        "bytes counted per row (N elements of e bytes): fwd = 2*N*e (read x, write y); fwd+bwd = "
        "5*N*e (also read x and dy, write dx); parameters and per-row statistics not counted",
        "timing: " + ("median ms by CUDA events via triton.testing.do_bench (L2 flushed before "
                      "each call; includes the host's launch cost whenever the host is slower "
                      "than the GPU) and, beside it, 'graph ms': the same calls replayed from a "
                      "CUDA graph, the GPU's own time" if cuda else
                      f"host clock, median, {torch.get_num_threads()} thread(s)")
        + "; inputs rotated among several random buffers; speedup = time of RMSNorm (LayerNorm) / "
        "time of the row (graph times when both have one); % copy = achieved GB/s over a "
        "device-to-device copy of the layer's own size (and of 1 GiB in the JSON)",
        "checked before timing, outputs NaN-poisoned first: y, and for fwd+bwd dx and every "
        "parameter gradient, as relative norm errors against float64 (rel. err: the largest)",
        f"L2 cache {l2 / 2 ** 20:.0f} MiB (read from the device); 'x L2' is each row's bytes moved "
        "over it. Rows whose working set is several times the L2 (8x4096x4096) are the "
        "bandwidth numbers; smaller ones can be flattered by an L2 that holds their inputs "
        "(do_bench flushes only before each call, graph replays never)",
    ] + notes
    copy_gbps = measure_copy_bandwidth(device)
    print(f"device-to-device copy, 1 GiB: {copy_gbps:.1f} GB/s (bytes read + written)", flush=True)
    copy_at = {}
    rows = []
    dtype_names = args.dtypes
    for set_name, shapes in shape_sets(device, args.vit_batch, args.only, args.full).items():
        # the channel sweep (and on a GPU ViT-B unless --full) in bf16 only, the training dtype
        short = set_name == "sweep" or (set_name == "vit_b" and cuda and not args.full)
        set_dtypes = ["bf16"] if short and "bf16" in dtype_names else dtype_names
        for shape, dtype_name, direction in itertools.product(shapes, set_dtypes, ("fwd", "fwd+bwd")):
            dtype, backward = DTYPES[dtype_name], direction == "fwd+bwd"
            n = math.prod(shape)
            elem = torch.finfo(dtype).bits // 8
            n_bytes = bytes_moved(direction, n, elem)
            if (n, elem) not in copy_at:  # the copy ceiling at the layer's own size
                copy_at[(n, elem)] = measure_copy_bandwidth(device, n * elem)
            layer_copy = copy_at[(n, elem)]
            buffers = make_buffers(shape, dtype, device, backward, 4 * l2_bytes(device))
            group = []
            for name, kind, build in ops:
                row = dict(set=set_name, shape="x".join(map(str, shape)), channels=shape[-1],
                           dtype=dtype_name, direction=direction, op=name, bytes=n_bytes,
                           bytes_vs_l2=n_bytes / l2)
                try:
                    fn, params = build(shape[-1], dtype, device)
                    with kernel_options(fn):
                        call, errs = checked_call(fn, params, kind, buffers, dtype, device, backward,
                                                  "compile" in name)
                    row["rel_errs"] = errs
                    row["rel_err"] = max(errs.values())
                    with kernel_options(fn):
                        p20, ms, p80 = time_call(call, device)
                        if cuda and not args.no_graphs:
                            try:
                                g20, gms, g80 = time_cuda_graph(call, len(buffers))
                                row.update(graph_ms=gms, graph_ms_p20=g20, graph_ms_p80=g80,
                                           graph_gbps=bandwidth_gbps(n_bytes, gms),
                                           graph_pct_copy=100 * bandwidth_gbps(n_bytes, gms) / layer_copy)
                            except Exception as e:  # capture can fail for some ops: say so
                                row["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                                torch.cuda.synchronize()
                    row.update(ms=ms, ms_p20=p20, ms_p80=p80, gbps=bandwidth_gbps(n_bytes, ms))
                    row["pct_copy"] = 100 * row["gbps"] / layer_copy
                    row["pct_copy_1gib"] = 100 * row["gbps"] / copy_gbps
                    row["copy_gbps_layer_size"] = layer_copy
                except Unavailable as e:
                    row["skipped"] = str(e)
                except Exception as e:  # a compile, launch or memory error: the row says so, the rest run
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    if cuda:
                        with contextlib.suppress(Exception):
                            torch.cuda.synchronize()
                            torch.cuda.empty_cache()
                group.append(row)
            # speedups against PyTorch's own norms at the same shape, dtype and direction
            key = "graph_ms" if all("graph_ms" in r for r in group if r["op"] in ("RMSNorm", "LayerNorm")) \
                and cuda else "ms"
            base = {r["op"]: r.get(key) for r in group}
            for r in group:  # a row without that timer's figure (its graph failed, say) gets no ratio
                r["vs_rms"] = base["RMSNorm"] / r[key] if key in r and base.get("RMSNorm") else None
                r["vs_ln"] = base["LayerNorm"] / r[key] if key in r and base.get("LayerNorm") else None
                r["vs_timer"] = key
                print(format_kernel_row(r), flush=True)
                record(r)
            rows += group
            del buffers
    return dict(copy_gbps=copy_gbps, copy_gbps_layer_size={f"{n} x {e} B": v for (n, e), v in copy_at.items()},
                notes=notes, rows=rows)


# Host cost of the fused kernel, measurable without a GPU: the whole Python path of a call with
# the Triton launches replaced by no-ops, on CPU tensors (the CUDA-only checks bypassed). What it leaves out is
# Triton's own launch cost (its argument binding and the driver call), a few us per launch.

class _NoLaunch:  # a Triton kernel that launches nothing
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stubbed_launches(kernel):
    """Within: kernel.py's kernels launch nothing and available() is True for CPU tensors."""
    names = ("_squash_fwd_kernel", "_squash_bwd_kernel", "_squash_reduce_kernel", "available")
    saved = {n: getattr(kernel, n) for n in names}
    try:
        for n in names[:3]:
            setattr(kernel, n, _NoLaunch())
        kernel.available = lambda x: isinstance(x, torch.Tensor) and x.dtype in kernel._DTYPES
        yield
    finally:
        for n, v in saved.items():
            setattr(kernel, n, v)


def host_cost_us(M=4096, C=4096, dtype=torch.bfloat16, fn="tanh", calls=200, warmup=30,
                 repeats=3):
    """Median host microseconds per call of (fused forward + backward, forward alone), launches
    stubbed, on CPU tensors of [M, C] (allocation is lazy on CPU, so the size is cheap)."""
    import statistics
    import kernel
    x = torch.randn(M, C, dtype=dtype).requires_grad_()
    alpha = torch.full((1,), 0.5, requires_grad=True)
    shift = torch.zeros(1, requires_grad=True) if fn == "erf" else None
    weight = torch.ones(C, requires_grad=True)
    bias = torch.zeros(C, requires_grad=True)
    dy = torch.randn(M, C, dtype=dtype)
    params = [p for p in (alpha, shift, weight, bias) if p is not None]

    def fwd_bwd():
        y = kernel.squash(x, alpha, weight, bias, shift, fn)
        torch.autograd.grad(y, [x] + params, dy)

    def fwd():
        with torch.no_grad():
            kernel.squash(x, alpha, weight, bias, shift, fn)

    # The lowest of `repeats` medians: on a shared machine other work only ever adds time.
    out = []
    with stubbed_launches(kernel):
        for f in (fwd_bwd, fwd):
            medians = []
            for _ in range(repeats):
                for _ in range(warmup):
                    f()
                times = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    f()
                    times.append(time.perf_counter() - t0)
                medians.append(1e6 * statistics.median(times))
            out.append(min(medians))
    return tuple(out)


def _caching_malloc():
    """Make glibc keep and reuse freed large blocks (as the CUDA caching allocator does) instead
    of an mmap/munmap pair per 32 MiB tensor: page faults on every call, which a GPU call never
    pays. Process-wide and permanent: call it in a process of its own."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 30) and libc.mallopt(-1, 1 << 31))  # MMAP / TRIM
    except (OSError, AttributeError):
        return False


def _floor_us(M, C, dtype, calls=300, warmup=30):
    """The same fwd+bwd through an autograd.Function that only allocates what ours allocates
    (y; dx, dalpha, dweight, dbias and the partial buffer) and launches nothing."""
    import statistics

    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, a, w, b):
            ctx.save_for_backward(x, a, w, b)
            return torch.empty_like(x)

        @staticmethod
        def backward(ctx, dy):
            x, a, w, b = ctx.saved_tensors
            torch.empty(4 * C, dtype=torch.float32)
            return torch.empty_like(x), torch.empty_like(a), torch.empty_like(w), torch.empty_like(b)

    x = torch.randn(M, C, dtype=dtype).requires_grad_()
    a = torch.full((1,), 0.5, requires_grad=True)
    w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    dy = torch.randn(M, C, dtype=dtype)
    medians = []
    for _ in range(3):
        times = []
        for i in range(warmup + calls):
            t0 = time.perf_counter()
            torch.autograd.grad(Floor.apply(x, a, w, b), [x, a, w, b], dy)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        medians.append(1e6 * statistics.median(times))
    return min(medians)


def host_cost_report(M=4096, C=4096, dtype=torch.bfloat16):
    """Host cost of one call, launches stubbed (host_cost runs this in a process of its own):
    first with the CPU's plain malloc, then with caching_malloc (the number that stands for a
    GPU call), with the autograd.Function floor beside each."""
    raw = host_cost_us(M, C, dtype)
    raw_floor = _floor_us(M, C, dtype)
    cached = _caching_malloc()
    fb, f = host_cost_us(M, C, dtype)
    fb_erf, _ = host_cost_us(M, C, dtype, fn="erf")
    return dict(shape=[M, C], dtype=str(dtype).replace("torch.", ""), caching_malloc=cached,
                fwd_bwd_us=fb, fwd_us=f, derf_fwd_bwd_us=fb_erf, floor_fwd_bwd_us=_floor_us(M, C, dtype),
                plain_malloc_fwd_bwd_us=raw[0], plain_malloc_fwd_us=raw[1],
                plain_malloc_floor_fwd_bwd_us=raw_floor,
                torch=torch.__version__, threads=torch.get_num_threads())


def host_cost(timeout=120):
    """host_cost_report() in a process of its own (it changes malloc settings process-wide
    and needs the compiled, not interpreted, kernel module): host us per fused call, launches
    stubbed. Returns the dict, or {"error": ...}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; sys.path.insert(0, 'studies'); import kernel_lab; "
            "print('HOST_COST ' + json.dumps(kernel_lab.host_cost_report()))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)
        line = next(l for l in proc.stdout.splitlines() if l.startswith("HOST_COST "))
        return json.loads(line[len("HOST_COST "):])
    except Exception as e:  # report, don't fail the benchmark
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def host_cost_note(h):
    if "error" in h:
        return f"host cost of the fused kernel: not measured ({h['error']})"
    return (f"host cost of one fused DyT call at {h['shape'][0]}x{h['shape'][1]} {h['dtype']}, Triton "
            f"launches stubbed (kernel_lab.host_cost_report, CPU malloc caching like CUDA's allocator): "
            f"fwd+bwd {h['fwd_bwd_us']:.1f} us, fwd {h['fwd_us']:.1f} us, Derf fwd+bwd "
            f"{h['derf_fwd_bwd_us']:.1f} us; an autograd.Function that only allocates the same "
            f"tensors: {h['floor_fwd_bwd_us']:.1f} us. With plain malloc (an mmap per 32 MiB "
            f"tensor): {h['plain_malloc_fwd_bwd_us']:.1f} us (floor {h['plain_malloc_floor_fwd_bwd_us']:.1f})")


KERNEL_HEADER = ("| set | shape | dtype | pass | op | x L2 | median ms | p20-p80 ms | graph ms | GB/s | % copy | "
                 "graph % copy | vs RMSNorm | vs LayerNorm | rel. err |")


def format_kernel_row(r):
    l2 = f"{r['bytes_vs_l2']:.1f}" if "bytes_vs_l2" in r else "-"
    if "ms" not in r:
        why = f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r.get('error', '')}"
        return (f"| {r['set']} | {r['shape']} | {r['dtype']} | {r['direction']} | {r['op']} | {l2} | "
                f"{why} | | | | | | | | |")
    ratio = lambda v: f"{v:.2f}x" if v else "-"
    graph = f"{r['graph_ms']:.4f}" if "graph_ms" in r else ("failed" if "graph_error" in r else "-")
    graph_pct = f"{r['graph_pct_copy']:.1f}%" if "graph_pct_copy" in r else "-"
    return (f"| {r['set']} | {r['shape']} | {r['dtype']} | {r['direction']} | {r['op']} | {l2} | "
            f"{r['ms']:.4f} | {r['ms_p20']:.4f}-{r['ms_p80']:.4f} | {graph} | {r['gbps']:.1f} | {r['pct_copy']:.1f}% | "
            f"{graph_pct} | {ratio(r.get('vs_rms'))} | {ratio(r.get('vs_ln'))} | {r['rel_err']:.1e} |")


# ---------------------------------------------------------------------------------------------
# Model level: the DyT paper's Table 7.
#
# Whole model: one event pair (host clock on a CPU) around the loop of N passes.
# Norm layers: two estimates, because neither is perfect on its own:
#   "subtract": (time with the norm) - (time of the same model with nn.Identity in every norm
#               slot). The cost the layers add to a pass, forward and forward+backward. It is a
#               difference of two large numbers, so it carries their noise.
#   "hooks":    forward only: CUDA events recorded by a forward pre-hook and a forward hook on
#               every norm module, summed. While the GPU runs behind the host (true for a 7B
#               model) the gap between the two events is the norm's own kernels. Timed in a
#               separate loop so the whole-model numbers carry no hook overhead.

def model_variants(device):
    """(label, norm name, use the fused kernel) for the models compared."""
    variants = [("RMSNorm", "rms", False)]
    if device.type == "cuda":
        try:
            load_kernel()
            variants.append(("DyT fused", "dyt", True))
        except Unavailable as e:
            print(f"DyT fused skipped: {e}")
    variants += [("DyT plain", "dyt", False), ("identity (no norm)", "identity", False)]
    return variants


def build_gpt(preset, norm, fused, dtype, device):
    cfg = gpt_config(preset, norm=norm)
    with torch.device("meta"):  # no host copy of a 7B model: allocate straight on the device
        model = GPT(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.init_weights()
    return use_kernel(model, fused)


def norm_modules(model):
    return [m for name, m in model.named_modules() if name.endswith("norm") and not isinstance(m, nn.Identity)]


class Clock:
    """Elapsed ms between start() and stop(), by CUDA events on a GPU, a host clock otherwise."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin = time.perf_counter()

    def stop(self):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            begin = self.begin  # this call's start: the next call replaces self.begin
            return lambda: begin.elapsed_time(end)  # read after a synchronize
        elapsed = 1e3 * (time.perf_counter() - self.begin)
        return lambda: elapsed


def hooked_norm_ms(model, run, device):
    """Sum of the forward time of every norm module during run(), by hooks (see above)."""
    readings, handles = [], []
    for m in norm_modules(model):
        clock = Clock(device)
        handles.append(m.register_forward_pre_hook(lambda mod, inp, c=clock: c.start()))
        handles.append(m.register_forward_hook(lambda mod, inp, out, c=clock: readings.append(c.stop())))
    try:
        run()
        synchronize(device)
    finally:
        for h in handles:
            h.remove()
    return sum(r() for r in readings)


def bench_model(args, device, record=lambda row: None):
    preset = args.preset or ("llama7b" if device.type == "cuda" else "nano")
    dtype = DTYPES[args.model_dtype or ("bf16" if device.type == "cuda" else "fp32")]
    cfg = gpt_config(preset)
    seq = args.seq or cfg.block_size
    passes, repeats = args.passes, min(args.repeats, args.passes)
    chunk = passes // repeats
    gen = torch.Generator(device="cpu").manual_seed(0)
    idx = torch.randint(cfg.vocab_size, (1, seq), generator=gen).to(device)
    targets = torch.randint(cfg.vocab_size, (1, seq), generator=gen).to(device)
    results = []
    for label, norm, fused in model_variants(device):
        model = build_gpt(preset, norm, fused, dtype, device)

        def forward_passes(k):
            with torch.no_grad():  # forward passes as in inference
                for _ in range(k):
                    model(idx)

        def train_passes(k):
            for _ in range(k):
                model.zero_grad(set_to_none=True)  # a fresh step: no gradient accumulation
                _, loss = model(idx, targets)
                loss.backward()

        def per_pass(run):
            """Seconds per pass in each of `repeats` chunks of the passes: their mean and its
            standard error say how far a difference of two models can be trusted."""
            times = []
            for _ in range(repeats):
                clock = Clock(device)
                synchronize(device)
                clock.start()
                run(chunk)
                reading = clock.stop()
                synchronize(device)
                times.append(reading() / 1e3 / chunk)
            return float(np.mean(times)), float(np.std(times, ddof=1) / np.sqrt(repeats)) if repeats > 1 else 0.0

        forward_passes(args.warmup)
        fwd, fwd_se = per_pass(forward_passes)
        hook_fwd_s = None
        if norm != "identity":
            hook_fwd_s = hooked_norm_ms(model, lambda: forward_passes(passes), device) / 1e3
        train_passes(args.warmup)
        train, train_se = per_pass(train_passes)
        row = dict(model=label, norm=norm, fused=fused, forward_s=fwd * passes, forward_se_s=fwd_se * passes,
                   forward_backward_s=train * passes, forward_backward_se_s=train_se * passes,
                   norm_forward_s_hooks=hook_fwd_s, n_norm_layers=len(norm_modules(model)))
        results.append(row)
        print(format_model_row(row), flush=True)
        record(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    identity = next(r for r in results if r["norm"] == "identity")
    for r in results:
        if r is identity:
            continue
        for kind in ("forward", "forward_backward"):
            diff = r[f"{kind}_s"] - identity[f"{kind}_s"]
            se = math.hypot(r[f"{kind}_se_s"], identity[f"{kind}_se_s"])
            r[f"norm_{kind}_s_subtract"] = diff
            r[f"norm_{kind}_s_subtract_ci"] = 2 * se  # about 95%
            r[f"norm_{kind}_s_subtract_within_noise"] = abs(diff) <= 2 * se
    notes = [f"{passes} passes of each kind per model in {repeats} chunks of {chunk}: a time is the "
             "mean over the chunks times the passes, +- twice its standard error; 'subtract' "
             "(the model minus the same model with nn.Identity in every norm slot) is within the "
             "noise where its +- covers 0, and the table says so"]
    return dict(preset=preset, dtype=str(dtype).replace("torch.", ""), seq_len=seq, batch=1,
                passes=passes, repeats=repeats, warmup=args.warmup, rows=results, notes=notes)


MODEL_HEADER = ("| model | whole model, fwd (s) | whole model, fwd+bwd (s) | norm layers fwd, "
                "subtract (s) | norm layers fwd+bwd, subtract (s) | norm layers fwd, hooks (s) |")


def format_model_row(r):
    f = lambda v: "-" if v is None else f"{v:.3f}"
    pm = lambda k: f"{f(r[k])} +- {2 * r[k.replace('_s', '_se_s')]:.3f}" if k in r else "-"

    def sub(kind):
        k = f"norm_{kind}_s_subtract"
        if k not in r:
            return "-"
        noise = " (within the noise)" if r[f"{k}_within_noise"] else ""
        return f"{r[k]:.3f} +- {r[k + '_ci']:.3f}{noise}"
    return (f"| {r['model']} | {pm('forward_s')} | {pm('forward_backward_s')} | {sub('forward')} | "
            f"{sub('forward_backward')} | {f(r.get('norm_forward_s_hooks'))} |")


# ---------------------------------------------------------------------------------------------
# Memory: peak GPU memory of one training step, and bytes saved for backward.

def saved_for_backward_bytes(loss_fn, params):
    """Bytes of the distinct tensors autograd saves for backward during loss_fn(), parameters
    excluded (they exist anyway). Device-independent: it is most of a training step's
    activation memory, and it is what plain DyT adds (it saves tanh(alpha*x) beside x)."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
        except Exception:  # a tensor without storage (e.g. a subclass): nothing to count
            return t
        ptr = storage.data_ptr()
        if ptr not in param_storages:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    del loss
    return sum(seen.values())


def memory_cases(device, args):
    """(model label, norm label, builder, loss function maker) for every model timed."""
    cases = []
    vit_batch = args.vit_batch if device.type == "cuda" else 2
    gpt_batch, gpt_seq = (args.gpt_batch, 1024) if device.type == "cuda" else (1, 256)
    fused_ok = device.type == "cuda"
    for norm_label, norm, fused in [("LayerNorm", "ln", False), ("DyT plain", "dyt", False),
                                    ("DyT fused", "dyt", True)]:
        cases.append((f"vit_base, batch {vit_batch}", norm_label, "vit", norm, fused, vit_batch, None))
    for norm_label, norm, fused in [("RMSNorm", "rms", False), ("DyT plain", "dyt", False),
                                    ("DyT fused", "dyt", True)]:
        cases.append((f"gpt2_small, {gpt_batch}x{gpt_seq} tokens", norm_label, "gpt", norm, fused,
                      gpt_batch, gpt_seq))
    return [c for c in cases if fused_ok or not c[4]]


def bench_memory(args, device, record=lambda row: None):
    rows = []
    for label, norm_label, arch, norm, fused, batch, seq in memory_cases(device, args):
        torch.manual_seed(0)
        if arch == "vit":
            model = ViT(vit_config("vit_base", norm=norm)).to(device)
            x = torch.randn(batch, 3, 224, 224, device=device)
            y = torch.randint(1000, (batch,), device=device)
            loss_of = lambda: F.cross_entropy(model(x), y)
        else:
            model = GPT(gpt_config("gpt2_small", norm=norm, block_size=seq)).to(device)
            x = torch.randint(model.cfg.vocab_size, (batch, seq), device=device)
            loss_of = lambda: model(x, x)[1]
        use_kernel(model, fused)
        # Mixed precision as in training: fp32 weights, bf16 autocast on a GPU; fp32 on a CPU.
        autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

        def loss_fn():
            with autocast:
                return loss_of()

        row = dict(model=label, norm=norm_label,
                   saved_for_backward_mib=saved_for_backward_bytes(loss_fn, list(model.parameters())) / 2 ** 20)
        if device.type == "cuda":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

            def step():
                opt.zero_grad(set_to_none=True)
                loss_fn().backward()
                opt.step()

            step()  # the first step allocates the optimizer state; measure the second
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            row.update(peak_mib=peak / 2 ** 20, resident_mib=before / 2 ** 20,
                       step_extra_mib=(peak - before) / 2 ** 20)
            del opt
        rows.append(row)
        print(format_memory_row(row), flush=True)
        record(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # relative to the norm each DyT replaces (first row of each model)
    for label in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == label]
        for key in ("peak_mib", "saved_for_backward_mib"):
            if key in group[0]:
                for r in group:
                    r[key.replace("_mib", "_vs_norm_pct")] = 100 * (r[key] / group[0][key] - 1)
    notes = [] if device.type == "cuda" else [
        "no CUDA GPU: peak GPU memory and the fused DyT rows need CUDA; only the bytes autograd "
        "saves for backward (fp32, no autocast) are measured here"]
    return dict(notes=notes, rows=rows)


MEMORY_HEADER = ("| model | norm | peak GPU MiB (step 2) | vs norm | params+grads+opt MiB | "
                 "saved for backward MiB | vs norm |")


def format_memory_row(r):
    f = lambda k, fmt="{:.0f}": "-" if r.get(k) is None else fmt.format(r[k])
    return (f"| {r['model']} | {r['norm']} | {f('peak_mib')} | {f('peak_vs_norm_pct', '{:+.1f}%')} | "
            f"{f('resident_mib')} | {f('saved_for_backward_mib', '{:.1f}')} | "
            f"{f('saved_for_backward_vs_norm_pct', '{:+.1f}%')} |")


# ---------------------------------------------------------------------------------------------
# Environment, output files, command line


def write_results(out_dir, stem, env, result, header, lines, title, json_too=True):
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    if json_too:
        json_path.write_text(json.dumps(dict(environment=env, **result), indent=1) + "\n")
    md = [f"# {title}", "",
          f"Device: {env['device']}. torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
          f"Python {env['python']}. {env['date']}. Command: `{env['command']}`."
          + (f" Load average while running (other work on this machine): "
             f"{', '.join(f'{v:.1f}' for v in env['load_average'])}." if env.get("load_average") else ""),
          ""]
    md += [f"- {note}" for note in result.get("notes", [])]
    md += ["", header, separator(header)]
    md += lines
    md_path.write_text("\n".join(md) + "\n")
    return json_path, md_path


class Recorder:
    """A benchmark's rows written as each finishes, so that a run cut short (a timeout, a kill)
    keeps what it measured: STEM.jsonl gets the row at once, STEM.md is rewritten with every
    row so far; finish() writes STEM.json and the final STEM.md with the notes."""

    def __init__(self, out_dir, stem, env, header, fmt, title):
        self.out_dir, self.stem, self.env, self.header, self.fmt, self.title = out_dir, stem, env, header, fmt, title
        self.rows = []
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{stem}.jsonl").write_text("")

    def add(self, row):
        self.rows.append(row)
        with open(self.out_dir / f"{self.stem}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        write_results(self.out_dir, self.stem, self.env, {"notes": ["partial: the run is still going, "
                      "or was stopped before its end"], "rows": self.rows}, self.header,
                      [self.fmt(r) for r in self.rows], self.title, json_too=False)

    def finish(self, result, title=None):
        return write_results(self.out_dir, self.stem, self.env, result, self.header,
                             [self.fmt(r) for r in result["rows"]], title or self.title)


def separator(header):
    return "|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|"


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # a bad flag gets one line, not the usage block
        self.exit(2, f"kernel_lab.py: error: {message}\n")


def parse_args(argv=None):
    p = OneLineParser(description="DyT vs LayerNorm/RMSNorm benchmarks (see the module docstring).")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--model", action="store_true", help="whole-model timing (the paper's Table 7)")
    mode.add_argument("--memory", action="store_true", help="peak memory of one training step")
    mode.add_argument("--nanogpt", metavar="DIR", default=None, help=argparse.SUPPRESS)  # moved
    # out/bench by default: results/ holds the committed numbers the README cites, written
    # only when asked for (--out results)
    p.add_argument("--out", default=os.path.join("out", "bench"),
                   help="folder for the JSON and Markdown (default out/bench; the committed "
                        "numbers are in results/: pass --out results to replace them)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtypes", default="bf16,fp32", help="kernel level: comma list of bf16, fp32, fp16")
    p.add_argument("--only", default=None, help="kernel level: comma list of llama7b, vit_b, sweep, gpt "
                   "(default: llama7b,vit_b on a GPU, all four on a CPU)")
    p.add_argument("--full", action="store_true", help="kernel level on a GPU: also the channel "
                   "sweep and ViT-B in fp32")
    p.add_argument("--bwd_stages", default="", help="kernel level: also time the fused DyT with these "
                   "backward pipelining depths, e.g. 1,3 (the default depth is kernel.BWD_STAGES)")
    p.add_argument("--ops", default="", help="kernel level: only these rows (comma list of their names, "
                   "e.g. 'DyT fused (Triton),RMSNorm')")
    p.add_argument("--no_graphs", action="store_true", help="kernel level: skip the CUDA-graph timings")
    p.add_argument("--no_host_cost", action="store_true", help="skip the host-cost measurement")
    p.add_argument("--vit_batch", type=int, default=128, help="ViT-B batch (kernel level and --memory)")
    p.add_argument("--gpt_batch", type=int, default=8, help="--memory: GPT sequences of 1024 tokens")
    p.add_argument("--preset", default=None, help="--model: GPT preset (default llama7b on a GPU, nano on a CPU)")
    p.add_argument("--seq", type=int, default=None, help="--model: sequence length (default: the preset's block size)")
    p.add_argument("--passes", type=int, default=100, help="--model: timed passes of each kind")
    p.add_argument("--warmup", type=int, default=3, help="--model: untimed passes first")
    p.add_argument("--repeats", type=int, default=5, help="--model: chunks the passes are timed in "
                   "(their spread gives each time's error)")
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)  # moved with --nanogpt
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: on a small shared machine more threads than free "
                        "cores turns timings into scheduler noise)")
    p.add_argument("--model_dtype", default=None, help="--model: bf16 or fp32 (default bf16 on a GPU, fp32 on a CPU)")
    argv = sys.argv[1:] if argv is None else argv
    for flag in argv:  # one flag style across the scripts: --no_graphs, not --no-graphs
        name = flag.split("=")[0]
        if name.startswith("--") and "-" in name[2:]:
            p.error(f"{name} is spelt {'--' + name[2:].replace('-', '_')} now")
    args = p.parse_args(argv)
    if args.nanogpt is not None or args.compile:
        p.error("the training step against nanoGPT moved: python studies/nanogpt_speed.py "
                "/path/to/nanoGPT [--compile] (the same other flags)")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    args.only_given = args.only is not None
    if args.only is None:
        gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
        args.only = "llama7b,vit_b" + ("" if gpu and not args.full else ",sweep,gpt")
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    try:
        args.bwd_stages = [int(v) for v in args.bwd_stages.split(",") if v.strip()]
    except ValueError:
        p.error(f"--bwd_stages {args.bwd_stages}: give integers, e.g. 1,3")
    if any(v < 1 or v > 4 for v in args.bwd_stages):
        p.error("--bwd_stages: each depth from 1 to 4")
    if not args.dtypes or any(d not in DTYPES for d in args.dtypes):
        p.error(f"--dtypes {','.join(args.dtypes)!s}: choose from {', '.join(DTYPES)}")
    if not args.only or any(s not in ("llama7b", "vit_b", "sweep", "gpt") for s in args.only):
        p.error(f"--only {','.join(args.only)}: choose from llama7b, vit_b, sweep, gpt")
    if args.model_dtype is not None and args.model_dtype not in ("bf16", "fp32"):
        p.error(f"--model_dtype {args.model_dtype}: choose bf16 or fp32")
    if args.preset is not None and args.preset not in GPT_PRESETS:
        p.error(f"--preset {args.preset}: choose one of {', '.join(GPT_PRESETS)}")
    for flag in ("vit_batch", "gpt_batch", "passes", "threads", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    if args.warmup < 0 or (args.seq is not None and args.seq < 1):
        p.error("--warmup must be >= 0 and --seq >= 1")
    if args.device not in (None, "cuda", "cpu"):
        p.error(f"--device {args.device}: choose cuda or cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here")
    if args.seq is not None and args.preset is not None and args.seq > GPT_PRESETS[args.preset].get("block_size", 256):
        p.error(f"--seq {args.seq} is longer than the preset's block size")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:  # before minutes of timing, not after: a read-only or misspelt --out is one line
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, f".write_test.{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        print(f"kernel_lab.py: error: cannot write to --out {args.out}: {e.strerror or e}; pick a "
              "writable --out", file=sys.stderr)
        sys.exit(2)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Many shapes x dtypes x grad modes: let torch.compile keep one graph per case.
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.accumulated_recompile_limit = 4096
    torch.manual_seed(0)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    env = environment(device)
    print(f"{env['device']}; torch {env['torch']}, triton {env['triton']}; {env['date']}", flush=True)
    if device.type != "cuda":
        print("No CUDA GPU: CPU comparisons only. The fused Triton kernel, CUDA-event timings and "
              "peak GPU memory need a GPU (see the module docstring for the commands).", flush=True)
    out, tag = Path(args.out), device_tag(env)
    where = "CPU" if tag == "cpu" else env["device"]
    if args.model:
        preset = args.preset or ("llama7b" if device.type == "cuda" else "nano")
        stem, header, fmt = f"bench_model_{preset}_{tag}", MODEL_HEADER, format_model_row
        title = lambda r: (f"DyT model-level timing ({r['preset']}, {r['dtype']}, 1 x {r['seq_len']} tokens, "
                           f"{r['passes']} passes each) on {where}")
        bench = bench_model
    elif args.memory:
        stem, header, fmt = f"bench_memory_{tag}", MEMORY_HEADER, format_memory_row
        title, bench = lambda r: f"DyT memory of one training step on {where}", bench_memory
    else:
        # a partial run (--only, --ops) gets its own files, so that two halves run apart both survive
        stem = f"kernel_lab_{tag}" + (f"_{'_'.join(args.only)}" if args.only_given else "") + ("_ops" if args.ops else "")
        header, fmt, bench = KERNEL_HEADER, format_kernel_row, bench_kernels
        title = lambda r: f"DyT kernel-level benchmark on {where} (copy bandwidth {r['copy_gbps']:.1f} GB/s)"
    recorder = Recorder(out, stem, env, header, fmt, f"{stem} (partial)")
    result = bench(args, device, recorder.add)
    if bench is bench_kernels and not args.no_host_cost:
        result["host_cost"] = host_cost()
        result["notes"].append(host_cost_note(result["host_cost"]))
        print(host_cost_note(result["host_cost"]), flush=True)
    paths = recorder.finish(result, title(result))
    print()
    for note in result.get("notes", []):
        print(f"note: {note}")
    print(header)
    print(separator(header))
    print("\n".join(fmt(r) for r in result["rows"]))
    print(f"wrote {paths[0]} and {paths[1]}")

if __name__ == "__main__":
    main()
