"""The Ray Serve deployment for a classifier export: `POST /v1/predict`, batched with `@serve.batch`.

`raybig.serve.app.build_app` binds this deployment instead of the completions one when the export is
a classifier (`raybig.serve.predict.classifier_info`). The model is built by the export's own
target (`raybig.train.classifiers:build_from_config`, the builder training used) through
`raybig.train.export.load_model`, so any architecture a classifier export names is served.

Routes: `GET /health`, `GET /v1/models`, `POST /v1/predict`. The completions routes answer 404
(`unsupported_route`) here, as `/v1/predict` does on a language model's app.

Batching: concurrent requests are gathered by `@serve.batch` (up to `batching.max_num_seqs`
requests, waiting at most `batching.batch_wait_timeout_s`) into one forward pass over all their
examples; each request gets its own rows back.
"""

# No `from __future__ import annotations`: FastAPI must see real types through Serve's ingress.

import asyncio
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from raybig.metrics import RequestTimer, serve_batch
from raybig.serve.http import (
    AppArgs,
    check_api_key,
    error_response,
    install_error_handlers,
    read_body,
)
from raybig.serve.predict import (
    ClassifierInfo,
    body_limit,
    classifier_info,
    parse_predict,
    response,
    wrong_route,
)
from raybig.serve.schema import ApiError, check_content_type

CLASSIFIER_DEPLOYMENT = "Classifier"

api = FastAPI(title="raybig classifier")


install_error_handlers(api)


# Typed Any: serve.batch's stubs do not describe methods well; sizes are set per replica in __init__.
_batched: Any = serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)


@serve.deployment(name=CLASSIFIER_DEPLOYMENT)
@serve.ingress(api)
class Classifier:
    """One replica: a classifier export, its prediction route, and the batch handler.

    Args:
        args: `raybig.serve.http.AppArgs` as a dict (`task: classification`).
    """

    def __init__(self, args: dict[str, Any]):
        import torch

        from raybig.serve.engine import quantize_int8
        from raybig.train.export import load_model, read_config

        self.args = AppArgs.model_validate(args)
        torch.set_num_threads(self.args.torch_threads)
        info = classifier_info(read_config(self.args.checkpoint))
        if info is None:
            raise ValueError(f"{self.args.checkpoint} is not a classifier export")
        self.info: ClassifierInfo = info
        model, _ = load_model(self.args.checkpoint)
        if self.args.quantize == "int8":
            model = quantize_int8(model)
        self.device = "cpu"
        if torch.cuda.is_available() and self.args.deployment.get("ray_actor_options", {}).get("num_gpus"):
            self.device = "cuda"
            model = model.to(self.device)
        self.model = model.eval()
        self._predict.set_max_batch_size(self.args.max_num_seqs)
        self._predict.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        self.created = int(time.time())
        self.stats = {"requests": 0, "batches": 0, "max_batch_requests": 0}

    def _check_key(self, request: Request) -> None:
        check_api_key(request, self.args.api_key_sha256)

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        """Liveness: `{"status": "ok", "model": name}` (no key needed)."""
        return {"status": "ok", "model": self.args.model_name}

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        """`GET /v1/models`: the one classifier, with its input shape and classes; 401 without the key."""
        try:
            self._check_key(request)
        except ApiError as e:
            return error_response(e)
        i = self.info
        return {"object": "list", "data": [{"id": self.args.model_name, "object": "model", "created": self.created,
                                            "owned_by": "raybig", "task": "classification", "arch": i.arch,
                                            "input_shape": list(i.input_shape), "num_classes": i.num_classes}]}

    @api.get("/v1/engine/stats")
    async def engine_stats(self, request: Request) -> Any:
        """Internal: requests answered, batches run, and the most requests one batch held."""
        try:
            self._check_key(request)
        except ApiError as e:
            return error_response(e)
        return dict(self.stats)

    @api.post("/v1/predict")
    async def predict(self, request: Request) -> Any:
        """`POST /v1/predict`: label and class probabilities per input; OpenAI-shaped 4xx for bad input."""
        timer = RequestTimer(self.args.model_name)
        try:
            self._check_key(request)
            check_content_type(request.headers.get("content-type"))
            raw = await read_body(request, body_limit(self.info, self.args.max_inputs))
            x = parse_predict(raw, self.info, self.args.model_name, self.args.max_inputs)
        except ApiError as e:
            timer.done(e.status)
            return error_response(e)
        probs = await self._predict(x)
        timer.done(200)
        return JSONResponse(response(self.args.model_name, probs))

    @api.post("/v1/completions")
    async def completions(self) -> Any:
        """Not offered for a classifier: 404 `unsupported_route` pointing at /v1/predict."""
        return error_response(wrong_route(self.args.model_name, "classifier", "POST /v1/predict"))

    @api.post("/v1/chat/completions")
    async def chat_completions(self) -> Any:
        """Not offered for a classifier: 404 `unsupported_route` pointing at /v1/predict."""
        return error_response(wrong_route(self.args.model_name, "classifier", "POST /v1/predict"))

    @_batched  # Serve gathers concurrent `_predict(x)` calls into one `_predict(xs)`
    async def _predict(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        """Every request's examples (each (n_i, *input_shape) float32) in one forward pass.

        Returns one (n_i, num_classes) float64 softmax array per request, in order.
        """
        serve_batch(self.args.model_name, len(xs))
        st = self.stats
        st["requests"] += len(xs)
        st["batches"] += 1
        st["max_batch_requests"] = max(st["max_batch_requests"], len(xs))
        sizes = [len(x) for x in xs]
        probs = await asyncio.to_thread(self._forward, np.concatenate(xs))  # the loop keeps taking requests
        return list(np.split(probs, np.cumsum(sizes)[:-1]))

    def _forward(self, x: np.ndarray) -> np.ndarray:
        """(N, *input_shape) float32 -> (N, num_classes) probabilities (softmax of the logits, float64)."""
        import torch

        with torch.inference_mode():
            logits = self.model(torch.from_numpy(x).to(self.device))
            return torch.softmax(logits.double(), dim=-1).cpu().numpy()


def build_classifier_app(a: AppArgs) -> serve.Application:
    """The classifier app for validated args (what `raybig.serve.app.build_app` binds for `task: classification`)."""
    from typing import cast

    deployment = cast(serve.Deployment, Classifier)
    return deployment.options(**a.deployment).bind(a.model_dump())
