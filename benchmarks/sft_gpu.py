#!/usr/bin/env python
"""Packed SFT steps of the real model shape on one CUDA GPU: what a production SFT run will cost.

    python benchmarks/sft_gpu.py [--attn auto|flash_attention_2|sdpa] [--per-device-batch 1] [--steps 20]

A randomly initialised LlamaForCausalLM of the converted Qwen3-1.8B's shape (24 layers, hidden
2048, 16 heads MHA, d_ff 5461, vocab 151,669, untied: 1,829,246,976 parameters) trained by
TRL's SFTTrainer exactly as recipes/sft.yaml trains it: bf16 autocast over fp32 weights, bfd
packing into rows of 2048 run padding-free, activation checkpointing, AdamW, on Alpaca-shaped
conversation lengths (posttrain.fixtures.alpaca_lengths). Attention is the best available:
flash_attention_2 if flash-attn is installed, else sdpa. After --warmup steps it times --steps
optimizer steps and reports
- real tokens/s on this GPU (padding-free: every processed token is a real one),
- model FLOPs utilisation: 6 x N x tokens/s over the GPU's dense bf16 peak (N = all parameters;
  recomputation by activation checkpointing is not counted, as is usual for MFU),
- peak GPU memory (one GPU, unsharded: ZeRO-2 on 8 GPUs shards the optimizer state further),
- the implied wall time of 3 epochs of Alpaca (17M real tokens) on 8 such GPUs, assuming
  linear data-parallel scaling (an upper bound on speed; gradient all-reduce is not free).
Writes benchmarks/results/sft_gpu.json. Not run in CI: it needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "sft_gpu.json"
ALPACA_3_EPOCH_TOKENS = 17e6  # 3 x ~5.7M real tokens (Alpaca: 52K conversations, ~110 tokens each)
GPUS = 8
# Dense bf16 peak, TFLOP/s, by a substring of torch.cuda.get_device_name(); the longest match wins.
PEAK_TFLOPS = {
    "A100": 312,
    "H100": 989,
    "H100 PCIE": 756,
    "H800": 989,
    "H200": 989,
    "GH200": 989,
    "B200": 2250,
    "GB200": 2500,
    "L40S": 362,
}


def model_config(**overrides):
    """The converted Qwen3-1.8B's architecture (convert-checkpoint writes exactly this LlamaConfig)."""
    from transformers import LlamaConfig

    shape = dict(
        vocab_size=151669,
        hidden_size=2048,
        intermediate_size=5461,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )
    return LlamaConfig(**{**shape, **overrides})


def param_count(c) -> int:
    """Parameters of a LlamaForCausalLM, from its config alone."""
    E, F, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (E // c.num_attention_heads)
    layer = 2 * E * E + 2 * E * kv + 3 * E * F + 2 * E  # q, o; k, v; gate, up, down; two RMSNorms
    return V * E + L * layer + E + (0 if c.tie_word_embeddings else V * E)


def peak_tflops(device_name: str) -> float | None:
    name = device_name.upper()
    matches = [k for k in PEAK_TFLOPS if k in name]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def mfu(tokens_per_s: float, n_params: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: 6 N FLOPs per trained token (forward 2N, backward 4N) over the peak."""
    return 6 * n_params * tokens_per_s / peak_flops


def wall_time_s(tokens: float, tokens_per_s_per_gpu: float, gpus: int = GPUS) -> float:
    return tokens / (tokens_per_s_per_gpu * gpus)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attn", choices=["auto", "flash_attention_2", "sdpa"], default="auto")
    p.add_argument("--per-device-batch", type=int, default=1, help="packed rows of --seq tokens per step (recipe: 1)")
    p.add_argument("--seq", type=int, default=2048, help="max_length: packed row length")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocator, kernels)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights (recipe: float32)")
    p.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_false")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this GPU (default: from a table by name)")
    p.add_argument("--output", type=Path, default=RESULTS)
    return p.parse_args(argv)


def token_rows(n_tokens: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Alpaca-shaped conversations of random tokens, at least n_tokens in all."""
    from posttrain.fixtures import alpaca_lengths, random_token_rows

    return random_token_rows(alpaca_lengths(n=math.ceil(n_tokens / 100), seed=seed), vocab, seed=seed)


def main(argv=None) -> None:
    args = parse_args(argv)
    import datasets
    import torch
    import transformers
    from transformers import LlamaForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from posttrain.fixtures import build_tokenizer

    if not torch.cuda.is_available():
        print(
            "error: this benchmark needs a CUDA GPU (see benchmarks/sft_packing.py for the CPU one)", file=sys.stderr
        )
        raise SystemExit(2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    datasets.utils.logging.disable_progress_bar()
    gpu = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops(gpu)
    attn = args.attn
    if attn == "auto":
        attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"

    config = model_config()
    n_params = param_count(config)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, args.dtype), attn_implementation=attn)
    assert sum(p.numel() for p in model.parameters()) == n_params
    total_steps = args.warmup + args.steps
    rows = token_rows(int(total_steps * args.per_device_batch * args.seq * 1.2), config.vocab_size)

    class Timer(TrainerCallback):
        """Times the steps after the warm-up, counting the tokens TRL counted (padding-free: all real)."""

        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step == args.warmup:
                torch.cuda.synchronize()
                self.t0, self.tokens0 = time.perf_counter(), trainer._total_train_tokens

        def on_train_end(self, _args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.seconds, self.tokens = time.perf_counter() - self.t0, trainer._total_train_tokens - self.tokens0

    timer = Timer()
    with tempfile.TemporaryDirectory() as out:
        sft_args = SFTConfig(
            output_dir=out,
            bf16=True,
            packing=True,
            packing_strategy="bfd",
            max_length=args.seq,
            per_device_train_batch_size=args.per_device_batch,
            gradient_accumulation_steps=1,
            max_steps=total_steps,
            activation_checkpointing=args.activation_checkpointing,
            learning_rate=2e-5,
            weight_decay=0.01,
            adam_beta2=0.95,
            max_grad_norm=1.0,
            report_to="none",
            save_strategy="no",
            logging_steps=10_000,
            disable_tqdm=True,
            seed=0,
        )
        trainer = SFTTrainer(
            model=model,
            args=sft_args,
            processing_class=build_tokenizer(),
            callbacks=[timer],
            train_dataset=datasets.Dataset.from_dict({"input_ids": rows}),
        )
        torch.cuda.reset_peak_memory_stats()
        trainer.train()

    tokens_per_s = timer.tokens / timer.seconds
    result = {
        "gpu": gpu,
        "attn_implementation": attn,
        "weights_dtype": args.dtype,
        "activation_checkpointing": args.activation_checkpointing,
        "packed_rows_per_step": args.per_device_batch,
        "max_length": args.seq,
        "parameters": n_params,
        "timed_steps": args.steps,
        "seconds_per_step": timer.seconds / args.steps,
        "real_tokens_per_step": timer.tokens / args.steps,
        "real_tokens_per_s_per_gpu": tokens_per_s,
        "peak_bf16_tflops": peak,
        "mfu": mfu(tokens_per_s, n_params, peak * 1e12) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "implied_3_epochs_alpaca_8_gpus_s": wall_time_s(ALPACA_3_EPOCH_TOKENS, tokens_per_s),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    mfu_text = f"{result['mfu']:.1%}" if peak else "unknown (pass --peak-tflops)"
    print(
        f"{gpu}, {attn}, {args.per_device_batch} packed row(s) of {args.seq} per step, "
        f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}:"
    )
    print(f"  {tokens_per_s:,.0f} real tokens/s/GPU, MFU {mfu_text}, peak memory {result['peak_memory_gib']:.1f} GiB")
    print(
        f"  3 epochs of Alpaca (17M tokens) on {GPUS} GPUs: ~{result['implied_3_epochs_alpaca_8_gpus_s']:.0f} s "
        "of training steps (linear scaling)"
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
