"""Supervised fine-tuning: teach the converted base model to follow instructions.

    accelerate launch [--config_file accelerate_configs/zero2.yaml] posttrain/sft.py recipes/sft.yaml [--key value ...]
    python posttrain/sft.py recipes/demo/sft.yaml            # one process

The recipe is a YAML file of TRL `ScriptArguments` / `SFTConfig` / `ModelConfig` /
`DatasetMixtureConfig` fields (plus `posttrain.training.ScriptArguments`' own);
command-line flags override it and an unknown key is an error that names it.

What makes this SFT rather than plain language modelling, all TRL features:
- `assistant_only_loss: true`: the loss covers every assistant turn *including its
  `<|im_end|>`* (the `{% generation %}` markers of the ChatML template put it inside the
  turn), so the model learns to stop; system and user turns and the
  `<|im_start|>assistant\\n` scaffolding are masked to -100.
- `packing: true` (best-fit decreasing): conversations are packed into rows of
  `max_length` tokens, and the collator runs them padding-free (one row, position ids
  restarting at 0 for each conversation, labels cut at the boundaries). The model sees a
  block-diagonal causal mask because the SFT trainer always calls it with
  `use_cache=False` (with a cache, packed conversations would attend to each other).
- Conversations longer than `max_length` are dropped, with a printed count, never cut.
- A mixture of datasets with weights: a `datasets:` list of `{path, split, fraction}`.
"""

from __future__ import annotations

import logging

import trl

from posttrain import training
from posttrain.data import validate_sft_rows

logger = logging.getLogger("posttrain.sft")


class SFTTrainer(trl.SFTTrainer):
    """TRL's SFTTrainer, dropping and counting conversations longer than `max_length`.

    TRL would cut them: with packing, silently inside the packer. A cut conversation's last
    assistant turn loses its `<|im_end|>` (or all of its tokens), so the model would learn
    answers that never stop, the old system's failure. Like axolotl, drop them instead, and
    say how many (the length is the chat template's, exactly as TRL tokenizes the rows).
    """

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        import datasets

        if (
            args.max_length is not None
            and isinstance(dataset, datasets.Dataset)
            and "messages" in dataset.column_names
        ):
            tokenizer = getattr(processing_class, "tokenizer", processing_class)

            def fits(batch) -> list[bool]:
                ids = tokenizer.apply_chat_template(batch["messages"], tokenize=True, return_dict=False)
                return [len(x) <= args.max_length for x in ids]

            dataset = training.drop_unfit_rows(
                dataset,
                fits,
                stage="sft",
                noun=f"{dataset_name} conversation",
                max_length=args.max_length,
                why=f"longer than max_length={args.max_length} tokens (cut, they would lose their final answer or its <|im_end|>)",
                before=len(dataset),
                batched=True,
                num_proc=args.dataset_num_proc,
                desc=f"Dropping over-long {dataset_name} conversations",
            )
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)


def main(script_args, training_args, model_args, dataset_args) -> None:
    training.setup(training_args)
    if not training_args.assistant_only_loss:
        logger.warning("assistant_only_loss is false: the loss also covers system and user turns")
    resume = training.resume_checkpoint(script_args, training_args)

    # Everything that can be wrong with the inputs fails here, in one line, before the model loads.
    tokenizer = training.load_tokenizer(
        model_args, training_args, require_generation_markers=training_args.assistant_only_loss
    )
    training.train_stage(
        SFTTrainer, tokenizer, validate_sft_rows, resume, script_args, training_args, model_args, dataset_args
    )


if __name__ == "__main__":
    training.run(main, trl.SFTConfig)
