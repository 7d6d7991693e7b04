"""DeepSpeed for the worker loop: the process group, models built straight into ZeRO-3 shards,
and whole weights gathered where one rank needs them (samples, the export)."""

import contextlib


def init_distributed(device) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def build_config(ds_config: dict, zero_stage: int):
    """transformers' handle on a ZeRO-3 config, or None: while it is alive, models are created
    straight into their shards, and generation knows ZeRO-3 is on. Keep it for the run."""
    if zero_stage != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def synced_generation(zero_stage: int, world: int) -> bool:
    """Whether every rank must take part in each generation step (ZeRO-3 shards the weights)."""
    return zero_stage == 3 and world > 1


@contextlib.contextmanager
def whole_weights(engine):
    """The engine's whole weights on every rank inside the block: gathered under ZeRO-3 (and
    handed back to their shards after), a no-op otherwise."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        yield engine.module
