"""The on-policy path on the demo's tiny models, offline, on a CPU: `make demo-on-policy`.

    python -m posttrain.demo.on_policy [--work-dir demo_runs]

It starts from what `make demo` leaves in the work directory (the SFT model, its data and the preference
pairs; it runs `python -m posttrain.demo` first when they are not there), then runs the real command-line
tools: `posttrain/reward.py` (recipes/demo/reward.yaml) -> `posttrain/generate_pairs.py`
(recipes/demo/generate_pairs.yaml: the SFT model's own replies, scored) -> `posttrain/dpo.py`
(recipes/demo/dpo.yaml on those pairs). It prints the reward model's held-out accuracy, every pair with its
scores and margin, what meta.json counted, and the on-policy DPO run's result beside the SFT model's.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from posttrain.demo import fixtures
from posttrain.demo.pipeline import MARKER, REPO, Demo, demo_cli, log_series, printable, read_log_history
from posttrain.outputs.errors import PosttrainError

NEEDED = ("sft/recipe.resolved.yaml", "sft_data/train.jsonl", "dpo_data/train.jsonl")
MAX_NEW_TOKENS = 24


def demo_models(demo: Demo) -> None:
    """The demo's SFT model and data in the work directory: reused, or made by the demo itself."""
    work = demo.work
    if all((work / p).is_file() for p in NEEDED):
        print(f"reusing the SFT model and data of an earlier `make demo` in {work}")
        return
    if work.exists() and any(work.iterdir()) and not (work / MARKER).is_file():
        raise PosttrainError(f"--work-dir {work} is not empty and was not made by the demo; choose another")
    demo.run("demo", [sys.executable, "-m", "posttrain.demo", "--work-dir", work])


def print_pairs(pairs_dir: Path) -> None:
    meta = json.loads((pairs_dir / "meta.json").read_text(encoding="utf-8"))
    for name in ("train.jsonl", "test.jsonl"):
        path = pairs_dir / name
        for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
            row = json.loads(line)
            margin = row["chosen_score"] - row["rejected_score"]
            print(f"[{name[:-6]}] {printable(row['prompt'][-1]['content'])}")
            print(f"   chosen   {row['chosen_score']:+.3f}  {printable(row['chosen'][0]['content'])}")
            print(
                f"   rejected {row['rejected_score']:+.3f}  {printable(row['rejected'][0]['content'])}   margin {margin:.3f}"
            )
    counts, samples = meta["counts"], meta["samples"]
    drops = ", ".join(f"{k} {v}" for k, v in meta["dropped"].items() if v) or "none"
    print(f"{counts['prompts']} prompts -> {counts['train']} train + {counts['test']} test pairs; dropped {drops}")
    print(
        f"{samples['sampled']} replies sampled: "
        + ", ".join(f"{k} {v}" for k, v in samples.items() if k != "sampled" and v)
        + f"; median margin {meta['scores']['margin'].get('p50')}"
    )


def correct_answers(model_dir: Path) -> int:
    """How many of the demo questions the model answers with the reference answer (greedy)."""
    from posttrain.generation.generate import generate_turn, load_model

    model, tokenizer = load_model(model_dir, device="cpu", dtype="float32")
    system = {"role": "system", "content": fixtures.SYSTEM_PROMPT}
    replies = [
        generate_turn(
            model, tokenizer, [system, {"role": "user", "content": q}], max_new_tokens=MAX_NEW_TOKENS, do_sample=False
        )[0]
        for q, _ in fixtures.QA_PAIRS
    ]
    return sum(reply == answer for reply, (_, answer) in zip(replies, fixtures.QA_PAIRS))


def run_on_policy(work: Path) -> None:
    demo = Demo(work.resolve(), total_stages=4)
    w, py = demo.work, sys.executable
    demo.stage("The demo's SFT model and data (from `make demo`)")
    demo_models(demo)

    demo.stage("A reward model from the SFT model, on the demo's preference pairs (recipes/demo/reward.yaml)")
    demo.run(
        "reward",
        [py, REPO / "posttrain/reward.py", REPO / "recipes/demo/reward.yaml", "--model_name_or_path", w / "sft"]
        + ["--dataset_name", w / "dpo_data", "--output_dir", w / "reward", "--overwrite_output_dir", "true"],
    )
    evaluations = log_series(read_log_history(w / "reward"), "eval_accuracy")[1]

    demo.stage("On-policy pairs: the SFT model's replies, scored (recipes/demo/generate_pairs.yaml)")
    pairs_dir = w / "dpo_on_policy_data"
    demo.run(
        "generate pairs",
        [py, REPO / "posttrain/generate_pairs.py", REPO / "recipes/demo/generate_pairs.yaml", "--policy", w / "sft"]
        + ["--reward_model", w / "reward", "--prompts", w / "sft_data", "--output_dir", pairs_dir]
        + ["--overwrite_output_dir", "true"],
    )
    print_pairs(pairs_dir)

    demo.stage("DPO from the SFT model on the on-policy pairs (recipes/demo/dpo.yaml)")
    no_eval = [] if (pairs_dir / "test.jsonl").is_file() else ["--eval_strategy", "no"]
    demo.run(
        "DPO",
        [py, REPO / "posttrain/dpo.py", REPO / "recipes/demo/dpo.yaml", "--model_name_or_path", w / "sft"]
        + ["--dataset_name", pairs_dir, "--output_dir", w / "dpo_on_policy", "--overwrite_output_dir", "true"]
        + no_eval,
    )
    history = read_log_history(w / "dpo_on_policy")
    accuracy, margins = (log_series(history, k)[1] for k in ("rewards/accuracies", "rewards/margins"))
    print(f"reward model: held-out pair accuracy {evaluations[-1]:.2f} at its last evaluation")
    print(f"on-policy DPO: final reward accuracy {accuracy[-1]:.2f}, reward margin {margins[-1]:.3f}")
    for name in ("sft", "dpo_on_policy"):
        print(
            f"{name:>13}: {correct_answers(w / name)}/{len(fixtures.QA_PAIRS)} demo questions answered as the data does"
        )
    print(
        f"done in {time.monotonic() - demo.t0:.0f} s; pairs in {pairs_dir}, models in {w / 'reward'} and {w / 'dpo_on_policy'}"
    )


def main(argv: list[str] | None = None) -> None:
    demo_cli(
        argv,
        "python -m posttrain.demo.on_policy",
        __doc__,
        "where `make demo` wrote (or will write) its models",
        run_on_policy,
    )


if __name__ == "__main__":
    main()
