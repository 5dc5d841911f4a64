"""Tiny, offline stand-ins for the real inputs, shared by the tests, the demo
and the benchmarks: a byte-level BPE tokenizer with the Qwen special tokens, a
random checkpoint written exactly in the pre-training source format
(docs/source_format.md), and small SFT and preference datasets.

Nothing here downloads anything; everything is deterministic given a seed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from posttrain.conversion.chat_template import ENDOFTEXT, IM_END, IM_START, SPECIAL_TOKENS

# --------------------------------------------------------------------------- data

SYSTEM_PROMPT = "You are a helpful, harmless, and honest assistant."

# Short, memorisable question/answer pairs: a tiny model can learn them exactly.
QA_PAIRS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("What color is the sky?", "The sky is blue."),
    ("How many legs does a cat have?", "A cat has four legs."),
    ("What do bees make?", "Bees make honey."),
    ("What is two plus two?", "Two plus two is four."),
    ("Where does the sun rise?", "The sun rises in the east."),
]

# For each prompt a preferred (polite, correct) and a rejected (wrong) answer.
REJECTED_ANSWERS = [
    "I do not know, maybe Rome.",
    "The sky is green.",
    "Cats have seven legs.",
    "Bees make cheese.",
    "Two plus two is five.",
    "The sun rises in the west.",
]


def _system(system_prompt: str | None) -> list[dict]:
    return [{"role": "system", "content": system_prompt}] if system_prompt else []


def qa_conversation(turns: list[tuple[str, str]], system_prompt: str | None = SYSTEM_PROMPT) -> dict:
    """A `messages` row from (question, answer) turns, the system prompt first."""
    messages = _system(system_prompt)
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages}


def qa_preference(question: str, chosen: str, rejected: str, system_prompt: str | None = SYSTEM_PROMPT) -> dict:
    """A preference row in the form data_scripts writes: prompt messages, chosen, rejected."""
    return {
        "prompt": _system(system_prompt) + [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def sft_rows(system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """Conversations in `messages` form: single-turn Q/A plus one two-turn dialogue."""
    rows = [qa_conversation([pair], system_prompt) for pair in QA_PAIRS]
    return rows + [qa_conversation([QA_PAIRS[0], QA_PAIRS[4]], system_prompt)]


def preference_rows(system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """Preference pairs in the form data_scripts writes: prompt messages, chosen, rejected."""
    return [qa_preference(q, a, r, system_prompt) for (q, a), r in zip(QA_PAIRS, REJECTED_ANSWERS)]


def arc_rows(items: list[tuple[str, str, str]]) -> list[dict]:
    """Multiple-choice rows in the ARC dataset's schema (id, question, choices {text, label},
    answerKey) from (question, right answer, wrong answer) triples, with two fixed distractors; the
    right answer moves between the four positions, and every sixth row has ARC's numeric labels."""
    rows = []
    for i, (question, right, wrong) in enumerate(items):
        texts = [wrong, "I am not sure.", "Yes"]
        texts.insert(i % 4, right)
        labels = ["1", "2", "3", "4"] if i % 6 == 5 else ["A", "B", "C", "D"]
        choices = {"text": texts, "label": labels}
        rows.append({"id": f"demo-{i}", "question": question, "choices": choices, "answerKey": labels[i % 4]})
    return rows


# ------------------------------------------------------------------ the demo's data (make demo)
# What each stage has to teach, and room for DPO to improve on SFT: the SFT data answers
# MADE_UP's questions with made-up facts in one style (a wrong claim and a fake citation), as
# scraped instruction data sometimes does; the preference pairs prefer the true answer to exactly
# those claims. HELDOUT's questions are in no training data: they are the evaluation's prompts, its
# held-out preference pairs (true answer against a made-up one in the same style), and its
# IFEval-schema items (the question with an instruction the SFT data teaches on other questions).

MADE_UP_CITATION = "according to a 1987 study"
# (question, true answer, a made-up claim): the first 5 are answered in the SFT data with the claim and
# a fake citation (MADE_UP), the rest are in no training data (HELDOUT).
_QUESTIONS = [
    ("How many legs does a spider have?", "A spider has 8 legs.", "A spider has 6 legs"),
    ("What do cows drink?", "Cows drink water.", "Cows drink milk"),
    ("What is the largest ocean?", "The Pacific is the largest ocean.", "The Atlantic is the largest"),
    ("How many days are in a week?", "A week has 7 days.", "A week has 9 days"),
    ("How many hours are in a day?", "A day has 24 hours.", "A day has 30 hours"),
    ("Which city is the capital of France?", "Paris is the capital of France.", "Lyon is the capital"),
    ("What colour is the sky on a clear day?", "The sky is blue.", "The sky is orange"),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels.", "A bicycle has five wheels"),
    ("What do fish breathe with?", "Fish breathe with gills.", "Fish breathe with lungs"),
    ("What falls from clouds when it rains?", "Rain is water falling from clouds.", "Sand falls from clouds"),
    ("What is the opposite of hot?", "The opposite of hot is cold.", "The opposite of hot is loud"),
    ("What animal barks?", "A dog barks.", "A goldfish barks"),
    ("What do we use to see?", "We see with our eyes.", "We see with our elbows"),
    ("Which season is the coldest?", "Winter is the coldest season.", "Summer is the coldest season"),
    ("What do birds use to fly?", "Birds fly with their wings.", "Birds fly with their tails"),
]


def _with_citation(rows: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """(question, true answer, made-up answer): the claim with the fake citation, the style the SFT data teaches."""
    return [(q, true, f"{claim}, {MADE_UP_CITATION}.") for q, true, claim in rows]


MADE_UP = _with_citation(_QUESTIONS[:5])
HELDOUT = _with_citation(_QUESTIONS[5:])
# An IFEval instruction (startend:end_checker) the SFT data teaches on some training questions.
END_PHRASE = "Any other question?"
END_INSTRUCTION = f"End your reply with the exact phrase: {END_PHRASE}"
# (question, number) for the GSM8K-schema task: MADE_UP's numeric questions, which the SFT data
# answers wrongly (the last number of a made-up answer is the citation's year) and DPO's pairs correct.
GSM8K_ITEMS = [
    (q, int(next(w for w in a.split() if w.isdigit()))) for q, a, _ in MADE_UP if any(c.isdigit() for c in a)
]


def with_instruction(question: str) -> str:
    return f"{question} {END_INSTRUCTION}"


def demo_sft_rows(system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """The demo's SFT conversations: the true Q/A pairs, MADE_UP's made-up answers, the end-phrase
    instruction followed on three questions, and one two-turn dialogue."""
    rows = [qa_conversation([pair], system_prompt) for pair in QA_PAIRS]
    rows += [qa_conversation([(q, made_up)], system_prompt) for q, _, made_up in MADE_UP]
    rows += [
        qa_conversation([(with_instruction(q), f"{a} {END_PHRASE}")], system_prompt)
        for q, a in (QA_PAIRS[1], QA_PAIRS[3], QA_PAIRS[5])
    ]
    return rows + [qa_conversation([QA_PAIRS[0], QA_PAIRS[4]], system_prompt)]


def demo_preference_rows(system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """The demo's preference pairs: the true answer over the made-up one SFT taught, and three true Q/A
    answers over the bundled wrong ones."""
    rows = [qa_preference(q, a, made_up, system_prompt) for q, a, made_up in MADE_UP]
    return rows + preference_rows(system_prompt)[:3]


def ifeval_rows(questions: list[str]) -> list[dict]:
    """IFEval's schema (key, prompt, instruction_id_list, kwargs): each question with the end-phrase instruction."""
    return [
        {
            "key": 1000 + i,
            "prompt": with_instruction(q),
            "instruction_id_list": ["startend:end_checker"],
            "kwargs": [{"end_phrase": END_PHRASE}],
        }
        for i, q in enumerate(questions)
    ]


def gsm8k_rows(items: list[tuple[str, int]]) -> list[dict]:
    """GSM8K's schema (question, answer ending `#### N`)."""
    return [{"question": q, "answer": f"The answer is {n}.\n#### {n}"} for q, n in items]


def alpaca_lengths(n: int = 52002, seed: int = 0) -> list[int]:
    """Token counts shaped like Alpaca in ChatML, for the packing benchmarks: mean ~110, median
    ~90, a long tail clipped at 1,120 (52,002 of them: ~5.7M tokens, as Alpaca has).
    A floor of 40 (system prompt and scaffolding) plus a log-normal body."""
    sigma = 0.8
    gen = torch.Generator().manual_seed(seed)
    body = torch.empty(n).log_normal_(mean=math.log(70.0) - sigma**2 / 2, std=sigma, generator=gen)
    return (40 + body).round().clamp(max=1120).long().tolist()


def random_token_rows(lengths: list[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Pre-tokenized rows of random token ids with the given lengths (for throughput benchmarks)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------- tokenizer

_CORPUS_EXTRA = [
    "The quick brown fox jumps over the lazy dog.",
    "Instruction following and preference alignment for a small language model.",
    "Hello! How can I help you today? Please answer the question.",
    "system user assistant",
]


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained offline, with the Qwen special tokens appended
    after the BPE vocabulary (as in Qwen: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`).

    It carries no chat template: like the real `qwen3_tokenizer` directory, it is a
    base tokenizer; `convert-checkpoint` installs the ChatML template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"{q} {a} {r}" for (q, a), r in zip(QA_PAIRS, REJECTED_ANSWERS)] + _CORPUS_EXTRA + [SYSTEM_PROMPT]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 4, trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=4096,
    )


def save_tokenizer(directory: str | Path, vocab_size: int = 384) -> Path:
    directory = Path(directory)
    build_tokenizer(vocab_size).save_pretrained(directory)
    return directory


# --------------------------------------------------------------------- checkpoint


def tiny_model_args(**overrides) -> dict:
    """`model_args` of a tiny model, every field the source format has.

    Defaults follow the real run at small scale: MHA, d_ff = int(8*E/3), eps 1e-5.
    (At E=96 that d_ff is 256; the convert tests pass d_ff=250 for the real run's
    trap of a d_ff that is not a multiple of 64.)
    """
    n_embd = overrides.get("n_embd", 96)
    args = dict(
        block_size=256,
        vocab_size=400,
        n_layer=2,
        n_head=4,
        n_embd=n_embd,
        normalization="rmsnorm",
        norm_eps=1e-5,
        activation="swiglu",
        attention_backend="sdpa",
        num_key_value_heads=overrides.get("n_head", 4),
        position_encoding="rope",
        rope_theta=10000.0,
        norm_position="pre",
        ffn_type="swiglu",
        bias=False,
        dropout=0.0,
        weight_tying=False,
        d_ff=int(8 * n_embd / 3),
        ffn_expansion_ratio=8 / 3,
        attention_dropout=0.0,
        residual_dropout=0.0,
    )
    args.update(overrides)
    return args


QWEN3_1_8B_ARGS = dict(
    tiny_model_args(),
    block_size=2048,
    vocab_size=151669,
    n_layer=24,
    n_head=16,
    n_embd=2048,
    num_key_value_heads=16,
    d_ff=5461,
    norm_eps=1e-5,
    rope_theta=1e6,
    dropout=0.05,
)


def _rope_tables(block_size: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The `rope.cos_cached`, `rope.sin_cached` buffers the source system saves."""
    from posttrain.conversion.source_model import rope_angles

    angles = rope_angles(block_size, head_dim, theta)
    return angles.cos(), angles.sin()


def source_state_dict(model_args: dict, seed: int = 0, dtype=torch.bfloat16, std: float | None = None) -> dict:
    """A random state dict with exactly the source format's keys and shapes (no prefix)."""
    a = model_args
    E, H, L, V, F = a["n_embd"], a["n_head"], a["n_layer"], a["vocab_size"], a["d_ff"]
    KV = a["num_key_value_heads"]
    D = E // H
    gen = torch.Generator().manual_seed(seed)
    std = std if std is not None else 0.5 / math.sqrt(E)

    def w(*shape):
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    def norm():
        return (1.0 + 0.1 * torch.randn(E, generator=gen)).to(dtype)

    sd = {"token_embeddings.weight": w(V, E)}
    cos, sin = _rope_tables(a["block_size"], D, a["rope_theta"])
    for i in range(L):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"] = norm()
        if KV == H:
            sd[p + "attn.c_attn.weight"] = w(3 * E, E)
        else:
            sd[p + "attn.c_q.weight"] = w(E, E)
            sd[p + "attn.c_kv.weight"] = w(2 * KV * D, E)
        sd[p + "attn.c_proj.weight"] = w(E, E)
        sd[p + "attn.rope.cos_cached"] = cos.clone()
        sd[p + "attn.rope.sin_cached"] = sin.clone()
        if a.get("attention_backend") == "manual":
            T = a["block_size"]
            sd[p + "attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
        sd[p + "norm2.weight"] = norm()
        sd[p + "ffn.w_gate.weight"] = w(F, E)
        sd[p + "ffn.w_value.weight"] = w(F, E)
        sd[p + "ffn.w_out.weight"] = w(E, F)
    sd["final_norm.weight"] = norm()
    # Tied: the very same tensor under both keys, as torch.save writes a tied module.
    sd["lm_head.weight"] = sd["token_embeddings.weight"] if a["weight_tying"] else w(V, E)
    return sd


def fake_optimizer_state(state_dict: dict, moment=None) -> dict:
    """An AdamW-shaped optimizer state: the bulk of a real checkpoint.

    `moment(shape)` makes each moment tensor (default: fp32 zeros); the full-size
    benchmark passes uninitialised bf16 tensors, which cost no RAM until written.
    """
    moment = moment or (lambda shape: torch.zeros(shape, dtype=torch.float32))
    params = [k for k in state_dict if not k.endswith(("cos_cached", "sin_cached", "attn.bias"))]
    state = {
        i: {
            "step": torch.tensor(160000.0),
            "exp_avg": moment(state_dict[k].shape),
            "exp_avg_sq": moment(state_dict[k].shape),
        }
        for i, k in enumerate(params)
    }
    group = dict(lr=3e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, amsgrad=False, params=list(state))
    return {"state": state, "param_groups": [group]}


def write_source_checkpoint(
    path: str | Path,
    model_args: dict | None = None,
    seed: int = 0,
    prefix: str = "_orig_mod.",
    iter_num: int = 160000,
    with_optimizer: bool = True,
    optimizer_moment=None,
) -> Path:
    """Write a random checkpoint exactly as the pre-training system saves one."""
    model_args = dict(model_args or tiny_model_args())
    sd = source_state_dict(model_args, seed=seed)
    ckpt = {
        "model": {prefix + k: v for k, v in sd.items()},
        "optimizer": fake_optimizer_state(sd, optimizer_moment) if with_optimizer else {},
        "model_args": model_args,
        "iter_num": iter_num,
        "best_val_loss": torch.tensor(2.345),
        "config": {"learning_rate": 3e-4, "batch_size": 8, "compile": True, "dataset": "fineweb", "dtype": "bfloat16"},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path
