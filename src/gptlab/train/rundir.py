"""What keeps a run directory sound when runs meet: one writer at a time, SIGTERM saved like Ctrl-C,
and no resume under other settings than the run started with."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path

from gptlab import GptlabError
from gptlab.models.io import recover_atomic_dirs

# what a resumed run may change: how long it runs, how it reports and saves, nothing of the math;
# batch_size and grad_accum may change when the meta's global_batch (x ranks) stays the same
RESUME_FREE_CONFIG = {"max_steps", "max_time", "progress", "log_every", "save_every", "eval_every", "patience",
                      "compile", "eval_batch_size", "batch_size", "grad_accum"}
RESUME_FREE_META = {"step", "best_val"}


@contextlib.contextmanager
def exclusive_lock(directory: str | Path, doing: str = "training"):
    """Hold `directory/.lock` (flock, with our pid in it) so that two processes never write one run.

    The file is removed while still locked; a waiter that opened the removed file sees another inode
    at the path and tries again, so at most one process ever holds the lock of the path."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; run unprotected rather than not at all
        yield
        return
    path = Path(directory) / ".lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise GptlabError(f"cannot write to {directory} ({e.strerror}): choose a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise GptlabError(f"another gptlab process (pid {holder}) is {doing} in {directory}: "
                              "wait for it or choose another --out") from None
        except OSError:  # a filesystem without locks: run unprotected rather than not at all
            break
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def hold_run_dir(out: Path, dist, resumed: bool):
    """Rank 0 locks `out` for the block and tidies what killed runs left; all ranks stop if it cannot."""
    with contextlib.ExitStack() as stack:
        error = None
        if dist.is_main:
            try:
                stack.enter_context(exclusive_lock(out))
            except GptlabError as e:
                error = e
        if not dist.agree(error is None):  # every rank stops, not only rank 0
            raise error or GptlabError(f"rank 0 could not lock {out}: another process is training there")
        # only while holding the lock: nobody else is writing there
        restored = recover_atomic_dirs(out, ("resume", "checkpoint")) if dist.is_main else []
        if dist.agree(not resumed and "resume" in restored):  # starting at step 0 would overwrite it
            raise GptlabError(f"{out / 'resume'} was restored from a save cut short by a kill: "
                              "run the same command again to resume from it")
        yield


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM (schedulers, `docker stop`) ends training as Ctrl-C does, so resume state is saved.

    Only the first one interrupts: a second must not cut short the save the first one started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def interrupt(signum, frame):
        if not fired:
            fired.append(signum)
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def check_same_settings(run: str | Path, saved: dict, now: dict) -> None:
    """Refuse to resume `run` when its saved meta (with `train_config`) records other settings.

    Only keys the saved run recorded are compared: a field added by a newer gptlab does not block."""
    now = json.loads(json.dumps(now))  # tuples become lists, as in the saved file
    pairs = [(k, v, now.get(k)) for k, v in saved.items() if k not in RESUME_FREE_META | {"train_config"}]
    now_cfg = now.get("train_config") or {}
    pairs += [(k, v, now_cfg.get(k)) for k, v in (saved.get("train_config") or {}).items()
              if k not in RESUME_FREE_CONFIG]
    short = lambda v: s if len(s := json.dumps(v)) <= 40 else s[:37] + "..."
    if diff := [f"{k}: {short(a)} -> {short(b)}" for k, a, b in pairs if a != b]:
        raise GptlabError(f"{run} was started with other settings than it is resumed with ({', '.join(diff)}): "
                          "rerun with the original settings, or use another --out / --fresh")
