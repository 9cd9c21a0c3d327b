"""The text sample printed at the end of a run, generated from its export with the run's tokenizer.

raybig's GPT (bytes or BPE) is loaded with `raybig.train.export.load_model` and its tokenizer
with `load_tokenizer` (the export's `tokenizer.json` for a BPE run), so the prompt is encoded and
the sample decoded with the ids the model was trained on. A Hugging Face model's export (a
`save_pretrained` folder of its own class) is loaded with plain transformers, its tokenizer with
`AutoTokenizer` (BOS added as the model expects, special tokens dropped from the text).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from raybig import storage
from raybig.spec.models import TrainSpec

__all__ = ["generate_text", "sample_text"]


@contextlib.contextmanager
def _local(uri: str) -> Iterator[str]:
    if storage.is_local(uri):
        yield storage.normalize(uri)
        return
    with tempfile.TemporaryDirectory(prefix="raybig-sample-") as tmp:
        yield storage.download_dir(uri, tmp)


def generate_text(export_dir: str, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                  seed: int = 0) -> str:
    """`prompt` followed by `max_new_tokens` tokens sampled from the export at `export_dir`.

    Args:
        export_dir: an export (local folder or fsspec URI) of raybig's GPT, a plug-in model or a
            Hugging Face model.
        prompt: the text to continue.
        max_new_tokens: tokens to generate.
        temperature: sampling temperature (0: greedy).
        seed: the sampling seed.

    Returns:
        The decoded text (prompt included); "" for a plug-in model without `generate`.
    """
    from raybig.train.export import PROVENANCE, export_format, load_model, load_tokenizer, read_config

    cfg = read_config(export_dir)
    if PROVENANCE in cfg or export_format(cfg) != "hf":  # raybig's GPT or a plug-in model
        model, _ = load_model(export_dir)
        generate: Any = getattr(model, "generate", None)
        if generate is None:
            return ""
        tok = load_tokenizer(export_dir)
        g = torch.Generator().manual_seed(seed)
        idx = torch.tensor([tok.encode(prompt) or [0]], dtype=torch.long)
        with torch.no_grad():
            out = generate(idx, max_new_tokens, temperature=temperature, generator=g)
        return tok.decode(out[0].tolist())
    return _generate_hf(export_dir, prompt, max_new_tokens, temperature, seed)


def _generate_hf(export_dir: str, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _local(export_dir) as folder:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    model.eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"]
    if ids.shape[1] == 0:  # an empty prompt with no BOS: start from EOS, as generation does
        ids = torch.tensor([[tok.eos_token_id or 0]], dtype=torch.long)
    greedy = not temperature > 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=not greedy, temperature=None if greedy else temperature,
                             top_p=None, top_k=None, pad_token_id=pad)
    return str(tok.decode(out[0].tolist(), skip_special_tokens=True))


def sample_text(export_dir: str, spec: TrainSpec) -> str:
    """The end-of-run sample of `spec.sample` (prompt, max_new_tokens, temperature; seed `spec.seed`)."""
    s = spec.sample
    return generate_text(export_dir, s.prompt, s.max_new_tokens, s.temperature, spec.seed)
