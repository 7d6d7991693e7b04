"""llm-dist: one YAML job spec from a text corpus to a served language model on Ray."""

__version__ = "0.1.0"
