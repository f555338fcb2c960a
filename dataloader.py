"""Training batches: documents are tokenized on the fly in background threads and packed into
rows that each start with <|bos|>, so the GPU never waits for data. DataLoader packs the
documents of a pretraining source, a weighted mixture of sources, or a schedule of mixtures;
ConversationLoader packs rendered conversations the same way (mid-training), with target -1
wherever the conversation's loss mask is 0.

    loader = DataLoader(tokenizer, B=32, T=2048, split="train", source="climbmix:0.9,dir:/data/math:0.1",
                        device="cuda", rank=rank, world_size=world_size)
    inputs, targets = next(loader)           # LongTensor (B, T) each, on the device
    sd = loader.state_dict()                 # save with the checkpoint ...
    loader.load_state_dict(sd)               # ... and the resumed run gets exactly the same batches

Mixtures: weights are shares of the tokens trained on. The next document of a mixture comes from
the source furthest behind its share, the one with the largest weight * (n + 1) - its tokens drawn
so far, n the tokens drawn from all (ties: the first named). A document longer than a row counts
as the T + 1 tokens it keeps (below), not its length: otherwise 4 KB books at weight 0.9 with
short pages at 0.1, in rows of 129 tokens, trained on 80% books and 20% pages. So every prefix
of the stream holds each source's share to within a document, and the order depends only on the
data and the weights. A schedule [(0, "fineweb-edu"), (800, "fineweb-edu:0.7,dir:/data/math:0.3")]
switches the mixture when the packer starts the first batch at or after this rank's row 800 (shares
count from the switch on). Rows, not batches: the trainer may halve the device batch after planning
it, the schedule stays put.

Packing (BOS-aligned best fit): each document is [BOS] + its tokens. A row of T+1 tokens is
filled by repeatedly taking, from a buffer of pending documents, the largest one that fits in
the space left. Only when no pending document fits is one cropped (the shortest, so the least
is lost) to finish the row; the cropped tail is dropped and counted (`crop_fraction`).
A document longer than a whole row can never fit: it starts a fresh row and fills it alone
(losing only what is beyond T+1 tokens), instead of piling up in the buffer. In a mixture, a row
starts with a document of the source furthest behind its share of the tokens placed, so one
source's short documents do not wait while another's long ones take every row. And a document
that has waited while an epoch of newer ones arrived starts the next row, so none starves.
Inputs are row[:-1], targets row[1:]. A token that must not be a target (outside a
conversation's loss mask) travels through the packer as ~id, a negative number, so one int array
per document carries both the ids and the mask; a batch turns it back into id and target -1.

Distributed: rank r reads the row groups i with i % world_size == r of every source
(dataset.split_row_groups), so ranks see disjoint documents; each rank loops over its share of
each source epoch after epoch on its own.

Determinism and resume: one reader thread per source reads and tokenizes its row groups in a fixed
order; the packer draws from them in the order above, so the batches depend only on the data and
the starting state, never on thread timing. The state after each batch is small: per source the
position of the next document (epoch, row group, document) and the counts drawn, and the pending
documents as (source, row group, document) references. Loading it re-reads and re-tokenizes those
documents and continues exactly where the saved run was, across a schedule switch too.
"""

import bisect
import queue
import threading

import numpy as np
import torch

import dataset
from common import UserError, print0, sum_over_ranks

STATE_VERSION = 3
SEQ_BITS = 40  # buffer keys are (length << SEQ_BITS) | (SEQ_MASK - seq): sorted by length, then age
SEQ_MASK = (1 << SEQ_BITS) - 1


class DataLoader:
    # a training source that wraps around is news (the log says so); the chat stages loop by design
    announces_epochs = True

    def __init__(self, tokenizer, B, T, split="train", source="stdlib-docs", device="cpu", rank=0, world_size=1,
                 buffer_size=1000, num_threads=4, prefetch=4):
        """B rows of T tokens per batch. source: a source or mixture (dataset.parse_mixture), or a
        schedule [(first row, mixture), ...] starting at row 0. buffer_size: pending documents to
        choose from when packing (more: fewer crops, more memory). num_threads: tokenizer threads per
        source. prefetch: batches made ahead."""
        assert B > 0 and T > 0, (B, T)
        self.tokenizer, self.B, self.T = tokenizer, B, T
        self.split, self.rank, self.world_size = split, rank, world_size
        self.device = torch.device(device)
        self.num_threads, self.prefetch = num_threads, prefetch
        self.bos = tokenizer.get_bos_token_id()
        self.schedule = [(0, source)] if isinstance(source, str) else [(int(b), m) for b, m in source]
        assert self.schedule[0][0] == 0, self.schedule
        mixtures = [dict(self.parse(mixture)) for _, mixture in self.schedule]
        self.sources = list(dict.fromkeys(name for mixture in mixtures for name in mixture))
        self.weights = [[mixture.get(name, 0.0) for name in self.sources] for mixture in mixtures]
        self.units = [self.list_units(name) for name in self.sources]
        self.docs_per_epoch = [sum(map(self.unit_size, units)) for units in self.units]
        self.buffer_size = max(1, min(buffer_size, sum(self.docs_per_epoch)))  # never 2 copies of a tiny corpus
        self.max_wait = max(2 * self.buffer_size, sum(self.docs_per_epoch))  # no document waits longer than an epoch
        self._state = dict(version=STATE_VERSION, schedule=[list(s) for s in self.schedule], split=split, rank=rank,
                           world_size=world_size, batches=0, rows=0, seq=0, stage=0, pending=[],
                           sources=[dict(name=name, epoch=0, unit=0, doc=0, drawn=0, stage_tokens=0, stage_placed=0,
                                         docs=0, tokens=0, cropped=0) for name in self.sources])
        self._workers = None

    # ---- what is packed: row groups of pretraining sources (ConversationLoader: conversations)

    def parse(self, mixture):
        return dataset.parse_mixture(mixture)

    def list_units(self, source):
        return dataset.split_row_groups(source, self.split, self.rank, self.world_size)

    def unit_size(self, unit) -> int:
        return dataset.unit_size(unit)

    def read(self, source, unit, which=None):
        """The documents of unit number `unit` of source number `source` (only those at the indices
        `which`, when given), as token arrays: [BOS] + the document."""
        texts = dataset.read_unit(self.units[source][unit])
        if which is not None:
            texts = [texts[d] for d in which]
        ids = self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.num_threads)
        return [np.asarray(x, dtype=np.int32) for x in ids]

    # ---- iteration

    def __iter__(self):
        return self

    def __next__(self):
        if self._workers is None:
            self._workers = _Workers(self, self._state)
        inputs, targets, state = self._workers.get()
        self._state = state
        if self.device.type == "cuda":  # pinned host memory -> asynchronous copies
            return inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        return inputs.to(self.device), targets.to(self.device)

    @property
    def crop_fraction(self) -> float:
        """Fraction of the document tokens taken so far that were cropped away."""
        cropped = sum(src["cropped"] for src in self._state["sources"])
        taken = cropped + sum(src["tokens"] for src in self._state["sources"])
        return cropped / taken if taken else 0.0

    @property
    def taken(self) -> int:
        """Documents placed into rows so far (whole or cropped)."""
        return sum(src["docs"] for src in self._state["sources"])

    def source_report(self, device) -> dict:
        """Per source, summed over ranks (every rank must call it): the tokens placed into rows and
        the epochs of its split drawn so far."""
        rows = [(src["tokens"], src["drawn"], n) for src, n in zip(self._state["sources"], self.docs_per_epoch)]
        totals = sum_over_ranks([x for row in rows for x in row], device)
        return {name: {"tokens": totals[3 * i], "epochs": totals[3 * i + 1] / totals[3 * i + 2]}
                for i, name in enumerate(self.sources)}

    # ---- resume

    def state_dict(self) -> dict:
        """The state after the last batch returned (plain Python: save it with torch.save or json)."""
        state = dict(self._state, sources=[dict(src) for src in self._state["sources"]])
        state["pending"] = [list(ref) for ref in state["pending"]]
        return state

    def load_state_dict(self, state: dict):
        """Continue from a state_dict(): the next batches are those the saved run would have made."""
        assert state["version"] == STATE_VERSION and state["world_size"] == self.world_size, state
        if ([list(s) for s in state["schedule"]], state["split"]) != (self._state["schedule"], self.split):
            raise UserError(f"the saved data position is in {state['schedule']} ({state['split']}), this run reads "
                            f"{self._state['schedule']} ({self.split}): resume with the run's original --source")
        self.close()
        self._state = dict(state, sources=[dict(src) for src in state["sources"]],
                           pending=[tuple(ref) for ref in state["pending"]])

    def close(self):
        """Stop the background threads (they are daemons: exiting without close() is fine too)."""
        if getattr(self, "_workers", None) is not None:
            self._workers.stop()
            self._workers = None

    def __del__(self):
        self.close()


class ConversationLoader(DataLoader):
    """Rendered conversations of a task packed like documents. Rank r takes examples r,
    r + world_size, ... in chunks of `chunk` (the units). A token outside the conversation's loss
    mask (its <|bos|>, user turns, tool outputs) gets target -1; each conversation is cut to T + 1.
    The buffer is small (it holds buffer_size to buffer_size + chunk - 1 conversations): best fit
    takes the longest first, and a mixture's tasks differ in length, so a big buffer feeds a run
    the long tasks early and the short ones late (offline preset, 150 steps: validation bpb over
    every validation conversation 0.746 with these defaults, 0.843 with the pretraining buffer)."""

    announces_epochs = False

    def __init__(self, tokenizer, task, B, T, rank=0, world_size=1, device="cpu", buffer_size=64, chunk=16,
                 prefetch=4):
        self.task, self.chunk = task, chunk
        super().__init__(tokenizer, B, T, split="train", source="conversations", device=device, rank=rank,
                         world_size=world_size, buffer_size=buffer_size, prefetch=prefetch)

    def parse(self, mixture):
        return [(mixture, 1.0)]

    def list_units(self, source):
        mine = range(self.rank, len(self.task), self.world_size)
        return [mine[i:i + self.chunk] for i in range(0, len(mine), self.chunk)]

    def unit_size(self, unit) -> int:
        return len(unit)

    def read(self, source, unit, which=None):
        indices = self.units[0][unit] if which is None else [self.units[0][unit][d] for d in which]
        docs = []
        for i in indices:
            ids, mask = self.tokenizer.render_conversation(self.task[i], max_tokens=self.T + 1)
            ids = np.asarray(ids, dtype=np.int32)
            docs.append(np.where(np.asarray(mask) == 1, ids, ~ids))  # ~id (< 0): not a target, see _Packer
        return docs


class _Workers:
    """Daemon threads: one reader per source reads and tokenizes its row groups in order; the
    packer packs them into batches, each sent with the loader state that follows it."""

    def __init__(self, loader: DataLoader, state: dict):
        self.loader = loader
        self.stopped = threading.Event()
        self.docs = [queue.Queue(maxsize=2) for _ in loader.sources]  # tokenized row groups, per source
        self.batches = queue.Queue(maxsize=max(1, loader.prefetch))
        self.threads = [threading.Thread(target=self._run, args=(self._read, s, src["epoch"], src["unit"]),
                                         daemon=True, name=f"dataloader-reader-{s}")
                        for s, src in enumerate(state["sources"])]
        self.threads.append(threading.Thread(target=self._run, args=(self._pack, state), daemon=True,
                                             name="dataloader-packer"))
        for thread in self.threads:
            thread.start()

    def get(self):
        while True:
            try:
                item = self.batches.get(timeout=1.0)
            except queue.Empty:
                if not self.threads[-1].is_alive():
                    raise RuntimeError("the data loader's packing thread died")
                continue
            if isinstance(item, BaseException):
                self.stop()
                raise item
            return item

    def stop(self):
        self.stopped.set()
        for q in (*self.docs, self.batches):  # unblock threads waiting to put
            while not q.empty():
                q.get_nowait()
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5.0)

    def _put(self, q, item) -> bool:
        while not self.stopped.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, fn, *args):
        try:
            fn(*args)
        except BaseException as e:  # hand any error to the consumer, which raises it
            self._put(self.batches, e)

    def _read(self, source, epoch, unit):
        num_units = len(self.loader.units[source])
        while not self.stopped.is_set():
            if not self._put(self.docs[source], (epoch, unit, self.loader.read(source, unit))):
                return
            epoch, unit = (epoch + 1, 0) if unit + 1 == num_units else (epoch, unit + 1)

    def _pack(self, state):
        packer = _Packer(self.loader, state, self.docs, self.stopped)
        while not self.stopped.is_set():
            batch = packer.next_batch()
            if batch is None or not self._put(self.batches, batch):
                return


class _Packer:
    """Draws documents from the sources and packs them into rows by best fit (in the packer thread)."""

    def __init__(self, loader: DataLoader, state: dict, docs: list, stopped: threading.Event):
        self.B, self.T, self.buffer_size, self.max_wait = loader.B, loader.T, loader.buffer_size, loader.max_wait
        self.pin = loader.device.type == "cuda"
        self.announce_epochs = loader.announces_epochs and loader.split == "train"
        self.docs, self.stopped = docs, stopped
        self.schedule, self.weights = loader.schedule, loader.weights
        self.num_units = [len(units) for units in loader.units]
        self.fixed = {k: state[k] for k in ("version", "schedule", "split", "rank", "world_size")}
        self.batches, self.stage = state["batches"], state["stage"]
        self.rows = state.get("rows", self.batches * self.B)  # rows made: a resume may use another B
        self.sources = [{"stage_placed": 0, **src} for src in state["sources"]]  # positions, counts (0: older states)
        self.current = [None] * len(self.sources)  # each one's row group being drawn from (token arrays)
        self.pending = {}  # seq -> (source, unit, doc, tokens), in the order the documents arrived
        self.keys = []  # sorted buffer keys, see SEQ_BITS
        self.seq = 0  # arrival number of the next document
        self._restore(loader, state["pending"], state["seq"])

    def _restore(self, loader, refs, next_seq):
        """Re-read the pending documents of a saved state and add them in their saved order."""
        wanted = {}
        for s, u, d, _ in refs:
            wanted.setdefault((s, u), []).append(d)
        tokens = {(s, u, d): toks for (s, u), ds in wanted.items() for d, toks in zip(ds, loader.read(s, u, ds))}
        for s, u, d, seq in refs:  # same arrival numbers: the same ages, so the same choices
            self.seq = seq
            self._add(s, u, d, tokens[s, u, d])
        self.seq = next_seq

    @staticmethod
    def _key(seq, length):
        return (length << SEQ_BITS) | (SEQ_MASK - seq)

    def _add(self, source, unit, doc, tokens):
        self.pending[self.seq] = (source, unit, doc, tokens)
        bisect.insort(self.keys, self._key(self.seq, len(tokens)))
        self.seq += 1

    def _pick(self) -> int:
        """The source of the next document: the one furthest behind its share of this stage."""
        stage = bisect.bisect_right([first for first, _ in self.schedule], self.rows) - 1
        if stage != self.stage:  # shares count from the switch on
            self.stage = stage
            for src in self.sources:
                src["stage_tokens"] = src["stage_placed"] = 0
            print0(f"data: from batch {self.batches} on, the mixture is {self.schedule[stage][1]}")
        weights = self.weights[stage]
        if len(weights) == 1:
            return 0
        n = 1 + sum(src["stage_tokens"] for src in self.sources)  # + 1: a source of weight 0 is never behind
        return max(range(len(weights)), key=lambda s: weights[s] * n - self.sources[s]["stage_tokens"])

    def _draw(self) -> bool:
        """Move the next document of the mixture into the buffer; with one source, the rest of its
        row group (the buffer then holds buffer_size to buffer_size + row group - 1 documents).
        False: stopped while waiting."""
        s = self._pick()
        src = self.sources[s]
        while self.current[s] is None:
            try:
                epoch, unit, self.current[s] = self.docs[s].get(timeout=0.1)
                assert (epoch, unit) == (src["epoch"], src["unit"]), "row groups arrived out of order"
            except queue.Empty:
                if self.stopped.is_set():
                    return False
        end = len(self.current[s]) if len(self.weights[self.stage]) == 1 else src["doc"] + 1
        for doc in range(src["doc"], end):
            self._add(s, src["unit"], doc, self.current[s][doc])
            src["stage_tokens"] += min(len(self.current[s][doc]), self.T + 1)  # what it can place
        src["doc"], src["drawn"] = end, src["drawn"] + end - src["doc"]
        if src["doc"] == len(self.current[s]):  # the row group is used up: the next one
            last = src["unit"] + 1 == self.num_units[s]
            src["epoch"], src["unit"], src["doc"] = src["epoch"] + last, 0 if last else src["unit"] + 1, 0
            self.current[s] = None
            if last and self.announce_epochs:  # (read ahead of training by the buffer)
                print0(f"data: {src['name']}: epoch {src['epoch'] + 1} begins: its documents repeat")
        return True

    def _fill_row(self, row) -> bool:
        pos, size = 0, len(row)
        while pos < size:
            while len(self.keys) < self.buffer_size:
                if not self._draw():
                    return False
            space = size - pos
            i = bisect.bisect_right(self.keys, (space << SEQ_BITS) | SEQ_MASK)  # first that does not fit
            oldest = next(iter(self.pending))
            if pos == 0 and oldest < self.seq - self.max_wait:
                # waited an epoch (never the best fit): it starts this row, where it fits or must be cropped anyway
                key = self.keys.pop(bisect.bisect_left(self.keys, self._key(oldest, len(self.pending[oldest][3]))))
            elif pos == 0 and len(self.weights[self.stage]) > 1:
                key = self.keys.pop(self._row_start(i))
            elif pos == 0 and i < len(self.keys):
                key = self.keys.pop(i)  # longer than a row: it can never fit, so it fills a row alone
            else:
                key = self.keys.pop(i - 1 if i > 0 else 0)  # the largest that fits, else the shortest (cropped)
            s, _, _, tokens = self.pending.pop(SEQ_MASK - (key & SEQ_MASK))
            n = min(len(tokens), space)
            row[pos:pos + n] = tokens[:n]
            pos += n
            src = self.sources[s]
            src["docs"], src["tokens"], src["cropped"] = src["docs"] + 1, src["tokens"] + n, src["cropped"] + len(tokens) - n
            src["stage_placed"] += n
        return True

    def _row_start(self, i) -> int:
        """Where in keys is the document that starts a row of a mixture (keys[:i] fit a row): one of the
        source furthest behind its share of the tokens placed, the shortest of its documents longer than
        a row (it can never fit), else its longest. Best fit alone would start every row with a long
        document while one is pending and leave a short-document source's share waiting in the buffer."""
        fits, too_long = {}, {}
        for j, key in enumerate(self.keys):  # by length: the last that fits, the first that does not
            s = self.pending[SEQ_MASK - (key & SEQ_MASK)][0]
            if j < i:
                fits[s] = j
            else:
                too_long.setdefault(s, j)
        candidates = fits | too_long
        weights, n = self.weights[self.stage], 1 + sum(src["stage_placed"] for src in self.sources)
        return candidates[max(candidates, key=lambda s: weights[s] * n - self.sources[s]["stage_placed"])]

    def next_batch(self):
        rows = np.empty((self.B, self.T + 1), dtype=np.int64)
        for row in rows:
            if not self._fill_row(row):
                return None
        self.batches, self.rows = self.batches + 1, self.rows + self.B
        inputs = torch.empty((self.B, self.T), dtype=torch.long, pin_memory=self.pin)
        targets = torch.empty((self.B, self.T), dtype=torch.long, pin_memory=self.pin)
        inputs.numpy()[:] = np.where(rows[:, :-1] < 0, ~rows[:, :-1], rows[:, :-1])
        targets.numpy()[:] = np.maximum(rows[:, 1:], -1)  # a masked token (~id < 0) is target -1
        state = dict(self.fixed, batches=self.batches, rows=self.rows, stage=self.stage, seq=self.seq,
                     sources=[dict(src) for src in self.sources],
                     pending=[(s, u, d, seq) for seq, (s, u, d, _) in self.pending.items()])
        return inputs, targets, state
