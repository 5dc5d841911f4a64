"""Direct preference optimisation: align the SFT model with preference pairs.

    accelerate launch [--config_file accelerate_configs/zero3.yaml] posttrain/dpo.py recipes/dpo.yaml [--key value ...]
    python posttrain/dpo.py recipes/demo/dpo.yaml            # one process
    posttrain dpo RECIPE.yaml [--num_processes N | --config_file ACCELERATE.yaml] [--key value ...]

The recipe is a YAML file of TRL `ScriptArguments` / `DPOConfig` / `ModelConfig` / `DatasetMixtureConfig`
fields (plus `posttrain.training.recipe.ScriptArguments`' own and `reference_free`); command-line flags override it.
Policy and reference both start from `model_name_or_path` (the SFT output); `precompute_ref_log_probs`
computes the reference's log-probs in one pass and never keeps it, and with `use_peft` the reference is the
policy with its adapter disabled. `loss_type` is TRL's (a name, or a list weighted by `loss_weights`).
`padding_free: true` runs the chosen and rejected sequences of a micro-batch as one row without padding
(posttrain.training.padding_free; TRL 1.16 has it disabled).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import trl
from trl.trainer.utils import global_then_local_main_first

from posttrain.data.lengths import drop_unfit_rows
from posttrain.data.loading import validate_preference_rows
from posttrain.training.callbacks import add_health_callback, held_out_prompts
from posttrain.training.dpo_batching import LengthGroupedPairs
from posttrain.training.model_card import training_info
from posttrain.training.padding_free import PaddingFreePairs, check_padding_free
from posttrain.training.recipe import STAGE_KEYS, Recipe, RecipeHelp
from posttrain.training.run_dir import run_stage_cli
from posttrain.training.runtime import setup_logging_and_seed
from posttrain.training.stage import check_inputs, train_and_save
from posttrain.training.trainers import build_trainer, check_model

# The loss types whose formula reads label_smoothing (TRL 1.16 `DPOTrainer._compute_loss`).
LABEL_SMOOTHING_LOSSES = {"robust", "exo_pair", "aot", "aot_unpaired"}

RECIPE_HELP = RecipeHelp(
    description="Direct preference optimisation: align the SFT model with prompt/chosen/rejected pairs, against\n"
    "a reference (the same model frozen, its log-probs precomputed, or none with reference_free).",
    keys={
        **STAGE_KEYS,
        "beta": "how far the policy may move from the reference (higher: less far)",
        "loss_type": "sigmoid (DPO), ipo, hinge, ... or a list weighted by loss_weights",
        "max_length": "tokens of prompt + reply; longer pairs are truncated (truncation_mode)",
        "precompute_ref_log_probs": "score the reference once before training and never keep it",
        "padding_free": "chosen and rejected of a micro-batch as one row without padding",
    },
)


@dataclass
class DPOConfig(trl.DPOConfig):
    """TRL's DPOConfig plus the reference-free option, with values checked before anything loads."""

    reference_free: bool = field(
        default=False,
        metadata={
            "help": "Ignore the reference model: its log-probs are taken as 0, so the implicit reward is "
            "beta * log pi(y|x) (implies precompute_ref_log_probs, so no reference model is loaded)."
        },
    )

    def __post_init__(self):
        if self.reference_free:
            self.precompute_ref_log_probs = True
        super().__post_init__()
        # TRL 1.16 checks loss names only at the first step, and its list exists only in this field's help.
        known = re.findall(r"`'(\w+)'`", trl.DPOConfig.__dataclass_fields__["loss_type"].metadata["help"])
        unknown = [t for t in self.loss_type if t not in known]
        if unknown:
            raise ValueError(f"loss_type {', '.join(unknown)}: not one of {', '.join(known)}")
        if not self.beta > 0:
            raise ValueError(
                f"beta must be > 0 (got {self.beta}): a negative beta trains towards the rejected answers"
            )
        smoothed = sorted(set(self.loss_type) & LABEL_SMOOTHING_LOSSES)
        if smoothed and not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(
                f"loss_type {', '.join(smoothed)} needs 0 <= label_smoothing < 0.5 (got {self.label_smoothing})"
            )


class PreferenceTrainer(PaddingFreePairs, LengthGroupedPairs, trl.DPOTrainer):
    """TRL's DPOTrainer, counting the pairs it cannot learn from and serving zero reference log-probs for
    `reference_free`.

    A pair is dropped when, after TRL's own truncation to `max_length` (`keep_start` keeps the first
    max_length tokens of prompt + response), its chosen and rejected sequences are the same tokens: such a
    pair has zero gradient and would only pull the reward accuracy down. One differing token is enough.
    """

    # Private hooks: TRL 1.16 tokenizes inside `_prepare_dataset` and accepts no pre-tokenized preference
    # data, so the drop has to follow its tokenization here; it has no reference-free option either.
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        import datasets

        before = len(dataset) if isinstance(dataset, datasets.Dataset) else None
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if args.max_length is None or not {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(
            dataset.column_names or ()
        ):
            return dataset
        cut = slice(None, args.max_length) if args.truncation_mode == "keep_start" else slice(-args.max_length, None)

        def distinguishable(example) -> bool:
            prompt = example["prompt_ids"]
            return (prompt + example["chosen_ids"])[cut] != (prompt + example["rejected_ids"])[cut]

        return drop_unfit_rows(
            dataset,
            distinguishable,
            stage="dpo",
            noun=f"{dataset_name} pair",
            max_length=args.max_length,
            why=f"that leave no room within max_length={args.max_length} to tell chosen from rejected "
            "(the prompt fills it, or the responses differ only beyond it)",
            before=before,
        )

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if not self.args.reference_free:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        with global_then_local_main_first():
            return dataset.map(lambda _: {"ref_chosen_logps": 0.0, "ref_rejected_logps": 0.0})


def main(recipe: Recipe) -> None:
    script_args, training_args, model_args, _ = recipe.arguments
    setup_logging_and_seed(training_args)

    # Every input is checked, in one line each, before anything in output_dir changes or the model loads.
    # DPO masks by the prompt/response split, so the template needs no {% generation %} markers.
    resume, record, tokenizer, train_dataset, eval_dataset = check_inputs(
        recipe, validate_preference_rows, require_generation_markers=False
    )
    health_prompts = held_out_prompts(eval_dataset, script_args.health_prompts)
    check_model(model_args, training_args)
    check_padding_free(model_args, training_args)
    info = training_info("dpo", recipe, train_dataset)  # the training system prompt, before tokenizing

    trainer = build_trainer(PreferenceTrainer, recipe, tokenizer, train_dataset, eval_dataset)
    add_health_callback(trainer, health_prompts)
    train_and_save(trainer, recipe, resume, record, info)


if __name__ == "__main__":
    run_stage_cli(main, DPOConfig)
