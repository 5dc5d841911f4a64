"""What `posttrain/evaluate.py` writes: summary.json, report.md and a PNG chart of the scores.

    summary = build_summary(paths, scores, generation, comparisons, task_files=..., overlap=...)
    write_outputs(out_dir, summary, prompts, replies)     # summary.json, report.md, scores.png, replies.jsonl

summary.json is the machine-readable record (`models.<name>.tasks.<task>.plain|chat.{<metric>,
<metric>_stderr, <metric>_ci95, n}`, `models.<name>.generation.{stop_rate, truncated_rate, mean_length,
repeat_4gram_rate, n}`, `comparisons: [{task, mode, metric, a, b, delta, ci95, p_value, test, n}]`,
`overlap: {task: {items, n, ngram, examples}}`); report.md is the same for a reader. It opens with one
verdict line per stage, built only from the differences whose 95% intervals exclude 0 (and judge win
rates whose interval excludes 50%); a stage with none says so. A score's interval is Wilson's (honest
at ten items and at 0% or 100%, see posttrain/evaluation/stats.py); the published figures of the
pipeline this project replaces stand beside a task only when it is the hub task at its full size;
a task whose items also occur in the training data (`training_data`) is flagged wherever it appears.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.evaluation import stats
from posttrain.outputs.atomic import atomic_write_text

SUMMARY_NAME, REPORT_NAME, CHART_NAME, REPLIES_NAME = "summary.json", "report.md", "scores.png", "replies.jsonl"
MODES = ("plain", "chat")
SAMPLE_REPLIES = 3
GENERATION_TASK, GENERATION_MODE = "generation", "greedy"
GENERATION_RATES = ("stop_rate", "truncated_rate", "repeat_4gram_rate")
_NOT_METRICS = ("n", "alias")

# Published accuracies (% correct, log-probability multiple choice) of the pipeline this project
# replaces, for its base, SFT and DPO models, on the full test split of each task (n items); how it
# formatted the prompts is not recorded. Shown only beside the same task at the same n.
PUBLISHED_REFERENCE = {
    "arc_easy": {"n": 2376, "base": 52.6, "SFT": 52.6, "DPO": 54.9},
    "arc_challenge": {"n": 1172, "base": 27.2, "SFT": 29.5, "DPO": 29.4},
    "openbookqa": {"n": 500, "base": 26.4, "SFT": 29.0, "DPO": 27.2},
}
REFERENCE_STAGES = ("base", "SFT", "DPO")


def _cell_summary(task_score) -> dict:
    """A TaskScore's summary with each metric's 95% interval from its per-item scores (Wilson for
    scores in [0, 1], a bootstrap otherwise)."""
    cell = dict(task_score.summary())
    for metric, items in (getattr(task_score, "items", None) or {}).items():
        if items and isinstance(cell.get(metric), (int, float)):
            cell[f"{metric}_ci95"] = list(stats.share_interval(items.values()))
    return cell


def build_summary(
    paths: dict,
    scores: dict,
    generation: dict,
    comparisons: list[dict],
    task_files: dict | None = None,
    overlap: dict | None = None,
) -> dict:
    """The summary.json mapping from {model: path}, {model: {mode: {task: TaskScore}}}, {model: figures};
    `task_files` ({task: local file}) and `overlap` (posttrain.evaluation.overlap.task_overlap) as given."""
    models = {}
    for name, path in paths.items():
        tasks: dict = {}
        for mode, by_task in scores[name].items():
            for task, task_score in by_task.items():
                tasks.setdefault(task, {})[mode] = _cell_summary(task_score)
        figures = generation.get(name)
        if figures:
            figures = dict(figures)
            for rate in ("stop_rate", "truncated_rate"):
                k = round(figures[rate] * figures["n"])
                figures[f"{rate}_ci95"] = list(stats.wilson_interval(k, figures["n"]))
        models[name] = {"path": str(path), "tasks": tasks, "generation": figures}
    return {
        "models": models,
        "comparisons": comparisons,
        "task_files": dict(task_files or {}),
        "overlap": dict(overlap or {}),
    }


def metrics_of(cell: dict) -> list[str]:
    """The metrics of one summary cell, in its order: numbers that are not an error, interval or count."""
    return [
        k
        for k, v in cell.items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and k not in _NOT_METRICS
        and "_stderr" not in k  # acc_stderr, exact_match_stderr,strict-match
        and not k.endswith("_ci95")
    ]


def _pct_interval(value, ci) -> str:
    if value is None:
        return "–"
    if ci is None:
        return f"{100 * value:.1f}"
    return f"{100 * value:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _cell(text, width: int = 160) -> str:
    """Markdown-table-safe one-line text, cut at `width` characters."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    text = "".join(c if c.isprintable() else "\ufffd" for c in text)
    return (text[: width - 1] + "…" if len(text) > width else text) or "(empty)"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def task_names(summary: dict) -> list[str]:
    return list(dict.fromkeys(t for m in summary["models"].values() for t in m["tasks"]))


def task_n(summary: dict, task: str):
    return next((c["n"] for m in summary["models"].values() for c in m["tasks"].get(task, {}).values()), None)


def shows_reference(summary: dict, task: str) -> bool:
    """The published rows belong beside the hub task itself at its full size, never a local or limited copy."""
    ref = PUBLISHED_REFERENCE.get(task)
    return bool(ref) and task not in summary.get("task_files", {}) and task_n(summary, task) == ref["n"]


def overlap_note(summary: dict, task: str) -> str:
    hit = summary.get("overlap", {}).get(task)
    if not hit or not hit["items"]:
        return ""
    return f"⚠ {hit['items']} of {hit['n']} items in the training data"


def scores_table(summary: dict, task: str) -> str:
    """One task: a row per metric and scoring mode, a column per model, each cell the score in % with
    its 95% interval; the published reference column where shows_reference allows."""
    models = summary["models"]
    names = [n for n, m in models.items() if task in m["tasks"]]
    reference = shows_reference(summary, task)
    rows = []
    for mode in MODES:
        cells = {n: models[n]["tasks"][task].get(mode) for n in names}
        metrics = list(dict.fromkeys(k for c in cells.values() if c for k in metrics_of(c)))
        for metric in metrics:
            row = [f"{metric} ({mode})"] + [
                _pct_interval(c.get(metric), c.get(f"{metric}_ci95")) if c else "–" for c in cells.values()
            ]
            if reference:
                ref = PUBLISHED_REFERENCE[task]
                row.append(" / ".join(f"{ref[s]:.1f}" for s in REFERENCE_STAGES) if metric == "acc" else "–")
            rows.append(row)
    header = [f"{task} (n={task_n(summary, task)}) %"] + names
    if reference:
        header.append("published base / SFT / DPO")
    return _table(header, rows)


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}" if p < 0.01 else f"p = {p:.2f}"


ALPHA = 0.05
_TOLERANCE = 1e-9  # a bootstrap interval of identical verdicts sits on 0.5 up to rounding


def excludes_zero(interval, centre: float = 0.0) -> bool:
    lo, hi = interval
    return lo > centre + _TOLERANCE or hi < centre - _TOLERANCE


def significant(figures: dict, centre: float = 0.0) -> bool:
    """A difference the verdicts report: its 95% interval excludes `centre` and its test agrees (p < 0.05);
    the two can disagree at the margin (a score interval against an exact test)."""
    return excludes_zero(figures["ci95"], centre) and figures["p_value"] < ALPHA


def _mean(values) -> float | None:
    return sum(values) / len(values) if values else None


def _comparison_phrase(summary: dict, c: dict) -> str:
    """One significant difference, in the words of the verdict line."""
    lo, hi = c["ci95"]
    if c["task"] == "preference":
        if c["metric"] == "margin":
            return f"held-out preference margin {c['delta']:+.2f} nats [{lo:+.2f}, {hi:+.2f}], {_p(c['p_value'])}"
        label = "held-out preference accuracy"
    elif c["task"] == GENERATION_TASK:
        label = c["metric"].replace("_", " ").replace(" rate", " rate")
        a = summary["models"][c["a"]]["generation"][c["metric"]]
        b = summary["models"][c["b"]]["generation"][c["metric"]]
        return f"{label} {a:.2f} -> {b:.2f} ({100 * c['delta']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}], {_p(c['p_value'])})"
    else:
        label = f"{c['task']} {c['mode']} {c['metric']}"
    note = overlap_note(summary, c["task"])
    return f"{label} {100 * c['delta']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}], {_p(c['p_value'])}" + (
        f" ({note})" if note else ""
    )


def _same_moves(comparisons: list[dict]) -> list[tuple[dict, list[str]]]:
    """[(comparison, the other metrics of its task and mode that moved exactly alike)]: IFEval's four accuracies
    often agree item for item, and a verdict names the first and lists the rest instead of repeating the figures."""
    groups: dict[tuple, list[dict]] = {}
    for c in comparisons:
        key = (c["task"], c["mode"], c["delta"], tuple(c["ci95"]), c["p_value"])
        groups.setdefault(key if c["task"] not in (GENERATION_TASK, "preference") else (id(c),), []).append(c)
    return [(first, [c["metric"] for c in rest]) for first, *rest in groups.values()]


def verdicts(summary: dict) -> list[str]:
    """One line per stage (each model against the one before it, then the first against the last): every
    difference whose 95% interval excludes 0 (and p < 0.05), and every judge win rate whose interval excludes
    50%; a stage without one says so."""
    names = list(summary["models"])
    lines = []
    for a, b in stats.model_pairs(names):
        found = [
            _comparison_phrase(summary, c) + (f" ({', '.join(alike)} alike)" if alike else "")
            for c, alike in _same_moves(
                [c for c in summary["comparisons"] if (c["a"], c["b"]) == (a, b) and significant(c)]
            )
        ]
        for j in summary.get("judgements") or []:
            if (j["a"], j["b"]) == (a, b) and significant(j, 0.5):
                lo, hi = j["ci95"]
                found.append(
                    f"judge win rate of {b} {100 * j['win_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}], "
                    f"{_p(j['p_value'])}"
                )
        n = sorted({c["n"] for c in summary["comparisons"] if (c["a"], c["b"]) == (a, b)})
        items = f" (n = {', '.join(map(str, n))} items)" if n else ""
        whole = " (the whole pipeline)" if (a, b) == (names[0], names[-1]) and len(names) > 2 else ""
        body = "; ".join(found) if found else f"no difference larger than the noise{items}"
        lines.append(f"**{b} vs {a}**{whole}: {body}")
    return lines


VERDICT_READING = (
    "Each line lists only the differences whose 95% interval excludes 0 and whose test gives p < 0.05 (b − a, "
    "paired on the same items; judge: win rates whose interval excludes 50%). With many comparisons, about one in twenty such intervals "
    "misses by chance, so trust a line more when several metrics agree."
)


def comparisons_table(comparisons: list[dict]) -> str:
    rows = [
        [
            c["task"],
            c["mode"],
            c["metric"],
            f"{c['a']} → {c['b']}",
            f"{100 * c['delta']:+.1f}",
            f"[{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]",
            f"{c['p_value']:.3g}",
            c["test"],
        ]
        for c in comparisons
        if c["task"] != "preference"  # its margin is in nats, not a share: preference_section shows it
    ]
    return _table(["task", "mode", "metric", "a → b", "Δ pts", "95% interval", "p", "test"], rows)


def _rate(figures: dict, key: str) -> str:
    ci = figures.get(f"{key}_ci95")
    return f"{figures[key]:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def generation_table(summary: dict) -> str:
    rows = [
        [
            name,
            _rate(g, "stop_rate"),
            _rate(g, "truncated_rate"),
            f"{g['mean_length']:.1f}",
            f"{g['repeat_4gram_rate']:.3f}",
            str(g["n"]),
        ]
        for name, m in summary["models"].items()
        if (g := m["generation"])
    ]
    header = ["model", "stop_rate [95%]", "truncated_rate [95%]", "mean_length", "repeat_4gram_rate", "n"]
    return _table(header, rows)


def samples_section(prompts: list[dict], replies: dict[str, list[dict]], count: int = SAMPLE_REPLIES) -> str:
    """The first `count` prompts, each with its reference reply and every model's reply side by side."""
    names = list(replies)
    blocks = []
    for i, prompt in enumerate(prompts[:count]):
        rows = [["reference", _cell(prompt.get("reference") or "–")]]
        rows += [
            [n, _cell(replies[n][i]["reply"]) + ("" if replies[n][i]["stopped"] else " ⟨no stop⟩")] for n in names
        ]
        blocks.append(
            f"**Prompt {i + 1}:** {_cell(prompt['messages'][-1]['content'])}\n\n" + _table(["", "reply"], rows)
        )
    return "\n\n".join(blocks)


def judgements_table(summary: dict) -> str:
    """One row per judged pair: the later model's win rate, its interval, p, length-controlled, lengths."""
    rows = [
        [
            f"{j['a']} → {j['b']}",
            f"{100 * j['win_rate']:.1f}",
            f"[{100 * j['ci95'][0]:.1f}, {100 * j['ci95'][1]:.1f}]",
            f"{j['p_value']:.3g}",
            f"{100 * j['length_controlled_win_rate']:.1f}",
            f"{j['mean_length_a']:.0f} / {j['mean_length_b']:.0f}",
            str(j["n"]),
        ]
        for j in summary["judgements"]
    ]
    header = ["a → b", "win rate of b %", "95% interval", "p (vs 50%)", "length-controlled %", "mean chars a / b", "n"]
    return _table(header, rows)


def judge_section(summary: dict) -> list[str]:
    """The judge's table and how its figures are made."""
    judge = summary.get("judge")
    if not judge or not summary.get("judgements"):
        return []
    first, second = judge["labels"]
    own = judge.get("evaluated_model")
    caveat = (
        f" The judge is one of the evaluated models (`{own}`): a model tends to prefer replies like its own, so "
        "its win rates are a self-consistency check rather than an outside opinion."
        if own
        else ""
    )
    method = (
        f"Judge: `{judge['path']}`.{caveat} For each prompt it reads the conversation and both replies, labelled "
        f"{first} (shown first) and {second}; the verdict is its next-token probability of {first} against "
        f"{second}, normalised over the two labels (AlpacaEval 2's weighted win rate), no generated text parsed. "
        "Each pair is judged in both orders and the two verdicts averaged, so a taste for either position "
        "cancels (a model against itself scores exactly 50%). Win rate: the later model's mean preference over "
        "the prompts; interval: 95% paired bootstrap over prompts; p: sign-flip permutation test against 50%. "
        f"Length-controlled: {judge['length_control']}. Per-prompt verdicts: `judgements/<a>_vs_<b>.jsonl`."
    )
    return ["## Judge (pairwise win rate of the later model)", judgements_table(summary), method]


def preference_table(summary: dict) -> str:
    """Per model: how often it scores the chosen reply above the rejected one, and the mean margin."""
    rows = [
        [name, f"{100 * p['accuracy']:.1f}", f"{p['mean_margin']:+.3f}", str(p["n"])]
        for name, m in summary["models"].items()
        if (p := m.get("preference"))
    ]
    return _table(["model", "accuracy %", "mean margin (nats)", "n"], rows)


def preference_section(summary: dict) -> list[str]:
    """The preference-accuracy table and its paired comparisons, each metric in its own unit."""
    if not any(m.get("preference") for m in summary["models"].values()):
        return []
    unit = {"accuracy": (100, "pts"), "margin": (1, "nats")}
    rows = [
        [
            f"{c['a']} → {c['b']}",
            c["metric"],
            f"{unit[c['metric']][0] * c['delta']:+.3g} {unit[c['metric']][1]}",
            f"[{unit[c['metric']][0] * c['ci95'][0]:+.3g}, {unit[c['metric']][0] * c['ci95'][1]:+.3g}]",
            f"{c['p_value']:.3g}",
            c["test"],
        ]
        for c in summary["comparisons"]
        if c["task"] == "preference"
    ]
    reading = (
        "Held-out preference pairs: accuracy is the share of pairs whose chosen response has the higher summed "
        "log-probability (the prompt in the model's chat template, tokenized as DPO trains); the margin is "
        "log p(chosen) − log p(rejected). No reference model is subtracted, so this is not DPO's reward accuracy."
    )
    parts = ["## Preference accuracy (held-out pairs)", preference_table(summary), reading]
    if rows:
        parts.append(_table(["a → b", "metric", "Δ", "95% interval", "p", "test"], rows))
    return parts


READING = """\
How to read the comparisons: Δ is b − a in percentage points on the same items. For 0/1 item
scores the interval is Newcombe's paired score interval and p McNemar's exact test (only the items
the two models disagree on count); for graded scores a 95% paired-bootstrap interval and a paired
sign-flip test. An interval that contains 0 means the difference is within the noise of this many
items. With several comparisons, about one in twenty crosses p < 0.05 by chance. `plain` scores the
task's own prompt; `chat` the same prompt as a user turn in the model's chat template, with the
system prompt: a model that gains only in `chat` learnt the format, one that gains in both, the content.
`generation`: the greedy replies to `prompts` (stopped on <|im_end|> or not, per prompt)."""


def overlap_section(summary: dict) -> list[str]:
    """Which tasks' items occur in the training data, per task; the hub tasks that could not be checked."""
    overlap = summary.get("overlap") or {}
    if not overlap:
        return []
    rows = [
        [task, f"{o['items']} of {o['n']}", f"{o['ngram']}-word run or verbatim", ", ".join(map(str, o["examples"]))]
        for task, o in overlap.items()
    ]
    unchecked = [t for t in task_names(summary) if t not in overlap]
    text = (
        "An item counts when its question occurs in a training row of `training_data` (a shared run of "
        f"{next(iter(overlap.values()))['ngram']} words, or the whole item when it is shorter; "
        "posttrain/data/decontaminate.py, as data_scripts' --decontaminate). A score on such items measures "
        "memory, not skill."
    )
    if unchecked:
        text += f" Not checked (no local task file): {', '.join(unchecked)}."
    return ["## Evaluation items in the training data", _table(["task", "items", "match", "first items"], rows), text]


def report_markdown(summary: dict, prompts: list[dict], replies: dict[str, list[dict]]) -> str:
    parts = ["# Evaluation", "## Verdicts", "\n".join(f"- {line}" for line in verdicts(summary)), VERDICT_READING]
    flagged = [f"`{t}` ({overlap_note(summary, t)[2:]})" for t in task_names(summary) if overlap_note(summary, t)]
    if flagged:
        parts.append("⚠ Overlap: " + ", ".join(flagged) + "; see the overlap section below.")
    parts += ["Models: " + ", ".join(f"`{n}` ({m['path']})" for n, m in summary["models"].items())]
    tasks = task_names(summary)
    if tasks:
        parts += ["## Scores (% of items, [95% Wilson interval])"]
        for task in tasks:
            parts.append(
                scores_table(summary, task)
                + (f"\n\n{overlap_note(summary, task)}" if overlap_note(summary, task) else "")
            )
        if any(shows_reference(summary, t) for t in tasks):
            parts.append(
                "Published: the previous pipeline's base / SFT / DPO accuracies on the full test split "
                "(log-probability multiple choice; its prompt format is not recorded)."
            )
    parts.append(f"![scores]({CHART_NAME})")
    if summary["comparisons"]:
        parts += ["## Paired comparisons", comparisons_table(summary["comparisons"]), READING]
    if replies:
        parts += ["## Generation health (greedy)", generation_table(summary)]
        parts += ["## Sample replies", samples_section(prompts, replies)]
    parts += judge_section(summary)
    parts += preference_section(summary)
    parts += overlap_section(summary)
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------ chart


def _bar(value, ci=None, scale: float = 100.0):
    if value is None:
        return None
    lo, hi = ci if ci else (None, None)
    return scale * value, None if lo is None else scale * lo, None if hi is None else scale * hi


def _panel(title: str, ylabel: str, groups: list, series: dict, metrics: list, **extra) -> dict:
    return {"title": title, "ylabel": ylabel, "groups": groups, "series": series, "metrics": metrics, **extra}


def chart_panels(summary: dict) -> list[dict]:
    """What scores.png draws: one panel per task (every metric and scoring mode, a bar per model with its
    95% interval), generation health, preference accuracy and margin, judge win rates. Each panel:
    {title, ylabel, groups, series: {label: [(value, lo, hi) or None per group]}, metrics: [(section, metric)]}
    and optionally ylim and a reference line."""
    models = summary["models"]
    panels = []
    percent = {"ylim": (0, 100)}
    for task in task_names(summary):
        groups, keys = [], []
        for mode in MODES:
            cells = [m["tasks"].get(task, {}).get(mode) for m in models.values()]
            for metric in dict.fromkeys(k for c in cells if c for k in metrics_of(c)):
                groups.append(f"{metric}\n({mode})")
                keys.append((mode, metric))
        series = {
            name: [
                _bar(
                    (m["tasks"].get(task, {}).get(mode) or {}).get(metric),
                    (m["tasks"].get(task, {}).get(mode) or {}).get(f"{metric}_ci95"),
                )
                for mode, metric in keys
            ]
            for name, m in models.items()
        }
        note = overlap_note(summary, task)
        title = f"{task} (n={task_n(summary, task)})" + (f"\n{note}" if note else "")
        metrics = [(task, metric) for _, metric in keys]
        panels.append(_panel(title, "% of items (95% interval)", groups, series, metrics, **percent))
    health = {n: m["generation"] for n, m in models.items() if m.get("generation")}
    if health:
        n = next(iter(health.values()))["n"]
        rates = {name: [_bar(g[r], g.get(f"{r}_ci95")) for r in GENERATION_RATES] for name, g in health.items()}
        panels.append(
            _panel(
                f"generation health, greedy (n={n} prompts)",
                "% of replies (repeat: % of 4-grams)",
                list(GENERATION_RATES),
                rates,
                [(GENERATION_TASK, r) for r in GENERATION_RATES],
                **percent,
            )
        )
        lengths = {name: [_bar(g["mean_length"], scale=1.0)] for name, g in health.items()}
        metric = [(GENERATION_TASK, "mean_length")]
        panels.append(
            _panel(f"reply length (n={n} prompts)", "mean reply length (tokens)", ["mean_length"], lengths, metric)
        )
    pref = {n: m["preference"] for n, m in models.items() if m.get("preference")}
    if pref:
        n = next(iter(pref.values()))["n"]
        accuracy = {
            name: [_bar(p["accuracy"], stats.wilson_interval(round(p["accuracy"] * p["n"]), p["n"]))]
            for name, p in pref.items()
        }
        ylabel = "% of pairs with log p(chosen) > log p(rejected)"
        metric = [("preference", "accuracy")]
        panels.append(_panel(f"held-out preference pairs (n={n})", ylabel, ["accuracy"], accuracy, metric, **percent))
        margins = {name: [_bar(p["mean_margin"], scale=1.0)] for name, p in pref.items()}
        ylabel = "mean log p(chosen) − log p(rejected) (nats)"
        metric = [("preference", "mean_margin")]
        panels.append(_panel(f"held-out preference margin (n={n})", ylabel, ["mean_margin"], margins, metric))
    judged = summary.get("judgements") or []
    if judged:
        series = {
            "win rate": [_bar(j["win_rate"], j["ci95"]) for j in judged],
            "length-controlled": [_bar(j["length_controlled_win_rate"]) for j in judged],
        }
        panels.append(
            _panel(
                f"judge: win rate of the later model (n={judged[0]['n']} prompts)",
                "win rate (%, 95% interval)",
                [f"{j['a']} → {j['b']}" for j in judged],
                series,
                [("judge", "win_rate"), ("judge", "length_controlled_win_rate")],
                line=50,
                **percent,
            )
        )
    return panels


def save_chart(summary: dict, path: Path) -> Path:
    """chart_panels as one PNG, up to three panels a row; every axis labelled, n in every title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = chart_panels(summary) or [{"title": "nothing scored", "ylabel": "", "groups": [], "series": {}}]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        series = panel["series"]
        width = 0.8 / max(1, len(series))
        for j, (label, bars) in enumerate(series.items()):
            xs = [i + j * width for i, bar in enumerate(bars) if bar is not None]
            present = [bar for bar in bars if bar is not None]
            values = [bar[0] for bar in present]
            errors = None
            if any(bar[1] is not None for bar in present):
                errors = [
                    [max(0.0, v - (lo if lo is not None else v)) for v, lo, _ in present],
                    [max(0.0, (hi if hi is not None else v) - v) for v, _, hi in present],
                ]
            ax.bar(xs, values, width, yerr=errors, capsize=3, label=label)
        ax.set_xticks(
            [i + width * (len(series) - 1) / 2 for i in range(len(panel["groups"]))], panel["groups"], fontsize=8
        )
        ax.set_xlabel("metric (scoring mode)" if panel.get("metrics", [("", "")])[0][0] in task_names(summary) else "")
        ax.set_ylabel(panel["ylabel"], fontsize=9)
        if panel.get("ylim"):
            ax.set_ylim(*panel["ylim"])
        if panel.get("line") is not None:
            ax.axhline(panel["line"], color="gray", lw=0.8, ls="--")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(panel["title"], fontsize=10)
        if len(series) > 1:
            ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(out: Path, summary: dict, prompts: list[dict], replies: dict[str, list[dict]]) -> None:
    """Everything but the resolved recipe, into `out` (the temporary directory that becomes output_dir)."""
    atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / REPORT_NAME, report_markdown(summary, prompts, replies))
    save_chart(summary, out / CHART_NAME)
    if replies:
        rows = [
            {"model": name, "index": i, "prompt": p["messages"], "reference": p["reference"], **reply}
            for name, model_replies in replies.items()
            for i, (p, reply) in enumerate(zip(prompts, model_replies))
        ]
        atomic_write_text(out / REPLIES_NAME, "".join(json.dumps(r) + "\n" for r in rows))
