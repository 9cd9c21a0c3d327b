"""Prepare once: tokenize sources in parallel with Ray Data into committed token shards.

Layout of a prepared set, `<out_uri>/<hash>/` (hash of sources+sizes+mtimes, tokenizer, options):

    train-00000.bin        tokens, flat, uint16 (vocab <= 65536) or uint32, little-endian
    train-00000.mask.bin   uint8 loss mask, 1 = train on this token (instruction/chat only)
    train-00000.docs.bin   int64 document offsets into the shard, n_docs + 1 values (0 ... tokens)
    val-00000.*            the same for the validation split
    index.json             written last: shards, counts, tokenizer, sources, options, summary

A set is *complete* iff `index.json` exists. Locally everything is written under a temporary
folder which is renamed into place after the index is written; on object stores (no atomic rename)
the index is the commit marker. So a crash or a full disk never leaves a set that `open` accepts.

Documents never span shards. The validation split is by whole documents: a document goes to `val`
when a seeded hash of (its file's path relative to the sources' common folder, byte offset of its
item, its ordinal in the item) falls below `val_fraction`; if that picks none, the last document
goes to `val` (so a tiny corpus still has one). Changing `split_seed` reshuffles the split without
anything else changing; moving the corpus to another folder does not change it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import fsspec
import numpy as np

from raybig.data.formats import (
    DEFAULT_INSTRUCTION_TEMPLATE,
    RecordError,
    TokenizerAdapter,
    adapt_tokenizer,
    render_chat,
    render_instruction,
    template_fields,
)
from raybig.data.sources import (
    BadRecordError,
    DataError,
    SourceFile,
    WorkItem,
    list_sources,
    plan_work,
    read_item,
)
from raybig.spec.models import DataSpec

FORMAT_VERSION = 1
INDEX = "index.json"


class DataWriteError(DataError):
    """Writing a prepared set failed (disk full, permissions); nothing was committed; exit 1."""

    exit_code = 1


@dataclass(frozen=True)
class PrepareOptions:
    """What to prepare and how (every field is part of the prepared set's hash).

    Attributes:
        path: source path/URI/glob/directory, `stdlib://`, or a tuple of them.
        format: `text` (whole texts, loss on every token), `instruction` (template + response,
            loss on the response), `chat` (messages rendered by the chat template, loss on
            assistant turns).
        file_type: `auto` (by extension: .jsonl/.ndjson/.json, .parquet, else text), or forced.
        text_field: field holding the text of a jsonl/parquet record (format `text`).
        prompt_template: `str.format` template of the prompt; `{name}` fields come from the record.
        response_field: field holding the response (format `instruction`).
        messages_field: field holding `[{"role", "content"}, ...]` (format `chat`).
        val_fraction: share of documents held out for validation, in [0, 0.5).
        split_seed: seeds the per-document split hash.
        max_tokens: stop after this many tokens in total (whole documents); None = the whole corpus.
        on_bad_record: `fail` raises `BadRecordError` at the first bad record; `skip` counts it.
        shard_tokens: a shard is closed at the first document boundary past this many tokens.
        chunk_bytes: text/jsonl files are tokenized in line-aligned byte ranges of about this
            size (one Ray Data task each); for plain text files each range is one document.
        separator: text appended to every document when the tokenizer has no EOS token (bytes).
        text_doc_bytes: a plain text file is cut at line boundaries into documents of about this
            many bytes (16 KiB: so even one small file has a validation split); the separator/EOS follows
            only the file's last piece, so a file's documents concatenate back to the file.
    """

    path: str | tuple[str, ...] = "stdlib://"
    format: Literal["text", "instruction", "chat"] = "text"
    file_type: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = "text"
    prompt_template: str = DEFAULT_INSTRUCTION_TEMPLATE
    response_field: str = "response"
    messages_field: str = "messages"
    val_fraction: float = 0.05
    split_seed: int = 0
    max_tokens: int | None = None
    on_bad_record: Literal["fail", "skip"] = "fail"
    shard_tokens: int = 1 << 26
    chunk_bytes: int = 16 << 20
    separator: str = "\n\n"
    text_doc_bytes: int = 1 << 14

    def __post_init__(self) -> None:
        if isinstance(self.path, list):
            object.__setattr__(self, "path", tuple(self.path))
        if self.format not in ("text", "instruction", "chat"):
            raise DataError(f"data.format must be text, instruction or chat, not {self.format!r}")
        if self.on_bad_record not in ("fail", "skip"):
            raise DataError(f"data.on_bad_record must be fail or skip, not {self.on_bad_record!r}")
        if not 0.0 <= self.val_fraction < 0.5:
            raise DataError(f"data.val_fraction must be in [0, 0.5), not {self.val_fraction}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise DataError("data.max_tokens must be positive (or unset for the whole corpus)")
        if self.shard_tokens < 1 or self.chunk_bytes < 1 or self.text_doc_bytes < 1:
            raise DataError("data.shard_tokens, data.chunk_bytes and data.text_doc_bytes must be positive")
        if self.format == "instruction":
            try:
                template_fields(self.prompt_template)
            except ValueError as e:
                raise DataError(f"data.prompt_template: {e}") from None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PrepareOptions:
        """Options from a mapping such as `spec.data.model_dump()`.

        Keys that are not fields (`seq_len`, `tokenizer`, ...) and None values are ignored; missing
        fields take the defaults above.

        Raises:
            DataError: a value is out of range (see the attributes).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names and v is not None})

    @classmethod
    def from_spec(cls, data: DataSpec) -> PrepareOptions:
        """The options a train spec's `data` section asks for (the one place the two meet).

        Fields that do not apply to the spec's kind of example keep their defaults, so they never
        change the prepared set's hash.
        """
        kind = data.example_format()
        return cls(
            path=data.path if isinstance(data.path, str) else tuple(data.path),
            format=kind,
            file_type=data.format or "auto",
            text_field=data.text_field or "text",
            prompt_template=data.instruction_template() if kind == "instruction" else DEFAULT_INSTRUCTION_TEMPLATE,
            response_field=data.response_field or "response",
            messages_field=data.messages_field or "messages",
            val_fraction=data.val_fraction,
            split_seed=data.split_seed,
            max_tokens=data.token_limit(),
            on_bad_record=data.on_bad_record,
            shard_tokens=data.shard_tokens,
        )

    def columns(self) -> list[str]:
        """The record fields this format reads (parquet reads only these columns)."""
        if self.format == "text":
            return [self.text_field]
        if self.format == "instruction":
            return [*template_fields(self.prompt_template), self.response_field]
        return [self.messages_field]


@dataclass
class PrepareProgress:
    """Progress of a running `prepare`, passed to its callback after each work item.

    Attributes:
        items_done, items_total: work items (file ranges / row groups) finished and planned.
        documents, tokens: kept so far (both splits).
        bytes_done, bytes_total: source bytes of finished items, and of all sources.
        elapsed_s: seconds since tokenizing started.
        tokens_per_s: tokens / elapsed_s.
    """

    items_done: int
    items_total: int
    documents: int
    tokens: int
    bytes_done: int
    bytes_total: int
    elapsed_s: float
    tokens_per_s: float


@dataclass
class SplitSummary:
    """Documents and tokens of one split."""

    documents: int = 0
    tokens: int = 0


@dataclass
class PrepareSummary:
    """What `prepare` did (stored in `index.json`, so a reused set reports the same figures).

    Attributes:
        uri: the prepared set's folder URI (`<out_uri>/<hash>`).
        hash: the set's name: sha256 (first 16 hex digits) of sources, tokenizer and options.
        reused: True when a complete set with this hash already existed and nothing was done.
        train, val: documents and tokens of each split.
        bad_records: records skipped as malformed (`on_bad_record: skip`).
        bad_examples: up to 20 `file:line: reason` strings of those.
        empty_files: source files of size 0 (skipped).
        empty_documents: records/texts that tokenized to nothing (skipped).
        replaced_bytes: invalid UTF-8 bytes replaced by U+FFFD.
        source_files, source_bytes: all listed sources.
        source_bytes_used: bytes of the work items read (== source_bytes unless `max_tokens` cut).
        truncated: True when `max_tokens` stopped before the end of the corpus.
        max_tokens: the limit that was in force (None = whole corpus).
        seconds: wall time of tokenizing and writing; tokens_per_s the resulting rate.
    """

    uri: str
    hash: str
    reused: bool = False
    train: SplitSummary = field(default_factory=SplitSummary)
    val: SplitSummary = field(default_factory=SplitSummary)
    bad_records: int = 0
    bad_examples: list[str] = field(default_factory=list)
    empty_files: int = 0
    empty_documents: int = 0
    replaced_bytes: int = 0
    source_files: int = 0
    source_bytes: int = 0
    source_bytes_used: int = 0
    truncated: bool = False
    max_tokens: int | None = None
    seconds: float = 0.0
    tokens_per_s: float = 0.0

    @property
    def documents(self) -> int:
        """Documents in both splits."""
        return self.train.documents + self.val.documents

    @property
    def tokens(self) -> int:
        """Tokens in both splits."""
        return self.train.tokens + self.val.tokens

    @property
    def corpus_fraction_used(self) -> float:
        """Share of the source bytes that were tokenized (1.0 unless `max_tokens` cut)."""
        return self.source_bytes_used / self.source_bytes if self.source_bytes else 1.0

    @classmethod
    def from_json(cls, d: dict[str, Any], uri: str, reused: bool) -> PrepareSummary:
        """Rebuild from the `summary` object of an `index.json`."""
        d = dict(d, uri=uri, reused=reused)
        d["train"], d["val"] = SplitSummary(**d["train"]), SplitSummary(**d["val"])
        return cls(**d)


def prepared_hash(options: PrepareOptions, sources: Sequence[SourceFile], tok: TokenizerAdapter) -> str:
    """The name of a prepared set: 16 hex digits of sha256 over sources, tokenizer and options."""
    payload = {"version": FORMAT_VERSION, "sources": [s.to_json() for s in sources],
               "tokenizer": tok.fingerprint, "options": asdict(options)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# --- tokenizing one work item (runs in Ray Data tasks, or in-process) ------------------------


def _end_ids(options: PrepareOptions, tok: TokenizerAdapter) -> np.ndarray:
    if tok.eos_id is not None:
        return np.array([tok.eos_id], np.int64)
    return tok.encode(options.separator) if options.separator else np.zeros(0, np.int64)


def _is_val(key: str, start: int, n: int, options: PrepareOptions) -> np.ndarray:
    if options.val_fraction <= 0:
        return np.zeros(n, bool)
    out = np.empty(n, bool)
    for j in range(n):
        h = hashlib.blake2b(f"{options.split_seed}:{key}:{start}:{j}".encode(), digest_size=8).digest()
        out[j] = int.from_bytes(h, "little") / 2.0**64 < options.val_fraction
    return out


def _cut_lines(text: str, size: int) -> list[str]:
    """`text` in pieces of about `size` characters, cut after a newline where there is one."""
    if len(text) <= size:
        return [text]
    out, pos = [], 0
    while pos < len(text):
        stop = pos + size
        if stop < len(text):
            nl = text.rfind("\n", pos, stop)
            stop = nl + 1 if nl >= pos else stop
        out.append(text[pos:stop])
        pos = stop
    return out


def tokenize_item(item: WorkItem, options: PrepareOptions, tok: TokenizerAdapter) -> dict[str, Any]:
    """Read and tokenize one work item.

    Returns:
        A dict: `tokens` (all kept documents concatenated, the shard dtype), `mask` (uint8, same
        length, or None for `text`), `doc_lens` (int64 per document, in order), `is_val` (bool per
        document), `bad` (list of `(line within item, reason)`), `n_lines`, `replaced_bytes`,
        `empty_documents`, `bytes` (the item's source bytes).
    """
    read = read_item(item, options.columns())
    end = _end_ids(options, tok)
    toks: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    bad: list[tuple[int, str]] = []
    empty = 0
    if options.format == "text":
        texts: list[str] = []
        ends: list[bool] = []  # does the separator/EOS follow this document?
        for r in read.records:
            if r.error is not None:
                bad.append((r.line, r.error))
            elif isinstance(r.value, str):
                pieces = _cut_lines(r.value, options.text_doc_bytes)
                texts += pieces
                ends += [False] * (len(pieces) - 1) + [item.end >= item.file_size]
            elif options.text_field not in r.value or not isinstance(r.value[options.text_field], str):
                bad.append((r.line, f"record has no string field {options.text_field!r}"))
            else:
                texts.append(r.value[options.text_field])
                ends.append(True)
        for ids, with_end in zip(tok.encode_batch(texts), ends, strict=True):
            if len(ids) == 0:
                empty += 1
                continue
            toks.append(np.concatenate([ids, end]) if len(end) and with_end else ids)
    else:
        for r in read.records:
            if r.error is not None:
                bad.append((r.line, r.error))
                continue
            try:
                if options.format == "instruction":
                    ids, m = render_instruction(r.value, options.prompt_template, options.response_field,
                                                tok, end)
                else:
                    ids, m = render_chat(r.value, options.messages_field, tok, end)
            except RecordError as e:
                bad.append((r.line, str(e)))
                continue
            toks.append(ids)
            masks.append(m)
    dtype = tok.dtype
    doc_lens = np.array([len(t) for t in toks], np.int64)
    return {
        "tokens": np.concatenate(toks).astype(dtype) if toks else np.zeros(0, dtype),
        "mask": (np.concatenate(masks) if masks else np.zeros(0, np.uint8)) if options.format != "text"
        else None,
        "doc_lens": doc_lens,
        "is_val": _is_val(item.key, item.start, len(doc_lens), options),
        "bad": bad,
        "n_lines": read.n_lines,
        "replaced_bytes": read.replaced_bytes,
        "empty_documents": empty,
        "bytes": item.end - item.start if item.kind != "parquet" else 0,
    }


class _Boxed:
    """A result kept opaque to Arrow (a dict would become a struct of lists)."""

    __slots__ = ("value",)

    def __init__(self, value: dict[str, Any]):
        self.value = value


def _ray_batch_fn(batch: dict[str, np.ndarray], items: list[WorkItem], options: PrepareOptions,
                  tok: TokenizerAdapter) -> dict[str, np.ndarray]:
    # A row names a bundle of work items by index; results go back as Python objects (Ray Data
    # carries them in its own object column), so ragged arrays need no Arrow schema.
    idx, res = [], []
    for bundle in batch["bundle"]:
        for k in bundle:
            idx.append(int(k))
            res.append(_Boxed(tokenize_item(items[int(k)], options, tok)))
    return {"idx": np.array(idx, dtype=np.int64), "result": np.array(res + [None], dtype=object)[:-1]}


def _bundles(items: list[WorkItem], sources: Sequence[SourceFile], target: int) -> list[list[WorkItem]]:
    """Consecutive items grouped to about `target` source bytes, so many small files make few tasks."""
    out: list[list[WorkItem]] = []
    cur: list[WorkItem] = []
    size = 0
    for it in items:
        cur.append(it)
        size += it.end - it.start if it.kind != "parquet" else sources[it.file].size
        if size >= target:
            out.append(cur)
            cur, size = [], 0
    if cur:
        out.append(cur)
    return out


def _results(items: list[WorkItem], sources: Sequence[SourceFile], options: PrepareOptions,
             tok: TokenizerAdapter, use_ray: bool) -> Iterator[tuple[WorkItem, dict[str, Any]]]:
    """Tokenized items in plan order (Ray Data runs them in parallel; we re-order)."""
    if not use_ray:
        for it in items:
            yield it, tokenize_item(it, options, tok)
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    try:
        bundles = _bundles(items, sources, options.chunk_bytes)
        pos = {(it.file, it.part): k for k, it in enumerate(items)}
        ds: ray.data.Dataset = ray.data.from_items(
            [{"bundle": [pos[(it.file, it.part)] for it in b]} for b in bundles],
            override_num_blocks=len(bundles))
        ds = ds.map_batches(_ray_batch_fn,  # type: ignore[arg-type]  # fn_kwargs fill the extra args
                            batch_size=1, batch_format="numpy", num_cpus=1,
                            fn_kwargs={"items": items, "options": options, "tok": tok})
        waiting: dict[int, tuple[WorkItem, dict[str, Any]]] = {}
        nxt = 0
        for row in ds.iter_rows():
            k = int(row["idx"])
            waiting[k] = (items[k], row["result"].value)
            while nxt in waiting:
                yield waiting.pop(nxt)
                nxt += 1
    finally:
        ctx.enable_progress_bars = bars


# --- writing shards ----------------------------------------------------------------------------


class _SplitWriter:
    """Appends documents of one split into shards of about `shard_tokens` tokens.

    Holds back the last document appended (`pending`) so `finish` can hand it to the other split.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, split: str, shard_tokens: int,
                 dtype: np.dtype, with_mask: bool):
        self.fs, self.root, self.split, self.shard_tokens = fs, root, split, shard_tokens
        self.dtype, self.with_mask = dtype, with_mask
        self.shards: list[dict[str, Any]] = []
        self._fh: Any = None
        self._mh: Any = None
        self._lens: list[np.ndarray] = []
        self._cur = 0
        self.pending: tuple[np.ndarray, np.ndarray | None] | None = None
        self.documents = 0
        self.tokens = 0

    def append(self, tokens: np.ndarray, mask: np.ndarray | None, lens: np.ndarray) -> None:
        if len(lens) == 0:
            return
        offs = np.concatenate([[0], np.cumsum(lens)])
        if self.pending is not None:
            self._write(*self.pending, np.array([len(self.pending[0])]))
        cut = int(offs[-2])
        self._write(tokens[:cut], None if mask is None else mask[:cut], lens[:-1])
        self.pending = (tokens[cut:], None if mask is None else mask[cut:])

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}"
        self.shards.append({"tokens_file": f"{name}.bin", "docs_file": f"{name}.docs.bin",
                            "mask_file": f"{name}.mask.bin" if self.with_mask else None,
                            "tokens": 0, "documents": 0})
        self._fh = self.fs.open(f"{self.root}/{name}.bin", "wb")
        self._mh = self.fs.open(f"{self.root}/{name}.mask.bin", "wb") if self.with_mask else None
        self._lens, self._cur = [], 0

    def _write(self, tokens: np.ndarray, mask: np.ndarray | None, lens: np.ndarray) -> None:
        pos = 0
        while len(lens):
            if self._fh is None:
                self._open()
            cum = np.cumsum(lens)
            # Docs up to and including the one that reaches shard_tokens go in this shard.
            k = int(np.searchsorted(self._cur + cum, self.shard_tokens, side="left")) + 1
            k = min(k, len(lens))
            n = int(cum[k - 1])
            self._fh.write(np.ascontiguousarray(tokens[pos:pos + n], self.dtype).tobytes())
            if self._mh is not None and mask is not None:
                self._mh.write(np.ascontiguousarray(mask[pos:pos + n], np.uint8).tobytes())
            self._lens.append(lens[:k])
            self._cur += n
            self.documents += k
            self.tokens += n
            pos += n
            lens = lens[k:]
            if self._cur >= self.shard_tokens:
                self._close()

    def _close(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        if self._mh is not None:
            self._mh.close()
        lens = np.concatenate(self._lens) if self._lens else np.zeros(0, np.int64)
        offs = np.concatenate([[0], np.cumsum(lens)]).astype("<i8")
        with self.fs.open(f"{self.root}/{self.shards[-1]['docs_file']}", "wb") as fh:
            fh.write(offs.tobytes())
        self.shards[-1].update(tokens=int(offs[-1]), documents=len(lens))
        self._fh = self._mh = None

    def finish(self) -> None:
        if self.pending is not None:
            self._write(*self.pending, np.array([len(self.pending[0])]))
            self.pending = None
        self._close()

    def abort(self) -> None:
        for h in (self._fh, self._mh):
            try:
                if h is not None:
                    h.close()
            except Exception:  # noqa: BLE001 - already failing; the folder is removed next
                pass


def _fs_root(uri: str) -> tuple[fsspec.AbstractFileSystem, str, bool]:
    fs, _, (root,) = fsspec.get_fs_token_paths(uri)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return fs, root.rstrip("/"), proto in ("file", "local")


def find_prepared(options: PrepareOptions, out_uri: str, tokenizer: Any = None) -> str | None:
    """The URI of the complete prepared set for these options, or None when it must be prepared.

    Raises:
        DataError: the sources match no files.
    """
    tok = adapt_tokenizer(tokenizer)
    h = prepared_hash(options, list_sources(options.path), tok)
    fs, root, _ = _fs_root(out_uri)
    return f"{out_uri.rstrip('/')}/{h}" if fs.exists(f"{root}/{h}/{INDEX}") else None


def preflight(options: PrepareOptions, sources: Sequence[SourceFile] | None = None,
              tokenizer: Any = None) -> None:
    """Cheap checks before tokenizing (for `validate`): the first record renders.

    Raises:
        DataError: a path matches nothing, or the first record of the first non-empty file lacks a
            field the format or template needs (message: `file:line: ...`).
    """
    sources = list_sources(options.path) if sources is None else sources
    if options.format == "text":
        return
    tok = adapt_tokenizer(tokenizer)
    items = plan_work([s for s in sources if s.size][:1], options.file_type, min(options.chunk_bytes, 1 << 20))
    if not items:
        return
    read = read_item(items[0], options.columns())
    for r in read.records[:1]:
        if r.error is not None or isinstance(r.value, str):
            return  # a malformed line is a bad record, reported (or skipped) by prepare itself
        try:
            if options.format == "instruction":
                missing = [f for f in options.columns() if f not in r.value]
                if missing:
                    what = "data.prompt_template" if missing[0] != options.response_field \
                        else "data.response_field"
                    raise DataError(f"{items[0].uri}:{r.line}: {what} needs field {missing[0]!r}, which "
                                    f"the data lacks (record fields: {sorted(r.value)[:10]})")
                render_instruction(r.value, options.prompt_template, options.response_field, tok,
                                   np.zeros(0, np.int64))
            else:
                render_chat(r.value, options.messages_field, tok, np.zeros(0, np.int64))
        except RecordError as e:
            raise DataError(f"{items[0].uri}:{r.line}: {e}") from None


def prepare(options: PrepareOptions, out_uri: str, tokenizer: Any = None, *,
            progress: Callable[[PrepareProgress], None] | None = None,
            use_ray: bool = True) -> PrepareSummary:
    """Tokenize `options.path` into a prepared set under `out_uri`, or reuse a complete one.

    Args:
        options: what to read and how.
        out_uri: folder (local path or fsspec URI) holding prepared sets, one per hash.
        tokenizer: None (byte tokenizer), a raybig `Tokenizer`, or an HF tokenizer.
        progress: called after each work item with a `PrepareProgress`.
        use_ray: tokenize with Ray Data tasks (started on the current Ray cluster; Ray Data starts
            a local one if none is connected); False runs the same code in this process.

    Returns:
        The summary; `summary.uri` is the set to open with `raybig.data.shards.open_prepared`.

    Raises:
        DataError: no files match; the first record lacks a field the format needs; too few
            documents for the split.
        BadRecordError: a malformed record with `on_bad_record: fail` (message `file:line: why`).
        DataWriteError: writing failed (e.g. the disk filled up); nothing was committed.
    """
    tok = adapt_tokenizer(tokenizer)
    sources = list_sources(options.path)
    h = prepared_hash(options, sources, tok)
    fs, root, local = _fs_root(out_uri)
    final = f"{root}/{h}"
    uri = f"{out_uri.rstrip('/')}/{h}"
    if fs.exists(f"{final}/{INDEX}"):
        with fs.open(f"{final}/{INDEX}", "r") as fh:
            index = json.load(fh)
        return PrepareSummary.from_json(index["summary"], uri, reused=True)
    preflight(options, sources, tok)

    work = f"{root}/.tmp-{h}-{uuid.uuid4().hex[:8]}" if local else final
    if not local and fs.exists(final):
        fs.rm(final, recursive=True)  # a half-written set from a crash: never complete, so redo it
    fs.makedirs(work, exist_ok=True)
    items = plan_work(sources, options.file_type, options.chunk_bytes)
    summary = PrepareSummary(uri=uri, hash=h, source_files=len(sources),
                             source_bytes=sum(s.size for s in sources),
                             empty_files=sum(1 for s in sources if s.size == 0),
                             max_tokens=options.max_tokens)
    masked = options.format != "text"
    writers = {s: _SplitWriter(fs, work, s, options.shard_tokens, tok.dtype, masked) for s in ("train", "val")}
    try:
        _tokenize_and_write(items, sources, options, tok, use_ray, writers, summary, progress)
        tr, va = writers["train"], writers["val"]
        if options.val_fraction > 0 and va.documents == 0 and va.pending is None:
            if tr.documents == 0:
                raise DataError(f"data.path {options.path!r}: too few documents "
                                f"({tr.documents + (tr.pending is not None)}) for a validation split; add data, "
                                "or set data.val_fraction: 0 (no validation)")
            pend, tr.pending = tr.pending, None
            assert pend is not None
            va.append(pend[0], pend[1], np.array([len(pend[0])]))
        if tr.documents == 0 and tr.pending is None:
            raise DataError(f"data.path {options.path!r}: no training documents "
                            f"({summary.bad_records} bad records, {summary.empty_files} empty files)")
        for w in writers.values():
            w.finish()
        summary.train = SplitSummary(tr.documents, tr.tokens)
        summary.val = SplitSummary(va.documents, va.tokens)
        index = {"version": FORMAT_VERSION, "hash": h, "format": options.format,
                 "dtype": tok.dtype.str, "vocab_size": tok.vocab_size,
                 "tokenizer": {"name": tok.name, "fingerprint": tok.fingerprint},
                 "options": asdict(options), "sources": [s.to_json() for s in sources],
                 "splits": {s: {"documents": w.documents, "tokens": w.tokens, "shards": w.shards}
                            for s, w in writers.items()},
                 "summary": _summary_json(summary), "created": time.time()}
        with fs.open(f"{work}/{INDEX}", "w") as fh:
            json.dump(index, fh, indent=1)
        if local:
            _commit_local(fs, work, final)
    except BaseException as e:
        for w in writers.values():
            w.abort()
        if local or not fs.exists(f"{final}/{INDEX}"):
            try:
                fs.rm(work, recursive=True)
            except Exception:  # noqa: BLE001 - best effort; an index-less folder is never used
                pass
        if isinstance(e, OSError):
            raise DataWriteError(f"preparing data into {out_uri} failed ({e}); nothing was "
                                 "committed") from e
        raise
    return summary


def _commit_local(fs: fsspec.AbstractFileSystem, work: str, final: str) -> None:
    if os.path.isdir(final) and not os.path.exists(f"{final}/{INDEX}"):
        fs.rm(final, recursive=True)  # left by a crash mid-rename on some other filesystem
    try:
        os.rename(work, final)
    except OSError:
        # Another process committed the same hash first: its set is identical; keep it.
        if not os.path.exists(f"{final}/{INDEX}"):
            raise
        fs.rm(work, recursive=True)


def _summary_json(s: PrepareSummary) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    d.pop("uri")
    d.pop("reused")
    return d


def _tokenize_and_write(items: list[WorkItem], sources: Sequence[SourceFile], options: PrepareOptions,
                        tok: TokenizerAdapter, use_ray: bool, writers: dict[str, _SplitWriter],
                        summary: PrepareSummary, progress: Callable[[PrepareProgress], None] | None,
                        ) -> None:
    line_base: dict[int, int] = {}
    groups = Counter(it.file for it in items)
    t0 = time.perf_counter()
    budget = options.max_tokens
    kept_tokens = kept_docs = 0
    done = 0
    for it, res in _results(items, sources, options, tok, use_ray):
        base = line_base.get(it.file, 0)
        line_base[it.file] = base + res["n_lines"]
        summary.replaced_bytes += res["replaced_bytes"]
        summary.empty_documents += res["empty_documents"]
        # A parquet item is a row group: count its file's bytes evenly over its groups.
        size, n = sources[it.file].size, groups[it.file]
        summary.source_bytes_used += res["bytes"] if it.kind != "parquet" \
            else size * (it.part + 1) // n - size * it.part // n
        for line, why in res["bad"]:
            where = f"{it.uri}:{base + line}: {why}"
            if options.on_bad_record == "fail":
                raise BadRecordError(f"{where} (set data.on_bad_record: skip to count and skip these)")
            summary.bad_records += 1
            if len(summary.bad_examples) < 20:
                summary.bad_examples.append(where)
        lens, is_val, tokens, mask = res["doc_lens"], res["is_val"], res["tokens"], res["mask"]
        if budget is not None:
            cum = np.cumsum(lens)
            k = int(np.searchsorted(cum, budget - kept_tokens, side="right"))
            if k < len(lens):
                summary.truncated = True
                lens, is_val = lens[:k], is_val[:k]
                tokens = tokens[:int(cum[k - 1]) if k else 0]
                mask = None if mask is None else mask[:len(tokens)]
        offs = np.concatenate([[0], np.cumsum(lens)])
        for split, sel in (("train", ~is_val), ("val", is_val)):
            if not sel.any():
                continue
            idx = np.flatnonzero(sel)
            parts = [slice(int(offs[j]), int(offs[j + 1])) for j in idx]
            tk = np.concatenate([tokens[p] for p in parts])
            mk = None if mask is None else np.concatenate([mask[p] for p in parts])
            writers[split].append(tk, mk, lens[idx])
        kept_tokens += int(offs[-1])
        kept_docs += len(lens)
        done += 1
        elapsed = time.perf_counter() - t0
        if progress is not None:
            progress(PrepareProgress(done, len(items), kept_docs, kept_tokens, summary.source_bytes_used,
                                     summary.source_bytes, elapsed, kept_tokens / max(elapsed, 1e-9)))
        if summary.truncated:
            break
    summary.seconds = time.perf_counter() - t0
    summary.tokens_per_s = kept_tokens / max(summary.seconds, 1e-9)


LOCAL_PREPARE_BYTES = 32 << 20
"""`prepare_spec` tokenizes sources smaller than this in the calling process (a few seconds at most:
the quickstart's 5 MB takes 0.2 s), larger ones with Ray Data tasks."""

PREPARED_DIR = ".prepared"
"""Default folder of prepared sets under `storage.path` (one subfolder per fingerprint)."""


def prepared_root(data: DataSpec, storage_path: str) -> str:
    """Where a spec's prepared sets live: `data.prepared_path`, else `<storage_path>/.prepared`."""
    if data.prepared_path:
        return data.prepared_path
    return f"{storage_path.rstrip('/')}/{PREPARED_DIR}"


def prepare_spec(data: DataSpec, out_uri: str, tokenizer: Any = None, *, use_ray: bool | None = None,
                 progress: Callable[[PrepareProgress], None] | None = None) -> PrepareSummary:
    """`prepare` what a train spec's `data` names, or reuse the set whose fingerprint matches.

    Args:
        data: the spec's data section.
        out_uri: the folder of prepared sets (`prepared_root`).
        tokenizer: the run's tokenizer (None: bytes).
        use_ray: True: Ray Data tasks; False: this process; None: Ray Data from
            `LOCAL_PREPARE_BYTES` of sources up (a reused set costs one listing either way).
        progress: called after each work item.

    Raises:
        DataError, BadRecordError, DataWriteError: as `prepare`.
    """
    options = PrepareOptions.from_spec(data)
    if use_ray is None:
        use_ray = sum(s.size for s in list_sources(options.path)) >= LOCAL_PREPARE_BYTES
    return prepare(options, out_uri, tokenizer, progress=progress, use_ray=use_ray)


def describe(summary: PrepareSummary) -> str:
    """One line about a prepared set: reused, or what preparing it did (documents, tokens, bad records)."""
    s = summary
    shards = ""
    try:
        with fsspec.open(f"{s.uri}/{INDEX}", "r") as fh:
            splits = json.load(fh)["splits"]
        shards = f" in {sum(len(v['shards']) for v in splits.values())} shards"
    except (OSError, ValueError, KeyError):
        pass
    used = "" if not s.truncated else \
        f"; max_tokens used {100 * s.corpus_fraction_used:.1f}% of the corpus's bytes"
    bad = f"; {s.bad_records} bad records skipped"
    what = (f"{s.documents:,} documents, {s.tokens:,} tokens{shards} (train {s.train.tokens:,}, "
            f"val {s.val.tokens:,}){bad}{used}")
    if s.reused:
        return f"data: reusing prepared {s.uri} ({what}); sources, tokenizer and options unchanged"
    return f"data: prepared {s.uri}: {what} in {s.seconds:.1f} s ({s.tokens_per_s:,.0f} tokens/s)"
