"""Population Based Training over 2-worker trials, and its parts: what may be perturbed, the
settings applied over a restored optimizer, a donor's checkpoint taken whole, the lineage."""

import json
import math
from pathlib import Path

import pytest
import torch
from tune_specs import spec_for

from llm_dist.records import Exploit, MetricsRow
from llm_dist.run_folder import RunFolder
from llm_dist.spec import JobSpec
from llm_dist.storage import filesystem
from llm_dist.train.checkpoint import _check

TUNE = {"base_model": "/b", "task": {"sources": ["task.jsonl"]}}


def tune_problem(**tune) -> str:
    with pytest.raises(ValueError) as e:
        JobSpec(name="p", stages=["tune"], tune={**TUNE, **tune})
    return str(e.value)


def test_pbt_refuses_what_cannot_change_in_a_running_trial_naming_the_field():
    space = {"lr": {"grid": [1e-4, 1e-3]}, "method": {"grid": ["full", "lora"]}}
    assert ("tune.search_space.method: PBT perturbs every searched setting while trials run, "
            "and method cannot change in a running trial (its checkpoint is made of it); set "
            "tune.method instead, or search only lr, weight_decay, warmup_steps"
            in tune_problem(scheduler="pbt", search_space=space))  # fmt: skip
    assert "tune.search_space.lora_r: PBT perturbs" in tune_problem(
        scheduler="pbt", search_space={"lora_r": {"choice": [4, 8]}}
    )
    assert ("tune.search: optuna's suggestions do not follow PBT's clones; use search: random "
            "with scheduler pbt" in tune_problem(scheduler="pbt", search="optuna",
                                                  search_space={"lr": {"loguniform": [1e-5, 1e-3]}}))  # fmt: skip
    assert ("tune.perturbation_interval: 15 is not a multiple of tune.eval_every (10): PBT "
            "decides on evaluations; use 20" in tune_problem(
                scheduler="pbt", eval_every=10, perturbation_interval=15,
                search_space={"lr": {"grid": [1e-4, 1e-3]}}))  # fmt: skip
    assert "tune.perturbation_interval: only scheduler pbt perturbs trials (scheduler is asha)" in (
        tune_problem(perturbation_interval=20)
    )
    JobSpec(name="p", stages=["tune"], tune={**TUNE, "scheduler": "pbt", "search_space": {
        "lr": {"loguniform": [1e-5, 1e-3]}, "weight_decay": {"choice": [0.0, 0.1]},
        "warmup_steps": {"randint": [0, 5]}}})  # fmt: skip


def test_a_restored_optimizer_trains_on_with_the_runs_own_lr_schedule_and_decay():
    """What DeepSpeed's load brings back (the donor's lr, base lrs and weight decay) gives way
    to this run's settings, at the restored position of the schedule."""
    from llm_dist.train.config import PretrainConfig
    from llm_dist.train.deepspeed_config import apply_schedule, lr_lambda, param_groups

    def run(lr: float, weight_decay: float):
        p = PretrainConfig(
            lr=lr, min_lr=lr / 10, warmup_steps=2, max_steps=10, weight_decay=weight_decay
        )
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
        opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
        return p, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(p))

    _, donor_opt, donor = run(3e-3, 0.1)
    for _ in range(4):
        donor_opt.step()
        donor.step()
    p, opt, scheduler = run(1e-3, 0.01)
    opt.load_state_dict(donor_opt.state_dict())
    scheduler.load_state_dict(donor.state_dict())
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-3 * lr_lambda(p)(4))  # the donor's
    apply_schedule(scheduler, p)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3 * lr_lambda(p)(4)] * 2)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_lambda(p)(5))


def committed_checkpoint(root: Path, step: int, when: int) -> Path:
    from llm_dist.run_folder import checkpoint_manifest
    from llm_dist.storage import write_json
    from llm_dist.train.checkpoint import _digest

    folder = root / f"step-{step:08d}-{when}"
    (folder / "state").mkdir(parents=True)
    (folder / "state" / "model.pt").write_bytes(b"weights %d" % step)
    with open(folder / "state" / "model.pt", "rb") as f:
        files = {"state/model.pt": _digest(f)}
    write_json(checkpoint_manifest(str(folder)), {"step": step, "epoch": 0, "tokens": 0,
               "bad_steps": 0, "val_loss_at_start": None, "world_size": 2, "files": files})  # fmt: skip
    return folder


def test_a_donors_checkpoint_is_taken_whole_and_outranks_the_trials_own(tmp_path):
    from llm_dist.base import UserError
    from llm_dist.train.checkpoint import adopt, latest_whole

    donor, mine = tmp_path / "donor", tmp_path / "mine"
    source = committed_checkpoint(donor, 8, 1_000)
    committed_checkpoint(mine, 12, 1_005)  # the trial's own, further on by steps
    folder, meta = adopt(str(source), str(mine))
    assert meta["step"] == 8 and Path(folder).name.startswith("step-00000008-")
    (found, _), skipped = latest_whole(str(mine)), []
    assert found[0] == folder and skipped == []  # the newest written wins, whatever its step
    assert (Path(folder) / "state" / "model.pt").read_bytes() == b"weights 8"
    (source / "state" / "model.pt").write_bytes(b"torn")
    with pytest.raises(UserError) as e:
        adopt(str(source), str(mine))
    assert str(e.value) == (f"the checkpoint {source} is not whole (state/model.pt has 4 bytes, "
                            f"the manifest says 9); it cannot be taken")  # fmt: skip
    assert len(list(mine.iterdir())) == 2  # nothing was copied


def test_the_winners_lineage_follows_its_exploits_back_through_its_donors(tmp_path):
    from llm_dist.tune.pbt import chain

    folder = RunFolder(str(tmp_path))

    def exploited(trial: str, donor: str, step: int, at: float, source_time: int) -> None:
        exploit = Exploit(trial_id=trial, donor=donor, step=step, checkpoint=f"{trial}/c",
                          source=f"{donor}/checkpoints/step-{step:08d}-{source_time}",
                          settings={"lr": step / 1000})  # fmt: skip
        row = MetricsRow(kind="event", event="exploited", time=at, step=step, exploit=exploit)
        path = Path(folder.trial(trial).metrics)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(row.model_dump_json(exclude_none=True) + "\n")

    exploited("b", "a", 4, at=100, source_time=95)  # b took a's step 4
    exploited("a", "c", 8, at=150, source_time=140)  # later, a took c's: not in b's weights
    exploited("c", "b", 12, at=200, source_time=190)  # c took b's step 12 (after b's exploit)
    assert [(e.trial_id, e.donor, e.step) for e in chain(folder, "c")] == [
        ("b", "a", 4), ("c", "b", 12)]  # fmt: skip
    assert chain(folder, "a")[-1].donor == "c" and chain(folder, "d") == []


@pytest.mark.slow
def test_pbt_clones_a_top_trial_whole_and_trains_on_with_its_perturbed_settings(
    ray_session, tmp_path, task, tiny_base, capsys
):
    """Two 2-worker trials, a learning and a barely learning one: PBT clones the first into
    the second, which continues from the donor's step and loss with the perturbed lr."""
    from llm_dist.train.config import PretrainConfig
    from llm_dist.train.deepspeed_config import lr_lambda

    steps = 14  # decisions at steps 4, 8 and 12; the final report at 14 is left alone
    spec = spec_for(tmp_path, task, tiny_base, scheduler="pbt", method="full", num_workers=2,
                    max_steps=steps, eval_every=2, perturbation_interval=4,
                    search_space={"lr": {"grid": [1e-5, 3e-3]}})  # fmt: skip
    spec.cluster.cpus_per_worker = 0.5  # both trials at once on the shared Ray's 4 CPUs
    from llm_dist.tune.run import run_stage

    winner = run_stage(spec, str(tmp_path / "t"))
    folder = RunFolder(str(tmp_path / "t"))
    rows = {t: folder.trial(t).read_metrics() for t in folder.trial_ids()}
    exploits = [(t, i, r.exploit) for t, trial in rows.items()
                for i, r in enumerate(trial) if r.event == "exploited"]  # fmt: skip
    assert exploits, "no exploit happened"

    def factor(step: int) -> float:
        return lr_lambda(PretrainConfig(lr=1.0, min_lr=0.1, warmup_steps=0, max_steps=steps))(step)

    for trial, i, exploit in exploits:
        donor_rows = rows[exploit.donor]
        after = [r for r in rows[trial][i:] if r.kind == "train"]
        assert after[0].step == exploit.step + 2  # goes on from the donor's step, not from 0
        lr = exploit.settings["lr"]  # the perturbed lr is the one the clone trains with
        assert [r.lr for r in after[:2]] == pytest.approx([lr * factor(r.step) for r in after[:2]])
        at = next(r for r in donor_rows if r.kind == "train" and r.step == exploit.step)
        donor_lr = at.lr / factor(at.step)  # x0.8, x1.2, or drawn again from the grid
        assert (
            lr in (1e-5, 3e-3)
            or lr == pytest.approx(donor_lr * 0.8)
            or lr == pytest.approx(donor_lr * 1.2)
        )
        copied = json.loads(Path(exploit.checkpoint, "checkpoint.json").read_text())
        assert copied["step"] == exploit.step
        # the copy is whole (the donor keeps two checkpoints, so its own may be gone by now)
        assert _check(*filesystem(exploit.checkpoint), copied["files"]) is None
    trial, i, exploit = exploits[0]  # the first clone: the learner's loss, not its own
    donor_loss = next(
        r.loss for r in rows[exploit.donor] if r.kind == "train" and r.step == exploit.step
    )
    own_loss = next(r.loss for r in rows[trial][:i][::-1] if r.kind == "train")
    clone_loss = next(r.loss for r in rows[trial][i:] if r.kind == "train")
    assert abs(clone_loss - donor_loss) < abs(clone_loss - own_loss)
    assert winner.trials["finished"] == 2
    assert [e.model_dump() for e in winner.lineage.exploits] == [
        e.model_dump() for e in _chain_of(folder, winner.trial_id)
    ]
    out = capsys.readouterr().out
    assert (
        f"tune: trial {trial} exploits trial {exploit.donor}: goes on from its checkpoint at step"
        in out
    )
    assert not math.isnan(winner.value)


def _chain_of(folder, trial_id):
    from llm_dist.tune.pbt import chain

    return chain(folder, trial_id)
