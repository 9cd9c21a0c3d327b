"""Stream a prepared set to each rank: read only this rank's share, sample deterministically.

**Shares.** The training split's shards, concatenated in index order, form one token stream of N
tokens. Rank r of W owns tokens `[r*N//W, (r+1)*N//W)` (for instruction/chat data: the documents
that *start* there, so examples are never cut between ranks). A rank opens only the shards that
overlap its share and reads only inside it: local shards by `os.pread` of each window (or
`np.memmap`, `local_io="mmap"`), object-store shards (`s3://`, `gs://`, any non-local fsspec URI) by range reads
of `block_bytes` blocks through a small LRU cache. So per-rank memory does not grow with the corpus.
`bytes_read()` reports the distinct pages each rank read (local) or blocks it fetched (range
reads).

**Order.** Batch `(step, micro)` of rank r is drawn by `np.random.default_rng([seed, r, step, micro])`
from rank r's share, as `raybig.data.text.Batches` does: the stream has no state, so a resumed run
continues with exactly the batches it would have seen. At another world size W', rank r draws from
share r of W' with the same rule: a well-defined order, deterministic in (seed, W', rank, step,
micro), but not the W-order (the shares moved). Validation batch i of rank r is keyed on
`(seed, 10**6 + i*W + r)` over the whole validation split (small, read by every rank).

**Text** windows are `seq_len + 1` consecutive tokens (across document boundaries, as pretraining
usually does): `x = w[:-1]`, `y = w[1:]`. **Instruction/chat** rows are *packed*: whole examples
drawn at random are laid end to end until the next one does not fit (an example longer than a row
is cut to the row, and redrawn if the cut leaves no response token); each example contributes `x = t[:-1]`, `y = t[1:]` with `y = -100` where the
target's loss mask is 0, so the loss is taken on response tokens only and never across examples.
`positions` restart at 0 per example and `doc_ids` number the examples in a row (-1 on padding),
so a model that supports it can keep attention inside each example.
"""

from __future__ import annotations

import json
import mmap
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from raybig.data.prepare import INDEX
from raybig.data.sources import DataError

IGNORE_INDEX = -100
"""Label of a token the loss ignores (PyTorch `cross_entropy`'s default `ignore_index`)."""


@dataclass
class Batch:
    """One micro batch, numpy int64 arrays of shape (B, T) with T = seq_len.

    Attributes:
        x: input ids.
        y: target ids; `IGNORE_INDEX` (-100) where no loss is taken (prompt tokens, padding).
        positions: position of each token within its example (text: 0..T-1).
        doc_ids: example number within the row (text: 0 everywhere; -1 on padding).
    """

    x: np.ndarray
    y: np.ndarray
    positions: np.ndarray
    doc_ids: np.ndarray


class ShardFile:
    """Random access to one flat array file, with per-block read accounting.

    Local files are read with `os.pread` (`local_io="pread"`, the default) or memory-mapped
    (`"mmap"`); other fsspec URIs are range-read in `block_bytes` blocks kept in an LRU cache of
    `cache_blocks` blocks. pread is the default because mapped pages count as the rank's resident
    memory (the kernel maps whole page-cache folios, often hundreds of KiB per touched window), so a
    memmap's RSS grows towards the share's size; pread leaves them in the page cache only.
    """

    def __init__(self, uri: str, dtype: np.dtype, length: int, block_bytes: int = 1 << 20,
                 cache_blocks: int = 8, local_io: str = "pread"):
        self.uri, self.dtype, self.length = uri, np.dtype(dtype), int(length)
        self.block_bytes, self.cache_blocks = block_bytes, cache_blocks
        fs, _, (path,) = fsspec.get_fs_token_paths(uri)
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self.local = proto in ("file", "local")
        self._fs, self._path = fs, path
        self._mm = np.memmap(path, dtype=self.dtype, mode="r", shape=(self.length,)) \
            if self.local and self.length and local_io == "mmap" else None
        self._fd = os.open(path, os.O_RDONLY) if self.local and self._mm is None else None
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._fh: Any = None
        self.touched: set[int] = set()
        self.fetched_bytes = 0

    def read(self, start: int, stop: int) -> np.ndarray:
        """Elements `[start, stop)` as a new array of the file's dtype."""
        item = self.dtype.itemsize
        b0, b1 = start * item, stop * item
        if self.local:
            # Local: account the pages touched (what the kernel reads), not whole blocks.
            page = min(self.block_bytes, mmap.PAGESIZE)
            for p in range(b0 // page, (b1 - 1) // page + 1) if b1 > b0 else ():
                if p not in self.touched:
                    self.touched.add(p)
                    self.fetched_bytes += min(page, self.length * item - p * page)
            if self._mm is not None:
                return np.array(self._mm[start:stop])
            if b1 <= b0:
                return np.zeros(0, self.dtype)
            assert self._fd is not None, f"{self.uri} is closed"
            return np.frombuffer(os.pread(self._fd, b1 - b0, b0), dtype=self.dtype).copy()
        blocks = range(b0 // self.block_bytes, (b1 - 1) // self.block_bytes + 1) if b1 > b0 else range(0)
        parts = [self._block(b) for b in blocks]
        raw = b"".join(parts)
        off = b0 - (blocks[0] * self.block_bytes if len(blocks) else 0)
        return np.frombuffer(raw[off:off + (b1 - b0)], dtype=self.dtype).copy()

    def close(self) -> None:
        """Release the file descriptor / mapping / open remote file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._mm = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _block(self, b: int) -> bytes:
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        if self._fh is None:
            self._fh = self._fs.open(self._path, "rb", block_size=0, cache_type="none")
        self._fh.seek(b * self.block_bytes)
        data = self._fh.read(self.block_bytes)
        self.touched.add(b)
        self.fetched_bytes += len(data)
        self._cache[b] = data
        if len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        return data


class _Split:
    """The shards of one split as one global stream, opened lazily, reading only what is asked."""

    def __init__(self, root: str, info: dict[str, Any], dtype: np.dtype, block_bytes: int, masked: bool,
                 local_io: str = "pread"):
        self.root, self.info, self.dtype, self.block_bytes, self.masked = root, info, dtype, block_bytes, masked
        self.local_io = local_io
        sizes = [int(s["tokens"]) for s in info["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n = int(self.starts[-1])
        self._files: dict[tuple[int, str], ShardFile] = {}

    def _file(self, k: int, kind: str) -> ShardFile:
        if (k, kind) not in self._files:
            s = self.info["shards"][k]
            if kind == "tokens":
                self._files[(k, kind)] = ShardFile(f"{self.root}/{s['tokens_file']}", self.dtype, s["tokens"],
                                                   self.block_bytes, local_io=self.local_io)
            elif kind == "mask":
                self._files[(k, kind)] = ShardFile(f"{self.root}/{s['mask_file']}", np.dtype(np.uint8), s["tokens"],
                                                   self.block_bytes, local_io=self.local_io)
            else:
                self._files[(k, kind)] = ShardFile(f"{self.root}/{s['docs_file']}", np.dtype("<i8"),
                                                   s["documents"] + 1, self.block_bytes, local_io=self.local_io)
        return self._files[(k, kind)]

    def read(self, start: int, stop: int, kind: str = "tokens") -> np.ndarray:
        """Global elements `[start, stop)` of the token (or mask) stream, across shard borders."""
        out = []
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            lo, hi = int(self.starts[k]), int(self.starts[k + 1])
            take = min(stop, hi)
            if take > start:
                out.append(self._file(k, kind).read(start - lo, take - lo))
            start = max(start, take)
            k += 1
        return np.concatenate(out) if out else np.zeros(0, self.dtype)

    def doc_bounds(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Global (starts, ends) of the documents that start in `[lo, hi)`; reads only those shards."""
        s_all, e_all = [], []
        for k in range(len(self.info["shards"])):
            a, b = int(self.starts[k]), int(self.starts[k + 1])
            if b <= lo or a >= hi or b == a:
                continue
            offs = self._file(k, "docs").read(0, self.info["shards"][k]["documents"] + 1) + a
            st, en = offs[:-1], offs[1:]
            sel = (st >= lo) & (st < hi)
            s_all.append(st[sel])
            e_all.append(en[sel])
        if not s_all:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(s_all), np.concatenate(e_all)

    def bytes_read(self, kinds: tuple[str, ...] = ("tokens", "mask")) -> int:
        return sum(f.fetched_bytes for (_, kind), f in self._files.items() if kind in kinds)


def open_index(uri: str) -> dict[str, Any]:
    """The `index.json` of a complete prepared set.

    Raises:
        DataError: there is no index (not prepared, or a write that never committed).
    """
    fs, _, (root,) = fsspec.get_fs_token_paths(uri)
    path = f"{root.rstrip('/')}/{INDEX}"
    if not fs.exists(path):
        raise DataError(f"{uri} is not a complete prepared data set (no {INDEX}): never prepared, or prepared "
                        "where this process cannot see it (data.prepared_path and storage.path must be storage "
                        "every node reads); run raybig prepare")
    with fs.open(path, "r") as fh:
        return json.load(fh)


class ShardBatches:
    """Deterministic per-rank batches from a prepared set; a drop-in for `raybig.data.text.Batches`.

    `train_batch(step, micro)` and `val_batch(i)` return `(x, y)` int64 torch tensors of shape
    (micro_batch_size, seq_len), `y` holding -100 on tokens without loss; `get`/`get_val` return
    the full `Batch` (numpy, with positions and document ids).
    """

    def __init__(self, uri: str, seq_len: int, micro_batch_size: int, seed: int, rank: int,
                 world_size: int, *, packed: bool | None = None, block_bytes: int = 1 << 20,
                 local_io: str = "pread"):
        """Open rank `rank`'s share of the prepared set at `uri`.

        Args:
            uri: a prepared set's folder (`PrepareSummary.uri`), local or any fsspec URI.
            seq_len: T, tokens per row.
            micro_batch_size: B, rows per batch.
            seed: the run's seed (batches are keyed on (seed, rank, step, micro)).
            rank: this worker, in [0, world_size).
            world_size: the number of workers sharing the training split.
            packed: pack whole examples (default: True for instruction/chat sets, False for text).
            block_bytes: range-read block size in bytes (object stores); local reads are
                accounted in pages.
            local_io: `pread` (default) or `mmap` for local shards (see `ShardFile`).

        Raises:
            DataError: not a complete prepared set; the share of a rank has fewer than seq_len + 1
                tokens (or no example); the set has no validation split when one is asked for.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.uri = uri.rstrip("/")
        self.index = open_index(self.uri)
        self.seq_len, self.micro_batch_size, self.seed = seq_len, micro_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.masked = self.index["format"] != "text"
        self.packed = self.masked if packed is None else packed
        dtype = np.dtype(self.index["dtype"])
        self.train = _Split(self.uri, self.index["splits"]["train"], dtype, block_bytes, self.masked, local_io)
        self.val = _Split(self.uri, self.index["splits"]["val"], dtype, block_bytes, self.masked, local_io)
        n = self.train.n
        self.share = (rank * n // world_size, (rank + 1) * n // world_size)
        """Global token range `[lo, hi)` of the training stream this rank owns."""
        if self.packed:
            st, en = self.train.doc_bounds(*self.share)
            keep = en - st >= 2  # a one-token example gives no (x, y) pair
            self._docs = (st[keep], en[keep])
            if len(self._docs[0]) == 0:
                raise DataError(f"corpus too small: rank {rank} of {world_size} gets no training example "
                                f"({n} training tokens in {self.train.info['documents']} examples)")
        elif self.share[1] - self.share[0] < seq_len + 1:
            raise DataError(f"corpus too small: {n} training tokens give rank {rank} of {world_size} "
                            f"{self.share[1] - self.share[0]} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self._val_docs: tuple[np.ndarray, np.ndarray] | None = None

    # --- sampling -------------------------------------------------------------------------------

    def _windows(self, split: _Split, lo: int, hi: int, rng: np.random.Generator) -> Batch:
        t, b = self.seq_len, self.micro_batch_size
        if hi - lo < t + 1:
            raise DataError(f"split has {hi - lo} tokens, fewer than seq_len + 1 = {t + 1}")
        starts = rng.integers(lo, hi - t, size=b)
        w = np.stack([split.read(int(s), int(s) + t + 1) for s in starts]).astype(np.int64)
        y = w[:, 1:].copy()
        if self.masked:
            m = np.stack([split.read(int(s) + 1, int(s) + t + 1, "mask") for s in starts])
            y[m == 0] = IGNORE_INDEX
        pos = np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy()
        return Batch(w[:, :-1], y, pos, np.zeros((b, t), np.int64))

    def _pack(self, split: _Split, docs: tuple[np.ndarray, np.ndarray], rng: np.random.Generator) -> Batch:
        t, b = self.seq_len, self.micro_batch_size
        x = np.zeros((b, t), np.int64)
        y = np.full((b, t), IGNORE_INDEX, np.int64)
        pos = np.zeros((b, t), np.int64)
        ids = np.full((b, t), -1, np.int64)
        starts, ends = docs
        for row in range(b):
            fill, k, tries = 0, 0, 0
            while fill < t:
                d = int(rng.integers(len(starts)))
                n = int(ends[d] - starts[d]) - 1  # (x, y) pairs this example gives
                if n > t - fill:
                    if fill:
                        break  # keep examples whole: pad the rest of this row
                    n = t
                s = int(starts[d])
                tgt_mask = split.read(s + 1, s + n + 1, "mask") if self.masked else None
                tries += 1
                if tgt_mask is not None and not tgt_mask.any() and tries < 64:
                    continue  # cut before its response: a row with no loss at all would give NaN
                tok = split.read(s, s + n + 1).astype(np.int64)
                x[row, fill:fill + n] = tok[:-1]
                tgt = tok[1:].copy()
                if tgt_mask is not None:
                    tgt[tgt_mask == 0] = IGNORE_INDEX
                y[row, fill:fill + n] = tgt
                pos[row, fill:fill + n] = np.arange(n)
                ids[row, fill:fill + n] = k
                fill += n
                k += 1
        return Batch(x, y, pos, ids)

    def get(self, step: int, micro: int) -> Batch:
        """Training micro batch `micro` of optimizer step `step` for this rank (deterministic)."""
        rng = np.random.default_rng([self.seed, self.rank, step, micro])
        if self.packed:
            return self._pack(self.train, self._docs, rng)
        return self._windows(self.train, *self.share, rng)

    def get_val(self, i: int) -> Batch:
        """Validation batch `i` for this rank; the same for every evaluation.

        Raises:
            DataError: the set has no validation split (prepared with `val_fraction: 0`).
        """
        if self.val.n == 0:
            raise DataError(f"{self.uri} has no validation split (val_fraction was 0)")
        rng = np.random.default_rng([self.seed, 10**6 + i * self.world_size + self.rank])
        if self.packed:
            if self._val_docs is None:
                st, en = self.val.doc_bounds(0, self.val.n)
                self._val_docs = (st[en - st >= 2], en[en - st >= 2])
            return self._pack(self.val, self._val_docs, rng)
        return self._windows(self.val, 0, self.val.n, rng)

    def train_batch(self, step: int, micro: int) -> tuple[Any, Any]:
        """`(x, y)` of `get(step, micro)` as int64 torch tensors (B, T); y is -100 where no loss."""
        import torch

        bt = self.get(step, micro)
        return torch.from_numpy(bt.x), torch.from_numpy(bt.y)

    def val_batch(self, i: int) -> tuple[Any, Any]:
        """`(x, y)` of `get_val(i)` as int64 torch tensors (B, T)."""
        import torch

        bt = self.get_val(i)
        return torch.from_numpy(bt.x), torch.from_numpy(bt.y)

    def bytes_read(self) -> dict[str, int]:
        """Bytes this rank read (local: distinct pages) or fetched (range reads: blocks) so far.

        Keys: `train` (token and mask files of the training split), `train_docs` (document offset
        files of the shards this rank's share overlaps, packed data only), `val` (all of it).
        """
        return {"train": self.train.bytes_read(), "train_docs": self.train.bytes_read(("docs",)),
                "val": self.val.bytes_read(("tokens", "mask", "docs"))}

    def share_bytes(self) -> int:
        """Bytes of this rank's training share across tokens, masks and document offsets."""
        lo, hi = self.share
        per_token = self.train.dtype.itemsize + (1 if self.masked else 0)
        return (hi - lo) * per_token


def check_shares(uri: str, seq_len: int, micro_batch_size: int, seed: int, world_size: int,
                 packed: bool | None = None) -> None:
    """Raise now (in the driver) what a rank would raise on its first batch: a share too small.

    Opens every rank's share (the first and last 8 of a larger world), draws its first training
    batch, and draws the first validation batch when the set has a validation split.

    Raises:
        DataError: a rank's share holds fewer than seq_len + 1 tokens or no example; the validation
            split is too small for one row.
    """
    ranks = range(world_size) if world_size <= 16 else [*range(8), *range(world_size - 8, world_size)]
    for r in ranks:
        b = ShardBatches(uri, seq_len, micro_batch_size, seed, r, world_size, packed=packed)
        b.get(0, 0)
        if r == 0 and b.val.n:
            try:
                b.get_val(0)
            except DataError as e:
                raise DataError(f"validation split of {uri} is too small: {e} (raise data.val_fraction, or "
                                "set it to 0 for no validation)") from None
