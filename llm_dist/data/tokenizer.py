"""The tokenizer: a local Hugging Face folder, or a byte-level BPE trained on a corpus sample."""

from collections.abc import Iterable

from llm_dist.base import UserError

BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"


def train_bpe(texts: Iterable[str], vocab_size: int, seq_len: int):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=seq_len,
    )  # fmt: skip


def load(path: str):
    """A local HF tokenizer folder as a fast tokenizer with eos and pad defined."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(
            f"data.tokenizer.path: cannot load a tokenizer from {path!r}: {e}"
        ) from None
    if not tok.is_fast:
        raise UserError(
            f"data.tokenizer.path: {path!r} has no fast (Rust) tokenizer; convert it first"
        )
    if tok.eos_token_id is None:
        raise UserError(f"data.tokenizer.path: {path!r} defines no eos token; add one")
    if tok.pad_token is None:  # padding is only ever masked out, so eos can stand in
        tok.pad_token = tok.eos_token
    return tok
