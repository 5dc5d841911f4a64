"""Padding-free DPO: the chosen and rejected sequences of a micro-batch run as one row, with no pad token.

    padding_free: true        # in a DPO recipe (TRL's own DPOConfig key)

TRL 1.16's DPOTrainer turns `padding_free` off with a warning ("temporarily unavailable after a
refactor"): its collator pads every sequence of a micro-batch to the longest, and the policy's
forward and backward and the reference's forward all run over the padding. `PaddingFreePairs`,
mixed into the DPO trainer, keeps TRL's collator and loss and changes only what the model
computes. TRL asks the model for per-token log-probs through the fused LM head it adds
(`model(input_ids, attention_mask, labels=..., fused_lm_head=True)`, in `_compute_loss` and in
`compute_ref_log_probs`); a thin layer over that forward concatenates the real tokens of the
batch into one `(1, N)` row, `position_ids` restarting at 0 for each sequence, no attention mask
and no KV cache, and puts the per-token outputs back where TRL's padded `(B, L - 1)` layout has
them (zeros elsewhere, as the fused head gives for masked labels). transformers then keeps the
sequences apart itself: it builds the block-diagonal mask from `position_ids` for sdpa, eager
and flex attention when no cache is passed, and flash-attention runs its varlen kernel on them.
Everything TRL computes from the log-probs (every loss type, rewards, margins, metrics, the
precomputed reference cache) is its own code on the same numbers.

It covers the live reference (its own model, or the policy with the LoRA adapter disabled:
both go through a patched forward), `precompute_ref_log_probs` (TRL's pass in `__init__`),
`reference_free`, evaluation, DeepSpeed (the engine calls the module's forward) and any sampler.
"""

from __future__ import annotations

import functools

from posttrain.outputs.errors import PosttrainError
from posttrain.training.trainers import model_init_kwargs

PATCHED = "_posttrain_padding_free"  # marks a model whose forward is already padding-free
PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")
SUGGESTED_ATTENTION = "sdpa (or flash_attention_2 with flash-attn installed)"


def packs_by_position_ids(attn_implementation: str | None) -> bool:
    """Whether transformers keeps packed sequences apart from their `position_ids` under this attention:
    it does for every implementation it has a mask function for (sdpa, eager, flex_attention, the
    flash-attention ones); for any other (e.g. `paged|eager`) it builds no mask and they would attend
    to each other. None is transformers' default, sdpa or eager."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return attn_implementation is None or attn_implementation in ALL_MASK_ATTENTION_FUNCTIONS


def refuse_unpackable_attention(attn_implementation: str | None) -> None:
    """One line, naming the setting to use, for `padding_free: true` under an attention that cannot honour it."""
    if not packs_by_position_ids(attn_implementation):
        raise PosttrainError(
            f"padding_free: attn_implementation {attn_implementation} cannot keep the packed chosen and rejected "
            f"sequences apart (transformers builds no position_ids mask for it); set attn_implementation to "
            f"{SUGGESTED_ATTENTION}, or padding_free: false"
        )


def check_padding_free(model_args, training_args) -> None:
    """Before anything is written: the attention the model will load with (ModelConfig's
    `attn_implementation`, or the recipe's `model_init_kwargs`) must keep packed sequences apart."""
    if training_args.padding_free:
        refuse_unpackable_attention(model_init_kwargs(model_args, training_args).get("attn_implementation"))


def pack(input_ids, attention_mask, labels, pad_to_multiple_of: int | None = None):
    """A padded batch as one row: (input_ids, position_ids, labels), each `(1, N)`, N the real tokens
    (rounded up to `pad_to_multiple_of` by a separate segment of ignored tokens).

    Each sequence's first label is -100: in the padded batch nothing predicts it, and in the row it
    would be predicted from the end of the previous sequence."""
    import torch

    mask = attention_mask.bool()
    position_ids = (attention_mask.long().cumsum(1) - 1)[mask]
    ids, labels = input_ids[mask], labels[mask].masked_fill(position_ids == 0, -100)
    extra = -len(ids) % pad_to_multiple_of if pad_to_multiple_of else 0
    if extra:
        ids = torch.cat([ids, ids.new_zeros(extra)])
        labels = torch.cat([labels, labels.new_full((extra,), -100)])
        position_ids = torch.cat([position_ids, torch.arange(extra, device=ids.device)])
    return ids[None], position_ids[None], labels[None]


def unpack(per_token, attention_mask):
    """The row's per-token outputs `(1, N' - 1)` (N' >= the real tokens N) in the padded batch's
    `(B, L - 1)` layout: entry [b, t] is the prediction of token t + 1 of sequence b, zero where
    that token is padding."""
    import torch

    mask = attention_mask.bool()
    # by_token[k]: the prediction *of* real token k (the output one position before it; none for k = 0)
    by_token = torch.cat([per_token.new_zeros(1), per_token[0]])[: int(mask.sum())]
    return per_token.new_zeros(mask.shape).masked_scatter(mask, by_token)[:, 1:]


def add_padding_free_forward(model, pad_to_multiple_of: int | None = None) -> None:
    """Wrap `model.forward` (already carrying TRL's fused LM head) so that `fused_lm_head=True` calls run
    padding-free; every other call (generation, logits) is passed through unchanged."""
    if getattr(model, PATCHED, False):
        return
    fused_forward = model.forward

    @functools.wraps(fused_forward)
    def forward(*args, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, **kwargs):
        if not fused_lm_head or args or attention_mask is None or kwargs.get("inputs_embeds") is not None:
            return fused_forward(
                *args,
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                fused_lm_head=fused_lm_head,
                **kwargs,
            )
        ids, position_ids, row_labels = pack(input_ids, attention_mask, labels, pad_to_multiple_of)
        # No attention mask and no cache: transformers then builds the block-diagonal mask from position_ids.
        kwargs["use_cache"] = False
        out = fused_forward(input_ids=ids, position_ids=position_ids, labels=row_labels, fused_lm_head=True, **kwargs)
        for name in PER_TOKEN_FIELDS:
            if out.get(name) is not None:
                out[name] = unpack(out[name], attention_mask)
        return out

    model.forward = forward
    setattr(model, PATCHED, True)


class PaddingFreePairs:
    """Mixin for trl.DPOTrainer: `padding_free: true` runs the policy and the reference without padding."""

    # Private hooks. TRL 1.16 (DPO refactor of February 2026, first released in 0.29) has no public route:
    # `DPOTrainer.__init__` resets `padding_free` to False with a warning, so the flag is hidden from it and
    # restored after; the model's forward is wrapped after TRL adds its fused LM head and before TRL's own
    # `_precompute_ref_logps` pass inside `__init__` first calls it.
    def __init__(self, model, ref_model=None, args=None, *rest, **kwargs):
        self._pack_pairs = bool(args is not None and args.padding_free)
        if self._pack_pairs:
            args.padding_free = False
        try:
            super().__init__(model, ref_model, args, *rest, **kwargs)
        finally:
            if self._pack_pairs:
                args.padding_free = True
        if self._pack_pairs:
            self.padding_free = True
            self._make_padding_free()

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if self._pack_pairs:
            self._make_padding_free()
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _make_padding_free(self) -> None:
        from accelerate.utils import is_peft_model

        models = [self.model.get_base_model() if is_peft_model(self.model) else self.model]
        if self.ref_model is not None:
            models.append(self.accelerator.unwrap_model(self.ref_model))
        for model in models:
            refuse_unpackable_attention(model.config._attn_implementation)
            add_padding_free_forward(model, self.args.pad_to_multiple_of)
