"""The prediction route's request and response, for a classifier export (no Ray, no FastAPI here).

`POST /v1/predict` takes `{"inputs": [example, ...], "model": optional}`, where each example is the
export's example shape as nested lists of numbers (digits: 8 x 8) or the same numbers flat (64).
It answers `{"object": "list", "model", "data": [{"index", "label", "probabilities"}], "usage"}`:
per example the arg-max class and the softmax over every class (float, summing to 1).

`classifier_info(config)` tells a classifier export (one `raybig.train.classifiers` wrote: its model
config names `input_shape` and `num_classes`) from a language model's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from raybig.serve.schema import ApiError

MAX_INPUTS = 256
"""Default limit on examples per request (`AppArgs.max_inputs`)."""


@dataclass(frozen=True)
class ClassifierInfo:
    """What serving needs to know about a classifier export.

    Attributes:
        input_shape: shape of one example, no batch dimension (digits: (8, 8)).
        num_classes: classes (length of each `probabilities`).
        arch: the built-in architecture the export names (`mlp`, `cnn`, ...), for `/v1/models`.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    arch: str

    @property
    def features(self) -> int:
        """Numbers in one example (the product of `input_shape`)."""
        return math.prod(self.input_shape)


def classifier_info(config: Mapping[str, Any]) -> ClassifierInfo | None:
    """The classifier an export's config.json describes, or None for any other model.

    A classifier export (`raybig.train.classifiers.classifier_config`, written by `task:
    classification` training) has provenance `raybig.model = {"target", "kwargs": {"arch",
    "input_shape", "num_classes", ...}}`; the target is the builder the trainer used, so serving
    builds whichever architecture the export names.
    """
    prov = config.get("raybig")
    model = prov.get("model") if isinstance(prov, Mapping) else None
    if not isinstance(model, Mapping) or "target" not in model:
        return None
    kw = model.get("kwargs")
    if not isinstance(kw, Mapping) or "input_shape" not in kw or "num_classes" not in kw:
        return None
    return ClassifierInfo(tuple(int(d) for d in kw["input_shape"]), int(kw["num_classes"]),
                          str(kw.get("arch", "classifier")))


def body_limit(info: ClassifierInfo, max_inputs: int) -> int:
    """Most request bytes worth reading: every example at 32 bytes per number, plus 1 MiB."""
    return 32 * info.features * max_inputs + 2**20


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_predict(raw: bytes, info: ClassifierInfo, model_name: str, max_inputs: int = MAX_INPUTS) -> np.ndarray:
    """The request body's examples as float32 (N, *input_shape); `ApiError` (4xx) for anything else.

    Accepted: a JSON object with `inputs`, a non-empty list of at most `max_inputs` examples, each
    nested lists of finite JSON numbers (not booleans, not strings) of shape `input_shape`, or flat
    with `prod(input_shape)` numbers (every example of one request in the same form); `model`, if given, must be the served model's name (else 404).
    Unknown keys are ignored (as OpenAI's API does).

    Raises:
        ApiError: 400 with `param: "inputs"` naming what is wrong; 404 for another model's name.
    """
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"We could not parse the JSON body of your request: {str(e)[:200]}") from None
    except RecursionError:
        raise ApiError(400, "We could not parse the JSON body of your request: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    model = body.get("model")
    if model is not None and model != model_name:
        raise ApiError(404, f"The model '{str(model)[:100]}' does not exist; this server serves '{model_name}'.",
                       param="model", code="model_not_found")
    if "inputs" not in body:
        raise ApiError(400, "Missing required parameter: 'inputs' (a list of examples).", param="inputs")
    inputs = body["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise ApiError(400, "'inputs' must be a non-empty list of examples.", param="inputs")
    if len(inputs) > max_inputs:
        raise ApiError(400, f"at most {max_inputs} inputs per request (got {len(inputs)})", param="inputs")
    shape = "x".join(map(str, info.input_shape))
    want = f"each example must be {shape} numbers (nested as {list(info.input_shape)} or flat {info.features})"
    try:
        arr = np.asarray(inputs)
    except ValueError:  # ragged nesting
        raise ApiError(400, f"Invalid 'inputs': examples of different shapes; {want}.", param="inputs") from None
    if arr.dtype.kind not in "iuf":  # strings, booleans, nulls, objects
        raise ApiError(400, f"Invalid 'inputs': values must be numbers (got {_kind(arr)}); {want}.",
                       param="inputs")
    n = arr.shape[0]
    if arr.shape[1:] not in (info.input_shape, (info.features,)):
        got = "x".join(map(str, arr.shape[1:])) or "a scalar"
        raise ApiError(400, f"Invalid 'inputs': an example has shape {got}; {want}.", param="inputs")
    with np.errstate(over="ignore"):
        x = arr.astype(np.float32).reshape(n, *info.input_shape)
    if not np.isfinite(x).all():
        raise ApiError(400, "Invalid 'inputs': values must be finite float32 numbers.", param="inputs")
    return x


def _kind(arr: np.ndarray) -> str:
    return {"b": "booleans", "U": "strings", "S": "strings", "O": "mixed or null values"}.get(arr.dtype.kind,
                                                                                                str(arr.dtype))


def predictions(probs: np.ndarray) -> list[dict[str, Any]]:
    """Per example `{"index", "label", "probabilities"}` from (N, num_classes) probabilities."""
    labels = probs.argmax(axis=1)
    return [{"index": i, "label": int(labels[i]), "probabilities": [float(p) for p in probs[i]]}
            for i in range(probs.shape[0])]


def response(model_name: str, probs: np.ndarray) -> dict[str, Any]:
    """The route's JSON body for one request's (N, num_classes) probabilities."""
    return {"object": "list", "model": model_name, "data": predictions(probs),
            "usage": {"inputs": int(probs.shape[0])}}


def wrong_route(model_name: str, kind: str, use: str) -> ApiError:
    """404 for a route this export's kind does not offer (`kind`: what the model is; `use`: its route)."""
    return ApiError(404, f"The model '{model_name}' is a {kind}; this route is not offered for it (use {use}).",
                    type_="not_found_error", code="unsupported_route")
