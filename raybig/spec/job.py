"""`JobSpec`: every kind of job, one discriminated union on `kind`, validated by one adapter."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, Field, TypeAdapter

from raybig.spec.models import TrainSpec
from raybig.spec.pipeline import PipelineSpec
from raybig.spec.probe import ProbeSpec
from raybig.spec.serve import ServeSpec
from raybig.spec.sweep import SweepSpec

JobSpec = Annotated[TrainSpec | SweepSpec | ServeSpec | PipelineSpec | ProbeSpec, Field(discriminator="kind")]
"""Any job raybig runs; `spec.kind` tells which (use `match spec:` with class patterns)."""

ADAPTER: TypeAdapter[Any] = TypeAdapter(JobSpec)
"""Validates plain data (with a `kind` key) into the JobSpec it names."""


def _kinds() -> dict[str, type[BaseModel]]:
    union = typing.get_args(JobSpec)[0]
    return {typing.get_args(cls.model_fields["kind"].annotation)[0]: cls for cls in typing.get_args(union)}


KINDS: Mapping[str, type[BaseModel]] = types.MappingProxyType(_kinds())
"""kind name -> spec class, read off the union (not a registry: nothing adds to it)."""
