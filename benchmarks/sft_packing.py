#!/usr/bin/env python
"""How much of SFT's compute is real tokens, with and without packing, on Alpaca-shaped data.

    python benchmarks/sft_packing.py      # prints, and writes benchmarks/results/sft_packing.json

1. Padding efficiency (real tokens / processed tokens) of 52,002 synthetic Alpaca-shaped
   conversation lengths (posttrain.demo.fixtures.alpaca_lengths: mean ~110, tail to 1,120), batched
   the three ways that matter:
   - every conversation padded to 2048 (fixed-width batches, no packing);
   - TRL without packing: shuffled batches of 4, each padded to its longest conversation
     (what DataCollatorForLanguageModeling does);
   - TRL's bfd packing into rows of 2048, run padding-free, computed by `trl.pack_dataset`
     itself. Padding-free processes no pad token at all; the row fill (real tokens /
     (rows x 2048)) is the stricter figure: it sets the number of steps, and it is what a
     kernel without varlen support pays. The target (>= 0.97) is on the row fill.
2. Real tokens/s of SFT steps (TRL's SFTTrainer, the tiny 2-layer hidden-96 model, sdpa, CPU)
   on the same Alpaca-shaped sample: packed vs padded per batch vs padded to 2048, measured in
   one run; the ratios are the result.
3. What that means for the real 1.8B shape: modelled training FLOPs per real token of each
   batching (matmuls over processed tokens plus attention), relative to packing with a varlen
   kernel. The tiny model needs this: at hidden 96 attention over a 2048-token row costs several
   times its matmuls, so on it a dense-mask packed row is slow; at hidden 2048 the matmuls dominate.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from common import StepTimer, forward_flops, model_config, timed_run_args, tiny_model  # noqa: E402

from posttrain.demo.fixtures import alpaca_lengths, build_tokenizer, random_token_rows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "sft_packing.json"
SEQ = 2048  # max_length of the production recipe
BATCH = 4  # conversations per GPU per micro-batch in fixed-width batching
TARGET = 0.97


def padding_efficiency(lengths: list[int]) -> dict:
    """real / processed tokens for the three batchings (see the module docstring)."""
    import datasets
    from trl import pack_dataset

    real = sum(lengths)
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()  # the Trainer's shuffle
    shuffled = [lengths[i] for i in order]
    per_batch = sum(len(b) * max(b) for b in (shuffled[i : i + BATCH] for i in range(0, len(shuffled), BATCH)))
    # bfd packing exactly as SFTTrainer runs it (datasets.map, batches of 1,000 conversations)
    ds = datasets.Dataset.from_dict({"input_ids": [[0] * n for n in lengths]})
    packed = pack_dataset(ds, SEQ, "bfd")
    rows = [sum(s) for s in packed["seq_lengths"]]
    assert sum(rows) == real  # bfd never truncates here: every conversation fits in a row
    return {
        "pad_every_row_to_2048": real / (len(lengths) * SEQ),
        f"padded_per_batch_of_{BATCH}": real / per_batch,
        "bfd_packed_padding_free": real / sum(rows),  # no pad tokens are processed
        "bfd_packed_row_fill": real / (len(rows) * SEQ),
        "packed_rows": len(rows),
        "conversations_per_row": len(lengths) / len(rows),
    }


def throughput(rows: list[list[int]], **sft_args) -> dict:
    """Real tokens/s of SFTTrainer steps over `rows` (pre-tokenized; labels = input_ids), one epoch,
    timed after the first step (lazy initialisation) from the tokens TRL itself counts."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    timer = StepTimer(skip=1)
    with tempfile.TemporaryDirectory() as out:
        args = timed_run_args(
            SFTConfig, out, bf16=False, activation_checkpointing=False, max_length=SEQ, num_train_epochs=1, **sft_args
        )
        trainer = SFTTrainer(
            model=tiny_model(),
            args=args,
            processing_class=build_tokenizer(),
            callbacks=[timer],
            train_dataset=datasets.Dataset.from_dict({"input_ids": rows}),
        )
        timer.trainer = trainer
        trainer.train()
    return timer.figures()


def modelled_compute(lengths: list[int], packed_rows: int) -> dict:
    """Training FLOPs per real token of the real 1.8B shape, relative to bfd packing with a varlen kernel:
    3 forwards' worth (forward + backward) of `common.forward_flops`, with the attention each batching runs."""

    c = model_config()
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = [lengths[i] for i in order]
    batches = [shuffled[i : i + BATCH] for i in range(0, len(shuffled), BATCH)]
    real = sum(lengths)

    def per_token(processed, **attention):
        return 3 * forward_flops(c, processed, **attention) / real

    padded = [max(b) for b in batches for _ in b]  # every row of a batch as wide as its longest
    flops = {
        "pad_every_row_to_2048": per_token(len(lengths) * SEQ, dense_rows=[SEQ] * len(lengths)),
        f"padded_per_batch_of_{BATCH}": per_token(sum(padded), dense_rows=padded),
        "bfd_packed_sdpa": per_token(real, dense_rows=[SEQ] * packed_rows),
        "bfd_packed_flash_attention_varlen": per_token(real, causal_sequences=lengths),
    }
    best = flops["bfd_packed_flash_attention_varlen"]
    return {"flops_per_real_token": flops, "relative_to_packed_varlen": {k: v / best for k, v in flops.items()}}


def main() -> None:
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    lengths = alpaca_lengths()
    eff = padding_efficiency(lengths)
    sample = random_token_rows(alpaca_lengths(256, seed=1), 384, seed=1)
    runs = {
        "bfd_packed": throughput(sample, packing=True, per_device_train_batch_size=1),
        f"padded_per_batch_of_{BATCH}": throughput(sample, per_device_train_batch_size=BATCH),
        "pad_to_2048": throughput(sample, per_device_train_batch_size=BATCH, pad_to_multiple_of=SEQ),
    }
    packed = runs["bfd_packed"]["real_tokens_per_s"]
    result = {
        "lengths": {
            "conversations": len(lengths),
            "real_tokens": sum(lengths),
            "mean": statistics.fmean(lengths),
            "median": statistics.median(lengths),
            "max": max(lengths),
        },
        "max_length": SEQ,
        "padding_efficiency": eff,
        "target_efficiency": TARGET,
        "target_met": eff["bfd_packed_row_fill"] >= TARGET,
        "throughput_tiny_model": {
            "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads, shared)",
            "attn_implementation": "sdpa",
            "sample_conversations": len(sample),
            "runs": runs,
            "packed_vs_padded_per_batch": packed / runs[f"padded_per_batch_of_{BATCH}"]["real_tokens_per_s"],
            "packed_vs_pad_to_2048": packed / runs["pad_to_2048"]["real_tokens_per_s"],
        },
        "modelled_compute_real_model": modelled_compute(lengths, eff["packed_rows"]),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    L = result["lengths"]
    print(
        f"{L['conversations']} Alpaca-shaped conversations: {L['real_tokens'] / 1e6:.2f}M tokens, "
        f"mean {L['mean']:.1f}, median {L['median']}, max {L['max']}"
    )
    print("padding efficiency (real tokens / processed tokens):")
    print(f"  padded to {SEQ} (fixed width)              {eff['pad_every_row_to_2048']:.3f}")
    print(f"  padded per batch of {BATCH} (TRL, no packing)  {eff[f'padded_per_batch_of_{BATCH}']:.3f}")
    print(f"  bfd packed, padding-free (TRL)            {eff['bfd_packed_padding_free']:.3f}")
    print(
        f"  bfd packed, row fill                      {eff['bfd_packed_row_fill']:.3f}  "
        f"({eff['packed_rows']} rows of {SEQ}, {eff['conversations_per_row']:.1f} conversations each)"
    )
    t = result["throughput_tiny_model"]
    print(f"SFT steps, tiny model, {t['device']}, {t['sample_conversations']} conversations:")
    for name, run in runs.items():
        print(
            f"  {name:<24} {run['real_tokens_per_s']:>8.0f} real tokens/s ({run['timed_steps']} steps, {run['seconds']:.1f} s)"
        )
    print(
        f"  packed / padded per batch {t['packed_vs_padded_per_batch']:.2f}x, packed / padded to {SEQ} "
        f"{t['packed_vs_pad_to_2048']:.1f}x"
    )
    print("modelled training FLOPs per real token, 1.8B shape, relative to packed + varlen attention:")
    for name, rel in result["modelled_compute_real_model"]["relative_to_packed_varlen"].items():
        print(f"  {name:<36} {rel:6.2f}")
    print(f"target row fill >= {TARGET}: {'met' if result['target_met'] else 'NOT met'}; wrote {RESULTS}")
    sys.exit(0 if result["target_met"] else 1)


if __name__ == "__main__":
    main()
