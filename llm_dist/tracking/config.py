"""The `tracking:` section, and the MLflow tags and filters the tracker and the trial logger share."""

from llm_dist.base import Address, Section

RUN = "llm_dist.run_folder"  # tag: which run folder an MLflow run records
STAGE = "llm_dist.stage"  # tag: "run" for the parent, else the stage; "trial" for a trial
TRIAL = "llm_dist.trial_id"
PARENT = "mlflow.parentRunId"  # MLflow's own tag for a nested run


class TrackingConfig(Section):
    """MLflow tracking: off unless a tracking URI is set here or in MLFLOW_TRACKING_URI."""

    tracking_uri: Address | None = None
    """MLflow tracking URI (http://host:5000, databricks, sqlite:///mlflow.db); empty: the MLFLOW_TRACKING_URI environment variable; with neither, tracking is off. No credential in it: MLflow reads MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, from the environment."""
    experiment_name: str = "llm-dist"
    """The MLflow experiment the run goes in (created when missing)."""
    registered_model_name: str | None = None
    """The registered model the tune winner becomes a version of; empty: the run's name."""


def quoted(value: str) -> str:
    """A value quoted for an MLflow search filter (a path may hold a single quote)."""
    return f'"{value}"' if "'" in value else f"'{value}'"


def short(e: Exception) -> str:
    """An error in one line for a warning."""
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
