"""Test runner executed INSIDE the bubblewrap sandbox by the system interpreter (stdlib only).

Not imported by the host. Reads one job on stdin (a `marshal`-encoded dict, written by the
trusted host; marshal and select are built in, which keeps the sandbox start-up short):
    {"program": str, "fn_name": str | None, "inputs": [...], "per_test_timeout_s": float,
     "rlimits": {"AS": bytes, "CPU": s, "NPROC": n, "FSIZE": bytes, "NOFILE": n},
     "max_output_bytes": int, "total_timeout_s": float, "drop_to_uid": int | None}
and, for each test i, forks a child that: starts a new session (process group), applies the
rlimits, drops to `drop_to_uid` (the runner itself stays the sandbox's root, so the child cannot
signal it or read its file descriptors), then runs the program with stdin = inputs[i] (stdio
tests) or calls `fn_name(*inputs[i])` / `Solution().fn_name(*inputs[i])` and writes the JSON
result to fd 3 (call tests). The runner captures at most `max_output_bytes`, kills the child's
process group on timeout or overflow, then kills whatever the test left running anywhere in
the sandbox (daemons that left the group), and writes one record per test to stdout (8-byte
little-endian length, then the marshal-encoded dict):
    {"i": i, "status": "ok" | "error" | "timeout" | "output_limit" | "spawn_failed" | "skipped",
     "out": str}
A last record {"i": -1, "cpu_s": float} gives the CPU time of the runner and its tests.
Tests start while the job's `total_timeout_s` lasts; the rest are "skipped" (failed), so a
program that times out on every test costs at most that budget, not tests x per-test timeout.
Expected outputs never enter the sandbox: comparison happens on the host.
"""
import marshal
import os
import resource
import select
import signal
import sys
import time

POLL_S = 0.002  # exit polling interval when pidfds are unavailable
_RLIMITS = {"AS": resource.RLIMIT_AS, "CPU": resource.RLIMIT_CPU, "NPROC": resource.RLIMIT_NPROC,
            "FSIZE": resource.RLIMIT_FSIZE, "NOFILE": resource.RLIMIT_NOFILE}


def _child(job, i, in_fd, out_w, res_w):
    """In the forked child: isolate, limit, drop privileges, run test i; never returns."""
    code = 1
    try:
        os.setsid()
        null_fd = os.open("/dev/null", os.O_WRONLY)
        for src, dst in ((in_fd, 0), (out_w, 1), (null_fd, 2), (res_w, 3)):
            os.dup2(src, dst)
        os.closerange(4, 1 << 16)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        for name, value in job["rlimits"].items():
            resource.setrlimit(_RLIMITS[name], (int(value), int(value)))
        uid = job.get("drop_to_uid")
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        work = "/tmp/w%d" % i
        os.makedirs(work, exist_ok=True)
        os.chdir(work)
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        code = _run_program(job, job["inputs"][i])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # the program's own error: a failed test
        code = 1
    try:
        sys.stdout.flush()
    except BaseException:
        code = code or 1
    os._exit(code)


def _run_program(job, test_input):
    fn_name = job.get("fn_name")
    compiled = job["compiled"]
    namespace = {"__name__": "__main__" if not fn_name else "__solution__"}
    exec(compiled, namespace)
    if not fn_name:
        return 0
    fn = namespace.get(fn_name)
    if not callable(fn):
        fn = getattr(namespace["Solution"](), fn_name)
    args = test_input if isinstance(test_input, list) else [test_input]
    result = fn(*args)
    import json  # imported in the runner before forking for call-based jobs

    os.write(3, json.dumps(result, default=repr).encode())
    return 0


def _collect(pid, fds, timeout_s, cap):
    """Read the child's pipes until it exits (or timeout/overflow); returns (status, outputs).

    The child's exit is watched through a pidfd (readable when it exits), so a finished test is
    noticed at once; where pidfds are unavailable, the loop polls every POLL_S seconds.
    """
    poller = select.poll()
    bufs = {fd: bytearray() for fd in fds}
    for fd in fds:
        poller.register(fd, select.POLLIN)
    pidfd = _pidfd(pid)
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)
    deadline = time.monotonic() + timeout_s
    status, exit_code, open_fds = None, None, set(fds)
    while status is None:
        if exit_code is None:
            done, wstatus = os.waitpid(pid, os.WNOHANG)
            if done:
                exit_code = os.waitstatus_to_exitcode(wstatus)
                if pidfd is not None:
                    poller.unregister(pidfd)
        if exit_code is not None and not open_fds:
            status = "ok" if exit_code == 0 else "error"
            break
        now = time.monotonic()
        if now >= deadline:
            status = "timeout"
            break
        wait = min(deadline - now, POLL_S if pidfd is None or exit_code is not None else 1.0)
        events = poller.poll(wait * 1000)
        if not events and exit_code is not None:  # exited; only a stray grandchild holds a pipe
            status = "ok" if exit_code == 0 else "error"
        for fd, _ in events:
            if fd == pidfd:
                continue  # the child exited: reaped at the top of the loop
            chunk = os.read(fd, 65536)
            if not chunk:
                poller.unregister(fd)
                open_fds.discard(fd)
            bufs[fd] += chunk
            if len(bufs[fd]) > cap:
                status = "output_limit"
    if pidfd is not None:
        os.close(pidfd)
    return status, [bytes(bufs[fd][:cap]) for fd in fds]


def _pidfd(pid):
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _input_fd(job, i):
    """A read-only fd on test i's stdin, whose file is already unlinked (invisible to tests)."""
    path = "/tmp/.in/%d" % i
    test_input = job["inputs"][i]
    with open(path, "w") as f:
        f.write(test_input if isinstance(test_input, str) and not job.get("fn_name") else "")
    fd = os.open(path, os.O_RDONLY)
    os.unlink(path)
    return fd


def _kill_leftovers(deadline_s=0.5):
    """Kill every process of the sandbox but pid 1 (bwrap) and this runner, and wait until the
    kernel has released them, so the next test starts with the whole process budget."""
    try:
        os.kill(-1, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    me, stop = str(os.getpid()), time.monotonic() + deadline_s
    while time.monotonic() < stop:
        if not [p for p in os.listdir("/proc") if p.isdigit() and p not in ("1", me)]:
            return
        time.sleep(POLL_S)


def run_test(job, i, timeout_s):
    """Run test i in a fresh child; returns the result dict written for it."""
    in_fd = _input_fd(job, i)
    out_r, out_w = os.pipe()
    res_r, res_w = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        for fd in (in_fd, out_r, out_w, res_r, res_w):
            os.close(fd)
        return {"i": i, "status": "spawn_failed", "out": ""}
    if pid == 0:
        os.close(out_r)
        os.close(res_r)
        _child(job, i, in_fd, out_w, res_w)
    for fd in (in_fd, out_w, res_w):
        os.close(fd)
    status, (stdout, result) = _collect(pid, [out_r, res_r], timeout_s, job["max_output_bytes"])
    _kill_group(pid)
    _kill_leftovers()
    os.close(out_r)
    os.close(res_r)
    out = result if job.get("fn_name") else stdout
    return {"i": i, "status": status, "out": out.decode("utf-8", errors="replace")}


def main():
    job = marshal.loads(sys.stdin.buffer.read())
    try:  # once here, not per test (compiling in a fresh fork costs ~100x more: page faults);
        # compiling executes nothing, and its size limits bound the work
        job["compiled"] = compile(job["program"], "<solution>", "exec")
    except BaseException:  # a syntax error: every test fails, nothing to run
        for i in range(len(job["inputs"])):
            _write_record({"i": i, "status": "error", "out": ""})
        return
    if job.get("fn_name"):
        import json  # noqa: F401  (children inherit it: no import per test)
    os.mkdir("/tmp/.in", 0o700)
    deadline = time.monotonic() + job["total_timeout_s"]
    for i in range(len(job["inputs"])):
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            result = {"i": i, "status": "skipped", "out": ""}
        else:
            result = run_test(job, i, min(job["per_test_timeout_s"], left_s))
        _write_record(result)
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    _write_record({"i": -1, "cpu_s": own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime})


def _write_record(record):
    data = marshal.dumps(record)
    os.write(1, len(data).to_bytes(8, "little") + data)


if __name__ == "__main__":
    main()
