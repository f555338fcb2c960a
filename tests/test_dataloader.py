"""dataloader.py: BOS-aligned best-fit packing (of documents and of conversations with their loss
masks), mixtures and schedules of sources, disjoint ranks, exact resume, epochs, devices."""

import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import dataset
from common import UserError
from dataloader import ConversationLoader, DataLoader

BOS = 0


class ByteTokenizer:
    """Stand-in tokenizer with the project Tokenizer's batch API: BOS = 0, a leading "doc<N>|"
    becomes the one token TAG + N (so even a cropped piece names its document), other bytes b -> b + 1."""

    def get_bos_token_id(self):
        return BOS

    def encode(self, texts, prepend=None, append=None, num_threads=8):
        head = [prepend] if prepend is not None else []
        return [head + encode_one(t) for t in texts]


TAG = 1000


def encode_one(text):
    tag, sep, rest = text.partition("|")
    if sep and tag.startswith("doc"):
        return [TAG + int(tag[3:])] + [b + 1 for b in rest.encode()]
    return [b + 1 for b in text.encode()]


def decode(tokens):
    tag = f"doc{tokens[0] - TAG}|" if tokens and tokens[0] >= TAG else ""
    return tag + bytes(t - 1 for t in tokens[bool(tag):]).decode()


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEEDCHAT_BASE_DIR", str(tmp_path / "base"))
    return tmp_path / "base"


def make_source(folder, n_train=400, n_val=40, group=25, seed=0, max_len=300, first=0, scale=15):
    """Shards in the layout (used in place): documents 'doc<i>|xxxx' (i from `first`) of varied lengths."""
    rng = random.Random(seed)
    docs = [f"doc{first + i}|" + "x" * (int(rng.paretovariate(1.2) * scale) % max_len) for i in range(n_train + n_val)]
    folder.mkdir(parents=True, exist_ok=True)
    for k, (lo, hi) in enumerate([(0, n_train // 2), (n_train // 2, n_train), (n_train, n_train + n_val)]):
        table = pa.table({"text": pa.array(docs[lo:hi], type=pa.string())})
        pq.write_table(table, folder / f"shard_{k:05d}.parquet", row_group_size=group)
    return f"dir:{folder}", docs


def segments(row):
    """Split a row (list of ids) at BOS into document texts."""
    out, start = [], 0
    for i in range(1, len(row) + 1):
        if i == len(row) or row[i] == BOS:
            out.append(decode(row[start + 1:i]))
            start = i
    return out


def take(loader, n):
    return [next(loader) for _ in range(n)]


def rows_of(batches):
    """Full rows (T+1 tokens) back from (inputs, targets) batches."""
    return [torch.cat([x, y[:, -1:]], dim=1).tolist() for x, y in batches]


def tag(seg):
    return seg.split("|")[0]


def test_packing_invariants_and_crop_accounting(tmp_path):
    source, docs = make_source(tmp_path / "src")
    by_id = {tag(d): d for d in docs}
    loader = DataLoader(ByteTokenizer(), B=4, T=64, source=source, buffer_size=50)
    batches = take(loader, 20)
    seen, cropped = [], 0
    for x, y in batches:
        assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.long
        assert (x[:, 0] == BOS).all()  # every row starts a document
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    ntok = lambda doc: 1 + len(encode_one(doc))  # noqa: E731  (BOS + the document)
    for rows in rows_of(batches):
        for row in rows:
            assert row[0] == BOS
            for seg in filter(None, segments(row)):  # ('': a crop that kept only BOS)
                doc = by_id[tag(seg)]
                assert doc.startswith(seg)  # a whole document, or a crop of one
                seen.append(doc)
                cropped += ntok(doc) - ntok(seg)
    assert len(seen) == len(set(seen))  # nothing repeated within the epoch
    state = loader.state_dict()
    src = state["sources"][0]
    assert src["tokens"] == 20 * 4 * 65 and src["epoch"] == 0
    # no token lost: what was read = what was placed + what was cropped + what is still pending
    units = dataset.split_row_groups(source, "train")
    texts = {(u, d): t for u in range(src["unit"] + 1) for d, t in enumerate(dataset.read_unit(units[u]))}
    read = [t for (u, d), t in texts.items() if (u, d) < (src["unit"], src["doc"])]
    pending = [texts[u, d] for _, u, d, _ in state["pending"]]
    assert sum(map(ntok, read)) == src["tokens"] + src["cropped"] + sum(map(ntok, pending))
    assert {tag(d) for d in seen}.isdisjoint(map(tag, pending)) and set(seen) | set(pending) <= set(read)
    assert 0 < cropped <= src["cropped"]  # (a crop that kept only BOS names no document)
    assert loader.crop_fraction == pytest.approx(src["cropped"] / (src["cropped"] + src["tokens"]))
    assert 0 < loader.crop_fraction < 1
    loader.close()


def test_crops_only_when_nothing_fits(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    long_docs = [f"long{i}|" + "y" * 500 for i in range(30)]  # longer than a row: can never fit
    short_docs = [f"s{i}|" + "z" * 5 for i in range(300)]  # 1 + 8 tokens each
    mixed = [d for pair in zip(long_docs, short_docs[:30]) for d in pair] + short_docs[30:]
    pq.write_table(pa.table({"text": mixed}), folder / "shard_00000.parquet", row_group_size=20)
    pq.write_table(pa.table({"text": ["v1", "v2"]}), folder / "shard_00001.parquet")
    loader = DataLoader(ByteTokenizer(), B=2, T=99, source=f"dir:{folder}", buffer_size=40)
    long_rows = 0
    for rows in rows_of(take(loader, 10)):
        for row in rows:
            segs = segments(row)
            if segs[0].startswith("long"):  # a too-long document fills a row by itself
                assert len(segs) == 1 and any(d.startswith(segs[0]) for d in long_docs)
                long_rows += 1
                continue
            assert all(seg in mixed for seg in segs[:-1])  # only the last one of a row can be a crop
            if segs[-1] not in mixed:  # and only when even the shortest document did not fit
                assert len(segs[-1]) < len(short_docs[0]) and "z" * 5 not in segs[-1]
    assert long_rows > 0
    assert loader.state_dict()["sources"][0]["cropped"] >= long_rows * (1 + 505 - 100)
    loader.close()


def ids_in(batches):
    return [tag(seg) for rows in rows_of(batches) for row in rows for seg in segments(row) if seg]


def test_mixture_shares_and_ranks_read_disjoint_documents(tmp_path):
    a, docs_a = make_source(tmp_path / "a", n_train=2400, group=50, scale=200, max_len=2000)  # most longer than a row
    b, docs_b = make_source(tmp_path / "b", n_train=2400, group=50, seed=1, first=10_000)
    c, _ = make_source(tmp_path / "c", n_train=2400, group=50, seed=2, first=20_000)
    mixture = f"{a}:0.5,{b}:0.3,{c}:0.2"
    seen = []
    for rank in range(2):
        loader = DataLoader(ByteTokenizer(), B=8, T=256, source=mixture, rank=rank, world_size=2, buffer_size=40)
        ids = ids_in(take(loader, 40))
        sources = loader.state_dict()["sources"]
        assert sum(src["drawn"] for src in sources) > 1000 and all(src["epoch"] == 0 for src in sources)
        drawn = [src["stage_tokens"] for src in sources]
        placed = [src["tokens"] for src in sources]  # the tokens in rows: what training sees
        for share, n, m in zip((0.5, 0.3, 0.2), drawn, placed):
            assert abs(n - share * sum(drawn)) <= 257  # drawn: exact to one document (what fits a row: T + 1)
            assert abs(m / sum(placed) - share) < 0.02  # placed: all but the buffer's few
        units = dataset.split_row_groups(a, "train", rank, 2)
        assert {tag(d) for d in docs_a[:2400]} > set(i for i in ids if int(i[3:]) < 10_000) <= \
            {tag(t) for u in units for t in dataset.read_unit(u)}
        seen.append(set(ids))
        loader.close()
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert {tag(d) for d in docs_b[:2400]} >= {i for i in seen[0] | seen[1] if 10_000 <= int(i[3:]) < 20_000}


def test_short_documents_get_their_share_beside_documents_longer_than_a_row(tmp_path):
    books, _ = make_source(tmp_path / "books", scale=400, max_len=4000)  # most fill a row alone
    pages, _ = make_source(tmp_path / "pages", seed=1, first=10_000)
    loader = DataLoader(ByteTokenizer(), B=8, T=64, source=f"{books}:0.9,{pages}:0.1", buffer_size=100)
    for _ in range(3):  # at every point of a short run, not only after many buffers
        take(loader, 10)
        placed = [src["tokens"] for src in loader.state_dict()["sources"]]
        assert abs(placed[1] / sum(placed) - 0.1) < 0.01, placed
    loader.close()


def test_single_source_ranks_cover_the_split_once(tmp_path):
    source, docs = make_source(tmp_path / "src", n_train=200, group=10)
    seen, accounted = [], 0
    for rank in range(2):
        loader = DataLoader(ByteTokenizer(), B=2, T=50, source=source, rank=rank, world_size=2, buffer_size=20)
        ids, anonymous = set(), 0
        while loader.state_dict()["sources"][0]["epoch"] == 0:  # exactly this rank's first epoch
            segs = [seg for rows in rows_of([next(loader)]) for row in rows for seg in segments(row)]
            ids |= {tag(seg) for seg in segs if seg}
            anonymous += segs.count("")  # crops that kept only BOS
        units = dataset.split_row_groups(source, "train", rank, 2)
        pending = {tag(dataset.read_unit(units[u])[d]) for _, u, d, _ in loader.state_dict()["pending"]}
        assert not ids & pending
        seen.append(ids | pending)
        accounted += len(ids | pending) + anonymous
        loader.close()
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] <= {tag(d) for d in docs[:200]}
    assert accounted == 200  # together the two ranks cover the whole split


def test_resume_gives_the_same_batches_across_a_schedule_switch(tmp_path, capsys):
    a, _ = make_source(tmp_path / "a")
    b, _ = make_source(tmp_path / "b", seed=1, first=10_000)
    schedule = [(0, a), (24, f"{a}:0.5,{b}:0.5")]  # the mixture changes at row 24: batch 8
    loader = lambda: DataLoader(ByteTokenizer(), B=3, T=40, source=schedule, buffer_size=30)  # noqa: E731
    ref = loader()
    expected = take(ref, 30)
    ids = [ids_in([batch]) for batch in expected]
    assert all(int(i[3:]) < 10_000 for batch in ids[:8] for i in batch)  # only a before the switch
    after = [seg for rows in rows_of(expected[8:]) for row in rows for seg in segments(row) if seg]
    tokens_b = sum(len(encode_one(seg)) for seg in after if int(tag(seg)[3:]) >= 10_000)
    assert abs(tokens_b / sum(len(encode_one(seg)) for seg in after) - 0.5) < 0.1  # shares count from the switch
    assert "data: from batch 8 on, the mixture is" in capsys.readouterr().out
    for cut in (0, 7, 8, 9, 19):
        first = loader()
        got = take(first, cut)
        buf = io.BytesIO()
        torch.save(first.state_dict(), buf)  # it survives a checkpoint file ...
        first.close()
        buf.seek(0)
        second = loader()
        second.load_state_dict(json.loads(json.dumps(torch.load(buf))))  # ... and JSON
        got += take(second, 30 - cut)
        second.close()
        for (x0, y0), (x1, y1) in zip(expected, got):
            assert torch.equal(x0, x1) and torch.equal(y0, y1), f"resume at batch {cut} diverged"
    ref.load_state_dict(first.state_dict())  # into a loader whose threads ran ahead: they are replaced
    assert all(torch.equal(x0, x1) for (x0, _), (x1, _) in zip(expected[19:], take(ref, 5)))
    with pytest.raises(UserError, match="original --source"):
        ref.load_state_dict(dict(ref.state_dict(), schedule=[[0, a]]))
    ref.close()
    # resumed with another device batch (the trainer halved it): the switch stays at row 24
    first = loader()
    take(first, 4)  # 12 rows of 3
    state = first.state_dict()
    first.close()
    capsys.readouterr()
    half = DataLoader(ByteTokenizer(), B=2, T=40, source=schedule, buffer_size=30)
    half.load_state_dict(state)
    take(half, 8)
    half.close()
    assert "data: from batch 10 on" in capsys.readouterr().out  # 12 rows + 6 batches of 2 = row 24


class ChatTokenizer(ByteTokenizer):
    """render_conversation of a user turn (mask 0) and an assistant turn (mask 1), byte tokens."""

    def render_conversation(self, conversation, max_tokens):
        user, answer = (encode_one(m["content"]) for m in conversation["messages"])
        ids, mask = [BOS] + user + answer, [0] * (1 + len(user)) + [1] * len(answer)
        return ids[:max_tokens], mask[:max_tokens]


def test_conversations_pack_with_their_loss_masks():
    task = [{"messages": [{"content": f"doc{i}|" + "q" * (i % 7)}, {"content": "a" * (1 + i % 5)}]} for i in range(60)]
    answer = ord("a") + 1
    loader = ConversationLoader(ChatTokenizer(), task, B=3, T=20, buffer_size=8)
    batches = take(loader, 6)
    for x, y in batches:
        assert x.shape == y.shape == (3, 20) and (x[:, 0] == BOS).all()
        supervised = y >= 0
        assert (y[supervised] == answer).all()  # only the assistant's tokens are targets ...
        assert torch.equal(x[:, 1:] == answer, supervised[:, :-1])  # ... every one of them, the next token
    for row in (r for x, _ in batches for r in x.tolist()):  # each conversation starts whole: BOS, its tag
        assert all(row[i + 1] >= TAG for i, t in enumerate(row[:-1]) if t == BOS)
    state = json.loads(json.dumps(loader.state_dict()))
    assert state["sources"][0]["docs"] == loader.taken > 0
    expected = take(loader, 4)
    loader.close()
    again = ConversationLoader(ChatTokenizer(), task, B=3, T=20, buffer_size=8)
    again.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, take(again, 4)))
    again.close()


def test_many_epochs_roll_over(tmp_path):
    source, docs = make_source(tmp_path / "src", n_train=30, n_val=4, group=4)
    train_ids = {tag(d) for d in docs[:30]}
    for split in ("train", "val"):
        loader = DataLoader(ByteTokenizer(), B=2, T=64, source=source, split=split, buffer_size=1000)
        batches, middle = take(loader, 25), loader.state_dict()
        batches += take(loader, 35)
        counts = {}
        for i in ids_in(batches):
            counts[i] = counts.get(i, 0) + 1
        epoch = loader.state_dict()["sources"][0]["epoch"]
        assert epoch >= 3
        expected = train_ids if split == "train" else {tag(d) for d in docs[30:]}
        assert set(counts) == expected  # every document, and nothing from the other split
        assert max(counts.values()) <= epoch + 1
        loader.close()
    again = DataLoader(ByteTokenizer(), B=2, T=64, source=source, split="val", buffer_size=1000)
    again.load_state_dict(middle)  # epochs in, where documents have waited longest: the same batches
    assert all(torch.equal(x0, x1) for (x0, _), (x1, _) in zip(batches[25:], take(again, 35)))
    again.close()


def test_errors_reach_the_caller(tmp_path):
    source, _ = make_source(tmp_path / "src")

    class Broken(ByteTokenizer):
        def encode(self, texts, **kwargs):
            raise ValueError("tokenizer exploded")

    loader = DataLoader(Broken(), B=2, T=30, source=source)
    with pytest.raises(ValueError, match="exploded"):
        next(loader)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_are_pinned_and_identical(tmp_path):
    source, _ = make_source(tmp_path / "src")
    cpu = take(DataLoader(ByteTokenizer(), B=4, T=64, source=source), 10)
    loader = DataLoader(ByteTokenizer(), B=4, T=64, source=source, device="cuda")
    gpu = take(loader, 1)
    get, pinned = loader._workers.get, []

    def spy():  # the host batches the loader copies from must be in pinned memory
        batch = get()
        pinned.append(batch[0].is_pinned() and batch[1].is_pinned())
        return batch

    loader._workers.get = spy
    gpu += take(loader, 9)
    assert pinned == [True] * 9
    for (x0, y0), (x1, y1) in zip(cpu, gpu, strict=True):
        assert x1.is_cuda and torch.equal(x0, x1.cpu()) and torch.equal(y0, y1.cpu())
    loader.close()
