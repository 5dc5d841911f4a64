"""Trainer callbacks the stages add: generation health at each evaluation.

`health_prompts: N` in an SFT or DPO recipe makes the trainer compute the generation-health figures
(posttrain.generation.health) on the first N held-out prompts at each evaluation and log them as
`eval_stop_rate`, `eval_truncated_rate`, `eval_mean_length`, `eval_repeat_4gram_rate` beside
`eval_loss` (TensorBoard, trainer_state.json's log history).
"""

from __future__ import annotations

from transformers import TrainerCallback

from posttrain.data.prompts import prompts_from_rows
from posttrain.generation.health import HEALTH_MAX_NEW_TOKENS, generate_replies, health_figures
from posttrain.outputs.errors import PosttrainError


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
            replies = generate_replies(model, trainer.processing_class, self.prompts, self.max_new_tokens)
        figures = health_figures(replies)
        trainer.log({f"eval_{k}": v for k, v in figures.items() if k != "n"})


def add_health_callback(trainer, prompts: list[dict]) -> None:
    """Attach the generation-health callback to `trainer` (nothing when there are no prompts)."""
    if prompts:
        trainer.add_callback(GenerationHealthCallback(trainer, prompts))
