"""studies/: the small-GPT budget study end to end on tiny runs (the sweep, its tables, --reuse
from the runs table), stopped by SIGTERM and resumed exactly, and its one-line errors."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import train_common as tc  # noqa: E402
from studies import gpt_norms  # noqa: E402

TINY = "--n_layer 1 --eval_tokens 2048"


def budget(tmp_path, *extra):
    return ["budget", "--data", "default", "--widths", "32", "--out_dir", str(tmp_path / "runs"),
            "--results", str(tmp_path / "res"), "--train_args", TINY, "--jobs", "2", *extra]


def table(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_budget_sweeps_each_norm_records_every_run_and_reuses_the_table(tmp_path, capsys):
    data.default_data_dir()  # built once, before two children race for it
    argv = budget(tmp_path, "--steps", "9,18", "--norms", "rms,dyt", "--largest_only", "rms@2",
                  "--lrs", "rms=8e-3,16e-3;*=2e-3,4e-3", "--seeds", "0,1", "--extend", "1")
    rows = gpt_norms.main(argv)
    cells = [(r["steps"], r["norm"]) for r in rows]
    assert sorted(cells) == sorted([(9, "dyt"), (9, "rms"), (18, "dyt"), (18, "rms"), (18, "rms@2")])
    runs = table(tmp_path / "res" / "budget_gpt_runs.csv")
    for column in ("width", "norm", "lr", "seed", "status", "steps", "tokens", "params",
                   "tokens_per_param", "val_loss"):
        assert column in runs[0], column
    for r in runs:  # tokens per parameter from the run's own checkpoint
        assert int(r["tokens"]) == int(r["steps_budget"]) * 4096 and int(r["params"]) > 40_000
        assert float(r["tokens_per_param"]) == pytest.approx(int(r["tokens"]) / int(r["params"]), abs=0.01)
    # seeds run only at the largest budget; rms@2 only there; the gap to rms with its error
    by = {(r["steps"], r["norm"]): r for r in rows}
    assert by[(9, "dyt")]["seeds"] == 1 and by[(18, "dyt")]["seeds"] == 2
    assert "gap_to_rms" in by[(18, "dyt")] and "gap_se" in by[(18, "dyt")]
    assert by[(18, "dyt")]["gap_to_rms"] == pytest.approx(
        by[(18, "dyt")]["val_loss_mean"] - by[(18, "rms")]["val_loss_mean"], abs=2e-4)
    seed1 = [r for r in runs if r["seed"] == "1"]
    assert {r["steps_budget"] for r in seed1} == {"18"} and len(seed1) == 3
    # the recorded table alone is enough: no run directory, nothing trains again
    import shutil
    shutil.rmtree(tmp_path / "runs")
    capsys.readouterr()
    again = gpt_norms.main(argv + ["--reuse"])
    assert "--- start" not in capsys.readouterr().out and again == rows
    # a third seed trains only that seed, at each cell's best lr
    more = gpt_norms.main(argv[:argv.index("--seeds")] + ["--seeds", "0,1,2"] + argv[argv.index("--seeds") + 2:] + ["--reuse"])
    out = capsys.readouterr().out
    assert out.count("--- start") == 3 and all("_s2" in line for line in out.splitlines() if "--- start" in line)
    assert {r["norm"]: r["seeds"] for r in more if r["steps"] == 18} == {"dyt": 3, "rms": 3, "rms@2": 3}


def test_sigterm_stops_the_study_and_reuse_resumes_it_exactly(tmp_path):
    data.default_data_dir()
    argv = budget(tmp_path, "--steps", "300", "--norms", "dyt", "--largest_only", "", "--lrs", "2e-3",
                  "--seeds", "0", "--extend", "0", "--ckpt_interval", "40")
    cmd = [sys.executable, os.path.join(ROOT, "studies", "gpt_norms.py"), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "w32_300st_dyt_lr0.002_s0"
    deadline = time.time() + 120
    while not (run_dir / "ckpt.pt").exists() and time.time() < deadline:  # a first checkpoint
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: stopped") and "Traceback" not in err, err
    stopped_at = tc.load_checkpoint(str(run_dir / "ckpt.pt"))["step"]
    assert 0 < stopped_at < 300 and not (run_dir / "result.json").exists()
    p = subprocess.run(cmd + ["--reuse"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and f"--- resume {run_dir}" in p.stdout, p.stderr[-2000:]
    resumed = json.loads((run_dir / "result.json").read_text())
    # the same run, never stopped
    gpt_norms.main(budget(tmp_path / "straight", *argv[argv.index("--steps"):]))
    straight = json.loads((tmp_path / "straight" / run_dir.relative_to(tmp_path) / "result.json").read_text())
    assert resumed["status"] == "ok" and resumed["val_loss"] == straight["val_loss"]


@pytest.mark.parametrize("extra, needle", [
    (["--steps", "4"], "--steps 4 is too short for a warmup of 0.1111 of the run (0 steps)"),
    (["--data", "nowhere"], "--data nowhere is not a prepared directory"),
    (["--lrs", "rms=1e-3"], "--lrs gives no learning rates for dyt"),
    (["--norms", "dyx"], "unknown norm 'dyx'"),
])
def test_bad_input_is_one_line(tmp_path, capsys, extra, needle):
    with pytest.raises(SystemExit) as e:
        tc.main_guard(gpt_norms.main, budget(tmp_path) + extra)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err
