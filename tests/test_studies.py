"""studies/: the small-GPT budget study end to end on tiny runs (the sweep, its tables, --reuse
from the runs table), stopped by SIGTERM and resumed exactly, and its one-line errors."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import checkpoint as ck  # noqa: E402
import train_common as tc  # noqa: E402
from studies import gpt_norms, nanogpt_speed  # noqa: E402

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
    stopped_at = ck.load_checkpoint(str(run_dir / "ckpt.pt"))["step"]
    assert 0 < stopped_at < 300 and not (run_dir / "result.json").exists()
    p = subprocess.run(cmd + ["--reuse"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and f"--- resume {run_dir}" in p.stdout, p.stderr[-2000:]
    resumed = json.loads((run_dir / "result.json").read_text())
    # the same run, never stopped
    gpt_norms.main(budget(tmp_path / "straight", *argv[argv.index("--steps"):]))
    straight = json.loads((tmp_path / "straight" / run_dir.relative_to(tmp_path) / "result.json").read_text())
    assert resumed["status"] == "ok" and resumed["val_loss"] == straight["val_loss"]


def test_a_stopping_study_signals_each_child_once():
    # stop() runs on the signal and again on each cell's Interrupted: a second SIGTERM would
    # kill a child at once, while it saves its checkpoint
    counts = ("import signal, time\n"
              "n = []\n"
              "signal.signal(signal.SIGTERM, lambda *a: n.append(1))\n"
              "print('ready', flush=True)\n"
              "t = time.time()\n"
              "while time.time() - t < 1.5:\n"
              "    time.sleep(0.02)\n"
              "print(len(n))\n")
    launcher = gpt_norms.Launcher(jobs=2)
    child = subprocess.Popen([sys.executable, "-c", counts], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    launcher.children.add(child)
    launcher.stop()
    launcher.stop()
    assert child.stdout.read().strip() == "1" and child.wait() == 0


@pytest.mark.parametrize("extra, needle", [
    (["--steps", "4"], "--steps 4 is too short for a warmup of 0.1111 of the run (0 steps)"),
    (["--data", "nowhere"], "--data nowhere is not a prepared directory"),
    (["--lrs", "rms=1e-3"], "--lrs gives no learning rates for dyt"),
    (["--norms", "dyx"], "unknown norm 'dyx'"),
    (["--seed", "1"], "unknown flag --seed (did you mean --seeds?)"),  # not taken for --seeds
])
def test_bad_input_is_one_line(tmp_path, capsys, extra, needle):
    with pytest.raises(SystemExit) as e:
        tc.main_guard(gpt_norms.main, budget(tmp_path) + extra)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_nanogpt_attribution_models_swap_only_what_they_say():
    """studies/nanogpt_speed.py's attribution rows: AblatedAttention with RoPE and three matrices is
    model.GPTAttention (same weights, same output), and GPT-2's block (GELU MLP, one qkv matrix)
    has nanoGPT's 12 dim^2 weights a block."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    cfg = GPTConfig(dim=32, n_layer=2, n_head=4, n_kv_head=4, ffn_dim=64, block_size=16, vocab_size=40, norm="ln")
    ours = GPT(cfg)
    same = GPT(cfg)
    for block in same.blocks:
        block.attn = nanogpt_speed.AblatedAttention(32, 4, rope=True, one_matrix=False)
    same.load_state_dict(ours.state_dict())  # the same names and shapes
    idx = torch.randint(0, 40, (2, 16))
    torch.testing.assert_close(same(idx)[0], ours(idx)[0], rtol=0, atol=0)
    gpt2 = nanogpt_speed.gpt2_parts(GPT(cfg), gelu_mlp=True, rope=False, one_qkv=True)
    block_weights = sum(p.numel() for p in gpt2.blocks[0].parameters() if p.dim() == 2)
    assert block_weights == 12 * 32 ** 2
    assert torch.isfinite(gpt2(idx, idx)[1])
    without_rope = nanogpt_speed.gpt2_parts(GPT(cfg), rope=False)
    without_rope.load_state_dict(ours.state_dict())
    assert not torch.allclose(without_rope(idx)[0], ours(idx)[0])  # RoPE did something


# ---------------------------------------------------------------------------------------------
# norms and saturation (the GPT at each norm's best lr across widths; why gamma 1 stalls)

GPT_TINY = ["--dim", "32", "--n_layer", "1", "--n_head", "2", "--n_kv_head", "2", "--seq_len", "32",
            "--micro_batch", "4", "--global_batch_tokens", "128", "--warmup_steps", "1",
            "--eval_tokens", "512", "--log_interval", "1", "--eval_interval", "0",
            "--sample_tokens", "0", "--ckpt_interval", "0", "--device", "cpu"]


def outputs(results, name, tables=("",)):
    for t in tables:
        assert (results / f"{name}{t}.md").exists() and (results / f"{name}{t}.csv").exists(), name + t


def flags_of(argv):
    """(norm, lr, seed) of a run's train_gpt.py flags."""
    value = lambda flag: argv[len(argv) - 1 - argv[::-1].index(flag) + 1]
    return value("--norm"), float(value("--lr")), int(value("--seed"))


def test_gpt_norms_at_best_lr_and_saturation_trace(tmp_path):
    # the lr sweep runs at the first seed, the other seeds at the best lr; NAME@gG sets gamma0,
    # NAME@R the output RMS at init
    tiny = [f for f in " ".join(GPT_TINY).replace("--dim 32 ", "").replace("--n_head 2 ", "")
            .replace("--n_kv_head 2 ", "").split()]
    rows = gpt_norms.main(["norms", "--widths", "32,64", "--norms", "rms,dyt@g1", "--lrs", "1e-3,3e-3",
                         "--seeds", "0,1", "--extend", "0", "--steps", "2", "--train_args", " ".join(tiny),
                         "--out_dir", str(tmp_path / "runs"), "--results", str(tmp_path), "--jobs", "2"])
    outputs(tmp_path, "norms_gpt", ("", "_runs"))
    assert [(r["width"], r["norm"], r["seeds"]) for r in rows] == [
        (32, "rms", 2), (32, "dyt@g1", 2), (64, "rms", 2), (64, "dyt@g1", 2)]
    for r in rows:
        sweep = {float(lr): float(v) for lr, v in
                 (item.split(":") for item in r["swept (lr: val loss at seed 0)"].split())}
        assert sorted(sweep) == [1e-3, 3e-3]
        assert r["best_lr"] == min(sweep, key=sweep.get) and np.isfinite(r["val_loss_mean"])
    (seed1_run,) = (tmp_path / "runs").glob("w64_dyt_atg1_lr*_s1_2")  # the flags reached the run
    state = ck.load_checkpoint(str(seed1_run / "ckpt.pt"))
    assert state["model_config"]["dim"] == 64 and state["model_config"]["dyt_gamma0"] == 1.0
    rows = gpt_norms.main(["saturation", "--norms", "dyt@g1,derf,rms@2", "--at", "1,3",
                         "--train_args", " ".join(GPT_TINY + ["--max_steps", "3"]), "--n", "2",
                         "--out_dir", str(tmp_path / "runs"), "--results", str(tmp_path)])
    outputs(tmp_path, "saturation_gpt", ("", "_layers"))
    assert [(r["norm"], r["step"]) for r in rows] == [("dyt@g1", 1), ("dyt@g1", 3), ("derf", 1),
                                                       ("derf", 3), ("rms@2", 1), ("rms@2", 3)]
    assert all(0 <= r["saturated_in_blocks"] <= 1 for r in rows if r["norm"] != "rms@2")
    assert all(r["saturated_final"] == "" for r in rows if r["norm"] == "rms@2")
    state = ck.load_checkpoint(str(tmp_path / "runs" / "saturation_rms_at2_s0" / "ckpt.pt"))
    assert state["model_config"]["norm_out_rms"] == 2.0  # NAME@R reached the run
    assert all(r["residual_rms_last_block"] > 0 and 0 <= r["common_share_last_block"] <= 1 + 1e-6
               for r in rows)
    with pytest.raises(tc.UserError, match="unknown norm"):
        gpt_norms.main(["norms", "--norms", "dyx", "--results", str(tmp_path)])


def test_lr_sweep_extends_past_an_edge(tmp_path, monkeypatch):
    # a best lr at the sweep's edge is not known to be best: the sweep goes on by factors of 2
    # (at most --extend runs); the loss here is lowest at lr 8e-3, beyond the sweep's 4e-3
    ran = []
    def fake_run(self, argv, out_dir):
        spec, lr, seed = flags_of(argv)
        ran.append((lr, seed))
        loss = (math.log2(lr / 8e-3)) ** 2 + 1 + 0.01 * seed
        return {"status": "ok", "val_loss": loss}
    monkeypatch.setattr(gpt_norms.Launcher, "run", fake_run)
    base = ["norms", "--widths", "64", "--norms", "dyt", "--seeds", "0,1", "--results", str(tmp_path)]
    (row,) = gpt_norms.main(base + ["--lrs", "1e-3,2e-3,4e-3"])
    assert [lr for lr, seed in ran if seed == 0] == pytest.approx([1e-3, 2e-3, 4e-3, 8e-3, 16e-3])
    assert row["best_lr"] == pytest.approx(8e-3) and ran[-1] == (row["best_lr"], 1)
    ran.clear()
    (row,) = gpt_norms.main(base + ["--lrs", "16e-3,32e-3", "--extend", "1"])  # the low edge
    assert [lr for lr, seed in ran if seed == 0] == pytest.approx([16e-3, 32e-3, 8e-3])
    ran.clear()
    (row,) = gpt_norms.main(base + ["--lrs", "4e-3,8e-3,16e-3"])  # inside: nothing added
    assert len(ran) == 4 and row["best_lr"] == pytest.approx(8e-3)


def test_norms_reuse_reads_the_recorded_runs_table(tmp_path, monkeypatch):
    # run directories are scratch; with --reuse the committed NAME_runs.csv is read back, so a
    # later session adds a seed without retraining the rest; another budget's table is not reused
    ran = []
    def fake_run(self, argv, out_dir):
        spec, lr, seed = flags_of(argv)
        ran.append((spec, lr, seed))
        loss = 1 + abs(math.log2(lr / 2e-3)) + 0.01 * seed if spec == "dyt" else float("inf")
        status = "ok" if spec == "dyt" else "diverged: loss is nan"
        return {"status": status, "steps": 5, **({"val_loss": loss} if spec == "dyt" else {})}
    monkeypatch.setattr(gpt_norms.Launcher, "run", fake_run)
    base = ["norms", "--widths", "64", "--norms", "dyt,derf", "--lrs", "1e-3,2e-3,4e-3", "--extend",
            "0", "--results", str(tmp_path)]
    first = gpt_norms.main(base + ["--seeds", "0,1"])
    assert len(ran) == 8
    ran.clear()
    again = gpt_norms.main(base + ["--seeds", "0,1,2", "--reuse"])
    assert ran == [("dyt", 2e-3, 2), ("derf", 1e-3, 2)]  # only the new seed trains
    assert again[0]["val_loss_mean"] == pytest.approx(np.mean([1, 1.01, 1.02]))
    assert again[0]["swept (lr: val loss at seed 0)"] == first[0]["swept (lr: val loss at seed 0)"]
    assert again[1]["diverged"] == 3  # a recorded divergence stays one
    ran.clear()
    (fewer,) = gpt_norms.main(base + ["--norms", "dyt", "--seeds", "0", "--reuse"])  # a subset
    assert ran == [] and fewer["seeds"] == 1
    with open(tmp_path / "norms_gpt_runs.csv") as f:
        assert len(f.readlines()) == 1 + 2 * 5  # every recorded run is still in the table
    gpt_norms.main(base + ["--seeds", "0,1,2", "--reuse", "--steps", "7"])  # another budget
    assert len(ran) == 10  # all retrained: 3 lrs + 2 more seeds, per norm


def test_norms_preset_runs_the_preset_shape(tmp_path, monkeypatch):
    # --preset micro: the trainer gets the preset (its dim, layers, kv heads, steps), not the
    # default run's width flags; its table says so, and --widths beside it is a one-line error
    seen = []
    def fake_run(self, argv, out_dir):
        seen.append((argv, os.path.basename(out_dir)))
        return {"status": "ok", "steps": 1000, "val_loss": 1.0 + len(seen) * 0.01}
    monkeypatch.setattr(gpt_norms.Launcher, "run", fake_run)
    (row,) = gpt_norms.main(["norms", "--preset", "micro", "--norms", "dyt", "--lrs", "1e-3", "--extend",
                           "0", "--seeds", "0,1", "--results", str(tmp_path)])
    assert row["width"] == 256 and row["seeds"] == 2
    for argv, run_dir in seen:
        assert argv[argv.index("--preset") + 1] == "micro" and "--dim" not in argv
        assert "--n_kv_head" not in argv and run_dir.startswith("micro_dyt_lr0.001_s")
    assert "--preset micro" in (tmp_path / "norms_gpt_runs.md").read_text().splitlines()[0]
    with pytest.raises(tc.UserError, match="drop --widths"):
        gpt_norms.main(["norms", "--preset", "micro", "--widths", "128", "--results", str(tmp_path)])
    with pytest.raises(tc.UserError, match="choose one of"):
        gpt_norms.main(["norms", "--preset", "mikro", "--results", str(tmp_path)])


def test_norm_specs_name_their_init():
    assert gpt_norms.norm_spec("dyt") == ("dyt", [])
    assert gpt_norms.norm_spec("rms@2.5") == ("rms", ["--norm_out_rms", "2.5"])
    assert gpt_norms.norm_spec("dyt@g1") == ("dyt", ["--dyt_gamma0", "1"])
    assert gpt_norms.norm_spec("dyt@a2@1") == ("dyt", ["--alpha0_attn", "2", "--alpha0_other", "2",
                                                       "--norm_out_rms", "1"])
    for bad in ("dyt@x", "dyt@a", "dyx@1"):
        with pytest.raises(tc.UserError):
            gpt_norms.norm_spec(bad)


# ---------------------------------------------------------------------------------------------
# studies/vit_norms.py: the ViT study's plumbing on tiny runs (not its numbers)

VIT_TINY = "--dim 16 --depth 1 --heads 2 --batch_size 16 --eval_batch 100 --log_interval 5"


def vit_study(tmp_path, idx, *extra):
    return ["--data_dir", str(idx), "--out_dir", str(tmp_path / "runs"), "--results", str(tmp_path / "res"),
            "--train_args", VIT_TINY, "--jobs", "2", *extra]


def test_vit_study_sweeps_lr_then_alpha0_then_seeds_and_reuses_its_table(tmp_path, capsys):
    from studies import vit_norms
    from test_data_vision import write_fashion_mnist
    idx = tmp_path / "idx"
    idx.mkdir()
    write_fashion_mnist(idx, 160, 50)  # 10 steps an epoch
    argv = vit_study(tmp_path, idx, "--epochs", "0.5,1", "--norms", "ln,dyt", "--lrs", "2e-3,4e-3",
                     "--extend", "0", "--alpha0s", "2", "--seeds", "0,1", "--seed_epochs", "1")
    rows = vit_norms.main(argv)
    assert [(r["epochs"], r["norm"]) for r in rows] == [(0.5, "ln"), (0.5, "dyt"), (1, "ln"), (1, "dyt")]
    runs = table(tmp_path / "res" / "vit_norms_runs.csv")
    for column in ("epochs", "norm", "lr", "alpha0", "seed", "status", "steps", "test_top1", "test_top5",
                   "test_loss", "params", "images_per_s"):
        assert column in runs[0], column
    by = {(r["epochs"], r["norm"]): r for r in rows}
    # ln: 2 lrs; dyt: 2 lrs at alpha0 1, then alpha0 2 at the better lr; seed 1 at epochs 1 only
    cell = lambda e, n: [r for r in runs if (float(r["epochs"]), r["norm"]) == (e, n)]
    assert len(cell(0.5, "ln")) == 2 and len(cell(0.5, "dyt")) == 3
    assert len(cell(1, "ln")) == 3 and len(cell(1, "dyt")) == 4
    assert {float(r["alpha0"]) for r in cell(1, "ln")} == {0.0}
    dyt_first = {(float(r["lr"]), float(r["alpha0"])): float(r["test_top1"]) for r in cell(1, "dyt") if r["seed"] == "0"}
    assert (by[(1, "dyt")]["best_lr"], by[(1, "dyt")]["best_alpha0"]) == max(dyt_first, key=dyt_first.get)
    assert by[(1, "dyt")]["seeds"] == 2 and by[(0.5, "dyt")]["seeds"] == 1
    assert by[(1, "dyt")]["gap_to_ln"] == pytest.approx(by[(1, "dyt")]["top1_mean"] - by[(1, "ln")]["top1_mean"], abs=0.011)
    assert "gap_se" in by[(1, "dyt")]
    seed1 = [r for r in runs if r["seed"] == "1"][0]
    assert int(seed1["steps"]) == 10 and seed1["status"] == "ok"
    # the committed table alone: nothing trains again, and the summary is the same
    import shutil
    shutil.rmtree(tmp_path / "runs")
    capsys.readouterr()
    assert vit_norms.main(argv + ["--reuse"]) == rows and "--- start" not in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [
    (["--norms", "ln,tanh"], "unknown norm 'tanh'"),
    (["--epochs", "a"], "--epochs takes comma-separated numbers"),
    (["--jobs", "0"], "--jobs and --threads must be >= 1"),
    (["--seed", "1"], "did you mean --seeds"),
])
def test_vit_study_bad_input_is_one_line(tmp_path, capsys, extra, needle):
    from studies import vit_norms
    with pytest.raises(SystemExit) as e:
        tc.main_guard(vit_norms.main, vit_study(tmp_path, tmp_path, *extra))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err


def test_vit_study_without_data_names_the_fix(tmp_path, capsys):
    from studies import vit_norms
    with pytest.raises(SystemExit):
        tc.main_guard(vit_norms.main, vit_study(tmp_path, tmp_path / "empty", "--norms", "ln"))
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "apt-get install dataset-fashion-mnist" in err, err


def test_recipe_study_branches_every_shorter_budget_from_one_long_run(tmp_path, capsys):
    """Muon and AdamW under warmup-stable-decay: per (optimizer, norm, lr, seed) one long run
    keeps its stable-phase checkpoint, the shorter budget branches from it; the table records
    every run with its optimizer, schedule and branch, and --reuse trains nothing again."""
    data.default_data_dir()
    argv = ["recipe", "--data", "default", "--widths", "32", "--steps", "9,18", "--decay_fraction", "0.34",
            "--norms", "rms,dyt", "--optimizers", "muon,adamw", "--lrs", "muon:*=0.02;adamw:*=4e-3",
            "--seeds", "0,1", "--extend", "0", "--out_dir", str(tmp_path / "runs"),
            "--results", str(tmp_path / "res"), "--train_args", TINY, "--jobs", "2"]
    rows = gpt_norms.main(argv)
    assert sorted((r["optimizer"], r["steps"], r["norm"]) for r in rows) == sorted(
        (o, s, n) for o in ("muon", "adamw") for s in (9, 18) for n in ("rms", "dyt"))
    assert all(r["seeds"] == 2 and r["schedule"] == "wsd" for r in rows)
    runs = table(tmp_path / "res" / "recipe_gpt_runs.csv")
    assert len(runs) == 2 * 2 * 2 * 2  # optimizer x norm x seed x budget
    short = [r for r in runs if r["steps_budget"] == "9"]
    assert all(r["branched_from"].endswith("_18st step 6") for r in short)  # 9 - round(0.34 * 9)
    assert all(r["branched_from"] == "" for r in runs if r["steps_budget"] == "18")
    assert all(int(r["steps"]) == int(r["steps_budget"]) and r["status"] == "ok" for r in runs)
    by = {(r["optimizer"], r["steps"], r["norm"]): r for r in rows}
    assert "gap_to_rms" in by[("muon", 9, "dyt")] and "gap_se" in by[("muon", 9, "dyt")]
    import shutil
    shutil.rmtree(tmp_path / "runs")
    capsys.readouterr()
    assert gpt_norms.main(argv + ["--reuse"]) == rows and "--- start" not in capsys.readouterr().out
