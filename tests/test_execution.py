"""The sandbox in execution.py: results, limits, cleanup, attacks on each layer alone and on both,
and real HumanEval rows."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import execution
from execution import OUTPUT_LIMIT, run_python

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(params=["both", "kernel", "python"])
def layers(request, monkeypatch):
    """Both layers (the default), the kernel's alone (bwrap, no Python guard), Python's alone (no bwrap)."""
    if request.param != "python" and not execution.bwrap_works():
        pytest.skip("bubblewrap cannot run here (apt-get install bubblewrap)")
    if request.param == "kernel":
        monkeypatch.setattr(execution, "PYTHON_GUARD", False)
    if request.param == "python":
        monkeypatch.setattr(execution, "bwrap_works", lambda: False)
    return request.param


def processes_mentioning(text):
    """Pids of live processes whose command line contains `text`."""
    def cmdline(entry):
        with contextlib.suppress(OSError):
            return (entry / "cmdline").read_bytes()
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and text.encode() in (cmdline(e) or b"")]


def tries(attempts, after=""):
    """A program that runs each attempt (one line of code) in turn and prints ALLOWED or BLOCKED name."""
    return "".join(textwrap.dedent(f"""
        try:
            {code}
            print('ALLOWED {name}', flush=True)
        except BaseException as e:
            print('BLOCKED {name}', type(e).__name__, flush=True)
        {after}""") for name, code in attempts.items())


def test_runs_code_captures_output_and_fails_on_exceptions():
    r = run_python("import sys\nprint('hello', 6 * 7)\nprint('warn', file=sys.stderr)")
    assert r.ok and r.stdout == "hello 42\n" and r.stderr == "warn\n"
    assert not r.timed_out and not r.memory_exceeded
    r = run_python("def f():\n    return 1 / 0\nf()")
    assert not r.ok and not r.timed_out
    assert "ZeroDivisionError" in r.stderr and "return 1 / 0" in r.stderr
    r = run_python("print('half', flush=False)\nimport sys\nsys.exit(0)")  # output kept, but not a pass
    assert not r.ok and r.stdout == "half\n" and "SystemExit" in r.stderr
    r = run_python("input()")  # stdin is empty
    assert not r.ok and "EOFError" in r.stderr
    r = run_python("import os\nos.mkdir('d')\nopen('d/a.txt', 'w').write('data')\nprint(open('d/a.txt').read())")
    assert r.ok and r.stdout == "data\n", r.stderr


@pytest.mark.parametrize("exit_early", ["import sys\nsys.exit(0)", "import os\nos._exit(0)",
                                        "import __main__\n__main__.real_exit(0)",
                                        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"])
def test_leaving_early_is_never_a_pass(layers, exit_early):
    r = run_python(exit_early + "\nassert False, 'the tests after the exit'")
    assert not r.ok


def test_the_token_is_out_of_reach_of_the_code():
    # with the Python layer on, code that hunts for the harness's token finds nothing to forge a pass with
    hunt = """
import gc, os, sys
def traceback_locals():
    try:
        1 / 0
    except ZeroDivisionError as e:
        return e.__traceback__.tb_frame.f_back.f_locals
found = set()
for attempt in (lambda: sys._getframe(1).f_locals, lambda: sys._getframe().f_back.f_locals,
                lambda: [o for o in gc.get_objects() if isinstance(o, bytes)],
                lambda: traceback_locals(),
                lambda: open('/proc/self/mem', 'rb').read(1), lambda: __import__('ctypes')):
    try:
        found.add(repr(attempt()))
    except BaseException as e:
        print(type(e).__name__, flush=True)
for fd in range(3, 30):
    for guess in found:
        try:
            os.write(fd, guess.encode())
        except OSError:
            pass
os._exit(0)
"""
    r = run_python(hunt)
    assert not r.ok and r.stdout.split() == ["ValueError", "ValueError", "PermissionError", "PermissionError",
                                             "PermissionError", "ImportError"], r.stdout + r.stderr


def test_timeouts_kill_everything_and_leave_nothing_behind(layers):
    t0 = time.monotonic()
    # the child must start and print its cwd before the kill, even on a busy machine
    r = run_python("import os, time\nprint(os.getcwd(), flush=True)\nwhile True:\n    time.sleep(0.01)", timeout=1.5)
    assert r.timed_out and not r.ok
    assert time.monotonic() - t0 < 20
    workdir = r.stdout.strip()
    assert "speedchat-exec-" in workdir and not Path(workdir).exists()
    assert processes_mentioning(Path(workdir).name) == []


@pytest.mark.parametrize("code", [
    "while True:\n    os.fork()",
    "import multiprocessing\nps = [multiprocessing.Process(target=print) for _ in range(50)]\nfor p in ps: p.start()",
    "import subprocess\nsubprocess.Popen(['sleep', '60'])",
    "assert os.system('sleep 60 &') == 0",
    "import ctypes\nassert ctypes.CDLL(None).fork() != -1",
])
def test_no_new_processes(layers, code):
    r = run_python("import os\nprint(os.getcwd(), flush=True)\n" + code, timeout=5)
    assert not r.ok and not r.timed_out and "Error" in r.stderr, r.stderr
    assert processes_mentioning(Path(r.stdout.split()[0]).name) == []


def test_memory_and_output_limits():
    r = run_python("chunks = []\nwhile True:\n    chunks.append(b' ' * (1 << 20))", timeout=10, memory_mb=128)
    assert r.memory_exceeded and not r.ok and not r.timed_out
    r = run_python("x = bytearray(32 << 20)\nprint(len(x))", memory_mb=256)
    assert r.ok and r.stdout.strip() == str(32 << 20)
    t0 = time.monotonic()  # huge output is truncated, without a deadlock
    r = run_python("import sys\nfor _ in range(200):\n    print('x' * 100_000)\n    sys.stderr.write('y' * 100_000)")
    assert r.ok
    assert OUTPUT_LIMIT <= len(r.stdout) < OUTPUT_LIMIT + 100 and r.stdout.endswith("[output truncated]")
    assert OUTPUT_LIMIT <= len(r.stderr) < OUTPUT_LIMIT + 100
    assert time.monotonic() - t0 < 10


def test_attacks_on_the_host_are_contained(layers, tmp_path):
    """The bypasses that once escaped (the guard switched off through __main__, then a file deleted
    outside, /bin/sh, ctypes, a host unix socket, TCP to the host, a host process killed, a file written
    outside), plus sqlite3 outside, the host's /proc, and a fake pass: each layer stops all of them."""
    sentinel, sentinel2 = tmp_path / "keep.txt", tmp_path / "keep2.txt"
    for path in (sentinel, sentinel2):
        path.write_text("keep me")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "host.sock"))
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    for s in (unix, tcp):
        s.listen(1)
        s.settimeout(0.2)
    marker = "speedchat-host-marker"
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    attacks = {
        "guard_off": "import __main__ as M; M.root = ''; M.NEVER.clear(); M.BLOCKED_IMPORTS.clear()",
        "delete": f"os.remove({str(sentinel)!r})",
        "shell": f"import subprocess; subprocess.run(['/bin/sh', '-c', 'echo x > {tmp_path}/shell.txt'])",
        "ctypes": f"import ctypes; ctypes.CDLL(None).unlink({str(sentinel2).encode()!r})",
        "unix_socket": f"s = socket.socket(socket.AF_UNIX); s.connect({str(tmp_path / 'host.sock')!r})",
        "tcp": f"socket.create_connection(('127.0.0.1', {tcp.getsockname()[1]}), timeout=1)",
        "kill": f"os.kill({victim.pid}, signal.SIGKILL)",
        "write": f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
        "sqlite": f"sqlite3.connect({str(tmp_path / 'db.sqlite')!r}).execute('create table t (x)')",
        "proc": "print([open(f'/proc/{p}/cmdline').read() for p in os.listdir('/proc') if p.isdigit()])",
    }
    r = run_python("import os, signal, socket, sqlite3\n" + tries(attacks) + "\nos._exit(0)\n", timeout=10)
    try:
        assert not r.ok  # it exited with status 0, before any end the harness would accept
        assert len([line for line in r.stdout.splitlines() if line.startswith(("ALLOWED", "BLOCKED"))]) == len(attacks)
        assert sentinel.read_text() == sentinel2.read_text() == "keep me"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["host.sock", "keep.txt", "keep2.txt"]
        for s in (unix, tcp):
            with pytest.raises(socket.timeout):
                s.accept()
        assert victim.poll() is None
        assert marker not in r.stdout
    finally:
        victim.kill()
        unix.close()
        tcp.close()


def test_cannot_touch_files_outside_the_working_folder(layers, tmp_path):
    box, sentinel = tmp_path / "box", tmp_path / "box" / "sentinel.txt"
    box.mkdir()
    sentinel.write_text("keep me")
    attempts = {
        "open_a": "open(S, 'a').write('more')",
        "os_open": "os.write(os.open(S, os.O_WRONLY | os.O_TRUNC), b'x')",
        "path_unlink": "pathlib.Path(S).unlink()",
        "rmtree": "shutil.rmtree(D)",
        "replace": "os.replace(S, S + '.moved')",
        "truncate": "os.truncate(S, 0)",
        "chmod": "os.chmod(S, 0)",
        "copy_over": "open('mine.txt', 'w').write('x'); shutil.copyfile('mine.txt', S)",
        "mkdir": "os.mkdir(os.path.join(D, 'newdir'))",
        "symlink": "os.symlink('/etc/passwd', os.path.join(D, 'link'))",
        "relative": "os.chdir(D); open('sentinel.txt', 'w').write('gone')",
        "dir_fd": "os.write(os.open('sentinel.txt', os.O_WRONLY | os.O_TRUNC, dir_fd=os.open(D, os.O_RDONLY)), b'x')",
        "opener": "open('sentinel.txt', 'w', opener=lambda p, f: os.open(p, f, dir_fd=os.open(D, os.O_RDONLY)))",
        "fchmod": "os.fchmod(os.open(S, os.O_RDONLY), 0)",
        "walk_up": "open(os.path.join(os.getcwd(), '..', '..', S.lstrip('/')), 'w')",
        "read_host": "open('/etc/hostname').read()",
    }
    code = f"import os, pathlib, shutil\nS, D = {str(sentinel)!r}, {str(box)!r}\nhome = os.getcwd()\n"
    r = run_python(code + tries(attempts, after="os.chdir(home)"), timeout=10)
    assert r.ok, r.stderr
    assert "ALLOWED" not in r.stdout, r.stdout
    assert r.stdout.count("BLOCKED") == len(attempts)
    assert sentinel.read_text() == "keep me" and sorted(p.name for p in box.iterdir()) == ["sentinel.txt"]


def test_environment_is_scrubbed_and_common_modules_import(monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_TEST_SECRET", "hunter2")
    r = run_python("import math, re, collections, itertools, functools, heapq, hashlib, string, typing, json\n"
                   "import numpy, os\nfrom collections import namedtuple\nP = namedtuple('P', 'x')\n"
                   "print(hashlib.md5(b'a').hexdigest(), math.gcd(12, 18), dict(os.environ))", timeout=20)
    assert r.ok, r.stderr
    assert r.stdout.split()[:2] == ["0cc175b9c0f1b6a831c399e269772661", "6"]
    assert "hunter2" not in r.stdout and "SPEEDCHAT_TEST_SECRET" not in r.stdout


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    path = DATA / "humaneval" / "HumanEval_first40.jsonl"
    if not path.exists():
        pytest.skip(f"real HumanEval rows not found at {path} (../shared/data)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    program = lambda row, body: f"{row['prompt']}{body}\n\n{row['test']}\n\ncheck({row['entry_point']})\n"
    run = lambda row: (row["task_id"], run_python(program(row, row["canonical_solution"])),
                       run_python(program(row, "    return None\n")))
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, rows))
    assert len(results) >= 40
    for task_id, good, broken in results:
        assert good.ok, f"{task_id}: canonical solution failed: {good.stderr[-500:]}"
        assert not broken.ok, f"{task_id}: a broken solution passed"


def test_missing_bwrap_is_detected_and_said_once(monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    execution.bwrap_works.cache_clear()
    try:
        assert not execution.bwrap_works() and not execution.bwrap_works()
        assert capsys.readouterr().err.count("warning:") == 1
    finally:
        execution.bwrap_works.cache_clear()
