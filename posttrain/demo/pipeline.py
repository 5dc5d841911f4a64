"""The whole pipeline on a tiny model with the real Qwen3 vocabulary, offline, on a CPU: `make demo`.

    python -m posttrain.demo [--work-dir demo_runs]

Each stage runs the real command-line tool, as a user would, in a subprocess
(its progress bars pass straight through): a checkpoint in the pre-training
source format -> `convert-checkpoint --tokenizer qwen3 --verify` ->
`data_scripts/prepare_*.py` -> `posttrain/sft.py` -> `posttrain/dpo.py`. The
model is 2 layers of width 96, but its vocabulary is Qwen3's 151,669 tokens
(the embedding and head are nearly all of its 30M parameters), so the token
ids, chat template and data statistics are the real run's. Then the base, SFT and DPO models
answer the same prompts side by side, and the SFT loss and DPO loss /
reward-accuracy curves (from each run's trainer_state.json) go into a PNG.
A stage that fails stops the demo with its exit code and command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from posttrain.conversion.qwen3_tokenizer import VOCAB_SIZE as QWEN3_VOCAB_SIZE
from posttrain.demo import fixtures
from posttrain.outputs.errors import PosttrainError, run_cli

REPO = Path(__file__).resolve().parents[2]
MARKER = ".posttrain-demo"  # only a directory the demo made is ever wiped
MODELS = ("base", "sft", "dpo")
MAX_NEW_TOKENS = 24
REPLY_HELD_OUT = 3  # held-out questions among the side-by-side replies (the last ones)
EVAL_TASKS = ("arc_easy", "ifeval", "gsm8k")  # the tasks of recipes/demo/evaluate.yaml
# The tiny model: 2 layers of width 96 with Qwen3's vocabulary, the embedding tied to the output head as in
# Qwen3's own small models (0.6B to 4B), so that every file the demo writes is half the size.
DEMO_MODEL_ARGS = fixtures.tiny_model_args(vocab_size=QWEN3_VOCAB_SIZE, weight_tying=True)

# Held-out rows for the eval splits (fixtures.HELDOUT: questions in no training row, each with its
# true answer and a made-up one in the style the SFT data teaches): data_scripts drops test rows that
# duplicate train rows, and every demo conversation is needed for training.
HELDOUT_QA = fixtures.HELDOUT
# At most 0.8 x the train rows are kept as test rows: every held-out SFT row (generation health's
# prompts), 6 of the held-out pairs for DPO's eval curves; evaluate.py reads all the held-out pairs
# from the raw file.
VAL_SPLIT = "0.8"


# ------------------------------------------------------------------ helpers (tested)


def printable(text: str) -> str:
    """One line of visible text: whitespace runs become one space, control characters (a random
    base model emits raw bytes) become U+FFFD, so columns stay aligned."""
    return "".join(c if c.isprintable() else "\ufffd" for c in " ".join(text.split()))


def side_by_side(prompts: list[str], replies: dict[str, list[str]], width: int = 120) -> str:
    """One block per prompt: the prompt, then each model's reply in its own column, wrapped."""
    names = list(replies)
    gap = " | "
    col = max(12, (width - len(gap) * (len(names) - 1)) // len(names))
    lines = []
    for i, prompt in enumerate(prompts):
        lines.append(f"Q{i + 1}: {prompt}")
        cells = [textwrap.wrap(printable(replies[n][i]) or "(empty)", col) for n in names]
        header = [n.upper().ljust(col) for n in names]
        lines.append(gap.join(header).rstrip())
        lines.append(gap.join("-" * col for _ in names))
        for row in range(max(map(len, cells))):
            lines.append(gap.join((c[row] if row < len(c) else "").ljust(col) for c in cells).rstrip())
        lines.append("")
    return "\n".join(lines)


def log_series(log_history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged metric in a trainer_state.json log history."""
    points = [(entry["step"], float(entry[key])) for entry in log_history if key in entry]
    return [s for s, _ in points], [v for _, v in points]


# (panel title, [(metric key, legend label), ...]) for each stage's log history; "eval" is the
# held-out test split. DPO's rewards are beta x log(pi / pi_ref) of each response (TRL's logs).
PANELS = {
    "sft": [("SFT loss", [("loss", "train"), ("eval_loss", "eval")])],
    "dpo": [
        ("DPO loss", [("loss", "train"), ("eval_loss", "eval")]),
        ("DPO reward accuracy", [("rewards/accuracies", "train"), ("eval_rewards/accuracies", "eval")]),
        ("DPO reward margin", [("rewards/margins", "train"), ("eval_rewards/margins", "eval")]),
        (
            "DPO chosen / rejected rewards",
            [
                ("rewards/chosen", "chosen (train)"),
                ("rewards/rejected", "rejected (train)"),
                ("eval_rewards/chosen", "chosen (eval)"),
                ("eval_rewards/rejected", "rejected (eval)"),
            ],
        ),
    ],
}
# (y-axis label, log scale) of each panel; every x axis is the optimizer step.
AXES = {
    "SFT loss": ("cross-entropy (nats per token, log scale)", True),
    "DPO loss": ("DPO loss (nats)", False),
    "DPO reward accuracy": ("share of pairs, chosen reward > rejected", False),
    "DPO reward margin": ("reward chosen − rejected (nats × β)", False),
    "DPO chosen / rejected rewards": ("β · log π/π_ref of the response", False),
}


def curves(histories: dict[str, list[dict]]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """{panel title: {label: (steps, values)}} for the metrics each history has."""
    out = {}
    for stage, panels in PANELS.items():
        for title, metrics in panels:
            series = {label: log_series(histories.get(stage, []), key) for key, label in metrics}
            out[title] = {label: s for label, s in series.items() if s[0]}
    return out


def save_plot(panels: dict[str, dict[str, tuple[list, list]]], path: str | Path) -> Path:
    """One subplot per panel, written as a PNG (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items()):
        ylabel, log = AXES.get(title, ("", False))
        for label, (steps, values) in series.items():
            marker = "o" if "eval" in label or len(steps) < 12 else None
            ax.plot(steps, values, marker=marker, ms=3, ls="--" if "eval" in label else "-", label=label)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel, fontsize=9)
        if log and any(v > 0 for _, values in series.values() for v in values):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def disk_usage(path: Path) -> int:
    """Bytes the files under `path` take on disk (what `du` counts)."""
    return sum(p.lstat().st_blocks * 512 for p in [path, *path.rglob("*")] if not p.is_symlink())


def summary_line(seconds: float, work: Path, report: Path) -> str:
    """The demo's last line: its time, the size of the work dir and of its largest parts, the report."""
    parts = sorted(((disk_usage(p), p.name) for p in work.iterdir() if p.is_dir()), reverse=True)
    largest = ", ".join(f"{name}/ {size / 1e6:.0f}" for size, name in parts[:5])
    return (
        f"done in {seconds:.0f} s; {work} takes {disk_usage(work) / 1e6:.0f} MB on disk ({largest} MB); "
        f"report: {report}"
    )


def read_log_history(run_dir: Path) -> list[dict]:
    path = run_dir / "trainer_state.json"
    if not path.is_file():
        raise PosttrainError(f"{path} not found: the training stage did not save its state")
    return json.loads(path.read_text(encoding="utf-8"))["log_history"]


# ---------------------------------------------------------------------------- stages


class Demo:
    def __init__(self, work: Path, total_stages: int = 9):
        self.work, self.total, self.n, self.t0 = work, total_stages, 0, time.monotonic()

    def stage(self, title: str) -> None:
        self.n += 1
        print(f"\n=== [{self.n}/{self.total}] {title}  (t = {time.monotonic() - self.t0:.0f} s)", flush=True)

    def run(self, name: str, cmd: list[str]) -> None:
        """Run one stage's CLI from the repository root; its output streams through."""
        print("$ " + shlex.join(str(c) for c in cmd), flush=True)
        rc = subprocess.run([str(c) for c in cmd], cwd=REPO).returncode
        if rc != 0:
            raise PosttrainError(
                f"demo stage '{name}' failed with exit code {rc} (its output is above): {shlex.join(map(str, cmd))}"
            )


def prepare_work_dir(work: Path) -> Path:
    """An empty work dir: new, or one an earlier demo made (then wiped); anything else is refused."""
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).is_file():
            raise PosttrainError(f"--work-dir {work} is not empty and was not made by the demo; choose another")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("made by python -m posttrain.demo; wiped on its next run\n")
    return work.resolve()


def convert_cli() -> list[str]:
    """`convert-checkpoint` as installed next to this Python (the user's command), else the module."""
    exe = Path(sys.executable).parent / "convert-checkpoint"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "posttrain.convert"]


def write_raw_data(work: Path) -> tuple[Path, Path]:
    """The bundled demo rows as local datasets (train + held-out test file), as a user's own files would be."""
    sft_dir, pref_dir = work / "raw" / "sft", work / "raw" / "preference"
    fixtures.write_jsonl(sft_dir / "train.jsonl", fixtures.demo_sft_rows())
    fixtures.write_jsonl(sft_dir / "test.jsonl", [fixtures.qa_conversation([(q, a)]) for q, a, _ in HELDOUT_QA])
    fixtures.write_jsonl(pref_dir / "train.jsonl", fixtures.demo_preference_rows())
    fixtures.write_jsonl(pref_dir / "test.jsonl", [fixtures.qa_preference(q, a, r) for q, a, r in HELDOUT_QA])
    return sft_dir, pref_dir


def reply_pairs() -> list[tuple[str, str]]:
    """(prompt, true answer) of the side-by-side replies: two true training answers, the questions SFT
    learnt made-up answers to (which DPO's pairs correct), and three held-out questions."""
    held_out = [(q, a) for q, a, _ in HELDOUT_QA[:REPLY_HELD_OUT]]
    return fixtures.QA_PAIRS[:2] + [(q, a) for q, a, _ in fixtures.MADE_UP] + held_out


def export_cli() -> list[str]:
    """`export-checkpoint` as installed next to this Python, else the module."""
    exe = Path(sys.executable).parent / "export-checkpoint"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "posttrain.export"]


def write_eval_tasks(work: Path) -> dict[str, Path]:
    """The demo's local evaluation tasks, each in its hub dataset's schema: ARC (the questions SFT learnt
    made-up answers to, and the held-out ones: the true answer against the made-up one), IFEval (the held-out questions with the
    end-phrase instruction) and GSM8K (the numeric questions SFT answered with made-up numbers)."""
    d = work / "eval_data"
    arc = list(fixtures.MADE_UP) + list(HELDOUT_QA)
    return {
        "arc_easy": fixtures.write_jsonl(d / "arc_demo.jsonl", fixtures.arc_rows(arc)),
        "ifeval": fixtures.write_jsonl(d / "ifeval_demo.jsonl", fixtures.ifeval_rows([q for q, _, _ in HELDOUT_QA])),
        "gsm8k": fixtures.write_jsonl(d / "gsm8k_demo.jsonl", fixtures.gsm8k_rows(fixtures.GSM8K_ITEMS)),
    }


def compare_replies(
    model_dirs: dict[str, Path],
) -> tuple[list[str], dict[str, list[str]], dict[str, int], dict[str, int]]:
    """Greedy replies of each model to the demo prompts, trained and held-out (with the training system prompt)."""
    from posttrain.generation.generate import generate_batch, load_model

    pairs = reply_pairs()
    prompts = [q for q, _ in pairs]
    conversations = [
        [{"role": "system", "content": fixtures.SYSTEM_PROMPT}, {"role": "user", "content": q}] for q in prompts
    ]
    replies, stopped, correct = {}, {}, {}
    for name, path in model_dirs.items():
        model, tokenizer = load_model(path, device="cpu", dtype="float32")
        batch = generate_batch(model, tokenizer, conversations, MAX_NEW_TOKENS, batch_size=len(conversations))
        turns = [(tokenizer.decode(ids, skip_special_tokens=True).strip(), stop) for ((ids, stop),) in batch]
        replies[name] = [text for text, _ in turns]
        stopped[name] = sum(stop for _, stop in turns)
        correct[name] = sum(text == a for (text, _), (_, a) in zip(turns, pairs))
    return prompts, replies, stopped, correct


def run_evaluation(demo: Demo, converted: Path) -> Path:
    """posttrain/evaluate.py on the three models (recipes/demo/evaluate.yaml): the harness's tasks on the
    demo's local files, generation health on the held-out prompts, held-out preference accuracy, the DPO
    model as judge, and the overlap of the task items with the training data."""
    w = demo.work
    demo.stage(
        "Evaluate base, SFT and DPO (recipes/demo/evaluate.yaml): tasks, stop rate, judge, held-out preference pairs"
    )
    tasks = write_eval_tasks(w)
    models = [f"{name}={path}" for name, path in zip(MODELS, (converted, w / "sft", w / "dpo"))]
    demo.run(
        "evaluate",
        [
            sys.executable,
            REPO / "posttrain/evaluate.py",
            REPO / "recipes/demo/evaluate.yaml",
            "--models",
            *models,
            "--task_files",
            *(f"{name}={path}" for name, path in tasks.items() if name in EVAL_TASKS),
            "--prompts",
            w / "sft_data",
            "--preference_data",
            w / "raw" / "preference" / "test.jsonl",
            "--judge",
            w / "dpo",
            "--training_data",
            w / "sft_data",
            w / "dpo_data",
            "--output_dir",
            w / "eval",
        ],
    )
    return w / "eval"


def run_demo(work: Path) -> None:
    demo = Demo(prepare_work_dir(work))
    w = demo.work
    py = sys.executable

    demo.stage("Write a tiny checkpoint with Qwen3's vocabulary in the pre-training source format (ckpt_NNNNNN.pt)")
    ckpt = fixtures.write_source_checkpoint(
        w / "checkpoint" / "ckpt_000100.pt", DEMO_MODEL_ARGS, iter_num=100, with_optimizer=False
    )
    print(
        f"{ckpt} ({ckpt.stat().st_size / 1e6:.1f} MB, vocab_size {QWEN3_VOCAB_SIZE}, tied embeddings; random "
        "weights, so the base model babbles; a real one also holds the optimizer state, which conversion never reads)"
    )

    demo.stage("Convert it with the built-in Qwen3 tokenizer and verify the logits against the original architecture")
    converted = w / "converted"
    demo.run("convert", [*convert_cli(), ckpt, "--tokenizer", "qwen3", "--output-dir", converted, "--verify"])
    verification = json.loads((converted / "conversion.json").read_text())["verification"]

    demo.stage("Prepare the bundled SFT and preference data with data_scripts")
    raw_sft, raw_pref = write_raw_data(w)
    common = ["--tokenizer", converted, "--max-length", "128", "--seed", "0", "--val-split", VAL_SPLIT]
    demo.run(
        "prepare SFT data",
        [
            py,
            REPO / "data_scripts/prepare_sft.py",
            "--dataset",
            "messages",
            "--data-files",
            raw_sft,
            "--output-dir",
            w / "sft_data",
            *common,
        ],
    )
    demo.run(
        "prepare DPO data",
        [
            py,
            REPO / "data_scripts/prepare_dpo.py",
            "--dataset",
            "preference",
            "--data-files",
            raw_pref,
            "--output-dir",
            w / "dpo_data",
            *common,
        ],
    )

    demo.stage("SFT (recipes/demo/sft.yaml)")
    demo.run(
        "SFT",
        [
            py,
            REPO / "posttrain/sft.py",
            REPO / "recipes/demo/sft.yaml",
            "--model_name_or_path",
            converted,
            "--dataset_name",
            w / "sft_data",
            "--output_dir",
            w / "sft",
        ],
    )

    demo.stage("DPO from the SFT model (recipes/demo/dpo.yaml)")
    demo.run(
        "DPO",
        [
            py,
            REPO / "posttrain/dpo.py",
            REPO / "recipes/demo/dpo.yaml",
            "--model_name_or_path",
            w / "sft",
            "--dataset_name",
            w / "dpo_data",
            "--output_dir",
            w / "dpo",
        ],
    )

    demo.stage("Export the DPO model to the pre-training format and verify its logits (export-checkpoint --verify)")
    exported = w / "export" / "ckpt_000100.pt"
    demo.run("export", [*export_cli(), w / "dpo", "--output", exported, "--verify"])

    first_held_out = len(reply_pairs()) - REPLY_HELD_OUT + 1
    demo.stage(
        f"Base, SFT and DPO answer the same prompts (greedy; Q3-Q{first_held_out - 1}: SFT learnt made-up answers, "
        f"DPO's pairs correct them; Q{first_held_out}+ are held out)"
    )
    prompts, replies, stopped, correct = compare_replies({"base": converted, "sft": w / "sft", "dpo": w / "dpo"})
    print(side_by_side(prompts, replies, width=min(shutil.get_terminal_size((120, 24)).columns, 150)))
    for name in MODELS:
        print(
            f"{name:>4}: {correct[name]}/{len(prompts)} replies are the reference answer; "
            f"{sum(fixtures.MADE_UP_CITATION in r for r in replies[name])}/{len(prompts)} cite the made-up study; "
            f"{stopped[name]}/{len(prompts)} ended on <|im_end|> within {MAX_NEW_TOKENS} tokens"
        )

    demo.stage("Plot the training curves")
    histories = {stage: read_log_history(w / stage) for stage in ("sft", "dpo")}
    plot = save_plot(curves(histories), w / "training_curves.png")
    dpo_acc = log_series(histories["dpo"], "rewards/accuracies")[1]
    print(
        f"conversion check: max |logit diff| {verification['max_abs_logit_diff']:.2e} "
        f"({'passed' if verification['passed'] else 'FAILED'})"
    )
    print(
        f"SFT final train loss {log_series(histories['sft'], 'loss')[1][-1]:.3f}; "
        f"DPO final reward accuracy {dpo_acc[-1]:.2f}"
        if dpo_acc
        else ""
    )
    evaluation = run_evaluation(demo, converted)
    print(f"\ntraining curves: {plot}\nevaluation chart: {evaluation / 'scores.png'}")
    print(
        f"models in {w}: converted/, sft/, dpo/ (each sft/dpo README.md is its model card), export/ (the DPO model in "
        f"the pre-training format); talk to one "
        f"(it uses the system prompt it was trained with):\n  python -m posttrain.chat {w / 'dpo'}"
    )
    print(summary_line(time.monotonic() - demo.t0, w, evaluation / "report.md"))


def demo_cli(argv: list[str] | None, prog: str, doc: str, work_dir_help: str, run) -> None:
    """A demo's command line: `--work-dir`, nothing ever downloaded, bad input one line (`run(work_dir)`)."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--work-dir", default="demo_runs", help=work_dir_help)
    args = p.parse_args(argv)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cli(lambda: run(Path(args.work_dir)))


def main(argv: list[str] | None = None) -> None:
    demo_cli(
        argv, "python -m posttrain.demo", __doc__, "where every stage writes (wiped on the next demo run)", run_demo
    )


if __name__ == "__main__":
    main()
