"""On-policy preference pairs: the policy's own replies, scored by a reward model, best against worst.

    accelerate launch [--num_processes 8] posttrain/generate_pairs.py recipes/generate_pairs.yaml [--key value ...]
    python posttrain/generate_pairs.py recipes/demo/generate_pairs.yaml            # one process
    posttrain generate-pairs RECIPE.yaml [--num_processes N | --config_file ACCELERATE.yaml] [--key value ...]

The recipe is a YAML file of `PairsArguments` fields below; command-line flags override it. For every prompt
(a data_scripts directory's train.jsonl and test.jsonl, or one .jsonl of `messages` or `prompt` rows), the
policy samples `num_samples` replies through its chat template; the reward model scores each distinct reply
that ended on a stop token, on the conversation rendered with its own chat template (as RewardTrainer trained
it); chosen is the best-scored reply, rejected the worst (posttrain/generation/pairs.py). output_dir receives a
data_scripts-format directory that `posttrain/dpo.py` trains on as it is: train.jsonl and test.jsonl of
{prompt, chosen, rejected, chosen_score, rejected_score}, meta.json (counts by reason, score distributions,
the recipe) and recipe.resolved.yaml, all at once when every prompt is done.

The prompts are cut into chunks of `chunk_size`, shared round-robin between the processes; each chunk samples
from its own seed (`seed` and its index) and is kept in `.OUTPUT.partial/` beside output_dir as soon as it is
done, so a stopped run continues with `--resume true`, and the output is the same bytes whatever the number of
processes or wherever a resume started.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

from posttrain.data.adapters import DEFAULT_SYSTEM_PROMPT, PROMPT_TOO_LONG
from posttrain.data.lengths import count_chat_tokens, prompt_fits
from posttrain.data.loading import load_errors
from posttrain.data.prompts import load_prompts
from posttrain.generation import pairs
from posttrain.generation.generate import check_dtype, load_model
from posttrain.outputs.atomic import atomic_output_dir, check_output_dir
from posttrain.outputs.errors import (
    Interrupted,
    PosttrainError,
    file_system_error,
    run_cli,
    stop_cause,
)
from posttrain.outputs.flags import hub_model_problem, refuse_missing_local_paths
from posttrain.outputs.lock import launch_output_lock
from posttrain.training.recipe import RecipeHelp, parse_recipe, save_resolved_recipe
from posttrain.training.trainers import check_model

# Settings a resumed run may change: they act only when the output is written.
MAY_CHANGE_ON_RESUME = ("resume", "overwrite_output_dir", "min_margin", "test_split")
# Generation takes hours and the processes finish their shares at different times: wait for each other that long.
PROCESS_GROUP_TIMEOUT = timedelta(hours=4)


@dataclass
class PairsArguments:
    """The keys of a generate_pairs recipe."""

    policy: str = field(
        default="runs/sft", metadata={"help": "The model that samples the replies (a model directory)."}
    )
    reward_model: str = field(
        default="runs/reward",
        metadata={
            "help": "A reward model: a posttrain/reward.py output, or any one-score sequence-classification model."
        },
    )
    prompts: str = field(
        default="data/dpo_ultrafeedback",
        metadata={
            "help": "A data_scripts directory (its train.jsonl, then test.jsonl) or a .jsonl of `messages` rows (the "
            "messages before the last assistant turn) or `prompt` rows."
        },
    )
    num_prompts: int | None = field(default=None, metadata={"help": "Use the first N prompts (none: all)."})
    system_prompt: str = field(
        default=DEFAULT_SYSTEM_PROMPT,
        metadata={"help": "Put first in every prompt that has no system message ('' for none)."},
    )
    num_samples: int = field(default=5, metadata={"help": "Replies sampled per prompt (at least 2)."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature (> 0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: keep the top tokens of this mass (0, 1]."})
    max_new_tokens: int = field(
        default=1024, metadata={"help": "Reply length limit; a reply that reaches it without a stop token is dropped."}
    )
    min_margin: float = field(
        default=0.0,
        metadata={"help": "Drop a prompt whose best and worst score differ by less (a zero margin always is)."},
    )
    test_split: float = field(default=0.05, metadata={"help": "The share of prompts whose pairs go to test.jsonl."})
    seed: int = field(default=42, metadata={"help": "Sampling seed (chunk i samples from seed + i x its batches)."})
    chunk_size: int = field(default=64, metadata={"help": "Prompts per unit of work kept for resume."})
    generation_batch_size: int = field(
        default=16, metadata={"help": "Prompts per generate call (each with num_samples sequences), sorted by length."}
    )
    scoring_batch_size: int = field(default=32, metadata={"help": "Conversations per reward-model forward."})
    dtype: str = field(default="auto", metadata={"help": "Both models' dtype: auto (as saved), bfloat16, float32."})
    output_dir: str = field(
        default="data/dpo_on_policy", metadata={"help": "Where the pairs go (data_scripts format)."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a non-empty output_dir, and start over a stopped run."}
    )
    resume: bool = field(default=False, metadata={"help": "Continue a stopped run with the prompts it had not done."})


RECIPE_HELP = RecipeHelp(
    description="On-policy preference pairs: the policy samples num_samples replies per prompt, a reward model\n"
    "scores them, best against worst; output_dir is a data_scripts directory posttrain/dpo.py trains on.",
    keys="""
        policy                 the model that samples (a directory, e.g. the SFT output)
        reward_model           the scorer (posttrain/reward.py's output)
        prompts                a data_scripts directory or a .jsonl of messages/prompt rows
        num_prompts            use the first N prompts
        num_samples            replies per prompt (at least 2)
        temperature            sampling temperature
        max_new_tokens         reply length limit (a reply that reaches it is dropped)
        min_margin             drop a prompt whose best and worst scores are closer
        generation_batch_size  prompts per generate call
        output_dir             where the pairs go
        resume                 continue a stopped run
    """,
)


def parse(argv=None) -> PairsArguments:
    (args,), _ = parse_recipe([PairsArguments], argv, help=RECIPE_HELP)
    refuse_missing_local_paths({"policy": args.policy, "reward_model": args.reward_model, "prompts": args.prompts})
    for key in ("policy", "reward_model"):
        error = hub_model_problem(key, getattr(args, key))
        if error:
            raise error
    return args


def check_values(args: PairsArguments) -> None:
    if args.num_samples < 2:
        raise PosttrainError(f"num_samples must be at least 2 (got {args.num_samples}): a pair needs two replies")
    if not args.temperature > 0:
        raise PosttrainError(
            f"temperature must be > 0 with num_samples {args.num_samples} (got {args.temperature}): greedy decoding "
            "gives every sample of a prompt the same reply"
        )
    if not 0 < args.top_p <= 1:
        raise PosttrainError(f"top_p must be in (0, 1] (got {args.top_p})")
    for key in ("max_new_tokens", "chunk_size", "generation_batch_size", "scoring_batch_size", "num_prompts"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise PosttrainError(f"{key} must be at least 1 (got {value})")
    if not (math.isfinite(args.min_margin) and args.min_margin >= 0):
        raise PosttrainError(f"min_margin must be >= 0 (got {args.min_margin})")
    if not 0 <= args.test_split < 1:
        raise PosttrainError(f"test_split must be in [0, 1) (got {args.test_split})")
    check_dtype(args.dtype)


def read_prompts(args: PairsArguments) -> list[dict]:
    """The recipe's prompts (a directory's train.jsonl, then its test.jsonl), the first num_prompts of them."""
    path = Path(args.prompts)
    files = [path / "train.jsonl", path / "test.jsonl"] if path.is_dir() else [path]
    if path.is_dir() and not files[0].is_file():
        raise PosttrainError(f"prompts: {path} has no train.jsonl (a data_scripts directory, or pass a .jsonl file)")
    found = [p for f in files if f.is_file() for p in load_prompts(f, args.system_prompt or None)]
    return found[: args.num_prompts] if args.num_prompts else found


def usable_prompts(prompts: list[dict], tokenizer, context: int, source: str) -> tuple[list[dict], Counter]:
    """The prompts to sample from: each distinct one once, with room left in the policy's context."""
    try:
        lengths = count_chat_tokens(tokenizer, [p["messages"] for p in prompts], add_generation_prompt=True)
    except Exception as err:  # jinja's raise_exception on a role the template does not know, ...
        raise PosttrainError(f"policy: its chat template cannot render the prompts ({err})".splitlines()[0]) from None
    dropped, seen, kept = Counter(dict.fromkeys(pairs.PROMPT_DROP_REASONS, 0)), set(), []
    for prompt, length in zip(prompts, lengths):
        key = json.dumps(prompt["messages"], sort_keys=True)
        reason = pairs.DUPLICATE_PROMPT if key in seen else None if prompt_fits(length, context) else PROMPT_TOO_LONG
        seen.add(key)
        if reason:
            dropped[reason] += 1
        else:
            kept.append(prompt)
    if not kept:
        reasons = ", ".join(f"{k}: {v}" for k, v in dropped.items() if v)
        raise PosttrainError(f"prompts {source}: none of its {len(prompts)} prompts is usable ({reasons})")
    return kept, dropped


def check_inputs(args: PairsArguments) -> tuple[list[dict], Counter]:
    """Every input, in one line each, before anything is written: the values, the prompts, both models and
    their templates, the output directory. Returns the usable prompts and the prompts dropped so far."""
    from transformers import AutoConfig, AutoTokenizer

    check_values(args)
    prompts = read_prompts(args)
    for what, path in (("policy", args.policy), ("reward_model", args.reward_model)):
        try:
            check_model(
                SimpleNamespace(model_name_or_path=path, model_revision=None), SimpleNamespace(trust_remote_code=False)
            )
        except PosttrainError as err:
            raise PosttrainError(f"{what}: {err}") from None
    pairs.check_reward_model(args.reward_model)
    with load_errors(f"policy {args.policy}: its tokenizer cannot be loaded"):
        tokenizer = AutoTokenizer.from_pretrained(args.policy)
    if not tokenizer.chat_template:
        raise PosttrainError(f"policy {args.policy}: its tokenizer has no chat template to render the prompts with")
    context = AutoConfig.from_pretrained(args.policy).max_position_embeddings
    kept, dropped = usable_prompts(prompts, tokenizer, context, args.prompts)
    with load_errors(f"reward_model {args.reward_model}: its tokenizer cannot be loaded"):
        reward_tokenizer = AutoTokenizer.from_pretrained(args.reward_model)
    pairs.check_renders(reward_tokenizer, args.reward_model, kept)
    out = Path(args.output_dir)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir:
        raise PosttrainError(f"output_dir {out} is not empty; pass --overwrite_output_dir true to replace it")
    check_output_dir(args.output_dir, args.overwrite_output_dir, inputs(args))
    return kept, dropped


def inputs(args: PairsArguments) -> list[str]:
    return [p for p in (args.policy, args.reward_model, args.prompts) if Path(p).exists()]


def settings(args: PairsArguments) -> dict:
    """The recipe as meta.json and the resume check record it (what only steers this launch left out)."""
    return {k: v for k, v in dataclasses.asdict(args).items() if k not in ("resume", "overwrite_output_dir")}


def chunk_seed(args: PairsArguments, index: int) -> int:
    """generate_batch seeds its b-th batch with seed + b: chunk i's batches take the i-th run of seeds."""
    return args.seed + index * math.ceil(args.chunk_size / args.generation_batch_size)


def run_chunks(args: PairsArguments, prompts: list[dict], store: pairs.PartialResults, todo: list[int]) -> None:
    """This process's share of the chunks not yet done, each kept as soon as it is."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState()
    mine = todo[state.process_index :: state.num_processes]
    if not mine:
        return
    policy, policy_tokenizer = load_model(args.policy, str(state.device), args.dtype)
    reward, reward_tokenizer = pairs.load_reward_model(args.reward_model, str(state.device), args.dtype)
    for index in tqdm(mine, desc="chunks of prompts", disable=not state.is_main_process):
        chunk = prompts[index * args.chunk_size : (index + 1) * args.chunk_size]
        result = pairs.sample_pairs(
            policy, policy_tokenizer, reward, reward_tokenizer, chunk, args, chunk_seed(args, index)
        )
        try:
            store.commit(index, result)
        except OSError as err:
            raise file_system_error(err, f"the finished chunks in {store.dir}", store.dir) or err from None


def assemble(args: PairsArguments, prompts: list[dict], dropped: Counter, store: pairs.PartialResults, chunks: int):
    """(train rows, test rows, meta) from the finished chunks, in prompt order."""
    samples = Counter(dict.fromkeys(pairs.SAMPLE_OUTCOMES, 0))
    choices, scores = [], []
    for index in range(chunks):
        result = store.load(index)
        choices += result["prompts"]
        samples.update(result["samples"])
        scores += result["scores"]
    test = set(random.Random(args.seed).sample(range(len(prompts)), round(len(prompts) * args.test_split)))
    split = {"train": [], "test": []}
    for i, (prompt, choice) in enumerate(zip(prompts, choices)):
        row, reason = pairs.pair_row(prompt, choice, args.min_margin)
        if row is None:
            dropped[reason] += 1
        else:
            split["test" if i in test else "train"].append(row)
    rows = split["train"] + split["test"]
    meta = {
        "kind": "dpo",
        "source": "posttrain/generate_pairs.py",
        # prompts = dropped + train + test; samples: what became of every reply sampled
        "counts": {
            "prompts": len(prompts) + sum(dropped[r] for r in (pairs.DUPLICATE_PROMPT, PROMPT_TOO_LONG)),
            "dropped": sum(dropped.values()),
            "train": len(split["train"]),
            "test": len(split["test"]),
        },
        "dropped": dict(dropped),
        "samples": {"sampled": len(prompts) * args.num_samples, **samples},
        "scores": {
            "scored": pairs.distribution(scores),
            "chosen": pairs.distribution([r["chosen_score"] for r in rows]),
            "rejected": pairs.distribution([r["rejected_score"] for r in rows]),
            "margin": pairs.distribution(
                [round(r["chosen_score"] - r["rejected_score"], pairs.SCORE_DECIMALS) for r in rows]
            ),
        },
        "recipe": settings(args),
    }
    return split["train"], split["test"], meta


def write_output(args: PairsArguments, train: list[dict], test: list[dict], meta: dict) -> None:
    if not train:
        raise PosttrainError(
            f"no pairs for train.jsonl from {meta['counts']['prompts']} prompts (dropped: "
            + ", ".join(f"{k} {v}" for k, v in meta["dropped"].items() if v)
            + "); lower min_margin and rerun with --resume true (the samples are kept), or sample again with more "
            "max_new_tokens, num_samples or temperature (--overwrite_output_dir true)"
        )
    with atomic_output_dir(args.output_dir, args.overwrite_output_dir, inputs(args)) as tmp:
        for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
            if rows:
                with open(tmp / name, "w", encoding="utf-8") as fh:
                    fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        save_resolved_recipe(tmp, args, overrides={"resume": False, "overwrite_output_dir": False})


def main(args: PairsArguments) -> None:
    from accelerate import PartialState

    state = PartialState(timeout=PROCESS_GROUP_TIMEOUT)
    prompts, dropped = check_inputs(args)
    store = pairs.PartialResults(args.output_dir, settings(args))
    store.check(args.resume, args.overwrite_output_dir, MAY_CHANGE_ON_RESUME)
    if state.is_main_process:
        store.open(args.resume)
    state.wait_for_everyone()
    chunks = math.ceil(len(prompts) / args.chunk_size)
    todo = sorted(set(range(chunks)) - store.done())
    state.wait_for_everyone()  # every process has read the same list before any adds to it
    if state.is_main_process and args.resume:
        print(
            f"resuming: {chunks - len(todo)} of {chunks} chunks of {args.chunk_size} prompts were done",
            file=sys.stderr,
        )
    try:
        run_chunks(args, prompts, store, todo)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (a scheduler's time limit)
        what, code = stop_cause(err)
        if not state.is_main_process:
            raise SystemExit(code) from None
        print(file=sys.stderr)
        raise Interrupted(
            f"stopped by {what} with {len(store.done())} of {chunks} chunks of prompts done (kept in {store.dir}); "
            "continue with --resume true",
            code,
        ) from None
    state.wait_for_everyone()
    if not state.is_main_process:
        return
    train, test, meta = assemble(args, prompts, dropped, store, chunks)
    write_output(args, train, test, meta)
    store.remove()
    margins = meta["scores"]["margin"]
    print(
        f"{args.output_dir}: {len(train)} train, {len(test)} test pairs from {meta['counts']['prompts']} prompts "
        f"(dropped {meta['counts']['dropped']}); median margin {margins.get('p50')}, scores in meta.json"
    )


def cli(argv=None) -> None:
    """`[accelerate launch] posttrain/generate_pairs.py RECIPE.yaml [--key value ...]`: the launch as a whole holds
    the output directory's lock (global rank 0 takes it); bad input is one line and exit 2."""

    def run():
        args = parse(argv)
        with launch_output_lock(args.output_dir):
            main(args)

    run_cli(run)


if __name__ == "__main__":
    cli()
