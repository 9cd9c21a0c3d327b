"""Record formats (text, instruction, chat) and a small tokenizer adapter.

A *document* is what the prepared set stores between two boundaries: one text file (or one
line-aligned chunk of a large one), one `text_field` of a jsonl/parquet record, one instruction
example, or one chat conversation. Rendering a record gives `(tokens, mask)`: `mask` is 1 where the
loss is taken (every token for `text`; response tokens only for `instruction` and `chat`).

Any tokenizer with `encode(str) -> list[int]`, `vocab_size` and `name` works (raybig's byte
tokenizer is the default); a Hugging Face tokenizer (`transformers.AutoTokenizer`) works too, and
its `apply_chat_template` renders chat records.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_INSTRUCTION_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
"""Alpaca-style prompt; `{name}` placeholders are filled from the record's fields."""

# Used for tokenizers without a chat template (the byte tokenizer): one header per turn.
_FALLBACK_ROLE_HEADER = "### {role}:\n"


class RecordError(ValueError):
    """One record cannot be rendered (missing field, wrong type); the caller adds file and line."""


def template_fields(template: str) -> list[str]:
    """Names of the `{placeholders}` in a `str.format` template, in order of appearance.

    Raises:
        ValueError: the template is malformed (unbalanced braces) or uses positional `{}` fields.
    """
    names: list[str] = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        name = field.split(".")[0].split("[")[0]
        if not name or name.isdigit():
            raise ValueError(f"template {template!r} has a positional field; name every field")
        if name not in names:
            names.append(name)
    return names


@dataclass(frozen=True)
class TokenizerAdapter:
    """One view over raybig and Hugging Face tokenizers, picklable to Ray Data workers.

    Attributes:
        tok: the wrapped tokenizer.
        name: a readable name (`bytes`, or the HF `name_or_path`).
        vocab_size: ids are in `[0, vocab_size)`; decides uint16 (<= 65536) or uint32 shards.
        fingerprint: a sha256 hex of what decides the ids (vocabulary, merges, chat template).
        eos_id: appended after each document when set (HF `eos_token_id`); None for bytes.
    """

    tok: Any
    name: str
    vocab_size: int
    fingerprint: str
    eos_id: int | None
    is_hf: bool

    @property
    def dtype(self) -> np.dtype:
        """uint16 when every id fits in 16 bits, else uint32."""
        return np.dtype(np.uint16) if self.vocab_size <= 1 << 16 else np.dtype(np.uint32)

    def encode(self, text: str) -> np.ndarray:
        """Ids of `text` as a 1-D int64 array, without special tokens (BOS is never added)."""
        if self.name == "bytes" and not self.is_hf:
            # Fast path: the byte tokenizer is exactly the UTF-8 encoding.
            return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int64)
        if self.is_hf:
            return np.asarray(self.tok.encode(text, add_special_tokens=False), dtype=np.int64)
        return np.asarray(self.tok.encode(text), dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of each text; HF fast tokenizers encode the batch in parallel (Rust)."""
        if self.is_hf and texts:
            out = self.tok(list(texts), add_special_tokens=False)["input_ids"]
            return [np.asarray(ids, dtype=np.int64) for ids in out]
        return [self.encode(t) for t in texts]

    def chat_segments(self, messages: list[dict[str, Any]]) -> list[tuple[str, bool]]:
        r"""Render a conversation as `(text, is_response)` pieces whose concatenation is the whole chat.

        With an HF chat template, the piece before each assistant turn is the template applied to
        the turns so far with the generation prompt (masked), and the assistant piece is what the
        full render adds beyond it (trained on). Without a template: `### role:\n content\n\n`.

        Raises:
            RecordError: a message is not `{role, content}` with strings, or the template does not
                render prefixes consistently (its output for a prefix is not a prefix of the next).
        """
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise RecordError(f"messages[{i}] is not an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise RecordError("conversation has no assistant message to train on")
        if not (self.is_hf and getattr(self.tok, "chat_template", None)):
            segs: list[tuple[str, bool]] = []
            for m in messages:
                segs.append((_FALLBACK_ROLE_HEADER.format(role=m["role"]), False))
                segs.append((m["content"] + "\n\n", m["role"] == "assistant"))
            return segs
        segs, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self.tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            full = self.tok.apply_chat_template(messages[:i + 1], tokenize=False)
            if not head.startswith(done) or not full.startswith(head):
                raise RecordError("chat template does not render turn prefixes consistently")
            segs.append((head[len(done):], False))
            segs.append((full[len(head):], True))
            done = full
        tail = self.tok.apply_chat_template(messages, tokenize=False)
        if len(tail) > len(done):
            segs.append((tail[len(done):], False))
        return segs


def adapt_tokenizer(tok: Any = None) -> TokenizerAdapter:
    """Wrap `tok` (None = raybig's byte tokenizer; a raybig `Tokenizer`; or an HF tokenizer).

    Raises:
        TypeError: `tok` has no `encode` method.
    """
    if tok is None or (isinstance(tok, str) and tok == "bytes"):
        from raybig.tokenizer import BYTES

        tok = BYTES
    if isinstance(tok, TokenizerAdapter):
        return tok
    if not hasattr(tok, "encode"):
        raise TypeError(f"{type(tok).__name__} is not a tokenizer (no encode method)")
    is_hf = hasattr(tok, "apply_chat_template") and hasattr(tok, "get_vocab")
    if is_hf:
        name = str(getattr(tok, "name_or_path", "") or type(tok).__name__)
        vocab = max(len(tok), int(tok.vocab_size))
        h = hashlib.sha256()
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            h.update(backend.to_str().encode())
        else:
            h.update(repr(sorted(tok.get_vocab().items())).encode())
        h.update(repr(getattr(tok, "chat_template", None)).encode())
        eos = tok.eos_token_id
        return TokenizerAdapter(tok, name, vocab, h.hexdigest(), None if eos is None else int(eos), True)
    name = str(getattr(tok, "name", type(tok).__name__))
    fp = getattr(tok, "fingerprint", None)
    if fp is None and callable(getattr(tok, "to_json", None)):  # a trained BPE: its whole vocabulary and merges
        fp = hashlib.sha256(str(tok.to_json()).encode()).hexdigest()
    fp = fp or hashlib.sha256(
        f"{type(tok).__module__}.{type(tok).__qualname__}:{name}:{tok.vocab_size}".encode()).hexdigest()
    eos = getattr(tok, "eos_id", None)  # a trained BPE ends each document with its EOS; bytes have none
    return TokenizerAdapter(tok, name, int(tok.vocab_size), str(fp), None if eos is None else int(eos), False)


def _field(record: dict[str, Any], name: str) -> str:
    if name not in record:
        raise RecordError(f"record has no field {name!r} (fields: {sorted(record)[:10]})")
    v = record[name]
    if not isinstance(v, str):
        raise RecordError(f"field {name!r} is {type(v).__name__}, not a string")
    return v


def render_instruction(record: dict[str, Any], template: str, response_field: str,
                       tok: TokenizerAdapter, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`template.format(**record)` (mask 0) then the response and `end` (mask 1); int64 and uint8.

    Raises:
        RecordError: a template field or the response field is missing or not a string.
    """
    values = {name: _field(record, name) for name in template_fields(template)}
    prompt = tok.encode(template.format(**values))
    response = np.concatenate([tok.encode(_field(record, response_field)), end])
    mask = np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(response), np.uint8)])
    return np.concatenate([prompt, response]), mask


def render_chat(record: dict[str, Any], messages_field: str, tok: TokenizerAdapter,
                end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A conversation's tokens (int64) and mask (uint8, 1 on assistant turns and the final `end`).

    Raises:
        RecordError: the messages field is missing, not a list, malformed, or has no assistant turn.
    """
    if messages_field not in record:
        raise RecordError(f"record has no field {messages_field!r} (fields: {sorted(record)[:10]})")
    messages = record[messages_field]
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"field {messages_field!r} is not a non-empty list of messages")
    ids, mask = [], []
    for text, train in tok.chat_segments(messages):
        t = tok.encode(text)
        ids.append(t)
        mask.append(np.full(len(t), int(train), np.uint8))
    # The HF template usually ends with its own end-of-turn token; `end` is appended only for the
    # fallback renderer, so a byte-tokenized chat still teaches the model to stop.
    if not tok.is_hf and len(end):
        ids.append(end)
        mask.append(np.ones(len(end), np.uint8))
    return np.concatenate(ids), np.concatenate(mask)
