"""Fine-tuning methods, applied to a built model from outside: full, LoRA adapters, frozen layers."""


def apply_method(model, trial: dict):
    """`model` ready for a trial's `method` (trial settings: see `tune.*`); returns the model.

    full: every weight trains. lora: peft adapters on `lora_target_modules`, the base frozen
    (the export merges them back). freeze: the input embeddings and the first
    `freeze_layers` decoder layers keep their weights.
    """
    from llm_dist.base import UserError

    if trial["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = sorted(set(trial["lora_target_modules"]) - names)
        if missing:
            raise UserError(
                f"tune.lora_target_modules: {missing} are not module names of the base model; "
                f"its linear layers include {sorted(n for n in names if n.endswith('proj'))}"
            )
        config = LoraConfig(r=trial["lora_r"], lora_alpha=trial["lora_alpha"],
                            lora_dropout=trial["lora_dropout"], task_type="CAUSAL_LM",
                            target_modules=trial["lora_target_modules"])  # fmt: skip
        return get_peft_model(model, config)
    if trial["method"] == "freeze":
        layers = model.get_decoder().layers
        if trial["freeze_layers"] >= len(layers):
            raise UserError(
                f"tune.freeze_layers: {trial['freeze_layers']} freezes every layer of the "
                f"{len(layers)}-layer base model; freeze fewer than {len(layers)}"
            )
        model.get_input_embeddings().requires_grad_(False)
        for layer in layers[: trial["freeze_layers"]]:
            layer.requires_grad_(False)
    return model
