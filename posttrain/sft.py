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
- A mixture of datasets with weights: a `datasets:` list of `{path, split, fraction}`.
"""

from __future__ import annotations

import logging

import trl

from posttrain import training
from posttrain.data import validate_sft_rows

logger = logging.getLogger("posttrain.sft")


def main(script_args, training_args, model_args, dataset_args) -> None:
    training.setup(training_args)
    if not training_args.assistant_only_loss:
        logger.warning("assistant_only_loss is false: the loss also covers system and user turns")
    resume = training.resume_checkpoint(script_args, training_args)

    # Everything that can be wrong with the inputs fails here, in one line, before the model loads.
    tokenizer = training.load_tokenizer(model_args, training_args, require_generation_markers=training_args.assistant_only_loss)
    training.train_stage(trl.SFTTrainer, tokenizer, validate_sft_rows, resume, script_args, training_args, model_args, dataset_args)


if __name__ == "__main__":
    training.run(main, trl.SFTConfig)
