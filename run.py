"""
A training run's lifecycle, and what keeps it safe, behind one handle:

    with Run(cfg, sharded=cfg.fsdp) as run:        # out_dir lock, signals, process group
        ...data, model, optimizer...
        ckpt = run.checkpointer(model, optimizer, model_config)
        start = ckpt.load()["step"] if cfg.resume else 0
        if run.finished(start, steps):             # a resumed run that is already done
            return
        run.begin(start, steps)                    # the logs and the progress bar
        for step in run.steps():                   # ends after --stop_at; after SIGINT/SIGTERM
            ...                                    #   raises Interrupted, once the step saved
            run.check(loss)                        # NaN / explosion: TrainingDiverged
            if run.due(done, cfg.log_interval): run.log(row)
            if run.save_due(done): ckpt.save(done, probe_loss, ...)

However the block ends, the bar and logs are closed, the lock and the signal handlers released
and a process group this run created destroyed; running out of memory becomes one line naming
the step, the memory and the fix. train_common.main_guard turns each way a run stops into one
line and an exit code (2 bad input or divergence, 130 SIGINT, 143 SIGTERM).

The pieces, each usable alone: RunLock (one run per out_dir), StopSignals (SIGINT/SIGTERM:
finish the step, save, exit), RunLogger (metrics.jsonl and metrics.csv holding the run's true
history), LossGuard (NaN and explosions).
"""

import contextlib
import csv
import json
import math
import os
import sys
import time

import numpy as np
import torch

import train_common as tc
from checkpoint import Checkpointer, check_fresh_start, remove_stale_tmp
from train_common import Interrupted, TrainingDiverged, UserError


class Run:
    """One training run in cfg.out_dir (see the module docstring). cfg: a train_common
    TrainConfig. sharded: checkpoints are FSDP2 directories (ckpt_dcp) instead of ckpt.pt;
    process_group: make a process group even for one process (FSDP2 needs one). oom_fix:
    what the out-of-memory message tells the user to change."""

    def __init__(self, cfg, sharded=False, process_group=False,
                 oom_fix="lower --micro_batch or add --activation_checkpointing"):
        self.cfg, self.sharded, self.process_group, self.oom_fix = cfg, sharded, process_group, oom_fix
        self.ckpt_path = os.path.join(cfg.out_dir, "ckpt_dcp" if sharded else "ckpt.pt")
        self.guard = LossGuard(cfg.explode_factor)
        self.lock = self.signals = self.dist = self.logger = self.bar = self.ckpt = None
        self.start = self.total = self.step = 0  # self.step: the step running now, from 1
        self.signalled = self.stopping = False
        self.keep = set()  # --keep_ckpts, checked against the run's length in checkpointer()
        self._t0 = time.perf_counter()

    def __enter__(self):
        is_main = int(os.environ.get("RANK", 0)) == 0  # before the process group exists
        try:
            # the lock first, so no second run can interleave; then nothing of an earlier run
            # is overwritten, and the .tmp a killed save left goes (safe: we hold the lock)
            self.lock = RunLock(self.cfg.out_dir, enabled=is_main)
            check_fresh_start(self.ckpt_path, self.cfg.resume)
            if is_main:
                remove_stale_tmp(self.ckpt_path)
            self.signals = StopSignals()
            self.dist = tc.setup_distributed(self.cfg.device, force_group=self.process_group)
            tc.setup_float_math(self.dist.device, self.cfg.flush_subnormals)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind, error, traceback):
        message = self.out_of_memory() if isinstance(error, torch.OutOfMemoryError) else None
        self.close()  # (the message first: it reads the device this closes)
        if message:
            raise UserError(message) from None
        return False

    def close(self):
        for thing in (self.bar, self.logger, self.signals, self.lock):
            if thing is not None:
                thing.close()
        self.bar = self.logger = self.signals = self.lock = None
        if self.dist is not None and self.dist.initialized_here:
            tc.teardown_distributed()
        self.dist = None

    def out_of_memory(self):
        device = self.dist.device if self.dist is not None else torch.device("cpu")
        if device.type == "cuda":
            gib = 2 ** 30
            used = (f"{torch.cuda.memory_allocated(device) / gib:.1f} of "
                    f"{torch.cuda.get_device_properties(device).total_memory / gib:.1f} GiB allocated on {device}")
        else:
            used = f"on {device}"
        where = f"at step {self.step}" if self.step else "before the first step"
        keep = (f"the last checkpoint {self.ckpt.last} is intact" if self.ckpt and self.ckpt.last
                else "no checkpoint was written yet")
        return (f"out of memory {where} with --micro_batch {self.cfg.micro_batch} ({used}); "
                f"{self.oom_fix}; {keep}")

    # -- setting up ----------------------------------------------------------------------------

    def checkpointer(self, model, optimizer, model_config):
        """This run's Checkpointer: its path, this run's guard (whose state it saves)."""
        self.keep = tc.keep_steps(self.cfg)
        self.ckpt = Checkpointer(self.ckpt_path, model, optimizer, self.dist, self.guard,
                                 model_config, self.sharded, self.keep)
        return self.ckpt

    def finished(self, start, total):
        """True (and says so) for a resumed run already at its last step: nothing to train."""
        if start < total:
            return False
        if self.dist.is_main:
            print(f"{self.ckpt_path} is already finished ({start} of {total} steps): nothing to "
                  "do; raise --max_steps to train on, or start a new run with another --out_dir",
                  flush=True)
        return True

    def begin(self, start, total, desc="train"):
        """Open the logs (a resume drops the rows logged after its checkpoint) and the bar."""
        self.start, self.total = start, total
        cfg, main = self.cfg, self.dist.is_main
        self.logger = RunLogger(cfg.out_dir, cfg, main, cfg.wandb, cfg.wandb_project, cfg.run_name,
                                resume_step=start if cfg.resume else None)
        if main:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True,
                            file=sys.stdout, mininterval=1.0)

    # -- in the loop ---------------------------------------------------------------------------

    def steps(self):
        """The steps left, start .. total - 1. After a step that saw SIGINT/SIGTERM (and saved:
        save_due was true) it raises Interrupted; after the --stop_at step it ends."""
        for step in range(self.start, self.total):
            self.step = step + 1
            self._t0 = time.perf_counter()
            yield step
            if self.signalled and self.step < self.total:
                raise Interrupted(f"{self.signals.name()} at step {self.step}: saved {self.ckpt.last}; "
                                  "continue with the same command and --resume", self.signals.exit_code())
            if self.bar is not None:
                self.bar.update(1)
            if self.stopping:
                break
        if self.bar is not None:  # what the trainer prints next goes below the finished bar
            self.bar.close()
            self.bar = None

    def step_seconds(self):
        """Wall time of this step so far (CUDA synchronised, so the time is the GPU's too)."""
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize(self.dist.device)
        return time.perf_counter() - self._t0

    def check(self, loss, **shown):
        """The divergence guard on this step's loss (TrainingDiverged naming the last good
        checkpoint); the loss and `shown` go on the progress bar."""
        self.guard.check(loss, self.step, self.ckpt.last if self.ckpt else None)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", **shown, refresh=False)

    def due(self, done, interval):
        """Every `interval` steps (0: never) and at the last step."""
        return bool(interval and done % interval == 0) or done == self.total

    def save_due(self, done):
        """Whether this step ends with a checkpoint: every --ckpt_interval, the last step, the
        --stop_at step, and any step in which SIGINT/SIGTERM arrived. Every rank must call it
        once per step: the signal flag is all-reduced, so that all ranks stop together."""
        self.signalled = self.signals.should_stop(self.dist.device)
        self.stopping = done == self.cfg.stop_at and done < self.total
        return (self.due(done, self.cfg.ckpt_interval) or self.stopping or self.signalled
                or done in self.keep)

    def log(self, row):
        self.logger.log(row)

    def print(self, text):
        if self.bar is not None:
            self.bar.write(text)
        elif self.dist is not None and self.dist.is_main:
            print(text, flush=True)


# ---------------------------------------------------------------------------------------------
# One run per out_dir

def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class RunLock:
    """One run at a time per out_dir: a lock file (out_dir/run.lock) holding the owner's
    host and PID, created with O_EXCL so that two runs starting together cannot both win.

    A second run in the same out_dir is refused with one line naming the PID. A lock left by
    a killed run (kill -9, a crashed node) is stale when its PID is dead on this host; it is
    taken over with a note. A lock from another host cannot be checked from here: the
    message says to delete it if that run is gone. Only rank 0 takes it (enabled)."""

    NAME = "run.lock"

    def __init__(self, out_dir, enabled=True):
        self.path = os.path.join(out_dir, self.NAME)
        self.held = False
        if not enabled:
            return
        import socket
        tc.ensure_writable_dir(out_dir)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None or (owner.get("host") == me["host"]
                                     and not _pid_alive(int(owner.get("pid", -1)))):
                    print(f"note: taking over the stale lock {self.path} "
                          f"(its run, pid {owner and owner.get('pid')}, is gone)", file=sys.stderr)
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path)
                    continue
                where = "" if owner.get("host") == me["host"] else f" on host {owner.get('host')}"
                raise UserError(f"another run (pid {owner.get('pid')}{where}) is using "
                                f"{out_dir}; wait for it to finish, use another --out_dir, or "
                                f"delete {self.path} if that run is gone") from None
            except OSError as e:
                raise UserError(f"cannot write to --out_dir {out_dir}: {e.strerror or e}; "
                                "pick a writable --out_dir") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            import atexit
            atexit.register(self.close)  # also when the process ends without closing it
            return
        raise UserError(f"cannot take the lock {self.path}; delete it if no run is using "
                        f"{out_dir}")

    def _owner(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            # half-written (the owner was killed between create and write): stale if old
            try:
                return None if time.time() - os.path.getmtime(self.path) > 10 else {"pid": "?"}
            except OSError:
                return None

    def close(self):
        if self.held:
            self.held = False
            with contextlib.suppress(OSError):
                os.remove(self.path)



# ---------------------------------------------------------------------------------------------
# SIGINT / SIGTERM, the logs, the divergence guard

class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (a pre-empted or cancelled job) set .requested instead of
    killing the run; the training loop checks it once per step, saves a checkpoint and exits
    (Interrupted: 130 for SIGINT, 143 for SIGTERM). A second signal kills the run at once,
    as usual. Under torchrun every rank gets the signal; should_stop() all-reduces the flag
    so that all ranks stop after the same step."""

    def __init__(self):
        import signal
        self.requested = None
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: keep the default behaviour
                pass

    def _handle(self, signum, frame):
        import signal
        self.requested = signum
        for sig, old in self._old.items():  # a second signal acts normally
            signal.signal(sig, old)

    def should_stop(self, device):
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        return bool(tc.all_reduce_sum(flag).item() > 0)

    def exit_code(self):
        import signal
        return 143 if self.requested == signal.SIGTERM else 130

    def name(self):
        import signal
        return "SIGTERM" if self.requested == signal.SIGTERM else "SIGINT"

    def close(self):
        import signal
        for sig, old in self._old.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, old)
        self._old = {}


class RunLogger:
    """metrics.jsonl (one JSON object per log call) and metrics.csv in out_dir, plus wandb when
    asked for and installed. Only the main rank writes (enabled=False elsewhere). New keys
    (val loss appearing later, say) rewrite the CSV header from the JSONL.

    The logs hold the run's true history: a fresh run (resume_step None) moves the logs of an
    earlier run that never checkpointed aside to metrics.jsonl.old; a run resumed from the
    checkpoint of step S drops the rows logged after S (they are logged again), so no step
    appears twice."""

    def __init__(self, out_dir, cfg=None, enabled=True, use_wandb=False, project="dyt", name="",
                 resume_step=None):
        self.enabled = enabled
        self.jsonl = os.path.join(out_dir, "metrics.jsonl")
        self.csv = os.path.join(out_dir, "metrics.csv")
        self.columns = []
        self.wandb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(self.jsonl) and resume_step is None:
            os.replace(self.jsonl, self.jsonl + ".old")
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.csv)
        if os.path.exists(self.jsonl):  # resuming: keep the columns seen so far
            rows = self._rows()
            kept = [r for r in rows if r.get("step", 0) <= resume_step]
            for row in kept:
                self.columns += [k for k in row if k not in self.columns]
            if len(kept) != len(rows) or not os.path.exists(self.csv):
                self._rewrite(kept)
        if use_wandb:
            try:
                import wandb
                self.wandb = wandb.init(project=project, name=name or None,
                                        config=tc.config_dict(cfg) if cfg is not None else None)
            except ImportError:
                print("warning: --wandb given but wandb is not installed; logging to files only",
                      file=sys.stderr)

    def _rows(self):
        rows = []
        with open(self.jsonl) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line cut short by a kill: not part of the history
                    pass
        return rows

    def _rewrite(self, rows):
        # both files via tmp + os.replace: a kill during the rewrite loses no rows
        for path, write in ((self.jsonl, lambda f: f.writelines(json.dumps(r) + "\n" for r in rows)),
                            (self.csv, lambda f: self._write_csv(f, rows))):
            with open(path + ".tmp", "w", newline="") as f:
                write(f)
            os.replace(path + ".tmp", path)

    def _write_csv(self, f, rows):
        w = csv.DictWriter(f, fieldnames=self.columns)
        w.writeheader()
        w.writerows(rows)

    def log(self, row):
        if not self.enabled:
            return
        row = {k: (float(v) if isinstance(v, (np.floating, torch.Tensor)) else v)
               for k, v in row.items()}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        new = [k for k in row if k not in self.columns]
        if new or not os.path.exists(self.csv):
            self.columns += new
            with open(self.csv, "w", newline="") as f:
                self._write_csv(f, self._rows())
        else:
            with open(self.csv, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.columns).writerow(row)
        if self.wandb is not None:
            self.wandb.log(row, step=row.get("step"))

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


class LossGuard:
    """Stops a run whose loss is NaN/inf or has exploded (above explode_factor times the
    lowest exponential moving average of the loss seen so far; after `patience` steps, so the
    noisy first steps never trigger it). explode_factor 0: only the NaN/inf check."""

    def __init__(self, explode_factor=4.0, patience=5, ema=0.9):
        self.factor, self.patience, self.beta = explode_factor, patience, ema
        self.ema, self.best, self.seen = None, float("inf"), 0

    def check(self, loss, step, last_ckpt=None):
        keep = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else \
            "; no checkpoint was written yet"
        if not math.isfinite(loss):
            raise TrainingDiverged(f"loss is {loss} at step {step}: training diverged{keep} "
                                   "(try a lower --lr or longer --warmup_steps)")
        self.seen += 1
        self.ema = loss if self.ema is None else self.beta * self.ema + (1 - self.beta) * loss
        if self.seen > self.patience and self.factor and loss > self.factor * self.best:
            raise TrainingDiverged(f"loss {loss:.4g} at step {step} is over {self.factor}x "
                                   f"its best average {self.best:.4g}: training exploded"
                                   f"{keep} (try a lower --lr)")
        self.best = min(self.best, self.ema)
        return loss

    def state_dict(self):
        return {"ema": self.ema, "best": self.best, "seen": self.seen}

    def load_state_dict(self, s):
        self.ema, self.best, self.seen = s["ema"], s["best"], s["seen"]
