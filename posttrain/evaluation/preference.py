"""Held-out preference accuracy: does a model give the chosen reply a higher log-probability than the rejected one?

    pairs = check_pairs("data/dpo_ultrafeedback", {"sft": Path("runs/sft"), ...})  # before any model loads
    items = score_model(model, pairs["sft"], batch_size=8)     # {"accuracy": {i: 0 or 1}, "margin": {i: nats}}
    figures(items)                                              # {accuracy, mean_margin, n}
    compare_models({"sft": items, "dpo": ...})                  # paired tests, in the harness comparisons' shape

DPO pushes the log-probability of the chosen response up against the rejected one; this measures
that on pairs it did not train on, for every model, the base and SFT models included. A response's
log-probability is summed over its tokens after the prompt rendered with the model's chat template,
tokenized as TRL's DPOTrainer tokenizes a pair (trl 1.16, DPOTrainer._prepare_dataset): the prompt is
the template with its generation prompt, and each response is what the template of prompt + response
adds after the longest prefix they share (the assistant text and its end of turn). Accuracy is the
share of pairs whose chosen response scores strictly higher; the margin is log p(chosen) - log
p(rejected) in nats. Unlike DPO's reward accuracy, no reference model is subtracted. For pairs whose
rejected answer is made up, 1 - accuracy is how often a model prefers the made-up answer.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.evaluation import stats
from posttrain.evaluation.logits import on_every_process, score_sequences
from posttrain.outputs.errors import PosttrainError

TASK, MODE, METRICS = "preference", "logprob", ("accuracy", "margin")


def tokenize_pair(tokenizer, row: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids) of a conversational pair, as DPOTrainer tokenizes it."""
    from trl.data_utils import common_prefix_length

    def ids(messages, **kwargs):
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]

    prompt = ids(row["prompt"], add_generation_prompt=True)
    chosen, rejected = ids(row["prompt"] + row["chosen"]), ids(row["prompt"] + row["rejected"])
    shared = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
    return prompt[:shared], chosen[shared:], rejected[shared:]


def load_pairs(path) -> tuple[list[dict], str]:
    """(rows, the file read): a data_scripts directory's test.jsonl or a JSON Lines file of prompt / chosen /
    rejected rows, every row checked as DPO training checks it."""
    from posttrain.data.loading import load_source, validate_preference_rows

    path = Path(path)
    file = path / "test.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise PosttrainError(
            f"preference_data: {file} not found (a data_scripts directory's test.jsonl, or a .jsonl of prompt, "
            "chosen and rejected rows)"
        )
    try:
        dataset = load_source(str(file), split="train")
        dataset = validate_preference_rows(dataset, str(file))
    except PosttrainError as err:
        raise PosttrainError(f"preference_data: {err}") from None
    return [{k: dataset[i][k] for k in ("prompt", "chosen", "rejected")} for i in range(len(dataset))], str(file)


def check_pairs(path, dirs: dict[str, Path], load_tokenizer=None) -> dict[str, list[tuple]]:
    """{model: tokenize_pair of every pair} with each model's own tokenizer (`load_tokenizer(dir)`, default
    AutoTokenizer's), before any model loads: every model has a chat template and every pair fits its context."""
    from transformers import AutoConfig, AutoTokenizer

    rows, file = load_pairs(path)
    tokenized = {}
    for name, model_dir in dirs.items():
        tokenizer = (load_tokenizer or AutoTokenizer.from_pretrained)(model_dir)
        if not tokenizer.chat_template:
            raise PosttrainError(
                f"preference_data: models: {name} ({model_dir}) has no chat template, which the pairs are rendered "
                "with; convert it with convert-checkpoint"
            )
        context = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
        tokenized[name] = [tokenize_pair(tokenizer, row) for row in rows]
        for i, (prompt, chosen, rejected) in enumerate(tokenized[name], 1):
            longest = len(prompt) + max(len(chosen), len(rejected))
            if context and longest > context:
                raise PosttrainError(
                    f"preference_data: {file} row {i} is {longest} tokens, more than the context of {name} "
                    f"({context}); drop such pairs from the held-out file"
                )
    return tokenized


def pair_logprobs(model, pairs: list[tuple], batch_size: int) -> list[float]:
    """[log p(chosen), log p(rejected)] of each tokenize_pair triple, flattened, on this process."""
    import torch

    sequences = [pair[0] + pair[k] for pair in pairs for k in (1, 2)]
    starts = [len(pair[0]) for pair in pairs for _ in (1, 2)]

    def response_logprob(logits, i):
        targets = torch.tensor(sequences[i][starts[i] :], device=logits.device)
        return float(logits[starts[i] - 1 : -1].log_softmax(-1).gather(1, targets[:, None]).sum())

    return score_sequences(model, sequences, batch_size, response_logprob)


def score_model(model, pairs: list[tuple], batch_size: int) -> dict[str, dict[int, float]]:
    """{"accuracy": {pair: 1.0 if chosen scores higher else 0.0}, "margin": {pair: log p(chosen) - log
    p(rejected)}}; the pairs are split between the processes and every process gets all the figures."""
    was_training = model.training
    model.eval()
    logprobs = on_every_process(pairs, lambda mine: pair_logprobs(model, mine, batch_size))
    model.train(was_training)
    margins = {i: logprobs[2 * i] - logprobs[2 * i + 1] for i in range(len(pairs))}
    return {"accuracy": {i: float(m > 0) for i, m in margins.items()}, "margin": margins}


def figures(items: dict[str, dict[int, float]]) -> dict:
    """{accuracy, mean_margin, n} of score_model's figures."""
    n = len(items["accuracy"])
    return {"accuracy": sum(items["accuracy"].values()) / n, "mean_margin": sum(items["margin"].values()) / n, "n": n}


def compare_models(items: dict[str, dict]) -> list[dict]:
    """Paired comparisons of accuracy (0/1 per pair: McNemar) and margin (graded: sign-flip) between stages."""
    return [
        {
            "task": TASK,
            "mode": MODE,
            "metric": metric,
            "a": a,
            "b": b,
            **stats.paired_comparison(items[a][metric], items[b][metric]),
        }
        for a, b in stats.model_pairs(list(items))
        for metric in METRICS
    ]
