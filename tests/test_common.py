"""train_common.py: CLI parsing, schedule, batch arithmetic, checkpoints, RNG, loss guard."""
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint as ck  # noqa: E402
from run import LossGuard, RunLogger  # noqa: E402
import train_common as tc  # noqa: E402

PRESETS = {"small": {"lr": 1.0, "warmup_steps": 5}}


def test_preset_then_overrides_and_bools():
    cfg, preset, given = tc.parse_config(tc.TrainConfig, PRESETS,
                                         ["--preset", "small", "--lr", "0.5", "--fsdp",
                                          "--no-compile", "--wandb=false"])
    assert preset == "small" and cfg.lr == 0.5 and cfg.warmup_steps == 5
    assert cfg.fsdp is True and cfg.compile is False and cfg.wandb is False
    assert given == {"lr", "fsdp", "compile", "wandb"}
    cfg, _, _ = tc.parse_config(tc.TrainConfig, PRESETS, ["--fsdp=true", "--resume", "no"])
    assert cfg.fsdp is True and cfg.resume is False


@pytest.mark.parametrize("argv, needle", [
    (["--lrr", "1"], "unknown flag --lrr (did you mean --lr?)"),
    (["--lr", "fast"], "invalid float value"),
    (["--preset", "smal"], "did you mean small?"),
    (["--fsdp=maybe"], "expected true or false"),
    (["--dtype", "fp8"], "invalid choice"),
])
def test_bad_flags_are_one_line_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        tc.parse_config(tc.TrainConfig, PRESETS, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.startswith("error:") and len(err.splitlines()) == 1


_FLUSH_PROBE = """
import sys, torch
sys.path.insert(0, {root!r})
import train_common as tc
torch.set_num_threads(2)
(torch.randn(1 << 22) * 2).sum()  # the intra-op worker threads exist before the flag is set
if {flush}:
    tc.setup_float_math(torch.device("cpu"))
x = torch.full((1 << 22,), 1e-39)  # a subnormal in fp32, below finfo.tiny 1.18e-38
print(int(((x * 1.0) != 0).sum()), int(((x + 0.0) != 0).sum()))  # every chunk of both threads
print(torch.set_flush_denormal(True))  # whether this CPU has the flags at all
"""


def test_cpu_float_math_flushes_subnormals_on_every_thread():
    # A trainer on the CPU flushes subnormals to zero (x86 computes on them 10-100x slower;
    # a peaked softmax and its gradients make many), on the main thread and torch's workers.
    # The control run without the call shows that this machine does keep subnormals.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    def probe(flush):
        out = subprocess.run([sys.executable, "-c", _FLUSH_PROBE.format(root=root, flush=flush)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        *counts, supported = out.stdout.split()
        if supported != "True":
            pytest.skip("this CPU has no flush-to-zero flags")
        return [int(v) for v in counts]
    assert probe(False) == [1 << 22] * 2
    assert probe(True) == [0, 0]


def test_lr_schedule():
    cfg = tc.TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert tc.lr_at(0, cfg) == pytest.approx(0.1)
    assert tc.lr_at(9, cfg) == pytest.approx(1.0)
    assert tc.lr_at(10, cfg) == pytest.approx(1.0)
    assert tc.lr_at(60, cfg) == pytest.approx(0.55)
    assert tc.lr_at(110, cfg) == pytest.approx(0.1)
    assert tc.lr_at(500, cfg) == pytest.approx(0.1)


def test_accumulation_arithmetic():
    assert tc.accumulation_steps(1024, 1, 8) == 128
    assert tc.accumulation_steps(1024, 2, 64) == 8
    with pytest.raises(tc.UserError, match="not a multiple"):
        tc.accumulation_steps(1000, 3, 8)


def test_atomic_save_keeps_old_checkpoint_when_interrupted(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    ck.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # write half a file, then "crash"
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.setattr(torch, "save", real_save)
    state = ck.load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    ck.save_checkpoint(path, {"step": 3})  # the next save goes through over the leftover tmp
    assert ck.load_checkpoint(path)["step"] == 3


def test_load_checks_config_and_path(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    ck.save_checkpoint(path, {"model_config": {"dim": 64, "norm": "dyt"}})
    assert ck.load_checkpoint(path, {"dim": 64, "norm": "dyt"})
    with pytest.raises(tc.UserError, match="dim=64"):
        ck.load_checkpoint(path, {"dim": 128, "norm": "dyt"})
    with pytest.raises(tc.UserError, match="no checkpoint"):
        ck.load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(tc.UserError, match="cannot read"):
        ck.load_checkpoint(str(tmp_path / "junk.pt"))


def test_rng_state_round_trip_through_weights_only(tmp_path):
    tc.seed_everything(5)
    path = str(tmp_path / "rng.pt")
    ck.save_checkpoint(path, {"rng": ck.capture_rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(2))
    tc.seed_everything(99)
    ck.restore_rng_state(ck.load_checkpoint(path)["rng"])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_loss_guard():
    g = LossGuard(explode_factor=3.0, patience=2)
    for i, loss in enumerate([5.0, 4.0, 3.0, 2.0, 2.0]):
        g.check(loss, i)
    with pytest.raises(tc.TrainingDiverged, match="exploded.*ckpt.pt"):
        g.check(50.0, 6, "out/ckpt.pt")
    with pytest.raises(tc.TrainingDiverged, match="nan"):
        LossGuard().check(float("nan"), 1)


def test_run_logger_jsonl_and_csv(tmp_path):
    log = RunLogger(str(tmp_path), enabled=True)
    log.log({"step": 1, "loss": 2.0})
    log.log({"step": 2, "loss": 1.5, "val_loss": 1.7})
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss,val_loss" and len(rows) == 3
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_checkpoint_that_does_not_fit_is_one_line_naming_what_differs():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    weights = dict(model.state_dict())
    ck.load_into(model, weights, "ok.pt")  # fits
    extra = {**weights, "emb_scale": torch.ones(1)}
    with pytest.raises(tc.UserError, match=r"does not fit this model \(unexpected emb_scale\)"):
        ck.load_into(model, extra, "x.pt")
    bad = {k: (v[:2] if k == "0.weight" else v) for k, v in weights.items() if k != "1.bias"}
    with pytest.raises(tc.UserError, match=r"\(missing 1.bias; other shapes 0.weight\)"):
        ck.load_into(model, bad, "y.pt")


def test_out_of_memory_message_reads_the_gpu_before_the_run_closes(tmp_path, monkeypatch):
    # the message names the memory allocated against the device's total; the run's close
    # (which drops its device) comes after it. CUDA's two readings are faked on the CPU.
    import types
    import run as run_lib
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 70 * 2 ** 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=139 * 2 ** 30))
    r = run_lib.Run(tc.TrainConfig(out_dir=str(tmp_path)))
    r.cfg.micro_batch = 2
    r.dist = types.SimpleNamespace(device=torch.device("cuda:0"), initialized_here=False)
    r.step = 7
    with pytest.raises(tc.UserError) as e:
        r.__exit__(torch.OutOfMemoryError, torch.OutOfMemoryError("CUDA out of memory"), None)
    assert str(e.value).startswith("out of memory at step 7 with --micro_batch 2 (70.0 of 139.0 GiB "
                                   "allocated on cuda:0); lower --micro_batch"), e.value
    assert r.dist is None  # closed all the same
