"""What a stage's result was made from (its `Origin`), and reuse only where that matches.

A result is reused when the settings that decide it are the spec's now; otherwise the run
stops before anything is written, saying what differs (a new `name` starts a new run folder,
which reuses whatever prepared data still fits). Settings that only extend a run or say how it
runs (a higher `pretrain.max_steps`, how often it logs or checkpoints, the worker count, the
cluster) are not part of it: a higher max_steps continues from the last checkpoint.
"""

from llm_dist.base import UserError, flat
from llm_dist.records import Origin, TrainResult, Winner

# pretrain settings that extend a run or say how it runs, not what it makes
PRETRAIN_RUNTIME = {"max_steps", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                    "keep_checkpoints", "max_failures", "max_bad_steps", "num_workers"}  # fmt: skip
# tune settings that say how the sweep runs; trial settings from `pretrain` that decide a trial
TUNE_RUNTIME = {"max_concurrent_trials", "max_failures"}
TRIAL_PRETRAIN = ("zero_stage", "offload_optimizer", "offload_params", "precision", "betas",
                  "grad_clip", "activation_checkpointing", "seed", "deepspeed")  # fmt: skip


def pretrain_origin(spec, data_fingerprint: str | None = None) -> Origin:
    """Pretraining's deciding settings: the data section (its error budget aside, which is
    checked again on every run), the model, and pretrain's own, with the data's fingerprint."""
    data = spec.data.model_dump(mode="json", exclude={"max_bad_fraction"})
    pretrain = spec.pretrain.model_dump(mode="json", exclude=PRETRAIN_RUNTIME)
    settings = flat({"data": data, "model": spec.model.model_dump(mode="json"),
                      "pretrain": pretrain})  # fmt: skip
    inputs = {"data_fingerprint": data_fingerprint} if data_fingerprint else {}
    return Origin.of(settings, inputs)


def tune_origin(spec, base: str, base_result: TrainResult | None) -> Origin:
    """The sweep's deciding settings, and its base model: the folder, and for this run's own
    pretrain export the step and settings it was made at (a longer pretraining is a new base)."""
    settings = flat({
        "tune": spec.tune.model_dump(mode="json", exclude=TUNE_RUNTIME),
        "data": spec.data.model_dump(mode="json", include={"seq_len", "seed"}),
        "pretrain": spec.pretrain.model_dump(mode="json", include=set(TRIAL_PRETRAIN)),
    })  # fmt: skip
    inputs = {"base_model": base}
    if base_result is not None and base_result.origin is not None:
        inputs |= {"base_step": base_result.step, "base_origin": base_result.origin.digest}
    return Origin.of(settings, inputs)


def check(what: str, recorded: Origin | None, wanted: Origin, where: str) -> None:
    """Raise a UserError when the `recorded` origin of `what` (in `where`) is not `wanted`."""
    if recorded is None:
        raise UserError(f"{what} in {where} records no origin (another llm-dist wrote it); "
                        "run under a new name with --set name=...")  # fmt: skip
    differs = recorded.differences(wanted)
    if differs:
        listing = "; ".join(differs[:8]) + (
            f"; and {len(differs) - 8} more" if len(differs) > 8 else ""
        )
        if any(d.startswith("data_fingerprint:") for d in differs):
            listing += " (the fingerprint follows the corpus files' sizes and modification times)"
        raise UserError(
            f"{what} in {where} was made from other settings than this spec's ({listing}; "
            "recorded -> this spec): it is not reused. Run under a new name (--set name=...) "
            "to make it afresh, or set the spec back"
        )


def check_pretrain(spec, result: TrainResult, where: str, data_fingerprint: str | None = None):
    check("the pretraining result", result.origin, pretrain_origin(spec, data_fingerprint), where)


def check_winner(spec, winner: Winner, base: str, base_result: TrainResult | None, where: str):
    check("the tune winner", winner.origin, tune_origin(spec, base, base_result), where)


def check_run(spec, folder, stages: list[str], resume: bool = False,
              data_fingerprint: str | None = None) -> None:  # fmt: skip
    """Before a run writes anything (the manifest takes the new spec): every result in the
    RunFolder `folder` was made from this spec (pretraining from the data of `data_fingerprint`
    too, when known), else a UserError saying what differs; so the manifest never describes a
    result it did not produce. A tune winner is also refused when this run trains its base on
    (`pretrain` in `stages` with a higher max_steps). The data stage is not checked: prepared
    data is found by its fingerprint, so other data is simply other data."""
    from pathlib import Path

    folder.read_manifest()  # a run folder of another records version is refused here
    own_base = not spec.tune.base_model
    pretrained = folder.pretrain.read_result()
    if pretrained is not None:
        fingerprint = data_fingerprint if "pretrain" in stages else None
        check_pretrain(spec, pretrained, folder.pretrain.result, fingerprint)
    winner = folder.read_winner()
    if winner is None or ("tune" in stages and resume):  # a resumed sweep makes a new one
        return
    if own_base:
        if pretrained is None:
            raise UserError(f"the tune winner in {folder.winner} has no pretraining result "
                            f"beside it ({folder.pretrain.result}); run under a new name")  # fmt: skip
        base = pretrained.export
        if "pretrain" in stages and pretrained.step < spec.pretrain.max_steps:
            # this run trains the base on: the winner would be of an older base
            pretrained = pretrained.model_copy(update={"step": spec.pretrain.max_steps})
    else:
        base = spec.tune.base_model
    base = base if "://" in base else str(Path(base).resolve())
    check_winner(spec, winner, base, pretrained if own_base else None, folder.winner)
