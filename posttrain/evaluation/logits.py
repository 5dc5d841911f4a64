"""A model's logits over many token sequences, in batches, split between the processes.

    values = on_every_process(items, lambda mine: score_sequences(model, [ids(x) for x in mine], 8, score))

Shared by the judge (the next-token probabilities of its two labels) and preference accuracy (the
summed log-probability of a response). Batches are right-padded and sorted by length: padding
never precedes a real token (no position shift), and little of a batch is padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

DEFAULT_BATCH_SIZE = 8


def batch_size_of(setting) -> int:
    """evaluate.py's `batch_size` ("8", or "auto" for the harness) as a number of sequences."""
    return int(setting) if str(setting).isdigit() else DEFAULT_BATCH_SIZE


def on_every_process(items: Sequence, work: Callable[[list], list]) -> list:
    """`work` of this process's share of `items` (contiguous, as accelerate splits them); every process
    gets all the results, in the order of `items`."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    with state.split_between_processes(list(items)) as mine:
        results = work(list(mine))
    return gather_object(results) if state.num_processes > 1 else results


def score_sequences(model, sequences: list[list[int]], batch_size: int, score: Callable) -> list:
    """score(logits, i) for each sequence i, in order, where `logits` is the float32 [len, vocab] output of
    the model on sequence i alone (logits[t] predicts token t + 1)."""
    import torch

    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    results: list = [None] * len(sequences)
    for start in range(0, len(order), batch_size):
        members = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in members)
        input_ids = torch.tensor([sequences[i] + [0] * (width - len(sequences[i])) for i in members])
        mask = torch.tensor([[1] * len(sequences[i]) + [0] * (width - len(sequences[i])) for i in members])
        with torch.inference_mode():
            logits = model(
                input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False
            ).logits
            for row, i in enumerate(members):
                results[i] = score(logits[row, : len(sequences[i])].float(), i)
    return results
