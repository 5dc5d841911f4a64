"""Generating from a model directory through its chat template (one reply, or many batched by length), the
health of the replies (does it stop, does it loop), and on-policy pairs (sampled, scored by a reward model)."""
