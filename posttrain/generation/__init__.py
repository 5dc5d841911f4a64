"""Generating from a model directory through its chat template, and the health of the replies (does it
stop, does it loop)."""
