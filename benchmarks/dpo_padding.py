#!/usr/bin/env python
"""How much of DPO's compute is padding: random and length-grouped micro-batches, and padding-free.

    python benchmarks/dpo_padding.py      # prints, and writes benchmarks/results/dpo_padding.json

TRL 1.16's DPOTrainer pads the chosen and rejected sequences of every pair in a micro-batch to
the longest of them (its own padding-free mode is disabled); with `padding_free: true` posttrain
runs them as one row of real tokens (posttrain/training/padding_free.py). This measures the
padding fraction (pad tokens / processed tokens) of the production recipe's micro-batches (2
pairs per GPU, 8 accumulation, 8 GPUs, max_length 2048), on preference-pair lengths shaped like
UltraFeedback's:

1. Padding fraction over a full epoch of 57,871 pairs (the recipe's train split), batched by
   transformers' own samplers, as the Trainer builds them: random (`RandomSampler`'s
   permutation) and `group_by_length` (`get_length_grouped_indices` with the recipe's batch of
   2 x 8, megabatches of 50 x 16 pairs) on the pair length `posttrain.dpo_batching.pair_length`,
   each padded as TRL's collator pads; and padding-free (the random batches as one row each).
   The floor no padded batching can remove (each pair alone: chosen padded to rejected or back)
   is given too, and how all of them move with the assumed chosen/rejected length correlation.
2. Real tokens/s of DPO steps of the tiny model (2 layers, hidden 96, sdpa, CPU; policy and
   live reference) through posttrain's DPO trainer (TRL's DPOTrainer), the three batchings on
   the same 96-pair sample in one run, its lengths and max_length divided by 4 to fit this CPU;
   the padding recorded is what the policy's transformer body was really given.
3. The real 1.8B shape: modelled FLOPs per real token of each batching over the epoch (policy
   forward and backward plus the reference forward, `common.forward_flops`), with sdpa's
   masked attention and, padding-free, with flash-attention's varlen kernel; and the modelled
   wall time of the recipe's epoch on 8 B200s at that (40% of peak, recomputation included).

The lengths are an assumption, not a measurement (the Hub is unreachable here). Token counts of
argilla/ultrafeedback-binarized-preferences-cleaned in the Qwen tokenizer are modelled as
log-normal: the prompt (rendered with the system prompt and ChatML scaffolding) median 110,
sigma 0.9 (mean ~165: mostly short questions, a tail of pasted documents); the responses median
230 (chosen) and 190 (rejected), sigma 0.75 (means ~305 and ~250: chosen answers run longer, the
length bias reported for UltraFeedback), their log-lengths correlated 0.3 (different models
answer the same prompt). `--data DIR --tokenizer DIR` measures a prepared data_scripts
directory instead (e.g. data/dpo_ultrafeedback with runs/converted).
"""

from __future__ import annotations

import argparse
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
from common import (  # noqa: E402
    CHOSEN,
    CORRELATION,
    PEAK_TFLOPS,
    PROMPT,
    REJECTED,
    RESPONSE_SIGMA,
    SYNC_S,
    StepTimer,
    computed_figures,
    forward_flops,
    gpus,
    model_config,
    preference_dataset,
    timed_run_args,
    tiny_model,
    train_metered,
    ultrafeedback_lengths,
)

from posttrain.training.dpo_batching import pair_length  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "dpo_padding.json"
GOAL = 0.05  # padding fraction padding-free: only what a kernel would need
MAX_LENGTH = 2048
PAIRS_PER_GPU, ACCUMULATION = 2, 8  # recipes/dpo.yaml
SAMPLE_PAIRS = 96  # for the CPU throughput runs ...
CPU_SCALE = 4  # ... whose lengths (and max_length) are divided by 4: a masked 4 x 1,300-token step of the
# tiny model takes ~5 s on this shared CPU; padding fractions do not depend on the scale


PADDING_FREE = "padding_free"  # the results' key for `padding_free: true` (random batches, one row each)
# Modelled hardware for the wall time: B200s at 40% of their dense bf16 peak on all the FLOPs they run.
GPU, UTILISATION = "B200", 0.4
# Forward passes' worth of model FLOPs per DPO step: the policy's forward and backward (3) and the reference's
# forward (1); with activation checkpointing (the recipe) the policy's forward runs twice.
MODEL_FORWARDS, RUN_FORWARDS = 4, 5


def micro_batches(pairs, order: list[int], pairs_per_batch: int, max_length: int = MAX_LENGTH) -> list[list[int]]:
    """The real lengths of each micro-batch's rows, as TRL's DataCollatorForPreference builds them: 2 rows
    per pair (prompt + chosen, prompt + rejected, each cut at max_length)."""
    batches = []
    for i in range(0, len(order), pairs_per_batch):
        batch = [pairs[j] for j in order[i : i + pairs_per_batch]]
        batches.append([min(p + c, max_length) for p, c, _ in batch] + [min(p + r, max_length) for p, _, r in batch])
    return batches


def padding_fraction(pairs, order: list[int], pairs_per_batch: int, packed: bool = False) -> float:
    """Pad tokens / processed tokens of micro-batches of `pairs_per_batch` taken in `order`: every row padded
    to the longest of its micro-batch, or (`packed`) the micro-batch run as one row of its real tokens."""
    batches = micro_batches(pairs, order, pairs_per_batch)
    real = sum(map(sum, batches))
    processed = real if packed else sum(len(rows) * max(rows) for rows in batches)
    return 1 - real / processed


def batch_orders(pairs, seed: int = 0) -> dict[str, list[int]]:
    """The Trainer's sampler orders for one epoch: random, and group_by_length on the pair length."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = [pair_length(range(p), range(c), range(r), MAX_LENGTH) for p, c, r in pairs]
    gen = torch.Generator().manual_seed(seed)
    return {
        "random": torch.randperm(len(pairs), generator=gen).tolist(),
        "group_by_length": get_length_grouped_indices(lengths, PAIRS_PER_GPU * ACCUMULATION, generator=gen),
    }


def padding(pairs) -> dict:
    orders = batch_orders(pairs)
    result = {name: padding_fraction(pairs, order, PAIRS_PER_GPU) for name, order in orders.items()}
    result[PADDING_FREE] = padding_fraction(pairs, orders["random"], PAIRS_PER_GPU, packed=True)
    result["within_pairs_floor"] = padding_fraction(pairs, list(range(len(pairs))), 1)
    result["reduction"] = result["random"] / result["group_by_length"]
    return result


def modelled_compute(pairs) -> dict:
    """The real 1.8B shape over the epoch: model FLOPs per real token of each batching, relative to
    padding-free with a varlen kernel, and the recipe's modelled wall time on 8 GPUs."""
    c = model_config()
    orders = batch_orders(pairs)
    padded = {name: micro_batches(pairs, order, PAIRS_PER_GPU) for name, order in orders.items()}
    packed = padded["random"]
    real = sum(map(sum, packed))

    def padded_rows(batches):  # every row as wide as its micro-batch's longest, under sdpa's mask
        return [max(rows) for rows in batches for _ in rows]

    forward = {
        f"{name}_padded_sdpa": forward_flops(c, sum(padded_rows(b)), dense_rows=padded_rows(b))
        for name, b in padded.items()
    }
    forward[f"{PADDING_FREE}_sdpa"] = forward_flops(c, real, dense_rows=[sum(rows) for rows in packed])
    forward[f"{PADDING_FREE}_flash_attention_varlen"] = forward_flops(
        c, real, causal_sequences=[n for rows in packed for n in rows]
    )
    per_token = {name: MODEL_FORWARDS * f / real for name, f in forward.items()}
    best = per_token[f"{PADDING_FREE}_flash_attention_varlen"]
    updates, n = computed_figures("dpo")["updates in all"], gpus()
    flops_per_s = n * UTILISATION * PEAK_TFLOPS[GPU] * 1e12
    return {
        "flops_per_real_token": per_token,
        "relative_to_padding_free_varlen": {name: v / best for name, v in per_token.items()},
        "wall_time_1_epoch_s": {
            name: RUN_FORWARDS * f / flops_per_s + updates * SYNC_S for name, f in forward.items()
        },
        "wall_time_assumption": f"{n} x {GPU} at {UTILISATION:.0%} of {PEAK_TFLOPS[GPU]} TFLOP/s (dense bf16) on "
        f"{RUN_FORWARDS} forwards' worth per step (activation checkpointing), plus {updates} updates x {SYNC_S} s sync",
    }


def tiny_dpo_throughput(pairs, strategy: str, padding_free: bool = False) -> dict:
    """Real tokens/s of DPO steps (tiny model, CPU, live reference) over `pairs` in one epoch, timed after
    the first step; also the padding fraction of what the policy's transformer body was given."""

    from posttrain.demo.fixtures import build_tokenizer
    from posttrain.dpo import DPOConfig, PreferenceTrainer

    tokenizer = build_tokenizer()
    timer = StepTimer(skip=1)
    with tempfile.TemporaryDirectory() as out:
        args = timed_run_args(
            DPOConfig,
            out,
            per_device_train_batch_size=PAIRS_PER_GPU,
            gradient_accumulation_steps=1,
            max_length=MAX_LENGTH // CPU_SCALE,
            train_sampling_strategy=strategy,
            padding_free=padding_free,
            num_train_epochs=1,
            learning_rate=1e-5,
            use_cpu=True,
        )
        _, meter = train_metered(
            PreferenceTrainer,
            timer,
            model=tiny_model(),
            ref_model=tiny_model(),  # the same seeded weights: a live reference, as the recipe
            args=args,
            processing_class=tokenizer,
            train_dataset=preference_dataset(pairs, tokenizer),
        )
    return {**timer.figures(), "padding_fraction_observed": meter.fraction()}


def prepared_lengths(data_dir: str, tokenizer_dir: str):
    """(prompt, chosen, rejected) token counts of a data_scripts preference directory's train.jsonl."""
    from posttrain.conversion.tokenizer import load_chat_tokenizer

    tok = load_chat_tokenizer(tokenizer_dir)
    rows = [json.loads(line) for line in open(Path(data_dir) / "train.jsonl", encoding="utf-8")]

    def n(conversations, **kw):
        texts = tok.apply_chat_template(conversations, tokenize=False, **kw)
        return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]

    prompt = n([r["prompt"] for r in rows], add_generation_prompt=True)
    chosen = n([r["prompt"] + r["chosen"] for r in rows])
    rejected = n([r["prompt"] + r["rejected"] for r in rows])
    return [(p, c - p, r - p) for p, c, r in zip(prompt, chosen, rejected)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="a data_scripts preference directory to measure instead of the assumed shape")
    p.add_argument("--tokenizer", help="with --data: the tokenizer directory (e.g. runs/converted)")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    # One thread: on a shared 2-core machine OpenMP's second thread spins waiting for a descheduled
    # partner, and a small matmul takes 15x longer than on one thread. The ratio of the two runs is the result.
    torch.set_num_threads(1)
    if args.data:
        pairs, source = prepared_lengths(args.data, args.tokenizer), f"measured: {args.data}/train.jsonl"
        sensitivity = None
    else:
        pairs, source = ultrafeedback_lengths(), "assumed log-normal UltraFeedback shape (see the docstring)"
        sensitivity = {str(rho): padding(ultrafeedback_lengths(correlation=rho)) for rho in (0.0, 0.3, 0.6)}
    pad = padding(pairs)
    picked = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(1))[:SAMPLE_PAIRS].tolist()
    sample = [tuple(max(n // CPU_SCALE, 2) for n in pairs[i]) for i in picked]
    runs = {strategy: tiny_dpo_throughput(sample, strategy) for strategy in ("random", "group_by_length")}
    runs[PADDING_FREE] = tiny_dpo_throughput(sample, "random", padding_free=True)
    prompt, chosen, rejected = zip(*pairs)
    result = {
        "lengths": {
            "source": source,
            "pairs": len(pairs),
            "assumption": None
            if args.data
            else {
                "prompt_lognormal_median_sigma": PROMPT,
                "chosen_lognormal_median_sigma": (CHOSEN, RESPONSE_SIGMA),
                "rejected_lognormal_median_sigma": (REJECTED, RESPONSE_SIGMA),
                "chosen_rejected_log_correlation": CORRELATION,
            },
            "mean_prompt": statistics.fmean(prompt),
            "mean_chosen": statistics.fmean(chosen),
            "mean_rejected": statistics.fmean(rejected),
            "over_max_length": sum(p + max(c, r) > MAX_LENGTH for p, c, r in pairs),
        },
        "batch": {"pairs_per_gpu": PAIRS_PER_GPU, "accumulation": ACCUMULATION, "max_length": MAX_LENGTH},
        "padding_fraction": pad,
        "padding_fraction_by_correlation": sensitivity,
        "throughput_tiny_model": {
            "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads, shared)",
            "sample_pairs": SAMPLE_PAIRS,
            "sample_lengths_and_max_length_divided_by": CPU_SCALE,
            "note": "one epoch over the sample with 1 accumulation: its megabatches hold "
            f"{min(SAMPLE_PAIRS // (4 * PAIRS_PER_GPU), 50) * PAIRS_PER_GPU} pairs, not the recipe's "
            f"{50 * PAIRS_PER_GPU * ACCUMULATION}, so the sample's grouped batches pad more than the full epoch's",
            "runs": runs,
            "group_by_length_vs_random": runs["group_by_length"]["real_tokens_per_s"]
            / runs["random"]["real_tokens_per_s"],
            f"{PADDING_FREE}_vs_random": runs[PADDING_FREE]["real_tokens_per_s"] / runs["random"]["real_tokens_per_s"],
        },
        "modelled_compute_real_model": modelled_compute(pairs),
        "padding_free_goal": {"padding_fraction_below": GOAL, "met": pad[PADDING_FREE] < GOAL},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")

    L = result["lengths"]
    print(
        f"{L['pairs']} pairs ({source}): mean prompt {L['mean_prompt']:.0f}, chosen {L['mean_chosen']:.0f}, "
        f"rejected {L['mean_rejected']:.0f} tokens"
    )
    print(f"padding fraction of DPO micro-batches ({PAIRS_PER_GPU} pairs, max_length {MAX_LENGTH}):")
    print(f"  random            {pad['random']:.3f}")
    print(f"  group_by_length   {pad['group_by_length']:.3f}  ({pad['reduction']:.2f}x less)")
    print(f"  padding-free      {pad[PADDING_FREE]:.3f}  (goal < {GOAL})")
    print(f"  floor of padded batches (each pair alone: chosen vs rejected) {pad['within_pairs_floor']:.3f}")
    for rho, s in (sensitivity or {}).items():
        print(
            f"  correlation {rho}: random {s['random']:.3f}, grouped {s['group_by_length']:.3f}, "
            f"padding-free {s[PADDING_FREE]:.3f}, floor {s['within_pairs_floor']:.3f}"
        )
    print(f"DPO steps, tiny model, {result['throughput_tiny_model']['device']}, {SAMPLE_PAIRS} pairs:")
    for name, run in runs.items():
        print(
            f"  {name:<16} {run['real_tokens_per_s']:>8.0f} real tokens/s, padding {run['padding_fraction_observed']:.3f} "
            f"({run['timed_steps']} steps, {run['seconds']:.1f} s)"
        )
    m = result["modelled_compute_real_model"]
    print(
        "1.8B shape, modelled: FLOPs per real token (x padding-free varlen) and the epoch on "
        + m["wall_time_assumption"]
    )
    for name, per_token in m["flops_per_real_token"].items():
        print(
            f"  {name:<36} {per_token:.3g} ({m['relative_to_padding_free_varlen'][name]:.2f}x)  "
            f"{m['wall_time_1_epoch_s'][name]:.0f} s"
        )
    print(f"wrote {args.output}")
    return 0 if result["padding_free_goal"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
