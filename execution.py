"""Run model-written Python in a sandbox (HumanEval scoring).

    result = run_python("print(1 + 1)", timeout=5.0, memory_mb=256)
    result.ok, result.stdout, result.stderr, result.timed_out, result.memory_exceeded

Two layers, each meant to hold on its own:
- the kernel, through bubblewrap (`bwrap`, Linux): the code sees the Python installation read-only
  and nothing else of the host; its only writable place is a fresh tmpfs; it has its own network
  (none), PID namespace and /proc (no host process is visible or reachable), IPC and hostname; it
  runs as an unprivileged user with rlimits on memory, CPU seconds, processes (none) and file size,
  and dies with us;
- Python, in the child itself: an audit hook (PEP 578; code cannot remove it) refuses writes
  outside the working folder, reads outside it and the Python installation, /proc, processes,
  signals, sockets, ctypes, sqlite files elsewhere, and the introspection (frames, gc, tracing) that
  could reach the harness's secret. Its state lives in a closure that nothing reachable refers to.

Pass/fail is the harness's decision: before the code runs, the child reads a random token from a
pipe; only after the code ran to its end does it write the token back on a second pipe. Code that
leaves early (sys.exit, os._exit(0), a signal) never produces the token, whatever the exit status.

Where bwrap is missing or cannot run (macOS; Linux without user namespaces) only the Python layer,
the rlimits and our kill of the process group hold, and run_python says so once on stderr.
"""

import contextlib
import os
import selectors
import shutil
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

OUTPUT_LIMIT = 64 * 1024    # bytes kept of each of stdout and stderr
FILE_SIZE_LIMIT = 16 << 20  # largest file the code may write
TMPFS_BYTES = 64 << 20      # all the code may write, under bwrap
MEMORY_EXIT = 107           # the child's exit status after a MemoryError
STARTUP_GRACE = 0.5         # seconds of interpreter startup not counted against `timeout`
NOBODY = 65534
PYTHON_GUARD = True         # the in-process layer; tests switch it off to probe the kernel layer alone


@dataclass
class ExecResult:
    ok: bool                # the code ran to its end without an exception
    stdout: str
    stderr: str
    timed_out: bool = False
    memory_exceeded: bool = False


# The child: python -I -B -c CHILD in_fd out_fd drop_root guard memory_mb cpu_seconds file_bytes.
# Everything lives in main()'s frame, which the guard keeps out of the code's reach.
CHILD = r'''
def guard(root):
    import os, sys
    homes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path) if p}
    readable = tuple(homes | {root, "/dev/null", "/dev/urandom", "/dev/zero"})
    never = frozenset("""os.system os.exec os.fork os.forkpty os.posix_spawn os.spawn subprocess.Popen os.kill
        os.killpg signal.pthread_kill signal.pidfd_send_signal socket.__new__ socket.connect socket.bind
        ctypes.dlopen ctypes.dlsym ctypes.call_function os.chroot os.setuid os.setgid os.setreuid os.setregid
        os.setresuid os.setresgid os.setsid os.setpgid sys.addaudithook resource.setrlimit resource.prlimit
        sys.remote_exec pty.spawn webbrowser.open sqlite3.enable_load_extension sqlite3.load_extension
        sys._current_frames sys._current_exceptions gc.get_objects gc.get_referrers gc.get_referents
        sys.settrace sys.setprofile sys.monitoring.register_callback""".split())
    path_args = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.truncate": (0,),
                 "os.chmod": (0,), "os.chown": (0,), "os.chflags": (0,), "os.link": (0, 1), "os.symlink": (1,),
                 "os.utime": (0,), "os.mkdir": (0,), "os.mkfifo": (0,), "os.mknod": (0,), "os.setxattr": (0,),
                 "os.removexattr": (0,), "shutil.rmtree": (0,), "shutil.move": (0, 1), "shutil.copyfile": (1,),
                 "shutil.copytree": (1,), "shutil.make_archive": (0,)}
    blocked_imports = frozenset("ctypes _ctypes cffi _cffi_backend _posixsubprocess posix _xxsubinterpreters "
                                "_interpreters _testcapi _testinternalcapi _testmultiphase".split())
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def under(path, roots):
        if isinstance(path, int):  # an open descriptor: nothing new is reached
            return True
        real = os.path.realpath(os.fsdecode(path))
        return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)

    def refuse(what):
        raise PermissionError(f"sandbox: {what} is not allowed here")

    def audit(event, args):
        if event in never:
            refuse(event)
        elif event == "sys._getframe":  # ValueError: what namedtuple, enum and typing expect at the stack's top
            raise ValueError("sandbox: the call stack is not visible")
        elif event == "object.__getattr__" and args[1] in ("tb_frame", "gi_frame", "cr_frame", "ag_frame"):
            refuse(f"reading {args[1]}")
        elif event == "open":
            path, mode, flags = args
            if mode is None and not isinstance(path, int) and not os.path.isabs(os.fsdecode(path)):
                refuse("os.open with a relative path")  # dir_fd is not in the event: it could point anywhere
            if not under(path, (root, "/dev/null") if (flags or 0) & write_flags else readable):
                refuse(f"opening {path!r}")
        elif event in ("os.listdir", "os.scandir", "glob.glob") and args[0] is not None:
            if not under(args[0] or ".", readable):
                refuse(f"listing {args[0]!r}")
        elif event == "sqlite3.connect":
            name = os.fsdecode(args[0]) if not isinstance(args[0], int) else ""
            if name not in ("", ":memory:") and (name.startswith("file:") or not under(name, (root,))):
                refuse(f"a database at {name!r}")
        elif event in path_args:
            for i in path_args[event]:
                if i < len(args) and not under(args[i], (root,)):
                    refuse(f"{event} on {args[i]!r}")
            if len(args) > 2 and event.startswith("os.") and isinstance(args[-1], int) and args[-1] != -1:
                refuse(f"{event} relative to a directory descriptor")
        elif event == "import" and args[0] in blocked_imports:
            raise ImportError(f"sandbox: import {args[0]} is not allowed here")  # optional imports still work

    sys.addaudithook(audit)


def main():
    import os, resource, sys, types
    in_fd, out_fd, drop_root, use_guard, memory_mb, cpu_seconds, file_bytes = map(int, sys.argv[1:8])
    with os.fdopen(in_fd, "rb") as f:
        token, _, source = f.read().partition(b"\n")
    write, exit_now = os.write, os._exit
    if drop_root:  # bwrap ran as root: become nobody, so that the process limit applies
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    limits = [(resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_FSIZE, file_bytes),
              (resource.RLIMIT_CORE, 0)] + ([(resource.RLIMIT_AS, memory_mb << 20)] if memory_mb else [])
    for kind, value in limits:
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):  # macOS refuses some of them
            pass
    code_path = os.path.abspath(".code.py")  # a real file, so that tracebacks show the lines
    with open(code_path, "wb") as f:
        f.write(source)
    if use_guard:
        guard(os.getcwd())
    module = types.ModuleType("__main__")
    sys.modules["__main__"] = module
    status = 1
    try:
        exec(compile(source, code_path, "exec"), module.__dict__)
        status = 0
    except MemoryError:
        status = MEMORY_EXIT
        sys.stderr.write("MemoryError: the code ran out of memory\n")
    except SystemExit as e:  # as in HumanEval's harness: code that exits early did not finish
        sys.stderr.write(f"SystemExit({e.code!r}): the code exited before its end\n")
    except BaseException:
        kind, error, tb = sys.exc_info()
        sys.__excepthook__(kind, error.with_traceback(tb.tb_next), tb.tb_next)  # C: no frame access needed
    if status == 0:
        write(out_fd, token)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        exit_now(status)


main()
'''.replace("MEMORY_EXIT", str(MEMORY_EXIT)).replace("NOBODY", str(NOBODY))


def _bwrap_command(workdir: str) -> list:
    """bwrap's arguments for a sandbox whose working folder is `workdir` (a fresh tmpfs)."""
    cmd = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
           "--die-with-parent", "--proc", "/proc", "--dev", "/dev"]
    for path in ("/usr", "/bin", "/lib", "/lib64", "/etc/ld.so.cache"):
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            cmd += ["--symlink", os.readlink(path), path]
        else:
            cmd += ["--ro-bind-try", path, path]
    for home in sorted({sys.prefix, sys.base_prefix, sys.exec_prefix}):
        for parent in list(Path(home).parents)[-2::-1]:  # bwrap would create them 0700: unreadable to nobody
            cmd += ["--perms", "0755", "--dir", str(parent)]
        cmd += ["--ro-bind", home, home]
    cmd += ["--perms", "1777", "--size", str(TMPFS_BYTES), "--tmpfs", workdir, "--chdir", workdir,
            "--remount-ro", "/"]
    if os.geteuid() == 0:  # no user namespace then: the child drops to nobody itself
        cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    return cmd


@lru_cache(maxsize=1)
def bwrap_works() -> bool:
    """Whether bubblewrap runs here with this Python; if not, say once what that costs."""
    try:
        cmd = [*_bwrap_command("/tmp/probe"), "--", sys.executable, "-I", "-c", "pass"]
        ok = shutil.which("bwrap") is not None and subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    if not ok:
        print("warning: bubblewrap (bwrap) is missing or cannot run here, so model-written code runs with the "
              "Python-level guard and rlimits only, which determined code can get around; on Linux install it "
              "(apt-get install bubblewrap) for kernel isolation", file=sys.stderr, flush=True)
    return ok


def _clean_env(workdir):
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_python(code: str, timeout: float = 5.0, memory_mb: int | None = 256) -> ExecResult:
    """Run `code` as a script in the sandbox; see the module docstring."""
    label = f"speedchat-exec-{secrets.token_hex(6)}"  # names the working folder and shows in `ps`
    token = secrets.token_hex(16).encode()
    sandboxed = bwrap_works()
    workdir = os.path.join("/tmp" if sandboxed else tempfile.gettempdir(), label)
    if not sandboxed:
        os.mkdir(workdir, 0o700)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    child = [sys.executable, "-I", "-B", "-c", CHILD, str(in_r), str(out_w), str(int(sandboxed and os.geteuid() == 0)),
             str(int(PYTHON_GUARD)), str(memory_mb or 0), str(max(1, int(timeout + 1))), str(FILE_SIZE_LIMIT)]
    cmd = [*_bwrap_command(workdir), "--", *child] if sandboxed else child
    try:
        proc = subprocess.Popen(cmd, cwd=None if sandboxed else workdir, env=_clean_env(workdir),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, pass_fds=(in_r, out_w))
        os.close(in_r)
        os.close(out_w)
        threading.Thread(target=_feed, args=(in_w, token + b"\n" + code.encode("utf-8", "replace")),
                         daemon=True).start()
        try:
            out, err, timed_out = _collect(proc, time.monotonic() + timeout + STARTUP_GRACE)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):  # while the leader is unreaped,
                os.killpg(proc.pid, signal.SIGKILL)  # so its id cannot have been reused
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        os.set_blocking(out_r, False)
        try:
            finished = os.read(out_r, len(token) + 1) == token
        except BlockingIOError:
            finished = False
    finally:
        os.close(out_r)
        if not sandboxed:
            shutil.rmtree(workdir, ignore_errors=True)
    status = proc.returncode
    timed_out = timed_out or status in (-signal.SIGXCPU, -signal.SIGKILL)
    memory_exceeded = status == MEMORY_EXIT
    stdout, stderr = _text(out), _text(err)
    if timed_out:
        stderr += f"\n[timed out after {timeout:g}s]"
    return ExecResult(ok=finished and status == 0 and not timed_out, stdout=stdout, stderr=stderr,
                      timed_out=timed_out, memory_exceeded=memory_exceeded)


def _feed(fd, data):
    try:
        with open(fd, "wb") as f:
            f.write(data)
    except OSError:  # the child died before reading it all
        pass


def _collect(proc, deadline):
    """Read stdout and stderr until both close and the child has exited, or until the deadline.
    Keeps OUTPUT_LIMIT bytes of each and discards the rest (still reading, so the child never
    blocks on a full pipe). Returns (stdout bytes, stderr bytes, timed_out)."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    out, err = bufs.values()
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return out, err, True
            for key, _ in sel.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                if len(buf) <= OUTPUT_LIMIT:
                    buf += chunk[:OUTPUT_LIMIT + 1 - len(buf)]  # one byte over marks truncation
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:  # exited, not reaped
        if time.monotonic() > deadline:
            return out, err, True
        time.sleep(0.002)
    return out, err, False


def _text(data: bytes) -> str:
    text = bytes(data[:OUTPUT_LIMIT]).decode("utf-8", errors="replace")
    return text + "\n[output truncated]" if len(data) > OUTPUT_LIMIT else text
