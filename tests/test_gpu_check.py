"""gpu_check.py's plumbing on the CPU (GPU_CHECK_DRY=1: the same parts at CPU sizes, the
CUDA-only ones swapped for CPU work): it writes its three files and rewrites them after every
part (a kill leaves what finished), survives a part that hangs, and with --budget starts only
the parts that fit the time left."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def start(tmp_path, *args, hang="", commit=""):
    env = {**os.environ, "GPU_CHECK_DRY": "1", "GPU_CHECK_DRY_HANG": hang, "OMP_NUM_THREADS": "1",
           "GPU_CHECK_COMMIT": commit}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "gpu_check.py"), "--out", str(tmp_path / "out"),
                             "--work", str(tmp_path / "work"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def state(tmp_path):
    return json.loads((tmp_path / "out" / "gpu_check.json").read_text())


def test_dry_run_writes_the_summary_and_survives_a_hanging_part(tmp_path):
    p = start(tmp_path, hang="bench:3", commit="abc1234")  # a copy of the tree without .git
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["gpu_check.json", "gpu_check.md", "gpu_check.tgz"]
    parts = {r["name"]: r for r in state(tmp_path)["parts"]}
    assert list(parts) == ["env", "kernel_tests", "bench", "train_gpt", "train_vit", "lab_model"]
    assert parts["bench"]["status"] == "timed out after 3 s"
    assert all(parts[n]["status"] == "ok" for n in parts if n != "bench"), parts
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert out.rstrip().endswith(md.rstrip()[-2000:])  # printed as written
    assert "at commit abc1234; no budget" in md
    assert "passed" in "\n".join(parts["kernel_tests"]["headline"])
    assert any(line.startswith("final val loss") for line in parts["train_gpt"]["headline"])
    assert any("DyT plain" in line for line in parts["lab_model"]["headline"])
    with tarfile.open(tmp_path / "out" / "gpu_check.tgz") as tar:
        names = tar.getnames()
    assert {f"gpu_check/{n}.log" for n in parts} <= set(names) and not any(n.endswith(".pt") for n in names)


def test_a_kill_at_any_moment_leaves_what_finished(tmp_path):
    p = start(tmp_path, hang="train_gpt:600")
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                running = [r for r in state(tmp_path)["parts"] if r["status"] == "running" and "pid" in r]
            except (OSError, ValueError):
                running = []
            if running and running[0]["name"] == "train_gpt":
                break
            time.sleep(0.5)
        p.send_signal(signal.SIGKILL)  # the driver, mid-part
        p.wait(timeout=30)
        os.killpg(running[0]["pid"], signal.SIGKILL)  # and the part it was running
    finally:
        if p.poll() is None:
            p.kill()
    parts = {r["name"]: r for r in state(tmp_path)["parts"]}
    assert [parts[n]["status"] for n in ("env", "kernel_tests", "bench")] == ["ok"] * 3, parts
    assert parts["train_gpt"]["status"] == "running" and parts["train_vit"]["status"] == "waiting"
    assert "| bench | ok |" in (tmp_path / "out" / "gpu_check.md").read_text()
    assert any("DyT eager" in line for line in parts["bench"]["headline"])
    with tarfile.open(tmp_path / "out" / "gpu_check.tgz") as tar:
        assert "gpu_check/bench_cpu.json" in tar.getnames()


def test_a_budget_starts_only_the_parts_that_fit(tmp_path):
    p = start(tmp_path, "--budget", "-1")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "--budget -1: give seconds, or 0 for no limit" in err, err
    assert not (tmp_path / "out").exists()
    p = start(tmp_path, "--budget", "12")  # the env part (estimated 10 s) fits; no other does
    p.communicate(timeout=300)
    parts = {r["name"]: r for r in state(tmp_path)["parts"]}
    assert parts["env"]["status"] == "ok"
    assert all(parts[n]["status"].startswith("not run: estimated") for n in parts if n != "env"), parts
    assert "budget 12 s" in (tmp_path / "out" / "gpu_check.md").read_text()


def test_headline_rows_say_what_failed_and_which_timer_a_ratio_used():
    import gpu_check
    base = dict(shape="8x4096x4096", dtype="bf16", direction="fwd", op="DyT fused (Triton)")
    failed = gpu_check.short_row({**base, "error": "OutOfResources: shared memory"})
    assert failed.endswith("FAILED (OutOfResources: shared memory)")
    timed = {**base, "ms": 0.5, "gbps": 3000.0, "pct_copy": 70.0, "bytes_vs_l2": 9.0}
    assert gpu_check.short_row({**timed, "vs_rms": None}).endswith("vs RMSNorm -")  # no baseline: no 0.00x
    assert gpu_check.short_row({**timed, "vs_rms": 1.5, "vs_timer": "graph_ms"}).endswith("1.50x (graph times)")
    row = dict(shape="LLaMA 7B", dims="8x4096x4096", op="DyT fused (Triton)", fwd_ms=0.05, fwd_bwd_ms=0.2,
               gbps=3000.0, pct_copy=90.0, vs_rms=1.2, rel_err=1e-3)
    assert gpu_check.short_row(row).endswith("vs RMSNorm 1.20x, err 1.0e-03")
    skipped = {k: v for k, v in row.items() if k in ("shape", "dims", "op")} | {"skipped": "needs CUDA"}
    assert gpu_check.short_row(skipped) == "LLaMA 7B DyT fused (Triton): skipped (needs CUDA)"
