"""Prepared token shards: Ray Data tokenization, per-rank streaming, formats, bad input.

The tests that exercise Ray use the session's local Ray (conftest `ray_local`); the rest
run the same per-item code in-process (`use_ray=False`) to keep the file well under 90 s.
Run with: flock /tmp/raybig-ray.lock pytest tests/test_data_prepare.py
"""

from __future__ import annotations

import errno
import json
import os
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raybig.data import prepare as prep
from raybig.data.prepare import DataWriteError, PrepareOptions, prepare
from raybig.data.shards import IGNORE_INDEX, ShardBatches, open_index
from raybig.data.sources import BadRecordError, DataError
from raybig.tokenizer import BYTES


@pytest.fixture(scope="module")
def ray_data(ray_local):
    """The session's local Ray (an earlier test may have started it; a second `ray.init` would fail)."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield


def _docs(uri: str, split: str = "train") -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Every document of a split as (tokens, mask), read straight from the shard files."""
    index = open_index(uri)
    dtype = np.dtype(index["dtype"])
    out = []
    for s in index["splits"][split]["shards"]:
        toks = np.fromfile(f"{uri}/{s['tokens_file']}", dtype)
        mask = np.fromfile(f"{uri}/{s['mask_file']}", np.uint8) if s["mask_file"] else None
        offs = np.fromfile(f"{uri}/{s['docs_file']}", "<i8")
        assert offs[-1] == len(toks) == s["tokens"]
        for a, b in zip(offs[:-1], offs[1:], strict=True):
            out.append((toks[a:b], None if mask is None else mask[a:b]))
    return out


def _all_texts(uri: str) -> list[str]:
    return sorted(BYTES.decode(t.tolist()) for split in ("train", "val") for t, _ in _docs(uri, split))


def _write_jsonl(path, records) -> str:
    with open(path, "w") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


# --- Ray Data: text, jsonl, parquet -------------------------------------------------------------


def test_prepare_text_files_with_ray_decodes_back(ray_data, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    texts = {f"f{i}.txt": f"document {i}\n" + "héllo wörld\n" * (40 + i) for i in range(6)}
    for name, t in texts.items():
        (src / name).write_text(t)
    (src / "empty.txt").write_bytes(b"")
    (src / "bad.txt").write_bytes(b"good start \xff\xfe then fine\n")
    seen = []
    s = prepare(PrepareOptions(path=str(src), val_fraction=0.2, shard_tokens=500), str(tmp_path / "out"),
                progress=seen.append)
    assert not s.reused and s.source_files == 8 and s.empty_files == 1 and s.replaced_bytes == 2
    assert s.train.documents + s.val.documents == 7 and s.val.documents >= 1
    assert len(open_index(s.uri)["splits"]["train"]["shards"]) > 1  # small shard_tokens: several shards
    expected = sorted([t + "\n\n" for t in texts.values()] + ["good start \ufffd\ufffd then fine\n\n\n"])
    assert _all_texts(s.uri) == expected
    assert seen and seen[-1].tokens == s.tokens and seen[-1].tokens_per_s > 0
    assert s.tokens == sum(len(t.encode()) for t in expected)  # byte tokenizer: tokens = UTF-8 bytes
    assert not [p for p in os.listdir(tmp_path / "out") if p.startswith(".tmp")]


def test_prepare_jsonl_and_parquet_with_ray(ray_data, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    recs = [{"text": f"record {i}: " + "x" * (i % 7), "id": i} for i in range(60)]
    _write_jsonl(src / "a.jsonl", recs[:30])
    pq.write_table(pa.Table.from_pylist(recs[30:]), src / "b.parquet", row_group_size=10)
    # Large files are split into line-aligned byte ranges; the line numbers must stay exact.
    s = prepare(PrepareOptions(path=str(src), chunk_bytes=200, val_fraction=0.1), str(tmp_path / "out"))
    assert _all_texts(s.uri) == sorted(r["text"] + "\n\n" for r in recs)
    assert s.source_bytes_used == s.source_bytes and not s.truncated

    _write_jsonl(src / "a.jsonl", recs[:12] + ["{not json"] + recs[12:30])
    with pytest.raises(BadRecordError, match=r"a\.jsonl:13: not JSON"):
        prepare(PrepareOptions(path=str(src), chunk_bytes=200), str(tmp_path / "out"))


# --- streaming ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("textset")
    rng = np.random.default_rng(0)
    for i in range(4):
        (root / f"t{i}.txt").write_text("".join(chr(c) for c in rng.integers(97, 123, 30_000)))
    s = prepare(PrepareOptions(path=str(root / "*.txt"), shard_tokens=20_000, chunk_bytes=12_000),
                str(root / "out"), use_ray=False)
    return s


def test_each_rank_reads_only_its_share(text_set):
    block = 4096
    world = 3
    total = 0
    for rank in range(world):
        b = ShardBatches(text_set.uri, 32, 4, seed=1, rank=rank, world_size=world, block_bytes=block)
        for step in range(40):
            b.get(step, 0)
        lo, hi = b.share
        shards = np.searchsorted(b.train.starts, [lo, hi - 1], side="right")
        slack = 2 * block * int(shards[1] - shards[0] + 1)
        read = b.bytes_read()["train"]
        assert 0 < read <= b.share_bytes() + slack, (rank, read, b.share_bytes())
        total += b.share_bytes()
        # Every window lies inside the share.
        for f in b.train._files.values():
            assert f.touched
    assert total == text_set.train.tokens * 2  # uint16: shares partition the training tokens


def test_batches_deterministic_resumable_and_remote(text_set):
    a = ShardBatches(text_set.uri, 32, 4, seed=7, rank=1, world_size=2)
    first = [a.get(s, m).x for s in range(5) for m in range(2)]
    b = ShardBatches(text_set.uri, 32, 4, seed=7, rank=1, world_size=2)  # "resumed" at step 3
    assert np.array_equal(b.get(3, 1).x, first[7]) and np.array_equal(b.get(4, 0).x, first[8])
    assert not np.array_equal(ShardBatches(text_set.uri, 32, 4, seed=7, rank=0, world_size=2).get(3, 1).x,
                              first[7])
    bt = a.get(0, 0)
    assert bt.x.shape == bt.y.shape == (4, 32) and bt.x.dtype == np.int64
    assert np.array_equal(bt.x[:, 1:], bt.y[:, :-1])
    x, y = a.train_batch(0, 0)
    assert np.array_equal(x.numpy(), bt.x) and a.val_batch(0)[0].shape == (4, 32)

    # The same set on an object store (fsspec memory://) is range-read and gives the same batches.
    mem = fsspec.filesystem("memory")
    for name in os.listdir(text_set.uri):
        mem.pipe(f"/prepared/{name}", open(os.path.join(text_set.uri, name), "rb").read())
    r = ShardBatches("memory://prepared", 32, 4, seed=7, rank=1, world_size=2, block_bytes=4096)
    assert np.array_equal(r.get(3, 1).x, first[7])
    mm = ShardBatches(text_set.uri, 32, 4, seed=7, rank=1, world_size=2, local_io="mmap")
    assert np.array_equal(mm.get(3, 1).x, first[7])
    assert r.bytes_read()["train"] <= 8 * 4096 * 2


def test_corpus_smaller_than_one_sequence_per_rank(text_set):
    with pytest.raises(DataError, match="corpus too small"):
        ShardBatches(text_set.uri, 40_000, 1, seed=0, rank=0, world_size=3)


# --- instruction / chat ---------------------------------------------------------------------


def test_instruction_mask_is_response_only_and_packing_keeps_examples_apart(tmp_path):
    recs = [{"prompt": f"add {i} and {i + 1}", "response": str(2 * i + 1)} for i in range(40)]
    path = _write_jsonl(tmp_path / "inst.jsonl", recs)
    s = prepare(PrepareOptions(path=path, format="instruction", val_fraction=0.1), str(tmp_path / "out"),
                use_ray=False)
    docs = {BYTES.decode(t.tolist()): m for split in ("train", "val") for t, m in _docs(s.uri, split)}
    prompt = "### Instruction:\nadd 3 and 4\n\n### Response:\n"
    m = docs[prompt + "7\n\n"]
    assert m.tolist() == [0] * len(prompt) + [1] * 3  # the loss sees "7\n\n" only

    b = ShardBatches(s.uri, 128, 4, seed=0, rank=0, world_size=1)
    bt = b.get(0, 0)
    assert (bt.doc_ids.max(axis=1) >= 1).all()  # rows hold more than one example
    for row in range(4):
        for k in range(int(bt.doc_ids[row].max()) + 1):
            sel = bt.doc_ids[row] == k
            x, y, p = bt.x[row, sel], bt.y[row, sel], bt.positions[row, sel]
            assert p.tolist() == list(range(sel.sum()))  # positions restart per example
            text = BYTES.decode(x.tolist())
            assert text.startswith("### Instruction:\nadd ") and text.count("### Instruction") == 1
            target = BYTES.decode([t for t in y.tolist() if t != IGNORE_INDEX])
            answer = text.split("### Response:\n")[1] + "\n"  # x lacks the last target token
            assert target == answer and target[:-2].isdigit()
            assert (y[: len(text.split("### Response:\n")[0]) + len("### Response:\n") - 1]
                    == IGNORE_INDEX).all()
        assert (bt.y[row, bt.doc_ids[row] == -1] == IGNORE_INDEX).all()
    again = ShardBatches(s.uri, 128, 4, seed=0, rank=0, world_size=1).get(0, 0)
    assert np.array_equal(again.x, bt.x) and np.array_equal(again.doc_ids, bt.doc_ids)


def _hf_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    words = "hi hello what is two plus three five thanks bye the answer".split()
    tk.train_from_iterator([" ".join(words)] * 3, trainers.WordLevelTrainer(
        special_tokens=["[UNK]", "<|user|>", "<|assistant|>", "<|end|>"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="<|end|>")
    hf.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    return hf


def test_chat_with_hf_chat_template_masks_assistant_turns(tmp_path):
    hf = _hf_tokenizer()
    conv = {"messages": [{"role": "user", "content": "what is two plus three"},
                         {"role": "assistant", "content": "five"},
                         {"role": "user", "content": "thanks"},
                         {"role": "assistant", "content": "bye"}]}
    path = _write_jsonl(tmp_path / "chat.jsonl", [conv] * 4)
    s = prepare(PrepareOptions(path=path, format="chat", val_fraction=0.0), str(tmp_path / "out"), hf,
                use_ray=False)
    assert open_index(s.uri)["tokenizer"]["name"] != "bytes"
    toks, mask = _docs(s.uri)[0]
    trained = hf.decode(toks[mask == 1].tolist())
    assert trained.split() == ["five", "<|end|>", "bye", "<|end|>"]
    assert hf.decode(toks.tolist()).split()[:2] == ["<|user|>", "what"]

    # The byte tokenizer has no chat template: turns get "### role:" headers, assistant text trains.
    s = prepare(PrepareOptions(path=path, format="chat", val_fraction=0.0), str(tmp_path / "out2"),
                use_ray=False)
    toks, mask = _docs(s.uri)[0]
    assert BYTES.decode(toks[mask == 1].tolist()) == "five\n\nbye\n\n\n\n"
    assert BYTES.decode(toks.tolist()).startswith("### user:\nwhat is two plus three\n\n### assistant:\n")


# --- reuse, limits -------------------------------------------------------------------------


def test_unchanged_sources_reuse_and_touched_source_reprepares(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("some text " * 100)
    opts = PrepareOptions(path=str(src), val_fraction=0.0)
    out = tmp_path / "out"
    first = prepare(opts, str(out), use_ray=False)
    index = os.path.join(first.uri, "index.json")
    before = (sorted(os.listdir(out)), sorted(os.listdir(first.uri)), os.stat(index).st_mtime_ns)
    again = prepare(opts, str(out), use_ray=False)
    assert again.reused and again.uri == first.uri and again.tokens == first.tokens
    assert (sorted(os.listdir(out)), sorted(os.listdir(first.uri)), os.stat(index).st_mtime_ns) == before
    assert prep.find_prepared(opts, str(out)) == first.uri

    st = os.stat(src)
    os.utime(src, (st.st_atime, st.st_mtime + 5))
    assert prep.find_prepared(opts, str(out)) is None
    third = prepare(opts, str(out), use_ray=False)
    assert not third.reused and third.uri != first.uri and len(os.listdir(out)) == 2


def test_max_tokens_is_explicit_and_reported(tmp_path):
    for i in range(10):
        (tmp_path / f"{i}.txt").write_text(f"{i}" * 1000)
    s = prepare(PrepareOptions(path=str(tmp_path / "*.txt"), max_tokens=3500, val_fraction=0.0),
                str(tmp_path / "out"), use_ray=False)
    assert s.truncated and s.tokens <= 3500 and s.train.documents == 3
    assert 0 < s.corpus_fraction_used < 1 and s.max_tokens == 3500


# --- bad input -----------------------------------------------------------------------------


def test_bad_jsonl_records_fail_with_file_and_line_or_are_counted(tmp_path):
    recs = [{"prompt": "p", "response": "r"}] * 5
    path = _write_jsonl(tmp_path / "d.jsonl", [*recs[:2], "not json", '["a list"]', {"prompt": "p"},
                                               *recs[2:], {"prompt": "p", "response": 3}])
    out = str(tmp_path / "out")
    with pytest.raises(BadRecordError, match=r"d\.jsonl:3: not JSON"):
        prepare(PrepareOptions(path=path, format="instruction"), out, use_ray=False)
    s = prepare(PrepareOptions(path=path, format="instruction", on_bad_record="skip"), out, use_ray=False)
    assert s.bad_records == 4 and s.documents == 5
    assert [e.split(": ")[0].rsplit(":", 1)[1] for e in s.bad_examples] == ["3", "4", "5", "9"]
    assert "no field 'response'" in s.bad_examples[2] and "not a string" in s.bad_examples[3]
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]  # the failed run left nothing


def test_template_needing_a_missing_field_is_a_spec_error(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}] * 3)
    opts = PrepareOptions(path=path, format="instruction",
                          prompt_template="{context}\n### Instruction:\n{prompt}\n### Response:\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: data\.prompt_template needs field 'context'") as e:
        prep.preflight(opts)
    assert e.value.exit_code == 2
    with pytest.raises(DataError, match="context"):
        prepare(opts, str(tmp_path / "out"), use_ray=False)
    with pytest.raises(DataError, match="positional"):
        PrepareOptions(format="instruction", prompt_template="{}")


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError, match=r"matched no files") as e:
        prepare(PrepareOptions(path=str(tmp_path / "nothing-*.jsonl")), str(tmp_path / "out"), use_ray=False)
    assert e.value.exit_code == 2


def test_only_empty_files_and_too_few_documents(tmp_path):
    (tmp_path / "e1.txt").write_bytes(b"")
    (tmp_path / "e2.txt").write_bytes(b"")
    with pytest.raises(DataError, match="no training documents .*2 empty files"):
        prepare(PrepareOptions(path=str(tmp_path / "*.txt"), val_fraction=0.0), str(tmp_path / "o"),
                use_ray=False)
    (tmp_path / "one.txt").write_text("only one document")
    with pytest.raises(DataError, match="too few documents"):
        prepare(PrepareOptions(path=str(tmp_path / "*.txt")), str(tmp_path / "o"), use_ray=False)


def test_disk_full_mid_write_commits_nothing(tmp_path, monkeypatch):
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text("abc " * 500)
    calls = {"n": 0}
    real = prep._SplitWriter._write

    def full_disk(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(prep._SplitWriter, "_write", full_disk)
    opts = PrepareOptions(path=str(tmp_path / "*.txt"), shard_tokens=1000)
    out = tmp_path / "out"
    with pytest.raises(DataWriteError, match="No space left.*nothing was committed"):
        prepare(opts, str(out), use_ray=False)
    assert os.listdir(out) == []
    assert prep.find_prepared(opts, str(out)) is None
    monkeypatch.setattr(prep._SplitWriter, "_write", real)
    assert not prepare(opts, str(out), use_ray=False).reused


def test_half_written_set_is_never_opened(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "train-00000.bin").write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match="not a complete prepared data set"):
        ShardBatches(str(tmp_path / "x"), 8, 1, 0, 0, 1)


def test_reading_the_stdlib_corpus_in_process_is_fast(tmp_path):
    t0 = time.perf_counter()
    s = prepare(PrepareOptions(), str(tmp_path / "out"), use_ray=False)
    assert s.source_files > 50 and s.tokens > 1_000_000 and time.perf_counter() - t0 < 30
    b = ShardBatches(s.uri, 128, 8, seed=0, rank=1, world_size=2)
    assert b.get(0, 0).x.shape == (8, 128)


def test_one_large_text_file_is_cut_into_documents_at_lines(tmp_path):
    rng = np.random.default_rng(3)
    text = "".join(f"line {i} " + "ab" * int(rng.integers(0, 40)) + "\n" for i in range(200))
    (tmp_path / "big.txt").write_text(text)
    s = prepare(PrepareOptions(path=str(tmp_path / "big.txt"), text_doc_bytes=1000, chunk_bytes=2500,
                               val_fraction=0.2), str(tmp_path / "out"), use_ray=False)
    docs = [BYTES.decode(t.tolist()) for split in ("train", "val") for t, _ in _docs(s.uri, split)]
    assert s.val.documents >= 1 and len(docs) >= len(text) // 1000
    assert sum(map(len, docs)) == len(text) + 2  # the separator follows the file's last piece only
    assert all(d.endswith("\n") and d in text + "\n\n" and len(d) <= 1002 for d in docs)
    assert sum(d.endswith("\n\n") for d in docs) == 1
