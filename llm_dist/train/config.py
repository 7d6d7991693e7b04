"""The `pretrain:` section: workers, ZeRO, precision, batch, optimizer, schedule, eval and checkpoints."""

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, model_validator

from llm_dist.base import Section

# DeepSpeed keys the spec generates itself: passing them in `pretrain.deepspeed` would
# silently fight the spec, so each one names the field to set instead.
OWNED_DEEPSPEED_KEYS = {
    "train_batch_size": "pretrain.global_batch_size",
    "train_micro_batch_size_per_gpu": "pretrain.micro_batch_size",
    "gradient_accumulation_steps": "pretrain.grad_accum_steps",
    "gradient_clipping": "pretrain.grad_clip",
    "optimizer": "pretrain.lr / pretrain.weight_decay / pretrain.betas",
    "scheduler": "pretrain.schedule / pretrain.warmup_steps",
    "bf16": "pretrain.precision",
    "fp16": "pretrain.precision",
}


class PretrainConfig(Section):
    """How the model is pretrained: the Ray Train workers and each worker's DeepSpeed engine."""

    num_workers: int = Field(2, ge=1)
    """Ray Train workers, one DeepSpeed rank each (one GPU each when GPUs are used)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage: 0 plain data parallel, 1 optimizer, 2 + gradients, 3 + parameters sharded."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (ZeRO >= 1)."""
    offload_params: bool = False
    """Keep parameters in CPU memory (ZeRO-3 only)."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Training precision; fp16 needs GPUs."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per worker per forward pass."""
    grad_accum_steps: int | None = Field(None, ge=1)
    """Micro batches accumulated per step; empty derives it from global_batch_size (else 1)."""
    global_batch_size: int | None = Field(None, ge=1)
    """Sequences per optimizer step across all workers; empty means workers x micro x accumulation."""
    max_steps: int = Field(200, ge=1)
    """Optimizer steps to train for."""
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    """Peak learning rate (AdamW)."""
    min_lr: float = Field(1e-4, ge=0.0)
    """Learning rate at the end of the cosine decay."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """After warmup: cosine decay to min_lr, or constant at lr."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warmup steps from 0 to lr."""
    weight_decay: float = Field(0.1, ge=0.0)
    """AdamW weight decay (not applied to biases and norms)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Clip the global gradient norm to this (0 turns clipping off)."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    log_every: int = Field(10, ge=1)
    """Steps between metric reports."""
    eval_every: int = Field(50, ge=1)
    """Steps between validation passes."""
    eval_batches: int = Field(20, ge=1)
    """Validation batches per worker per evaluation."""
    checkpoint_every: int = Field(100, ge=1)
    """Steps between checkpoints (one is always written at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Whole checkpoints that exist at every moment, even while the next one is written; Ray Train keeps one more on disk (it deletes the oldest when a new one is registered, before that one is whole) and deletes older ones."""
    max_failures: int = Field(1, ge=-1)
    """Worker-group restarts Ray Train attempts after a failure (-1: unlimited)."""
    max_bad_steps: int = Field(5, ge=1)
    """NaN/inf steps in a row that stop the run (each one is skipped, never checkpointed)."""
    seed: int = 0
    """Seed of model initialisation, dropout and data order."""
    deepspeed: dict[str, Any] = Field(default_factory=dict)
    """Extra DeepSpeed config keys merged into the generated config (keys the spec owns are refused)."""

    @property
    def grad_accum(self) -> int:
        """Micro batches per optimizer step, resolved from the batch fields."""
        if self.grad_accum_steps is not None:
            return self.grad_accum_steps
        if self.global_batch_size is not None:
            return max(1, self.global_batch_size // (self.num_workers * self.micro_batch_size))
        return 1

    @property
    def train_batch_size(self) -> int:
        """Sequences per optimizer step across all workers (DeepSpeed's train_batch_size)."""
        return self.num_workers * self.micro_batch_size * self.grad_accum

    @model_validator(mode="after")
    def _check(self):
        problems = []
        per_pass = self.num_workers * self.micro_batch_size
        if self.global_batch_size is not None:
            if self.grad_accum_steps is None and self.global_batch_size % per_pass:
                problems.append(
                    f"pretrain.global_batch_size: {self.global_batch_size} is not divisible by "
                    f"num_workers x micro_batch_size = {per_pass}; use a multiple of {per_pass}"
                )
            elif (
                self.grad_accum_steps is not None
                and self.global_batch_size != self.train_batch_size
            ):
                problems.append(
                    f"pretrain.global_batch_size: {self.global_batch_size} != num_workers x "
                    f"micro_batch_size x grad_accum_steps = {self.train_batch_size}; "
                    "leave one of global_batch_size or grad_accum_steps empty"
                )
        if self.offload_optimizer and self.zero_stage == 0:
            problems.append(
                "pretrain.offload_optimizer: needs ZeRO >= 1 (zero_stage is 0); "
                "set pretrain.zero_stage: 2 or offload_optimizer: false"
            )
        if self.offload_params and self.zero_stage != 3:
            problems.append(
                f"pretrain.offload_params: needs ZeRO-3 (zero_stage is {self.zero_stage}); "
                "set pretrain.zero_stage: 3 or offload_params: false"
            )
        if self.warmup_steps >= self.max_steps:
            problems.append(
                f"pretrain.warmup_steps: {self.warmup_steps} is not below max_steps "
                f"({self.max_steps}); lower warmup_steps or raise max_steps"
            )
        if self.schedule == "cosine" and self.min_lr > self.lr:
            problems.append(
                f"pretrain.min_lr: {self.min_lr} is above lr ({self.lr}); set min_lr <= lr"
            )
        for key in sorted(self.deepspeed.keys() & OWNED_DEEPSPEED_KEYS.keys()):
            problems.append(
                f"pretrain.deepspeed.{key}: generated from the spec; set "
                f"{OWNED_DEEPSPEED_KEYS[key]} instead"
            )
        zero = self.deepspeed.get("zero_optimization", {})
        if isinstance(zero, dict) and "stage" in zero:
            problems.append(
                "pretrain.deepspeed.zero_optimization.stage: generated from the spec; "
                "set pretrain.zero_stage instead"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self


@dataclass(frozen=True)
class LoopConfig:
    """Everything one run of the worker loop needs, handed to each Ray Train worker.

    Pretraining has no `finetuning`; a tune trial has its method there (and `spec.model` is the
    base folder), and the loop then leaves the test split alone.
    """

    spec: Any  # the JobSpec the run trains with (`pretrain` holds a trial's settings)
    out: str  # where checkpoints/, export/, metrics.jsonl and result.json go
    prepared: str  # the prepared data folder (train/, val/, test/, tokenizer/)
    queue: Any = None  # a ray.util.queue.Queue for live metrics to the driver, or None
    finetuning: Any = None  # a `llm_dist.finetune.methods.FineTuning`, or None
    nan_at: dict[int, str] = field(default_factory=dict)  # injected NaN losses (tests)
    origin: Any = None  # pretraining's `records.Origin`: into its checkpoints and result
    launched: float | None = None  # time.time() when the trainer was made: the start's clock
    exploit: Any = None  # a PBT trial's `records.Exploit`: the donor checkpoint it starts from
    kill_at_commit: int | None = None  # an injected kill in a checkpoint's commit window (tests)
