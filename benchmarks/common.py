"""What the benchmarks share: the real model's shape and FLOPs model, the tiny model, a step timer,
the synthetic data shapes, and the production recipes' batch arithmetic.

Every benchmark imports from here and from no other benchmark, so nothing imports in a circle.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from pathlib import Path

import torch
import yaml
from transformers import TrainerCallback

# ------------------------------------------------------------------ the real shape and its FLOPs


def model_config(**source_overrides):
    """The converted Qwen3-1.8B's LlamaConfig, as convert-checkpoint writes it; `source_overrides` change
    fields of the source model_args (the tests and --smoke: a tiny shape)."""
    from posttrain.conversion.source_format import llama_config
    from posttrain.demo.fixtures import QWEN3_1_8B_ARGS

    return llama_config({**QWEN3_1_8B_ARGS, **source_overrides}, "bfloat16")


SYNC_S = 0.015  # modelled per-update gradient reduce-scatter + weight all-gather + sharded Adam, ZeRO-2, NVLink
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


def param_count(c) -> int:
    """Parameters of a LlamaForCausalLM, from its config alone."""
    E, F, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    kv = c.num_key_value_heads * (E // c.num_attention_heads)
    layer = 2 * E * E + 2 * E * kv + 3 * E * F + 2 * E  # q, o; k, v; gate, up, down; two RMSNorms
    return V * E + L * layer + E + (0 if c.tie_word_embeddings else V * E)


def matmul_params(c) -> int:
    """The parameters a token is multiplied by: all but the input embedding (a lookup) and the norms."""
    return (
        param_count(c)
        - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)
        - (2 * c.num_hidden_layers + 1) * c.hidden_size
    )


def train_flops_per_token(c) -> float:
    return 6 * matmul_params(c)


def forward_flops(c, processed_tokens: int, dense_rows=(), causal_sequences=()) -> float:
    """Model FLOPs of one forward pass (a backward costs two): 2 x matmul parameters per processed token
    (padding included), plus the attention scores and their use (QK^T, AV) in every layer: 4 x T^2 x hidden
    for each row of T tokens run under an explicit mask (sdpa then computes every entry; a padded or a
    packed row), 2 x L^2 x hidden for each sequence of L under a causal varlen kernel (flash-attention
    computes only each sequence's own lower triangle)."""
    attention = 4 * sum(t * t for t in dense_rows) + 2 * sum(n * n for n in causal_sequences)
    return 2 * matmul_params(c) * processed_tokens + attention * c.hidden_size * c.num_hidden_layers


# ----------------------------------------------------------------------------- the tiny model

SEQ = 2048  # max_length of both production recipes


def tiny_model():
    """The tests' tiny model (posttrain.demo.fixtures), with room for rows of SEQ tokens."""
    from transformers import LlamaForCausalLM

    from posttrain.conversion.source_format import llama_config
    from posttrain.demo.fixtures import tiny_model_args

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(tiny_model_args(block_size=SEQ), "float32"))


# ----------------------------------------------------------------------------- timing steps

# What every timed run shares: no tracker, no checkpoint, no log line or progress bar inside the clock.
QUIET = dict(report_to="none", save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0)


def timed_run_args(config_cls, output_dir: str, **kwargs):
    """A TRL config (SFTConfig, DPOConfig) for a timed benchmark run: QUIET plus `kwargs`."""
    return config_cls(output_dir=output_dir, **{**QUIET, **kwargs})


class StepTimer(TrainerCallback):
    """A Trainer callback that times training steps after a warm-up.

        timer = StepTimer(skip=1); trainer = XTrainer(..., callbacks=[timer]); timer.trainer = trainer
        trainer.train(); timer.figures()  # steps, seconds, real tokens/s

    The first steps pay for lazy initialisation (kernels, allocator, the optimizer state), so the
    clock starts after `skip` of them. Tokens are the ones TRL's trainers count themselves
    (`_total_train_tokens`: the attention mask's ones, i.e. real tokens). On a GPU, `sync` (e.g.
    torch.cuda.synchronize) makes the clock wait for the queued kernels.
    """

    def __init__(self, skip: int = 1, sync=None):
        self.skip, self.sync, self.trainer = skip, sync or (lambda: None), None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.skip:
            self.sync()
            self.t0, self.tokens0 = time.perf_counter(), self.trainer._total_train_tokens

    def on_train_end(self, args, state, control, **kwargs):
        self.sync()
        self.seconds = time.perf_counter() - self.t0
        self.tokens = self.trainer._total_train_tokens - self.tokens0
        self.steps = state.global_step - self.skip
        self.trainer = None  # the trainer holds the model and optimizer: let them be freed

    def figures(self) -> dict:
        """What the benchmarks report of a timed run."""
        return {"timed_steps": self.steps, "seconds": self.seconds, "real_tokens_per_s": self.tokens / self.seconds}


class PaddingMeter:
    """The padding a trainer's model really computes: real tokens (the attention mask's ones in each batch
    the data collator builds) against the tokens the policy's transformer body is called with.

        meter = PaddingMeter(trainer); trainer.train(); meter.fraction()   # pad tokens / processed tokens

    Padded, the body gets the collator's (B, L) batch; padding-free, one row of its real tokens. Attach it
    after the trainer is built (a reference pass in its construction is not counted) and before training.
    """

    def __init__(self, trainer):
        self.real = self.processed = 0
        collate = trainer.data_collator

        def counting_collator(examples):
            batch = collate(examples)
            self.real += int(batch["attention_mask"].sum())
            return batch

        def count_body_tokens(module, args, kwargs):
            self.processed += kwargs["input_ids"].numel()

        trainer.data_collator = counting_collator
        trainer.model.model.register_forward_pre_hook(count_body_tokens, with_kwargs=True)

    def fraction(self) -> float:
        return 1 - self.real / self.processed


def train_metered(trainer_cls, timer: StepTimer, **kwargs) -> tuple:
    """(trainer, PaddingMeter) of `trainer_cls(callbacks=[timer], **kwargs)` trained: its steps timed, the padding
    its model really computed metered."""
    trainer = trainer_cls(callbacks=[timer], **kwargs)
    timer.trainer = trainer
    meter = PaddingMeter(trainer)
    trainer.train()
    return trainer, meter


# -------------------------------------------------------------------- synthetic data shapes

# Preference pairs shaped like UltraFeedback's in the Qwen tokenizer (an assumption: see dpo_padding.py).
PROMPT = (110, 0.9)  # log-normal (median, sigma) in tokens
CHOSEN, REJECTED, RESPONSE_SIGMA = 230, 190, 0.75
CORRELATION = 0.3  # of the chosen and rejected log-lengths


def ultrafeedback_lengths(n: int | None = None, correlation: float = CORRELATION, seed: int = 0):
    """(prompt, chosen, rejected) token counts under the assumption in the module docstring."""
    n = DPO_TRAIN_PAIRS if n is None else n
    gen = torch.Generator().manual_seed(seed)
    z_prompt, z_shared, z_chosen, z_rejected = torch.randn(4, n, generator=gen)

    def lognormal(median, sigma, z, floor):
        return (math.log(median) + sigma * z).exp().round().clamp(min=floor).long().tolist()

    a, b = math.sqrt(correlation), math.sqrt(1 - correlation)
    prompt = lognormal(*PROMPT, z_prompt, floor=30)  # the system prompt and scaffolding alone are ~30
    chosen = lognormal(CHOSEN, RESPONSE_SIGMA, a * z_shared + b * z_chosen, floor=2)
    rejected = lognormal(REJECTED, RESPONSE_SIGMA, a * z_shared + b * z_rejected, floor=2)
    return list(zip(prompt, chosen, rejected))


def preference_dataset(pairs, tokenizer):
    """Text rows TRL tokenizes to exactly the (prompt, chosen, rejected) token counts of `pairs`:
    a word that is one token in the fixture tokenizer, repeated (non-conversational rows; TRL
    appends eos to each response, hence one word fewer)."""
    import datasets

    word = " the"
    assert len(tokenizer(word * 7, add_special_tokens=False)["input_ids"]) == 7
    return datasets.Dataset.from_dict(
        {
            "prompt": [word * p for p, _, _ in pairs],
            "chosen": [word * (c - 1) for _, c, _ in pairs],
            "rejected": [word * (r - 1) for _, _, r in pairs],
        }
    )


WORDS = (
    "the a of to and in is for that with on as be by this it are from at or an can you your which have more "
    "data model water energy plant city write explain list describe give three example reason history story "
    "healthy food people time world number simple sentence paragraph answer question first second important"
).split()


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    """Alpaca-like lengths: instruction ~10 words, input on ~1/3 of rows ~12 words, output ~45 words."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, int(rng.expovariate(1 / k)) + 1)))

    rows = []
    for i in range(n):
        instruction = f"{words(10).capitalize()} (task {i})."
        extra = words(12) if rng.random() < 0.35 else ""
        output = words(45).capitalize() + "."
        rows.append(
            {"instruction": instruction, "input": extra, "output": output, "text": f"{instruction}\n{extra}\n{output}"}
        )
    return rows


# ------------------------------------------------------------- the recipes' batch arithmetic

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    stage: REPO / "recipes" / f"{stage}.yaml"
    for stage in ("sft", "dpo", "reward", "generate_pairs", "dpo_on_policy", "evaluate")
}
LAUNCH_CONFIG = REPO / "accelerate_configs" / "zero2.yaml"  # what both recipes' headers launch with
SFT_STATS = REPO / "benchmarks" / "results" / "sft_recipe_stats.json"
ULTRAFEEDBACK_PAIRS = 60_917  # argilla/ultrafeedback-binarized-preferences-cleaned, as data_scripts reads it
DPO_VAL_SPLIT = 0.05  # data_scripts/prepare_dpo.py's default
DPO_TRAIN_PAIRS = ULTRAFEEDBACK_PAIRS - round(ULTRAFEEDBACK_PAIRS * DPO_VAL_SPLIT)

FIGURE_LINE = re.compile(r"^#\s{3}([a-z][a-z ]*[a-z])\s{2,}([\d,]+)\s*$")


def stated_figures(recipe: Path) -> dict[str, int]:
    """The `#   name   number` lines of a recipe's comments."""
    figures = {}
    for line in recipe.read_text().splitlines():
        m = FIGURE_LINE.match(line)
        if m:
            figures[m.group(1)] = int(m.group(2).replace(",", ""))
    return figures


def gpus(launch_config: Path = LAUNCH_CONFIG) -> int:
    config = yaml.safe_load(launch_config.read_text())
    return config["num_processes"] * config.get("num_machines", 1)


def updates_per_epoch(examples: int, per_device: int, accumulation: int, processes: int) -> int:
    """As the Trainer counts them: each process gets ceil(batches / processes) micro-batches (accelerate
    evens them out), and a last partial accumulation still makes an update."""
    micro_batches = math.ceil(math.ceil(examples / per_device) / processes)
    return math.ceil(micro_batches / accumulation)


def warmup_updates(warmup_steps: float, total_updates: int) -> int:
    """transformers' get_warmup_steps: a value below 1 is a fraction of all updates."""
    return math.ceil(total_updates * warmup_steps) if warmup_steps < 1 else int(warmup_steps)


# On-policy pairs (recipes/generate_pairs.yaml): every UltraFeedback prompt, replies shaped like its chosen
# replies (the assumption above: log-normal, median CHOSEN tokens), sampled by transformers' generate.
ON_POLICY_PROMPTS = ULTRAFEEDBACK_PAIRS
# Modelled per-GPU rates of the 1.8B model in bf16 (benchmarks/gpu.py measures both): decoding steps x sequences
# per second of generate at 80 sequences per batch (~13 ms a step: kernel launches, the weights and the KV cache
# read once per step), and reward-model forwards of ~450-token conversations (~1.4e12 FLOPs each at ~40% of a
# B200's dense bf16 peak, less the padding).
SAMPLING_SLOTS_PER_S = 6_000
SCORING_ROWS_PER_S = 300


def reply_lengths(n: int, max_new_tokens: int, seed: int = 0) -> list[int]:
    """Token counts of n sampled replies under that assumption; one longer than max_new_tokens is cut there."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=gen)
    return (math.log(CHOSEN) + RESPONSE_SIGMA * z).exp().round().clamp(1, max_new_tokens).long().tolist()


def sampling_figures(recipe: dict, gpus: int) -> dict[str, int]:
    """Samples, tokens and minutes of a generate_pairs recipe. A generate call runs until its longest reply ends,
    so each batch of generation_batch_size x num_samples sequences costs its longest reply x its sequences."""
    prompts = min(recipe.get("num_prompts") or ON_POLICY_PROMPTS, ON_POLICY_PROMPTS)
    per_prompt, batch = recipe["num_samples"], recipe["generation_batch_size"] * recipe["num_samples"]
    lengths = reply_lengths(prompts * per_prompt, recipe["max_new_tokens"])
    slots = sum(max(lengths[i : i + batch]) * len(lengths[i : i + batch]) for i in range(0, len(lengths), batch))
    return {
        "prompts": prompts,
        "samples": len(lengths),
        "sampled tokens": sum(lengths),
        "decoded slots": slots,
        "sampling minutes": round(slots / (gpus * SAMPLING_SLOTS_PER_S) / 60),
        "scoring minutes": round(len(lengths) / (gpus * SCORING_ROWS_PER_S) / 60),
    }


# Evaluation (recipes/evaluate.yaml), every model scored plain and chat, the items of each task split between the
# GPUs as the harness does under `accelerate launch`. Hub test-split sizes; the generation tasks' reply limits
# (IFEval's own 1280; GSM8K sets none, so the harness's 256); a generate call of EVAL_BATCH sequences (the least
# `batch_size: auto` finds for the 1.8B model on a B200) runs until its longest reply ends, and an upper bound
# lets every call run to the limit, as a model that never stops does (the base model scored plain, whose
# IFEval prompts have no stop string). A decoding step is modelled as on-policy sampling's (~13 ms).
EVAL_ITEMS = {"ifeval": 541, "gsm8k": 1_319, "arc_easy": 2_376, "arc_challenge": 1_172, "openbookqa": 500}
EVAL_REPLY_LIMITS = {"ifeval": 1_280, "gsm8k": 256}
EVAL_BATCH = 64
EVAL_MODES = 2  # plain and chat (chat_scoring: auto, every model has a template)
DECODE_STEP_S = 80 / SAMPLING_SLOTS_PER_S  # one step of generate_pairs.yaml's 80-sequence batch


def evaluation_figures(recipe: dict, gpus: int, step_s: float = DECODE_STEP_S) -> dict[str, int]:
    """Items, decoding steps per GPU (an upper bound) and minutes of an evaluation recipe's generation: its
    generation tasks, generation health (`num_prompts` greedy replies of `max_new_tokens`, batches of 8) and
    the judge's forwards (each later model against the one before, and the first against the last, both orders)."""
    models = len(recipe["models"])
    generation = [t for t in recipe["tasks"] if t in EVAL_REPLY_LIMITS]
    steps = 0
    for task in generation:
        limit = recipe.get("max_gen_toks") or EVAL_REPLY_LIMITS[task]
        calls = math.ceil(math.ceil(EVAL_ITEMS[task] / gpus) / EVAL_BATCH)
        steps += calls * limit * models * EVAL_MODES
    prompts = recipe["num_prompts"]
    steps += math.ceil(math.ceil(prompts / gpus) / 8) * recipe["max_new_tokens"] * models
    pairs = models - 1 + (models > 2)
    return {
        "generation items per model": sum(EVAL_ITEMS[t] for t in generation),
        "decoding steps per gpu": steps,
        "generation minutes": round(steps * step_s / 60),
        "judge forwards": pairs * prompts * 2,  # when a judge is named
    }


def on_policy_train_pairs() -> int:
    """At most one pair per prompt (every prompt yields one), less generate_pairs.yaml's test share."""
    recipe = yaml.safe_load(RECIPES["generate_pairs"].read_text())
    return ON_POLICY_PROMPTS - round(ON_POLICY_PROMPTS * recipe["test_split"])


def computed_figures(stage: str, recipe_path: Path | None = None, stats_path: Path = SFT_STATS) -> dict[str, int]:
    recipe = yaml.safe_load((recipe_path or RECIPES[stage]).read_text())
    n = gpus()
    if stage == "generate_pairs":
        return sampling_figures(recipe, n)
    if stage == "evaluate":
        return evaluation_figures(recipe, n)
    per_device, accumulation = recipe["per_device_train_batch_size"], recipe["gradient_accumulation_steps"]
    per_update = per_device * accumulation * n
    if stage == "sft":
        stats = json.loads(stats_path.read_text())
        rows, tokens = stats["packing"]["packed_rows"], stats["real_tokens_per_epoch"]
        per_epoch = updates_per_epoch(rows, per_device, accumulation, n)
        figures = {
            "conversations per update": round(per_update * stats["packing"]["conversations_per_row"]),
            "real tokens per update": round(tokens / rows * per_update),
        }
    else:  # dpo, reward: UltraFeedback's pairs; dpo_on_policy: the on-policy pairs
        pairs = on_policy_train_pairs() if stage == "dpo_on_policy" else DPO_TRAIN_PAIRS
        per_epoch = updates_per_epoch(pairs, per_device, accumulation, n)
        figures = {"pairs per update": per_update}
    total = per_epoch * recipe["num_train_epochs"]
    return figures | {
        "updates per epoch": per_epoch,
        "updates in all": total,
        "warmup updates": warmup_updates(recipe["warmup_steps"], total),
    }
