#!/usr/bin/env python
"""Every stage of the pipeline on the real model shape, on one CUDA GPU: what the production runs will cost.

    python benchmarks/gpu.py [--steps 10] [--output benchmarks/results/gpu.json]     # ~4-6 min, at most 10

A randomly initialised LlamaForCausalLM of the converted Qwen3-1.8B's shape (24 layers, hidden
2048, 16 heads MHA, d_ff 5461, vocab 151,669, rope_theta 1e6, untied: 1,829,246,976
parameters), run by the same trainers and settings as the recipes, one after the other:

- SFT (TRL's SFTTrainer as recipes/sft.yaml trains: fp32 weights, bf16 autocast, bfd packing
  into rows of 2048 run padding-free, activation checkpointing, AdamW) on Alpaca-shaped
  conversations: real tokens/s, model FLOPs utilisation, peak memory; with sdpa, and with
  flash_attention_2 when flash-attn is installed.
- DPO (posttrain's DPO trainer, i.e. TRL's DPOTrainer, as recipes/dpo.yaml: 2 pairs per step,
  max_length 2048) on UltraFeedback-shaped pairs (benchmarks/dpo_padding.py's assumption): pairs/s
  padded with a live bf16 reference, and with precomputed reference log-probs (training pairs/s and
  the reference pass's pairs/s); padding-free (`padding_free: true`, the recipe's) with a live
  reference, with sdpa and with flash_attention_2 when flash-attn is installed; the peak memory and
  the padding the policy really computed of each.
- On-policy pairs (posttrain/generate_pairs.py as recipes/generate_pairs.yaml): sampling through
  posttrain's generate_batch (bf16, 16 prompts x 5 samples per call, temperature 0.8): decoded
  tokens/s (a random model rarely stops, so every sequence decodes the whole budget: the rate of
  decoded slots the recipe's arithmetic counts); and reward scoring (a one-score
  LlamaForSequenceClassification of the same shape, bf16, posttrain's reward_scores on ~450-token
  conversations, 32 per forward): rows/s.
- Evaluation: log-likelihood requests/s of lm-evaluation-harness's HFLM (bf16, batch 32, as the
  evaluation's lm-eval scoring) on ARC-shaped requests, peak memory; and its greedy generation as
  IFEval's replies are generated (a batch of 64 IFEval-length prompts, no stop string, 1280-token
  replies): decoding steps/s and decoded tokens/s, and recipes/evaluate.yaml's generation minutes on 8
  GPUs at that rate. Skipped if lm-eval is absent.
- What those rates mean for the production recipes on 8 GPUs (benchmarks/recipe_figures.py's
  updates and batch; linear data-parallel scaling plus a modelled per-update synchronisation).

MFU counts 6 x (matmul parameters) FLOPs per trained token (forward 2, backward 4; not the
attention scores, not activation checkpointing's recomputation), over the GPU's dense bf16 peak.
One GPU holds the whole model and optimizer (no ZeRO): peak memory is an upper bound on a GPU's
share under ZeRO-2. Writes benchmarks/results/gpu.json. Needs a CUDA GPU; `--smoke` runs a tiny
shape on CPU to check the script itself.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from common import (
    DPO_TRAIN_PAIRS,
    EVAL_BATCH,
    PEAK_TFLOPS,
    RECIPES,
    SYNC_S,
    StepTimer,
    computed_figures,
    model_config,
    param_count,
    preference_dataset,
    sampling_figures,
    timed_run_args,
    train_flops_per_token,
    train_metered,
    ultrafeedback_lengths,
)

BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "results" / "gpu.json"
GPUS = 8
SEQ = 2048  # max_length of both recipes
# ARC-Easy (2,376 test questions), ARC-Challenge (1,172), OpenBookQA (500): ~4 choices, one request each
EVAL_REQUESTS = 4 * (2_376 + 1_172 + 500)


# --------------------------------------------------------------------------- arithmetic (tested on CPU)


def peak_tflops(device_name: str) -> float | None:
    name = device_name.upper()
    matches = [k for k in PEAK_TFLOPS if k in name]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the model FLOPs done per second over the peak."""
    return flops_per_token * tokens_per_s / peak_flops


def sft_wall_time_s(
    updates: int, tokens_per_update: float, tokens_per_s_per_gpu: float, gpus: int = GPUS, sync_s: float = SYNC_S
) -> float:
    """Seconds of optimizer updates: each update's tokens shared by the GPUs, plus its synchronisation."""
    return updates * (tokens_per_update / (gpus * tokens_per_s_per_gpu) + sync_s)


def dpo_wall_time_s(
    pairs: int,
    updates: int,
    pairs_per_s_per_gpu: float,
    reference_pairs_per_s_per_gpu: float | None = None,
    gpus: int = GPUS,
    sync_s: float = SYNC_S,
) -> float:
    """Seconds of DPO training, plus the reference pass when its log-probs are precomputed."""
    train = pairs / (gpus * pairs_per_s_per_gpu) + updates * sync_s
    return train + (pairs / (gpus * reference_pairs_per_s_per_gpu) if reference_pairs_per_s_per_gpu else 0.0)


# --------------------------------------------------------------------------- measurements


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per training measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels)")
    p.add_argument("--eval-requests", type=int, default=2048, help="log-likelihood requests timed")
    p.add_argument(
        "--sample-tokens", type=int, default=256, help="new tokens per sequence in the sampling measurement"
    )
    p.add_argument("--score-rows", type=int, default=512, help="conversations scored by the reward model")
    p.add_argument(
        "--gen-tokens", type=int, default=1280, help="reply limit of the evaluation's generation measurement"
    )
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this GPU (default: from a table by name)")
    p.add_argument("--smoke", action="store_true", help="a tiny shape on CPU: checks the script, measures nothing")
    p.add_argument("--output", type=Path, default=RESULTS)
    return p.parse_args(argv)


class Device:
    """Where the measurements run: the GPU, or the CPU for --smoke."""

    def __init__(self, smoke: bool):
        import torch

        self.torch, self.cuda = torch, not smoke
        self.dtype = "bfloat16" if self.cuda else "float32"  # of the inference measurements (bf16 is slow on a CPU)
        self.name = torch.cuda.get_device_name() if self.cuda else "cpu (smoke test)"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def model(self, config, dtype: str, attn: str = "sdpa", seed: int = 0):
        from transformers import LlamaForCausalLM

        self.torch.manual_seed(seed)
        with self.torch.device("cuda" if self.cuda else "cpu"):
            return LlamaForCausalLM._from_config(config, dtype=getattr(self.torch, dtype), attn_implementation=attn)


def trainer_args(config_cls, out: str, device: Device, steps: int, **kwargs):
    return timed_run_args(
        config_cls,
        out,
        bf16=device.cuda,
        use_cpu=not device.cuda,
        max_length=SEQ if device.cuda else 64,
        gradient_accumulation_steps=1,
        max_steps=steps,
        activation_checkpointing=True,
        learning_rate=1e-6,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        **kwargs,
    )


def measure_sft(config, device: Device, attn: str, args) -> dict:
    import datasets
    from trl import SFTConfig, SFTTrainer

    from posttrain.demo.fixtures import alpaca_lengths, build_tokenizer, random_token_rows

    device.reset()
    steps = args.warmup + args.steps
    seq = SEQ if device.cuda else 64
    lengths = [min(n, seq) for n in alpaca_lengths(n=math.ceil(steps * seq * 1.2 / 100), seed=0)]
    timer = StepTimer(skip=args.warmup, sync=device.sync)
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(
            model=device.model(config, "float32", attn),
            args=trainer_args(
                SFTConfig, out, device, steps, packing=True, packing_strategy="bfd", per_device_train_batch_size=1
            ),
            processing_class=build_tokenizer(),
            callbacks=[timer],
            train_dataset=datasets.Dataset.from_dict({"input_ids": random_token_rows(lengths, 384)}),
        )
        timer.trainer = trainer
        trainer.train()
    del trainer
    tokens_per_s = timer.tokens / timer.seconds
    return {
        "attn_implementation": attn,
        "seconds_per_step": timer.seconds / timer.steps,
        "real_tokens_per_step": timer.tokens / timer.steps,
        "real_tokens_per_s": tokens_per_s,
        "peak_memory_gib": device.peak_gib(),
    }


def measure_dpo(
    config, device: Device, precompute: bool, args, padding_free: bool = False, attn: str = "sdpa"
) -> dict:

    from posttrain.demo.fixtures import build_tokenizer
    from posttrain.dpo import DPOConfig, PreferenceTrainer

    class TimedTrainer(PreferenceTrainer):
        reference_seconds = 0.0

        def _precompute_ref_logps(self, dataset, name, batch_size):
            device.sync()
            t0 = time.perf_counter()
            dataset = super()._precompute_ref_logps(dataset, name, batch_size)
            device.sync()
            TimedTrainer.reference_seconds += time.perf_counter() - t0
            return dataset

    device.reset()
    steps, pairs_per_step = args.warmup + args.steps, 2
    scale = 1 if device.cuda else 32
    pairs = [tuple(max(n // scale, 2) for n in pair) for pair in ultrafeedback_lengths(steps * pairs_per_step)]
    tokenizer = build_tokenizer()
    timer = StepTimer(skip=args.warmup, sync=device.sync)
    policy = device.model(config, "float32", attn)
    reference = None if precompute else device.model(config, "bfloat16", attn)  # the frozen bf16 replica of ZeRO-2
    if reference is not None:
        reference.load_state_dict(policy.state_dict())
    with tempfile.TemporaryDirectory() as out:
        trainer, meter = train_metered(
            TimedTrainer,
            timer,
            model=policy,
            ref_model=reference,
            args=trainer_args(
                DPOConfig,
                out,
                device,
                steps,
                per_device_train_batch_size=pairs_per_step,
                precompute_ref_log_probs=precompute,
                precompute_ref_batch_size=8,
                padding_free=padding_free,
            ),
            processing_class=tokenizer,
            train_dataset=preference_dataset(pairs, tokenizer),
        )
    del trainer, policy, reference
    result = {
        "reference": "precomputed" if precompute else "live (bf16)",
        "padding_free": padding_free,
        "attn_implementation": attn,
        "padding_fraction": meter.fraction(),
        "seconds_per_step": timer.seconds / timer.steps,
        "pairs_per_s": timer.steps * pairs_per_step / timer.seconds,
        "real_tokens_per_s": timer.tokens / timer.seconds,
        "peak_memory_gib": device.peak_gib(),
    }
    if precompute:
        result["reference_pass_pairs_per_s"] = len(pairs) / TimedTrainer.reference_seconds
    return result


def measure_eval(config, device: Device, args) -> dict | None:
    if importlib.util.find_spec("lm_eval") is None:
        return None
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from posttrain.demo.fixtures import build_tokenizer

    device.reset()
    gen = torch.Generator().manual_seed(0)
    n = args.eval_requests if device.cuda else 16
    # ARC-shaped: a question of ~60 tokens (log-normal), answers of ~8
    context = (math.log(60) + 0.5 * torch.randn(n, generator=gen)).exp().round().clamp(5, 500).long().tolist()
    answer = (math.log(8) + 0.6 * torch.randn(n, generator=gen)).exp().round().clamp(1, 64).long().tolist()
    requests = [
        Instance("loglikelihood", doc={}, arguments=("Question:" + " the" * c + "\nAnswer:", " the" * a), idx=i)
        for i, (c, a) in enumerate(zip(context, answer))
    ]
    lm = HFLM(
        pretrained=device.model(config, "bfloat16"),
        tokenizer=build_tokenizer(),
        batch_size=32,
        device="cuda" if device.cuda else "cpu",
    )
    lm.loglikelihood(requests[:64], disable_tqdm=True)  # warm-up
    device.sync()
    t0 = time.perf_counter()
    lm.loglikelihood(requests, disable_tqdm=True)
    device.sync()
    seconds = time.perf_counter() - t0
    del lm
    return {"requests": n, "batch_size": 32, "requests_per_s": n / seconds, "peak_memory_gib": device.peak_gib()}


def measure_generation(config, device: Device, args) -> dict | None:
    """Greedy replies through lm-evaluation-harness's HFLM, as evaluate.py generates IFEval's: one batch of
    EVAL_BATCH prompts of IFEval's length (~60 tokens, log-normal), no stop string and a reply limit of
    --gen-tokens (IFEval's 1280). A random model does not stop, so every reply runs to the limit: the call's
    decoding steps are the limit, the unit of the evaluation recipe's arithmetic. Skipped without lm-eval."""
    if importlib.util.find_spec("lm_eval") is None:
        return None
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from posttrain.demo.fixtures import build_tokenizer

    device.reset()
    gen = torch.Generator().manual_seed(0)
    n, tokens = (EVAL_BATCH, args.gen_tokens) if device.cuda else (4, 8)
    lengths = (math.log(60) + 0.5 * torch.randn(n, generator=gen)).exp().round().clamp(5, 400).long().tolist()

    def requests(limit: int) -> list:
        kwargs = {"until": [], "max_gen_toks": limit, "do_sample": False}
        return [
            Instance("generate_until", doc={}, arguments=("Write" + " the" * k, kwargs), idx=i)
            for i, k in enumerate(lengths)
        ]

    lm = HFLM(
        pretrained=device.model(config, device.dtype).eval(),
        tokenizer=build_tokenizer(),
        batch_size=n,
        device="cuda" if device.cuda else "cpu",
    )
    lm.generate_until(requests(4), disable_tqdm=True)  # warm-up
    device.sync()
    t0 = time.perf_counter()
    lm.generate_until(requests(tokens), disable_tqdm=True)
    device.sync()
    seconds = time.perf_counter() - t0
    del lm
    return {
        "batch": n,
        "reply_limit_tokens": tokens,
        "decoding_steps_per_s": tokens / seconds,
        "decoded_tokens_per_s": n * tokens / seconds,
        "peak_memory_gib": device.peak_gib(),
    }


def evaluation_minutes(generation: dict, gpus: int = GPUS) -> dict:
    """recipes/evaluate.yaml's generation on 8 GPUs at the measured decoding rate (its decoding steps per GPU)."""
    figures = computed_figures("evaluate")
    return {
        "decoding_steps_per_gpu": figures["decoding steps per gpu"],
        "generation_minutes_upper_bound": figures["decoding steps per gpu"] / generation["decoding_steps_per_s"] / 60,
    }


def on_policy_prompts(n: int, seed: int = 0, scale: int = 1) -> list[list[dict]]:
    """n one-turn conversations of UltraFeedback-shaped prompt lengths (log-normal, median 110 tokens; divided by
    `scale` for --smoke), as words that are one token each in the fixture tokenizer."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    lengths = (math.log(110) + 0.9 * torch.randn(n, generator=gen)).exp().round().clamp(10, 1000).long() // scale
    return [[{"role": "user", "content": "the" + " the" * (k - 1)}] for k in lengths.clamp(min=1).tolist()]


def chat_tokenizer():
    from posttrain.conversion.chat_template import install_chat_template
    from posttrain.demo.fixtures import build_tokenizer

    tokenizer = build_tokenizer()
    install_chat_template(tokenizer)
    return tokenizer


def measure_sampling(config, device: Device, args) -> dict:
    """Decoded tokens/s of generate_batch at generate_pairs.yaml's batch (16 prompts x 5 samples per call)."""
    import yaml

    from posttrain.generation.generate import generate_batch

    recipe = yaml.safe_load(RECIPES["generate_pairs"].read_text())
    prompts_per_call, samples = recipe["generation_batch_size"], recipe["num_samples"]
    device.reset()
    tokenizer, model = chat_tokenizer(), device.model(config, device.dtype).eval()
    new_tokens = args.sample_tokens if device.cuda else 8
    prompts = on_policy_prompts(2 * prompts_per_call) if device.cuda else on_policy_prompts(4, scale=16)
    kwargs = dict(do_sample=True, temperature=recipe["temperature"], num_return_sequences=samples, seed=0)
    generate_batch(
        model, tokenizer, prompts[:prompts_per_call], max_new_tokens=4, batch_size=prompts_per_call, **kwargs
    )
    device.sync()
    t0 = time.perf_counter()
    replies = generate_batch(
        model, tokenizer, prompts, max_new_tokens=new_tokens, batch_size=prompts_per_call, **kwargs
    )
    device.sync()
    seconds = time.perf_counter() - t0
    decoded = sum(len(ids) for per_prompt in replies for ids, _ in per_prompt)
    del model
    return {
        "sequences_per_call": prompts_per_call * samples,
        "new_tokens_per_sequence": new_tokens,
        "decoded_tokens_per_s": decoded / seconds,
        "peak_memory_gib": device.peak_gib(),
    }


def measure_scoring(config, device: Device, args) -> dict:
    """Rows/s of reward_scores: a one-score classifier of the model's shape on prompt + reply conversations."""
    from transformers import LlamaForSequenceClassification

    from posttrain.generation.pairs import reward_scores

    device.reset()
    tokenizer = chat_tokenizer()
    fields = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    scorer_config = type(config).from_dict({**fields, "num_labels": 1, "pad_token_id": tokenizer.pad_token_id})
    with device.torch.device("cuda" if device.cuda else "cpu"):
        model = LlamaForSequenceClassification._from_config(scorer_config, dtype=getattr(device.torch, device.dtype))
    model.eval()
    rows, scale = (args.score_rows, 1) if device.cuda else (8, 16)
    replies = on_policy_prompts(rows, seed=1, scale=scale)  # x 3: replies of ~300 tokens, conversations of ~450
    conversations = [
        prompt + [{"role": "assistant", "content": " ".join([reply[0]["content"]] * 3)}]
        for prompt, reply in zip(on_policy_prompts(rows, scale=scale), replies)
    ]
    batch = 32 if device.cuda else 4
    reward_scores(model, tokenizer, conversations[:batch], batch)  # warm-up
    device.sync()
    t0 = time.perf_counter()
    reward_scores(model, tokenizer, conversations, batch)
    device.sync()
    seconds = time.perf_counter() - t0
    del model
    return {"rows": rows, "batch_size": batch, "rows_per_s": rows / seconds, "peak_memory_gib": device.peak_gib()}


def on_policy_minutes(sampling: dict, scoring: dict, gpus: int = GPUS) -> dict:
    """recipes/generate_pairs.yaml on 8 GPUs at the measured rates (its decoded slots and samples)."""
    import yaml

    figures = sampling_figures(yaml.safe_load(RECIPES["generate_pairs"].read_text()), gpus)
    return {
        "sampling_minutes": figures["decoded slots"] / (gpus * sampling["decoded_tokens_per_s"]) / 60,
        "scoring_minutes": figures["samples"] / (gpus * scoring["rows_per_s"]) / 60,
    }


def implied_wall_times(sft_tokens_per_s: float, dpo: dict, eval_rps: float | None) -> dict:
    """The production recipes on 8 GPUs at the measured rates (one GPU's rate x 8)."""

    sft, dpo_figures = computed_figures("sft"), computed_figures("dpo")
    live, pre = dpo["live"], dpo["precomputed"]
    padding_free = max(
        (run for name, run in dpo.items() if name.startswith("live_padding_free_")),
        key=lambda run: run["pairs_per_s"],
        default=None,
    )
    return {
        "gpus": GPUS,
        "sync_s_per_update_modelled": SYNC_S,
        "sft_3_epochs_s": sft_wall_time_s(sft["updates in all"], sft["real tokens per update"], sft_tokens_per_s),
        "dpo_1_epoch_live_reference_s": dpo_wall_time_s(
            DPO_TRAIN_PAIRS, dpo_figures["updates in all"], live["pairs_per_s"]
        ),
        "dpo_1_epoch_precomputed_reference_s": dpo_wall_time_s(
            DPO_TRAIN_PAIRS, dpo_figures["updates in all"], pre["pairs_per_s"], pre["reference_pass_pairs_per_s"]
        ),
        # the recipe's setting, at the faster of its attention implementations
        "dpo_1_epoch_live_reference_padding_free_s": dpo_wall_time_s(
            DPO_TRAIN_PAIRS, dpo_figures["updates in all"], padding_free["pairs_per_s"]
        )
        if padding_free
        else None,
        "eval_arc_obqa_one_gpu_s": EVAL_REQUESTS / eval_rps if eval_rps else None,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(BENCHMARKS))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    import torch
    import transformers

    if not args.smoke and not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU (--smoke checks the script on CPU)", file=sys.stderr)
        raise SystemExit(2)
    datasets.utils.logging.disable_progress_bar()
    device = Device(args.smoke)
    config = model_config() if device.cuda else model_config(**TINY)
    peak = args.peak_tflops or peak_tflops(device.name)
    start = time.perf_counter()

    attns = ["sdpa"] + (["flash_attention_2"] if device.cuda and importlib.util.find_spec("flash_attn") else [])
    sft = {attn: measure_sft(config, device, attn, args) for attn in attns}
    for run in sft.values():
        run["mfu"] = mfu(run["real_tokens_per_s"], train_flops_per_token(config), peak * 1e12) if peak else None
    dpo = {name: measure_dpo(config, device, name == "precomputed", args) for name in ("live", "precomputed")}
    for attn in attns:
        dpo[f"live_padding_free_{attn}"] = measure_dpo(config, device, False, args, padding_free=True, attn=attn)
    evaluation = measure_eval(config, device, args)
    generation = measure_generation(config, device, args)
    sampling, scoring = measure_sampling(config, device, args), measure_scoring(config, device, args)
    best_sft = max(run["real_tokens_per_s"] for run in sft.values())
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": device.name,
        "parameters": param_count(config),
        "train_flops_per_token": train_flops_per_token(config),
        "peak_bf16_tflops": peak,
        "sft": sft,
        "dpo": dpo,
        "eval_loglikelihood": evaluation or "not measured: lm-eval is not installed",
        "implied_wall_time_8_gpus": implied_wall_times(
            best_sft, dpo, evaluation["requests_per_s"] if evaluation else None
        ),
        "eval_generation": generation or "not measured: lm-eval is not installed",
        "implied_evaluation_8_gpus": evaluation_minutes(generation) if generation else None,
        "on_policy_sampling": sampling,
        "reward_scoring": scoring,
        "implied_on_policy_pairs_8_gpus": on_policy_minutes(sampling, scoring),
        "benchmark_seconds": time.perf_counter() - start,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


TINY = dict(vocab_size=400, n_embd=64, d_ff=170, n_layer=2, n_head=4, num_key_value_heads=4)  # model_args

if __name__ == "__main__":
    main()
