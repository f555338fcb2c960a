"""Run model-written Python in a separate, limited process (HumanEval scoring).

    result = run_python("print(1 + 1)", timeout=5.0, memory_mb=256)
    result.ok, result.stdout, result.stderr, result.timed_out, result.memory_exceeded

Layers, outermost first:
- a child `python -I -B` in its own session (process group) and a fresh temporary working
  directory, with a scrubbed environment and no stdin; when the machine allows it, inside
  new user, network and PID namespaces (`unshare -rn -p -f`): no network interfaces, and
  every process the run makes dies with it;
- a wall-clock deadline after which the whole process group is SIGKILLed (the caller never
  hangs, and nothing is left running); stdout and stderr are drained concurrently and
  truncated at OUTPUT_LIMIT, so a chatty program can neither deadlock nor flood us;
- rlimits set in the child before the code runs: CPU seconds, address space (memory_mb),
  no new processes or threads (RLIMIT_NPROC 0; Linux does not apply it to uid 0, where the
  guards below do that job), largest file written, no core dumps;
- an audit hook (PEP 578; Python code cannot remove it) that refuses: writing, renaming,
  deleting or changing anything outside the temporary directory; starting processes (fork,
  exec, spawn, system, subprocess); signalling processes; sockets; ctypes;
- destructive functions replaced by ones that raise (os.remove, shutil.rmtree, os.kill,
  os.system, subprocess.Popen, os.fork, exit/quit, ...), as in HumanEval's own harness.

This is a guard against accidents of a small model, not a security boundary against an
adversary: run it on a machine you do not mind rebuilding.
"""

import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

OUTPUT_LIMIT = 64 * 1024   # bytes kept of each of stdout and stderr
FILE_SIZE_LIMIT = 16 << 20  # largest file the code may write (in its temporary directory)
MEMORY_EXIT = 107           # the child's exit status after a MemoryError
STARTUP_GRACE = 0.5         # seconds of interpreter startup not counted against `timeout`


@dataclass
class ExecResult:
    ok: bool                # the code ran to the end without an exception (exit status 0)
    stdout: str
    stderr: str
    timed_out: bool = False
    memory_exceeded: bool = False


# The child runs this (python -I -c CHILD code_path workdir memory_mb cpu_seconds). It sets the
# limits and guards, then executes the code file as __main__.
CHILD = r'''
import builtins, linecache, os, posix, resource, shutil, signal, socket, subprocess, sys, traceback
import _posixsubprocess

code_path, workdir = sys.argv[1], sys.argv[2]
memory_mb, cpu_seconds, fsize = (int(x) for x in sys.argv[3:6])
with open(code_path, encoding="utf-8") as f:
    source = f.read()
real_exit, real_write = os._exit, sys.stderr.write

def limit(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass

limit(resource.RLIMIT_CPU, cpu_seconds)
limit(resource.RLIMIT_NPROC, 0)
limit(resource.RLIMIT_FSIZE, fsize)
limit(resource.RLIMIT_CORE, 0)
if memory_mb > 0:
    limit(resource.RLIMIT_AS, memory_mb << 20)

root = os.path.realpath(workdir)
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
NEVER = {"os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "subprocess.Popen",
         "os.kill", "os.killpg", "signal.pthread_kill", "socket.__new__", "socket.connect", "socket.bind",
         "socket.sendto", "socket.sendmsg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function",
         "os.chroot", "os.setuid", "os.setgid", "os.setreuid", "os.setregid", "os.setresuid", "os.setresgid",
         "os.setsid", "os.setpgid", "webbrowser.open", "sys.addaudithook",
         "resource.setrlimit", "resource.prlimit", "sys.remote_exec", "pty.spawn", "winreg.OpenKey"}
PATH_ARGS = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.truncate": (0,), "os.chmod": (0,),
             "os.chown": (0,), "os.chflags": (0,), "os.lchflags": (0,), "os.link": (0, 1), "os.symlink": (1,),
             "os.utime": (0,), "os.mkdir": (0,), "os.mkfifo": (0,), "os.mknod": (0,), "os.setxattr": (0,),
             "os.removexattr": (0,), "shutil.rmtree": (0,), "shutil.move": (0, 1), "shutil.copyfile": (1,),
             "shutil.copytree": (1,), "shutil.make_archive": (0,)}
BLOCKED_IMPORTS = {"ctypes", "_ctypes", "_posixsubprocess", "cffi", "_cffi_backend", "_xxsubinterpreters"}

def inside(path, fd_ok=False):
    if isinstance(path, int):  # open(fd) only wraps an open descriptor; chmod(fd) etc. could reach anywhere
        return fd_ok
    try:
        real = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return real == root or real.startswith(root + os.sep) or real == "/dev/null"

def refuse(event):
    raise PermissionError(f"sandbox: {event} is not allowed here")

def audit(event, args):
    if event in NEVER:
        refuse(event)
    elif event == "open":
        path, mode, flags = args
        if (flags or 0) & WRITE and not inside(path, fd_ok=True):
            refuse(f"writing {path!r}")
    elif event in PATH_ARGS:
        for i in PATH_ARGS[event]:
            if i < len(args) and not inside(args[i]):
                refuse(f"{event} on {args[i]!r}")
        if len(args) > 2 and event.startswith("os.") and isinstance(args[-1], int) and args[-1] != -1:
            refuse(f"{event} relative to a directory descriptor")
    elif event == "import" and args[0] in BLOCKED_IMPORTS:
        # an ImportError, so that libraries with an optional ctypes (numpy) still import
        raise ImportError(f"sandbox: import {args[0]} is not allowed here")

def disabled(name, original):
    def raiser(*args, **kwargs):
        raise PermissionError(f"sandbox: {name}() is disabled")
    if isinstance(original, type):  # stay a class, so that library code may still subclass it
        return type(original.__name__, (original,), {"__init__": raiser, "__new__": lambda cls, *a, **k: raiser()})
    return raiser

real_open = os.open

def guarded_open(path, flags, mode=0o777, *, dir_fd=None):
    # the audit event does not carry dir_fd, so a relative path could hide a write elsewhere
    if dir_fd is not None and flags & WRITE:
        refuse("os.open for writing relative to a directory descriptor")
    return real_open(path, flags, mode, dir_fd=dir_fd)

os.open = posix.open = guarded_open
for module, names in [
    (os, "remove unlink rmdir removedirs rename renames replace truncate ftruncate chmod fchmod lchmod chown "
         "fchown lchown chroot link symlink mkfifo mknod kill killpg system popen fork forkpty execv execve "
         "execl execle execlp execlpe execvp execvpe spawnv spawnve spawnl spawnle spawnlp spawnlpe spawnvp "
         "spawnvpe posix_spawn posix_spawnp setsid setpgid setuid setgid _exit abort"),
    (posix, "remove unlink rmdir rename replace truncate ftruncate chmod fchmod chown fchown lchown chroot "
            "link symlink mkfifo mknod kill killpg system fork forkpty execv execve posix_spawn posix_spawnp "
            "setsid setpgid setuid setgid _exit abort"),
    (shutil, "rmtree move chown"),
    (subprocess, "Popen run call check_call check_output getoutput getstatusoutput _fork_exec"),
    (signal, "pthread_kill"),
    (socket, "socket socketpair create_connection create_server fromfd"),
    (_posixsubprocess, "fork_exec"),
    (builtins, "exit quit help"),
]:
    for name in names.split():
        if hasattr(module, name):
            setattr(module, name, disabled(f"{module.__name__}.{name}", getattr(module, name)))
sys.addaudithook(audit)

linecache.cache["<code>"] = (len(source), None, source.splitlines(True), "<code>")  # readable tracebacks
status = 0
try:
    exec(compile(source, "<code>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
except MemoryError:
    status = MEMORY_EXIT
    real_write("MemoryError: the code ran out of memory\n")
except SystemExit as e:
    # like HumanEval's harness: code that exits early did not finish, whatever its status
    status = 1
    real_write(f"SystemExit({e.code!r}): the code exited before the end\n")
except BaseException:
    status = 1
    try:
        traceback.print_exc()
    except MemoryError:
        real_write("MemoryError\n")
        status = MEMORY_EXIT
try:
    sys.stdout.flush()
    sys.stderr.flush()
except BaseException:
    pass
real_exit(status)
'''.replace("MEMORY_EXIT", str(MEMORY_EXIT))


@lru_cache(maxsize=1)
def _unshare_prefix() -> tuple:
    """The strongest `unshare` wrapper this machine allows: new user, network and PID
    namespaces (no network; every process of the run dies with its first one), or only
    user+network, or nothing (then the in-process guards are what stops networking)."""
    exe = shutil.which("unshare")
    for flags in (("-rn", "-p", "-f", "--kill-child"), ("-rn",)):
        try:
            if exe and subprocess.run([exe, *flags, "true"], capture_output=True, timeout=5).returncode == 0:
                return (exe, *flags)
        except (OSError, subprocess.SubprocessError):
            pass
    return ()


def _clean_env(workdir):
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_python(code: str, timeout: float = 5.0, memory_mb: int | None = 256) -> ExecResult:
    """Run `code` as a script in a sandboxed child process; see the module docstring."""
    workdir = tempfile.mkdtemp(prefix="speedchat-exec-")
    try:
        code_path = os.path.join(workdir, ".code.py")
        with open(code_path, "w", encoding="utf-8", errors="replace") as f:
            f.write(code)
        cpu_seconds = max(1, int(timeout + 1))
        cmd = [*_unshare_prefix(), sys.executable, "-I", "-B", "-c", CHILD, code_path, workdir,
               str(memory_mb or 0), str(cpu_seconds), str(FILE_SIZE_LIMIT)]
        proc = subprocess.Popen(cmd, cwd=workdir, env=_clean_env(workdir), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                close_fds=True)
        try:
            out, err, timed_out = _collect(proc, time.monotonic() + timeout + STARTUP_GRACE)
        finally:
            # kill the group while the leader is still unreaped, so its id cannot have been reused
            _kill_group(proc.pid)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    status = proc.returncode
    timed_out = timed_out or status in (-signal.SIGXCPU, -signal.SIGKILL)
    memory_exceeded = status == MEMORY_EXIT or (status == 1 and err.rstrip().endswith(b"MemoryError"))
    stdout, stderr = _text(out), _text(err)
    if timed_out:
        stderr += f"\n[timed out after {timeout:g}s]"
    return ExecResult(ok=status == 0 and not timed_out, stdout=stdout, stderr=stderr,
                      timed_out=timed_out, memory_exceeded=memory_exceeded)


def _collect(proc, deadline):
    """Read stdout and stderr until both close and the child has exited, or until the deadline.
    Keeps OUTPUT_LIMIT bytes of each and discards the rest (still reading, so the child never
    blocks on a full pipe). Returns (stdout bytes, stderr bytes, timed_out)."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bufs[proc.stdout.fileno()], bufs[proc.stderr.fileno()], True
            for key, _ in sel.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                if len(buf) <= OUTPUT_LIMIT:
                    buf += chunk[:OUTPUT_LIMIT + 1 - len(buf)]  # one byte over marks truncation
    # both pipes closed: wait (without reaping) for the exit
    while not _exited(proc.pid):
        if time.monotonic() > deadline:
            return bufs[proc.stdout.fileno()], bufs[proc.stderr.fileno()], True
        time.sleep(0.002)
    return bufs[proc.stdout.fileno()], bufs[proc.stderr.fileno()], False


def _exited(pid) -> bool:
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _text(data: bytes) -> str:
    text = bytes(data[:OUTPUT_LIMIT]).decode("utf-8", errors="replace")
    return text + "\n[output truncated]" if len(data) > OUTPUT_LIMIT else text
