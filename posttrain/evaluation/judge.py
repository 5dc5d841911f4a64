"""A local judge: which of two models' replies to the same prompt does a judge model prefer?

    judge = check_judge("runs/judge", ("A", "B"), prompts, max_new_tokens, ["base", "sft", "dpo"])  # no model loads
    rows = judge_replies(judge, prompts, replies, batch_size=8)    # {(a, b): [row, ...]}, on every process
    judgements(rows, replies)        # [{a, b, win_rate, ci95, p_value, length_controlled_win_rate, n, ...}]
    write_rows(output_dir, rows)     # output_dir/judgements/<a>_vs_<b>.jsonl

The pairs are those of the paired tests: each model against the next, and the first against the last.
For each prompt the judge reads the conversation and the two replies, labelled `A` (first shown) and
`B`, and the verdict is its next-token probability of each label after the generation prompt,
normalised over the two labels (AlpacaEval 2's weighted win rate reads the judge's log-probabilities
the same way): no generated text is parsed. Each pair is judged in both orders and the two verdicts
averaged, so a judge's taste for the first (or second) position cancels: the later model's preference
on a prompt is 0.5 + (p_first(later shown first) - p_first(earlier shown first)) / 2. Identical texts
are scored once, so two identical replies score exactly 0.5 and a model judged against itself 0.5.

Per pair: the win rate of the later model (mean preference over prompts), a 95% paired-bootstrap
interval over prompts, a sign-flip p-value against 0.5, the length-controlled win rate below, and
the mean reply lengths in characters.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from posttrain.conversion.chat_template import check_template_renders
from posttrain.evaluation import stats
from posttrain.evaluation.logits import on_every_process, score_sequences
from posttrain.outputs.atomic import atomic_write_text
from posttrain.outputs.errors import PosttrainError

LABELS = ("A", "B")
JUDGEMENTS_DIR = "judgements"
LENGTH_CONTROL = (
    "logistic regression of the per-prompt preference on tanh(Δ / sd(Δ)), Δ = later minus earlier reply "
    "length in characters (AlpacaEval 2's length-controlled GLM without its instruction-difficulty term), "
    "win rate predicted at Δ = 0"
)
INSTRUCTION = (
    "Which reply is better: more helpful, correct and honest? Answer {0} or {1}, nothing else.\n\n"
    "[Conversation]\n{conversation}\n\n[Reply {0}]\n{first}\n\n[Reply {1}]\n{second}"
)


@dataclasses.dataclass
class Judge:
    path: Path
    labels: tuple[str, str]
    label_ids: tuple[int, int]
    tokenizer: object
    context: int | None  # the judge's max_position_embeddings, if its config says


def judge_input(tokenizer, messages: list[dict], first: str, second: str, labels=LABELS) -> str:
    """The exact text the judge scores: one user turn (the conversation without its system prompt, then
    the two replies) and the generation prompt of the judge's template (its thinking turned off where
    the template has that switch; others ignore it)."""
    conversation = "\n".join(f"{m['role'].title()}: {m['content']}" for m in messages if m["role"] != "system")
    text = INSTRUCTION.format(*labels, conversation=conversation, first=first, second=second)
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False, enable_thinking=False
    )


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def causal_lm_problem(path: Path) -> str | None:
    """Why `path` cannot serve as a causal language model, or None."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not (path / "config.json").is_file():
        return "not a model directory (no config.json)"
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as err:
        return f"its config.json cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    architectures = config.architectures or []
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if architectures and not any(a in causal or a.endswith("ForCausalLM") for a in architectures):
        return f"it holds a {', '.join(architectures)}, not a causal language model (no next-token head)"
    if not architectures and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"its model type {config.model_type!r} is not a causal language model"
    return None


def check_judge(path, labels, prompts: list[dict], max_new_tokens: int, model_names: list[str]) -> Judge:
    """Everything about the judge that can be wrong, in one line, before any model loads: there are two
    models and prompts to compare them on, the directory is a causal LM with a chat template, each label
    is one token of its tokenizer (as the judge would write it after the generation prompt), and the
    longest prompt with two replies of max_new_tokens fits the judge's context."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    if len(model_names) < 2:
        raise PosttrainError("judge: it compares models; name at least two in models")
    if not prompts:
        raise PosttrainError(
            "judge: it compares the models' replies to `prompts`; name them (a .jsonl or data_scripts directory)"
        )
    for name in model_names:
        if "/" in name or name in (".", ".."):
            raise PosttrainError(f"judge: model name {name!r} cannot name a judgements file; rename it (name=path)")
    problem = causal_lm_problem(path)
    if problem:
        raise PosttrainError(f"judge: {path}: {problem}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise PosttrainError(f"judge: cannot load the tokenizer of {path} ({err})".splitlines()[0]) from None
    if not tokenizer.chat_template:
        raise PosttrainError(f"judge: the tokenizer of {path} has no chat template; the judge reads a chat turn")
    check_template_renders(tokenizer, f"judge: {path}")
    labels = tuple(str(label) for label in labels)
    if len(labels) != 2 or labels[0] == labels[1] or not all(labels):
        raise PosttrainError(f"judge_labels: name two different words, one per reply (got {list(labels)})")
    head = judge_input(tokenizer, prompts[0]["messages"], "", "", labels)
    head_ids = _ids(tokenizer, head)
    label_ids = []
    for label in labels:
        tail = _ids(tokenizer, head + label)
        if tail[: len(head_ids)] != head_ids or len(tail) != len(head_ids) + 1:
            raise PosttrainError(
                f"judge_labels: {label!r} is not one token of the judge's tokenizer ({path}) after its generation "
                f"prompt (it is {len(_ids(tokenizer, label))} on its own); choose single-token words such as A and B"
            )
        label_ids.append(tail[-1])
    context = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
    if context:
        longest = max(len(_ids(tokenizer, judge_input(tokenizer, p["messages"], "", "", labels))) for p in prompts)
        if longest + 2 * max_new_tokens > context:
            raise PosttrainError(
                f"judge: its context ({context} tokens, {path}) cannot hold the longest prompt's judging text "
                f"({longest} tokens) and two replies of max_new_tokens {max_new_tokens}; lower max_new_tokens "
                "or use a judge with a longer context"
            )
    return Judge(path, labels, tuple(label_ids), tokenizer, context)


def judging_rows(judge: Judge, prompts: list[dict], replies: dict[str, list[dict]]) -> dict:
    """{(a, b): rows} for every pair of stats.model_pairs, each row {prompt_id, order, first, second,
    judge_input, label_token_ids} ("ab": a's reply shown first), both orders of each prompt."""
    rows = {}
    for a, b in stats.model_pairs(list(replies)):
        rows[a, b] = [
            {
                "prompt_id": i,
                "order": order,
                "first": first,
                "second": second,
                "judge_input": judge_input(
                    judge.tokenizer,
                    prompt["messages"],
                    replies[first][i]["reply"],
                    replies[second][i]["reply"],
                    judge.labels,
                ),
                "label_token_ids": list(judge.label_ids),
            }
            for i, prompt in enumerate(prompts)
            for order, (first, second) in (("ab", (a, b)), ("ba", (b, a)))
        ]
    return rows


def add_verdicts(model, judge: Judge, rows: dict, batch_size: int) -> dict:
    """`rows` with each row's p_first: the judge's probability of the first label after its judge_input,
    normalised over the two labels. Each distinct text is scored once; the texts are split between the
    processes and every process gets all verdicts."""
    import torch

    texts = list(dict.fromkeys(r["judge_input"] for pair in rows.values() for r in pair))
    sequences = [_ids(judge.tokenizer, t) for t in texts]
    longest = max(map(len, sequences))
    if judge.context and longest >= judge.context:  # the same on every process: all of them raise
        raise PosttrainError(
            f"judge: a judging text is {longest} tokens, more than the judge's context ({judge.context}); "
            "lower max_new_tokens or use a judge with a longer context"
        )
    first, second = judge.label_ids

    def p_first(logits, _):
        return float(torch.softmax(logits[-1, [first, second]].double(), dim=0)[0])

    verdicts = on_every_process(sequences, lambda mine: score_sequences(model, mine, batch_size, p_first))
    p_of = dict(zip(texts, verdicts))
    for pair in rows.values():
        for r in pair:
            r["p_first"] = p_of[r["judge_input"]]
    return rows


def judge_replies(judge: Judge, prompts: list[dict], replies: dict[str, list[dict]], batch_size: int, dtype="auto"):
    """judging_rows with their verdicts (add_verdicts), the judge loaded on this process's device."""
    import gc

    import torch
    from accelerate import PartialState

    from posttrain.generation.generate import load_model

    rows = judging_rows(judge, prompts, replies)
    print(f"\n== judge ({judge.path}): {sum(map(len, rows.values()))} verdicts", flush=True)
    model, _ = load_model(judge.path, device=str(PartialState().device), dtype=dtype)
    add_verdicts(model, judge, rows, batch_size)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def preferences(rows: list[dict]) -> dict[int, float]:
    """{prompt_id: the later model's preference}, from the two orders: 0.5 + (p_ba - p_ab) / 2."""
    p = {(r["prompt_id"], r["order"]): r["p_first"] for r in rows}
    prompt_ids = sorted({r["prompt_id"] for r in rows})
    return {i: 0.5 + (p[i, "ba"] - p[i, "ab"]) / 2 for i in prompt_ids}


def length_controlled_win_rate(preference: list[float], length_difference: list[float]) -> float:
    """The win rate at zero length difference (LENGTH_CONTROL): logit P(later preferred) = θ + φ·tanh(Δ/sd(Δ)),
    fitted by maximum likelihood on the soft preferences (each prompt a win weighted p and a loss weighted
    1 - p, as AlpacaEval fits them; scikit-learn's default L2 penalty keeps φ finite), then sigmoid(θ)."""
    import warnings

    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    p, delta = np.asarray(preference, dtype=float), np.asarray(length_difference, dtype=float)
    spread = delta.std()
    x = np.tanh(delta / spread) if spread > 0 else np.zeros_like(delta)
    features = np.concatenate([x, x])[:, None]
    outcome = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # all preferences 0 or 1: θ grows without bound
        fit = LogisticRegression().fit(features, outcome, sample_weight=np.concatenate([p, 1 - p]))
    return float(1 / (1 + np.exp(-fit.intercept_[0])))


def judgement(a: str, b: str, rows: list[dict], replies_a: list[dict], replies_b: list[dict]) -> dict:
    """{a, b, win_rate, ci95, p_value, length_controlled_win_rate, n, mean_length_a, mean_length_b} of b over a."""
    by_prompt = preferences(rows)
    ids = sorted(by_prompt)
    pref = [by_prompt[i] for i in ids]
    lengths_a = [len(replies_a[i]["reply"]) for i in ids]
    lengths_b = [len(replies_b[i]["reply"]) for i in ids]
    lo, hi = stats.paired_bootstrap_ci([0.0] * len(pref), pref)
    return {
        "a": a,
        "b": b,
        "win_rate": sum(pref) / len(pref),
        "ci95": [lo, hi],
        "p_value": stats.sign_flip_p([0.5] * len(pref), pref),
        "length_controlled_win_rate": length_controlled_win_rate(pref, [y - x for x, y in zip(lengths_a, lengths_b)]),
        "n": len(pref),
        "mean_length_a": sum(lengths_a) / len(ids),
        "mean_length_b": sum(lengths_b) / len(ids),
    }


def judgements(rows: dict, replies: dict[str, list[dict]]) -> list[dict]:
    return [judgement(a, b, pair_rows, replies[a], replies[b]) for (a, b), pair_rows in rows.items()]


def describe(judge: Judge, dirs: dict[str, Path]) -> dict:
    """summary.json's `judge`: its directory, labels, the length-control method, and which evaluated model it
    is, if it is one (a model tends to prefer replies like its own)."""
    same = [name for name, path in dirs.items() if Path(path).resolve() == judge.path.resolve()]
    return {
        "path": str(judge.path),
        "labels": list(judge.labels),
        "length_control": LENGTH_CONTROL,
        "evaluated_model": same[0] if same else None,
    }


def write_rows(out: Path, rows: dict) -> None:
    """output_dir/judgements/<a>_vs_<b>.jsonl, one row per prompt and order."""
    for (a, b), pair_rows in rows.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pair_rows)
        atomic_write_text(out / JUDGEMENTS_DIR / f"{a}_vs_{b}.jsonl", text)
