"""Evaluation: perplexity and bits per byte on held-out tokens, and lm-eval harness tasks on an export.

`perplexity` needs only torch and a causal LM (raybig's `GPT` or a transformers model); `harness`
imports lm-eval lazily, so importing this package stays cheap. `run` evaluates a finished train run
(`raybig eval`, and a spec's `eval:` section at the end of training) and writes `<run>/eval.json`.
Task files are found and checked by `raybig.spec.eval_tasks` (no lm-eval, no torch), so
`raybig validate` refuses a bad one.
"""

from raybig.eval.perplexity import PerplexityResult, evaluate_perplexity, perplexity_of_text, token_nll

__all__ = ["PerplexityResult", "evaluate_perplexity", "perplexity_of_text", "token_nll"]
