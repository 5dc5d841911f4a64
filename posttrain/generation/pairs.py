"""On-policy preference pairs: replies sampled from the policy, scored by a reward model, best against worst.

    model, tokenizer = load_reward_model("runs/reward", device="cuda", dtype="bfloat16")
    scores = reward_scores(model, tokenizer, [prompt + [reply], ...], batch_size=16)
    result = sample_pairs(policy, policy_tokenizer, model, tokenizer, prompts, settings, seed)

A reward model scores a whole conversation. `reward_scores` renders it with the reward model's own chat
template and tokenizes it as TRL's RewardTrainer does a conversational pair (`apply_chat_template(messages,
tokenize=True)`, no generation prompt), pads on the right as its collator does, and reads the one logit the
model gives at the last token: the score the reward model was trained to give.

Each sampled reply is exactly one of the SAMPLE_OUTCOMES (counted in meta.json `samples`); a prompt yields a
pair or is dropped for one of the PROMPT_DROP_REASONS (meta.json `dropped`). A reply that did not end on a stop
token within the token budget is truncated and never scored, so it can never be chosen.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

from posttrain.conversion.chat_template import find_control_token
from posttrain.data.adapters import CONTROL_TOKEN, PROMPT_TOO_LONG
from posttrain.data.loading import load_errors
from posttrain.generation.generate import check_device, check_dtype, generate_batch
from posttrain.outputs.atomic import atomic_write_text
from posttrain.outputs.errors import PosttrainError
from posttrain.outputs.paths import resolve_output

# What happens to each sampled reply (in this order of precedence).
TRUNCATED = "truncated"  # no stop token within max_new_tokens (or the room the context left)
EMPTY_REPLY = "empty_reply"
DUPLICATE_REPLY = "duplicate_reply"  # the same text as an earlier reply to the same prompt: scored once
OVER_REWARD_CONTEXT = "longer_than_reward_model_context"
SCORED = "scored"
SAMPLE_OUTCOMES = (TRUNCATED, EMPTY_REPLY, CONTROL_TOKEN, DUPLICATE_REPLY, OVER_REWARD_CONTEXT, SCORED)

# Why a prompt yields no pair.
DUPLICATE_PROMPT = "duplicate_prompt"
TOO_FEW_REPLIES = "fewer_than_2_scored_replies"
IDENTICAL_REPLIES = "identical_replies"
SMALL_MARGIN = "margin_below_min_margin"
PROMPT_DROP_REASONS = (DUPLICATE_PROMPT, PROMPT_TOO_LONG, TOO_FEW_REPLIES, IDENTICAL_REPLIES, SMALL_MARGIN)

SCORE_DECIMALS = 6  # scores are written, compared and chosen at this precision


# ------------------------------------------------------------------ the reward model


def check_reward_model(path: str) -> None:
    """Refuse, from its config alone, a model that is not a one-score sequence classifier."""
    from transformers import AutoConfig

    with load_errors(f"reward_model {path}: its config cannot be read"):
        config = AutoConfig.from_pretrained(path)
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise PosttrainError(
            f"reward_model {path} is not a sequence-classification model (its config says "
            f"{', '.join(architectures) or 'no architecture'}); train one with posttrain/reward.py"
        )
    if config.num_labels != 1:
        raise PosttrainError(
            f"reward_model {path} gives {config.num_labels} scores (num_labels {config.num_labels}); "
            "a reward model gives one"
        )


def load_reward_model(path: str, device: str | None = None, dtype: str = "auto"):
    """(model in eval mode, tokenizer) of a reward model directory or hub id, padded as RewardTrainer pads:
    the tokenizer's pad token, else its eos token, also set as the config's pad_token_id when it has none
    (the model finds each row's last token by it)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_reward_model(path)
    device, dtype = check_device(device), check_dtype(dtype)
    with load_errors(f"reward_model {path}: its tokenizer cannot be loaded"):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with load_errors(f"reward_model {path}: the model cannot be loaded"):
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


def reward_input_ids(tokenizer, conversation: list[dict]) -> list[int]:
    """A conversation's token ids as TRL 1.16's RewardTrainer tokenizes a conversational pair
    (`trl.data_utils._tokenize`: the chat template, tokenize=True, no generation prompt)."""
    return tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]


def reward_scores(model, tokenizer, conversations: list[list[dict]], batch_size: int = 16) -> list[float | None]:
    """The reward model's score of each conversation, in order (None for one longer than its context), rounded
    to SCORE_DECIMALS. Batched by length, right-padded with the config's pad_token_id, as in training."""
    import torch

    ids = [reward_input_ids(tokenizer, c) for c in conversations]
    context = getattr(model.config, "max_position_embeddings", None)
    order = sorted((i for i, x in enumerate(ids) if context is None or len(x) <= context), key=lambda i: -len(ids[i]))
    pad = model.config.pad_token_id
    scores: list[float | None] = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        members = order[start : start + batch_size]
        width = max(len(ids[i]) for i in members)
        rows = [ids[i] + [pad] * (width - len(ids[i])) for i in members]
        mask = [[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in members]
        with torch.inference_mode():
            logits = model(
                input_ids=torch.tensor(rows, device=model.device),
                attention_mask=torch.tensor(mask, device=model.device),
                use_cache=False,
            ).logits
        for i, score in zip(members, logits[:, 0].float().tolist()):
            scores[i] = round(score, SCORE_DECIMALS)
    return scores


def check_renders(reward_tokenizer, reward_model: str, prompts: list[dict]) -> None:
    """The reward model's chat template renders every prompt with a reply after it, and the reply shows in the
    rendering (a template that dropped it would score the prompt alone)."""
    if not reward_tokenizer.chat_template:
        raise PosttrainError(
            f"reward_model {reward_model}: its tokenizer has no chat template, so it cannot render the policy's "
            "conversations; give it the template it was trained with"
        )
    probes = ("first probe reply", "second probe reply")
    for i, prompt in enumerate(prompts, 1):
        rendered = []
        for probe in probes[: 1 + (i == 1)]:
            try:
                rendered.append(
                    reward_tokenizer.apply_chat_template(
                        prompt["messages"] + [{"role": "assistant", "content": probe}], tokenize=False
                    )
                )
            except Exception as err:  # jinja's raise_exception, a role the template does not know, ...
                raise PosttrainError(
                    f"reward_model {reward_model}: its chat template cannot render prompt {i} of the policy's "
                    f"conversations with a reply ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                    "the policy and the reward model must render the same conversations"
                ) from None
        if i == 1 and (probes[0] not in rendered[0] or rendered[0] == rendered[1]):
            raise PosttrainError(
                f"reward_model {reward_model}: its chat template does not render the assistant's reply, so every "
                "reply to a prompt would get the same score"
            )


# ------------------------------------------------------------------ sampling and choosing


def reply_outcome(ids: list[int], stopped: bool, text: str, earlier: set[str]) -> str:
    """Which of SAMPLE_OUTCOMES a decoded reply is before scoring (SCORED: it goes to the reward model)."""
    if not stopped:
        return TRUNCATED
    if not text:
        return EMPTY_REPLY
    if find_control_token(text):
        return CONTROL_TOKEN  # training refuses such text: the tokenizer would read it as the token itself
    if text in earlier:
        return DUPLICATE_REPLY
    return SCORED


def sample_pairs(policy, policy_tokenizer, reward, reward_tokenizer, prompts: list[dict], settings, seed: int) -> dict:
    """Replies to `prompts` (settings.num_samples each), scored; per prompt either its best and worst reply
    with their scores, or the reason it has none. Deterministic for a given `seed` and list of prompts.

    Returns {"prompts": [{"best": [text, score], "worst": [text, score]} | {"dropped": reason}, ...],
    "samples": {outcome: count}, "scores": [every score given]}."""
    samples = generate_batch(
        policy,
        policy_tokenizer,
        [p["messages"] for p in prompts],
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.generation_batch_size,
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        num_return_sequences=settings.num_samples,
        seed=seed,
    )
    outcomes = Counter(dict.fromkeys(SAMPLE_OUTCOMES, 0))
    candidates: list[list[str]] = []  # each prompt's distinct usable replies, in sampling order
    duplicated: list[bool] = []  # whether any usable reply repeated an earlier one
    for replies in samples:
        texts: list[str] = []
        mine = Counter()
        for ids, stopped in replies:
            body = ids[:-1] if stopped else ids
            text = policy_tokenizer.decode(body, skip_special_tokens=True).strip()
            outcome = reply_outcome(ids, stopped, text, set(texts))
            mine[outcome] += 1
            if outcome == SCORED:
                texts.append(text)
        outcomes.update({k: v for k, v in mine.items() if k != SCORED})
        candidates.append(texts)
        duplicated.append(mine[DUPLICATE_REPLY] > 0)
    conversations = [
        p["messages"] + [{"role": "assistant", "content": t}] for p, texts in zip(prompts, candidates) for t in texts
    ]
    flat = iter(reward_scores(reward, reward_tokenizer, conversations, settings.scoring_batch_size))
    results, all_scores = [], []
    for texts, repeated in zip(candidates, duplicated):
        scored = [(t, s) for t, s in ((t, next(flat)) for t in texts) if s is not None]
        outcomes[OVER_REWARD_CONTEXT] += len(texts) - len(scored)
        outcomes[SCORED] += len(scored)
        all_scores += [s for _, s in scored]
        if len(scored) >= 2:
            results.append({"best": list(max(scored, key=score_of)), "worst": list(min(scored, key=score_of))})
        else:  # several usable replies, all one text: nothing to prefer; else too few usable ones
            results.append({"dropped": IDENTICAL_REPLIES if len(texts) == 1 and repeated else TOO_FEW_REPLIES})
    return {"prompts": results, "samples": dict(outcomes), "scores": all_scores}


def score_of(scored_reply: tuple[str, float]) -> float:
    return scored_reply[1]


def pair_row(prompt: dict, choice: dict, min_margin: float) -> tuple[dict | None, str | None]:
    """(the preference row, None) for a prompt's best and worst reply, or (None, reason): no pair, or a margin below
    `min_margin` (a margin of 0 carries no preference and is always dropped)."""
    if "dropped" in choice:
        return None, choice["dropped"]
    (best, best_score), (worst, worst_score) = choice["best"], choice["worst"]
    margin = round(best_score - worst_score, SCORE_DECIMALS)
    if margin <= 0 or margin < min_margin:
        return None, SMALL_MARGIN
    return {
        "prompt": prompt["messages"],
        "chosen": [{"role": "assistant", "content": best}],
        "rejected": [{"role": "assistant", "content": worst}],
        "chosen_score": best_score,
        "rejected_score": worst_score,
    }, None


def distribution(values: list[float]) -> dict:
    """n, mean and nearest-rank percentiles of a list of scores (or margins)."""
    if not values:
        return {"n": 0}
    s = sorted(values)

    def rank(p: float) -> float:
        return s[max(math.ceil(p * len(s)) - 1, 0)]

    figures = {"n": len(s), "mean": round(sum(s) / len(s), SCORE_DECIMALS), "min": s[0]}
    figures.update({f"p{round(p * 100)}": rank(p) for p in (0.05, 0.25, 0.5, 0.75, 0.95)})
    return figures | {"max": s[-1]}


# ------------------------------------------------------------------ the finished chunks of a run

_CHUNK = re.compile(r"^chunk-(\d+)\.json$")
SETTINGS_NAME = "settings.json"


class PartialResults:
    """The finished chunks of prompts of a run, one file each (written whole, by rename), in `.NAME.partial/`
    beside the output directory, with the settings that made them. A stopped run continues from them; the
    output directory itself is written only once every chunk is done."""

    def __init__(self, output_dir: str, settings: dict):
        final = resolve_output(output_dir)
        self.output_dir, self.dir, self.settings = output_dir, final.with_name(f".{final.name}.partial"), settings

    def saved_settings(self) -> dict | None:
        try:
            return json.loads((self.dir / SETTINGS_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def check(self, resume: bool, overwrite: bool, may_change: tuple[str, ...]) -> None:
        """Refuse (read-only, so every process can ask) to continue what is not there or was made otherwise,
        and to start over an earlier run's chunks without overwrite."""
        saved = self.saved_settings()
        if saved is None:
            if resume:
                raise PosttrainError(f"--resume true: no stopped run of {self.output_dir} to continue ({self.dir})")
            return
        if resume:
            changed = sorted(
                k for k in {*saved, *self.settings} if k not in may_change and saved.get(k) != self.settings.get(k)
            )
            if changed:
                was = ", ".join(f"{k}: {saved.get(k)!r}" for k in changed)
                raise PosttrainError(
                    f"--resume true: the stopped run of {self.output_dir} was made with {was}; set "
                    f"{'it' if len(changed) == 1 else 'them'} back, or start over with --overwrite_output_dir true"
                )
        elif not overwrite:
            raise PosttrainError(
                f"{self.dir} holds {len(self.done())} finished chunks of a stopped run of {self.output_dir}; pass "
                "--resume true to continue it, or --overwrite_output_dir true to start over"
            )

    def open(self, resume: bool) -> None:
        """Start over (remove an earlier run's chunks) or continue; the main process only."""
        if not resume:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            atomic_write_text(self.dir / SETTINGS_NAME, json.dumps(self.settings, indent=2, sort_keys=True) + "\n")

    def done(self) -> set[int]:
        if not self.dir.is_dir():
            return set()
        return {int(m.group(1)) for p in self.dir.iterdir() if (m := _CHUNK.match(p.name))}

    def path(self, index: int) -> Path:
        return self.dir / f"chunk-{index:06d}.json"

    def commit(self, index: int, result: dict) -> None:
        atomic_write_text(self.path(index), json.dumps(result, ensure_ascii=False) + "\n")

    def load(self, index: int) -> dict:
        return json.loads(self.path(index).read_text(encoding="utf-8"))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
