"""The sandbox in execution.py: results, limits, guards, cleanup, and real HumanEval rows."""

import json
import os
import socket
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from execution import OUTPUT_LIMIT, ExecResult, run_python

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def processes_mentioning(text):
    """Pids of live processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_runs_code_and_captures_output():
    r = run_python("import sys\nprint('hello', 6 * 7)\nprint('warn', file=sys.stderr)")
    assert isinstance(r, ExecResult)
    assert r.ok and r.stdout == "hello 42\n" and r.stderr == "warn\n"
    assert not r.timed_out and not r.memory_exceeded


def test_exception_is_a_failure_with_traceback():
    r = run_python("def f():\n    return 1 / 0\nf()")
    assert not r.ok and not r.timed_out
    assert "ZeroDivisionError" in r.stderr and "return 1 / 0" in r.stderr


def test_early_exit_is_not_a_pass():
    # a program that leaves before its asserts must not count as passing (as in HumanEval)
    r = run_python("import sys\nsys.exit(0)\nassert False")
    assert not r.ok and "SystemExit" in r.stderr
    r = run_python("import os\nos._exit(0)")
    assert not r.ok


def test_stdin_is_empty():
    r = run_python("input()")
    assert not r.ok and "EOFError" in r.stderr


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = run_python("while True:\n    pass", timeout=1.0)
    assert r.timed_out and not r.ok
    assert time.monotonic() - t0 < 15  # killed at the timeout, with room for a busy machine


def test_sleeping_code_times_out_and_leaves_nothing_behind():
    t0 = time.monotonic()
    # timeout 2: the child must start and print its cwd before the kill, even on a busy machine
    r = run_python("import os, time\nprint(os.getcwd(), flush=True)\ntime.sleep(60)", timeout=2)
    assert r.timed_out and not r.ok
    assert time.monotonic() - t0 < 20  # far from the 60 s sleep
    workdir = r.stdout.strip()
    assert "speedchat-exec-" in workdir
    assert not Path(workdir).exists(), "the temporary directory must be removed"
    assert processes_mentioning(workdir) == []


@pytest.mark.parametrize("code", [
    "x = bytearray(4 << 30)",
    "chunks = []\nwhile True:\n    chunks.append(b' ' * (1 << 20))",
])
def test_memory_bomb_is_stopped(code):
    t0 = time.monotonic()
    r = run_python(code, timeout=10, memory_mb=128)
    assert r.memory_exceeded and not r.ok and not r.timed_out
    assert time.monotonic() - t0 < 10


def test_normal_memory_use_is_fine():
    r = run_python("x = bytearray(32 << 20)\nprint(len(x))", memory_mb=256)
    assert r.ok and r.stdout.strip() == str(32 << 20)


def test_huge_output_is_truncated_without_deadlock():
    t0 = time.monotonic()
    r = run_python("import sys\nfor _ in range(200):\n    print('x' * 100_000)\n    sys.stderr.write('y' * 100_000)")
    assert r.ok
    assert OUTPUT_LIMIT <= len(r.stdout) < OUTPUT_LIMIT + 100 and r.stdout.endswith("[output truncated]")
    assert OUTPUT_LIMIT <= len(r.stderr) < OUTPUT_LIMIT + 100
    assert time.monotonic() - t0 < 10


def test_writes_inside_the_temporary_directory_work():
    r = run_python("import os\nos.mkdir('d')\nwith open('d/a.txt', 'w') as f:\n    f.write('data')\n"
                   "print(open('d/a.txt').read(), os.getcwd())")
    assert r.ok, r.stderr
    text, workdir = r.stdout.split()
    assert text == "data" and not Path(workdir).exists()


def test_cannot_touch_files_outside_the_temporary_directory(tmp_path):
    box = tmp_path / "box"
    box.mkdir()
    sentinel = box / "sentinel.txt"
    sentinel.write_text("keep me")
    attempts = {
        "open_w": "open(S, 'w').write('gone')",
        "open_a": "open(S, 'a').write('more')",
        "os_open": "os.write(os.open(S, os.O_WRONLY | os.O_TRUNC), b'x')",
        "remove": "os.remove(S)",
        "unlink": "os.unlink(S)",
        "path_unlink": "pathlib.Path(S).unlink()",
        "posix_unlink": "import posix; posix.unlink(S)",
        "rmtree": "shutil.rmtree(D)",
        "rename": "os.rename(S, S + '.moved')",
        "replace": "os.replace(S, S + '.moved')",
        "move": "shutil.move(S, S + '.moved')",
        "truncate": "os.truncate(S, 0)",
        "chmod": "os.chmod(S, 0)",
        "copy_over": "open('mine.txt', 'w').write('x'); shutil.copyfile('mine.txt', S)",
        "new_file": "open(os.path.join(D, 'new.txt'), 'w').write('x')",
        "mkdir": "os.mkdir(os.path.join(D, 'newdir'))",
        "symlink": "os.symlink('/etc/passwd', os.path.join(D, 'link'))",
        "relative": "os.chdir(D); open('sentinel.txt', 'w').write('gone')",
        "dir_fd": "os.write(os.open('sentinel.txt', os.O_WRONLY | os.O_TRUNC, dir_fd=os.open(D, os.O_RDONLY)), b'x')",
        "opener": "open('sentinel.txt', 'w', opener=lambda p, f: os.open(p, f, dir_fd=os.open(D, os.O_RDONLY)))",
        "fchmod": "os.fchmod(os.open(S, os.O_RDONLY), 0)",
        "chmod_fd": "os.chmod(os.open(S, os.O_RDONLY), 0)",
        "walk_up": "open(os.path.join(os.getcwd(), '..', '..', S.lstrip('/')), 'w')",
    }
    code = "import os, pathlib, shutil\nS, D = {!r}, {!r}\nhome = os.getcwd()\n".format(str(sentinel), str(box))
    for name, attempt in attempts.items():
        code += textwrap.dedent(f"""
            try:
                {attempt}
                print('ALLOWED {name}')
            except Exception as e:
                print('BLOCKED {name}', type(e).__name__)
            os.chdir(home)
        """)
    r = run_python(code, timeout=10)
    assert r.ok, r.stderr
    assert "ALLOWED" not in r.stdout, r.stdout
    assert r.stdout.count("BLOCKED") == len(attempts)
    assert sentinel.read_text() == "keep me"
    assert sorted(p.name for p in box.iterdir()) == ["sentinel.txt"]


@pytest.mark.parametrize("code", [
    "while True:\n    os.fork()",
    "import multiprocessing\nps = [multiprocessing.Process(target=print) for _ in range(50)]\nfor p in ps: p.start()",
    "import subprocess\nsubprocess.Popen(['sleep', '60'])",
    "os.system('sleep 60 &')",
    "os.posix_spawn('/bin/sleep', ['sleep', '60'], {})",
    "import pty\npty.fork()",
    "import ctypes\nctypes.CDLL(None).fork()",
    "import sys\ndel sys.modules['_posixsubprocess']\nimport _posixsubprocess",
    "import subprocess\nsubprocess._fork_exec()",
])
def test_no_new_processes(code):
    r = run_python("import os\nprint(os.getcwd(), flush=True)\n" + code, timeout=5)
    assert not r.ok and not r.timed_out
    assert "Error" in r.stderr
    workdir = r.stdout.split()[0]
    assert processes_mentioning(workdir) == []


def test_cannot_signal_other_processes():
    r = run_python(f"import os, signal\nos.kill({os.getpid()}, signal.SIGTERM)")
    assert not r.ok and "PermissionError" in r.stderr  # and we are still alive to check


def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        r = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')")
        assert not r.ok
        with pytest.raises(socket.timeout):
            server.accept()
        r = run_python("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:%d', timeout=1)" % port)
        assert not r.ok
    finally:
        server.close()


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_TEST_SECRET", "hunter2")
    r = run_python("import os\nprint(dict(os.environ))")
    assert r.ok and "hunter2" not in r.stdout and "SPEEDCHAT_TEST_SECRET" not in r.stdout


def test_common_modules_still_import():
    r = run_python("import math, re, collections, itertools, functools, heapq, hashlib, string, typing, json\n"
                   "import numpy\nprint(hashlib.md5(b'a').hexdigest(), math.gcd(12, 18))", timeout=20)
    assert r.ok, r.stderr
    assert r.stdout.split() == ["0cc175b9c0f1b6a831c399e269772661", "6"]


def humaneval_rows():
    path = DATA / "humaneval" / "HumanEval_first40.jsonl"
    if not path.exists():
        pytest.skip(f"real HumanEval rows not found at {path} (../shared/data)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    rows = humaneval_rows()

    def program(row, body):
        return f"{row['prompt']}{body}\n\n{row['test']}\n\ncheck({row['entry_point']})\n"

    def run(row):
        good = run_python(program(row, row["canonical_solution"]), timeout=5)
        broken = run_python(program(row, "    return None\n"), timeout=5)
        return row["task_id"], good, broken

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, rows))
    assert len(results) == len(rows) >= 40
    for task_id, good, broken in results:
        assert good.ok, f"{task_id}: canonical solution failed: {good.stderr[-500:]}"
        assert not broken.ok, f"{task_id}: a broken solution passed"


def test_guards_hold_without_namespaces(monkeypatch, tmp_path):
    # machines where `unshare` is missing or refused rely on the in-process guards alone
    import execution
    monkeypatch.setattr(execution, "_unshare_prefix", lambda: ())
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    assert run_python("print('hi')").stdout == "hi\n"
    r = run_python(f"import os\nprint(os.getcwd(), flush=True)\nos.remove({str(sentinel)!r})")
    assert not r.ok and sentinel.read_text() == "keep me"
    r = run_python("import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    os.fork()")
    assert not r.ok and processes_mentioning(r.stdout.split()[0]) == []
    r = run_python("import os, time\nprint(os.getcwd(), flush=True)\ntime.sleep(60)", timeout=2)
    assert r.timed_out and processes_mentioning(r.stdout.split()[0]) == []
