"""Whole-corpus-in-memory text reading: the training sample of a run's BPE, and the old `Batches`.

Training reads prepared token shards (`raybig.data.prepare`, `raybig.data.shards`); this module
remains for what needs raw text in memory: `split_texts` is what `data.tokenizer: bpe` trains its
vocabulary on (at most `data.max_tokens` bytes, else `TEXT_SAMPLE_BYTES`), and `Batches` (every
rank reads the corpus and keeps a slice) is kept for tools and tests that used it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch

from raybig.data.sources import stdlib_files
from raybig.spec.models import DataSpec

TEXT_SAMPLE_BYTES = 16_000_000
"""Bytes of text read into memory when `data.max_tokens` sets no smaller limit."""


def _cap(spec: DataSpec) -> int:
    limit = spec.token_limit()
    return min(limit, TEXT_SAMPLE_BYTES) if limit else TEXT_SAMPLE_BYTES


def list_files(path: str | list[str]) -> list[str]:
    """Resolve a data path (or a list of them) to a sorted list of fsspec URLs."""
    if isinstance(path, list):
        return sorted({f for p in path for f in list_files(p)})
    if path.startswith("stdlib://"):
        return stdlib_files()
    fs, _, paths = fsspec.get_fs_token_paths(path)
    out: list[str] = []
    for p in paths:
        if fs.isdir(p):
            out += [f for f in fs.find(p) if not fs.isdir(f)]
        else:
            out.append(p)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return sorted(f if protocol in ("file", "local") else f"{protocol}://{f}" for f in out)


def read_corpus(spec: DataSpec) -> np.ndarray:
    """All tokens of the corpus as uint8, capped at `data.max_tokens` (else `TEXT_SAMPLE_BYTES`)."""
    files = list_files(spec.path)
    if not files:
        raise FileNotFoundError(f"data.path {spec.path!r} matched no files")
    chunks: list[bytes] = []
    total, cap = 0, _cap(spec)
    for f in files:
        with fsspec.open(f, "rb") as fh:
            blob = fh.read(cap - total)
        chunks.append(blob + b"\n\n")
        total += len(blob) + 2
        if total >= cap:
            break
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def read_texts(spec: DataSpec) -> list[str]:
    """The corpus as one text per file.

    UTF-8 with invalid bytes replaced; at most `data.max_tokens` (else `TEXT_SAMPLE_BYTES`) bytes in all.
    """
    files = list_files(spec.path)
    if not files:
        raise FileNotFoundError(f"data.path {spec.path!r} matched no files")
    out: list[str] = []
    total, cap = 0, _cap(spec)
    for f in files:
        with fsspec.open(f, "rb") as fh:
            blob = fh.read(cap - total)
        out.append(blob.decode("utf-8", errors="replace"))
        total += len(blob)
        if total >= cap:
            break
    return out


def split_texts(spec: DataSpec) -> tuple[list[str], list[str]]:
    """Split the corpus into (training texts, validation texts).

    The last `val_fraction` of the characters is held out
    (the text that straddles the cut is split in two), as the byte pipeline holds out its tail.
    """
    texts = read_texts(spec)
    n_val = max(int(sum(map(len, texts)) * spec.val_fraction), spec.seq_len + 2)
    train, val = list(texts), list[str]()
    while n_val > 0 and train:
        last = train.pop()
        if len(last) > n_val:
            train.append(last[:-n_val])
            last = last[-n_val:]
        val.insert(0, last)
        n_val -= len(last)
    return train, val


def encode_texts(texts: list[str], tokenizer: Any) -> np.ndarray:
    """Token ids of `texts` as one uint16 array (uint32 above 65,536 ids).

    Each document ended by the tokenizer's EOS (and started by BOS where
    the tokenizer adds one), as one uint16 array (uint32 above 65,536 ids).
    """
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    enc = getattr(tokenizer, "encode_document", None)
    eos = getattr(tokenizer, "eos_id", None)
    parts = []
    for t in texts:
        if enc is not None:
            ids = enc(t)
        else:
            ids = tokenizer.encode(t)
            if eos is not None:
                ids.append(eos)
        parts.append(np.asarray(ids, dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


@dataclass
class Batches:
    """Deterministic batch source for one rank."""

    train: np.ndarray
    val: np.ndarray
    seq_len: int
    micro_batch_size: int
    seed: int
    rank: int
    world_size: int

    @classmethod
    def build(cls, spec: DataSpec, micro_batch_size: int, seed: int, rank: int, world_size: int,
              tokens: np.ndarray | None = None, tokenizer: Any = None) -> Batches:
        """This rank's batches.

        `tokenizer` (anything but the byte tokenizer) encodes the corpus's
        training and validation texts into token ids; bytes keep the uint8 stream as is.
        """
        if tokenizer is not None and getattr(tokenizer, "name", "bytes") != "bytes" and tokens is None:
            train_t, val_t = split_texts(spec)
            train, val = encode_texts(train_t, tokenizer), encode_texts(val_t, tokenizer)
            if len(val) < spec.seq_len + 2:
                raise ValueError(f"validation split too small: {len(val)} tokens at seq_len {spec.seq_len}")
        else:
            tokens = read_corpus(spec) if tokens is None else tokens
            n_val = max(int(len(tokens) * spec.val_fraction), spec.seq_len + 2)
            train, val = tokens[:-n_val], tokens[-n_val:]
        shard = len(train) // world_size
        if shard <= spec.seq_len + 1:
            raise ValueError(f"corpus too small: {len(train)} training tokens for {world_size} "
                             f"ranks at seq_len {spec.seq_len}")
        mine = train[rank * shard:(rank + 1) * shard]
        return cls(mine, val, spec.seq_len, micro_batch_size, seed, rank, world_size)

    def _windows(self, data: np.ndarray, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = rng.integers(0, len(data) - self.seq_len - 1, size=n)
        x = np.stack([data[s:s + self.seq_len] for s in starts]).astype(np.int64)
        y = np.stack([data[s + 1:s + 1 + self.seq_len] for s in starts]).astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)

    def train_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of micro step `micro` of `step`: (micro_batch_size, seq_len) int64 each, y = x shifted by one."""
        rng = np.random.default_rng([self.seed, self.rank, step, micro])
        return self._windows(self.train, rng, self.micro_batch_size)

    def val_batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of validation micro batch `i` (the same at every evaluation), as `train_batch`."""
        # Validation batches are the same for every evaluation; ranks split them.
        rng = np.random.default_rng([self.seed, 10**6 + i * self.world_size + self.rank])
        return self._windows(self.val, rng, self.micro_batch_size)
