"""Canaries for the private library APIs of `llm_dist.compat`: each fails, naming the library and
its version, the day an upgrade moves one."""

from importlib import metadata

import pytest
from architectures import tokenizer

from llm_dist import compat


def test_transformers_marks_control_tokens_quoted_in_message_text():
    tok = tokenizer(template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    messages = [{"role": "user", "content": f"quoting {tok.eos_token} here"}]
    version = metadata.version("transformers")
    marked = compat.mark_chat_inputs(tok, messages)
    assert len(marked) == 1 and marked[0]["role"] == "user", f"transformers {version}"
    # the quoted control token is wrapped, so that the template's own ones stay apart
    assert marked[0]["content"] != messages[0]["content"], f"transformers {version}"
    assert tok.eos_token in marked[0]["content"], f"transformers {version}"


def test_a_missing_private_api_blames_the_library_not_the_template():
    class Changed:  # a tokenizer of a transformers without the marker
        pass

    with pytest.raises(compat.LibraryChanged) as e:
        compat.mark_chat_inputs(Changed(), [])
    assert str(e.value).startswith(
        f"transformers {metadata.version('transformers')} no longer has "
        "PreTrainedTokenizerBase._mark_chat_inputs (AttributeError: "
    )
    assert "install the version pyproject.toml names" in str(e.value)


def test_ray_tunes_mlflow_logger_has_its_client_experiment_and_run_map(tmp_path, monkeypatch):
    import mlflow.tracking._tracking_service.utils as mlflow_uri
    from mlflow import MlflowClient
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    # its setup sets the process's tracking URI (variable and global): put back afterwards
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # so that teardown restores what was there
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setattr(mlflow_uri, "_tracking_uri", None)

    callback = MLflowLoggerCallback(f"sqlite:///{tmp_path}/mlflow.db", experiment_name="canary")
    callback.setup()
    client, experiment, runs = compat.tune_mlflow(callback)
    version = metadata.version("ray")
    assert isinstance(client, MlflowClient), f"ray {version}"
    assert client.get_experiment(experiment).name == "canary", f"ray {version}"
    assert runs == {}, f"ray {version}"


def test_ray_serve_llm_lists_its_routes():
    try:
        routes = compat.serve_llm_routes()
    except ImportError as e:  # Ray Serve LLM needs vLLM (GPU nodes; `pip install 'llm-dist[vllm]'`)
        pytest.skip(str(e))
    assert {"chat", "completions", "models"} <= set(routes), f"ray {metadata.version('ray')}"
