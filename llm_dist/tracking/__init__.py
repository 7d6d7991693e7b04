"""MLflow tracking of a run: its config section (`config`), the driver's `Tracker` with the
parent, stage and trial runs and the registered winner (`tracker`), and Ray Tune's logger for the
trials (`trials`), which the tracker hands to the tune stage. Only the driver talks to MLflow;
the stages hand it the records they made (`llm_dist.records`)."""
