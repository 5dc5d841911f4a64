"""Evaluation: did SFT and DPO make the model better, and does it stop?

    python posttrain/evaluate.py recipes/evaluate.yaml [--key value ...]
    posttrain evaluate RECIPE.yaml [--num_processes N | --config_file ACCELERATE.yaml] [--key value ...]
    accelerate launch [--num_processes 8] posttrain/evaluate.py recipes/evaluate.yaml   # data-parallel

The recipe is a YAML file of `EvalArguments` fields below; command-line flags override it and an
unknown key is an error that names it. For each model, in the order given:
- every benchmark task through lm-evaluation-harness (multiple choice, log-probability), scored
  `plain` (the task's own prompt) and `chat` (the prompt as a user turn of the model's chat template,
  with `system_prompt`): acc, acc_norm, their standard errors and n;
- generation health on `prompts` (greedy, the model's chat template): stop_rate, truncated_rate,
  mean_length, repeat_4gram_rate (posttrain/generation/health.py);
- with `preference_data`, held-out preference accuracy: how often the model gives the chosen reply a
  higher log-probability than the rejected one, and the mean margin (posttrain/evaluation/preference.py);
then paired comparisons (each model against the next, and the first against the last) on the same
items: difference, 95% interval, p-value (posttrain/evaluation/stats.py), from which report.md's
opening verdict lines are made (only the differences whose interval excludes 0); with
`training_data`, the count per task of the items that also occur in the training data; with `judge`, the win rate
of the later model of each such pair, from a judge model's verdicts on the two replies to each prompt
(posttrain/evaluation/judge.py). output_dir receives summary.json, report.md, scores.png,
replies.jsonl, judgements/ and recipe.resolved.yaml, all at once (nothing half-written); under
several processes only the main one writes.

It replaces copying an `lm_eval` command per model: the base model used to be scored without the
chat template and the trained ones with it, so format and knowledge were mixed up, and nothing said
whether a difference was larger than the noise.
"""

from __future__ import annotations

import functools
import gc
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # `python posttrain/evaluate.py` puts posttrain/ first on the path, where `import evaluate`
    # (Hugging Face's package, which some harness tasks use) would find this file instead.
    sys.path.pop(0)

from posttrain.data.adapters import DEFAULT_SYSTEM_PROMPT
from posttrain.data.prompts import load_prompts
from posttrain.evaluation import harness, judge, overlap, preference, report, stats
from posttrain.evaluation.logits import batch_size_of
from posttrain.generation import health
from posttrain.outputs.atomic import atomic_output_dir, check_output_dir
from posttrain.outputs.errors import PosttrainError, run_cli
from posttrain.outputs.flags import refuse_missing_local_paths
from posttrain.training import model_card
from posttrain.training.recipe import RecipeHelp, parse_recipe, save_resolved_recipe
from posttrain.training.trainers import check_model

GENERATION_ITEMS = {"stop_rate": "stopped", "truncated_rate": "truncated"}  # per-prompt 0/1 of the health figures


@dataclass
class EvalArguments:
    """The keys of an evaluation recipe. `models` and `task_files` are YAML mappings in a recipe, or
    `name=path` words on the command line."""

    models: list[str] = field(
        default_factory=lambda: ["runs/converted", "runs/sft", "runs/dpo"],
        metadata={
            "help": "Model directories, in comparison order: a list (each named by its directory's basename), "
            "a mapping name: directory, or on the command line `dir ...` / `name=dir ...`."
        },
    )
    tasks: list[str] = field(
        default_factory=lambda: list(harness.DEFAULT_TASKS),
        metadata={
            "help": "lm-evaluation-harness task names: multiple choice (arc_easy, ...) or generation (ifeval, gsm8k, ...)."
        },
    )
    task_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Local data instead of the hub: a mapping task: file (its test split; .jsonl/.json/.parquet in the hub "
            "dataset's own schema) or task: {test: file, train: file} (train: the few-shot examples), or "
            "`task=file task:train=file ...` on the command line."
        },
    )
    num_fewshot: int | None = field(
        default=None,
        metadata={
            "help": "Few-shot examples per item for every task (none: each task's own, e.g. gsm8k 5, ifeval 0)."
        },
    )
    max_gen_toks: int | None = field(
        default=None,
        metadata={
            "help": "Reply length limit of the generation tasks, in tokens (none: each task's own, ifeval 1280)."
        },
    )
    prompts: str | None = field(
        default=None,
        metadata={
            "help": "Prompts for the generation checks: a .jsonl of `messages` rows or a data_scripts directory "
            "(its test.jsonl); each prompt is a row's messages before its final assistant turn."
        },
    )
    num_prompts: int | None = field(default=200, metadata={"help": "Use the first N prompts (none: all)."})
    max_new_tokens: int = field(default=health.HEALTH_MAX_NEW_TOKENS, metadata={"help": "Reply length limit."})
    system_prompt: str = field(
        default=DEFAULT_SYSTEM_PROMPT,
        metadata={
            "help": "System prompt of chat scoring, and of the prompts that have none ('' for none); default: the "
            "one data_scripts puts in every training conversation."
        },
    )
    chat_scoring: str = field(
        default="auto",
        metadata={
            "help": "auto: chat scoring for every model whose tokenizer has a chat template; true: for every model "
            "(one without a template is an error); false: plain scoring only.",
            "choices": ["auto", "true", "false"],
        },
    )
    judge: str | None = field(
        default=None,
        metadata={
            "help": "A causal LM directory with a chat template that judges each model's replies to `prompts` "
            "against the next model's (and the first against the last): the later model's win rate."
        },
    )
    judge_labels: list[str] = field(
        default_factory=lambda: list(judge.LABELS),
        metadata={"help": "The judge's two answer words, for the reply shown first and second: one token each."},
    )
    preference_data: str | None = field(
        default=None,
        metadata={
            "help": "Held-out preference pairs (a data_scripts directory's test.jsonl, or a .jsonl of prompt/chosen/"
            "rejected rows): how often each model gives chosen a higher log-probability than rejected."
        },
    )
    training_data: list[str] = field(
        default_factory=list,
        metadata={
            "help": "The training data of the models (data_scripts directories, their train.jsonl, or .jsonl/.json/"
            ".parquet files): the report counts, per task read from task_files, the items that also occur in it "
            "(a 13-word run or the whole item, as data_scripts' --decontaminate)."
        },
    )
    batch_size: str = field(default="8", metadata={"help": "Scoring batch size per process, or 'auto'."})
    dtype: str = field(default="auto", metadata={"help": "auto (as saved), bfloat16, float32, ..."})
    limit: int | None = field(default=None, metadata={"help": "Score only the first N items of each task (a check)."})
    output_dir: str = field(default="runs/eval", metadata={"help": "Where the results go (replaced as a whole)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})


RECIPE_HELP = RecipeHelp(
    description="Evaluation: score each model on lm-evaluation-harness tasks (plain and with its chat template),\n"
    "check its replies stop, and compare the models pairwise with intervals; report.md in output_dir.",
    keys="""
        models           model directories in comparison order (a list, or a mapping name: directory)
        tasks            lm-evaluation-harness task names (ifeval, gsm8k, arc_easy, ...)
        num_fewshot      few-shot examples for every task (unset: each task's own)
        max_gen_toks     reply limit of the generation tasks (unset: each task's own)
        task_files       local test splits instead of the Hub (task: file)
        prompts          prompts for the generation checks (.jsonl or a data_scripts directory)
        judge            a chat model that judges each model's replies against the next one's
        preference_data  held-out preference pairs: how often chosen outscores rejected
        batch_size       scoring batch size per process, or auto
        limit            score only the first N items of each task (a quick check)
        output_dir       where the results go
    """,
)


def parse(argv=None) -> EvalArguments:
    (args,), _ = parse_recipe([EvalArguments], argv, help=RECIPE_HELP)
    paths = {"prompts": args.prompts, "judge": args.judge, "preference_data": args.preference_data}
    refuse_missing_local_paths({key: value for key, value in paths.items() if value})
    return args


def _mapping(value, key: str, name_of=None) -> dict[str, str]:
    """A YAML mapping as is; a list of `name=value` words (or bare values, named by `name_of`) as a mapping."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    out: dict[str, str] = {}
    for word in value or []:
        name, sep, path = str(word).partition("=")
        if not sep:
            if name_of is None:
                raise PosttrainError(f"{key}: {word!r} is not name=path")
            name, path = name_of(word), word
        if name in out:
            raise PosttrainError(f"{key}: {name} is named twice; give the entries distinct names (name=path)")
        out[name] = path
    return out


def model_dirs(models) -> dict[str, Path]:
    """{name: directory}, every one a model directory (one-line error otherwise)."""
    dirs = {name: Path(path) for name, path in _mapping(models, "models", lambda p: Path(p).name).items()}
    if not dirs:
        raise PosttrainError("models: name at least one model directory")
    for name, path in dirs.items():
        if not (path / "config.json").is_file():
            raise PosttrainError(f"models: {name}: {path} is not a model directory (no config.json)")
        try:  # weights the safe loader refuses, truncated or shaped unlike the config: one line before any loads
            check_model(
                SimpleNamespace(model_name_or_path=str(path), model_revision=None),
                SimpleNamespace(trust_remote_code=False),
            )
        except PosttrainError as err:
            raise PosttrainError(f"models: {name}: {err}") from None
    return dirs


@functools.cache
def tokenizer_of(path: Path):
    """Each model's tokenizer, loaded once for the checks and the scoring: Qwen3's 151,669-token tokenizer.json
    takes ~2.5 s to load on a CPU. Nothing here changes it (the harness sets its padding side only around a
    call and restores it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def chat_scoring(dirs: dict[str, Path], setting: str, generating: bool) -> dict[str, bool]:
    """{name: whether to score it with its chat template too}; a model without a template is refused
    when chat scoring is required of every model, or when it must answer the prompts."""
    has_template = {}
    for name, path in dirs.items():
        try:
            has_template[name] = bool(tokenizer_of(path).chat_template)
        except (OSError, ValueError) as err:
            raise PosttrainError(
                f"models: {name}: cannot load the tokenizer of {path} ({err})".splitlines()[0]
            ) from None
    lacking = ", ".join(f"{n} ({dirs[n]})" for n, has in has_template.items() if not has)
    for needed, what in ((setting == "true", "chat_scoring true"), (generating, "the generation checks (prompts)")):
        if needed and lacking:
            raise PosttrainError(
                f"{what}: every model needs a chat template, but {lacking} has none; convert it with convert-checkpoint"
                + (" or use chat_scoring auto (plain scoring only for it)" if setting == "true" else "")
            )
    return {name: setting != "false" and has for name, has in has_template.items()}


def evaluate_model(
    name, path, configs, chat: bool, prompts, pairs, args
) -> tuple[dict | None, list | None, dict | None]:
    """({mode: {task: TaskScore}} (None off the main process), reply records, preference figures) of one model."""
    import torch

    lm = harness.load_lm(path, args.batch_size, args.dtype, tokenizer_of(path))
    print(f"\n== {name} ({path}): scoring {', '.join(args.tasks)}", flush=True)
    scores = {"plain": harness.score(lm, configs, chat=False, limit=args.limit)}
    if chat:
        scores["chat"] = harness.score(lm, configs, chat=True, system_prompt=args.system_prompt, limit=args.limit)
    replies = None
    if prompts:
        model, tokenizer = lm.model, lm.tokenizer
        replies = health.generate_replies(
            model, tokenizer, prompts, args.max_new_tokens, batch_size_of(args.batch_size)
        )
    preferences = preference.score_model(lm.model, pairs, batch_size_of(args.batch_size)) if pairs else None
    del lm
    gc.collect()
    torch.cuda.empty_cache()
    return (scores if scores["plain"] is not None else None), replies, preferences


def check_numbers(args: EvalArguments) -> None:
    for key in ("max_new_tokens", "num_prompts", "limit", "max_gen_toks"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise PosttrainError(f"{key} must be >= 1 (got {value})")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise PosttrainError(f"num_fewshot must be >= 0 (got {args.num_fewshot})")
    if not (str(args.batch_size).isdigit() and int(args.batch_size) > 0 or str(args.batch_size).startswith("auto")):
        raise PosttrainError(f"batch_size must be a positive number or 'auto' (got {args.batch_size!r})")


def check_plain_prompts(configs, chat: dict[str, bool]) -> None:
    """A generation task without a plain prompt (harness.without_plain_prompt: IFEval) is scored plain only beside
    chat scoring; asked of a run that scores no model in chat (chat_scoring false, or no model has a template) it
    is refused."""
    lacking = harness.without_plain_prompt(configs)
    if lacking and not any(chat.values()):
        raise PosttrainError(
            f"tasks: {', '.join(lacking)} has no plain prompt (an instruction for an assistant turn, with no stop "
            "string: only max_gen_toks would end a reply without a chat template), and no model is scored in chat "
            "(chat_scoring false, or no model has a chat template); use chat_scoring auto with a model that has a "
            "chat template, or leave the task out"
        )


def check_context(dirs: dict[str, Path], configs) -> None:
    """Every generation task's reply limit leaves room for a prompt in every model's context (the harness would
    stop on an assertion otherwise, or cut the prompts from the left to what is left)."""
    from lm_eval.models.utils import resolve_max_length
    from transformers import AutoConfig

    limits = harness.reply_limits(configs, None)
    if not limits:
        return
    for name, path in dirs.items():
        context = resolve_max_length(AutoConfig.from_pretrained(path))
        for task, tokens in limits.items():
            if tokens >= context:
                raise PosttrainError(
                    f"max_gen_toks: {task}'s replies of up to {tokens} tokens leave no room for its prompt in the "
                    f"{context}-token context of {name} ({path}); set max_gen_toks below {context}"
                )


def score_metrics(scores: dict) -> list[str]:
    """The headline metric of each task that was scored (acc; the generation tasks' metrics without stderr), in order."""
    names = []
    for modes in scores.values():
        for tasks in (modes or {}).values():
            for task_score in tasks.values():
                metrics = [m for m in task_score.metrics if "_stderr" not in m]
                for m in ["acc"] if "acc" in metrics else metrics:
                    if m not in names:
                        names.append(m)
    return names


def main(args: EvalArguments) -> None:
    # Everything that can be wrong with the inputs fails here, in one line, before a model loads.
    check_numbers(args)
    dirs = model_dirs(args.models)
    system_prompt = args.system_prompt or None
    prompts = load_prompts(args.prompts, system_prompt, args.num_prompts) if args.prompts else []
    task_files = harness.local_task_files(args.task_files)
    configs = harness.task_configs(args.tasks, task_files, args.num_fewshot, args.max_gen_toks)
    chat = chat_scoring(dirs, args.chat_scoring, generating=bool(prompts))
    check_plain_prompts(configs, chat)
    check_context(dirs, configs)
    judging = (
        judge.check_judge(args.judge, args.judge_labels, prompts, args.max_new_tokens, list(dirs))
        if args.judge
        else None
    )
    pairs = preference.check_pairs(args.preference_data, dirs, tokenizer_of) if args.preference_data else {}
    training = overlap.training_files(args.training_data)
    test_files = {task: splits["test"] for task, splits in task_files.items() if "test" in splits}
    overlapping = overlap.task_overlap(test_files, training)  # before any model loads: a bad row fails here
    named = [p for p in (args.prompts, args.judge, args.preference_data) if p]
    inputs = [*dirs.values(), *(p for splits in task_files.values() for p in splits.values()), *named, *training]
    check_output_dir(args.output_dir, args.overwrite_output_dir, inputs)

    scores, replies, preferences = {}, {}, {}
    for name, path in dirs.items():
        scores[name], replies[name], preferences[name] = evaluate_model(
            name, path, configs, chat[name], prompts, pairs.get(name), args
        )
    judged = (
        judge.judge_replies(judging, prompts, replies, batch_size_of(args.batch_size), args.dtype) if judging else {}
    )
    if any(s is None for s in scores.values()):  # the harness returns results on the main process only
        return

    comparisons = stats.compare_models(scores) + (preference.compare_models(preferences) if pairs else [])
    generated = {name: r for name, r in replies.items() if r is not None}
    comparisons += stats.compare_item_scores(
        {
            name: {rate: {i: float(reply[key]) for i, reply in enumerate(r)} for rate, key in GENERATION_ITEMS.items()}
            for name, r in generated.items()
        },
        report.GENERATION_TASK,
        report.GENERATION_MODE,
    )
    generation = {name: health.health_figures(r) for name, r in generated.items()}
    summary = report.build_summary(dirs, scores, generation, comparisons, test_files, overlapping)
    summary["judgements"] = judge.judgements(judged, replies)
    if judging:
        summary["judge"] = judge.describe(judging, dirs)
    if pairs:
        for name, items in preferences.items():
            summary["models"][name]["preference"] = preference.figures(items)
    with atomic_output_dir(args.output_dir, args.overwrite_output_dir, inputs) as tmp:
        report.write_outputs(tmp, summary, prompts, {n: r for n, r in replies.items() if r is not None})
        harness.write_samples(tmp, scores)
        judge.write_rows(tmp, judged)
        save_resolved_recipe(tmp, args)
    out = Path(args.output_dir)
    # Only now, with the report complete: each scored training output's model card gets these scores
    # (one atomic rename of its README.md; a directory that cannot be written gets a note).
    for note in model_card.add_evaluation_to_cards(summary, out.resolve() / report.REPORT_NAME):
        print(note, file=sys.stderr)
    for task in report.task_names(summary):
        print("\n" + report.scores_table(summary, task))
    if comparisons:
        print("\n" + report.comparisons_table(comparisons))
    if generation:
        print("\n" + report.generation_table(summary))
    if summary["judgements"]:
        print("\n" + report.judgements_table(summary))
    if pairs:
        print("\n" + report.preference_table(summary))
    print("\nverdicts:\n" + "\n".join(f"- {line}" for line in report.verdicts(summary)).replace("**", ""))
    print(f"\nreport: {out / report.REPORT_NAME}\nchart: {out / report.CHART_NAME}")
    print(f"summary: {out / report.SUMMARY_NAME}")


if __name__ == "__main__":
    run_cli(lambda: main(parse()))
