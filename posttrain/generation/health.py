"""Generation health: does the model stop, and does it stop repeating itself? Figures from greedy replies.

    prompts = load_prompts("data/sft_alpaca", system_prompt=SYSTEM)      # posttrain.data.prompts
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=256)
    health_figures(replies)
    # {stop_rate, truncated_rate, mean_length, repeat_4gram_rate, n}

`evaluate.py` reports these figures per model; during training, `health_prompts: N` logs them at
each evaluation (posttrain.training.callbacks).

Why: benchmark accuracy says nothing about the failure SFT exists to fix, a model that never ends
its turn. A reply is greedy, rendered with the model's own chat template, and *stops* when it ends
on `<|im_end|>` within max_new_tokens; it is *truncated* when it reaches max_new_tokens without any
stop token (the rest ended on another stop token, such as `<|endoftext|>`). `mean_length` counts
reply tokens without the stop token; `repeat_4gram_rate` is the share of a reply's 4-grams that
repeat an earlier 4-gram of the same reply, pooled over all replies (a looping model scores near 1).

Replies are generated in left-padded batches of similar length (generate_batch). Under several
processes the prompts are split between them and the replies gathered (each rank generates its
share with the whole model: under ZeRO-3, TRL's `unwrap_model_for_generation`
gathers the parameters first, as TRL's own generation callbacks do).
"""

from __future__ import annotations

from posttrain.conversion.chat_template import IM_END
from posttrain.generation.generate import generate_batch

HEALTH_MAX_NEW_TOKENS = 256
HEALTH_BATCH_SIZE = 8
NGRAM = 4


def reply_record(ids: list[int], ended_on_stop: bool, tokenizer, max_new_tokens: int) -> dict:
    """What health_figures needs of one reply, and its text, from what generate_ids and generate_batch return (its token
    ids, the stop token included, and whether it ended on one)."""
    body = ids[:-1] if ended_on_stop else ids
    return {
        "reply": tokenizer.decode(body, skip_special_tokens=True).strip(),
        "stopped": bool(ids) and ids[-1] == tokenizer.convert_tokens_to_ids(IM_END),
        "truncated": not ended_on_stop and len(ids) >= max_new_tokens,
        "length": len(body),
        "token_ids": body,
    }


def generate_replies(
    model, tokenizer, prompts: list[dict], max_new_tokens: int, batch_size: int = HEALTH_BATCH_SIZE
) -> list:
    """reply_record of the greedy reply to each prompt, in order; the prompts are split between the
    processes, each generates its share in batches sorted by length (generate_batch), and every process
    gets all replies. Each process holds the whole model (under ZeRO-3, gathered by the caller), so none
    waits for the others inside generate: `synced_gpus=False`, which transformers would otherwise turn
    on under ZeRO-3, where it hangs on unequal shares of prompts."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    was_training = model.training
    model.eval()
    with state.split_between_processes(list(prompts)) as mine:
        replies = (
            generate_batch(
                model,
                tokenizer,
                [p["messages"] for p in mine],
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                do_sample=False,
                synced_gpus=False,
            )
            if mine
            else []
        )
        records = [reply_record(ids, stopped, tokenizer, max_new_tokens) for ((ids, stopped),) in replies]
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
