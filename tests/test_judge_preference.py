"""evaluate.py's judge and held-out preference accuracy on the tiny models: verdicts equal to the judge's
label probabilities recomputed here, position bias cancelled (a model against itself scores exactly 0.5,
swapping two models gives 1 - win rate), preference accuracy and margins equal to an independent
log-probability computation, DPO's own tokenization of a pair, and one-line refusals of bad input.

One evaluation (module fixture) serves the output tests: the converted base model, the memorised SFT
model, and that SFT model again under another name, judged by the SFT model (as the demo may do).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, build_stage_trainer, write_recipe

from posttrain import evaluate
from posttrain.demo import fixtures
from posttrain.evaluation import judge as judging
from posttrain.evaluation import preference
from posttrain.evaluation import report as eval_report
from posttrain.outputs.errors import PosttrainError

MAX_NEW_TOKENS = 24
MODELS = ("base", "sft", "again")


def run_evaluate(*argv):
    evaluate.main(evaluate.parse([str(a) for a in argv]))


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    rows = fixtures.arc_rows([(q, a, r) for (q, a), r in zip(fixtures.QA_PAIRS, fixtures.REJECTED_ANSWERS)])
    return fixtures.write_jsonl(tmp_path_factory.mktemp("tasks") / "arc_easy_test.jsonl", rows)


@pytest.fixture(scope="module")
def pairs_file(preference_data_dir):
    """All six demo preference pairs as one JSONL of pairs (the data directory's test split holds two)."""
    return Path(preference_data_dir) / "train.jsonl"


def base_args(tiny_model_dir, sft_dir, task_file, out) -> list:
    """The cheapest evaluation around the judge: one item of one task, plain scoring only."""
    return [
        *("--models", f"base={tiny_model_dir}", f"sft={sft_dir}", f"again={sft_dir}"),
        *("--tasks", "arc_easy", "--task_files", f"arc_easy={task_file}", "--limit", 1, "--chat_scoring", "false"),
        *("--max_new_tokens", MAX_NEW_TOKENS, "--output_dir", out),
    ]


@pytest.fixture(scope="module")
def judged(tmp_path_factory, tiny_model_dir, memorised_sft, task_file, sft_data_dir, pairs_file):
    sft_dir = memorised_sft[1]
    out = tmp_path_factory.mktemp("judged") / "out"
    run_evaluate(
        *base_args(tiny_model_dir, sft_dir, task_file, out),
        *("--prompts", sft_data_dir, "--judge", sft_dir, "--preference_data", pairs_file),
    )
    return out, json.loads((out / eval_report.SUMMARY_NAME).read_text())


def load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def replies_by_model(out: Path) -> tuple[list[dict], dict[str, list[dict]]]:
    """(prompts, {model: reply records}) as replies.jsonl recorded them."""
    rows = read_jsonl(out / eval_report.REPLIES_NAME)
    prompts = [{"messages": r["prompt"]} for r in rows if r["model"] == MODELS[0]]
    return prompts, {m: [r for r in rows if r["model"] == m] for m in MODELS}


# ----------------------------------------------------------------------------------- judge


def test_verdicts_are_the_judges_label_probabilities(judged, memorised_sft):
    out, summary = judged
    model, tokenizer = load(memorised_sft[1])
    labels = [
        tokenizer("A", add_special_tokens=False)["input_ids"],
        tokenizer("B", add_special_tokens=False)["input_ids"],
    ]
    _, replies = replies_by_model(out)
    rows = read_jsonl(out / judging.JUDGEMENTS_DIR / "base_vs_sft.jsonl")
    assert sorted((r["prompt_id"], r["order"]) for r in rows) == [(i, o) for i in range(2) for o in ("ab", "ba")]
    for row in rows:
        assert row["label_token_ids"] == [labels[0][0], labels[1][0]] and all(len(ids) == 1 for ids in labels)
        first, second = (replies[row[k]][row["prompt_id"]]["reply"] for k in ("first", "second"))
        assert (row["first"], row["second"]) == (("base", "sft") if row["order"] == "ab" else ("sft", "base"))
        assert row["judge_input"].index(f"[Reply A]\n{first}\n") < row["judge_input"].index(f"[Reply B]\n{second}")
        assert row["judge_input"].endswith("<|im_start|>assistant\n")
        ids = tokenizer(row["judge_input"], add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            last = model(torch.tensor([ids])).logits[0, -1]
        p = torch.softmax(last, -1)[row["label_token_ids"]]
        assert row["p_first"] == pytest.approx(float(p[0] / p.sum()), rel=1e-5)
    # the base model's replies do not stop and differ from the memorised ones: a real comparison
    assert any(a["reply"] != b["reply"] for a, b in zip(replies["base"], replies["sft"]))
    # the win rate is the mean over prompts of the two orders' verdicts, as recomputed from the rows
    p = {(r["prompt_id"], r["order"]): r["p_first"] for r in rows}
    expected = sum((1 - p[i, "ab"] + p[i, "ba"]) / 2 for i in range(2)) / 2
    (result,) = [j for j in summary["judgements"] if (j["a"], j["b"]) == ("base", "sft")]
    assert result["win_rate"] == pytest.approx(expected) and result["n"] == 2
    assert result["ci95"][0] <= result["win_rate"] <= result["ci95"][1] and 0 < result["p_value"] <= 1
    assert result["mean_length_a"] == sum(len(r["reply"]) for r in replies["base"]) / 2
    assert result["mean_length_b"] == sum(len(r["reply"]) for r in replies["sft"]) / 2


def test_a_model_against_itself_scores_exactly_one_half(judged):
    _, summary = judged
    pairs = {(j["a"], j["b"]): j for j in summary["judgements"]}
    assert list(pairs) == [("base", "sft"), ("sft", "again"), ("base", "again")]  # consecutive, then first-last
    itself = pairs["sft", "again"]
    assert itself["win_rate"] == 0.5 and itself["ci95"] == [0.5, 0.5] and itself["p_value"] == 1.0
    assert itself["length_controlled_win_rate"] == pytest.approx(0.5, abs=1e-6)
    assert pairs["base", "again"]["win_rate"] == pairs["base", "sft"]["win_rate"]


def test_swapping_the_models_gives_one_minus_the_win_rate(judged, memorised_sft):
    out, summary = judged
    prompts, replies = replies_by_model(out)
    judge = judging.check_judge(memorised_sft[1], judging.LABELS, prompts, MAX_NEW_TOKENS, ["sft", "base"])
    swapped = {"sft": replies["sft"], "base": replies["base"]}
    rows = judging.add_verdicts(load(memorised_sft[1])[0], judge, judging.judging_rows(judge, prompts, swapped), 3)
    (result,) = judging.judgements(rows, swapped)
    (forward,) = [j for j in summary["judgements"] if (j["a"], j["b"]) == ("base", "sft")]
    assert (result["a"], result["b"]) == ("sft", "base")
    assert result["win_rate"] == pytest.approx(1 - forward["win_rate"], abs=1e-6)
    assert result["length_controlled_win_rate"] == pytest.approx(1 - forward["length_controlled_win_rate"], abs=1e-4)
    assert forward["win_rate"] != pytest.approx(0.5, abs=1e-3)  # not a trivial symmetry


def test_length_controlled_win_rate_removes_a_pure_length_effect():
    import numpy as np

    rng = np.random.default_rng(0)
    delta = rng.normal(200, 300, size=400)  # the later model is longer on most prompts
    x = np.tanh(delta / delta.std())
    for quality in (0.0, 1.0):
        pref = 1 / (1 + np.exp(-(quality + 2.0 * x)))
        assert pref.mean() > 0.6 + 0.1 * quality  # the raw win rate rewards length
        lc = judging.length_controlled_win_rate(pref.tolist(), delta.tolist())
        assert lc == pytest.approx(1 / (1 + np.exp(-quality)), abs=0.02)
    # no length difference: the length-controlled rate is the raw one
    assert judging.length_controlled_win_rate([0.2, 0.9, 0.7], [5, 5, 5]) == pytest.approx(0.6, abs=1e-4)


def test_report_has_the_judge_and_preference_sections(judged):
    out, summary = judged
    report = (out / eval_report.REPORT_NAME).read_text()
    assert "## Judge (pairwise win rate of the later model)" in report and "| sft → again | 50.0 |" in report
    assert (
        "The judge is one of the evaluated models (`sft`)" in report and summary["judge"]["evaluated_model"] == "sft"
    )
    assert "length-controlled" in report and summary["judge"]["length_control"] in report
    assert "## Preference accuracy (held-out pairs)" in report
    # the margin's comparisons are in nats, in the preference section only (not as percentage points)
    (margin,) = [
        c
        for c in summary["comparisons"]
        if (c["task"], c["metric"], c["a"], c["b"]) == ("preference", "margin", "base", "sft")
    ]
    assert f"| base → sft | margin | {margin['delta']:+.3g} nats |" in report and "| preference |" not in report
    assert {p.name for p in (out / judging.JUDGEMENTS_DIR).iterdir()} == {
        "base_vs_sft.jsonl",
        "sft_vs_again.jsonl",
        "base_vs_again.jsonl",
    }


# ---------------------------------------------------------------------- preference accuracy


def independent_margins(model_dir, rows: list[dict]) -> list[float]:
    """log p(chosen) - log p(rejected) of each pair: the prompt rendered as text with the generation prompt,
    each response the text the full conversation adds after it, one unpadded sequence at a time."""
    model, tokenizer = load(model_dir)
    margins = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        logps = []
        for key in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=False)
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            assert full.startswith(prompt) and ids[: len(context)] == context
            with torch.inference_mode():
                logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            logps.append(sum(float(logprobs[t - 1, ids[t]]) for t in range(len(context), len(ids))))
        margins.append(logps[0] - logps[1])
    return margins


def test_preference_accuracy_equals_an_independent_computation(judged, tiny_model_dir, memorised_sft, pairs_file):
    _, summary = judged
    rows = read_jsonl(pairs_file)
    margins = {}
    for name, model_dir in (("base", tiny_model_dir), ("sft", memorised_sft[1])):
        margins[name] = independent_margins(model_dir, rows)
        reported = summary["models"][name]["preference"]
        assert reported["n"] == len(rows) == 6
        assert reported["accuracy"] == pytest.approx(sum(m > 0 for m in margins[name]) / len(rows))
        assert reported["mean_margin"] == pytest.approx(sum(margins[name]) / len(rows), rel=1e-4)
    assert summary["models"]["again"]["preference"] == summary["models"]["sft"]["preference"]
    # the memorised model prefers the answers it was trained on, by a wide margin
    assert summary["models"]["sft"]["preference"]["accuracy"] == 1.0
    assert (
        summary["models"]["sft"]["preference"]["mean_margin"] > summary["models"]["base"]["preference"]["mean_margin"]
    )
    comparisons = {(c["a"], c["b"], c["metric"]): c for c in summary["comparisons"] if c["task"] == "preference"}
    assert set(comparisons) == {
        (a, b, m) for a, b in evaluate.stats.model_pairs(list(MODELS)) for m in preference.METRICS
    }
    first = comparisons["base", "sft", "accuracy"]
    assert first["mode"] == "logprob" and first["test"] == "mcnemar_exact" and first["n"] == 6
    assert first["delta"] == pytest.approx(1.0 - summary["models"]["base"]["preference"]["accuracy"])
    margin = comparisons["base", "sft", "margin"]
    assert margin["test"] == "sign_flip_permutation"
    assert margin["delta"] == pytest.approx(sum(margins["sft"]) / 6 - sum(margins["base"]) / 6, rel=1e-4)


def test_pairs_are_tokenized_as_dpo_trains_on_them(tmp_path, tiny_model_dir, preference_data_dir):
    """The prompt and response ids DPOTrainer builds for the demo pairs are the ones scored here (a TRL
    upgrade that changes its tokenization fails this test)."""
    recipe = write_recipe(
        "dpo", tmp_path / "r.yaml", tiny_model_dir, preference_data_dir, tmp_path / "out", eval_strategy="no"
    )
    trainer = build_stage_trainer("dpo", recipe)
    rows = fixtures.preference_rows()
    assert len(trainer.train_dataset) == len(rows)
    for row, example in zip(rows, trainer.train_dataset):
        assert preference.tokenize_pair(trainer.processing_class, row) == (
            example["prompt_ids"],
            example["chosen_ids"],
            example["rejected_ids"],
        )


# ------------------------------------------------------------------------------- bad input


def model_copy(model_dir, dest: Path, chat_template: bool = True, architecture: str | None = None) -> Path:
    shutil.copytree(model_dir, dest)
    if not chat_template:
        (dest / "chat_template.jinja").unlink(missing_ok=True)
        config = json.loads((dest / "tokenizer_config.json").read_text())
        config.pop("chat_template", None)
        (dest / "tokenizer_config.json").write_text(json.dumps(config))
    if architecture:
        config = json.loads((dest / "config.json").read_text())
        config["architectures"] = [architecture]
        (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize(
    "case, message",
    [
        ("not_a_model", "judge: {tokenizer_dir}: not a model directory (no config.json)"),
        ("reward_model", "judge: {tmp}/rm: it holds a LlamaForSequenceClassification, not a causal language model"),
        ("no_chat_template", "judge: the tokenizer of {tmp}/plain has no chat template"),
        ("labels_not_tokens", "judge_labels: 'Alpha' is not one token of the judge's tokenizer"),
        ("context_too_small", "judge: its context (256 tokens, "),
        ("no_prompts", "judge: it compares the models' replies to `prompts`"),
        ("one_model", "judge: it compares models; name at least two in models"),
        (
            "pairs_without_responses",
            "preference data needs columns prompt, chosen, rejected (missing chosen, rejected)",
        ),
        ("pairs_missing", "preference_data: {tmp}/none/test.jsonl not found"),
    ],
)
def test_bad_input_is_one_line_before_any_model_loads(
    tmp_path, monkeypatch, tiny_model_dir, tokenizer_dir, task_file, sft_data_dir, case, message
):
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: pytest.fail("a model was loaded"))
    out = tmp_path / "out"
    args = {
        "--models": [f"a={tiny_model_dir}", f"b={tiny_model_dir}"],
        "--tasks": ["arc_easy"],
        "--task_files": [f"arc_easy={task_file}"],
        "--prompts": [sft_data_dir],
        "--max_new_tokens": [MAX_NEW_TOKENS],
        "--judge": [tiny_model_dir],
        "--output_dir": [out],
    }
    if case == "not_a_model":
        args["--judge"] = [tokenizer_dir]
    elif case == "reward_model":
        args["--judge"] = [model_copy(tiny_model_dir, tmp_path / "rm", architecture="LlamaForSequenceClassification")]
    elif case == "no_chat_template":
        args["--judge"] = [model_copy(tiny_model_dir, tmp_path / "plain", chat_template=False)]
    elif case == "labels_not_tokens":
        args["--judge_labels"] = ["Alpha", "Beta"]
    elif case == "context_too_small":
        args["--max_new_tokens"] = [120]
    elif case == "no_prompts":
        del args["--prompts"]
    elif case == "one_model":
        args["--models"] = args["--models"][:1]
    elif case == "pairs_without_responses":
        del args["--judge"]
        rows = [{"prompt": r["prompt"]} for r in fixtures.preference_rows()]
        args["--preference_data"] = [fixtures.write_jsonl(tmp_path / "prompts_only.jsonl", rows)]
    elif case == "pairs_missing":
        del args["--judge"]
        (tmp_path / "none").mkdir()
        args["--preference_data"] = [tmp_path / "none"]
    with pytest.raises(PosttrainError) as err:
        run_evaluate(*[x for key, values in args.items() for x in (key, *values)])
    assert message.format(tokenizer_dir=tokenizer_dir, tmp=tmp_path) in str(err.value)
    assert "\n" not in str(err.value) and not out.exists()


# ------------------------------------------------------------------ several processes (slow)


@pytest.mark.slow
def test_data_parallel_judge_and_preference_equal_one_process(
    judged, tmp_path, tiny_model_dir, memorised_sft, task_file, sft_data_dir, pairs_file
):
    """`accelerate launch` on 2 CPU processes: the judging texts and the pairs are split between them, the
    figures are those of one process, and the judgements are written once."""
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_processes", "2"]
    cmd += [str(REPO / "posttrain" / "evaluate.py")]
    cmd += [str(a) for a in base_args(tiny_model_dir, memorised_sft[1], task_file, out)]
    cmd += ["--prompts", str(sft_data_dir), "--judge", str(memorised_sft[1]), "--preference_data", str(pairs_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("report: ") == 1
    one_out, one = judged
    two = json.loads((out / eval_report.SUMMARY_NAME).read_text())
    assert [(j["a"], j["b"], j["n"]) for j in two["judgements"]] == [
        (j["a"], j["b"], j["n"]) for j in one["judgements"]
    ]
    for key in ("win_rate", "p_value", "length_controlled_win_rate", "mean_length_a", "mean_length_b"):
        assert [j[key] for j in two["judgements"]] == pytest.approx([j[key] for j in one["judgements"]], abs=1e-6)
    for j_one, j_two in zip(one["judgements"], two["judgements"]):
        assert j_two["ci95"] == pytest.approx(j_one["ci95"], abs=1e-6)
    for name in MODELS:
        assert two["models"][name]["preference"] == pytest.approx(one["models"][name]["preference"], rel=1e-5)
    for path in (one_out / judging.JUDGEMENTS_DIR).iterdir():
        rows_one, rows_two = read_jsonl(path), read_jsonl(out / judging.JUDGEMENTS_DIR / path.name)
        assert [r["judge_input"] for r in rows_one] == [r["judge_input"] for r in rows_two]
        assert [r["p_first"] for r in rows_one] == pytest.approx([r["p_first"] for r in rows_two], rel=1e-5)
