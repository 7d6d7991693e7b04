"""The `serve:` section: what Ray Serve hosts, where it listens, how it batches, scales and guards itself."""

import re
from typing import Literal

from pydantic import Field, model_validator

from llm_dist.base import Place, Section


class AutoscalingConfig(Section):
    """Ray Serve autoscaling of the model's replicas."""

    min_replicas: int = Field(1, ge=0)
    """Fewest replicas kept running."""
    max_replicas: int = Field(2, ge=1)
    """Most replicas the autoscaler starts."""
    target_ongoing_requests: float = Field(4.0, gt=0.0)
    """Ongoing requests per replica the autoscaler aims at."""
    upscale_delay_s: float = Field(30.0, ge=0.0)
    """How long load stays above target before a replica is added."""
    downscale_delay_s: float = Field(600.0, ge=0.0)
    """How long load stays below target before a replica is removed."""
    look_back_period_s: float = Field(30.0, gt=0.0)
    """The window over which Ray Serve averages each replica's ongoing requests."""

    @model_validator(mode="after")
    def _check(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"serve.autoscaling.min_replicas: {self.min_replicas} is above max_replicas "
                f"({self.max_replicas}); lower min_replicas or raise max_replicas"
            )
        return self


class ServeConfig(Section):
    """What is served, where it listens, and how it batches, scales and guards itself."""

    model: Place | None = None
    """A HF model folder (local or s3://); empty: the run's tune winner, else its pretrain export."""
    engine: Literal["transformers", "vllm"] = "transformers"
    """transformers works everywhere (CPU included); vllm (Ray Serve LLM) needs GPUs."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds to; loopback unless you mean to expose it."""
    port: int = Field(8000, ge=1, le=65535)
    """Port of the HTTP proxy."""
    route_prefix: str | None = None
    """The app's route on the proxy (its API at <route_prefix>/v1); empty: /<run name>, so that several runs' apps serve side by side on one cluster. `/` takes the proxy's root."""
    num_replicas: int = Field(1, ge=1)
    """Fixed replica count (ignored when `autoscaling` is set)."""
    autoscaling: AutoscalingConfig | None = None
    """Autoscale replicas instead of a fixed count (see `serve.autoscaling.*`)."""
    cpus_per_replica: float = Field(1.0, gt=0.0)
    """CPUs reserved per replica."""
    gpus_per_replica: float | None = Field(None, ge=0.0)
    """GPUs per replica; empty: 1 when the cluster has GPUs (always for vllm), else 0."""
    max_batch_size: int = Field(16, ge=1)
    """Most requests decoded together on one replica (vLLM's max_num_seqs); others wait for a row."""
    max_batch_total_tokens: int = Field(32768, ge=1)
    """KV cache budget of a replica's batch, in tokens: its rows times the longest prompt + max_tokens among them. A request that would pass it waits."""
    max_ongoing_requests: int = Field(32, ge=1)
    """Requests a replica accepts at once: up to max_batch_size decode, the rest wait in its engine, first come first served."""
    max_queued_requests: int = Field(64, ge=-1)
    """Requests queued beyond that before answering `overload_status` (-1: unbounded)."""
    overload_status: Literal[503, 429] = 503
    """HTTP status of a request refused because the queue is full."""
    max_tokens: int = Field(256, ge=1)
    """Cap on a request's max_tokens, and its value when the request names none."""
    max_prompt_tokens: int = Field(1024, ge=1)
    """Longer prompts are refused with 413."""
    max_request_bytes: int = Field(1_048_576, ge=1024)
    """Largest request body, in bytes, counted as it arrives: a larger one is refused with 413 before the rest is read. transformers engine (as are the limits below)."""
    max_prompt_chars: int = Field(262_144, ge=1)
    """Most characters in a prompt, or in a chat's message contents together, refused with 413 before it is tokenized."""
    max_messages: int = Field(256, ge=1)
    """Most messages in a chat request (400 above)."""
    max_stop_strings: int = Field(4, ge=0)
    """Most stop strings in a request (400 above; OpenAI's API takes 4)."""
    max_field_chars: int = Field(256, ge=1)
    """Most characters in each stop string, in `user`, in `model` and in a message's `name` (400 above)."""
    api_keys_env: str | None = None
    """Environment variable holding comma-separated API keys; when set, requests need one."""
    api_keys_file: str | None = None
    """File with one API key per line; when set, requests need one."""
    test_prompt: str = "def read_config(path):"
    """The prompt sent once the model is up, as a chat turn when the model has a chat template."""
    keep_serving: bool = False
    """After `llm-dist run`, keep the deployment up instead of stopping after the test prompt."""

    def scaling(self) -> dict:
        """Ray Serve's deployment options for the replica count: autoscaling or a fixed number."""
        if self.autoscaling:
            return {"autoscaling_config": self.autoscaling.model_dump()}
        return {"num_replicas": self.num_replicas}

    @model_validator(mode="after")
    def _check(self):
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"serve.max_ongoing_requests: {self.max_ongoing_requests} is below "
                f"max_batch_size ({self.max_batch_size}), so batches never fill; raise it"
            )
        if self.max_prompt_tokens + self.max_tokens > self.max_batch_total_tokens:
            raise ValueError(
                f"serve.max_batch_total_tokens: {self.max_batch_total_tokens} cannot hold one "
                f"request of max_prompt_tokens + max_tokens ({self.max_prompt_tokens} + "
                f"{self.max_tokens}); raise it or lower those"
            )
        if self.api_keys_env and self.api_keys_file:
            raise ValueError("serve.api_keys_env and serve.api_keys_file are both set; keep one")
        prefix = self.route_prefix
        if prefix is not None and not re.fullmatch(r"/|(/[A-Za-z0-9._~-]+)+", prefix):
            raise ValueError(
                f"serve.route_prefix: {prefix!r} is not a route; use / or /name[/name...] of "
                "letters, digits, '.', '_', '~' or '-', without a trailing /"
            )
        if (
            self.engine == "vllm"
            and self.gpus_per_replica is not None
            and self.gpus_per_replica < 1
        ):
            raise ValueError(
                "serve.engine: vllm needs a GPU per replica; set serve.gpus_per_replica: 1 "
                "or engine: transformers"
            )
        return self


def positions_of(folder: str) -> int | None:
    """The positions a local HF model folder's config declares (None when it cannot be read)."""
    from llm_dist.model import ModelConfig

    if "://" in folder:
        return None
    config = ModelConfig(preset=None, path=folder).hf_config() or {}  # standard key names
    return config.get("max_position_embeddings")


def vllm_context_problem(s: ServeConfig, positions: int | None, model: str) -> str | None:
    """vLLM refuses to start a model whose max_model_len (here max_prompt_tokens + max_tokens)
    exceeds the positions its config declares; this says so before any GPU replica starts."""
    budget = s.max_prompt_tokens + s.max_tokens
    if s.engine != "vllm" or positions is None or budget <= positions:
        return None
    return (
        f"serve.max_prompt_tokens + serve.max_tokens: {s.max_prompt_tokens} + {s.max_tokens} = "
        f"{budget} exceeds the {positions} positions of {model}, and vLLM refuses to start a "
        f"model past them; lower serve.max_prompt_tokens to at most "
        f"{max(1, positions - s.max_tokens)} or serve.max_tokens"
    )
