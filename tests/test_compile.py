"""The GPU's configuration of each trainer where a CPU can run it: --compile under inductor
(torch.compile's default backend: on a CPU it generates C++, so it needs a compiler), bf16
autocast, and DyT's fused kernel as a custom op inside the compiled graph. On a CPU the kernel
runs under Triton's interpreter, and DyT calls it only on CUDA; the child process below
routes DyT's CPU calls to it too, so that the graph holds torch.ops.dyt.squash_fwd/bwd as it
does on a GPU. A few steps each, in a child (inductor's compile is process-wide state)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")),
                                    reason="inductor on a CPU needs a C++ compiler (g++, c++ or clang++)")

CHILD = """
import atexit, os, sys
sys.path.insert(0, {root!r})
import dyt, kernel
import torch._dynamo.utils as dynamo_utils
# on a CPU, DyT and Derf call the fused kernel (interpreted) wherever kernel.py runs
dyt.Dynamic.on_kernel = lambda self, x: self.use_kernel and self.channels_last and kernel.available(x)
calls = {{"fwd": 0, "bwd": 0}}
_fwd, _bwd = kernel._forward, kernel._backward
def fwd(*a, **k):
    calls["fwd"] += 1
    return _fwd(*a, **k)
def bwd(*a, **k):
    calls["bwd"] += 1
    return _bwd(*a, **k)
kernel._forward, kernel._backward = fwd, bwd
def report():
    c = dynamo_utils.counters
    print("REPORT " + __import__("json").dumps(dict(kernel_calls=calls, graphs=c["stats"]["unique_graphs"],
          graph_breaks=sum(c["graph_break"].values()))), file=sys.stderr, flush=True)
atexit.register(report)
import importlib, train_common as tc
tc.main_guard(importlib.import_module({module!r}).main, {argv!r})  # this __main__ keeps the patch's globals
"""


def run_compiled(file, argv):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    code = CHILD.format(root=ROOT, module=file.removesuffix(".py"), argv=list(argv))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(next(line for line in p.stderr.splitlines() if line.startswith("REPORT "))[7:])
    return p, report


@needs_compiler
@pytest.mark.parametrize("fsdp", [False, True], ids=["plain", "fsdp"])
def test_gpt_compiles_under_inductor_with_the_kernel_in_the_graph(tmp_path, fsdp):
    # with --fsdp: the GPU check's configuration (FSDP2 in bf16, compiled, then sampling)
    p, report = run_compiled("train_gpt.py", [
        "--norm", "dyt", "--dim", "32", "--n_layer", "2", "--n_head", "2", "--n_kv_head", "2",
        "--seq_len", "32", "--global_batch_tokens", "256", "--micro_batch", "8", "--max_steps", "3",
        "--warmup_steps", "1", "--eval_interval", "0", "--eval_tokens", "256", "--log_interval", "1",
        "--sample_tokens", "20" if fsdp else "0", "--dtype", "bf16", "--compile", "--device", "cpu",
        "--out_dir", str(tmp_path)] + (["--fsdp"] if fsdp else []))
    assert report["graphs"] >= 1 and report["graph_breaks"] == 0, report
    # 2 blocks x 2 DyT + the final one, forward in each step (and the probe, the evaluation)
    assert report["kernel_calls"]["fwd"] >= 3 * 5 and report["kernel_calls"]["bwd"] >= 3 * 5, report
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(r["loss"] == r["loss"] for r in rows) and "val_loss" in rows[-1]
    if fsdp:
        assert (tmp_path / "ckpt_dcp").is_dir() and "final val loss" in p.stdout


@needs_compiler
def test_vit_compiles_under_inductor_with_the_kernel_in_the_graph(tmp_path):
    from test_data_vision import write_fashion_mnist
    idx = tmp_path / "idx"
    idx.mkdir()
    write_fashion_mnist(idx, 64, 32)
    p, report = run_compiled("train_vit.py", [
        "--norm", "derf", "--dim", "32", "--depth", "2", "--heads", "2", "--batch_size", "16",
        "--eval_batch", "32", "--max_steps", "3", "--warmup_steps", "1", "--log_interval", "1",
        "--dtype", "bf16", "--compile", "--device", "cpu", "--data_dir", str(idx),
        "--out_dir", str(tmp_path / "run")])
    assert report["graphs"] >= 1 and report["graph_breaks"] == 0, report
    assert report["kernel_calls"]["fwd"] >= 5 * 3 and report["kernel_calls"]["bwd"] >= 5 * 3, report
    assert "final step 3" in p.stdout
