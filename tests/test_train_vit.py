"""train_vit.py on CPU: tiny ViTs on tiny synthetic Fashion-MNIST-format IDX files.

The synthetic images are easy to learn (each class is a grey level, plus noise), so a few
dozen steps of a 2-block ViT show the loss falling."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

import train_common as tc
import train_vit
from data_vision import FASHION_MNIST_SYSTEM_DIR
from dyt import Derf
from model import ViT
from test_data_vision import synthetic_images, write_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
TINY = ["--dim", "32", "--depth", "2", "--heads", "2", "--batch_size", "16", "--eval_batch", "25",
        "--warmup_steps", "2", "--lr", "3e-3", "--log_interval", "1", "--seed", "3",
        "--hflip", "false"]
# Every random part of the recipe on, so that the equality tests cover them.
AUGMENT = ["--randaug_n", "2", "--reprob", "0.25", "--mixup", "0.8", "--cutmix", "1.0",
           "--drop_path", "0.1", "--ema_decay", "0.9"]


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    """Fashion-MNIST's four files: train gzipped, test raw (both forms are read); 400 training
    images and 63 test images (an odd count: the 2-rank evaluation shards are uneven)."""
    d = tmp_path_factory.mktemp("fmnist")
    for split, n, ext in (("train", 400, ".gz"), ("t10k", 63, "")):
        images, labels = synthetic_images(n, seed=len(split))
        write_idx(str(d / f"{split}-images-idx3-ubyte{ext}"), images, 0x803)
        write_idx(str(d / f"{split}-labels-idx1-ubyte{ext}"), labels, 0x801)
    return d


def rows(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out_dir):
    return {r["step"]: r["loss"] for r in rows(out_dir) if "loss" in r}


def final_eval(out_dir):
    return [r for r in rows(out_dir) if "test_top1" in r][-1]


def run(idx_dir, out_dir, *extra):
    train_vit.main(TINY + ["--data_dir", str(idx_dir), "--out_dir", str(out_dir), *extra])
    return losses(out_dir)


def torchrun(idx_dir, out_dir, *extra, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", os.path.join(ROOT, "train_vit.py"), *TINY,
           "--data_dir", str(idx_dir), "--out_dir", str(out_dir), *extra]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return losses(out_dir)


def shell(*args):
    # from an empty directory, so that no out/ left by an earlier run changes the outcome
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_vit.py"), *args],
                          cwd=tempfile.mkdtemp(), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("norm", ["ln", "dyt", "derf"])
def test_loss_falls(idx_dir, tmp_path, norm):
    torch.set_flush_denormal(False)  # whatever an earlier in-process run set: this run must set it
    got = run(idx_dir, tmp_path, "--norm", norm, "--max_steps", "40")
    values = [got[s] for s in sorted(got)]
    assert np.mean(values[-5:]) < 0.85 * np.mean(values[:5]), values
    last = final_eval(tmp_path)
    assert last["test_loss"] < 0.9 * np.log(10)  # below chance level on held-out images
    if norm != "ln":  # the Figure 8 readout: every DyT layer's alpha and its input's 1/std
        assert sum(k.startswith("alpha/") for k in last) == 5  # 2 blocks x 2 + the final one
        assert sum(k.startswith("inv_std/") for k in last) == 5
    assert os.path.exists(tmp_path / "metrics.csv")
    # the run set the CPU float math (tc.setup_float_math): subnormals flushed to zero
    assert float(torch.tensor(1e-39) * 1.0) == 0.0


@pytest.fixture(scope="module")
def reference(idx_dir, tmp_path_factory):
    """One process, global batch 16 as 4 micro-batches of 4, every augmentation on."""
    out = tmp_path_factory.mktemp("ref")
    return out, run(idx_dir, out, "--max_steps", str(STEPS), "--micro_batch", "4", *AUGMENT)


def test_two_processes_match_one(idx_dir, tmp_path, reference):
    # 2 ranks x 2 micro-batches of 4: the same 4 micro-batches of every step as the reference,
    # each drawing the same augmentation, mixup and drop path wherever it runs.
    ref_dir, ref = reference
    got = torchrun(idx_dir, tmp_path, "--max_steps", str(STEPS), "--micro_batch", "4", *AUGMENT)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)],
                               rtol=1e-5)
    # Evaluation: 63 test images split 31/32 between ranks; exact counts summed over ranks.
    mine, theirs = final_eval(tmp_path), final_eval(ref_dir)
    for key in ("test_top1", "test_top5", "ema_top1"):
        assert abs(mine[key] - theirs[key]) <= 1 / 63 + 1e-9, key
    np.testing.assert_allclose(mine["test_loss"], theirs["test_loss"], rtol=1e-4)


def test_resume_continues_exactly(idx_dir, tmp_path, reference):
    ref_dir, ref = reference
    run(idx_dir, tmp_path, "--max_steps", str(STEPS), "--micro_batch", "4", *AUGMENT, "--stop_at", "3")
    assert sorted(losses(tmp_path)) == [1, 2, 3]
    got = run(idx_dir, tmp_path, "--max_steps", str(STEPS), "--micro_batch", "4", *AUGMENT, "--resume")
    assert [got[s] for s in sorted(got)] == [ref[s] for s in sorted(ref)]  # bit for bit
    assert final_eval(tmp_path)["ema_loss"] == final_eval(ref_dir)["ema_loss"]


def test_missing_and_corrupt_data(idx_dir, tmp_path):
    # missing: one line from the shell, naming both fixes
    p = shell("--data_dir", str(tmp_path / "nowhere"))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert "apt-get install dataset-fashion-mnist" in lines[0] and "--data_dir" in lines[0]
    # corrupt (the loaders' checks are in test_data_vision.py): still one line
    bad = tmp_path / "bad"
    shutil.copytree(idx_dir, bad)
    write_idx(str(bad / "train-images-idx3-ubyte.gz"), np.zeros((399, 28, 28)), 0x803)
    p = shell("--data_dir", str(bad))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "train-labels-idx1-ubyte" in p.stderr or "train-images" in p.stderr
    # bad flags and inconsistent values: one line too
    for args in (["--patch_size", "5"], ["--norm", "batchnorm"], ["--nope", "1"]):
        p = shell("--data_dir", str(idx_dir), *args)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)


def test_short_run_clips_its_warmup_and_reaches_the_peak_lr(idx_dir, tmp_path, capsys):
    # 400 images / 16 = 25 steps per epoch: 0.4 epochs is 10 steps, shorter than the default
    # 0.5-epoch (12-step) warmup, which would never reach the peak lr
    no_warmup_flag = [a for i, a in enumerate(TINY) if "--warmup_steps" not in TINY[i - 1:i + 1]]
    train_vit.main(no_warmup_flag + ["--data_dir", str(idx_dir), "--out_dir", str(tmp_path),
                                     "--epochs", "0.4", "--warmup_epochs", "0.5"])
    assert "clipped to 5 steps" in capsys.readouterr().out
    lrs = [r["lr"] for r in rows(tmp_path) if "lr" in r]
    assert len(lrs) == 10 and max(lrs) == pytest.approx(3e-3)
    # a warmup within half the run is left as given
    cfg, _, given = train_vit.tc.parse_config(train_vit.ViTTrainConfig, train_vit.PRESETS,
                                              ["--epochs", "1", "--warmup_epochs", "0.5"])
    assert train_vit.derive_steps(cfg, 468, given) == (468, 234, None)


def test_norm_flags_reach_the_vit(tmp_path):
    cfg, _, _ = tc.parse_config(train_vit.ViTTrainConfig, train_vit.PRESETS,
                                ["--norm", "derf", "--alpha0", "0.8", "--dyt_gamma0", "2.5"],
                                default_preset="fashion_mnist")
    model = ViT(cfg.model_config(10, 1))
    layers = [m for m in model.modules() if isinstance(m, Derf)]
    assert len(layers) == 2 * cfg.model.depth + 1
    assert all(m.alpha.item() == pytest.approx(0.8) and torch.equal(m.weight, torch.full((cfg.model.dim,), 2.5))
               for m in layers)
    for flag in ("--dyt_gamma0", "--alpha0"):
        p = shell(flag, "0", "--data_dir", str(tmp_path))
        assert p.returncode == 2 and p.stderr.strip() == f"error: {flag} 0.0 is out of range: it must be positive", p.stderr


def test_presets_follow_the_papers():
    cfg, _, _ = train_vit.tc.parse_config(train_vit.ViTTrainConfig, train_vit.PRESETS,
                                          ["--preset", "vit_l_in1k", "--lr", "1e-3"])
    m = cfg.model
    assert (m.dim, m.depth, m.heads, m.patch_size, m.img_size) == (1024, 24, 16, 16, 224)
    assert (cfg.batch_size, cfg.epochs, cfg.warmup_epochs, m.drop_path) == (4096, 300, 20, 0.4)
    assert (cfg.beta2, cfg.mixup, cfg.cutmix, cfg.reprob, cfg.label_smoothing) == (0.95, 0.8, 1.0, 0.25, 0.1)
    assert cfg.lr == 1e-3 and cfg.ema_decay > 0  # a flag overrides the preset
    cfg, _, _ = train_vit.tc.parse_config(train_vit.ViTTrainConfig, train_vit.PRESETS,
                                          ["--preset", "vit_t_in100"])
    assert (cfg.model.dim, cfg.batch_size, cfg.lr, cfg.dataset) == (192, 128, 1e-3, "imagenet100")


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_SYSTEM_DIR), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_short_run(tmp_path):
    # the default path end to end, cut short: 30 steps already beat chance (0.1)
    train_vit.main(["--dim", "32", "--depth", "2", "--heads", "2", "--max_steps", "30",
                    "--warmup_steps", "3", "--eval_batch", "1000", "--out_dir", str(tmp_path)])
    assert final_eval(tmp_path)["test_top1"] > 0.15


def test_eval_equals_the_trainers_final_evaluation(idx_dir, tmp_path, capsys):
    """`train_vit.py eval` gives the trainer's last test top-1/top-5/loss for its checkpoint,
    folded too (to rounding); bad input is one line."""
    run(idx_dir, tmp_path, "--max_steps", "6", "--ckpt_interval", "0")
    final = final_eval(tmp_path)
    top1, top5, loss = train_vit.main(["eval", "--ckpt", str(tmp_path), "--device", "cpu"])
    assert (top1, top5) == (final["test_top1"], final["test_top5"])
    assert loss == pytest.approx(final["test_loss"], rel=1e-12)
    assert "test top-1" in capsys.readouterr().out
    f1, _, floss = train_vit.main(["eval", "--ckpt", str(tmp_path / "ckpt.pt"), "--fold"])
    assert floss == pytest.approx(final["test_loss"], rel=1e-5)
    for argv, needle in ((["eval", "--ckpt", str(tmp_path / "none")], "no checkpoint"),
                         (["eval", "--ckpt", str(tmp_path), "--ema"], "holds no EMA weights")):
        with pytest.raises(SystemExit):
            tc.main_guard(train_vit.main, argv)
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
