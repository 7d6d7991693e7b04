"""What the task metrics cost a trial: the share of its time spent computing them.

Reads a finished run whose tune stage computed task metrics (by default the quickstart's,
`runs/quickstart`, which reports rouge_l: run `make quickstart` first). Each trial's
`metrics.jsonl` holds, per evaluation, `task_seconds`: the time its workers spent on greedy
answers (or label likelihoods) and the metrics, from the first answer to the gathered values.
Printed per trial and in all: evaluations, task seconds, the trial's own time (Tune's
`time_total_s` in results.csv: its start to its last report), and the share; the goal is at
most 20%.

    python benchmarks/task_metrics.py [RUN_FOLDER]   (default runs/quickstart)
"""

import sys

from llm_dist.run_folder import RunFolder


def main() -> None:
    run = RunFolder(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart")
    trials = [r for r in run.read_results() if r.trial_id != "base" and r.seconds]
    if not trials:
        sys.exit(f"{run.uri}: no trials in its results table; run the job first")
    total_task = total_trial = 0.0
    print(f"{'trial':<14}{'status':<16}{'evals':>6}{'task s':>9}{'trial s':>9}{'share':>8}")
    for r in trials:
        rows = run.trial(r.trial_id).read_metrics()
        evals = [e for e in rows if e.kind == "eval" and e.task_seconds is not None]
        task, trial = sum(e.task_seconds for e in evals), r.seconds
        total_task, total_trial = total_task + task, total_trial + trial
        print(f"{r.trial_id:<14}{r.status:<16}{len(evals):>6}{task:>9.1f}{trial:>9.1f}"
              f"{task / trial:>8.1%}")  # fmt: skip
    print(f"{'all':<36}{total_task:>9.1f}{total_trial:>9.1f}{total_task / total_trial:>8.1%}")


if __name__ == "__main__":
    main()
