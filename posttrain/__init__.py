"""posttrain: turn a custom nanoGPT-style Qwen3 checkpoint into an SFT- and
DPO-trained Hugging Face model, with TRL, accelerate and DeepSpeed doing the work."""

__version__ = "0.1.0"
