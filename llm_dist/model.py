"""The `model:` section and the model presets: a causal LM built from a preset, a HF config or a folder."""

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from llm_dist.base import Place, Section

# Llama-architecture sizes. `tiny` trains on two CPU cores in minutes; the rest are
# for clusters. Vocabulary size always follows the tokenizer.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, intermediate_size=704, max_position_embeddings=512,
                 tie_word_embeddings=True),
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, intermediate_size=2048, max_position_embeddings=2048,
                 tie_word_embeddings=True),
    "350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16, intermediate_size=2816, max_position_embeddings=2048,
                 tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, intermediate_size=8192, max_position_embeddings=4096,
               tie_word_embeddings=True),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=4096,
               tie_word_embeddings=False),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, intermediate_size=13824, max_position_embeddings=4096,
                tie_word_embeddings=False),
}  # fmt: skip


STANDARD_KEYS = ("max_position_embeddings", "hidden_size", "num_attention_heads",
                 "num_key_value_heads", "num_hidden_layers")  # fmt: skip


class ModelConfig(Section):
    """Which causal LM to train: exactly one of `preset`, `config` or `path`."""

    preset: Literal["tiny", "125m", "350m", "1b", "7b", "13b"] | None = "tiny"
    """A named Llama-architecture size; set it to null when `config` or `path` is used."""
    config: str | None = None
    """A Hugging Face `config.json` to build the model from (random weights)."""
    path: Place | None = None
    """A local Hugging Face model folder to start from (its weights are loaded)."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Hugging Face config keys to change, e.g. `{num_hidden_layers: 2}`."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Attention dropout probability."""

    @model_validator(mode="after")
    def _one_source(self):
        chosen = [k for k in ("preset", "config", "path") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(
                f"model: {' and '.join(chosen) or 'none'} set; set exactly one of model.preset, "
                "model.config or model.path (set the others to null)"
            )
        if "vocab_size" in self.overrides:
            raise ValueError(
                "model.overrides.vocab_size: the vocabulary follows the tokenizer; "
                "set data.tokenizer.vocab_size instead"
            )
        return self

    def hf_config(self) -> dict[str, Any] | None:
        """The Hugging Face config keys known without building the model (None when unreadable),
        in transformers' standard names whatever the architecture calls them (GPT-2's
        `n_positions` is `max_position_embeddings`)."""
        if self.preset is not None:
            return {**PRESETS[self.preset], **self.overrides}
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(self.config or self.path, local_files_only=True)
        except (OSError, ValueError):
            return None
        config.update(self.overrides)
        return {k: getattr(config, k) for k in STANDARD_KEYS if getattr(config, k, None)}


def build(cfg: ModelConfig, tokenizer):
    """A causal LM for `tokenizer`: random weights from a preset or config, or a local folder's.

    Plain transformers: nothing here knows about Ray or DeepSpeed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from llm_dist.base import UserError
    from llm_dist.storage import local_folder

    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    if cfg.path is not None:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                local_folder(cfg.path), local_files_only=True
            )
        except (OSError, ValueError) as e:
            raise UserError(f"model.path: cannot load a model from {cfg.path!r}: {e}") from None
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            raise UserError(
                f"model.path: {cfg.path!r} has {model.get_input_embeddings().num_embeddings} "
                f"token embeddings but the tokenizer has {len(tokenizer)} tokens; use that "
                "model's own tokenizer as data.tokenizer.path"
            )
        return model
    if cfg.config is not None:
        try:
            config = AutoConfig.from_pretrained(cfg.config, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"model.config: cannot read {cfg.config!r}: {e}") from None
        config.update({**cfg.overrides, **special, "attention_dropout": cfg.dropout})
    else:
        config = LlamaConfig(**{**PRESETS[cfg.preset], **cfg.overrides, **special},
                             attention_dropout=cfg.dropout)  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def check_folder(uri: str, field: str):
    """Check a HF model folder (local or object storage) before any worker loads it.

    It must have a config.json and a usable tokenizer whose tokens the embeddings cover;
    returns the tokenizer. `field` names the setting the folder came from, for the error.
    """
    from llm_dist.base import UserError
    from llm_dist.data.tokenizer import load
    from llm_dist.storage import exists, local_folder

    if not exists(f"{uri}/config.json"):
        raise UserError(f"{field}: {uri!r} is not a Hugging Face model folder (no "
                        "config.json); name a folder saved with save_pretrained")  # fmt: skip
    local = local_folder(uri)  # a copy, for object storage: transformers reads local files
    try:
        tokenizer = load(local)
    except UserError as e:
        raise UserError(f"{field}: {uri!r} has no usable tokenizer ({e})") from None
    vocab = json.loads(Path(local, "config.json").read_text()).get("vocab_size", 0)
    if vocab < len(tokenizer):
        raise UserError(
            f"{field}: the model in {uri!r} has {vocab} token embeddings but its tokenizer has "
            f"{len(tokenizer)} tokens: they belong to different vocabularies; save the model's "
            "own tokenizer into the folder"
        )
    return tokenizer


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12·L·d·T (N: parameters outside the input embedding)."""

    def numel(p) -> int:  # a ZeRO-3 shard knows its whole size as `ds_numel`
        return getattr(p, "ds_numel", p.numel())

    config, embedding = model.config, numel(model.get_input_embeddings().weight)
    n = sum(numel(p) for p in model.parameters()) - embedding
    if config.tie_word_embeddings:  # the tied output projection still costs its matmul
        n += embedding
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seq_len
