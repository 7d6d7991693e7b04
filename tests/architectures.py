"""Tiny random causal LMs of the architectures users bring, built offline from configs."""

import sysconfig
from pathlib import Path

# Each: the config class and its sizes (2 blocks, hidden 32), in that architecture's own names.
ARCHITECTURES = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2)),
    "gemma": ("GemmaConfig", dict(num_key_value_heads=2, head_dim=8)),
    "phi3": ("Phi3Config", dict(num_key_value_heads=2)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128)),
    "gpt_neox": ("GPTNeoXConfig", dict()),
}
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=128)  # fmt: skip


def tokenizer(vocab_size: int = 400, template: str | None = None, seq_len: int = 64):
    """A byte-level BPE trained on a standard-library module (eos, pad and bos defined)."""
    from llm_dist.data.tokenizer import train_bpe

    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    tok = train_bpe([text], vocab_size, seq_len)
    tok.chat_template = template
    return tok


def build(arch: str, tok, seed: int = 0):
    """A random model of `arch` sized for `tok`, its special ids those of `tok`."""
    import torch
    import transformers

    name, own = ARCHITECTURES[arch]
    sizes = {} if arch == "gpt2" else SIZES
    config = getattr(transformers, name)(
        **sizes, **own, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def save(arch: str, folder: Path, tok=None) -> str:
    """A base model folder (weights, config, tokenizer) of `arch`."""
    tok = tok or tokenizer()
    build(arch, tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def windowed(arch: str, tok):
    """A tiny model of `arch`; "-window-8": its sliding window cut to 8 (gemma2: every other
    layer slides, the others attend to everything)."""
    import torch
    import transformers

    name = arch.removesuffix("-window-8")
    if name == "gemma2":
        torch.manual_seed(0)
        config = transformers.Gemma2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, intermediate_size=64, max_position_embeddings=128, vocab_size=len(tok),
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, sliding_window=8)  # fmt: skip
        return transformers.AutoModelForCausalLM.from_config(config).eval()
    model = build(name, tok).eval()
    if arch.endswith("-window-8"):
        model.config.sliding_window = 8
        model = type(model)(model.config).eval()
    return model
