"""`kind: serve`: deploy a raybig export behind an OpenAI-compatible, autoscaled Ray Serve app."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from raybig.spec.base import NAME_RE, Bytes, Name, Strict, at

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ReplicaResourcesSpec(Strict):
    """Ray resources reserved by each replica."""

    num_cpus: float = Field(1.0, gt=0.0, le=1024, description="CPUs per replica (fractions allowed).")
    num_gpus: float = Field(0.0, ge=0.0, le=16, description="GPUs per replica.")
    memory: Bytes | None = Field(None, description="RAM per replica in bytes, e.g. '2GiB'.")
    torch_threads: int | None = Field(None, ge=1, le=1024, description="torch intra-op threads per "
                                      "replica (default: max(1, num_cpus)).")


class AutoscalingSpec(Strict):
    """Ray Serve autoscaling: replicas follow the number of ongoing requests."""

    min_replicas: int = Field(1, ge=0, le=10_000, description="Fewest replicas (0 = scale to zero).")
    max_replicas: int = Field(1, ge=1, le=10_000, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, le=10_000, description="Replicas at deploy time.")
    target_ongoing_requests: float = Field(2.0, gt=0.0, description="Ongoing requests per replica to aim for.")
    upscale_delay_s: float = Field(30.0, ge=0.0, description="Load must stay high this long to add replicas.")
    downscale_delay_s: float = Field(600.0, ge=0.0, description="Load must stay low this long to remove them.")
    look_back_period_s: float = Field(30.0, gt=0.0, description="Window over which load is averaged.")

    @model_validator(mode="after")
    def _check(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise at("min_replicas", f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}")
        if self.initial_replicas is not None and not (
                self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise at("initial_replicas", f"initial_replicas={self.initial_replicas} must be between "
                     f"min_replicas={self.min_replicas} and max_replicas={self.max_replicas}")
        return self

    def to_serve(self) -> dict:
        """Ray Serve's `autoscaling_config` dict (unset keys left out)."""
        return self.model_dump(exclude_none=True)


class BatchingSpec(Strict):
    """How a replica batches concurrent requests.

    `continuous` (default): iteration-level scheduling, as vLLM does: at every decode step finished
    rows leave and waiting ones join, up to `max_num_seqs` rows, each with a preallocated KV slot.
    `static`: Serve's `@serve.batch` gathers requests into a batch that runs until its longest row
    ends (the old engine; kept as the benchmark baseline).
    """

    mode: Literal["continuous", "static"] = Field("continuous", description="continuous (iteration-level "
                                                  "scheduling) or static (whole batches, @serve.batch).")
    enabled: bool = Field(True, description="Batch concurrent requests (off = one row at a time).")
    max_num_seqs: int = Field(8, ge=1, le=1024, description="Most rows (prompts x n) generated together; "
                              "each holds one KV slot. Old name: max_batch_size (accepted).")
    max_prefill_tokens: int = Field(512, ge=1, le=1_000_000, description="Prompt tokens prefilled per "
                                    "engine step (continuous); longer prompts are chunked over steps.")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, le=10.0, description="Wait this long to fill a batch "
                                        "(static mode only).")
    max_ongoing_requests: int | None = Field(None, ge=1, le=100_000, description="Requests a replica holds at "
                                             "once (default: 2 x max_num_seqs); must be >= max_num_seqs.")
    max_queued_requests: int = Field(64, ge=-1, le=1_000_000, description="Requests waiting for a replica "
                                     "before new ones get 503 (-1 = unbounded).")

    @model_validator(mode="before")
    @classmethod
    def _alias(cls, data: object) -> object:
        """`max_batch_size` (the old name) is `max_num_seqs`; both at once must agree."""
        if isinstance(data, dict) and "max_batch_size" in data:
            data = dict(data)
            old = data.pop("max_batch_size")
            if "max_num_seqs" in data and data["max_num_seqs"] != old:
                raise ValueError("max_batch_size is the old name of max_num_seqs; give one of them")
            data["max_num_seqs"] = old
        return data

    @model_validator(mode="after")
    def _check(self) -> BatchingSpec:
        # Serve silently caps concurrency at max_ongoing_requests, so refuse the combination.
        if self.enabled and self.max_ongoing_requests is not None and \
                self.max_ongoing_requests < self.max_num_seqs:
            raise at("max_ongoing_requests", f"max_ongoing_requests={self.max_ongoing_requests} is below "
                     f"max_num_seqs={self.max_num_seqs}; Serve would silently cap batches at it")
        return self

    @property
    def max_batch_size(self) -> int:
        """The old name of `max_num_seqs`."""
        return self.max_num_seqs

    @property
    def batch_size(self) -> int:
        """Rows per step: max_num_seqs, or 1 with batching off."""
        return self.max_num_seqs if self.enabled else 1

    @property
    def ongoing(self) -> int:
        """Serve's max_ongoing_requests per replica (default: twice the batch, at least 4)."""
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return max(2 * self.batch_size, 4)


class GenerationSpec(Strict):
    """Defaults for requests that leave a parameter out, and hard limits no request may exceed."""

    max_tokens: int = Field(64, ge=1, description="Default max_tokens.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Default temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Default top_p.")
    max_new_tokens: int = Field(256, ge=1, le=1_000_000, description="Hard limit on max_tokens.")
    max_prompt_tokens: int = Field(1024, ge=1, le=1_000_000, description="Hard limit on prompt tokens.")
    max_n: int = Field(4, ge=1, le=128, description="Hard limit on n (choices per prompt).")
    max_prompts: int = Field(16, ge=1, le=1024, description="Hard limit on prompts per request.")

    @model_validator(mode="after")
    def _check(self) -> GenerationSpec:
        if self.max_tokens > self.max_new_tokens:
            raise at("max_tokens", f"default max_tokens={self.max_tokens} exceeds "
                     f"max_new_tokens={self.max_new_tokens}")
        return self


class ServeSpec(Strict):
    """Serve a trained checkpoint over an OpenAI-compatible HTTP API on Ray Serve."""

    kind: Literal["serve"] = "serve"
    name: Name = Field(..., pattern=NAME_RE, description="Serve application name; also the model id.")
    checkpoint: str = Field(..., min_length=1, description="A train run directory or its export/ directory "
                            "(any fsspec URI).")
    quantize: Literal["none", "int8"] = Field("none", description="int8 = dynamic int8 quantization of "
                                              "Linear layers (CPU serving).")
    engine: Literal["raybig", "vllm"] = Field("raybig", description="raybig: raybig's continuous-batching "
                                              "engine (CPU, or the replica's GPU in bf16/fp16). vllm: Ray Serve "
                                              "LLM with vLLM for an HF export; needs vllm installed and a GPU.")
    resources: ReplicaResourcesSpec = Field(default_factory=ReplicaResourcesSpec)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    host: str = Field("127.0.0.1", min_length=1, description="HTTP bind address (when Serve starts).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port (when Serve starts).")
    route_prefix: str = Field("/", description="URL prefix of this app; the API lives at <prefix>/v1.")
    api_key_env: str | None = Field(None, description="Name of the environment variable holding the API key "
                                    "(the key itself never goes in the spec).")
    max_inputs: int = Field(256, ge=1, le=100_000, description="A classifier export: most examples per "
                            "POST /v1/predict request (more is a 400; the body limit follows from it).")

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/") or (len(v) > 1 and v.endswith("/")) or not re.fullmatch(r"[\w/.-]*", v):
            raise ValueError("must start with '/', not end with '/', and hold only letters, digits, _ . - /")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v is not None and not ENV_NAME_RE.match(v):
            raise ValueError("must be the NAME of an environment variable (e.g. RAYBIG_API_KEY), "
                             "not the key itself")
        return v

    @field_validator("engine")
    @classmethod
    def _engine(cls, v: str) -> str:
        import importlib.util

        if v == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError("vllm needs the vllm package and a GPU; vllm is not installed here")
        return v

    @model_validator(mode="after")
    def _vllm(self) -> ServeSpec:
        # Ray Serve LLM owns the HTTP layer and the batching for engine: vllm; refuse what it cannot honour.
        if self.engine != "vllm":
            return self
        if self.resources.num_gpus < 1 or self.resources.num_gpus != int(self.resources.num_gpus):
            raise at("resources.num_gpus", "engine: vllm needs whole GPUs per replica (num_gpus >= 1; it is "
                     "the tensor-parallel size)")
        if self.quantize != "none":
            raise at("quantize", "int8 is raybig's CPU quantization; with engine: vllm use vLLM's own "
                     "quantized checkpoints")
        if self.api_key_env is not None:
            raise at("api_key_env", "engine: vllm serves through Ray Serve LLM's ingress, which has no API "
                     "key check; put an authenticating gateway in front, or use engine: raybig")
        return self

    @field_validator("checkpoint")
    @classmethod
    def _ckpt(cls, v: str) -> str:
        if v.startswith("memory://"):
            raise ValueError("memory:// is per-process; replicas cannot read it")
        return v

