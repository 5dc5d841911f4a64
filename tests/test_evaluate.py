"""evaluate.py on the tiny models: accuracies equal to an independent log-probability computation,
paired statistics with known answers, generation health against direct greedy generation, the
in-training callback's figures in trainer_state.json, the outputs, and one-line refusals of bad input.

One short SFT run (module fixture, with `health_prompts` on) gives a model that stops; the
converted base model does not. One evaluation of both serves the score, health and output tests.
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
from helpers import REPO, log_history, one_error_line

from posttrain import evaluate
from posttrain.conversion.chat_template import ENDOFTEXT, IM_END
from posttrain.data import prompts as data_prompts
from posttrain.demo import fixtures
from posttrain.evaluation import harness as evaluation
from posttrain.evaluation import report as eval_report
from posttrain.evaluation import stats
from posttrain.generation import health
from posttrain.outputs.errors import PosttrainError

MAX_NEW_TOKENS = 24
HEALTH_PROMPTS = 2

# ------------------------------------------------------------------------------ fixtures


def arc_rows() -> list[dict]:
    return fixtures.arc_rows([(q, a, r) for (q, a), r in zip(fixtures.QA_PAIRS, fixtures.REJECTED_ANSWERS)])


@pytest.fixture(scope="module")
def arc_file(tmp_path_factory):
    return fixtures.write_jsonl(tmp_path_factory.mktemp("tasks") / "arc_easy_test.jsonl", arc_rows())


@pytest.fixture(scope="module")
def sft_run(memorised_sft):
    """The memorised SFT run (conftest), with the generation-health callback on HEALTH_PROMPTS prompts."""
    return memorised_sft[1]


def run_evaluate(*argv):
    evaluate.main(evaluate.parse([str(a) for a in argv]))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir, sft_run, arc_file, sft_data_dir):
    """base (the converted model) and sft, on the local ARC-schema task and the SFT data's prompts."""
    out = tmp_path_factory.mktemp("eval") / "out"
    run_evaluate(
        "--models",
        f"base={tiny_model_dir}",
        f"sft={sft_run}",
        "--tasks",
        "arc_easy",
        "--task_files",
        f"arc_easy={arc_file}",
        "--prompts",
        sft_data_dir,
        "--max_new_tokens",
        MAX_NEW_TOKENS,
        "--output_dir",
        out,
    )
    return out, json.loads((out / eval_report.SUMMARY_NAME).read_text())


def load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(
        model_dir
    )


# ------------------------------------------------------------------------------- scores


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Summed log-probability of `continuation`'s tokens after `context` (the harness moves a context's
    trailing whitespace onto the continuation before tokenizing, so this does too)."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
    return sum(float(logprobs[len(ctx) - 1 + i, tok]) for i, tok in enumerate(whole[len(ctx) :]))


def independent_accuracy(model_dir, chat: bool) -> tuple[float, float]:
    """(acc, acc_norm) of arc_easy's definition: prompt "Question: {q}\\nAnswer:", each choice after
    " " (plain) or, in chat, the prompt as a user turn after the system prompt, then the assistant
    header, the choice right after it; argmax of the summed log-prob (acc) or of it divided by the
    choice's length in characters (acc_norm), against the gold label."""
    model, tokenizer = load(model_dir)
    acc = acc_norm = 0
    rows = arc_rows()
    for row in rows:
        prompt = f"Question: {row['question']}\nAnswer:"
        if chat:
            messages = [
                {"role": "system", "content": evaluate.DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": prompt},
            ]
            context = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            context = prompt
        texts = row["choices"]["text"]
        lls = [continuation_logprob(model, tokenizer, context, ("" if chat else " ") + t) for t in texts]
        gold = row["choices"]["label"].index(row["answerKey"])
        acc += max(range(len(texts)), key=lambda i: lls[i]) == gold
        acc_norm += max(range(len(texts)), key=lambda i: lls[i] / len(texts[i])) == gold
    return acc / len(rows), acc_norm / len(rows)


@pytest.mark.parametrize("mode", ["plain", "chat"])
def test_accuracy_equals_an_independent_computation(evaluated, tiny_model_dir, sft_run, mode):
    _, summary = evaluated
    for name, model_dir in (("base", tiny_model_dir), ("sft", sft_run)):
        reported = summary["models"][name]["tasks"]["arc_easy"][mode]
        acc, acc_norm = independent_accuracy(model_dir, chat=mode == "chat")
        assert reported["n"] == len(arc_rows())
        assert reported["acc"] == pytest.approx(acc) and reported["acc_norm"] == pytest.approx(acc_norm)
    # The trained model knows the answers it memorised (in its chat format); the random base does not.
    assert (
        summary["models"]["sft"]["tasks"]["arc_easy"]["chat"]["acc"]
        > summary["models"]["base"]["tasks"]["arc_easy"]["chat"]["acc"]
    )


def test_comparisons_and_outputs(evaluated):
    out, summary = evaluated
    comparisons = {(c["mode"], c["metric"]): c for c in summary["comparisons"] if c["task"] == "arc_easy"}
    assert set(comparisons) == {(m, k) for m in ("plain", "chat") for k in ("acc", "acc_norm")}
    for (mode, metric), c in comparisons.items():
        base = summary["models"]["base"]["tasks"]["arc_easy"][mode][metric]
        sft = summary["models"]["sft"]["tasks"]["arc_easy"][mode][metric]
        assert (c["a"], c["b"], c["task"]) == ("base", "sft", "arc_easy")
        assert c["delta"] == pytest.approx(sft - base) and c["ci95"][0] <= c["delta"] <= c["ci95"][1]
        assert 0 < c["p_value"] <= 1
    report = (out / eval_report.REPORT_NAME).read_text()
    # a 6-item local copy of ARC-Easy: no published row beside it, and the report opens with its verdict
    assert "published" not in report and "base → sft" in report
    assert report.index("## Verdicts") < report.index("## Scores") and "- **sft vs base**: " in report
    assert {(c["task"], c["metric"]) for c in summary["comparisons"] if c["task"] == "generation"} == {
        ("generation", "stop_rate"),
        ("generation", "truncated_rate"),
    }
    assert (out / eval_report.CHART_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    replies = [json.loads(line) for line in (out / eval_report.REPLIES_NAME).read_text().splitlines()]
    assert [(r["model"], r["index"]) for r in replies] == [(m, i) for m in ("base", "sft") for i in range(2)]
    assert (out / "recipe.resolved.yaml").is_file() and not list(out.parent.glob(".out.tmp-*"))


# ---------------------------------------------------------------------------- statistics


def test_mcnemar_exact_known_values():
    # b right on 6 items a gets wrong, never the reverse: p = 2 * (1/2)^6
    a, b = [0] * 6 + [1, 1, 0, 0], [1] * 6 + [1, 1, 0, 0]
    assert stats.mcnemar_exact(a, b) == pytest.approx(2 / 64)
    # 2 against 8 discordant items: p = 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10
    a, b = [1, 1] + [0] * 8 + [1] * 5, [0, 0] + [1] * 8 + [1] * 5
    assert stats.mcnemar_exact(a, b) == pytest.approx(2 * 56 / 1024)
    assert stats.mcnemar_exact([1, 0, 1], [1, 0, 1]) == 1.0
    assert stats.mcnemar_exact(b, a) == stats.mcnemar_exact(a, b)


def test_paired_comparison_known_answers():
    # 400 items: b gains 60, loses 20 -> delta +0.1; sd of the differences sqrt(0.2 - 0.01)
    a = [0] * 60 + [1] * 20 + [1] * 160 + [0] * 160
    b = [1] * 60 + [0] * 20 + [1] * 160 + [0] * 160
    result = stats.paired_comparison(dict(enumerate(a)), dict(enumerate(b)))
    half = 1.96 * (0.2 - 0.01) ** 0.5 / 400**0.5
    assert result["delta"] == pytest.approx(0.1) and result["n"] == 400
    assert result["ci95"] == pytest.approx([0.1 - half, 0.1 + half], abs=0.006)
    assert result["test"] == "mcnemar_exact"
    assert result["p_value"] == pytest.approx(stats.mcnemar_exact(a, b)) and result["p_value"] < 1e-5
    # only shared items count
    assert stats.paired_comparison({0: 1.0, 1: 0.0}, {1: 1.0, 2: 0.0})["n"] == 1


def test_sign_flip_for_graded_scores():
    # ten items, all improved: the exact two-sided permutation p is 2 / 2^10
    a, b = [0.2] * 10, [0.5] * 10
    result = stats.paired_comparison(dict(enumerate(a)), dict(enumerate(b)))
    assert result["test"] == "sign_flip_permutation"
    assert result["p_value"] == pytest.approx(2 / 1024, abs=0.0015)
    assert result["ci95"] == pytest.approx([0.3, 0.3])
    # symmetric differences: no evidence of a difference
    assert stats.sign_flip_p([0.5, 0.5, 0.1, 0.9], [0.9, 0.1, 0.5, 0.5]) == 1.0


def test_compare_models_pairs_in_order():
    def task_score(values):
        return evaluation.TaskScore(
            n=len(values), metrics={"acc": sum(values) / len(values)}, items={"acc": dict(enumerate(values))}
        )

    scores = {
        "base": {"plain": {"t": task_score([0, 0, 1, 0])}},
        "sft": {"plain": {"t": task_score([1, 0, 1, 0])}, "chat": {"t": task_score([1, 1, 1, 0])}},
        "dpo": {"plain": {"t": task_score([1, 1, 1, 1])}, "chat": {"t": task_score([1, 1, 1, 1])}},
    }
    comparisons = stats.compare_models(scores)
    got = [(c["a"], c["b"], c["mode"], c["delta"]) for c in comparisons]
    assert got == [
        ("base", "sft", "plain", 0.25),
        ("sft", "dpo", "plain", 0.5),
        ("sft", "dpo", "chat", 0.25),
        ("base", "dpo", "plain", 0.75),
    ]


# ---------------------------------------------------------------------- generation health


def direct_greedy_stops(model_dir, prompts: list[list[dict]], max_new_tokens: int) -> list[bool]:
    """Whether each greedy reply ends on <|im_end|> within max_new_tokens (plain model.generate)."""
    model, tokenizer = load(model_dir)
    vocab = tokenizer.get_vocab()
    stops = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=[vocab[IM_END], vocab[ENDOFTEXT]],
                pad_token_id=vocab[ENDOFTEXT],
            )
        stops.append(int(out[0, -1]) == vocab[IM_END] and out.shape[1] > ids["input_ids"].shape[1])
    return stops


def sft_prompts(sft_data_dir) -> list[list[dict]]:
    rows = [json.loads(line) for line in (Path(sft_data_dir) / "test.jsonl").read_text().splitlines()]
    return [r["messages"][:-1] for r in rows]


def test_stop_rate_against_direct_generation(evaluated, tiny_model_dir, sft_run, sft_data_dir):
    _, summary = evaluated
    prompts = sft_prompts(sft_data_dir)
    for name, model_dir in (("base", tiny_model_dir), ("sft", sft_run)):
        stops = direct_greedy_stops(model_dir, prompts, MAX_NEW_TOKENS)
        generation = summary["models"][name]["generation"]
        assert generation["n"] == len(prompts)
        assert generation["stop_rate"] == pytest.approx(sum(stops) / len(stops))
    assert summary["models"]["sft"]["generation"]["stop_rate"] == 1.0
    assert summary["models"]["base"]["generation"]["stop_rate"] < 1.0
    assert summary["models"]["base"]["generation"]["truncated_rate"] > 0


def test_health_figures_of_constructed_replies():
    replies = [
        {"stopped": True, "truncated": False, "length": 4, "token_ids": [1, 2, 3, 4]},
        {"stopped": False, "truncated": True, "length": 8, "token_ids": [5, 6, 7, 8, 5, 6, 7, 8]},
    ]
    # second reply: 5 four-grams, (5,6,7,8) repeated once; first: 1 four-gram
    assert health.health_figures(replies) == {
        "stop_rate": 0.5,
        "truncated_rate": 0.5,
        "mean_length": 6.0,
        "repeat_4gram_rate": 1 / 6,
        "n": 2,
    }


def test_prompts_end_before_the_final_assistant_turn():
    row = fixtures.qa_conversation([fixtures.QA_PAIRS[0], fixtures.QA_PAIRS[4]])
    prompt = data_prompts.prompt_of(row, system_prompt="ignored: the row has one")
    assert prompt["messages"] == row["messages"][:-1] and prompt["reference"] == fixtures.QA_PAIRS[4][1]
    no_system = data_prompts.prompt_of({"messages": row["messages"][1:3]}, system_prompt="S")
    assert no_system["messages"][0] == {"role": "system", "content": "S"}
    assert data_prompts.prompt_of({"messages": [{"role": "user", "content": "hi"}]}) is None
    pair = data_prompts.prompt_of(fixtures.preference_rows()[1])
    assert pair["messages"] == fixtures.preference_rows()[1]["prompt"] and pair["reference"] == "The sky is blue."


def test_prompts_load_from_json_lines_and_json_arrays_alike(tmp_path):
    rows = fixtures.sft_rows()[:3]
    lines = fixtures.write_jsonl(tmp_path / "p.jsonl", rows)
    array = tmp_path / "p.json"
    array.write_text(json.dumps(rows))
    from_lines = data_prompts.load_prompts(lines)
    assert len(from_lines) == 3 and from_lines == data_prompts.load_prompts(array)
    assert from_lines[0]["messages"] == rows[0]["messages"][:-1]


def test_callback_metrics_in_trainer_state(sft_run, sft_data_dir):
    logs = log_history(sft_run)
    eval_steps = [e["step"] for e in logs if "eval_loss" in e]
    health_entries = [e for e in logs if "eval_stop_rate" in e]
    assert eval_steps and [e["step"] for e in health_entries] == eval_steps
    for key in ("eval_truncated_rate", "eval_mean_length", "eval_repeat_4gram_rate"):
        assert all(key in e for e in health_entries)
    # the last evaluation saw the final model: its stop rate is direct greedy generation's
    stops = direct_greedy_stops(sft_run, sft_prompts(sft_data_dir)[:HEALTH_PROMPTS], health.HEALTH_MAX_NEW_TOKENS)
    assert health_entries[-1]["eval_stop_rate"] == sum(stops) / len(stops) == 1.0


# ------------------------------------------------------------------------------ bad input


def without_chat_template(model_dir, dest: Path) -> Path:
    shutil.copytree(model_dir, dest)
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_task", "arc_esay is not an lm-evaluation-harness task; did you mean arc_easy"),
        ("missing_model", "models: gone: "),
        ("missing_task_file", "task_files: arc_easy: "),
        ("task_file_fields", "line 2 has no field answerKey, which the task reads"),
        ("no_chat_template", "chat_scoring true: every model needs a chat template, but plain "),
        ("no_prompts", "no row has messages that end before an assistant turn"),
        ("stray_task_file", "task_files: openbookqa not in tasks"),
        ("bad_number", "max_new_tokens must be >= 1 (got 0)"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir, arc_file, case, message):
    rows = arc_rows()
    args = {
        "--models": [f"base={tiny_model_dir}"],
        "--tasks": ["arc_easy"],
        "--task_files": [f"arc_easy={arc_file}"],
        "--output_dir": [tmp_path / "out"],
    }
    if case == "unknown_task":
        args["--tasks"], args["--task_files"] = ["arc_esay"], []
    elif case == "missing_model":
        args["--models"] = [f"gone={tmp_path / 'gone'}"]
    elif case == "missing_task_file":
        args["--task_files"] = [f"arc_easy={tmp_path / 'none.jsonl'}"]
    elif case == "task_file_fields":
        del rows[1]["answerKey"]
        args["--task_files"] = [f"arc_easy={fixtures.write_jsonl(tmp_path / 'bad.jsonl', rows)}"]
    elif case == "no_chat_template":
        args["--models"] = [f"plain={without_chat_template(tiny_model_dir, tmp_path / 'plain')}"]
        args["--chat_scoring"] = ["true"]
    elif case == "no_prompts":
        users = [{"messages": [{"role": "user", "content": "hi"}]}]
        args["--prompts"] = [fixtures.write_jsonl(tmp_path / "p.jsonl", users)]
    elif case == "stray_task_file":
        args["--task_files"].append(f"openbookqa={arc_file}")
    elif case == "bad_number":
        args["--max_new_tokens"] = [0]
    with pytest.raises(PosttrainError) as err:
        run_evaluate(*[x for key, values in args.items() if values for x in (key, *values)])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_run_as_a_file_it_hides_no_package():
    """`python posttrain/evaluate.py` puts posttrain/ first on sys.path; the script takes it off, so
    `import evaluate` still finds Hugging Face's package (which some harness tasks import)."""
    script = REPO / "posttrain" / "evaluate.py"
    probe = (
        f"import importlib.util, runpy, sys; sys.path.insert(0, {str(script.parent)!r}); "
        f"runpy.run_path({str(script)!r}, run_name='as_a_file'); print(importlib.util.find_spec('evaluate').origin)"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    origin = Path(proc.stdout.strip().splitlines()[-1])
    assert origin.name == "__init__.py" and origin.parent.name == "evaluate" and "site-packages" in origin.parts


def test_cli_exit_code_and_unknown_key(tmp_path):
    recipe = tmp_path / "eval.yaml"
    recipe.write_text("models: [runs/nothing]\nnot_a_key: 1\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "posttrain" / "evaluate.py"), str(recipe)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert (
        one_error_line(proc.stderr)
        == f"error: recipe {recipe}: unknown key(s) not_a_key (not a field of EvalArguments)"
    )


# ------------------------------------------------------------------ several processes (slow)


@pytest.mark.slow
def test_data_parallel_scores_equal_one_process(evaluated, tmp_path, tiny_model_dir, sft_run, arc_file, sft_data_dir):
    """`accelerate launch` on 2 CPU processes: the items and prompts are split between them, the
    results are those of one process, and the outputs are written once."""
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_processes", "2"]
    cmd += [str(REPO / "posttrain" / "evaluate.py"), "--models", f"base={tiny_model_dir}", f"sft={sft_run}"]
    cmd += ["--tasks", "arc_easy", "--task_files", f"arc_easy={arc_file}", "--prompts", str(sft_data_dir)]
    cmd += ["--max_new_tokens", str(MAX_NEW_TOKENS), "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("report: ") == 1
    _, one = evaluated
    two = json.loads((out / eval_report.SUMMARY_NAME).read_text())
    for name in ("base", "sft"):
        for mode in ("plain", "chat"):
            got, want = two["models"][name]["tasks"]["arc_easy"][mode], one["models"][name]["tasks"]["arc_easy"][mode]
            assert got.keys() == want.keys()
            for key in want:  # numbers and [low, high] intervals alike
                assert got[key] == pytest.approx(want[key]), key
        assert two["models"][name]["generation"] == one["models"][name]["generation"]
    assert [c["p_value"] for c in two["comparisons"]] == [c["p_value"] for c in one["comparisons"]]


@pytest.mark.slow
def test_health_callback_under_zero3(tmp_path, tiny_model_dir):
    """Under ZeRO-3 (2 CPU processes) every rank generates its share with gathered parameters,
    unequal shares (3 prompts) included."""
    from helpers import accelerate_launch

    out, data_dir = tmp_path / "out", tmp_path / "data"
    fixtures.write_jsonl(data_dir / "train.jsonl", fixtures.sft_rows())
    fixtures.write_jsonl(data_dir / "test.jsonl", fixtures.sft_rows()[:3])
    accelerate_launch(
        "zero3.yaml",
        "posttrain/sft.py",
        "recipes/demo/sft.yaml",
        *("--model_name_or_path", tiny_model_dir, "--dataset_name", data_dir, "--output_dir", out),
        *("--max_steps", 4, "--eval_strategy", "steps", "--eval_steps", 2, "--save_strategy", "no"),
        *("--report_to", "none", "--health_prompts", 3),
        cwd=tmp_path,
    )
    logs = log_history(out)
    assert (
        [e["step"] for e in logs if "eval_stop_rate" in e] == [e["step"] for e in logs if "eval_loss" in e] == [2, 4]
    )


def test_local_task_configs_keep_the_harness_definition(tmp_path, arc_file):
    """arc_challenge `include`s arc_easy's YAML: its local config still has the prompt, choices and
    metrics; truthfulqa_mc2's local file must have the fields its templates read."""
    (config,) = evaluation.task_configs(["arc_challenge"], {"arc_challenge": str(arc_file)})
    assert config["task"] == "arc_challenge" and config["doc_to_text"] == "Question: {{question}}\nAnswer:"
    assert [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]
    assert (config["dataset_path"], config["test_split"]) == ("json", "test")
    assert config["dataset_kwargs"] == {"data_files": {"test": str(arc_file.resolve())}}
    assert evaluation.task_configs(["openbookqa"]) == ["openbookqa"]  # from the hub
    with pytest.raises(PosttrainError, match="line 1 has no field mc2_targets, .* needs mc2_targets, question"):
        evaluation.task_configs(["truthfulqa_mc2"], {"truthfulqa_mc2": str(arc_file)})


def test_the_index_of_the_named_tasks_equals_the_whole_one():
    """Only the directories that define the named tasks are indexed (the whole index parses ~14,000 YAML files,
    20-40 s); each task's entry, and so its config, is the one the whole index has. A name the text scan does
    not find (a typo) gets the whole index, and with it the did-you-mean."""
    from posttrain.evaluation import harness

    names = ("arc_challenge", "gsm8k", "ifeval", "truthfulqa_mc2")
    few, whole = harness.task_manager(names).task_index, harness.task_manager().task_index
    assert len(few) < len(whole) / 50
    for name in names:
        assert (few[name].kind, few[name].yaml_path) == (whole[name].kind, whole[name].yaml_path)
    assert "arc_easy" in harness.task_manager(("arc_esay",)).task_index
