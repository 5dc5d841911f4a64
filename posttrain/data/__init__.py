"""Data: loading what a recipe names, the one message-shape check, token lengths, prompts, and the
data_scripts plumbing with one adapter per dataset schema."""
