"""gpu_day.py's plumbing on the CPU (GPU_DAY_DRY=1: the same parts at CPU sizes, the CUDA-only
ones swapped for CPU work): it fits its budget, writes at most three files that come back
from the device, rewrites them after every part (a kill leaves what finished), survives a part
that hangs, and prints a summary that fits the device's 12,000 characters of output."""
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
    env = {**os.environ, "GPU_DAY_DRY": "1", "GPU_DAY_DRY_HANG": hang, "OMP_NUM_THREADS": "1",
           "GPU_DAY_COMMIT": commit}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "gpu_day.py"), "--out", str(tmp_path / "out"),
                             "--work", str(tmp_path / "work"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def state(tmp_path):
    return json.loads((tmp_path / "out" / "gpu_day.json").read_text())


def test_dry_run_writes_the_summary_and_survives_a_hanging_part(tmp_path):
    p = start(tmp_path, hang="bench_kernel:3", commit="abc1234")  # the device's tree has no .git
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["gpu_day.json", "gpu_day.md", "gpu_day.tgz"]
    parts = {r["name"]: r for r in state(tmp_path)["parts"]}
    assert list(parts) == ["env", "kernel_tests", "bench_kernel", "train_gpt", "train_vit"]
    assert parts["bench_kernel"]["status"] == "timed out after 3 s"
    assert all(parts[n]["status"] == "ok" for n in parts if n != "bench_kernel"), parts
    md = (tmp_path / "out" / "gpu_day.md").read_text()
    assert len(md) < 12000 and out.rstrip().endswith(md.rstrip()[-2000:])  # printed as written
    assert "at commit abc1234;" in md
    assert "passed" in "\n".join(parts["kernel_tests"]["headline"])
    assert any(line.startswith("final val loss") for line in parts["train_gpt"]["headline"])
    with tarfile.open(tmp_path / "out" / "gpu_day.tgz") as tar:
        names = tar.getnames()
    assert {f"gpu_day/{n}.log" for n in parts} <= set(names) and not any(n.endswith(".pt") for n in names)


def test_a_kill_at_any_moment_leaves_what_finished(tmp_path):
    p = start(tmp_path, hang="train_gpt:600")
    try:
        deadline = time.time() + 300
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
    assert [parts[n]["status"] for n in ("env", "kernel_tests", "bench_kernel")] == ["ok"] * 3, parts
    assert parts["train_gpt"]["status"] == "running" and parts["train_vit"]["status"] == "waiting"
    assert "| bench_kernel | ok |" in (tmp_path / "out" / "gpu_day.md").read_text()
    with tarfile.open(tmp_path / "out" / "gpu_day.tgz") as tar:
        assert "gpu_day/bench_cpu_gpt_ops.jsonl" in tar.getnames()


def test_the_budget_is_checked_before_anything_runs(tmp_path):
    for args, needle in ((["--budget", "1000"], "--budget 1000: give 1 to 480 s"),
                         (["--budget", "30"], "over --budget 30 s")):
        p = start(tmp_path, *args)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 2 and needle in err, err
        assert not (tmp_path / "out").exists()
    import gpu_day
    assert sum(est for _, est, _ in gpu_day.plan(False)) <= gpu_day.MAX_BUDGET


def test_headline_rows_say_what_failed_and_which_timer_a_ratio_used():
    import gpu_day
    base = dict(shape="8x4096x4096", dtype="bf16", direction="fwd", op="DyT fused (Triton)")
    failed = gpu_day.short_row({**base, "error": "OutOfResources: shared memory"})
    assert failed.endswith("FAILED (OutOfResources: shared memory)")
    timed = {**base, "ms": 0.5, "gbps": 3000.0, "pct_copy": 70.0, "bytes_vs_l2": 9.0}
    assert gpu_day.short_row({**timed, "vs_rms": None}).endswith("vs RMSNorm -")  # no baseline: no 0.00x
    assert gpu_day.short_row({**timed, "vs_rms": 1.5, "vs_timer": "graph_ms"}).endswith("1.50x (graph times)")
