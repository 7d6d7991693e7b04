"""Task metrics from per-record outcomes, and the lift of one model over another with its interval.

Every metric is on a 0-1 scale, higher is better, and is the mean of a per-record value except
f1_macro, which is computed over the whole set:

- `exact_match`: 1 when the prediction equals the reference after `normalize` (Unicode NFKC,
  case folded, runs of whitespace made one space, stripped; punctuation is kept: answers here
  are code, docstrings and labels, where it carries meaning).
- `rouge_l`: ROUGE-L F1 (longest common subsequence of words), Google's `rouge-score` package
  with its default tokenizer (lower-cased runs of ASCII letters and digits: text in other
  scripts scores 0, use chrf there) and no stemming; an empty answer scores 0.
- `chrf`: chrF (character 6-grams, beta 2; Popović 2015) by `sacrebleu`, per record, / 100.
- `accuracy` and `f1_macro` (the unweighted mean of each label's F1, labels never predicted
  and never true left out) by scikit-learn, over label indices.

The lift is winner minus base on the same test records, with a 95% paired bootstrap percentile
interval over records (`scipy.stats.bootstrap`, 2,000 resamples, a fixed seed): when the
whole interval is above zero (below zero, for the loss), the winner beats the base beyond what
the choice of test records explains.
"""

import unicodedata

import numpy as np

GENERATION = ("exact_match", "rouge_l", "chrf")  # from greedy answers, for the chat formats
CLASSIFICATION = ("accuracy", "f1_macro")  # from each label's likelihood, for format classify
METRICS = GENERATION + CLASSIFICATION


def normalize(text: str) -> str:
    """The text exact_match compares: NFKC, case folded, whitespace runs as one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def per_record(metric: str, predictions: list[str], references: list[str]) -> np.ndarray:
    """One value in [0, 1] per (prediction, reference) pair of a generation metric."""
    if metric == "exact_match":
        pairs = zip(predictions, references, strict=True)
        return np.array([float(normalize(p) == normalize(r)) for p, r in pairs])
    if metric == "rouge_l":
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        pairs = zip(predictions, references, strict=True)
        return np.array([scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs])
    if metric == "chrf":
        from sacrebleu.metrics import CHRF

        chrf = CHRF()
        pairs = zip(predictions, references, strict=True)
        return np.array([chrf.sentence_score(p, [r]).score / 100 for p, r in pairs])
    raise ValueError(f"{metric} is not a generation metric; use one of {', '.join(GENERATION)}")


def compute(metrics: list[str], outcome: dict) -> dict[str, float]:
    """`{metric: value}` from an outcome: `predictions`/`references` (generation metrics) or
    `predicted`/`labels` (label indices, classification metrics)."""
    return {m: float(_statistic(m)(*_samples(m, outcome))) for m in metrics}


def lift(metric: str, winner: dict, base: dict, seed: int = 0) -> dict[str, float]:
    """`{winner, base, lift, low, high}`: the metric of each outcome on the same records (in the
    same order), the difference and its 95% paired bootstrap interval. `metric` may also be
    `loss`: the mean loss per target token from per-record `loss_sum` and `targets`."""
    from scipy.stats import bootstrap

    statistic = _statistic(metric)
    ours, theirs = _samples(metric, winner), _samples(metric, base)
    k = len(ours)
    value = {"winner": float(statistic(*ours)), "base": float(statistic(*theirs))}
    value["lift"] = value["winner"] - value["base"]
    if len(ours[0]) < 2:  # no interval from one record
        return {**value, "low": None, "high": None}
    ci = bootstrap((*ours, *theirs), lambda *s: statistic(*s[:k]) - statistic(*s[k:]),
                   paired=True, vectorized=False, n_resamples=2000, method="percentile",
                   rng=np.random.default_rng(seed)).confidence_interval  # fmt: skip
    return {**value, "low": float(ci.low), "high": float(ci.high)}


def _samples(metric: str, outcome: dict) -> tuple[np.ndarray, ...]:
    """The per-record arrays the metric's statistic takes."""
    if metric == "loss":
        return np.asarray(outcome["loss_sum"], float), np.asarray(outcome["targets"], float)
    if metric in CLASSIFICATION:
        return np.asarray(outcome["predicted"]), np.asarray(outcome["labels"])
    return (per_record(metric, outcome["predictions"], outcome["references"]),)


def _statistic(metric: str):
    if metric == "loss":
        return lambda loss_sum, targets: loss_sum.sum() / targets.sum()
    if metric == "accuracy":
        from sklearn.metrics import accuracy_score

        return lambda predicted, labels: accuracy_score(labels, predicted)
    if metric == "f1_macro":
        from sklearn.metrics import f1_score

        return lambda predicted, labels: f1_score(labels, predicted, average="macro",
                                                  zero_division=0.0)  # fmt: skip
    return np.mean
