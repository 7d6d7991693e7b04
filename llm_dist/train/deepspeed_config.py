"""The DeepSpeed config and the optimizer's parameter groups, generated from the `pretrain:` section."""

import math


def deepspeed_config(p, use_gpu: bool) -> dict:
    """DeepSpeed's config dict for spec section `p` (a PretrainConfig), extras merged last."""
    zero: dict = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    if p.zero_stage == 3:  # consolidated 16-bit weights make the HF export a single save
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {
        "train_batch_size": p.train_batch_size,
        "train_micro_batch_size_per_gpu": p.micro_batch_size,
        "gradient_accumulation_steps": p.grad_accum,
        "gradient_clipping": p.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": p.precision == "bf16"},
        "fp16": {"enabled": p.precision == "fp16", "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW where no fused CUDA kernel exists; DeepSpeed's CPU Adam with offload
            "params": {
                "lr": p.lr,
                "betas": list(p.betas),
                "eps": 1e-8,
                "weight_decay": p.weight_decay,
                "torch_adam": not use_gpu and not p.offload_optimizer,
            },
        },
        "steps_per_print": 2**31 - 1,  # llm-dist reports its own metrics
        "wall_clock_breakdown": False,
    }
    return _merge(config, p.deepspeed)


def lr_lambda(p):
    """Multiplier of `p.lr` at each optimizer step: linear warmup, then cosine to min_lr or flat."""
    floor = p.min_lr / p.lr

    def at(step: int) -> float:
        if step < p.warmup_steps:
            return (step + 1) / (p.warmup_steps + 1)
        if p.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - p.warmup_steps) / max(1, p.max_steps - p.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return at


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norms and other vectors are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    # ZeRO-3 parameters are flat shards: their real shape is `ds_shape`
    decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]
    rest = [p for p in params if len(getattr(p, "ds_shape", p.shape)) < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def apply_schedule(scheduler, p) -> None:
    """The run's own lr, schedule and weight decay over a restored optimizer and scheduler (a
    DeepSpeed checkpoint brings back the lr and weight decay it was saved with): a PBT trial
    continues from its donor's position with its perturbed settings, and any other resume,
    whose settings are its checkpoint's, is unchanged. `scheduler` is the run's LambdaLR, its
    lambdas this run's `lr_lambda(p)`; the groups are `param_groups`' (decayed, not decayed)."""
    scheduler.base_lrs = [p.lr] * len(scheduler.base_lrs)
    groups = scheduler.optimizer.param_groups
    for i, (group, at) in enumerate(zip(groups, scheduler.lr_lambdas, strict=True)):
        group["initial_lr"], group["lr"] = p.lr, p.lr * at(scheduler.last_epoch)
        group["weight_decay"] = p.weight_decay if i == 0 else 0.0


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out
