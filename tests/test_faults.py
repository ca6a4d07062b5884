"""The faults users meet, at the level where they happen: real processes killed with SIGKILL
mid-save, stopped with SIGINT/SIGTERM, started twice in one out_dir; a disk that fills up or
is read-only; a run that diverges and is resumed; corrupt data and checkpoints; bad flags.

What the trainers guarantee (README, "What a run guarantees"), and the test that proves it:
  - no checkpoint is ever lost or half-written: test_kill9_during_save_*, test_disk_full_*
  - SIGINT/SIGTERM save a checkpoint and exit; --resume continues: test_concurrent_*,
    test_vit_sigint_*
  - one run per out_dir; the logs hold each step once: test_concurrent_*, test_kill9_*
  - a divergence never checkpoints a diverged state; the checkpoint its error names resumes:
    test_divergence_*
  - bad input is one line naming the fix: test_read_only_*, test_bad_input_*, ...

Faults are injected inside the child process by a few lines of Python run before the
trainer (see `script`): torch.save that SIGKILLs its own process half-way through, a file
whose writes fail with ENOSPC, OS calls that fail with EROFS under one directory. Tiny
models and a few steps: the file runs in about a minute on 2 cores."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import checkpoint as ck  # noqa: E402
from run import RunLogger  # noqa: E402
import train_common as tc  # noqa: E402
import train_gpt  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

GPT_TINY = ["--dim", "32", "--n_layer", "2", "--n_head", "2", "--n_kv_head", "2", "--seq_len", "32",
            "--global_batch_tokens", "256", "--micro_batch", "8", "--lr", "3e-3", "--warmup_steps", "2",
            "--eval_interval", "0", "--eval_tokens", "1024", "--log_interval", "1",
            "--sample_tokens", "0", "--ckpt_interval", "0", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

# Run `file` (train_gpt.py, train_vit.py, analyze.py) as __main__ after `patch`, in a child.
WRAPPER = """
import os, runpy, sys
sys.path.insert(0, {root!r})
{patch}
sys.argv = [{file!r}] + {argv!r}
runpy.run_path({file!r}, run_name="__main__")
"""

# torch.save that writes part of the checkpoint and then SIGKILLs its process, on save number
# `n`: kill -9 at the worst moment, deterministically.
KILL_MID_SAVE = """
import signal, torch
_real_save, _calls = torch.save, [0]
def _save(obj, f, *a, **k):
    _calls[0] += 1
    if _calls[0] == {n}:
        f.write(b"PK\\x03\\x04 half a checkpoint" * 100)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_save(obj, f, *a, **k)
torch.save = _save
"""

# The disk fills up during save number `n`: the file's writes fail with ENOSPC after 4 kB, as
# the OS does (torch's zip writer then reports "unexpected pos", which used to surface).
DISK_FULL = """
import builtins, errno, io
_real_open, _opens = builtins.open, [0]
class _Full(io.RawIOBase):
    def __init__(self, f): self.f, self.left = f, 4096
    def writable(self): return True
    def write(self, b):
        if len(b) > self.left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= len(b)
        return self.f.write(b)
    def flush(self): self.f.flush()
    def fileno(self): return self.f.fileno()
    def close(self): super().close(); self.f.close()
def _open(path, mode="r", *a, **k):
    f = _real_open(path, mode, *a, **k)
    if str(path).endswith("ckpt.pt.tmp") and "w" in mode:
        _opens[0] += 1
        if _opens[0] == {n}:
            return _Full(f)
    return f
builtins.open = _open
"""

# A read-only directory. Tests run as root, which ignores permission bits, and mounting a
# read-only file system needs privileges a test cannot assume. So the child's OS calls that
# would write under `ro` fail exactly as on a read-only mount: OSError(EROFS). Reads work.
READ_ONLY = """
import builtins, errno, io
_RO = os.path.realpath({ro!r})
def _under(p):
    try:
        p = os.path.realpath(os.fspath(p))
    except TypeError:
        return False
    return p == _RO or p.startswith(_RO + os.sep)
def _erofs(p):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(p))
_real_open, _real_os_open, _real_mkdir = builtins.open, os.open, os.mkdir
def _open(p, mode="r", *a, **k):
    if _under(p) and any(c in mode for c in "wax+"):
        _erofs(p)
    return _real_open(p, mode, *a, **k)
def _os_open(p, flags, *a, **k):
    if _under(p) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        _erofs(p)
    return _real_os_open(p, flags, *a, **k)
def _mkdir(p, *a, **k):
    if _under(p):
        _erofs(p)
    return _real_mkdir(p, *a, **k)
builtins.open, io.open, os.open, os.mkdir = _open, _open, _os_open, _mkdir
for _name in ("remove", "unlink", "replace", "rename", "rmdir"):
    def _guard(*a, _real=getattr(os, _name), **k):
        if any(_under(x) for x in a[:2]):
            _erofs(a[0])
        return _real(*a, **k)
    setattr(os, _name, _guard)
"""


def script(file, argv, patch=""):
    code = WRAPPER.format(root=ROOT, patch=patch, file=os.path.join(ROOT, file), argv=list(argv))
    return [sys.executable, "-c", code]


def run(file, argv, patch="", timeout=180):
    return subprocess.run(script(file, argv, patch), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def one_line(proc, code=2):
    """The child exited with `code` and its stderr ends with one `error:` line, no traceback."""
    err = [line for line in proc.stderr.splitlines() if line.strip() and "note:" not in line
           and not line.startswith(("train", "\r"))]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(err) == 1 and err[0].startswith("error:"), proc.stderr[-3000:]
    return err[0]


def rows(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def steps_once_in_order(out_dir):
    """The logged steps: each exactly once, increasing (the run's true history)."""
    steps = [r["step"] for r in rows(out_dir) if "loss" in r]
    assert steps == sorted(set(steps)), steps
    return steps


def wait_for_steps(out_dir, n, proc, timeout=60):
    path = os.path.join(out_dir, "metrics.jsonl")
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if os.path.exists(path) and len(open(path).read().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {n} logged steps in {timeout} s")


def gpt_val_loss(ckpt, n=4):
    """The loss of a checkpoint's weights on the built-in corpus's first val windows."""
    state = ck.load_checkpoint(ckpt)
    model = GPT(GPTConfig(**state["model_config"])).eval()
    model.load_state_dict(state["model"])
    val = data.TokenDataset(data.default_data_dir(), "val")
    x, y = next(data.val_windows(val, model.cfg.block_size, n * model.cfg.block_size, batch=n))
    with torch.no_grad():
        return model(x, y)[1].item()


# ---------------------------------------------------------------------------------------------
# Processes: kill -9, SIGTERM/SIGINT, two runs at once


def test_kill9_during_save_keeps_the_checkpoint_and_the_next_run_cleans_up(tmp_path):
    out = str(tmp_path)
    argv = GPT_TINY + ["--out_dir", out, "--max_steps", "8", "--ckpt_interval", "3"]
    p = run("train_gpt.py", argv, KILL_MID_SAVE.format(n=2))  # killed saving step 6
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert ck.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 3  # the old one, whole
    assert os.path.exists(os.path.join(out, "ckpt.pt.tmp"))  # what the kill left
    assert os.path.exists(os.path.join(out, "run.lock"))     # ... with a dead PID in it
    p = run("train_gpt.py", argv + ["--resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "stale lock" in p.stderr
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.csv", "metrics.jsonl"]
    assert ck.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 8
    assert steps_once_in_order(out) == list(range(1, 9))  # steps 4-5 were logged twice before


def test_concurrent_start_is_refused_and_sigterm_saves(tmp_path):
    out = str(tmp_path)
    first = subprocess.Popen(script("train_gpt.py", GPT_TINY + ["--out_dir", out, "--max_steps",
                                                                "100000"]),
                             cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for_steps(out, 3, first)  # running, no checkpoint yet
        second = run("train_gpt.py", GPT_TINY + ["--out_dir", out, "--max_steps", "3"])
        err = one_line(second)
        assert f"another run (pid {first.pid})" in err and "--out_dir" in err, err
        first.send_signal(signal.SIGTERM)  # a pre-empted job
        _, stderr = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: SIGTERM at step") and "--resume" in last, stderr[-2000:]
    saved = ck.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"]
    assert steps_once_in_order(out)[-1] == saved  # the second run logged nothing
    p = run("train_gpt.py", GPT_TINY + ["--out_dir", out, "--max_steps", str(saved + 2),
                                        "--resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert steps_once_in_order(out) == list(range(1, saved + 3))
    assert not os.path.exists(os.path.join(out, "run.lock"))


@pytest.fixture(scope="module")
def idx(tmp_path_factory):
    """A small Fashion-MNIST-format data set (synthetic images, IDX files)."""
    from test_data_vision import write_fashion_mnist
    d = tmp_path_factory.mktemp("idx")
    write_fashion_mnist(d, 320, 50)
    return d


def test_vit_sigint_saves_by_default_and_resumes(tmp_path, idx):
    out = str(tmp_path / "vit")
    # no --ckpt_interval: the default must checkpoint periodically (it used to be end-only)
    base = ["--dim", "32", "--depth", "2", "--heads", "2", "--batch_size", "16",
            "--eval_batch", "25", "--log_interval", "1", "--device", "cpu",
            "--data_dir", str(idx), "--out_dir", out]
    assert "ckpt_interval" not in base
    proc = subprocess.Popen(script("train_vit.py", base + ["--epochs", "200"]), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_steps(out, 3, proc)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    saved = ck.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"]
    assert saved >= 3 and f"SIGINT at step {saved}: saved" in stderr
    p = run("train_vit.py", base + ["--epochs", "200", "--max_steps", str(saved + 2), "--resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert ck.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == saved + 2
    # resuming a finished run says so (it used to exit silently)
    p = run("train_vit.py", base + ["--epochs", "200", "--max_steps", str(saved + 2), "--resume"])
    assert p.returncode == 0 and "already finished" in p.stdout, p.stdout + p.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Divergence


@pytest.mark.parametrize("flags", [
    # the reproduction: the step-5 checkpoint it named evaluated to a loss of 3.2e5
    ["--lr", "50", "--ckpt_interval", "5", "--warmup_steps", "5"],
    # without clipping the named checkpoint held 27 non-finite tensors
    ["--lr", "50", "--ckpt_interval", "5", "--warmup_steps", "5", "--grad_clip", "0"],
    # a checkpoint is written before it diverges (step 1): that one is named, and resumes
    ["--lr", "10", "--ckpt_interval", "1", "--warmup_steps", "10"],
])
def test_divergence_never_checkpoints_a_diverged_state_and_the_named_one_resumes(tmp_path, flags):
    out = str(tmp_path)
    # gamma0 1 (the runs): with the larger default (init output RMS 2.5) the first
    # lr-1.0 step of the third case leaves the weights so sharp (val loss 10.6, next gradient norm 2e7) that the
    # resumed run's loss swings past 100 even at lr 1e-3: a checkpoint that is finite and
    # under the explosion threshold, but not one a lower lr recovers from within 4 steps
    shape = ["--dim", "64", "--n_layer", "2", "--n_head", "2", "--n_kv_head", "2",
             "--seq_len", "64", "--global_batch_tokens", "1024", "--micro_batch", "16",
             "--sample_tokens", "0", "--log_interval", "1", "--eval_tokens", "4096",
             "--dyt_gamma0", "1", "--device", "cpu", "--out_dir", out]
    err = one_line(run("train_gpt.py", shape + flags))
    assert "diverg" in err or "explod" in err, err
    ckpt = os.path.join(out, "ckpt.pt")
    if "no checkpoint was written" in err:
        assert not os.path.exists(ckpt)
        return
    assert f"last good checkpoint is {ckpt}" in err, err
    state = ck.load_checkpoint(ckpt)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert gpt_val_loss(ckpt) < 20  # not exploding (the broken one: 3.2e5)
    p = run("train_gpt.py", shape + ["--resume", "--lr", "1e-3", "--max_steps",
                                     str(state["step"] + 4)])
    assert p.returncode == 0, p.stderr[-3000:]
    losses = [r["loss"] for r in rows(out) if "loss" in r]
    assert all(np.isfinite(losses)) and losses[-1] < 20, losses


# ---------------------------------------------------------------------------------------------
# Out of GPU memory: the fault users meet most. Injected on the CPU: the model's forward raises
# torch.cuda.OutOfMemoryError in training step 3, as the allocator does on a GPU.

OUT_OF_MEMORY = """
import torch, model
_forward, _n = {cls}.forward, [0]
def _oom(self, *a, **k):
    _n[0] += self.training
    if self.training and _n[0] == 3:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return _forward(self, *a, **k)
{cls}.forward = _oom
"""


@pytest.mark.parametrize("file, argv, cls, fix", [
    ("train_gpt.py", GPT_TINY + ["--max_steps", "6", "--ckpt_interval", "2"], "model.GPT",
     "lower --micro_batch, add --activation_checkpointing, or use a shorter --seq_len"),
    ("train_vit.py", ["--max_steps", "6", "--ckpt_interval", "2", "--dim", "32", "--depth", "2",
                      "--heads", "2", "--batch_size", "16", "--micro_batch", "16", "--device", "cpu",
                      "--data_dir", "{idx}"], "model.ViT",
     "lower --micro_batch or add --activation_checkpointing"),
])
def test_out_of_memory_is_one_line_naming_the_fix_and_keeps_the_checkpoint(tmp_path, idx, file, argv, cls, fix):
    out = str(tmp_path)
    argv = [a.replace("{idx}", str(idx)) for a in argv] + ["--out_dir", out]
    err = one_line(run(file, argv, OUT_OF_MEMORY.format(cls=cls)))
    micro = argv[argv.index("--micro_batch") + 1]
    assert err.startswith(f"error: out of memory at step 3 with --micro_batch {micro} (") and fix in err, err
    assert f"the last checkpoint {os.path.join(out, 'ckpt.pt')} is intact" in err, err
    assert ck.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 2
    assert not os.path.exists(os.path.join(out, "run.lock"))  # released on the way out


# ---------------------------------------------------------------------------------------------
# Full and read-only disks


def test_disk_full_at_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    out = str(tmp_path)
    argv = GPT_TINY + ["--out_dir", out, "--max_steps", "6", "--ckpt_interval", "2"]
    err = one_line(run("train_gpt.py", argv, DISK_FULL.format(n=2)))  # fails saving step 4
    assert "No space left on device" in err and "ckpt.pt" in err and "intact" in err, err
    assert not os.path.exists(os.path.join(out, "ckpt.pt.tmp"))
    assert ck.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 2
    p = run("train_gpt.py", argv + ["--resume"])  # space freed: it carries on
    assert p.returncode == 0, p.stderr[-3000:]
    assert steps_once_in_order(out) == list(range(1, 7))


@pytest.mark.parametrize("file, argv", [
    ("train_gpt.py", GPT_TINY + ["--max_steps", "2", "--out_dir", "{ro}/gpt"]),
    ("train_vit.py", ["--max_steps", "2", "--out_dir", "{ro}/vit", "--data_dir", "{idx}",
                      "--dim", "32", "--depth", "2", "--heads", "2", "--batch_size", "16"]),
    ("analyze.py", ["alpha_std", "--run", "{ro}/none", "--results", "{ro}/analysis"]),
])
def test_read_only_output_dir_is_one_line(tmp_path, idx, file, argv):
    ro = str(tmp_path / "ro")
    os.makedirs(ro)
    argv = [a.replace("{ro}", ro).replace("{idx}", str(idx)) for a in argv]
    err = one_line(run(file, argv, READ_ONLY.format(ro=ro)))
    assert "Read-only file system" in err and ("--out_dir" in err or "--results" in err), err


# ---------------------------------------------------------------------------------------------
# Bad input: one line that names the fix (in process: fast)


def gpt_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        tc.main_guard(train_gpt.main, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("flag, value, needle", [
    ("--seq_len", "0", "--seq_len 0 is out of range: it must be positive"),
    ("--lr", "-1", "--lr -1.0 is out of range"),
    ("--max_steps", "-5", "--max_steps -5 is out of range"),
    ("--micro_batch", "-2", "--micro_batch -2 is out of range: it must be >= 0"),
])
def test_bad_numbers_are_one_line(tmp_path, capsys, flag, value, needle):
    err = gpt_error(GPT_TINY + ["--out_dir", str(tmp_path), flag, value], capsys)
    assert needle in err, err
    assert not os.listdir(tmp_path)  # refused before touching anything


def shards(d, tokens, vocab=256):
    os.makedirs(d, exist_ok=True)
    for split in ("train", "val"):
        data.write_shard(os.path.join(d, f"{split}_000000.bin"), tokens, vocab)
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump({"encoding": "byte", "vocab_size": vocab}, f)


def test_corrupt_meta_and_out_of_vocab_tokens_are_one_line(tmp_path, capsys):
    d = str(tmp_path / "mine")
    shards(d, np.arange(4000) % 256)
    with open(os.path.join(d, "meta.json"), "w") as f:
        f.write('{"encoding": "byte", "voc')  # cut short
    err = gpt_error(GPT_TINY + ["--out_dir", str(tmp_path / "a"), "--data", d], capsys)
    assert "meta.json is corrupt" in err and "prepare_data.py prepare" in err, err
    os.remove(os.path.join(d, "meta.json"))
    err = gpt_error(GPT_TINY + ["--out_dir", str(tmp_path / "b"), "--data", d], capsys)
    assert "missing meta.json" in err and "--encoding byte" in err, err
    # a valid header, but one id >= vocab (a flipped bit): was an IndexError, a CUDA assert
    shards(d, np.arange(4000) % 200, vocab=200)
    with open(os.path.join(d, "train_000000.bin"), "r+b") as f:
        f.seek(data.HEADER_SIZE + 1234 * 2)
        f.write(np.array([250], dtype=np.uint16).tobytes())
    err = gpt_error(GPT_TINY + ["--out_dir", str(tmp_path / "c"), "--data", d,
                                "--max_steps", "50"], capsys)
    assert "token id 250" in err and "vocabulary of 200" in err and "_000000.bin" in err, err


def test_builtin_corpus_heals_itself(tmp_path):
    d = data.default_data_dir()  # the repo's cache: copy it, then break the copy
    name = os.path.basename(d)
    shutil.copytree(d, tmp_path / name)
    meta = tmp_path / name / "meta.json"
    good = meta.read_text()
    meta.write_text("{not json")
    assert data.default_data_dir(str(tmp_path)) == str(tmp_path / name)
    assert json.loads(meta.read_text()) == json.loads(good)
    assert data.TokenDataset(str(tmp_path / name), "val").n_tokens > 0


def test_checkpoint_read_errors(tmp_path, capsys):
    junk = tmp_path / "random.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(tc.UserError) as e:
        ck.load_checkpoint(str(junk))
    assert "not a PyTorch checkpoint" in str(e.value) and "weights_only" not in str(e.value)
    with pytest.raises(SystemExit):
        tc.main_guard(train_gpt.main, ["sample", "--ckpt", str(tmp_path / "nope.pt")])
    err = capsys.readouterr().err.strip()
    assert "no checkpoint at" in err and "--resume" not in err and "--ckpt" in err, err
    long = "x" * 150 + ". " + "y" * 400
    assert ck._first_sentence(long).endswith(".")  # whole sentences, not 200 characters


def test_resuming_a_finished_run_says_so(tmp_path, capsys):
    argv = GPT_TINY + ["--out_dir", str(tmp_path), "--max_steps", "2"]
    train_gpt.main(argv)
    capsys.readouterr()
    train_gpt.main(argv + ["--resume"])
    assert "already finished (2 of 2 steps)" in capsys.readouterr().out


def test_default_micro_batch_follows_the_world_size():
    cfg, _, _ = tc.parse_config(train_gpt.GPTTrainConfig, train_gpt.PRESETS, [])
    # 16 sequences: 1 x 16, 2 x 8, 4 x 4, 8 x 2, 16 x 1, each in one micro-step
    for world in (1, 2, 4, 8, 16):
        assert train_gpt.batch_plan(cfg, world) == (16, 1)
    with pytest.raises(tc.UserError, match="multiple of 3"):
        train_gpt.batch_plan(cfg, 3)
    assert tc.auto_micro_batch(512, 2) == 16  # 256 per rank: 16 micro-steps of 16


def test_outputs_do_not_overwrite_committed_results():
    import analyze
    import bench
    assert not os.path.abspath(bench.parse_args([]).out).startswith(os.path.join(ROOT, "results"))
    args = analyze.build_parser().parse_args(["alpha_std", "--run", "x"])
    assert args.results == os.path.join("out", "analysis")


def test_model_preset_prints_no_alpha0_for_a_norm():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "model.py"), "--preset", "llama70b"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "'norm': 'rms'" in p.stdout, p.stderr
    assert "alpha0" not in p.stdout, p.stdout
    p = subprocess.run([sys.executable, os.path.join(ROOT, "model.py"), "--preset", "llama70b",
                        "--norm", "dyt"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert "alpha0 (attention, other, final): (0.2, 0.05, 0.05); gamma0 (1, 1, 1);" in p.stdout, p.stdout


def test_logs_hold_the_true_history(tmp_path):
    # a run killed before its first checkpoint left steps 1-3; a fresh run must not append to
    # them, and a resume from step 2 must not log step 3 twice
    old = RunLogger(str(tmp_path))
    for s in (1, 2, 3):
        old.log({"step": s, "loss": 9.0})
    fresh = RunLogger(str(tmp_path), resume_step=None)
    fresh.log({"step": 1, "loss": 5.0})
    assert [r["loss"] for r in rows(tmp_path)] == [5.0]
    assert (tmp_path / "metrics.jsonl.old").exists()  # kept aside, not deleted
    fresh.log({"step": 2, "loss": 4.0})
    fresh.log({"step": 3, "loss": 3.0})
    resumed = RunLogger(str(tmp_path), resume_step=2)
    resumed.log({"step": 3, "loss": 2.5})
    assert [(r["step"], r["loss"]) for r in rows(tmp_path)] == [(1, 5.0), (2, 4.0), (3, 2.5)]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1:] == ["1,5.0", "2,4.0", "3,2.5"]
