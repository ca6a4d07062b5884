"""
A training run's checkpoints: written whole or not at all, only from a healthy state, as one
file or (under FSDP2) as a sharded directory, and read back with one-line errors.

    ckpt = Checkpointer(path, model, optimizer, dist, guard, model_config)
    ckpt.save(step, probe_loss, data=loader.state_dict(), ...)   # anything else to keep
    state = ckpt.load()                                          # model, optimizer, guard, RNG
                                                                 # restored; the rest returned

A single file is torch.save to path.tmp, fsynced, then os.replace'd over path: a kill at any
moment leaves the old checkpoint or the new one. A sharded checkpoint is a
torch.distributed.checkpoint directory, written to path.tmp and swapped in (path.old keeps the
previous one until the swap is done). Every checkpoint holds the step, the model config (a
resume with other model flags is refused in one line), the divergence guard's state, the RNG
of every rank, and what the trainer adds.
"""

import contextlib
import math
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as torch_dist

from train_common import TrainingDiverged, UserError, all_reduce_sum, barrier


class Checkpointer:
    """save() and load() for one run's model and optimizer at `path` (ckpt.pt, or the
    directory ckpt_dcp when sharded). `last` is the newest checkpoint known good: the one a
    divergence or a crash names."""

    def __init__(self, path, model, optimizer, dist, guard, model_config, sharded=False, keep=()):
        self.path, self.model, self.optimizer, self.dist = path, model, optimizer, dist
        self.guard, self.model_config, self.sharded = guard, model_config, sharded
        self.keep = set(keep)  # steps whose checkpoint is also kept as <stem>_step<N> (--keep_ckpts)
        self.last = None

    def save(self, step, probe_loss, **extra):
        """Checkpoint after `step` if the state is healthy (checkpoint_problem): probe_loss is
        the loss of the weights about to be saved (None to skip that check). Otherwise raise
        TrainingDiverged naming the last good checkpoint, which resumes. Every rank calls it."""
        problem = checkpoint_problem(self.model, self.optimizer, probe_loss, self.guard)
        if problem:
            keep = (f"the last good checkpoint is {self.last} (resume it with --resume and a lower "
                    "--lr)") if self.last else "no checkpoint was written yet"
            raise TrainingDiverged(f"the weights after step {step} are diverging ({problem}), so "
                                   f"they were not saved; {keep}")
        state = {"step": step, "model_config": self.model_config, "guard": self.guard.state_dict(),
                 "rng": gather_objects(capture_rng_state(), self.dist), **extra}
        if self.sharded:
            save_sharded(self.path, self.model, self.optimizer, state, self.dist)
        elif self.dist.is_main:
            save_checkpoint(self.path, {**state, "model": self.model.state_dict(),
                                        "optimizer": self.optimizer.state_dict()})
        if step in self.keep and self.dist.is_main:
            kept = self.kept_path(step)
            copy = shutil.copytree if self.sharded else shutil.copyfile
            shutil.rmtree(kept + ".tmp", ignore_errors=True)
            copy(self.path, kept + ".tmp")
            (_replace_dir if self.sharded else os.replace)(kept + ".tmp", kept)
        barrier()
        self.last = self.path
        return self.path

    def kept_path(self, step):
        root, ext = os.path.splitext(self.path)
        return f"{root}_step{step}{ext}"

    def load(self, path=None):
        """Restore the model, optimizer, guard and (at the same world size) each rank's RNG
        from `path` (default: this run's own); return the whole saved state (step, and what
        the trainer added)."""
        path = path or self.path
        if self.sharded:
            state = load_sharded(path, self.model, self.optimizer, self.model_config)
        else:
            state = load_checkpoint(path, self.model_config, map_location=self.dist.device)
            load_into(self.model, state["model"], path)
            self.optimizer.load_state_dict(state["optimizer"])
        self.guard.load_state_dict(state["guard"])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # older ViT: one
        if len(rngs) == self.dist.world_size:
            restore_rng_state(rngs[self.dist.rank])
        self.last = self.path
        return state


def load_into(model, weights, path):
    """model.load_state_dict(weights), a mismatch being one line naming what differs instead of
    a page of keys."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    shapes = [k for k in own if k in weights and own[k].shape != weights[k].shape]
    if missing or unexpected or shapes:
        what = "; ".join(f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for label, keys in
                         (("missing", missing), ("unexpected", unexpected), ("other shapes", shapes)) if keys)
        raise UserError(f"checkpoint {path} does not fit this model ({what}); it was written by "
                        "other code or other flags: start a new run with another --out_dir")
    model.load_state_dict(weights)


# ---------------------------------------------------------------------------------------------
# One file

def save_checkpoint(path, state):
    """torch.save(state, path) atomically: write path.tmp, fsync, os.replace. A crash at any
    moment leaves either the old complete checkpoint or the new complete one.

    A disk that is full or read-only is a UserError (one line) and the half-written .tmp is
    removed; the previous checkpoint, if any, is untouched. A kill -9 can still leave a .tmp:
    the next run in this out_dir removes it (remove_stale_tmp, under the run lock)."""
    tmp = f"{path}.tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and _is_os_error(e)):
            keep = f"; the previous checkpoint {path} is intact" if os.path.isfile(path) else ""
            raise UserError(f"cannot write checkpoint {path}: {_os_reason(e)}{keep}; "
                            "free space or pick a writable --out_dir, then --resume") from None
        raise


def _is_os_error(e):
    # torch.save's zip writer wraps the OS error of a failed write in a RuntimeError
    # ("[enforce fail at inline_container.cc] . unexpected pos ..."): look for its cause.
    return isinstance(e.__cause__ or e.__context__, OSError) or "unexpected pos" in str(e)


def _os_reason(e):
    cause = e if isinstance(e, OSError) else (e.__cause__ or e.__context__)
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    if isinstance(cause, OSError) and cause.errno:
        return os.strerror(cause.errno)
    return "the write failed (is the disk full?)"


def remove_stale_tmp(path):
    """Remove what an interrupted save of `path` left behind (path.tmp, a file or a DCP
    directory). Call it only while holding the run lock: then no other run is writing it."""
    tmp = f"{path}.tmp"
    if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.exists(tmp):
        with contextlib.suppress(OSError):
            os.remove(tmp)


def check_fresh_start(path, resume):
    """A new run must not overwrite an earlier run's checkpoint at `path` (a file, or a DCP
    directory): the user continues it with --resume or starts elsewhere."""
    if not resume and (os.path.isfile(path) or find_sharded(path)):
        raise UserError(f"{path} holds an earlier run's checkpoint; continue it with --resume, "
                        "or start a new run with another --out_dir (or delete it)")


def check_config(saved, expected, keys=None, path=""):
    """UserError if the saved config differs from the expected on `keys` (default: all)."""
    keys = keys if keys is not None else sorted(set(saved) | set(expected))
    diffs = [f"{k}={saved.get(k)!r} (now {expected.get(k)!r})" for k in keys
             if saved.get(k) != expected.get(k)]
    if diffs:
        raise UserError(f"checkpoint {path} was trained with a different model: "
                        f"{', '.join(diffs[:4])}; use the same flags or another --out_dir")


def _first_sentence(text, limit=300):
    """The first line of an error message, cut at a sentence end rather than mid-word."""
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    if len(line) <= limit:
        return line
    cut = max(line.rfind(". ", 0, limit), line.rfind("; ", 0, limit))
    return line[:cut + 1] if cut > 0 else line[:limit].rsplit(" ", 1)[0] + " ..."


def load_checkpoint(path, config=None, config_key="model_config", map_location="cpu",
                    missing_hint="check the path (or drop --resume)"):
    """torch.load(path, weights_only=True), checking state[config_key] == config if given.
    Missing, unreadable or mismatched checkpoints raise UserError with one line."""
    import zipfile
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; {missing_hint}")
    # torch.save writes a zip archive. Anything else (random bytes, a file cut short by a full
    # disk) is not a checkpoint at all, and torch.load's weights_only advice would mislead.
    if not zipfile.is_zipfile(path):
        raise UserError(f"cannot read checkpoint {path}: not a PyTorch checkpoint (corrupt or truncated, "
                        f"{os.path.getsize(path):,} bytes); restore it from a copy, or delete it "
                        "and start a new run")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if "weights_only" in str(e):
            raise UserError(f"cannot read checkpoint {path}: it holds Python objects other than "
                            "tensors and plain values, so it was not written by this code's "
                            "trainers; load it with torch.load(weights_only=False) only if you "
                            "trust its source") from None
        raise UserError(f"cannot read checkpoint {path}: {_first_sentence(str(e))}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a trainer checkpoint")
    if config is not None:
        check_config(state.get(config_key, {}), config, path=path)
    return state


@torch.no_grad()
def checkpoint_problem(model, optimizer, probe_loss, guard):
    """Why the current state must not become a checkpoint, or None when it is healthy.

    A training step's loss is measured before its update, so a loss that passed the guard says
    nothing about the weights the update produced: with a huge lr they can already be
    exploding (val loss 3e5) or non-finite, and a checkpoint of them is useless to resume.
    So before each save: every parameter and optimizer tensor must be finite, and
    probe_loss (the loss of the weights about to be saved, on the last training batch; None
    to skip) must be finite and within the guard's explode factor of its best average.
    Under DDP/FSDP every rank must call it (the verdict is all-reduced)."""
    bad = 0
    tensors = [p for p in model.parameters()]
    for st in optimizer.state.values():
        tensors += [v for v in st.values() if torch.is_tensor(v) and v.is_floating_point()]
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        bad += int(not bool(torch.isfinite(t).all()))
    flag = torch.tensor([float(bad), 0.0 if probe_loss is None else float(probe_loss)],
                        dtype=torch.float64,
                        device=next(model.parameters()).device)
    all_reduce_sum(flag)
    world = torch_dist.get_world_size() if torch_dist.is_available() and \
        torch_dist.is_initialized() else 1
    bad, probe = int(flag[0].item()), flag[1].item() / world
    if bad:
        return f"{bad} parameter/optimizer tensors are not finite"
    if probe_loss is not None:
        if not math.isfinite(probe):
            return f"its loss is {probe}"
        limit = guard.factor * guard.best if guard.factor and math.isfinite(guard.best) else None
        if limit is not None and probe > limit:
            return (f"its loss {probe:.4g} is over {guard.factor}x the best average "
                    f"{guard.best:.4g} (exploding)")
    return None


# ---------------------------------------------------------------------------------------------
# Sharded (FSDP2): a torch.distributed.checkpoint directory

def _replace_dir(tmp, final):
    # Directories cannot be swapped atomically; keep the old one as final.old until the new
    # one is in place, and let find_sharded fall back to it.
    old = f"{final}.old"
    if os.path.exists(final):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if os.path.exists(old):
        shutil.rmtree(old)


def find_sharded(path):
    """The DCP directory to load: path, or path.old if a save was interrupted mid-swap."""
    for p in (path, f"{path}.old"):
        if os.path.isfile(os.path.join(p, ".metadata")):
            return p
    return None


def save_sharded(path, model, optimizer, extra, dist):
    """A DCP checkpoint directory for an FSDP2 model: every rank writes its shards of the
    model and optimizer; rank 0 writes `extra` (step, config, data position, RNG of every
    rank...) to extra.pt. Written to path.tmp and swapped in, like save_checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    tmp = f"{path}.tmp"
    if dist.is_main and os.path.exists(tmp):
        shutil.rmtree(tmp)
    barrier()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    if dist.is_main:
        save_checkpoint(os.path.join(tmp, "extra.pt"), extra)
    barrier()
    if dist.is_main:
        _replace_dir(tmp, path)
    barrier()


def load_sharded(path, model, optimizer, config=None, config_key="model_config"):
    """Load a save_sharded directory into an FSDP2 model/optimizer (any world size: DCP
    reshards). Returns `extra`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    found = find_sharded(path)
    if found is None:
        raise UserError(f"no sharded checkpoint at {path}; check the path (or drop --resume)")
    extra = load_checkpoint(os.path.join(found, "extra.pt"), config, config_key)
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=found)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    return extra


# ---------------------------------------------------------------------------------------------
# RNG state as plain tensors and numbers (loadable with weights_only)

def capture_rng_state():
    """The RNG state of this process as tensors and ints only (loadable with weights_only)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_objects(obj, dist):
    """[obj of rank 0, obj of rank 1, ...] on every rank (a list of one without a group)."""
    if dist.world_size == 1 or not torch_dist.is_initialized():
        return [obj]
    out = [None] * dist.world_size
    torch_dist.all_gather_object(out, obj)
    return out
