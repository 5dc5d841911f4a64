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
from posttrain.outputs.errors import PosttrainError, first_line
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
    """Refuse, in one line and before the output directory is touched, a model that would fail to load: a config
    that cannot be read, local weights that are missing, truncated, refused by the safe loader (a pickle of more
    than tensors) or shaped unlike the config says, and LoRA targets (`lora_target_modules`) that match no module.
    Weights are read from their headers (safetensors) or memory-mapped (pytorch_model.bin), not loaded."""
    from transformers import AutoConfig

    name = model_args.model_name_or_path
    try:
        config = AutoConfig.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
    except Exception as err:  # OSError, ValueError, JSONDecodeError: all mean the same to the user
        raise PosttrainError(f"model {name}: cannot read its config ({str(err).splitlines()[0]})") from None
    skeleton = _skeleton(config, training_args)
    local = Path(name)
    if local.is_dir():  # a hub id: transformers checks it when it downloads
        shapes = _weight_shapes(local, name)
        expected = {} if skeleton is None else {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        for key, shape in shapes.items():
            want = expected.get(key, expected.get(key.removeprefix("model."), expected.get(f"model.{key}")))
            if want is not None and want != shape:
                raise PosttrainError(
                    f"model {name}: weight {key} has shape {list(shape)} but its config.json says {list(want)}; "
                    "the weights and the config are of different models"
                )
    if getattr(model_args, "use_peft", False) and skeleton is not None:
        _check_lora_targets(skeleton, model_args, name)


def _skeleton(config, training_args):
    """The model the config describes, on the meta device (no memory, no weights); None for an architecture that
    is not a causal LM here."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=training_args.trust_remote_code)
    except Exception:  # not a causal-LM config: transformers says so when it loads
        return None


def _weight_shapes(local: Path, name: str) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a model directory's weights as transformers would load them (safetensors if there
    are any, else pytorch_model*.bin through the safe loader), or one line saying why they cannot be loaded."""
    import torch
    from safetensors import safe_open

    weights = sorted(local.glob("*.safetensors"))
    pickles = sorted(local.glob("*.bin"))
    if not weights and not pickles:
        raise PosttrainError(f"model {name}: no weights (*.safetensors) in the directory")
    shapes = {}
    for path in weights:
        try:
            with safe_open(path, framework="pt") as fh:
                shapes.update({key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()})
        except Exception as err:
            raise PosttrainError(f"model {name}: {path.name} is not readable ({str(err).splitlines()[0]})") from None
    for path in [] if weights else pickles:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # truncated (not a zip archive), or a pickle of more than tensors
            why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if "weights_only" in str(err) or "Unsupported global" in str(err):
                why = "the safe loader (weights_only) refuses it: it pickles more than tensors; convert it to safetensors"
            raise PosttrainError(f"model {name}: {path.name} cannot be loaded ({why})") from None
        if not isinstance(state, dict):
            raise PosttrainError(f"model {name}: {path.name} holds no state dict of tensors")
        shapes.update({k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)})
    return shapes


def _check_lora_targets(skeleton, model_args, name: str) -> None:
    """LoRA's `lora_target_modules` must name modules of the model: applied to the meta-device skeleton."""
    from peft import get_peft_model

    targets = model_args.lora_target_modules
    targets = ", ".join(targets) if isinstance(targets, (list, tuple)) else targets
    try:
        get_peft_model(skeleton, trl.get_peft_config(model_args))
    except (ValueError, TypeError, KeyError) as err:
        raise PosttrainError(
            f"lora_target_modules {targets}: no LoRA adapter fits model {name} ({str(err).strip().splitlines()[0]})"
        ) from None


def check_renders(tokenizer, dataset, name: str) -> None:
    """The chat template renders the first training row (a sandboxed template may stop on it, or raise)."""
    import datasets

    rows = (
        dataset.take(1) if not isinstance(dataset, datasets.Dataset) else dataset.select(range(min(1, len(dataset))))
    )
    for row in rows:
        conversation = row.get("messages") or [*(row.get("prompt") or []), *(row.get("chosen") or [])]
        if not isinstance(conversation, list):
            return  # string forms are rendered as text, not through the template
        try:
            tokenizer.apply_chat_template(conversation, tokenize=False)
        except Exception as err:
            raise PosttrainError(
                f"model {name}: its chat template cannot render the first training row ({first_line(err)})"
            ) from None


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
