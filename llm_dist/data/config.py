"""The `data:` section of a job spec: where the corpus is and how it becomes training windows."""

from typing import Literal

from pydantic import Field, model_validator

from llm_dist.base import Place, Section


class TokenizerConfig(Section):
    """Which tokenizer turns text into ids: a local Hugging Face folder, or one trained here."""

    path: str | None = None
    """A local Hugging Face tokenizer folder. Leave empty to train a byte-level BPE tokenizer on the corpus."""
    vocab_size: int = Field(8192, ge=256, le=1_048_576)
    """Vocabulary size of the BPE tokenizer trained when `path` is empty (the model's vocabulary follows it)."""
    train_sample_docs: int = Field(20_000, ge=1)
    """How many documents (a seeded sample) the BPE tokenizer is trained on."""


class DataConfig(Section):
    """Corpus sources, cleaning, tokenizer, packing and the held-out splits."""

    sources: list[Place] = Field(default_factory=list)
    """Files, folders or globs of .jsonl, .jsonl.gz, .parquet or .txt, local or s3:// gs://."""
    text_field: str = Field("text", min_length=1)
    """The field (JSONL) or column (Parquet) that holds each document's text."""
    txt_split: Literal["file", "blank_line"] = "file"
    """How a .txt file becomes documents: one per file, or one per blank-line-separated block."""
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    """The stage fails when more than this fraction of records is quarantined as bad."""
    min_chars: int = Field(1, ge=1)
    """Documents shorter than this (after cleaning) are dropped."""
    max_chars: int | None = Field(None, ge=1)
    """Documents longer than this are dropped; empty means no limit."""
    max_line_bytes: int = Field(8_000_000, ge=1024)
    """A JSONL line, or a .txt document (a file or a blank-line block), longer than this is quarantined instead of parsed (line_too_long, document_too_long)."""
    dedup: bool = False
    """Drop exact duplicate documents (by a hash of the cleaned text)."""
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    """The tokenizer (see `data.tokenizer.*`)."""
    seq_len: int = Field(256, ge=8)
    """Tokens per training sequence; windows of seq_len + 1 tokens are packed."""
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    """Fraction of documents held out for validation (guides training and model selection)."""
    test_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    """Fraction of documents held out for the final, unbiased test figure."""
    seed: int = 0
    """Seed of the splits, the tokenizer sample and the per-epoch shuffle."""

    @model_validator(mode="after")
    def _check(self):
        problems = []
        if self.max_chars is not None and self.max_chars < self.min_chars:
            problems.append(
                f"data.max_chars: {self.max_chars} is below data.min_chars ({self.min_chars}); "
                "raise max_chars or leave it empty"
            )
        if self.val_fraction + self.test_fraction >= 1.0:
            problems.append(
                f"data.val_fraction + data.test_fraction: {self.val_fraction} + "
                f"{self.test_fraction} leaves no training data; keep their sum below 1"
            )
        for i, source in enumerate(self.sources):
            if not source.strip():
                problems.append(f"data.sources.{i}: an empty path; remove it or name a file")
        if problems:
            raise ValueError("\n".join(problems))
        return self
