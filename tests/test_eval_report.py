"""report.md's verdict lines, the intervals behind them, the overlap flag and the chart, on synthetic
scores with known answers (no model loads)."""

from __future__ import annotations

import json

import pytest

from posttrain.demo import fixtures
from posttrain.evaluation import overlap, report, stats
from posttrain.evaluation.harness import TaskScore
from posttrain.outputs.errors import PosttrainError


def task_score(values: list[float], metric: str = "acc") -> TaskScore:
    n = len(values)
    mean = sum(values) / n
    return TaskScore(n=n, metrics={"acc": mean, "acc_stderr": 0.0}, items={metric: dict(enumerate(values))})


def summary_of(scores: dict[str, list[float]], task="arc_easy", comparisons=None, **kwargs) -> dict:
    """base/sft/dpo ... scored on one task in chat mode, with their paired comparisons."""
    by_model = {name: {"chat": {task: task_score(v)}} for name, v in scores.items()}
    comparisons = stats.compare_models(by_model) if comparisons is None else comparisons
    paths = {name: f"runs/{name}" for name in scores}
    return report.build_summary(paths, by_model, {}, comparisons, **kwargs)


# ------------------------------------------------------------------------------- intervals


def test_wilson_interval_is_honest_at_small_n():
    lo, hi = stats.wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == pytest.approx(1.0)  # not 100 ± 0
    lo, hi = stats.wilson_interval(0, 4)
    assert lo == 0.0 and hi == pytest.approx(0.4899, abs=1e-4)
    lo, hi = stats.wilson_interval(1, 2)
    assert (lo, hi) == pytest.approx((0.0945, 0.9055), abs=1e-4)
    # large n: close to the normal interval
    lo, hi = stats.wilson_interval(500, 1000)
    assert (lo, hi) == pytest.approx((0.5 - 1.96 * 0.5 / 1000**0.5, 0.5 + 1.96 * 0.5 / 1000**0.5), abs=1e-3)


def test_paired_interval_of_proportions_is_honest_at_small_n():
    # every one of 10 items flips from wrong to right: the bootstrap would say [+1, +1]
    result = stats.paired_comparison(dict(enumerate([0.0] * 10)), dict(enumerate([1.0] * 10)))
    assert result["delta"] == 1.0 and result["ci95"] == pytest.approx([0.6075, 1.0], abs=1e-4)
    assert result["p_value"] == pytest.approx(2 / 2**10)
    # no item changes: an interval around 0 that is not zero width
    same = stats.paired_comparison(dict(enumerate([1.0, 0.0, 1.0])), dict(enumerate([1.0, 0.0, 1.0])))
    assert same["ci95"][0] < 0 < same["ci95"][1] and same["p_value"] == 1.0


def test_scores_table_shows_wilson_intervals_never_zero_width():
    summary = summary_of({"base": [0.0] * 10, "sft": [1.0] * 10})
    table = report.scores_table(summary, "arc_easy")
    assert "| acc (chat) | 0.0 [0.0, 27.8] | 100.0 [72.2, 100.0] |" in table
    assert "± 0.0" not in report.report_markdown(summary, [], {})
    assert summary["models"]["sft"]["tasks"]["arc_easy"]["chat"]["acc_ci95"] == pytest.approx([0.7225, 1.0], abs=1e-4)


# ---------------------------------------------------------------------------------- verdicts


def test_no_verdict_when_every_interval_contains_zero():
    # 5 of 10 right for both, on different items: delta 0, the interval contains 0
    summary = summary_of({"base": [1.0] * 5 + [0.0] * 5, "sft": [0.0] * 5 + [1.0] * 5})
    (line,) = report.verdicts(summary)
    assert line == "**sft vs base**: no difference larger than the noise (n = 10 items)"


def test_verdict_line_has_the_sign_interval_and_p_of_a_difference_that_excludes_zero():
    up = summary_of({"base": [0.0] * 10, "sft": [1.0] * 10})
    (line,) = report.verdicts(up)
    assert line == "**sft vs base**: arc_easy chat acc +100.0 points [+60.8, +100.0], p = 0.002"
    down = summary_of({"sft": [1.0] * 10, "dpo": [0.0] * 10})
    (line,) = report.verdicts(down)
    assert line == "**dpo vs sft**: arc_easy chat acc -100.0 points [-100.0, -60.8], p = 0.002"


def test_metrics_of_one_task_that_move_alike_share_one_phrase():
    """IFEval's four accuracies agree item for item on one-instruction prompts: one phrase names them all."""
    comparisons = [
        {"task": "ifeval", "mode": "chat", "metric": metric, "a": "base", "b": "sft", "delta": 1.0,
         "ci95": [0.6075, 1.0], "p_value": 2 / 1024, "test": "mcnemar_exact", "n": 10}
        for metric in ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc")
    ] + [
        {"task": "ifeval", "mode": "plain", "metric": "prompt_level_strict_acc", "a": "base", "b": "sft",
         "delta": 1.0, "ci95": [0.6075, 1.0], "p_value": 2 / 1024, "test": "mcnemar_exact", "n": 10},
        {"task": "ifeval", "mode": "chat", "metric": "inst_level_loose_acc", "a": "base", "b": "sft",
         "delta": 0.9, "ci95": [0.5, 0.98], "p_value": 0.004, "test": "mcnemar_exact", "n": 10},
    ]  # fmt: skip
    summary = report.build_summary({"base": "b", "sft": "s"}, {"base": {}, "sft": {}}, {}, comparisons)
    (line,) = report.verdicts(summary)
    assert line == (
        "**sft vs base**: ifeval chat prompt_level_strict_acc +100.0 points [+60.8, +100.0], p = 0.002 "
        "(inst_level_strict_acc, prompt_level_loose_acc alike); "
        "ifeval plain prompt_level_strict_acc +100.0 points [+60.8, +100.0], p = 0.002; "
        "ifeval chat inst_level_loose_acc +90.0 points [+50.0, +98.0], p = 0.004"
    )


def test_verdicts_per_stage_and_for_the_whole_pipeline():
    # base -> sft: 8 items gained (interval excludes 0); sft -> dpo: one more (within the noise)
    base, sft, dpo = [0.0] * 10, [1.0] * 8 + [0.0] * 2, [1.0] * 9 + [0.0]
    summary = summary_of({"base": base, "sft": sft, "dpo": dpo})
    lines = report.verdicts(summary)
    assert len(lines) == 3
    assert lines[0].startswith("**sft vs base**: arc_easy chat acc +80.0 points [+")
    assert lines[1] == "**dpo vs sft**: no difference larger than the noise (n = 10 items)"
    assert lines[2].startswith("**dpo vs base** (the whole pipeline): arc_easy chat acc +90.0 points")
    markdown = report.report_markdown(summary, [], {})
    assert markdown.index("## Verdicts") < markdown.index("## Scores")
    assert "- **sft vs base**: arc_easy chat acc +80.0 points" in markdown


def test_verdicts_of_preference_generation_and_judge():
    comparisons = [
        {"task": "preference", "mode": "logprob", "metric": "margin", "a": "sft", "b": "dpo", "delta": 1.5,
         "ci95": [0.9, 2.1], "p_value": 0.002, "test": "sign_flip_permutation", "n": 10},
        {"task": "preference", "mode": "logprob", "metric": "accuracy", "a": "sft", "b": "dpo", "delta": 0.1,
         "ci95": [-0.2, 0.4], "p_value": 0.6, "test": "mcnemar_exact", "n": 10},
        {"task": "generation", "mode": "greedy", "metric": "stop_rate", "a": "base", "b": "sft", "delta": 1.0,
         "ci95": [0.6075, 1.0], "p_value": 2 / 1024, "test": "mcnemar_exact", "n": 10},
    ]  # fmt: skip
    generation = {
        name: {"stop_rate": rate, "truncated_rate": 1 - rate, "mean_length": 5.0, "repeat_4gram_rate": 0.0, "n": 10}
        for name, rate in (("base", 0.0), ("sft", 1.0), ("dpo", 1.0))
    }
    paths = {n: n for n in generation}
    summary = report.build_summary(paths, {n: {} for n in paths}, generation, comparisons)
    summary["judgements"] = [
        {"a": "base", "b": "sft", "win_rate": 0.7, "ci95": [0.55, 0.85], "p_value": 0.01, "n": 10},
        {"a": "sft", "b": "dpo", "win_rate": 0.6, "ci95": [0.45, 0.75], "p_value": 0.2, "n": 10},
    ]
    lines = report.verdicts(summary)
    assert lines[0] == (
        "**sft vs base**: stop rate 0.00 -> 1.00 (+100.0 points [+60.8, +100.0], p = 0.002); "
        "judge win rate of sft 70.0% [55.0, 85.0], p = 0.01"
    )
    assert lines[1] == "**dpo vs sft**: held-out preference margin +1.50 nats [+0.90, +2.10], p = 0.002"
    assert lines[2].endswith("no difference larger than the noise")  # no comparison of base and dpo here


def test_no_verdict_when_the_interval_and_the_test_disagree_or_the_interval_sits_on_the_centre():
    comparisons = [
        {"task": "arc_easy", "mode": "chat", "metric": "acc", "a": "sft", "b": "dpo", "delta": -0.5,
         "ci95": [-0.76, -0.12], "p_value": 0.06, "test": "mcnemar_exact", "n": 10},
    ]  # fmt: skip
    summary = report.build_summary({"sft": "s", "dpo": "d"}, {"sft": {}, "dpo": {}}, {}, comparisons)
    summary["judgements"] = [
        {"a": "sft", "b": "dpo", "win_rate": 0.5, "ci95": [0.5 + 1e-12, 0.5 + 1e-12], "p_value": 0.19, "n": 10}
    ]
    assert report.verdicts(summary) == ["**dpo vs sft**: no difference larger than the noise (n = 10 items)"]


# ------------------------------------------------------------------ reference rows and overlap


def test_published_reference_only_beside_the_hub_task_at_its_full_n():
    full = report.PUBLISHED_REFERENCE["arc_easy"]["n"]
    hub = summary_of({"base": [1.0] * full, "sft": [1.0] * full})
    assert "published base / SFT / DPO" in report.scores_table(hub, "arc_easy")
    assert "| 52.6 / 52.6 / 54.9 |" in report.scores_table(hub, "arc_easy")
    local = summary_of({"base": [1.0] * full, "sft": [1.0] * full}, task_files={"arc_easy": "mine.jsonl"})
    limited = summary_of({"base": [1.0] * 100, "sft": [1.0] * 100})
    for summary in (local, limited):
        assert "published" not in report.report_markdown(summary, [], {})


def test_overlap_is_counted_per_task(tmp_path):
    long_question = (
        "Natalia sold clips to forty eight of her friends in April and then she sold half as many clips in May"
    )
    arc = fixtures.write_jsonl(tmp_path / "arc.jsonl", fixtures.arc_rows([(q, a, "no") for q, a in fixtures.QA_PAIRS]))
    gsm = fixtures.write_jsonl(
        tmp_path / "gsm.jsonl", [{"question": long_question + ".", "answer": "#### 72"}, {"question": "Unseen?"}]
    )
    train = tmp_path / "sft_data"
    # a data_scripts directory: train.jsonl is what training reads (test.jsonl is not counted)
    fixtures.write_jsonl(
        train / "train.jsonl",
        [fixtures.qa_conversation([fixtures.QA_PAIRS[0], fixtures.QA_PAIRS[2]])]
        + [fixtures.qa_conversation([("Tell me: " + long_question.upper() + ", how many?", "72")])],
    )
    fixtures.write_jsonl(train / "test.jsonl", [fixtures.qa_conversation([fixtures.QA_PAIRS[3]])])
    pairs = fixtures.write_jsonl(tmp_path / "pairs.jsonl", [fixtures.qa_preference(fixtures.QA_PAIRS[5][0], "a", "b")])
    files = overlap.training_files([train, pairs])
    found = overlap.task_overlap({"arc_easy": str(arc), "gsm8k": str(gsm)}, files)
    assert found == {
        "arc_easy": {"items": 3, "n": 6, "ngram": 13, "examples": [0, 2, 5]},
        "gsm8k": {"items": 1, "n": 2, "ngram": 13, "examples": [0]},
    }
    summary = summary_of({"base": [0.0] * 6, "sft": [1.0] * 6}, task_files={"arc_easy": str(arc)}, overlap=found)
    markdown = report.report_markdown(summary, [], {})
    assert "⚠ Overlap: `arc_easy` (3 of 6 items in the training data)" in markdown
    assert "(⚠ 3 of 6 items in the training data)" in report.verdicts(summary)[0]
    assert "| gsm8k | 1 of 2 |" in markdown


def test_training_data_that_is_missing_is_one_line(tmp_path):
    with pytest.raises(PosttrainError, match=r"^training_data: .*nothing: no such file"):
        overlap.training_files([tmp_path / "nothing"])
    (tmp_path / "rows.txt").write_text("x")
    with pytest.raises(PosttrainError, match="is not a .jsonl, .json, .parquet file"):
        overlap.training_files([tmp_path / "rows.txt"])


# --------------------------------------------------------------------------------------- chart


def test_chart_plots_every_reported_metric_with_n(tmp_path):
    by_model = {
        name: {
            "plain": {
                "arc_easy": TaskScore(
                    n=4, metrics={"acc": a, "acc_norm": a}, items={"acc": {0: a}, "acc_norm": {0: a}}
                )
            },
            "chat": {
                "arc_easy": TaskScore(
                    n=4, metrics={"acc": a, "acc_norm": a}, items={"acc": {0: a}, "acc_norm": {0: a}}
                )
            },
        }
        for name, a in (("base", 0.25), ("sft", 0.75))
    }
    generation = {
        n: {"stop_rate": 0.5, "truncated_rate": 0.5, "mean_length": 7.0, "repeat_4gram_rate": 0.1, "n": 2}
        for n in by_model
    }
    summary = report.build_summary({n: n for n in by_model}, by_model, generation, [])
    for name in by_model:
        summary["models"][name]["preference"] = {"accuracy": 0.5, "mean_margin": 0.2, "n": 2}
    summary["judgements"] = [
        {"a": "base", "b": "sft", "win_rate": 0.6, "ci95": [0.4, 0.8], "length_controlled_win_rate": 0.55, "n": 2}
    ]
    panels = report.chart_panels(summary)
    plotted = {m for p in panels for m in p["metrics"]}
    assert plotted == {
        ("arc_easy", "acc"),
        ("arc_easy", "acc_norm"),
        *(("generation", k) for k in ("stop_rate", "truncated_rate", "repeat_4gram_rate", "mean_length")),
        ("preference", "accuracy"),
        ("preference", "mean_margin"),
        ("judge", "win_rate"),
        ("judge", "length_controlled_win_rate"),
    }
    arc = panels[0]
    assert arc["title"] == "arc_easy (n=4)" and arc["groups"] == [
        "acc\n(plain)",
        "acc_norm\n(plain)",
        "acc\n(chat)",
        "acc_norm\n(chat)",
    ]
    assert all(p["ylabel"] and "n=" in p["title"] for p in panels)
    assert arc["series"]["sft"][0][0] == 75.0
    path = report.save_chart(summary, tmp_path / "scores.png")
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1650, 840)  # six panels, 3 a row, of 5.5 x 4.2 in at 100 dpi
    json.dumps(summary)  # the summary stays JSON
