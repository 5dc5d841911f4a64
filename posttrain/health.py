"""Generation health: does the model stop, and does it stop repeating itself? Figures from greedy replies.

    prompts = load_prompts("data/sft_alpaca", system_prompt=SYSTEM)      # or a .jsonl of messages rows
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=256)
    health_figures(replies, max_new_tokens=256)
    # {stop_rate, truncated_rate, mean_length, repeat_4gram_rate, n}

and, during training, `health_prompts: N` in an SFT or DPO recipe: `add_health_callback` makes the
trainer compute the same figures on the first N held-out prompts at each evaluation and log them
as `eval_stop_rate`, ... beside `eval_loss` (TensorBoard, trainer_state.json's log history).

Why: benchmark accuracy says nothing about the failure SFT exists to fix, a model that never ends
its turn. A reply is greedy, rendered with the model's own chat template, and *stops* when it ends
on `<|im_end|>` within max_new_tokens; it is *truncated* when it reaches max_new_tokens without any
stop token (the rest ended on another stop token, such as `<|endoftext|>`). `mean_length` counts
reply tokens without the stop token; `repeat_4gram_rate` is the share of a reply's 4-grams that
repeat an earlier 4-gram of the same reply, pooled over all replies (a looping model scores near 1).

Under several processes the prompts are split between them and the replies gathered (each rank
generates its share with the whole model: under ZeRO-3, TRL's `unwrap_model_for_generation`
gathers the parameters first, as TRL's own generation callbacks do).
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from posttrain.chat_template import IM_END
from posttrain.errors import PosttrainError

HEALTH_MAX_NEW_TOKENS = 256
NGRAM = 4


def prompt_of(row: dict, system_prompt: str | None = None) -> dict | None:
    """{messages, reference} for a `messages` row (the messages before its final assistant turn,
    reference = that turn) or a preference row (`prompt` messages, reference = `chosen`); None when
    the row has no assistant turn with something before it. The system prompt is added only to a
    prompt that has none."""
    if isinstance(row.get("messages"), list):
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if not last:
            return None
        prompt, reference = messages[:last], messages[last]["content"]
    elif isinstance(row.get("prompt"), list) and row["prompt"]:
        prompt = row["prompt"]
        chosen = row.get("chosen")
        reference = chosen[-1]["content"] if isinstance(chosen, list) and chosen else None
    else:
        return None
    if system_prompt and prompt[0].get("role") != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in prompt], "reference": reference}


def prompts_from_rows(rows, system_prompt: str | None, limit: int | None, source: str) -> list[dict]:
    """The first `limit` (all if None) prompts of `rows` (see prompt_of); none is a one-line error."""
    prompts = []
    for row in rows:
        if limit is not None and len(prompts) >= limit:
            break
        prompt = prompt_of(row, system_prompt)
        if prompt is not None:
            prompts.append(prompt)
    if not prompts:
        raise PosttrainError(
            f"{source}: no row has messages that end before an assistant turn (a `messages` conversation with "
            "an assistant reply, or a conversational `prompt`), so there is nothing to generate from"
        )
    return prompts


def load_prompts(path: str | Path, system_prompt: str | None = None, limit: int | None = None) -> list[dict]:
    """Prompts from a JSONL of `messages` (or preference) rows, or a data_scripts directory's test.jsonl."""
    from posttrain.data import check_json_file, read_json_rows

    path = Path(path)
    file = path / "test.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise PosttrainError(f"prompts: {file} not found (a .jsonl of messages rows or a data_scripts directory)")
    check_json_file(file)
    rows = [row for _, row in read_json_rows(file)]
    return prompts_from_rows(rows, system_prompt, limit, f"prompts {file}")


def reply_record(ids: list[int], ended_on_stop: bool, tokenizer, max_new_tokens: int) -> dict:
    """What health_figures needs of one reply, and its text, from what chat.generate_ids returns (its token
    ids, the stop token included, and whether it ended on one)."""
    body = ids[:-1] if ended_on_stop else ids
    return {
        "reply": tokenizer.decode(body, skip_special_tokens=True).strip(),
        "stopped": bool(ids) and ids[-1] == tokenizer.convert_tokens_to_ids(IM_END),
        "truncated": not ended_on_stop and len(ids) >= max_new_tokens,
        "length": len(body),
        "token_ids": body,
    }


def generate_replies(model, tokenizer, prompts: list[dict], max_new_tokens: int, desc: str = "generating") -> list:
    """reply_record of the greedy reply to each prompt, in order; the prompts are split between the
    processes and every process gets all replies. Each process holds the whole model (under ZeRO-3,
    gathered by the caller), so none waits for the others inside generate: `synced_gpus=False`, which
    transformers would otherwise turn on under ZeRO-3, where it hangs on unequal shares of prompts."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from posttrain.chat import generate_ids

    state = PartialState()
    was_training = model.training
    model.eval()
    with state.split_between_processes(list(prompts)) as mine:
        records = [
            reply_record(
                *generate_ids(
                    model, tokenizer, p["messages"], max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=False
                ),
                tokenizer,
                max_new_tokens,
            )
            for p in tqdm(mine, desc=desc, disable=not state.is_main_process, leave=False)
        ]
    model.train(was_training)
    return gather_object(records) if state.num_processes > 1 else records


def repeated_ngrams(ids: list[int], n: int = NGRAM) -> tuple[int, int]:
    """(n-grams of `ids` that repeat an earlier one, all n-grams)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)


def health_figures(replies: list[dict]) -> dict:
    """{stop_rate, truncated_rate, mean_length, repeat_4gram_rate, n} of reply_record rows."""
    n = len(replies)
    repeats, grams = map(sum, zip(*(repeated_ngrams(r["token_ids"]) for r in replies))) if n else (0, 0)
    return {
        "stop_rate": sum(r["stopped"] for r in replies) / n if n else None,
        "truncated_rate": sum(r["truncated"] for r in replies) / n if n else None,
        "mean_length": sum(r["length"] for r in replies) / n if n else None,
        "repeat_4gram_rate": repeats / grams if grams else 0.0,
        "n": n,
    }


# ------------------------------------------------------------------------- during training


def held_out_prompts(eval_dataset, count: int) -> list[dict]:
    """The first `count` prompts of a stage's eval split, for the callback; checked before the model loads."""
    if not count:
        return []
    if count < 0:
        raise PosttrainError(f"health_prompts must be >= 0 (got {count})")
    if eval_dataset is None:
        raise PosttrainError("health_prompts needs an eval split: set eval_strategy and dataset_test_split")
    import datasets

    if not isinstance(eval_dataset, datasets.Dataset):
        rows = eval_dataset.take(count * 4)  # a streamed split: enough rows to find `count` prompts
    else:
        rows = eval_dataset.select(range(min(len(eval_dataset), count * 4)))
    return prompts_from_rows(rows, None, count, "health_prompts: the eval split")


class GenerationHealthCallback(TrainerCallback):
    """At each evaluation, health_figures of greedy replies to held-out prompts, logged as eval_* metrics
    (the pattern of TRL's own LogCompletionsCallback: the callback holds its trainer to log through it).

    Every process calls it (a DeepSpeed ZeRO-3 model must be gathered by all of them); the
    trainer's log keeps what the main process logs."""

    def __init__(self, trainer, prompts: list[dict], max_new_tokens: int = HEALTH_MAX_NEW_TOKENS):
        self.trainer, self.prompts, self.max_new_tokens = trainer, prompts, max_new_tokens

    def on_evaluate(self, args, state, control, **kwargs):
        from trl.models import unwrap_model_for_generation

        trainer = self.trainer
        with unwrap_model_for_generation(
            trainer.model_wrapped,
            trainer.accelerator,
            gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
        ) as model:
            replies = generate_replies(
                model, trainer.processing_class, self.prompts, self.max_new_tokens, desc="generation health"
            )
        figures = health_figures(replies)
        trainer.log({f"eval_{k}": v for k, v in figures.items() if k != "n"})


def add_health_callback(trainer, prompts: list[dict]) -> None:
    """Attach the generation-health callback to `trainer` (nothing when there are no prompts)."""
    if prompts:
        trainer.add_callback(GenerationHealthCallback(trainer, prompts))
