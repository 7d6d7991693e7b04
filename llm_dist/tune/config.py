"""The `tune:` section: a Ray Tune sweep of fine-tuning trials from the pretrained model."""

from typing import Any, Literal

from pydantic import Field, model_validator

from llm_dist.base import Place, Section
from llm_dist.finetune.scores import CLASSIFICATION, GENERATION, METRICS

# Trial settings a search space may vary (each is also a field of TuneConfig, its default).
TUNABLE = ("lr", "weight_decay", "warmup_steps", "micro_batch_size", "method",
           "lora_r", "lora_alpha", "lora_dropout", "freeze_layers")  # fmt: skip
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
INTEGER = {"warmup_steps": 0, "micro_batch_size": 1, "lora_r": 1, "freeze_layers": 0}  # least
# What PBT may perturb in a running trial: the optimizer's settings, applied over a restored
# checkpoint (`deepspeed_config.apply_schedule`). The others shape the weights or the batches a
# checkpoint holds (method, LoRA's adapters, frozen blocks, the micro batch).
MUTABLE = ("lr", "weight_decay", "warmup_steps")
METHODS = {"full", "lora", "freeze"}


class TaskConfig(Section):
    """The fine-tuning task data: chat records in the formats users have, or plain text."""

    sources: list[Place] = Field(default_factory=list)
    """Files, folders or globs of .jsonl / .jsonl.gz / .parquet (and .txt for format text) with the task's records."""
    format: Literal["messages", "sft", "alpaca", "sharegpt", "classify", "text"] = "messages"
    """messages (OpenAI chat turns), sft (prompt/response pairs), alpaca (instruction, input, output), sharegpt (conversations of from/value), classify (a text and its label: the label is the assistant's answer, predicted by each label's likelihood): loss on the assistant turns only; text: continued pretraining on `text_field`."""
    text_field: str = "text"
    """The text field (formats text and classify)."""
    label_field: str = "label"
    """The label field (format classify): a string, or a whole number taken as its digits."""
    labels: list[str] | None = None
    """The label set (format classify); records with another label are quarantined (unknown_label). Empty: every label the records have."""
    metrics: list[Literal[METRICS]] = Field(default_factory=list)
    """Task metrics computed at every evaluation on the validation split (reported as `val_<name>`, which `tune.metric` may name) and on the test split for the winner and the base: exact_match, rouge_l, chrf (greedy answers; chat formats) or accuracy, f1_macro (format classify, where empty means both). All are 0-1, higher is better."""
    max_new_tokens: int = Field(64, ge=1)
    """Most tokens of a greedy answer for the generation metrics (it also ends at an end-of-turn token or a stop string)."""
    stop: list[str] = Field(default_factory=list)
    """Stop strings that end a greedy answer for the generation metrics (cut before the string)."""
    prompt_field: str = "prompt"
    """The instruction field (format sft)."""
    response_field: str = "response"
    """The response field (format sft)."""
    messages_field: str = "messages"
    """The list of `{role, content}` turns (format messages): system, developer, user, assistant."""
    conversations_field: str = "conversations"
    """The list of `{from, value}` turns (format sharegpt): system, human, gpt."""
    instruction_field: str = "instruction"
    """The instruction (format alpaca)."""
    input_field: str = "input"
    """The optional input, appended to the instruction on a new line (format alpaca)."""
    output_field: str = "output"
    """The answer (format alpaca)."""
    system_field: str = "system"
    """An optional system prompt field (formats sft, alpaca, sharegpt): a system turn first."""
    max_bad_fraction: float = Field(0.05, ge=0.0, le=1.0)
    """The stage fails, before any trial starts, when more than this fraction of records is unusable (each is quarantined; records longer than data.seq_len + 1 are left out but not counted here); task sets are small, so a few odd records weigh more than in a corpus."""
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of records held out for validation (trial selection)."""
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of records held out for the winner's unbiased test figure."""
    group_field: str | None = None
    """Records that share this field's value share a split (e.g. the document they came from); empty splits record by record."""
    packing: bool | None = None
    """Pack several training records into each window of data.seq_len + 1 tokens, each attending only to itself (position ids restart per record; transformers' masking utilities keep records apart), so a step trains on records rather than padding; validation and test stay one record per window. Empty: on for chat formats where the base model's architecture builds its mask with transformers' masking utilities (Llama, Qwen2, Mistral, Gemma, Phi-3, GPT-2, GPT-NeoX and most others), off for format text, whose windows are already full. true refuses an architecture that cannot keep packed records apart."""

    @model_validator(mode="after")
    def _check(self):
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"tune.task.val_fraction + tune.task.test_fraction: {self.val_fraction} + "
                f"{self.test_fraction} leaves no training records; keep their sum below 1"
            )
        if "" in self.stop:
            raise ValueError("tune.task.stop: an empty stop string would end every answer at "
                             "once; remove it")  # fmt: skip
        if self.format == "classify" and not self.metrics:
            self.metrics = list(CLASSIFICATION)
        allowed = {"classify": CLASSIFICATION, "text": ()}.get(self.format, GENERATION)
        wrong = [m for m in self.metrics if m not in allowed]
        if wrong:
            raise ValueError(
                f"tune.task.metrics: {', '.join(wrong)} cannot be computed for format "
                f"{self.format}; use " + (", ".join(allowed) or "none (text has no answers)")
            )
        if self.labels is not None and (
            len(set(self.labels)) < 2 or len(set(self.labels)) < len(self.labels)
            or not all(label.strip() for label in self.labels)
        ):  # fmt: skip
            raise ValueError(
                f"tune.task.labels: {self.labels} needs two or more distinct, non-blank labels"
            )
        if self.packing and self.format == "text":
            raise ValueError("tune.task.packing: format text windows are already full "
                             "(documents run on across them); leave packing out")  # fmt: skip
        if self.labels is not None and self.format != "classify":
            raise ValueError("tune.task.labels: only format classify has labels; remove it")
        return self


class TuneConfig(Section):
    """The sweep: trial defaults, the search space, the search algorithm and scheduler."""

    base_model: Place | None = None
    """A local HF model folder to fine-tune; empty means this run's pretrain export."""
    task: TaskConfig = Field(default_factory=TaskConfig)
    """The task data (see `tune.task.*`)."""
    method: Literal["full", "lora", "freeze"] = "lora"
    """Full fine-tuning, LoRA adapters (peft), or freezing the first `freeze_layers` layers."""
    lr: float = Field(1e-4, gt=0.0, le=1.0)
    """Peak learning rate of each trial (after warmup, cosine decay to a tenth of it)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay of each trial."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps of each trial."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per worker per step in each trial."""
    max_steps: int = Field(100, ge=1)
    """Optimizer steps per trial (the budget ASHA's rungs are counted in)."""
    eval_every: int = Field(20, ge=1)
    """Steps between validation reports (what ASHA decides on)."""
    lora_r: int = Field(8, ge=1)
    """LoRA rank."""
    lora_alpha: float = Field(16.0, gt=0.0)
    """LoRA scaling alpha."""
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """LoRA dropout."""
    lora_target_modules: Literal["all-linear"] | list[str] = "all-linear"
    """Linear layers that get LoRA adapters: all-linear (every one in the decoder blocks, GPT-2's Conv1D included), or a list of names (`q_proj`, `self_attn.v_proj`), checked against the base model before any trial starts."""
    freeze_layers: int = Field(0, ge=0)
    """Decoder blocks frozen from the bottom, with the input embeddings (method freeze); found in any architecture (`model.layers`, `transformer.h`, ...)."""
    num_workers: int = Field(1, ge=1)
    """Ray Train workers per trial (each trial is itself a DeepSpeed run with `pretrain`'s ZeRO and precision)."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts within a trial before it counts as failed (-1: unlimited)."""
    search_space: dict[str, Any] = Field(default_factory=dict)
    """Trial settings to vary: `{lr: {loguniform: [1e-5, 1e-3]}, method: {choice: [full, lora]}}`."""
    search: Literal["random", "optuna"] = "random"
    """random (with grid entries expanded) or optuna (TPE)."""
    scheduler: Literal["fifo", "asha", "pbt"] = "asha"
    """fifo runs every trial to the end; asha stops trials whose best evaluation so far trails at a rung; pbt (Population Based Training) runs every trial to the end, and every `perturbation_interval` steps a trial in the bottom quarter continues from a top trial's checkpoint (weights, optimizer, schedule and data position) with that trial's searched settings perturbed (only lr, weight_decay and warmup_steps may be searched)."""
    perturbation_interval: int | None = Field(None, ge=1)
    """Steps between PBT's decisions (scheduler pbt), a multiple of eval_every; empty: eval_every. A trial's final report is not a decision."""
    grace_period: int = Field(1, ge=1)
    """Evaluations a trial gets before ASHA may stop it."""
    reduction_factor: float = Field(3.0, gt=1.0)
    """ASHA keeps the best 1/reduction_factor of the trials at each rung."""
    seed: int = 0
    """Seed of the search: random draws and Optuna's sampler."""
    num_samples: int = Field(4, ge=1)
    """Trials to sample (each grid point is repeated this many times)."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials running at once; empty lets Ray fill the cluster."""
    metric: str = "val_loss"
    """The validation metric that ranks trials and that ASHA decides on: val_loss, val_ppl (perplexity), or `val_<name>` of a metric in tune.task.metrics (val_accuracy, val_rouge_l, ...)."""
    mode: Literal["min", "max"] | None = None
    """Whether a lower or higher metric wins; empty: min for val_loss and val_ppl, max for the task metrics."""

    @model_validator(mode="after")
    def _check(self):
        problems = []
        lower = ("val_loss", "val_ppl")
        known = [*lower, *(f"val_{m}" for m in self.task.metrics)]
        if self.metric == "val_perplexity":
            problems.append("tune.metric: val_perplexity is reported as val_ppl; use val_ppl")
        elif self.metric not in known:
            allowed = CLASSIFICATION if self.task.format == "classify" else GENERATION
            fix = (f"add {self.metric[4:]} to tune.task.metrics" if self.metric[4:] in allowed
                   else f"see tune.task.metrics (format {self.task.format})")  # fmt: skip
            problems.append(f"tune.metric: {self.metric} is not reported; use one of "
                            f"{', '.join(known)}, or {fix}")  # fmt: skip
        else:
            direction = "min" if self.metric in lower else "max"
            if self.mode is None:
                self.mode = direction
            elif self.mode != direction:
                problems.append(f"tune.mode: {self.mode}, but a {'lower' if direction == 'min' else 'higher'} "
                                f"{self.metric} is better; set tune.mode: {direction} or leave it empty")  # fmt: skip
        for name, dim in self.search_space.items():
            where = f"tune.search_space.{name}"
            if name not in TUNABLE:
                problems.append(f"{where}: not a tunable setting; use one of {', '.join(TUNABLE)}")
                continue
            if not (isinstance(dim, dict) and len(dim) == 1 and next(iter(dim)) in DISTRIBUTIONS):
                problems.append(
                    f"{where}: {dim!r} is not a distribution; write one of "
                    + ", ".join(f"{{{d}: [...]}}" for d in DISTRIBUTIONS)
                )
                continue
            kind, args = next(iter(dim.items()))
            if not isinstance(args, list) or not args:
                problems.append(f"{where}.{kind}: needs a non-empty list, got {args!r}")
            elif kind in ("uniform", "loguniform", "randint") and not (
                len(args) == 2
                and all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)
                and args[0] < args[1]
            ):
                problems.append(
                    f"{where}.{kind}: needs [low, high] numbers with low < high, got {args}"
                )
            elif kind == "loguniform" and args[0] <= 0:
                problems.append(f"{where}.loguniform: low must be > 0, got {args[0]}")
            elif name in INTEGER and (kind in ("uniform", "loguniform") or not all(
                isinstance(a, int) and not isinstance(a, bool) and a >= INTEGER[name] for a in args
            )):  # fmt: skip
                problems.append(
                    f"{where}.{kind}: {name} takes whole numbers >= {INTEGER[name]}: use choice, "
                    f"grid or randint of such numbers, got {args}"
                )
            elif name == "method" and (kind not in ("choice", "grid") or not set(args) <= METHODS):
                problems.append(
                    f"{where}.{kind}: method is one of {', '.join(sorted(METHODS))} by choice or "
                    f"grid, got {args}"
                )
            elif kind == "grid" and self.search == "optuna":
                problems.append(
                    f"{where}.grid: optuna cannot search a grid; use choice or search: random"
                )
        if self.scheduler == "pbt":
            problems += self._pbt_problems()
        elif self.perturbation_interval is not None:
            problems.append(f"tune.perturbation_interval: only scheduler pbt perturbs trials "
                            f"(scheduler is {self.scheduler}); remove it or set scheduler: pbt")  # fmt: skip
        warmup = self.search_space.get("warmup_steps", {})
        values = (
            [self.warmup_steps, *next(iter(warmup.values()), [])] if warmup else [self.warmup_steps]
        )
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if numbers and max(numbers) >= self.max_steps:
            problems.append(
                f"tune.warmup_steps: {max(numbers)} is not below tune.max_steps "
                f"({self.max_steps}); lower the warmup or raise max_steps"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _pbt_problems(self) -> list[str]:
        problems = [
            f"tune.search_space.{name}: PBT perturbs every searched setting while trials run, "
            f"and {name} cannot change in a running trial (its checkpoint is made of it); set "
            f"tune.{name} instead, or search only {', '.join(MUTABLE)}"
            for name in self.search_space if name in TUNABLE and name not in MUTABLE
        ]  # fmt: skip
        if self.search == "optuna":
            problems.append("tune.search: optuna's suggestions do not follow PBT's clones; use "
                            "search: random with scheduler pbt")  # fmt: skip
        interval = self.perturbation_interval or self.eval_every
        if interval % self.eval_every:
            problems.append(f"tune.perturbation_interval: {interval} is not a multiple of "
                            f"tune.eval_every ({self.eval_every}): PBT decides on evaluations; "
                            f"use {self.eval_every * max(1, round(interval / self.eval_every))}")  # fmt: skip
        return problems
