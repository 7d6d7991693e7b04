"""Fine-tuning methods, applied to a built model from outside: full, LoRA adapters, frozen layers.

They work on any transformers causal LM: LoRA targets every linear layer of the decoder blocks
by default (peft's `all-linear`: `nn.Linear` and GPT-2's `Conv1D`, not the output head), and
`freeze` finds the block list whatever the architecture calls it (`model.layers`,
`transformer.h`, `gpt_neox.layers`, ...). `check_base` makes both checks on the base model's
config (built on the meta device, no weights read) before any trial starts.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llm_dist.base import UserError


class FineTuning(BaseModel):
    """What the worker loop needs to turn a base model into one trial's model (see `tune.*`)."""

    model_config = ConfigDict(frozen=True)

    method: Literal["full", "lora", "freeze"]
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0.0)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target_modules: str | list[str] = "all-linear"
    freeze_layers: int = Field(0, ge=0)


def apply_method(model, ft: FineTuning):
    """`model` ready for `ft.method`; returns the model (a peft model for LoRA).

    full: every weight trains. lora: peft adapters on `lora_target_modules`, the base frozen
    (the export merges them back). freeze: the input embeddings and the first `freeze_layers`
    decoder blocks keep their weights. Raises UserError for targets or layers the model lacks.
    """
    if ft.method == "lora":
        from peft import LoraConfig, get_peft_model

        check_targets(model, ft.lora_target_modules)
        config = LoraConfig(r=ft.lora_r, lora_alpha=ft.lora_alpha, lora_dropout=ft.lora_dropout,
                            target_modules=ft.lora_target_modules, task_type="CAUSAL_LM")  # fmt: skip
        return get_peft_model(model, config)
    if ft.method == "freeze":
        layers = blocks(model)
        check_freeze(len(layers), ft.freeze_layers)
        model.get_input_embeddings().requires_grad_(False)
        for layer in layers[: ft.freeze_layers]:
            layer.requires_grad_(False)
    return model


def blocks(model):
    """The decoder's block list: the `nn.ModuleList` with one entry per hidden layer (the
    largest, if several have that length). Raises UserError when the model has none."""
    import torch

    config = model.config.get_text_config()
    lists = [m for m in model.modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == config.num_hidden_layers]  # fmt: skip
    if not lists:
        raise UserError(
            f"tune.method: freeze needs the decoder's list of {config.num_hidden_layers} blocks, "
            f"and {type(model).__name__} has none; use method lora or full"
        )
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def linear_names(model) -> list[str]:
    """The names (last part) of the linear layers in the decoder blocks: LoRA's candidates."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, m in blocks(model).named_modules()
                   if isinstance(m, torch.nn.Linear | Conv1D)})  # fmt: skip


def check_targets(model, targets: str | list[str]) -> None:
    """An explicit `tune.lora_target_modules` list must name linear layers of the blocks
    (by their last part or a dotted suffix, as peft matches them)."""
    if isinstance(targets, str):
        if targets != "all-linear":
            raise UserError(
                f"tune.lora_target_modules: {targets!r} is not a list; write all-linear or a "
                f"list of the model's linear layers: {linear_names(model)}"
            )
        return
    import torch
    from transformers.pytorch_utils import Conv1D

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D)]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise UserError(
            f"tune.lora_target_modules: {missing} are not linear layers of the base model "
            f"({type(model).__name__}); its blocks' linear layers are {linear_names(model)} "
            "(or write all-linear)"
        )


def check_freeze(layers: int, freeze: int) -> None:
    if freeze >= layers:
        raise UserError(
            f"tune.freeze_layers: {freeze} freezes every block of the {layers}-layer base "
            f"model; freeze fewer than {layers}"
        )


def check_base(folder: str, tune) -> None:
    """The trials' methods fit the base model in `folder` (a local HF folder), or a UserError
    now: LoRA targets, and the largest `freeze_layers` the search space can draw."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # the modules' names and shapes only: no memory, no weights
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    space = tune.search_space

    def values(name: str) -> list:  # what trials can draw: the search space's, else the default
        if name not in space:
            return [getattr(tune, name)]
        kind, args = next(iter(space[name].items()))
        return [args[1] - 1] if kind == "randint" else list(args)  # randint's high is excluded

    if "lora" in values("method"):
        check_targets(model, tune.lora_target_modules)
    if "freeze" in values("method"):
        check_freeze(len(blocks(model)), max(values("freeze_layers")))
