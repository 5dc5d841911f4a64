"""The pre-training checkpoint format and its Hugging Face counterpart: the key table and RoPE permutation,
the original architecture as a reference forward, the Qwen3 tokenizer and the ChatML training template."""
