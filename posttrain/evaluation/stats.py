"""Paired comparisons between models scored on the same items.

    comparisons = compare_models({"base": {mode: {task: TaskScore}}, "sft": {...}})

Two models' accuracies of 29.5 and 29.4 on 1,172 items differ by less than one standard error
(about 1.3 points) of either; only a paired test, which looks at the items where the two models
disagree, says whether such a difference is more than noise. For each task, scoring mode and
metric, from the per-item scores: the difference of the means (b - a), a 95% paired-bootstrap
percentile interval, and a p-value from McNemar's exact test when both models' item scores are
0/1 (acc, acc_norm), else from a paired sign-flip permutation test (truthfulqa_mc2's per-item
probabilities).
"""

from __future__ import annotations

import math

from posttrain.outputs.errors import PosttrainError

BOOTSTRAP_SAMPLES = 10_000
Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a share of `successes` in `n` (never zero width for n > 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = min(1.0, max(0.0, successes / n))
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_paired_interval(a, b, z: float = Z95) -> tuple[float, float]:
    """95% interval of mean(b) - mean(a) for paired 0/1 scores: Newcombe's (1998) method 10, the
    hybrid score interval from each share's Wilson interval and the phi correlation of the pairs."""
    n = len(a)
    both = sum(1 for x, y in zip(a, b) if x and y)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    neither = n - both - only_a - only_b
    pa, pb = (both + only_a) / n, (both + only_b) / n
    la, ua = wilson_interval(both + only_a, n, z)
    lb, ub = wilson_interval(both + only_b, n, z)
    product = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(product) if product else 0.0
    delta = pb - pa
    lower = delta - math.sqrt(max(0.0, (pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2))
    upper = delta + math.sqrt(max(0.0, (ub - pb) ** 2 - 2 * phi * (ub - pb) * (pa - la) + (pa - la) ** 2))
    return max(-1.0, lower), min(1.0, upper)


def share_interval(values) -> tuple[float, float]:
    """95% interval of the mean of item scores in [0, 1] (Wilson on their sum: exact for 0/1 scores,
    conservative for graded ones, whose variance is at most p(1 - p)); a bootstrap interval otherwise."""
    values = [float(v) for v in values]
    if not values:
        return 0.0, 1.0
    if all(0.0 <= v <= 1.0 for v in values):
        return wilson_interval(sum(values), len(values))
    import numpy as np

    means = _resampled_means(
        np.asarray(values), BOOTSTRAP_SAMPLES, 0, lambda rng, k, d: d[rng.integers(0, len(d), size=(k, len(d)))]
    )
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def mcnemar_exact(a, b) -> float:
    """Two-sided p-value of McNemar's exact test for paired 0/1 scores: under no difference, the
    items only one model gets right are as likely to favour either (binomial, p = 1/2)."""
    only_a = sum(1 for x, y in zip(a, b) if x > y)
    only_b = sum(1 for x, y in zip(a, b) if y > x)
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)


def _resampled_means(values, samples: int, seed: int, draw):
    """`samples` means of `draw(rng, chunk, n)`-transformed copies of `values`, in chunks (bounded memory)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out, done, chunk = [], 0, max(1, 2_000_000 // max(1, len(values)))
    while done < samples:
        k = min(chunk, samples - done)
        out.append(draw(rng, k, values).mean(axis=1))
        done += k
    return np.concatenate(out)


def paired_bootstrap_ci(a, b, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mean(b - a), resampling items (both models' scores of an item together)."""
    import numpy as np

    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    means = _resampled_means(diff, samples, seed, lambda rng, k, d: d[rng.integers(0, len(d), size=(k, len(d)))])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def sign_flip_p(a, b, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> float:
    """Two-sided p-value of the paired permutation test: under no difference, each item's b - a is as
    likely to have either sign. Monte Carlo with `samples` sign flips ((hits + 1) / (samples + 1))."""
    import numpy as np

    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    observed = abs(diff.mean())
    if not diff.any():
        return 1.0
    means = _resampled_means(diff, samples, seed, lambda rng, k, d: d * rng.choice([-1.0, 1.0], size=(k, len(d))))
    hits = int((np.abs(means) >= observed - 1e-12).sum())
    return (hits + 1) / (samples + 1)


def paired_comparison(a: dict[int, float], b: dict[int, float], seed: int = 0) -> dict:
    """{delta, ci95, p_value, test, n} of b against a on the items both were scored on."""
    ids = sorted(set(a) & set(b))
    if not ids:
        raise PosttrainError("no item was scored for both models; they cannot be compared")
    xs, ys = [a[i] for i in ids], [b[i] for i in ids]
    binary = all(v in (0.0, 1.0) for v in xs + ys)
    lo, hi = newcombe_paired_interval(xs, ys) if binary else paired_bootstrap_ci(xs, ys, seed=seed)
    return {
        "delta": sum(ys) / len(ys) - sum(xs) / len(xs),
        "ci95": [lo, hi],
        "p_value": mcnemar_exact(xs, ys) if binary else sign_flip_p(xs, ys, seed=seed),
        "test": "mcnemar_exact" if binary else "sign_flip_permutation",
        "n": len(ids),
    }


def model_pairs(names: list[str]) -> list[tuple[str, str]]:
    """The pairs worth a test, in the order given: each model against the next (base -> SFT, SFT -> DPO)
    and, with three or more, the first against the last (what the whole pipeline did)."""
    pairs = list(zip(names, names[1:]))
    if len(names) > 2:
        pairs.append((names[0], names[-1]))
    return pairs


def compare_models(scores: dict[str, dict[str, dict]]) -> list[dict]:
    """Paired comparisons of `scores` ({model: {mode: {task: harness.TaskScore}}}, models in their order) for
    every task, scoring mode and metric both models of a pair have."""
    comparisons = []
    for a, b in model_pairs(list(scores)):
        for mode in ("plain", "chat"):
            if mode not in scores[a] or mode not in scores[b]:
                continue
            for task, score_a in scores[a][mode].items():
                score_b = scores[b][mode].get(task)
                for metric in score_a.items:  # the harness's metrics of this task, in its order
                    if score_b is None or metric not in score_b.items:
                        continue
                    stats = paired_comparison(score_a.items[metric], score_b.items[metric])
                    comparisons.append({"task": task, "mode": mode, "metric": metric, "a": a, "b": b, **stats})
    return comparisons


def compare_item_scores(items: dict[str, dict[str, dict[int, float]]], task: str, mode: str) -> list[dict]:
    """Paired comparisons of per-item scores ({model: {metric: {item: score}}}, models in their order),
    in compare_models' shape: for preference pairs, generation health's per-prompt stop, and the like."""
    return [
        {
            "task": task,
            "mode": mode,
            "metric": metric,
            "a": a,
            "b": b,
            **paired_comparison(items[a][metric], items[b][metric]),
        }
        for a, b in model_pairs(list(items))
        for metric in items[a]
        if metric in items[b]
    ]
