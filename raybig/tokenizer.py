"""Tokenizers behind one interface (a leaf: imports nothing from raybig, nor torch).

Today there is one, `ByteTokenizer` (UTF-8 bytes, vocabulary 256). A locally trained BPE or a
Hugging Face model's own tokenizer will implement the same `Tokenizer` protocol and be chosen by
name with `get_tokenizer` (the name is what `data.tokenizer` in a spec and `"tokenizer"` in an
export's config.json hold).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

BYTE_VOCAB = 256
"""Vocabulary size of the byte tokenizer: one token per byte value 0..255."""


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids. `encode` never fails on a `str`; `decode` never fails on ids in range."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, each in [0, vocab_size)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; an invalid sequence decodes with U+FFFD replacement characters."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary `BYTE_VOCAB` (256), no special tokens, no training.

    Lone surrogates (which UTF-8 cannot encode) become `?`; invalid byte sequences decode to U+FFFD.
    """

    name = "bytes"
    vocab_size = BYTE_VOCAB

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of `text` as ints in [0, 256)."""
        return list(text.encode("utf-8", errors="replace"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes `ids` (each taken modulo 256) decoded as UTF-8 with replacement."""
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")


BYTES = ByteTokenizer()
_BY_NAME: dict[str, Tokenizer] = {BYTES.name: BYTES}


def get_tokenizer(name: str = "bytes") -> Tokenizer:
    """The tokenizer called `name`; raises KeyError naming the known ones for any other name."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown tokenizer {name!r}; known: {sorted(_BY_NAME)}") from None


def encode(text: str) -> list[int]:
    """Byte-tokenizer ids of `text` (shorthand for `BYTES.encode`)."""
    return BYTES.encode(text)


def decode(ids: Sequence[int]) -> str:
    """Byte-tokenizer text of `ids` (shorthand for `BYTES.decode`)."""
    return BYTES.decode(ids)


# --------------------------------------------------------------------------- byte-level BPE

EOS_TOKEN = "<|endoftext|>"
"""The BPE tokenizer's one special token: end of a document (also BOS and padding when needed)."""


class BpeTokenizer:
    """A byte-level BPE (GPT-2 style) from the `tokenizers` library, behind the `Tokenizer` protocol.

    Byte-level: any text encodes (no unknown token) and `decode(encode(s)) == s`. Ids of the special
    tokens come first (`<|endoftext|>` is id 0), then the 256 byte symbols, then the merges. Saved
    as one `tokenizer.json` (`save`, `load`); `raybig.train.export_hf` turns it into a
    transformers tokenizer for an export.

    Attributes:
        vocab_size: number of ids, specials included.
        eos_id: id of `EOS_TOKEN`.
    """

    name = "bpe"

    def __init__(self, tok: Any):
        self.tok = tok  # a tokenizers.Tokenizer
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        eos = tok.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"a raybig BPE tokenizer needs the special token {EOS_TOKEN!r}")
        self.eos_id = int(eos)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` with no special tokens added (so pieces concatenate like bytes do)."""
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens dropped; broken UTF-8 decodes with U+FFFD."""
        return str(self.tok.decode([int(i) for i in ids], skip_special_tokens=True))

    def to_json(self) -> str:
        """The whole tokenizer as the `tokenizers` library's JSON."""
        return str(self.tok.to_str())

    def save(self, path: str) -> str:
        """Write `tokenizer.json` to `path` (a file path, or a directory to write it into); return the file."""
        import os

        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json())
        os.replace(tmp, path)
        return path

    @classmethod
    def from_json(cls, text: str) -> BpeTokenizer:
        """A tokenizer from the JSON of `to_json`."""
        from tokenizers import Tokenizer as _HFTok

        return cls(_HFTok.from_str(text))

    @classmethod
    def load(cls, path: str) -> BpeTokenizer:
        """A tokenizer from a `tokenizer.json` file, or a directory holding one."""
        import os

        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> BpeTokenizer:
    """Train a byte-level BPE locally on `texts` (an iterable of documents), with `tokenizers`.

    Args:
        texts: the training text, streamed (any iterable of str; not held in memory at once).
        vocab_size: target number of ids including the special token and the 256 byte symbols;
            fewer result if the text has fewer distinct pairs.
        min_frequency: a pair must occur this often to be merged.

    Raises:
        ValueError: `vocab_size` below 257 (256 bytes + `<|endoftext|>`).
    """
    from tokenizers import Tokenizer as _HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < BYTE_VOCAB + 1:
        raise ValueError(f"BPE vocab_size must be at least {BYTE_VOCAB + 1} (256 bytes + {EOS_TOKEN}), "
                         f"got {vocab_size}")
    tok = _HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return BpeTokenizer(tok)
