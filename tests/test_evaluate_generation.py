"""evaluate.py's generation tasks on the tiny models: local gsm8k and ifeval tasks (and a multiple-choice one)
scored plain and chat, every metric of the harness in summary.json, per-item samples whose values equal an
independent scoring of the recorded replies and whose replies are the model's greedy continuation of the
recorded prompts, paired comparisons on them, IFEval's sentence counting offline on any rank, and one-line
refusals of bad input.

One evaluation (module fixture) of two tiny models (the converted one and a copy with perturbed weights, so
the two reply differently) serves the score, sample and comparison tests.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain import evaluate
from posttrain.demo import fixtures
from posttrain.evaluation import harness
from posttrain.evaluation import report as eval_report
from posttrain.outputs.errors import PosttrainError

GEN_TOKS = 12  # max_gen_toks of the test: the random tiny models never stop on their own
GSM8K_TEST = [
    {"question": "Tom has 3 apples and buys 2 more. How many apples does he have?", "answer": "3 + 2 = 5\n#### 5"},
    {"question": "What is 10 minus 4?", "answer": "10 - 4 = 6\n#### 6"},
    # A reply without a number extracts as "[invalid]": this item scores 1, so both values occur.
    {"question": "Name a colour.", "answer": "Any colour.\n#### [invalid]"},
]
GSM8K_TRAIN = [
    {"question": "Ann has 1 cat and gets 1 more. How many cats?", "answer": "1 + 1 = 2\n#### 2"},
    {"question": "What is 7 plus 1?", "answer": "7 + 1 = 8\n#### 8"},
]
IFEVAL_ROWS = [
    {
        "key": 1,
        "prompt": "Describe the sea in fewer than 5 sentences, without commas.",
        "instruction_id_list": ["length_constraints:number_sentences", "punctuation:no_comma"],
        "kwargs": [{"num_sentences": 5, "relation": "less than"}, {}],
    },
    {
        "key": 2,
        "prompt": "Write about cats in all lowercase letters, at least 3 words.",
        "instruction_id_list": ["change_case:english_lowercase", "length_constraints:number_words"],
        "kwargs": [{}, {"num_words": 3, "relation": "at least"}],
    },
    {
        "key": 3,
        "prompt": "Answer in at least 4 sentences: why is the sky blue?",
        "instruction_id_list": ["length_constraints:number_sentences"],
        "kwargs": [{"num_sentences": 4, "relation": "at least"}],
    },
]
IFEVAL_METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
GSM8K_METRICS = ("exact_match,strict-match", "exact_match,flexible-extract")


def arc_rows(train: bool = False) -> list[dict]:
    pairs = zip(fixtures.QA_PAIRS, fixtures.REJECTED_ANSWERS)
    items = [(q, a, r) for (q, a), r in pairs]
    return fixtures.arc_rows(items[3:] if train else items[:3])


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen_tasks")
    fixtures.write_jsonl(d / "gsm8k_test.jsonl", GSM8K_TEST)
    fixtures.write_jsonl(d / "gsm8k_train.jsonl", GSM8K_TRAIN)
    fixtures.write_jsonl(d / "ifeval.jsonl", IFEVAL_ROWS)
    fixtures.write_jsonl(d / "arc_easy.jsonl", arc_rows())
    fixtures.write_jsonl(d / "arc_easy_train.jsonl", arc_rows(train=True))
    return d


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny converted model with its weights perturbed: a second model whose replies differ."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("other") / "model"
    shutil.copytree(tiny_model_dir, out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def run_evaluate(*argv):
    evaluate.main(evaluate.parse([str(a) for a in argv]))


def task_args(task_dir) -> list:
    return [
        "--tasks",
        "gsm8k",
        "ifeval",
        "arc_easy",
        "--task_files",
        f"gsm8k={task_dir / 'gsm8k_test.jsonl'}",
        f"gsm8k:train={task_dir / 'gsm8k_train.jsonl'}",
        f"ifeval={task_dir / 'ifeval.jsonl'}",
        f"arc_easy={task_dir / 'arc_easy.jsonl'}",
        f"arc_easy:train={task_dir / 'arc_easy_train.jsonl'}",
    ]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model_dir, other_model_dir, task_dir):
    out = tmp_path_factory.mktemp("eval_gen") / "out"
    run_evaluate(
        "--models",
        f"base={tiny_model_dir}",
        f"other={other_model_dir}",
        *task_args(task_dir),
        "--num_fewshot",
        1,  # gsm8k and arc_easy: one example from their train files; ifeval keeps its own 0
        "--max_gen_toks",
        GEN_TOKS,
        "--output_dir",
        out,
    )
    return out, json.loads((out / eval_report.SUMMARY_NAME).read_text())


def samples(out: Path, model: str, task: str, mode: str) -> list[dict]:
    path = out / harness.SAMPLES_DIR / model / f"{task}.{mode}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


# ------------------------------------------------------------------------------ summary


def test_every_metric_with_stderr_and_n(evaluated):
    out, summary = evaluated
    for name in ("base", "other"):
        tasks = summary["models"][name]["tasks"]
        for mode in ("plain", "chat"):
            for task, metrics, n in (("ifeval", IFEVAL_METRICS, 3), ("gsm8k", GSM8K_METRICS, 3)):
                figures = tasks[task][mode]
                assert figures["n"] == n
                for metric in metrics:
                    stderr = metric.replace(",", "_stderr,") if "," in metric else f"{metric}_stderr"
                    assert 0.0 <= figures[metric] <= 1.0 and figures[stderr] is not None
                rows = samples(out, name, task, mode)
                assert [r["doc_id"] for r in rows] == list(range(n))
                for metric in metrics:
                    values = [r[metric] for r in rows]
                    flat = [v for x in values for v in (x if isinstance(x, list) else [x])]
                    # the harness's aggregate: the mean over prompts, or over instructions (inst_level)
                    assert figures[metric] == pytest.approx(sum(flat) / len(flat))
            assert tasks["arc_easy"][mode]["n"] == len(arc_rows())
    # the [invalid] item scores 1 under both filters for a reply without a number
    gsm = samples(out, "base", "gsm8k", "plain")
    assert gsm[2]["exact_match,strict-match"] == 1.0


def test_comparisons_cover_generation_metrics(evaluated):
    _, summary = evaluated
    found = {(c["task"], c["mode"], c["metric"]): c for c in summary["comparisons"]}
    for mode in ("plain", "chat"):
        for task, metrics in (("ifeval", IFEVAL_METRICS), ("gsm8k", GSM8K_METRICS), ("arc_easy", ("acc",))):
            for metric in metrics:
                c = found[(task, mode, metric)]
                a = summary["models"]["base"]["tasks"][task][mode][metric]
                b = summary["models"]["other"]["tasks"][task][mode][metric]
                assert (c["a"], c["b"], c["n"]) == ("base", "other", 3 if task != "arc_easy" else len(arc_rows()))
                assert c["delta"] == pytest.approx(b - a) and 0 < c["p_value"] <= 1  # inst_level too


# ------------------------------------------------------------------------------ per item


def gsm8k_independent(reply: str, answer: str) -> dict[str, float]:
    """gsm8k's two filters and exact_match, written out: strict-match takes the first "#### N", flexible-extract
    the last number; both sides lose commas, "$", everything up to "#### " and a final ".", case ignored."""
    strict = re.findall(r"#### (\-?[0-9\.\,]+)", reply)
    flexible = [m[0] or m[1] for m in re.findall(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", reply)]
    picks = {
        "strict-match": strict[0] if strict else "[invalid]",
        "flexible-extract": flexible[-1] if flexible else "[invalid]",
    }

    def norm(text: str) -> str:
        for pattern in (",", r"\$", r"(?s).*#### ", r"\.$"):
            text = re.sub(pattern, "", text)
        return text.lower()

    return {f"exact_match,{k}": float(norm(v) == norm(answer)) for k, v in picks.items()}


def test_per_item_values_equal_an_independent_scoring(evaluated):
    from langdetect import DetectorFactory
    from lm_eval.tasks.ifeval.utils import (
        InputExample,
        test_instruction_following_loose,
        test_instruction_following_strict,
    )

    out, _ = evaluated
    DetectorFactory.seed = 0  # IFEval's case checks detect the language (random draws): as evaluate.py seeds it
    for name in ("base", "other"):
        for mode in ("plain", "chat"):
            for row, doc in zip(samples(out, name, "ifeval", mode), IFEVAL_ROWS):
                example = InputExample(doc["key"], doc["instruction_id_list"], doc["prompt"], doc["kwargs"])
                strict = test_instruction_following_strict(example, row["reply"])
                loose = test_instruction_following_loose(example, row["reply"])
                assert row["prompt_level_strict_acc"] == float(strict.follow_all_instructions)
                assert row["inst_level_strict_acc"] == [float(x) for x in strict.follow_instruction_list]
                assert row["prompt_level_loose_acc"] == float(loose.follow_all_instructions)
                assert row["inst_level_loose_acc"] == [float(x) for x in loose.follow_instruction_list]
            for row, doc in zip(samples(out, name, "gsm8k", mode), GSM8K_TEST):
                expected = gsm8k_independent(row["reply"], doc["answer"])
                assert {k: row[k] for k in GSM8K_METRICS} == expected
                assert row["target"] == doc["answer"] and set(row["filtered"]) == {"strict-match", "flexible-extract"}
            for row, doc in zip(samples(out, name, "arc_easy", mode), arc_rows()):
                right = doc["choices"]["text"][doc["choices"]["label"].index(doc["answerKey"])]
                assert row["reply"] in doc["choices"]["text"] and row["acc"] == float(row["reply"] == right)


def test_prompts_are_the_task_prompt_plain_or_in_the_template(evaluated, tiny_model_dir):
    from transformers import AutoTokenizer

    out, _ = evaluated
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = samples(out, "base", "ifeval", "plain")
    chat = samples(out, "base", "ifeval", "chat")
    for p, c, doc in zip(plain, chat, IFEVAL_ROWS):
        assert p["prompt"] == doc["prompt"]
        messages = [
            {"role": "system", "content": evaluate.DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": doc["prompt"]},
        ]
        assert c["prompt"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    shots = {f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in GSM8K_TRAIN}
    for row, doc in zip(samples(out, "base", "gsm8k", "plain"), GSM8K_TEST):
        example, question = row["prompt"][: -len(f"Question: {doc['question']}\nAnswer:")], doc["question"]
        assert row["prompt"].endswith(f"Question: {question}\nAnswer:") and example in shots  # one shot
    for row in samples(out, "base", "gsm8k", "chat"):  # the example is a user turn and an assistant turn
        assert row["prompt"].count("<|im_start|>user") == 2 and row["prompt"].count("<|im_start|>assistant") == 2


def test_replies_are_the_greedy_continuation_of_the_prompts(evaluated, tiny_model_dir, other_model_dir):
    out, _ = evaluated
    until = {"gsm8k": ["Question:", "</s>", "<|im_end|>"], "ifeval": []}
    for name, model_dir in (("base", tiny_model_dir), ("other", other_model_dir)):
        model, tokenizer = load(model_dir)
        for task, stops in until.items():
            for mode in ("plain", "chat"):
                for row in samples(out, name, task, mode):
                    ids = tokenizer(row["prompt"], add_special_tokens=False, return_tensors="pt")
                    with torch.inference_mode():
                        generated = model.generate(
                            **ids, max_new_tokens=GEN_TOKS, do_sample=False, pad_token_id=tokenizer.pad_token_id
                        )
                    text = tokenizer.decode(generated[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
                    for stop in [*stops, tokenizer.eos_token]:
                        text = text.split(stop)[0]
                    assert row["reply"] == text, (name, task, mode, row["doc_id"])


def test_samples_for_every_task_model_and_mode(evaluated):
    out, _ = evaluated
    files = sorted(p.relative_to(out).as_posix() for p in (out / harness.SAMPLES_DIR).rglob("*.jsonl"))
    assert files == sorted(
        f"samples/{m}/{t}.{mode}.jsonl"
        for m in ("base", "other")
        for t in ("arc_easy", "gsm8k", "ifeval")
        for mode in ("plain", "chat")
    )


# ----------------------------------------------------------------- IFEval's Punkt, offline, any rank


PUNKT_PROBE = """
import nltk
def refuse(*args, **kwargs):
    raise SystemExit("nltk.download was called")
nltk.download = refuse
from posttrain.evaluation import harness
harness.task_configs(["ifeval"], {"ifeval": {"test": %r}})
from lm_eval.tasks.ifeval import instructions, instructions_util
print(instructions_util.count_sentences("Dr. Smith went home. He was tired. It was 5 p.m. on Jan. 3."))
check = instructions.NumberOfSentences("length_constraints:number_sentences")
check.build_description(num_sentences=3, relation="less than")
print(check.check_following("Mr. Brown sat down. He smiled."), check.check_following("One. Two. Three."))
capitals = instructions.CapitalWordFrequencyChecker("change_case:capital_word_frequency")
capitals.build_description(capital_frequency=2, capital_relation="at least")
print(capitals.check_following("THE sky is BLUE. Sure."))
"""


@pytest.mark.parametrize("rank", ["0", "1"])
def test_sentence_counting_offline_on_any_rank(tmp_path, task_dir, rank):
    """With no NLTK data anywhere (NLTK_DATA and HOME empty), downloads forbidden and LOCAL_RANK 0 or 1, IFEval's
    Punkt checks work: Punkt's abbreviations ("Dr.", "Mr.", "p.m.", "Jan.") do not end sentences."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "NLTK_DATA": str(tmp_path / "nltk_data"),
        "LOCAL_RANK": rank,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    probe = PUNKT_PROBE % str(task_dir / "ifeval.jsonl")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["3", "True", "False", "True"]


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "case, message",
    [
        ("max_gen_toks", "max_gen_toks must be >= 1 (got 0)"),
        ("no_plain_prompt", "tasks: ifeval has no plain prompt"),
        ("ifeval_row", "ifeval.jsonl line 2 cannot be scored by the task's checks (KeyError"),
        ("gsm8k_row", "line 1 has no field answer, which the task reads"),
        ("fewshot_from_test", "num_fewshot: gsm8k takes 5 few-shot examples, but its local test file is all it has"),
        ("context", "max_gen_toks: ifeval's replies of up to 256 tokens leave no room"),
        ("output_is_model", "is inside the output directory"),
        ("output_holds_model", "is inside the output directory"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_model_dir, task_dir, case, message):
    model = tmp_path / "models" / "base"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "out"
    args = {
        "--models": [f"base={model}"],
        "--tasks": ["ifeval"],
        "--task_files": [f"ifeval={task_dir / 'ifeval.jsonl'}"],
        "--max_gen_toks": [GEN_TOKS],
        "--output_dir": [out],
    }
    if case == "max_gen_toks":
        args["--max_gen_toks"] = [0]
    elif case == "no_plain_prompt":
        args["--chat_scoring"] = ["false"]
    elif case == "ifeval_row":
        rows = [dict(r) for r in IFEVAL_ROWS]
        rows[1]["instruction_id_list"] = ["not:an_instruction"]
        args["--task_files"] = [f"ifeval={fixtures.write_jsonl(tmp_path / 'ifeval.jsonl', rows)}"]
    elif case == "gsm8k_row":
        rows = [{"question": "What is 1 plus 1?"}]
        args["--tasks"] = ["gsm8k"]
        args["--task_files"] = [f"gsm8k={fixtures.write_jsonl(tmp_path / 'gsm8k.jsonl', rows)}"]
    elif case == "fewshot_from_test":
        args["--tasks"], args["--task_files"] = ["gsm8k"], [f"gsm8k={task_dir / 'gsm8k_test.jsonl'}"]
    elif case == "context":
        args["--max_gen_toks"] = [256]  # the tiny models' context is 256 tokens
    elif case == "output_is_model":
        args["--output_dir"] = [model]
        out = model / "missing"  # nothing may appear in it
    elif case == "output_holds_model":
        args["--output_dir"] = [tmp_path / "models"]
        args["--overwrite_output_dir"] = ["true"]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(PosttrainError) as err:
        run_evaluate(*[x for key, values in args.items() if values for x in (key, *values)])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.rglob("*")) == before


def test_cli_refusal_exits_2(tmp_path, tiny_model_dir, task_dir):
    from helpers import REPO, assert_one_line_error

    cmd = [sys.executable, str(REPO / "posttrain" / "evaluate.py"), "--models", str(tiny_model_dir)]
    cmd += ["--tasks", "ifeval", "--task_files", f"ifeval={task_dir / 'ifeval.jsonl'}", "--max_gen_toks", "0"]
    cmd += ["--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert_one_line_error(proc, "max_gen_toks must be >= 1 (got 0)")
    assert not (tmp_path / "out").exists()
