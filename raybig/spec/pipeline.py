"""`kind: pipeline`: sweep -> train the winner further -> serve its export, from one spec."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from raybig.spec.models import NAME_RE, StorageSpec, Strict, TrainSpec, at
from raybig.spec.serve import ServeSpec
from raybig.spec.sweep import SweepSpec


class PipelineTrainSpec(Strict):
    """The train stage: the sweep winner's best.yaml with overrides."""

    set: dict[str, Any] = Field(default_factory=dict, description="Dotted train-spec path -> value "
                                "applied to the winner's spec, e.g. {train.steps: 200}.")
    from_scratch: bool = Field(False, description="Train the winning configuration from scratch instead "
                               "of continuing from the winner's weights.")


class PipelineSpec(Strict):
    """Sweep, then train the winner, then serve the trained export; finished stages are skipped."""

    kind: Literal["pipeline"] = "pipeline"
    name: str = Field(..., pattern=NAME_RE, description="Pipeline name; its directory and the app name.")
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
            err = e.errors(include_url=False)[0]
            msg = err["msg"].removeprefix("Value error, ")
            sub = ".".join(str(p) for p in err["loc"])
            if msg.startswith("@"):
                extra, _, msg = msg[1:].partition(": ")
                sub = f"{sub}.{extra}" if sub else extra
            raise at(f"serve.{sub}" if sub else "serve", msg) from None
        base = self.sweep.base.model_dump(mode="json")
        for path, value in self.train.set.items():
            try:
                TrainSpec.model_validate(apply_set(base, {path: value}))
            except KeyError as e:
                raise at(f"train.set.{path}", f"cannot apply to the train spec: {e.args[0]}") from None
            except ValidationError as e:
                err = e.errors(include_url=False)[0]
                where = ".".join(str(p) for p in err["loc"])
                msg = f"{where}: {err['msg'].removeprefix('Value error, ')}"
                raise at(f"train.set.{path}", f"cannot apply to the train spec: {msg}") from None
        return self

    def serve_spec(self, checkpoint: str) -> ServeSpec:
        return ServeSpec.model_validate({"name": self.name, **self.serve, "checkpoint": checkpoint})


def apply_set(data: dict[str, Any], sets: dict[str, Any]) -> dict[str, Any]:
    """Copy of `data` with dotted paths set; KeyError for a path whose parent does not exist."""
    import copy

    out = copy.deepcopy(data)
    for path, value in sets.items():
        node = out
        parts = path.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise KeyError(f"no section {p!r} in the train spec")
            node = node[p]
        node[parts[-1]] = value
    return out


def _register() -> None:
    from raybig.spec.models import KINDS

    KINDS.setdefault("pipeline", PipelineSpec)


_register()
