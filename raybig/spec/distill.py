"""Validate-time checks of a distillation teacher (`distill.teacher`), without torch.

The student learns from the teacher's logits, so both must score the same things: the same
vocabulary (same tokenizer) for causal and masked LMs, the same classes (and example shape) for
classifiers, and a teacher with the task's head. What can be read from the teacher's config.json
and tokenizer files is checked here; the logits' shapes are checked again at the first step.
"""

from __future__ import annotations

import json
import os
from typing import Any

from raybig.spec.base import local_abs

CLASSIFIER_TARGET = "raybig.train.classifiers:build_from_config"
"""The `target` a built-in classifier's export config names."""

_HEAD_SUFFIX = {"causal_lm": "ForCausalLM", "masked_lm": "ForMaskedLM", "classification": "ForSequenceClassification"}


def _read_json(path: str) -> dict[str, Any] | None:
    import fsspec

    fs, _, (p,) = fsspec.get_fs_token_paths(path)
    if not fs.exists(p):
        return None
    v = json.loads(fs.cat_file(p))
    return v if isinstance(v, dict) else None


def teacher_config(teacher: str) -> tuple[str, dict[str, Any]] | None:
    """(export folder, parsed config.json) of a run or export dir; None if neither holds config.json."""
    for folder in (teacher, f"{teacher.rstrip('/')}/export"):
        cfg = _read_json(f"{folder}/config.json")
        if cfg is not None:
            return folder, cfg
    return None


def _vocab_of(folder: str) -> dict[str, int] | None:
    tok = _read_json(f"{folder}/tokenizer.json")
    vocab = ((tok or {}).get("model") or {}).get("vocab")
    return vocab if isinstance(vocab, dict) else None


def check_teacher(spec: Any) -> list[tuple[str, str]]:
    """(sub-path under `distill`, message) for each way `spec.distill.teacher` cannot teach `spec`'s model.

    Checks a local teacher (a remote one is checked when the workers load it): that it is an export;
    classifiers: a built-in classifier's export with the student's classes and example shape (or a
    Hugging Face sequence classifier for one); language models: the task's head, the same number of
    vocabulary rows, and the same tokenizer (kind, and vocabulary when both have tokenizer.json).
    """
    from raybig.spec import hf_params as hp

    t = spec.distill.teacher
    if "://" in t and not t.startswith("file://"):
        return []
    found = teacher_config(t)
    storage_root = local_abs(spec.storage.path) if "://" not in spec.storage.path else None
    if found is None and storage_root is not None and os.path.dirname(t.rstrip("/")) == storage_root:
        return []  # a run of this storage that an earlier job (or pipeline step) will write: checked at load
    if found is None:
        return [("teacher", f"{t}: no export there (neither {t}/config.json nor {t}/export/config.json); "
                 "name a finished run's directory or its export folder")]
    folder, cfg = found
    prov = cfg.get("raybig") or {}
    raw = prov.get("model")
    model: dict[str, Any] = raw if isinstance(raw, dict) else {}
    hf_student_classifier = spec.task == "classification" and spec.model.is_hf
    if spec.task == "classification" and not hf_student_classifier:
        if model.get("target") != CLASSIFIER_TARGET:
            return [("teacher", f"{folder} is not a built-in classifier's export; a classifier learns from "
                     "another classifier trained on the same classes")]
        kw = model.get("kwargs") or {}
        c = spec.classifier
        k = c.num_classes if c is not None and c.num_classes else (10 if c is None or c.dataset == "digits" else None)
        if k is not None and int(kw.get("num_classes", -1)) != k:
            return [("teacher", f"the teacher has {kw.get('num_classes')} classes, the student {k}")]
        shape = c.input_shape if c is not None and c.input_shape else ([8, 8] if c is None or c.dataset == "digits"
                                                                        else None)
        if shape is not None and list(kw.get("input_shape") or []) != list(shape):
            return [("teacher", f"the teacher takes examples of shape {kw.get('input_shape')}, the student {shape}")]
        return []
    # Language models and Hugging Face classifiers: a transformers export (raybig's GPT exports as GPT-2).
    archs = [str(a) for a in cfg.get("architectures") or []]
    suffix = _HEAD_SUFFIX[spec.task]
    if archs and not any(a.endswith(suffix) for a in archs) and not (spec.task == "causal_lm" and "GPT2LMHeadModel" in archs):
        return [("teacher", f"the teacher is a {archs[0]}, not a model with the {spec.task} head ({suffix})")]
    if hf_student_classifier:
        n_t = cfg.get("num_labels") or len(cfg.get("id2label") or {}) or None
        n_s = spec.classifier.num_classes if spec.classifier is not None else None
        if n_t and n_s and int(n_t) != int(n_s):
            return [("teacher", f"the teacher has {n_t} classes, the student {n_s}")]
        return []
    t_rows = hp.embedding_rows(cfg) or (model.get("vocab_size") if model else None)
    s_rows = _student_rows(spec)
    if t_rows and s_rows and int(t_rows) != int(s_rows):
        return [("teacher", f"the teacher's vocabulary has {t_rows} ids, the student's {s_rows}: distillation "
                 "needs the same tokenizer (train the student with the teacher's tokenizer)")]
    kind = spec.tokenizer_kind()
    t_tok = prov.get("tokenizer") or ("bytes" if int(cfg.get("vocab_size", 0)) == 256 else "hf")
    if (kind == "bytes") != (t_tok == "bytes"):
        return [("teacher", f"the teacher's tokenizer is {t_tok!r}, the student's {kind!r}: distillation "
                 "needs the same tokenizer")]
    if kind == "model":
        src = spec.model.hf or spec.model.hf_config
        s_vocab = _vocab_of(src if isinstance(src, str) and os.path.isdir(src) else os.path.dirname(str(src)))
        t_vocab = _vocab_of(folder)
        if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab:
            return [("teacher", "the teacher's tokenizer (tokenizer.json) differs from the student's: the same "
                     "ids would mean different tokens")]
    return []


def _student_rows(spec: Any) -> int | None:
    """The student's logits width: its embedding rows (Hugging Face) or raybig's GPT's vocabulary."""
    if not spec.model.is_hf:
        return int(spec.model_vocab()) if spec.model.target is None else None
    from raybig.spec import hf_params as hp
    from raybig.spec.hf_params import hf_model_info

    try:
        info = hf_model_info(spec.model.hf, spec.model.hf_config, spec.model.trust_remote_code)
    except hp.ModelSourceError:
        return None
    return hp.embedding_rows(info["config"])
