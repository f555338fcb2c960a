"""Training batches: documents are tokenized on the fly in a background thread and packed
into rows that each start with <|bos|>, so the GPU never waits for data. DataLoader packs the
documents of a pretraining source; ConversationLoader packs rendered conversations the same way
(mid-training), with target -1 wherever the conversation's loss mask is 0.

    loader = DataLoader(tokenizer, B=32, T=2048, split="train", source="fineweb-edu", device="cuda",
                        rank=rank, world_size=world_size)
    inputs, targets = next(loader)           # LongTensor (B, T) each, on the device
    sd = loader.state_dict()                 # save with the checkpoint ...
    loader.load_state_dict(sd)               # ... and the resumed run gets exactly the same batches

Packing (BOS-aligned best fit): each document is [BOS] + its tokens. A row of T+1 tokens is
filled by repeatedly taking, from a buffer of pending documents, the largest one that fits in
the space left. Only when no pending document fits is one cropped (the shortest, so the least
is lost) to finish the row; the cropped tail is dropped and counted (`crop_fraction`).
A document longer than a whole row can never fit: it starts a fresh row and fills it alone
(losing only what is beyond T+1 tokens), instead of piling up in the buffer. And a document
that has waited while an epoch of newer ones arrived starts the next row, so none starves.
Inputs are row[:-1], targets row[1:]. A token that must not be a target (outside a
conversation's loss mask) travels through the packer as ~id, a negative number, so one int array
per document carries both the ids and the mask; a batch turns it back into id and target -1.

Distributed: rank r reads the row groups i with i % world_size == r (dataset.split_row_groups),
so ranks see disjoint documents; each rank loops over its share epoch after epoch on its own.

Determinism and resume: the reader thread produces row groups in a fixed order and the packer
consumes them in that order, so the batches depend only on the data and the starting state,
never on thread timing. The state after each batch is small: the position of the next row group
to read, and the pending documents as (row group, document) references. Loading it re-reads
and re-tokenizes those documents and continues exactly where the saved run was.
"""

import bisect
import queue
import threading

import numpy as np
import torch

import dataset
from common import UserError, print0

STATE_VERSION = 2
SEQ_BITS = 40  # buffer keys are (length << SEQ_BITS) | (SEQ_MASK - seq): sorted by length, then age
SEQ_MASK = (1 << SEQ_BITS) - 1


class DataLoader:
    def __init__(self, tokenizer, B, T, split="train", source="stdlib-docs", device="cpu", rank=0, world_size=1,
                 buffer_size=1000, num_threads=4, prefetch=4):
        """B rows of T tokens per batch. buffer_size: pending documents to choose from when packing
        (more: fewer crops, more memory). num_threads: tokenizer threads. prefetch: batches made ahead."""
        assert B > 0 and T > 0, (B, T)
        self.tokenizer, self.B, self.T = tokenizer, B, T
        self.split, self.source, self.rank, self.world_size = split, source, rank, world_size
        self.device = torch.device(device)
        self.num_threads, self.prefetch = num_threads, prefetch
        self.bos = tokenizer.get_bos_token_id()
        self.units = self.list_units()
        docs_per_epoch = sum(map(self.unit_size, self.units))
        self.buffer_size = max(1, min(buffer_size, docs_per_epoch))  # never hold 2 copies of a tiny corpus
        self.max_wait = max(2 * self.buffer_size, docs_per_epoch)  # no document waits longer than an epoch
        self._state = dict(version=STATE_VERSION, source=source, split=split, rank=rank, world_size=world_size,
                           epoch=0, unit=0, seq=0, pending=[], batches=0, docs=0, tokens=0, cropped=0)
        self._workers = None

    # ---- what is packed: row groups of a pretraining source (ConversationLoader: conversations)

    def list_units(self):
        return dataset.split_row_groups(self.source, self.split, self.rank, self.world_size)

    def unit_size(self, unit) -> int:
        return dataset.unit_size(unit)

    def read(self, unit, which=None):
        """The documents of unit number `unit` (only those at the indices `which`, when given), as
        token arrays: [BOS] + the document."""
        texts = dataset.read_unit(self.units[unit])
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
        taken = self._state["tokens"] + self._state["cropped"]
        return self._state["cropped"] / taken if taken else 0.0

    @property
    def epoch(self) -> int:
        return self._state["epoch"]

    @property
    def taken(self) -> int:
        """Documents placed into rows so far (whole or cropped)."""
        return self._state["docs"]

    # ---- resume

    def state_dict(self) -> dict:
        """The state after the last batch returned (plain Python: save it with torch.save or json)."""
        state = dict(self._state)
        state["pending"] = [list(ref) for ref in state["pending"]]
        return state

    def load_state_dict(self, state: dict):
        """Continue from a state_dict(): the next batches are those the saved run would have made."""
        assert state["version"] == STATE_VERSION and state["world_size"] == self.world_size, state
        if (state["source"], state["split"]) != (self.source, self.split):
            raise UserError(f"the saved data position is in {state['source']}/{state['split']}, this run reads "
                            f"{self.source}/{self.split}: resume with the run's original --source")
        self.close()
        self._state = dict(state, pending=[tuple(ref) for ref in state["pending"]])

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

    def __init__(self, tokenizer, task, B, T, rank=0, world_size=1, device="cpu", buffer_size=64, chunk=16,
                 prefetch=4):
        self.task, self.chunk = task, chunk
        super().__init__(tokenizer, B, T, split="train", source="conversations", device=device, rank=rank,
                         world_size=world_size, buffer_size=buffer_size, prefetch=prefetch)

    def list_units(self):
        mine = range(self.rank, len(self.task), self.world_size)
        return [mine[i:i + self.chunk] for i in range(0, len(mine), self.chunk)]

    def unit_size(self, unit) -> int:
        return len(unit)

    def read(self, unit, which=None):
        indices = self.units[unit] if which is None else [self.units[unit][d] for d in which]
        docs = []
        for i in indices:
            ids, mask = self.tokenizer.render_conversation(self.task[i], max_tokens=self.T + 1)
            ids = np.asarray(ids, dtype=np.int32)
            docs.append(np.where(np.asarray(mask) == 1, ids, ~ids))  # ~id (< 0): not a target, see _Packer
        return docs


class _Workers:
    """Two daemon threads: the reader reads and tokenizes row groups in order; the packer packs
    them into batches, each sent with the loader state that follows it."""

    def __init__(self, loader: DataLoader, state: dict):
        self.loader = loader
        self.stopped = threading.Event()
        self.docs = queue.Queue(maxsize=2)  # tokenized row groups
        self.batches = queue.Queue(maxsize=max(1, loader.prefetch))
        self.reader = threading.Thread(target=self._run, args=(self._read, state["epoch"], state["unit"]),
                                       daemon=True, name="dataloader-reader")
        self.packer = threading.Thread(target=self._run, args=(self._pack, state), daemon=True,
                                       name="dataloader-packer")
        self.reader.start()
        self.packer.start()

    def get(self):
        while True:
            try:
                item = self.batches.get(timeout=1.0)
            except queue.Empty:
                if not self.packer.is_alive():
                    raise RuntimeError("the data loader's packing thread died")
                continue
            if isinstance(item, BaseException):
                self.stop()
                raise item
            return item

    def stop(self):
        self.stopped.set()
        for q in (self.docs, self.batches):  # unblock threads waiting to put
            while not q.empty():
                q.get_nowait()
        for thread in (self.reader, self.packer):
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

    def _read(self, epoch, unit):
        num_units = len(self.loader.units)
        while not self.stopped.is_set():
            if not self._put(self.docs, (epoch, unit, self.loader.read(unit))):
                return
            epoch, unit = (epoch + 1, 0) if unit + 1 == num_units else (epoch, unit + 1)

    def _pack(self, state):
        packer = _Packer(self.loader, state, self.docs, self.stopped)
        while not self.stopped.is_set():
            batch = packer.next_batch()
            if batch is None or not self._put(self.batches, batch):
                return


class _Packer:
    """Best-fit packing of BOS-prefixed documents into rows (runs in the packer thread)."""

    def __init__(self, loader: DataLoader, state: dict, docs: queue.Queue, stopped: threading.Event):
        self.B, self.T, self.buffer_size, self.max_wait = loader.B, loader.T, loader.buffer_size, loader.max_wait
        self.pin = loader.device.type == "cuda"
        self.docs, self.stopped = docs, stopped
        self.epoch, self.unit = state["epoch"], state["unit"]
        self.counts = {k: state[k] for k in ("batches", "docs", "tokens", "cropped")}
        self.fixed = {k: state[k] for k in ("version", "source", "split", "rank", "world_size")}
        self.pending = {}  # seq -> (unit, doc, tokens), in the order the documents arrived
        self.keys = []  # sorted buffer keys, see SEQ_BITS
        self.seq = 0  # arrival number of the next document
        self._num_units = len(loader.units)
        self._restore(loader, state["pending"], state["seq"])

    def _restore(self, loader, refs, next_seq):
        """Re-read the pending documents of a saved state and add them in their saved order."""
        wanted = {}
        for u, d, _ in refs:
            wanted.setdefault(u, []).append(d)
        tokens = {(u, d): toks for u, ds in wanted.items() for d, toks in zip(ds, loader.read(u, ds))}
        for u, d, seq in refs:  # same arrival numbers: the same ages, so the same choices
            self.seq = seq
            self._add(u, d, tokens[u, d])
        self.seq = next_seq

    @staticmethod
    def _key(seq, length):
        return (length << SEQ_BITS) | (SEQ_MASK - seq)

    def _add(self, unit, doc, tokens):
        self.pending[self.seq] = (unit, doc, tokens)
        bisect.insort(self.keys, self._key(self.seq, len(tokens)))
        self.seq += 1

    def _refill(self) -> bool:
        while len(self.keys) < self.buffer_size:
            while True:
                try:
                    epoch, unit, docs = self.docs.get(timeout=0.1)
                    break
                except queue.Empty:
                    if self.stopped.is_set():
                        return False
            assert (epoch, unit) == (self.epoch, self.unit), "row groups arrived out of order"
            for d, tokens in enumerate(docs):
                self._add(unit, d, tokens)
            self.epoch, self.unit = (epoch + 1, 0) if unit + 1 == self._num_units else (epoch, unit + 1)
            if self.unit == 0 and self.fixed["split"] == "train":  # (read ahead of training by the buffer)
                print0(f"data: {self.fixed['source']}: epoch {self.epoch + 1} begins (rank 0): documents repeat")
        return True

    def _fill_row(self, row) -> bool:
        pos, size = 0, len(row)
        while pos < size:
            if not self._refill():
                return False
            space = size - pos
            i = bisect.bisect_right(self.keys, (space << SEQ_BITS) | SEQ_MASK)  # first that does not fit
            oldest = next(iter(self.pending))
            if pos == 0 and oldest < self.seq - self.max_wait:
                # waited an epoch (never the best fit): it starts this row, where it fits or must be cropped anyway
                key = self.keys.pop(bisect.bisect_left(self.keys, self._key(oldest, len(self.pending[oldest][2]))))
            elif pos == 0 and i < len(self.keys):
                key = self.keys.pop(i)  # longer than a row: it can never fit, so it fills a row alone
            else:
                key = self.keys.pop(i - 1 if i > 0 else 0)  # the largest that fits, else the shortest (cropped)
            _, _, tokens = self.pending.pop(SEQ_MASK - (key & SEQ_MASK))
            n = min(len(tokens), space)
            row[pos:pos + n] = tokens[:n]
            pos += n
            self.counts["docs"] += 1
            self.counts["tokens"] += n
            self.counts["cropped"] += len(tokens) - n
        return True

    def next_batch(self):
        rows = np.empty((self.B, self.T + 1), dtype=np.int64)
        for row in rows:
            if not self._fill_row(row):
                return None
        self.counts["batches"] += 1
        inputs = torch.empty((self.B, self.T), dtype=torch.long, pin_memory=self.pin)
        targets = torch.empty((self.B, self.T), dtype=torch.long, pin_memory=self.pin)
        inputs.numpy()[:] = np.where(rows[:, :-1] < 0, ~rows[:, :-1], rows[:, :-1])
        targets.numpy()[:] = np.maximum(rows[:, 1:], -1)  # a masked token (~id < 0) is target -1
        state = dict(self.fixed, **self.counts, epoch=self.epoch, unit=self.unit, seq=self.seq,
                     pending=[(u, d, seq) for seq, (u, d, _) in self.pending.items()])
        return inputs, targets, state
