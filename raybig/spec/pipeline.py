"""`kind: pipeline`: sweep -> train the winner further -> serve its export, from one spec."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from raybig.spec import paths
from raybig.spec.base import NAME_RE, Name, QueuedSpec, Strict, at
from raybig.spec.issues import first_error, first_error_parts
from raybig.spec.models import StorageSpec, TrainSpec
from raybig.spec.serve import ServeSpec
from raybig.spec.sweep import SweepSpec


class PipelineTrainSpec(Strict):
    """The train stage: the sweep winner's best.yaml with overrides."""

    set: dict[str, Any] = Field(default_factory=dict, description="Dotted train-spec path -> value "
                                "applied to the winner's spec, e.g. {train.steps: 200}.")
    from_scratch: bool = Field(False, description="Train the winning configuration from scratch instead "
                               "of continuing from the winner's weights.")


class PipelineSpec(QueuedSpec):
    """Sweep, then train the winner, then serve the trained export; finished stages are skipped."""

    kind: Literal["pipeline"] = "pipeline"
    name: Name = Field(..., pattern=NAME_RE, description="Pipeline name; its directory and the app name.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Every stage writes under "
                                 "<storage>/<name>/.")
    sweep: SweepSpec = Field(..., description="The sweep stage (a sweep spec without `kind`).")
    train: PipelineTrainSpec = Field(default_factory=PipelineTrainSpec)
    serve: dict[str, Any] = Field(default_factory=dict, description="The serve stage: a serve spec without "
                                  "`checkpoint` (the train stage's export) and `name` (the pipeline's).")

    @model_validator(mode="after")
    def _check(self) -> PipelineSpec:
        for key in ("checkpoint", "kind"):
            if key in self.serve:
                raise at(f"serve.{key}", f"set by the pipeline; leave {key} out")
        try:
            self.serve_spec("/pending")
        except ValidationError as e:
            where, msg = first_error_parts(e)
            raise at(f"serve.{where}" if where else "serve", msg) from None
        base = self.sweep.base.model_dump()  # python mode: secret-sourced values keep their type
        for path, value in self.train.set.items():
            try:
                TrainSpec.model_validate(apply_set(base, {path: value}))
            except paths.PathError as e:
                raise at(f"train.set.{path}", f"cannot apply to the train spec: {e}") from None
            except ValidationError as e:
                raise at(f"train.set.{path}", f"cannot apply to the train spec: {first_error(e)}") from None
        return self

    def serve_spec(self, checkpoint: str) -> ServeSpec:
        """The serve stage's spec for the export at `checkpoint` (named after the pipeline).

        Raises pydantic.ValidationError if the `serve:` section does not make a valid serve spec.
        """
        return ServeSpec.model_validate({"name": self.name, **self.serve, "checkpoint": checkpoint})

    def train_stage_data(self, best: dict[str, Any], storage_path: str) -> dict[str, Any]:
        """The train stage's spec data from the sweep winner's (python-mode) data `best`.

        Applies `train.set`, names it `<name>-train` under `storage_path`, and drops init_from when
        `train.from_scratch`. Raises PathError for a `set:` path with no section to hold it.
        """
        data = apply_set(best, self.train.set)
        data.update(name=f"{self.name}-train", storage={"path": storage_path})
        if self.train.from_scratch:
            data.pop("init_from", None)
        return data


def apply_set(data: dict[str, Any], sets: dict[str, Any]) -> dict[str, Any]:
    """Copy of `data` with `{dotted path: value}` set; PathError where a section does not exist."""
    try:
        return paths.with_values(data, sets, create=False)
    except paths.PathError as e:
        raise paths.PathError(e.path, f"{e.message} in the train spec") from None
