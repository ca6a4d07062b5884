"""studies/kernel_lab.py (and bench.py's primitives it builds on): the bytes-moved formulas by hand
arithmetic, the CPU mode end to end, Table 7 on a tiny model, rows written as they finish, bad flags."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))
import bench  # noqa: E402
import kernel_lab  # noqa: E402


def test_bytes_forward_is_read_x_plus_write_y():
    # LLaMA-7B activation, one 4096-token sequence, bf16: 4096*4096 = 16,777,216 elements of
    # 2 bytes; read once + written once = 67,108,864 bytes (64 MiB).
    assert bench.bytes_forward(4096 * 4096, 2) == 67_108_864
    # eight sequences in fp32: 134,217,728 elements * 4 bytes * 2 = 1 GiB
    assert bench.bytes_forward(8 * 4096 * 4096, 4) == 1_073_741_824
    # ViT-B, batch 128: 128*197*768 = 19,365,888 elements; bf16 -> 77,463,552 bytes
    assert bench.bytes_forward(128 * 197 * 768, 2) == 77_463_552


def test_bytes_backward_and_forward_backward():
    # backward: read x, read dy, write dx = 3 passes; with the forward 5 passes
    assert bench.bytes_backward(4096 * 4096, 2) == 100_663_296
    assert bench.bytes_forward_backward(4096 * 4096, 2) == 167_772_160
    assert bench.bytes_forward_backward(10, 4) == 200
    assert kernel_lab.bytes_moved("fwd", 10, 4) == 80
    assert kernel_lab.bytes_moved("fwd+bwd", 10, 2) == 100
    with pytest.raises(ValueError):
        kernel_lab.bytes_moved("bwd", 10, 2)


def test_copy_bytes_and_bandwidth():
    assert bench.bytes_copy(2 ** 28, 4) == 2 * 2 ** 30  # 1 GiB read + 1 GiB written
    # 1e9 bytes in 1 ms is 1000 GB/s; 3e9 bytes in 1 ms is 3 TB/s
    assert bench.bandwidth_gbps(1e9, 1.0) == pytest.approx(1000.0)
    assert bench.bandwidth_gbps(3e9, 1.0) == pytest.approx(3000.0)


def test_quantile_interpolates():
    assert bench.quantile([3, 1, 2], 0.5) == 2
    assert bench.quantile([1, 2, 3, 4], 0.5) == 2.5
    assert bench.quantile([1, 2, 3, 4, 5], 0.2) == pytest.approx(1.8)


def test_saved_for_backward_by_hand():
    # plain DyT saves x (for d/dalpha of alpha*x) and tanh(alpha*x) (for the tanh and gamma
    # products): 2 activations. LayerNorm saves x and a mean and an rstd per row.
    n, c = 64, 32
    x = torch.randn(n, c)
    alpha = torch.full((1,), 0.5, requires_grad=True)
    w, b = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
    dyt_bytes = kernel_lab.saved_for_backward_bytes(lambda: bench.reference("dyt", x, [alpha, w, b]).sum(), [alpha, w, b])
    assert dyt_bytes == 2 * n * c * 4
    ln_bytes = kernel_lab.saved_for_backward_bytes(
        lambda: torch.nn.functional.layer_norm(x, (c,), w, b).sum(), [w, b])
    assert ln_bytes == n * c * 4 + 2 * n * 4


def test_check_sees_every_output_and_nan():
    # check() reports one error per output; a layer that leaves an output unwritten is NaN
    # under nan_poisoned, and NaN fails the tolerance.
    torch.manual_seed(0)
    x = torch.randn(16, 8, requires_grad=True)
    dy = torch.randn(16, 8)
    params = bench.random_params("derf", 8, torch.float32, torch.device("cpu"))
    errs = bench.check("derf", lambda x: bench.reference("derf", x, params), params, x, dy)
    assert set(errs) == {"y", "dx", "dalpha", "dshift", "dweight", "dbias"}
    # fp32 against float64: y and dx round once (~6e-8); the scalar sums dalpha and dshift
    # cancel, so their relative error reaches ~1e-6 on some seeds
    assert max(errs[k] for k in ("y", "dx", "dweight", "dbias")) < 1e-6
    assert max(errs[k] for k in ("dalpha", "dshift")) < 1e-5

    def forgetful(x):  # y's last row never written
        y = torch.empty_like(x)
        y[:-1] = bench.reference("derf", x[:-1], params)
        return y

    with bench.nan_poisoned(torch.device("cpu"), [], compiled=False):
        errs = bench.check("derf", forgetful, params, x, None)
    assert not errs["y"] <= bench.tolerance(torch.float32, "y")


def run_bench(args, tmp_path, timeout):
    start = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "studies" / "kernel_lab.py"), "--out", str(tmp_path), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc, time.time() - start


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU mode")
def test_cpu_mode_writes_results(tmp_path):
    # no wall-clock assertion: on a shared machine the time says more about the load than about
    # the code (85 s loaded, 14 s quiet); timings belong in the benchmark's own output
    proc, _ = run_bench([], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "need a GPU" in proc.stdout
    result = json.loads((tmp_path / "kernel_lab_cpu.json").read_text())
    env = result["environment"]
    assert env["device"].startswith("CPU") and env["torch"] == torch.__version__ and env["date"]
    assert result["copy_gbps"] > 0
    rows = result["rows"]
    assert {r["set"] for r in rows} == {"llama7b", "vit_b", "sweep", "gpt"}
    assert {r["direction"] for r in rows} == {"fwd", "fwd+bwd"}
    timed = [r for r in rows if "ms" in r]
    assert {r["op"] for r in timed} >= {"DyT plain", "DyT compile", "LayerNorm", "RMSNorm"}
    for r in timed:
        assert r["ms"] > 0 and r["gbps"] == pytest.approx(r["bytes"] / (r["ms"] * 1e6))
        for k, v in r["rel_errs"].items():
            assert v <= bench.tolerance(bench.DTYPES[r["dtype"]], k), (r["op"], k, v)
    fused = [r for r in rows if r["op"] in ("DyT fused (Triton)", "Derf fused (Triton)",
                                            "DyT fused tanh.approx")]
    assert fused and all("GPU" in r["skipped"] for r in fused)
    # every output checked against float64: y, and for fwd+bwd dx and each parameter gradient
    for r in timed:
        assert "y" in r["rel_errs"]
        if r["direction"] == "fwd+bwd":
            want = {"dx", "dweight"} | ({"dalpha", "dbias"} if r["op"].startswith("DyT") else set())
            want |= {"dshift"} if r["op"].startswith("Derf") else set()
            assert want <= set(r["rel_errs"]), (r["op"], r["rel_errs"])
    assert "Derf plain" in {r["op"] for r in timed}
    # the copy ceiling at the layer's own size beside the large one
    assert result["copy_gbps_layer_size"] and all(v > 0 for v in result["copy_gbps_layer_size"].values())
    assert all(r["pct_copy"] > 0 and r["pct_copy_1gib"] > 0 for r in timed)
    # the fused kernel's host cost, launches stubbed, measured on the CPU
    host = result["host_cost"]
    assert "error" not in host, host
    assert host["fwd_bwd_us"] > host["fwd_us"] > 0 and host["floor_fwd_bwd_us"] > 0
    assert "host cost of one fused DyT call" in (tmp_path / "kernel_lab_cpu.md").read_text()
    md = (tmp_path / "kernel_lab_cpu.md").read_text()
    assert env["device"] in md and "| DyT compile |" in md


def test_model_mode_tiny_on_cpu(tmp_path):
    proc, _ = run_bench(["--model", "--device", "cpu", "--preset", "nano", "--seq", "32",
                         "--passes", "2", "--warmup", "1"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "bench_model_nano_cpu.json").read_text())
    by_model = {r["model"]: r for r in result["rows"]}
    assert {"RMSNorm", "DyT plain", "identity (no norm)"} <= set(by_model)
    assert by_model["RMSNorm"]["n_norm_layers"] == 2 * 4 + 1  # two per block and the final one
    assert by_model["DyT plain"]["forward_backward_s"] > 0
    assert "norm_forward_backward_s_subtract" in by_model["DyT plain"]


@pytest.mark.parametrize("flags", [["--bogus"], ["--dtypes", "fp8"], ["--only", "resnet"],
                                   ["--model", "--memory"], ["--preset", "gpt5"], ["--passes", "0"],
                                   ["--bwd_stages", "x"], ["--bwd_stages", "9"], ["--no-host-cost"],
                                   ["--nanogpt", "/nonexistent"], ["--compile"], ["--ops", "DyT magic"]])
def test_bad_flags_give_one_line(flags, tmp_path):
    proc, _ = run_bench(flags, tmp_path, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kernel_lab.py: error:"), proc.stderr


def test_each_row_is_written_as_it_finishes(tmp_path):
    # a run killed part-way (a device call's timeout) keeps every row it finished
    patch = ("import os, signal, sys\n"
             "sys.path.insert(0, 'studies')\n"
             "import kernel_lab as bench\n"
             "_add = bench.Recorder.add\n"
             "def add(self, row):\n"
             "    _add(self, row)\n"
             "    if len(self.rows) == 2:\n"
             "        os.kill(os.getpid(), signal.SIGKILL)\n"
             "bench.Recorder.add = add\n"
             "sys.argv = ['kernel_lab.py'] + sys.argv[1:]; bench.main()\n")
    proc = subprocess.run([sys.executable, "-c", patch, "--out", str(tmp_path), "--device", "cpu",
                           "--only", "gpt", "--ops", "RMSNorm,LayerNorm", "--no_host_cost"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    stem = "kernel_lab_cpu_gpt_ops"
    rows = [json.loads(line) for line in (tmp_path / f"{stem}.jsonl").read_text().splitlines()]
    assert [r["op"] for r in rows] == ["LayerNorm", "RMSNorm"] and all(r["ms"] > 0 for r in rows)
    md = (tmp_path / f"{stem}.md").read_text()
    assert "partial" in md and md.count("| gpt | 2048x384 |") == 2
    assert not (tmp_path / f"{stem}.json").exists()  # the whole-run file only at the end


def test_model_mode_reports_its_spread(tmp_path):
    proc, _ = run_bench(["--model", "--device", "cpu", "--preset", "nano", "--seq", "32",
                         "--passes", "4", "--repeats", "2", "--warmup", "1"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "bench_model_nano_cpu.json").read_text())
    dyt = next(r for r in result["rows"] if r["model"] == "DyT plain")
    assert dyt["forward_se_s"] >= 0 and dyt["norm_forward_s_subtract_ci"] >= 0
    assert isinstance(dyt["norm_forward_backward_s_subtract_within_noise"], bool)
    assert "+-" in (tmp_path / "bench_model_nano_cpu.md").read_text()


def test_a_row_that_raises_is_recorded_and_the_rest_run(tmp_path):
    # on a GPU a compile, launch or memory error in one row must not cost the others
    patch = ("import sys\n"
             "sys.path.insert(0, 'studies')\n"
             "import kernel_lab as bench\n"
             "_ops = bench.kernel_ops\n"
             "def broken(*a, **k):\n"
             "    raise RuntimeError('injected launch failure')\n"
             "def kernel_ops(*a, **k):\n"
             "    ops, notes = _ops(*a, **k)\n"
             "    return [(n, kind, broken if n == 'LayerNorm' else b) for n, kind, b in ops], notes\n"
             "bench.kernel_ops = kernel_ops\n"
             "sys.argv = ['kernel_lab.py'] + sys.argv[1:]; bench.main()\n")
    proc = subprocess.run([sys.executable, "-c", patch, "--out", str(tmp_path), "--device", "cpu",
                           "--only", "gpt", "--ops", "LayerNorm,RMSNorm", "--no_host_cost"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "kernel_lab_cpu_gpt_ops.json").read_text())["rows"]
    failed = [r for r in rows if r["op"] == "LayerNorm"]
    assert failed and all(r["error"] == "RuntimeError: injected launch failure" and "ms" not in r
                          and r["vs_rms"] is None for r in failed)
    assert all(r["ms"] > 0 and r["vs_rms"] == 1 for r in rows if r["op"] == "RMSNorm")
    assert "failed: RuntimeError: injected launch failure" in (tmp_path / "kernel_lab_cpu_gpt_ops.md").read_text()
