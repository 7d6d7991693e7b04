"""The private APIs of libraries llm-dist leans on, in one place, each with a canary test
(tests/test_compat.py). When a library changes one, the error names the library and its
version, not the user's spec or template.

- transformers: `PreTrainedTokenizerBase._mark_chat_inputs`, which marks control tokens quoted
  in message text so that they are encoded as text (what `apply_chat_template(...,
  sanitize_control_tokens=True)` does), for exact assistant masks (`finetune.formats`).
- Ray Tune: `MLflowLoggerCallback`'s MLflow client and its trial -> run map, so a resumed
  sweep's trials go on in their own MLflow runs (`tracking.trials`).
- Ray Serve LLM: the routes of its `OpenAiIngress`, each put behind the API key check
  (`serve.vllm`).
"""

from importlib import metadata


class LibraryChanged(RuntimeError):
    """A library no longer has a private API llm-dist uses: a version llm-dist does not support."""


def _changed(package: str, what: str, e: Exception) -> LibraryChanged:
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        version = "(not installed)"
    return LibraryChanged(
        f"{package} {version} no longer has {what} ({type(e).__name__}: {e}); this version of "
        f"{package} is not one llm-dist supports: install the version pyproject.toml names"
    )


def mark_chat_inputs(tokenizer, messages: list[dict]) -> list[dict]:
    """`messages` with each control token in their text wrapped in transformers' markers."""
    try:
        mark = tokenizer._mark_chat_inputs
    except AttributeError as e:
        raise _changed("transformers", "PreTrainedTokenizerBase._mark_chat_inputs", e) from None
    try:
        marked, *_ = mark(tokenizer.get_chat_template(), [messages], None, None, {}, True, False)
    except TypeError as e:  # its signature changed; a template's own errors are not TypeErrors
        if "argument" in str(e):
            raise _changed(
                "transformers", "_mark_chat_inputs(template, conversations, ...)", e
            ) from None
        raise
    return marked[0]


def tune_mlflow(callback) -> tuple:
    """(MlflowClient, experiment id, the trial -> MLflow run id map) of a Ray Tune
    `MLflowLoggerCallback` after its setup."""
    try:
        util = callback.mlflow_util
        return util._get_client(), util.experiment_id, callback._trial_runs
    except AttributeError as e:
        raise _changed("ray", "MLflowLoggerCallback's mlflow_util._get_client(), "
                       "mlflow_util.experiment_id or _trial_runs", e) from None  # fmt: skip


def serve_llm_routes() -> tuple[str, ...]:
    """The names of the routes Ray Serve LLM's `OpenAiIngress` serves (needs vLLM installed)."""
    try:
        from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS
    except ImportError as e:
        if "vLLM" in str(e):  # Ray Serve LLM itself needs vLLM or SGLang: not a change of Ray's
            raise
        raise _changed(
            "ray", "ray.llm._internal.serve.core.ingress.ingress.DEFAULT_ENDPOINTS", e
        ) from None
    return tuple(DEFAULT_ENDPOINTS)
