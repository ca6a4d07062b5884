"""bench.py, the kernel timer: one short table on the CPU, every timed row checked against
float64, files written, bad and moved flags in one line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(args, tmp_path, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "bench.py"), "--out", str(tmp_path), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU table")
def test_one_short_table_on_the_cpu(tmp_path):
    proc = run([], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.strip().splitlines()
    assert len(out) <= 30, out  # the door stays one screen
    assert any("fused Triton rows need one" in line for line in out)
    result = json.loads((tmp_path / "bench_cpu.json").read_text())
    rows = result["rows"]
    assert [r["shape"] for r in rows[:1]] == ["LLaMA 7B"] and {r["shape"] for r in rows} == {"LLaMA 7B", "ViT-B"}
    timed = [r for r in rows if "fwd_bwd_ms" in r]
    names = {r["op"] for r in timed}
    assert {"DyT eager", "Derf eager", "RMSNorm (F.rms_norm)", "LayerNorm (F.layer_norm)"} <= names
    for r in timed:
        assert 0 < r["fwd_ms"] and 0 < r["fwd_bwd_ms"] and r["rel_err"] < 1e-4, r
        assert r["gbps"] == pytest.approx(5 * 4 * int(eval(r["dims"].replace("x", "*"))) / (r["fwd_bwd_ms"] * 1e6))
    assert all(r["vs_rms"] == 1 for r in timed if r["op"] == "RMSNorm (F.rms_norm)")
    fused = [r for r in rows if "fused" in r["op"]]
    assert fused and all("CUDA" in r["skipped"] for r in fused)
    md = (tmp_path / "bench_cpu.md").read_text()
    assert result["environment"]["device"] in md and "| LLaMA 7B 512x4096 | DyT eager |" in md
    assert "fused (Triton)" not in md.split("| shape |")[1]  # noted once, not as empty rows


@pytest.mark.parametrize("flags, needle", [
    (["--bogus"], "unrecognized arguments"), (["--dtype", "fp8"], "invalid choice"),
    (["--model"], "python studies/kernel_lab.py --model"),
    (["--no-host-cost"], "python studies/kernel_lab.py --no_host_cost"),
    (["--threads", "0"], "at least 1")])
def test_bad_and_moved_flags_give_one_line(tmp_path, flags, needle):
    proc = run(flags, tmp_path, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("bench.py: error:"), proc.stderr
    assert needle in lines[0], lines[0]
