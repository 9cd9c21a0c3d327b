"""Moved to `raybig.spec.deepspeed` (pure: the spec layer uses it at validate time); re-exported."""

from raybig.spec.deepspeed import OWNED, build_ds_config, check_extra, deep_merge, resolve_precision

__all__ = ["OWNED", "build_ds_config", "check_extra", "deep_merge", "resolve_precision"]
