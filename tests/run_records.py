"""Run-folder records for tests, built from the record models themselves (`llm_dist.records`), so
a change of schema fails here loudly instead of leaving hand-written dicts behind."""

from llm_dist.records import (
    DataResult,
    Lift,
    Lineage,
    PretrainLineage,
    Sample,
    ServeResult,
    TaskCounts,
    TrainResult,
    TrialRow,
    Winner,
)
from llm_dist.reuse import pretrain_origin, tune_origin

SPLITS = ("train", "val", "test")


def data_result(**fields) -> DataResult:
    values = dict(
        prepared="/runs/prepared/abc", fingerprint="abc", files=2, records=120, documents=110,
        bad={"bad_utf8": 3}, dropped={"duplicate": 7, "empty": 0},
        quarantine="/runs/prepared/abc/quarantine.jsonl", tokenizer="/runs/prepared/abc/tokenizer",
        vocab_size=512, seq_len=32, docs={"train": 100, "val": 5, "test": 5},
        tokens={"train": 9000, "val": 450, "test": 460}, sequences={"train": 70, "val": 3, "test": 3},
        shards=dict.fromkeys(SPLITS, 1), remainder=dict.fromkeys(SPLITS, 0), seconds=1.5,
        tokens_per_s=6000.0,
    )  # fmt: skip
    return DataResult(**values | fields)


def train_result(spec, export: str, fingerprint: str | None = None, **fields) -> TrainResult:
    """Pretraining's result for `spec` (its origin: made from that spec)."""
    values = dict(
        step=spec.pretrain.max_steps, epoch=0, tokens=40960, bad_steps=0, val_loss_at_start=8.3,
        val={"val_loss": 6.1, "val_ppl": 445.9}, test_loss=6.3, test_ppl=544.6, export=export,
        samples=[Sample(prompt="def f(", completion="x):")], world_size=2,
        flops_per_token=1e6, peak_flops_per_worker=1e11, peak_flops_source="matmul probe on cpu",
        origin=pretrain_origin(spec, fingerprint),
    )  # fmt: skip
    return TrainResult(**values | fields)


def winner(spec, export: str, base: str, base_result: TrainResult | None = None,
           **fields) -> Winner:  # fmt: skip
    """A tune winner for `spec` whose base is `base` (with `base_result` when it is the run's own
    pretraining)."""
    pretrain = base_result and PretrainLineage(
        result="/runs/demo/pretrain/result.json", step=base_result.step,
        tokens=base_result.tokens, test_loss=base_result.test_loss,
        data_prepared="/runs/prepared/abc", data_fingerprint="abc",
        data_tokenizer="/runs/prepared/abc/tokenizer",
    )  # fmt: skip
    values = dict(
        trial_id="t_00000", metric="val_loss", mode="min", value=5.79,
        test={"loss": Lift(winner=5.9, base=6.71, lift=-0.81409, low=-0.87468, high=-0.76146),
              "rouge_l": Lift(winner=0.12, base=0.05, lift=0.07, low=0.02, high=0.125)},
        test_records=256, config={"method": "full", "lr": 0.0003}, export=export,
        trial_folder="/runs/demo/tune/trials/t_00000", samples=[],
        trials={"finished": 1, "stopped early": 1, "failed": 0},
        task_data=TaskCounts(records=4659, sequences={"train": 4098, "val": 271, "test": 256},
                             unusable={"too_long": 34}),
        sweep_seconds=120.0, scoring_seconds=10.0,
        lineage=Lineage(base_model=base, tokenizer="/runs/prepared/task-1/tokenizer",
                        task_sources=["t.jsonl"], task_prepared="/runs/prepared/task-1",
                        pretrain=pretrain),
        origin=tune_origin(spec, base, base_result),
    )  # fmt: skip
    return Winner(**values | fields)


def trial_rows() -> list[TrialRow]:
    return [
        TrialRow(trial_id="t_00000", status="finished", settings={"lr": 0.0003},
                 val={"val_loss": 5.79}, step=40, seconds=81.1, test={"loss": 5.9}),
        TrialRow(trial_id="t_00001", status="stopped early", settings={"lr": 0.003},
                 val={"val_loss": 5.91}, step=20, seconds=40.2),
        TrialRow(trial_id="base", status="base (un-tuned)", test={"loss": 6.71}),
    ]  # fmt: skip


def serve_result(**fields) -> ServeResult:
    values = dict(url="http://127.0.0.1:8000", model="demo", folder="/x/export",
                  source="tune winner t_00000", seconds_to_ready=4.5, test_prompt="def f():",
                  answer="<script>alert(1)</script>", usage={"completion_tokens": 3})  # fmt: skip
    return ServeResult(**values | fields)
