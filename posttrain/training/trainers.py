"""Build a TRL trainer on the recipe's model, the way TRL's own scripts do.

TRL loads the model from `model_name_or_path` (so ZeRO-3 init and device placement are TRL's), with
LoRA when `use_peft` is set. The trainer gets its own copy of the training arguments, so the recipe
that is saved at the end is exactly the one that was parsed.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import trl

from posttrain.conversion.chat_template import check_template_renders
from posttrain.outputs.errors import PosttrainError
from posttrain.training.recipe import Recipe


def model_init_kwargs(model_args, training_args) -> dict:
    """`from_pretrained` kwargs from ModelConfig, as TRL's scripts build them; the recipe's own
    model_init_kwargs win."""
    kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    return {**kwargs, **(training_args.model_init_kwargs or {})}


def build_trainer(trainer_cls, recipe: Recipe, tokenizer, train_dataset, eval_dataset=None, **kwargs):
    """`trainer_cls` (an SFTTrainer or DPOTrainer) on the recipe's model and data."""
    args = copy.copy(recipe.training_args)
    args.model_init_kwargs = model_init_kwargs(recipe.model_args, recipe.training_args)
    return trainer_cls(
        model=recipe.model_args.model_name_or_path,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=trl.get_peft_config(recipe.model_args),
        quantization_config=trl.get_quantization_config(recipe.model_args),
        **kwargs,
    )


def check_model(model_args, training_args) -> None:
    """Refuse, in one line and before the output directory is touched, a model whose config cannot be read
    or whose local weights are missing or unreadable (their headers are read, not the tensors)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    name = model_args.model_name_or_path
    try:
        AutoConfig.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
    except Exception as err:  # OSError, ValueError, JSONDecodeError: all mean the same to the user
        raise PosttrainError(f"model {name}: cannot read its config ({str(err).splitlines()[0]})") from None
    local = Path(name)
    if not local.is_dir():
        return  # a hub id: transformers checks it when it downloads
    weights = sorted(local.glob("*.safetensors"))
    if not weights and not any(local.glob("*.bin")):
        raise PosttrainError(f"model {name}: no weights (*.safetensors) in the directory")
    for path in weights:
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception as err:
            raise PosttrainError(f"model {name}: {path.name} is not readable ({str(err).splitlines()[0]})") from None


def load_training_tokenizer(model_args, training_args, require_generation_markers: bool = True):
    """The model directory's tokenizer for a training stage; refuse one whose chat template cannot mask the
    loss to assistant turns (no `{% generation %}` markers), unless the stage does not need them."""
    from transformers import AutoTokenizer
    from trl.chat_template_utils import has_generation_markers

    name = model_args.model_name_or_path
    if not name:
        raise PosttrainError("the recipe names no model: set model_name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise PosttrainError(f"model {name}: cannot load its tokenizer ({str(err).splitlines()[0]})") from None
    template = tokenizer.chat_template
    path = getattr(training_args, "chat_template_path", None)
    if path and path.endswith((".jinja", ".j2")) and os.path.isfile(path):
        template = Path(path).read_text(encoding="utf-8")
    if require_generation_markers and not (template and has_generation_markers(template)):
        raise PosttrainError(
            f"model {name}: its chat template has no {{% generation %}} markers, so the loss cannot be limited to "
            "assistant turns; convert the model with convert-checkpoint (it installs the ChatML training template) "
            "or set chat_template_path to a .jinja template that has them"
        )
    if not template:
        raise PosttrainError(f"model {name}: its tokenizer has no chat template to render the prompts with")
    if template == tokenizer.chat_template:  # a chat_template_path is installed later, by the trainer
        check_template_renders(tokenizer, f"model {name}")
    return tokenizer
