"""What `posttrain/evaluate.py` writes: summary.json, report.md and a PNG chart of the scores.

    summary = build_summary(paths, scores, generation, comparisons)
    write_outputs(out_dir, summary, replies, prompts)     # summary.json, report.md, scores.png, replies.jsonl

summary.json is the machine-readable record (`models.<name>.tasks.<task>.plain|chat.{acc, acc_stderr,
acc_norm, acc_norm_stderr, n}`, `models.<name>.generation.{stop_rate, truncated_rate, mean_length,
repeat_4gram_rate, n}`, `comparisons: [{task, mode, metric, a, b, delta, ci95, p_value, test, n}]`);
report.md is the same for a reader, with the published figures of the pipeline this project
replaces as a reference row, and a few replies side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.outputs.atomic import atomic_write_text

SUMMARY_NAME, REPORT_NAME, CHART_NAME, REPLIES_NAME = "summary.json", "report.md", "scores.png", "replies.jsonl"
MODES = ("plain", "chat")
Z95 = 1.96
SAMPLE_REPLIES = 3

# Published accuracies (% correct, log-probability multiple choice) of the pipeline this project
# replaces, for its base, SFT and DPO models; how it formatted the prompts is not recorded.
PUBLISHED_REFERENCE = {
    "arc_easy": {"base": 52.6, "SFT": 52.6, "DPO": 54.9},
    "arc_challenge": {"base": 27.2, "SFT": 29.5, "DPO": 29.4},
    "openbookqa": {"base": 26.4, "SFT": 29.0, "DPO": 27.2},
}


def build_summary(paths: dict, scores: dict, generation: dict, comparisons: list[dict]) -> dict:
    """The summary.json mapping from {model: path}, {model: {mode: {task: TaskScore}}}, {model: figures}."""
    models = {}
    for name, path in paths.items():
        tasks: dict = {}
        for mode, by_task in scores[name].items():
            for task, task_score in by_task.items():
                tasks.setdefault(task, {})[mode] = task_score.summary()
        models[name] = {"path": str(path), "tasks": tasks, "generation": generation.get(name)}
    return {"models": models, "comparisons": comparisons}


def _interval(value, stderr) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f} ± {100 * Z95 * stderr:.1f}" if stderr is not None else f"{100 * value:.1f}"


def _cell(text, width: int = 160) -> str:
    """Markdown-table-safe one-line text, cut at `width` characters."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    text = "".join(c if c.isprintable() else "\ufffd" for c in text)
    return (text[: width - 1] + "…" if len(text) > width else text) or "(empty)"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def scores_table(summary: dict, metric: str = "acc") -> str:
    """Models (x scoring mode) x tasks, `metric` in % with its 95% interval (± 1.96 standard errors)."""
    models = summary["models"]
    tasks = list(dict.fromkeys(t for m in models.values() for t in m["tasks"]))
    rows = []
    for mode in MODES:
        for name, model in models.items():
            cells = [model["tasks"].get(t, {}).get(mode) for t in tasks]
            if any(cells):
                rows.append(
                    [f"{name} ({mode})"]
                    + [_interval(c.get(metric), c.get(f"{metric}_stderr")) if c else "–" for c in cells]
                )
    if metric == "acc":
        for stage in ("base", "SFT", "DPO"):
            rows.append(
                [f"reference: {stage} (published)"]
                + [f"{PUBLISHED_REFERENCE[t][stage]:.1f}" if t in PUBLISHED_REFERENCE else "–" for t in tasks]
            )
    n = {t: next((c["n"] for m in models.values() for c in m["tasks"].get(t, {}).values()), "?") for t in tasks}
    return _table([f"{metric} %"] + [f"{t} (n={n[t]})" for t in tasks], rows)


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


def generation_table(summary: dict) -> str:
    rows = [
        [
            name,
            f"{g['stop_rate']:.2f}",
            f"{g['truncated_rate']:.2f}",
            f"{g['mean_length']:.1f}",
            f"{g['repeat_4gram_rate']:.3f}",
            str(g["n"]),
        ]
        for name, m in summary["models"].items()
        if (g := m["generation"])
    ]
    return _table(["model", "stop_rate", "truncated_rate", "mean_length", "repeat_4gram_rate", "n"], rows)


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
How to read the comparisons: Δ is b − a in percentage points on the same items; the interval is
a 95% paired-bootstrap interval of Δ, and p comes from McNemar's exact test (0/1 scores: only
the items the two models disagree on count) or a paired sign-flip test (graded scores). An interval
that contains 0 (p ≥ 0.05) means the difference is within the noise of this many items. With
several comparisons, about one in twenty crosses p < 0.05 by chance. `plain` scores the task's own
prompt; `chat` the same prompt as a user turn in the model's chat template, with the system
prompt: a model that gains only in `chat` learnt the format, one that gains in both, the content."""


def report_markdown(summary: dict, prompts: list[dict], replies: dict[str, list[dict]]) -> str:
    parts = [
        "# Evaluation",
        "Models: " + ", ".join(f"`{n}` ({m['path']})" for n, m in summary["models"].items()),
        "## Scores (acc, % correct, ± 95% interval)",
        scores_table(summary, "acc"),
        "Reference rows: the published figures of the previous pipeline (log-probability multiple choice).",
        "## Scores (acc_norm, length-normalised)",
        scores_table(summary, "acc_norm"),
        f"![scores]({CHART_NAME})",
    ]
    if summary["comparisons"]:
        parts += ["## Paired comparisons", comparisons_table(summary["comparisons"]), READING]
    if replies:
        parts += ["## Generation health (greedy)", generation_table(summary)]
        parts += ["## Sample replies", samples_section(prompts, replies)]
    parts += judge_section(summary)
    parts += preference_section(summary)
    return "\n\n".join(parts) + "\n"


def save_chart(summary: dict, path: Path) -> Path:
    """acc per task, one bar per model, one panel per scoring mode (error bars: 95% intervals),
    and stop_rate per model when there are generation figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = summary["models"]
    tasks = list(dict.fromkeys(t for m in models.values() for t in m["tasks"]))
    modes = [mode for mode in MODES if any(mode in m["tasks"].get(t, {}) for m in models.values() for t in tasks)]
    health = {n: m["generation"]["stop_rate"] for n, m in models.items() if m["generation"]}
    panels = len(modes) + bool(health)
    fig, axes = plt.subplots(1, panels, figsize=(max(5, 1.2 * len(tasks) * len(models)) * 0.6 * panels, 4))
    axes = axes if panels > 1 else [axes]
    width = 0.8 / max(1, len(models))
    for ax, mode in zip(axes, modes):
        for j, (name, model) in enumerate(models.items()):
            cells = [model["tasks"].get(t, {}).get(mode) or {} for t in tasks]
            values = [100 * (c.get("acc") or 0) for c in cells]
            errors = [100 * Z95 * (c.get("acc_stderr") or 0) for c in cells]
            ax.bar([i + j * width for i in range(len(tasks))], values, width, yerr=errors, capsize=3, label=name)
        ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(tasks))], tasks, rotation=20)
        ax.set_ylabel("acc (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{mode} scoring")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    if health:
        ax = axes[-1]
        ax.bar(list(health), [100 * v for v in health.values()], color="tab:gray")
        ax.set_ylim(0, 100)
        ax.set_ylabel("replies ending on <|im_end|> (%)")
        ax.set_title("stop rate (greedy)")
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
