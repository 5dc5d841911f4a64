"""Direct preference optimisation: align the SFT model with preference pairs.

    accelerate launch [--config_file accelerate_configs/zero3.yaml] posttrain/dpo.py recipes/dpo.yaml [--key value ...]
    python posttrain/dpo.py recipes/demo/dpo.yaml            # one process

The recipe is a YAML file of TRL `ScriptArguments` / `DPOConfig` / `ModelConfig` /
`DatasetMixtureConfig` fields (plus `posttrain.training.ScriptArguments`' own and
`reference_free` below); command-line flags override it and an unknown key is an error.
Everything but the DPO specifics is `posttrain/training.py`, shared with `sft.py`.

What TRL's DPOTrainer does for us, and what this file adds:
- Policy and reference both load from `model_name_or_path` (the SFT output). The reference
  is prepared under the same DeepSpeed config as the policy (sharded under ZeRO-3, a frozen
  replica under ZeRO-1/2); `precompute_ref_log_probs: true` computes its log-probs in one
  pass before training and never keeps it; with `use_peft: true` there is no second model:
  the reference is the policy with its adapter disabled.
- `loss_type` (a name or a list combined with `loss_weights`): sigmoid (DPO), ipo, hinge,
  robust (with `label_smoothing`), apo_zero, ...; RPO is `[sigmoid, sft]`. A misspelt name
  fails here, at parse time, not at the first training step.
- `reference_free: true` (TRL 1.16 lost the option): the reference log-probs are 0, so the
  implicit reward is beta * log pi(y|x). Fed to TRL as precomputed zeros: no reference model.
- Pairs that cannot be learnt from within `max_length` are dropped before training, with a
  printed count (see `PreferenceTrainer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trl
from trl.trainer.utils import global_then_local_main_first

from posttrain import training
from posttrain.data import validate_preference_rows
from posttrain.errors import PosttrainError

# The loss types TRL 1.16's DPOTrainer implements (`DPOTrainer._compute_loss`).
LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)


@dataclass
class DPOConfig(trl.DPOConfig):
    """TRL's DPOConfig plus the reference-free option; loss types checked before anything loads."""

    reference_free: bool = field(
        default=False,
        metadata={
            "help": "Ignore the reference model: its log-probs are taken as 0 (implies precompute_ref_log_probs, "
            "so no reference model is loaded)."
        },
    )

    def __post_init__(self):
        loss_types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        unknown = [t for t in loss_types if t not in LOSS_TYPES]
        if unknown:
            raise ValueError(f"loss_type {', '.join(unknown)}: not one of {', '.join(LOSS_TYPES)}")
        if "robust" in loss_types and not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"loss_type robust needs 0 <= label_smoothing < 0.5 (got {self.label_smoothing})")
        if self.reference_free:
            self.precompute_ref_log_probs = True
        super().__post_init__()


class PreferenceTrainer(trl.DPOTrainer):
    """TRL's DPOTrainer, counting the pairs it cannot learn from and serving zero reference log-probs when asked.

    A pair is dropped when, after TRL's own truncation to `max_length` (the collator cuts
    `prompt + response` per sequence: `keep_start` keeps the first max_length tokens), its chosen
    and rejected sequences are the same tokens: the prompt (rendered with the chat template and
    the generation prompt) fills max_length, or the responses only differ beyond it. Such a pair
    has zero gradient and would only pull the reward accuracy down. TRL itself already drops
    `prompt >= max_length` under keep_start, silently; here every drop is counted and printed.
    No minimum response length is imposed beyond that: one differing token is a valid signal.
    """

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

        return training.drop_unfit_rows(
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


def main(script_args, training_args, model_args, dataset_args) -> None:
    training.setup(training_args)
    resume = training.resume_checkpoint(script_args, training_args)

    # Everything that can be wrong with the inputs fails here, in one line, before the model loads.
    # DPO masks by the prompt/response split, so the template needs no {% generation %} markers.
    tokenizer = training.load_tokenizer(model_args, training_args, require_generation_markers=False)
    if not tokenizer.chat_template:
        raise PosttrainError(
            f"model {model_args.model_name_or_path}: its tokenizer has no chat template to render the prompts with"
        )
    training.train_stage(
        PreferenceTrainer,
        tokenizer,
        validate_preference_rows,
        resume,
        script_args,
        training_args,
        model_args,
        dataset_args,
    )


if __name__ == "__main__":
    training.run(main, DPOConfig)
