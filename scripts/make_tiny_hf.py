#!/usr/bin/env python
"""Save a tiny random Hugging Face causal LM and a locally trained tokenizer, offline.

    python scripts/make_tiny_hf.py OUT_DIR --arch llama|gpt2 [--seed 0] [--max-shard-size 100KB]

OUT_DIR becomes a `save_pretrained` folder (config.json, model.safetensors or shards + index,
generation_config.json, tokenizer files) that `model.hf: OUT_DIR` and plain transformers load.
The model has a few hundred thousand parameters; the tokenizer is a byte-level BPE trained with the
`tokenizers` library on this Python's standard-library sources, so nothing is downloaded.
- llama: Llama-shaped (RMSNorm, GQA, SwiGLU, untied head), `<s>` BOS added to every encoding,
  `</s>` EOS, and a chat template.
- gpt2: GPT-2-shaped (tied head), `<|endoftext|>` as BOS/EOS, no BOS added (as GPT-2 does).
"""

from __future__ import annotations

import argparse
import glob
import os
import sysconfig

VOCAB = 1024
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def stdlib_texts(max_bytes: int = 1_500_000) -> list[str]:
    """Sources of the standard library's top-level modules, in name order, up to `max_bytes`."""
    out, n = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        out.append(text)
        n += len(text)
        if n >= max_bytes:
            break
    return out


def train_tokenizer(arch: str, vocab_size: int = VOCAB):
    """A transformers fast tokenizer (byte-level BPE) trained on `stdlib_texts()` for `arch`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>"] if arch == "llama" else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stdlib_texts(), trainer=trainer)
    if arch == "llama":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       pad_token="</s>", chat_template=CHAT_TEMPLATE, add_bos_token=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def tiny_config(arch: str, tokenizer):
    """The tiny transformers config of `arch` sized to `tokenizer` (about 0.2M parameters)."""
    from transformers import GPT2Config, LlamaConfig

    V = len(tokenizer)
    if arch == "llama":
        return LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    if arch == "gpt2":
        return GPT2Config(vocab_size=V, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    raise ValueError(f"unknown arch {arch!r}; use llama or gpt2")


def make_tiny(out_dir: str, arch: str = "llama", seed: int = 0, max_shard_size: str | int | None = None) -> str:
    """Write a tiny random `arch` model + tokenizer as a save_pretrained folder; return `out_dir`.

    `max_shard_size` (e.g. "100KB") forces sharded safetensors with an index.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = train_tokenizer(arch)
    cfg = tiny_config(arch, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kw)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                     pad_token_id=getattr(cfg, "pad_token_id", None)).save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--arch", choices=["llama", "gpt2"], default="llama")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-size", default=None, help="e.g. 100KB: write sharded safetensors")
    a = ap.parse_args(argv)
    make_tiny(a.out_dir, a.arch, a.seed, a.max_shard_size)
    print(a.out_dir)


if __name__ == "__main__":
    main()
