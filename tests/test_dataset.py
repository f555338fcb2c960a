"""dataset.py and corpora.py: building and reading shards, folder ingestion, mixtures and schedules,
and downloading FineWeb-edu / ClimbMix (against a local HTTP server on 127.0.0.1)."""

import argparse
import hashlib
import http.server
import os
import random
import socket
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import corpora
import dataset
from common import UserError

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FINEWEB_LAST = dataset.REMOTE["fineweb-edu"][1]


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for env in ("SPEEDCHAT_FINEWEB_URL", "SPEEDCHAT_CLIMBMIX_URL"):
        monkeypatch.delenv(env, raising=False)
    return tmp_path / "base"


def write_parquet(path, texts, row_group_size=1024, column="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: pa.array(texts, type=pa.string())}), path, row_group_size=row_group_size)
    return path


def test_split_text_sizes_and_content():
    paras = [f"paragraph {i} " + "word " * (20 + 37 * (i % 11)) for i in range(300)]
    text = "\n\n".join(paras)
    docs = corpora.split_text(text, lo=1000, hi=2000)
    assert len(docs) > 10 and all(len(d) <= 2000 for d in docs)
    assert sum(len(d) >= 1000 for d in docs) >= len(docs) - 2  # nearly all reach the lower bound
    assert "".join(docs).split() == text.split()  # nothing lost, nothing added
    giant = "x" * 5000 + " " + "y" * 5000  # one paragraph bigger than hi
    pieces = corpora.split_text(giant, lo=1000, hi=2000)
    assert all(len(p) <= 2000 for p in pieces) and "".join(pieces).replace(" ", "") == giant.replace(" ", "")
    assert corpora.split_text("  \n\n ") == [] and corpora.split_text("short") == ["short"]


def test_build_is_deterministic_and_cached(tmp_path):
    docs = [f"document {i}" for i in range(3000)]
    a = corpora.build(tmp_path / "a", "fp", lambda: list(docs), "a")
    b = corpora.build(tmp_path / "b", "fp", lambda: list(docs), "b")
    read = lambda folder: [t for p in sorted(folder.glob("shard_*.parquet")) for t in pq.read_table(p)["text"].to_pylist()]  # noqa: E731
    assert read(a) == read(b) != docs  # shuffled, the same way on every build
    assert sorted(read(a)) == sorted(docs)
    shards = sorted(a.glob("shard_*.parquet"))
    assert len(shards) == 2 and pq.ParquetFile(shards[0]).metadata.row_group(0).num_rows == 1024
    mtime = shards[0].stat().st_mtime_ns
    corpora.build(a, "fp", lambda: pytest.fail("rebuilt a complete corpus"), "a")  # cached: not called
    assert shards[0].stat().st_mtime_ns == mtime
    (a / "manifest.json").unlink()  # an interrupted build (no manifest) is redone
    corpora.build(a, "fp", lambda: ["x", "y", "z"], "a")
    assert sorted(read(a)) == ["x", "y", "z"]  # and stale shards are gone


def test_stdlib_docs(tmp_path_factory, monkeypatch):
    # a base dir shared by this session's stdlib-docs users (conftest, test_dataloader): built once
    base = tmp_path_factory.getbasetemp() / "stdlib-docs-base"
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(base))
    shards = dataset.list_shards("stdlib-docs")
    assert shards[0].parent == base / "data" / "stdlib-docs" and len(shards) >= 2
    train, val = (list(dataset.iter_documents("stdlib-docs", split)) for split in ("train", "val"))
    assert len(train) > 1000 and len(val) > 10 and not set(train) & set(val)
    text = "\n".join(train + val)
    assert "Module json" in text and "json.dumps(" in text  # module and function docstrings
    assert "Python help topic:" in text  # the pydoc topics
    assert max(map(len, train)) <= corpora.DOC_MAX_CHARS
    assert max(n for path in shards for n in dataset.row_counts(path)) == 1024


def test_dir_source_reads_every_format_and_reports_bad_files(tmp_path, capsys):
    src = tmp_path / "texts"
    src.mkdir()
    long_text = "\n\n".join(f"Paragraph {i}. " + "lorem ipsum " * 60 for i in range(60))  # ~45 KB
    (src / "book.txt").write_text(long_text)
    (src / "notes.md").write_text("# Notes\n\nshort markdown document")
    (src / "sub").mkdir()
    (src / "sub" / "rows.jsonl").write_text('{"text": "jsonl one"}\n{"text": "jsonl two"}\nnot json\n{"id": 3}\n')
    write_parquet(src / "sub" / "table.parquet", ["parquet one", "parquet two", None])
    write_parquet(src / "wrong_column.parquet", ["x"], column="content")
    (src / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (src / "image.png").write_bytes(b"\x89PNG")  # not a text format: ignored
    shards = dataset.list_shards(f"dir:{src}")
    err = capsys.readouterr().err
    for name in ("wrong_column.parquet", "corrupt.parquet", "latin1.txt", "rows.jsonl"):
        assert name in err, f"{name} not reported"
    assert "no column 'text'" in err and "not UTF-8" in err and "2 bad line" in err
    assert shards[0].parent.parent == tmp_path / "base" / "data"  # built under the base dir, src untouched
    assert sorted(p.name for p in src.rglob("*.parquet")) == ["corrupt.parquet", "table.parquet", "wrong_column.parquet"]
    docs = list(dataset.iter_documents(f"dir:{src}", "train")) + list(dataset.iter_documents(f"dir:{src}", "val"))
    for expected in ("jsonl one", "jsonl two", "parquet one", "parquet two", "# Notes\n\nshort markdown document"):
        assert docs.count(expected) == 1
    book = [d for d in docs if d.startswith("Paragraph")]
    assert len(book) > 4 and all(len(d) <= corpora.DOC_MAX_CHARS for d in book)
    assert len(docs) == 5 + len(book)
    assert dataset.list_shards(f"dir:{src}") == shards  # unchanged input: cached; a changed file: rebuilt
    (src / "notes.md").write_text("# Notes\n\nedited")
    assert "# Notes\n\nedited" in [d for p in dataset.list_shards(f"dir:{src}") for d in pq.read_table(p)["text"].to_pylist()]


def test_bad_sources_give_clear_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    write_parquet(tmp_path / "bad" / "a.parquet", ["x"], column="body")
    (tmp_path / "bad" / "b.parquet").write_bytes(b"garbage")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_text("a single short document")
    for source, error in (("empty", "no usable text in .*empty"), ("missing", "is not a folder"),
                          ("bad", r"no usable text in .*bad.*2 bad file.*a\.parquet: no column 'text'"),
                          ("one", "at least 2")):
        with pytest.raises(UserError, match=error):
            dataset.ensure_source(f"dir:{tmp_path / source}")
    with pytest.raises(UserError, match="unknown source 'nope'"):
        dataset.ensure_source("stdlib-docs,nope")
    with pytest.raises(UserError, match=r"python -m dataset --source fineweb-edu -n 240`"):  # as speedrun.sh
        dataset.list_shards("fineweb-edu")


def test_dir_with_shards_is_used_in_place(tmp_path, base_dir):
    folder = tmp_path / "ready"
    write_parquet(folder / "shard_00000.parquet", [f"t{i}" for i in range(50)], row_group_size=16)
    write_parquet(folder / "shard_00001.parquet", ["v0", "v1"])
    assert dataset.list_shards(f"dir:{folder}") == sorted(folder.glob("shard_*.parquet"))
    assert list(dataset.iter_documents(f"dir:{folder}", "val")) == ["v0", "v1"]
    assert list(dataset.iter_documents(f"dir:{folder}", "train", start=3)) == [f"t{i}" for i in range(48, 50)]
    assert not (base_dir / "data").exists()  # nothing copied
    (folder / "shard_00001.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(UserError, match="bad shard .*shard_00001.parquet"):
        dataset.split_row_groups(f"dir:{folder}", "val")
    write_parquet(folder / "shard_00001.parquet", ["x"], column="content")
    with pytest.raises(UserError, match="no column 'text'"):
        dataset.split_row_groups(f"dir:{folder}", "val")


@pytest.mark.skipif(not (SHARED_DATA / "gutenberg").exists(), reason="../shared/data/gutenberg is not present")
def test_shared_gutenberg_in_place():
    units = dataset.split_row_groups(f"dir:{SHARED_DATA / 'gutenberg'}", "val")
    assert units[0][0].name == "shard_00005.parquet"
    first = dataset.read_unit(units[0])
    assert len(first) == dataset.row_counts(units[0][0])[0] > 100 and all(isinstance(t, str) and t for t in first)


def test_ranks_get_disjoint_row_groups(tmp_path):
    folder = tmp_path / "ready"
    write_parquet(folder / "shard_00000.parquet", [f"a{i}" for i in range(100)], row_group_size=10)
    write_parquet(folder / "shard_00001.parquet", [f"b{i}" for i in range(35)], row_group_size=10)
    write_parquet(folder / "shard_00002.parquet", [f"v{i}" for i in range(7)], row_group_size=5)
    source = f"dir:{folder}"
    for split, world_size in (("train", 2), ("train", 3), ("val", 3), ("val", 5)):  # val: 2 groups < ranks
        per_rank = sum((list(dataset.iter_documents(source, split, rank, world_size)) for rank in range(world_size)), [])
        assert sorted(per_rank) == sorted(set(dataset.iter_documents(source, split))), (split, world_size)
    assert len(dataset.split_row_groups(source, "train", 1, 2)) == 7  # groups 1, 3, ... of 14
    with pytest.raises(UserError, match="too few documents"):
        dataset.split_row_groups(source, "val", 7, 8)
    assert list(dataset.iter_documents(source, "val", epochs=2)) == [f"v{i}" for i in range(7)] * 2


def test_mixture_and_schedule_syntax(tmp_path):
    assert dataset.parse_mixture("climbmix:3,dir:/data/a:b:1") == [("climbmix", 0.75), ("dir:/data/a:b", 0.25)]
    assert dataset.parse_mixture("fineweb-edu, dir:/x/2024") == [("fineweb-edu", 0.5), ("dir:/x/2024", 0.5)]
    assert dataset.mixture_name("stdlib-docs:2") == "stdlib-docs"
    text = "0:fineweb-edu;0.8:fineweb-edu:0.7,dir:/data/math:0.3"
    expected = [(0.0, "fineweb-edu"), (0.8, "fineweb-edu:0.7,dir:/data/math:0.3")]
    assert dataset.parse_schedule(text) == expected
    (tmp_path / "schedule.txt").write_text("# the curriculum\n0:fineweb-edu\n0.8:fineweb-edu:7,dir:/data/math:3\n")
    assert dataset.parse_schedule(str(tmp_path / "schedule.txt")) == expected
    for bad in ("fineweb", "stdlib-docs:0", "stdlib-docs:-1,climbmix", "climbmix,climbmix", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            dataset.parse_mixture(bad)
    for bad in ("0.5:climbmix", "0:climbmix;0.5:stdlib-docs;0.4:climbmix", "0:climbmix;1:stdlib-docs", "x:climbmix"):
        with pytest.raises(argparse.ArgumentTypeError):
            dataset.parse_schedule(bad)


# ---------------------------------------------------------------------------
# downloading from a local HTTP server


def make_shard_bytes(tmp_path, name, n):
    rng = random.Random(name)  # incompressible text: the files are ~n * 1.5 KB
    texts = [f"{name} doc {i} " + "".join(rng.choices(string.ascii_letters + " ", k=1500)) for i in range(n)]
    path = write_parquet(tmp_path / "served" / name, texts, row_group_size=64)
    return path.read_bytes()


class ShardServer:
    """Serves {name: bytes} over HTTP on 127.0.0.1 with Range support, and can misbehave:
    drop the connection half-way (once per name) or serve a truncated file."""

    def __init__(self, files):
        self.files, self.drop_once, self.truncate, self.log = dict(files), set(), set(), []
        self.sha256 = {}  # name -> the hash to publish, as the Hub does (X-Linked-Etag)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.respond(body=False)

            def do_GET(self):
                self.respond(body=True)

            def respond(self, body):
                name = self.path.rsplit("/", 1)[-1]
                server.log.append((self.command, name, self.headers.get("Range")))
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                if name in server.truncate:
                    data = data[: len(data) // 2]  # consistent headers, but the file is cut
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                if name in server.sha256:
                    self.send_header("X-Linked-Etag", f'"{server.sha256[name]}"')
                self.end_headers()
                if not body:
                    return
                if self.command == "GET" and name in server.drop_once:
                    server.drop_once.discard(name)
                    self.wfile.write(data[start: start + (len(data) - start) // 3])
                    self.wfile.flush()
                    self.close_connection = True  # hang up mid-file
                    return
                self.wfile.write(data[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/files"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def gets(self, name):
        return [r for r in self.log if r[0] == "GET" and r[1] == name]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def shard_server(tmp_path):
    names = [dataset.shard_name(i) for i in (0, 1, 2, FINEWEB_LAST)]
    server = ShardServer({name: make_shard_bytes(tmp_path, name, 300) for name in names})
    yield server
    server.close()


def fetch(server, n, **kwargs):
    return dataset.download_shards("fineweb-edu", n, **dict(dict(workers=2, url=server.url, backoff=0.01), **kwargs))


def test_download_resumes_after_a_dropped_connection_and_skips_complete(shard_server, base_dir):
    shard_server.drop_once.add(dataset.shard_name(1))
    folder = fetch(shard_server, 3)
    names = [dataset.shard_name(i) for i in (0, 1, 2, FINEWEB_LAST)]
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == names
    for name in names:
        assert (folder / name).read_bytes() == shard_server.files[name]
    dropped = shard_server.gets(dataset.shard_name(1))
    assert len(dropped) == 2 and dropped[0][2] is None and dropped[1][2].startswith("bytes=")
    assert int(dropped[1][2].split("=")[1].rstrip("-")) > 0  # resumed, not restarted
    # the layout is complete and readable; a second run downloads nothing
    assert dataset.list_shards("fineweb-edu")[-1].name == dataset.shard_name(FINEWEB_LAST)
    val = list(dataset.iter_documents("fineweb-edu", "val"))
    assert len(val) == 300 and val[0].startswith(dataset.shard_name(FINEWEB_LAST))
    before = len(shard_server.log)
    fetch(shard_server, 3)
    assert len(shard_server.log) == before


def test_download_rejects_a_truncated_file_and_a_missing_one(shard_server, base_dir):
    bad = dataset.shard_name(2)
    shard_server.truncate.add(bad)
    with pytest.raises(UserError, match=rf"1 of 4 shards failed .*{bad}.*rerun"):
        fetch(shard_server, 3, workers=4, retries=2)
    folder = base_dir / "data" / "fineweb-edu"
    assert not (folder / bad).exists() and not (folder / (bad + ".part")).exists()
    assert len(shard_server.gets(bad)) == 3  # tried, rejected, retried from zero
    assert (folder / dataset.shard_name(0)).read_bytes() == shard_server.files[dataset.shard_name(0)]
    # the server is fixed: a rerun fetches only what is missing
    shard_server.truncate.clear()
    shard_server.log.clear()
    fetch(shard_server, 3, workers=4)
    assert [r[1] for r in shard_server.log if r[0] == "GET"] == [bad]
    assert (folder / bad).read_bytes() == shard_server.files[bad]
    (folder / dataset.shard_name(0)).unlink()
    with pytest.raises(UserError, match="1 of 2 shards failed .*HTTP 404"):
        fetch(shard_server, 4, workers=1, retries=3)  # shard 3 is not on the server: no retries
    assert len(shard_server.gets(dataset.shard_name(3))) == 1


def test_download_checks_the_published_sha256_and_restarts_a_corrupt_partial_file(shard_server, base_dir):
    name = dataset.shard_name(0)
    good = shard_server.files[name]
    shard_server.sha256[name] = hashlib.sha256(good).hexdigest()
    folder = base_dir / "data" / "fineweb-edu"
    folder.mkdir(parents=True)
    flipped = bytearray(good[:1000])
    flipped[500] ^= 0x10  # a killed run's partial file, with one bit flipped on disk
    (folder / (name + ".part")).write_bytes(flipped)
    fetch(shard_server, 1, workers=1)
    assert shard_server.gets(name) == [("GET", name, "bytes=1000-"), ("GET", name, None)]  # resumed, then restarted
    assert (folder / name).read_bytes() == good
    # a file the server itself serves with a flipped bit: never accepted, every try from zero
    bad = dataset.shard_name(1)
    shard_server.sha256[bad] = hashlib.sha256(shard_server.files[bad]).hexdigest()
    shard_server.files[bad] = shard_server.files[bad][:100] + bytes([shard_server.files[bad][100] ^ 1]) + \
        shard_server.files[bad][101:]
    with pytest.raises(UserError, match=rf"{bad}: the content does not match the sha256"):
        fetch(shard_server, 2, workers=1, retries=2)
    assert [r[2] for r in shard_server.gets(bad)] == [None, None, None]
    assert not (folder / bad).exists() and not (folder / (bad + ".part")).exists()


def test_climbmix_from_a_mirror_named_by_its_environment_variable(tmp_path, base_dir, monkeypatch):
    last = dataset.shard_name(dataset.REMOTE["climbmix"][1])
    server = ShardServer({name: make_shard_bytes(tmp_path, name, 20) for name in (dataset.shard_name(0), last)})
    monkeypatch.setenv("SPEEDCHAT_CLIMBMIX_URL", server.url)
    try:
        dataset.main(["--source", "climbmix", "-n", "1", "-w", "2"])
    finally:
        server.close()
    assert {r[1] for r in server.log if r[0] == "GET"} == {dataset.shard_name(0), last}
    assert [p.name for p in dataset.list_shards("climbmix")] == [dataset.shard_name(0), last]
    assert list(dataset.iter_documents("climbmix", "val"))[0].startswith(last)
    with pytest.raises(SystemExit):
        dataset.main(["--source", "climbmix", "-n", "-5"])  # not a download of every shard


def test_offline_fails_fast_in_one_line(base_dir):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "dataset", "-n", "4", "--url", f"http://127.0.0.1:{port}/x"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SPEEDCHAT_BASE_DIR": str(base_dir)})
    assert time.time() - t0 < 45  # no retry loop: 5 retries with the 2 s doubling backoff take 62 s
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "cannot reach 127.0.0.1" in lines[0] and "--source stdlib-docs" in lines[0] and "dir:PATH" in lines[0]
