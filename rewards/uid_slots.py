"""Exclusive sandbox uids: one uid per concurrently running sandbox, across threads and processes.

RLIMIT_NPROC counts every process and thread of a real uid on the whole machine, so sandboxes
that share one uid share one process budget: one response's sleeping processes (or threads) can
make another response's honest `fork` fail. As root the host gives each sandbox its own uid from
a range of `count` uids starting at `base`; a uid is held by an exclusive `flock` on its lock
file in LOCK_DIR, so RewardPool workers (separate processes) and threads never share one, and a
holder that dies releases its uid with its file descriptors. A uid that still owns a process
(a sandbox being torn down) is skipped.

    with acquire(base, count) as uid:
        ...  # run one sandbox whose tests setuid(uid)
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from typing import Iterator

LOCK_DIR = "/tmp/prorl-sandbox-uids"
RETRY_S = 0.01  # wait between sweeps when every uid is taken


class SlotsExhaustedError(RuntimeError):
    """No sandbox uid became free within the wait limit."""


def _lock_dir() -> str:
    """LOCK_DIR, created private (0700) to this user; refuses one owned by someone else."""
    try:
        os.mkdir(LOCK_DIR, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(LOCK_DIR)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise RuntimeError(f"{LOCK_DIR}: expected a directory owned by uid {os.geteuid()} and "
                           "not writable by others (remove it and retry)")
    return LOCK_DIR


def uids_in_use() -> set[int]:
    """Real uids that own a process right now (one pass over /proc)."""
    owners = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                owners.add(os.stat(f"/proc/{entry}").st_uid)
            except OSError:
                pass
    return owners


def _try_lock(path: str) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


@contextlib.contextmanager
def acquire(base: int, count: int, wait_s: float = 5.0) -> Iterator[int]:
    """Hold one free uid in [base, base + count) for the duration of the block.

    Sweeps start at a per-process offset (fewer collisions between workers); raises
    SlotsExhaustedError when no uid is free within `wait_s` seconds.
    """
    if count < 1:
        raise ValueError(f"uid slots: count must be >= 1, got {count}")
    directory = _lock_dir()
    deadline = time.monotonic() + wait_s
    start = (os.getpid() * 7919) % count
    while True:
        busy = uids_in_use()
        for k in range(count):
            uid = base + (start + k) % count
            if uid in busy:
                continue
            fd = _try_lock(os.path.join(directory, f"uid-{uid}.lock"))
            if fd is None:
                continue
            try:
                yield uid
            finally:
                os.close(fd)
            return
        if time.monotonic() >= deadline:
            raise SlotsExhaustedError(
                f"all {count} sandbox uids from {base} are in use (more concurrent sandboxes "
                "than SandboxLimits.uid_slots)")
        time.sleep(RETRY_S)
