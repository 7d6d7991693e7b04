"""One trial of the sweep, inside its Tune trial actor: a Ray Train run of the worker loop.

The trial builds the pretrain stage's TorchTrainer on its own settings (`trial_spec`) and hands
each report of its workers on to Tune from its own thread (`ReportToTune`): the metrics, and a
Tune checkpoint that holds only a pointer (`pointer.json`) to the Train checkpoint the report
came with. The weights stay where the workers wrote them, in `<run>/tune/trials/<trial id>/
checkpoints/`; the pointer is what Tune keeps with the trial, and what PBT hands a trial it
clones. A trial restarted with another trial's pointer (a PBT exploit) copies that checkpoint
into its own folder and continues from it (`adopt`).
"""

import json
import math
import tempfile
import threading
from pathlib import Path

from ray import train, tune

from llm_dist.records import Exploit
from llm_dist.run_folder import RunFolder
from llm_dist.tune.config import TUNABLE

POINTER = "pointer.json"
BEST = "best_"  # a report's `best_<tune.metric>`: the trial's best evaluation so far (ASHA's)


def trial_spec(spec, trial: dict, base: str, val_rows: int):
    """The job spec one trial trains with: its settings in the `pretrain` section, the base model.

    Evaluation covers the whole validation split and writes a checkpoint each time (what ASHA
    and PBT decide on, and where a resumed sweep picks a trial up). PBT keeps two checkpoints,
    so that a donor's is still there when the trial that clones it starts.
    """
    from llm_dist.model import ModelConfig
    from llm_dist.train.config import PretrainConfig

    t = spec.tune
    workers, micro = t.num_workers, trial["micro_batch_size"]
    pretrain = PretrainConfig.model_validate({
        **spec.pretrain.model_dump(), "num_workers": workers, "lr": trial["lr"],
        "min_lr": trial["lr"] / 10, "schedule": "cosine", "warmup_steps": trial["warmup_steps"],
        "weight_decay": trial["weight_decay"], "micro_batch_size": micro,
        "global_batch_size": None, "grad_accum_steps": None, "max_steps": t.max_steps,
        "eval_every": t.eval_every, "checkpoint_every": t.eval_every,
        "keep_checkpoints": 2 if t.scheduler == "pbt" else 1,
        "log_every": min(spec.pretrain.log_every, t.eval_every), "max_failures": t.max_failures,
        "eval_batches": max(1, math.ceil(val_rows / (micro * workers))),
    })  # fmt: skip
    model = ModelConfig(preset=None, path=base)
    return spec.model_copy(update={"pretrain": pretrain, "model": model})


def run_trial(settings: dict, spec, run: str, base: str, prepared: str, val_rows: int) -> None:
    """One trial: the pretrain loop as a fine-tuning run of `base` on the task data in
    `prepared`, with the typed `spec` of the sweep; each of its workers' reports goes to Tune."""
    from queue import Empty

    from ray.util.queue import Queue

    from llm_dist.finetune.methods import FineTuning
    from llm_dist.train.run import make_trainer

    trial = {**{k: getattr(spec.tune, k) for k in TUNABLE}, **settings}
    finetuning = FineTuning.model_validate(
        {k: trial.get(k, getattr(spec.tune, k)) for k in FineTuning.model_fields}
    )
    trial_id, folder = tune.get_context().get_trial_id(), RunFolder(run)
    exploit = adopt(
        folder, trial_id, tune.get_checkpoint(), {k: trial[k] for k in spec.tune.search_space}
    )
    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})  # a report waits for Tune's answer
    trainer = make_trainer(trial_spec(spec, trial, base, val_rows), folder.trial(trial_id).uri,
                           prepared, finetuning=finetuning, callbacks=[ReportToTune(reports)],
                           exploit=exploit)  # fmt: skip
    outcome: dict = {}
    fit = threading.Thread(target=lambda: outcome.update(error=_fit(trainer)), daemon=True)
    fit.start()
    best = BestSoFar(spec.tune.metric, spec.tune.mode)
    while fit.is_alive() or not reports.empty():
        try:
            metrics, checkpoint = reports.get(timeout=0.5)
        except Empty:
            continue
        _report(trial_id, best.add(metrics), checkpoint)
    if outcome["error"] is not None:
        raise outcome["error"]


class BestSoFar:
    """A trial's best `metric` over its reports so far, added to each as `best_<metric>`."""

    def __init__(self, metric: str, mode: str):
        self.metric, self.sign, self.best = metric, 1 if mode == "min" else -1, None

    def add(self, metrics: dict) -> dict:
        value = metrics.get(self.metric)
        better = self.best is None or (
            value is not None and self.sign * value < self.sign * self.best
        )
        if value is not None and not math.isnan(value) and better:
            self.best = value
        return metrics if self.best is None else {**metrics, BEST + self.metric: self.best}


class ReportToTune(train.UserCallback):
    """Runs in the trainer's controller: each report of the workers (rank 0's metrics and the
    path of the checkpoint it came with) goes to the trial's thread, which reports it to Tune."""

    def __init__(self, reports):
        self.reports = reports

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        self.reports.put((metrics[0], checkpoint and checkpoint.path))


def _report(trial_id: str, metrics: dict, checkpoint: str | None) -> None:
    if checkpoint is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        pointer = {"trial_id": trial_id, "checkpoint": checkpoint, "step": metrics.get("step")}
        Path(tmp, POINTER).write_text(json.dumps(pointer))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _fit(trainer) -> BaseException | None:
    try:
        trainer.fit()
    except BaseException as e:  # raised again in the trial's thread
        return e
    return None


def read_pointer(checkpoint) -> dict | None:
    """What a trial's Tune checkpoint points at: trial_id, checkpoint (its folder), step."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = Path(folder, POINTER)
        return json.loads(path.read_text()) if path.exists() else None


def adopt(folder: RunFolder, trial_id: str, given, settings: dict) -> Exploit | None:
    """Under PBT, a trial restarted with another trial's Tune checkpoint `given`: that trial's
    checkpoint (or, when Ray Train has since replaced it, its newest whole one) copied into
    this trial's checkpoints, where the loop resumes from it. None for a trial's own
    checkpoint (a resumed sweep: the loop finds its own newest) or none."""
    from llm_dist.base import UserError
    from llm_dist.train import checkpoint

    pointer = read_pointer(given)
    if pointer is None or pointer["trial_id"] == trial_id:
        return None
    donor, source = pointer["trial_id"], pointer["checkpoint"]
    mine = folder.trial(trial_id).checkpoints
    source = f"{folder.trial(donor).checkpoints}/{source.rstrip('/').rsplit('/', 1)[1]}"
    if source not in dict(checkpoint.committed(folder.trial(donor).checkpoints)):
        found, _ = checkpoint.latest_whole(folder.trial(donor).checkpoints)
        if found is None:
            raise UserError(f"tune: PBT cloned trial {donor} into {trial_id}, and {donor} has "
                            f"no whole checkpoint left in {folder.trial(donor).checkpoints}")  # fmt: skip
        source = found[0]
    copied, meta = checkpoint.adopt(source, mine)
    return Exploit(trial_id=trial_id, donor=donor, step=meta["step"], source=source,
                   checkpoint=copied, settings=settings)  # fmt: skip
