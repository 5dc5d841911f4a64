"""The demo's own helpers on synthetic inputs (the full demo is `make demo`, minutes long)."""

from __future__ import annotations

import json

import pytest

from posttrain.demo import pipeline as demo
from posttrain.outputs.errors import PosttrainError

SFT_HISTORY = [
    {"step": 10, "loss": 4.0, "epoch": 1.0},
    {"step": 20, "loss": 2.0, "epoch": 2.0},
    {"step": 20, "eval_loss": 2.5, "epoch": 2.0},
    {"step": 30, "loss": 1.0, "epoch": 3.0},
    {"step": 30, "train_runtime": 3.0, "train_loss": 2.3},
]
DPO_HISTORY = [
    {"step": 1, "loss": 0.69, "rewards/accuracies": 0.5, "rewards/margins": 0.0, "rewards/chosen": 0.0},
    {"step": 2, "loss": 0.40, "rewards/accuracies": 1.0, "rewards/margins": 0.9, "rewards/chosen": 0.3},
    {"step": 2, "eval_loss": 0.5, "eval_rewards/accuracies": 0.75, "eval_rewards/rejected": -0.2},
]


def test_log_series_picks_one_metric_in_step_order():
    assert demo.log_series(SFT_HISTORY, "loss") == ([10, 20, 30], [4.0, 2.0, 1.0])
    assert demo.log_series(SFT_HISTORY, "eval_loss") == ([20], [2.5])
    assert demo.log_series(SFT_HISTORY, "rewards/accuracies") == ([], [])


def test_curves_and_plot(tmp_path):
    panels = demo.curves({"sft": SFT_HISTORY, "dpo": DPO_HISTORY})
    assert list(panels) == [
        "SFT loss",
        "DPO loss",
        "DPO reward accuracy",
        "DPO reward margin",
        "DPO chosen / rejected rewards",
    ]
    assert panels["SFT loss"] == {"train": ([10, 20, 30], [4.0, 2.0, 1.0]), "eval": ([20], [2.5])}
    assert panels["DPO loss"] == {"train": ([1, 2], [0.69, 0.40]), "eval": ([2], [0.5])}
    assert panels["DPO reward accuracy"] == {"train": ([1, 2], [0.5, 1.0]), "eval": ([2], [0.75])}
    assert panels["DPO reward margin"] == {"train": ([1, 2], [0.0, 0.9])}
    assert panels["DPO chosen / rejected rewards"] == {
        "chosen (train)": ([1, 2], [0.0, 0.3]),
        "rejected (eval)": ([2], [-0.2]),
    }

    path = demo.save_plot(panels, tmp_path / "curves.png")
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (2500, 380)  # five 5 x 3.8 inch panels at 100 dpi
    # every panel has a y label; the SFT loss is on a log scale
    assert set(demo.AXES) == set(panels) and all(label for label, _ in demo.AXES.values())
    assert [title for title, (_, log) in demo.AXES.items() if log] == ["SFT loss"]


def test_plot_axes(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    seen = {}
    monkeypatch.setattr(plt, "close", lambda fig: seen.update(fig=fig))
    demo.save_plot(demo.curves({"sft": SFT_HISTORY, "dpo": DPO_HISTORY}), tmp_path / "curves.png")
    axes = seen["fig"].axes
    assert [ax.get_yscale() for ax in axes] == ["log", "linear", "linear", "linear", "linear"]
    assert all(ax.get_xlabel() == "optimizer step" and ax.get_ylabel() for ax in axes)


def test_curves_without_eval_logs_drop_the_eval_series():
    panels = demo.curves({"sft": SFT_HISTORY[:2], "dpo": DPO_HISTORY[:2]})
    assert panels["SFT loss"] == {"train": ([10, 20], [4.0, 2.0])}
    assert "eval" not in panels["DPO reward accuracy"]


def test_side_by_side_columns():
    long = "word " * 40
    text = demo.side_by_side(
        ["What is two plus two?", "Where does the sun rise?"],
        {
            "base": ["gibberish\nwith a newline", long],
            "sft": ["Two plus two is four.", "The sun rises in the east."],
            "dpo": ["", "The sun rises in the east."],
        },
        width=80,
    )
    lines = text.splitlines()
    assert lines[0] == "Q1: What is two plus two?"
    assert lines[1].split() == ["BASE", "|", "SFT", "|", "DPO"]
    assert all(len(line) <= 80 for line in lines)
    # Each column starts at the same offset; replies are wrapped inside their own column.
    col = (80 - 2 * 3) // 3
    first_row = lines[3]
    assert first_row[:col].strip() == "gibberish with a newline"
    assert first_row[col + 3 : 2 * col + 3].strip() == "Two plus two is four."
    assert first_row[2 * col + 6 :].strip() == "(empty)"
    q2 = lines.index("Q2: Where does the sun rise?")
    body = lines[q2 + 3 :]
    assert sum(line[:col].count("word") for line in body) == 40  # nothing lost to wrapping


def test_work_dir_is_refused_unless_the_demo_made_it(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(PosttrainError, match="not made by the demo"):
        demo.prepare_work_dir(foreign)
    assert (foreign / "precious.txt").read_text() == "keep me"

    work = demo.prepare_work_dir(tmp_path / "runs")
    (work / "sft").mkdir()
    again = demo.prepare_work_dir(tmp_path / "runs")  # a second demo run starts clean
    assert again == work and sorted(p.name for p in work.iterdir()) == [demo.MARKER]


def test_raw_data_is_in_the_form_data_scripts_reads(tmp_path):
    from posttrain.data.loading import load_source, validate_preference_rows, validate_sft_rows

    sft_dir, pref_dir = demo.write_raw_data(tmp_path)
    for directory, validate in ((sft_dir, validate_sft_rows), (pref_dir, validate_preference_rows)):
        for split in ("train", "test"):
            validate(load_source(str(directory / f"{split}.jsonl"), split="train"), f"{directory.name} {split}")
    # Held-out prompts are in no training row (data_scripts would drop duplicates across splits), and
    # the SFT test split keeps every one of them at the demo's --val-split (generation health's prompts).
    train = [json.loads(line) for d in (sft_dir, pref_dir) for line in (d / "train.jsonl").read_text().splitlines()]
    train_prompts = {
        m["content"] for row in train for m in row.get("messages", row.get("prompt", [])) if m["role"] == "user"
    }
    assert not train_prompts & {q for q, _, _ in demo.HELDOUT_QA}
    assert round(len(train_rows(sft_dir)) * float(demo.VAL_SPLIT)) >= len(demo.HELDOUT_QA) >= 10


def train_rows(directory):
    return (directory / "train.jsonl").read_text().splitlines()


def test_demo_data_leaves_room_for_dpo(tmp_path):
    """SFT teaches made-up answers to some questions; the preference pairs reject exactly those answers
    and prefer the true ones; the held-out pairs reject made-up answers in the same style."""
    sft = demo.fixtures.demo_sft_rows()
    taught = {row["messages"][-1]["content"] for row in sft}
    pairs = demo.fixtures.demo_preference_rows()
    made_up = [p for p in pairs if demo.fixtures.MADE_UP_CITATION in p["rejected"][0]["content"]]
    assert len(made_up) == len(demo.fixtures.MADE_UP) >= 5
    assert all(p["rejected"][0]["content"] in taught and p["chosen"][0]["content"] not in taught for p in made_up)
    assert all(demo.fixtures.MADE_UP_CITATION in r for _, _, r in demo.HELDOUT_QA)
    # the IFEval-schema instruction is taught on training questions and asked on held-out ones
    assert sum(demo.fixtures.END_INSTRUCTION in row["messages"][-2]["content"] for row in sft) == 3
    tasks = demo.write_eval_tasks(tmp_path)
    ifeval = [json.loads(line) for line in tasks["ifeval"].read_text().splitlines()]
    assert [r["prompt"] for r in ifeval] == [demo.fixtures.with_instruction(q) for q, _, _ in demo.HELDOUT_QA]
    gsm8k = [json.loads(line) for line in tasks["gsm8k"].read_text().splitlines()]
    assert [r["answer"].split("#### ")[1] for r in gsm8k] == ["8", "7", "24"]


def test_printable_keeps_columns_aligned():
    assert demo.printable("a\tb\n\n c") == "a b c"
    assert demo.printable("x\x1b[2Jy\x00") == "x\ufffd[2Jy\ufffd"


# ------------------------------------------------------------------ demo_runs/ stays small


@pytest.mark.parametrize("stage", ["sft", "dpo", "reward"])
def test_the_demo_recipes_keep_no_checkpoint(stage):
    """A demo checkpoint would hold AdamW's two fp32 moments (2 x 58 MB for the 15M-parameter model) or, weights
    only, a copy of the final model that cannot resume; demo_runs/ stays under 300 MB without them."""
    from helpers import REPO, parse_stage

    args = parse_stage(stage, REPO / "recipes" / "demo" / f"{stage}.yaml").training_args
    assert args.save_strategy == "no"


def test_the_demo_model_is_tied_and_its_checkpoint_holds_no_optimizer_state(tmp_path):
    """Every file demo_runs/ holds is half the size with the embedding tied to the head (as Qwen3's small models)."""
    import torch

    assert demo.DEMO_MODEL_ARGS["weight_tying"] is True and demo.DEMO_MODEL_ARGS["vocab_size"] == 151_669
    path = demo.fixtures.write_source_checkpoint(tmp_path / "c.pt", dict(demo.DEMO_MODEL_ARGS, vocab_size=400),
                                                 with_optimizer=False)  # fmt: skip
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["optimizer"] == {} and ckpt["model_args"]["weight_tying"] is True


def test_summary_line_has_the_time_the_sizes_and_the_report(tmp_path):
    work = tmp_path / "demo_runs"
    for name, size in (("sft", 3_000_000), ("dpo", 2_000_000), ("eval", 1000)):
        (work / name).mkdir(parents=True)
        (work / name / "model.safetensors").write_bytes(b"\0" * size)
    line = demo.summary_line(123.4, work, work / "eval" / "report.md")
    total = demo.disk_usage(work)
    assert 5_000_000 <= total < 5_100_000
    assert line == (
        f"done in 123 s; {work} takes {total / 1e6:.0f} MB on disk (sft/ 3, dpo/ 2, eval/ 0 MB); "
        f"report: {work / 'eval' / 'report.md'}"
    )


def test_the_demo_ends_on_its_summary_line():
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(demo.run_demo))).body[0].body
    last = body[-1]
    assert isinstance(last, ast.Expr) and ast.unparse(last).startswith("print(summary_line("), ast.unparse(last)
