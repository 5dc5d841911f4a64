"""Padding-free DPO (`padding_free: true`): the model sees one row of real tokens, and everything TRL
computes from it equals the padded run: per-sequence log-probs of policy and reference, gradients, and the
logged loss, rewards and margins of short runs with a live, a precomputed, no (reference-free) and a LoRA
reference, plus the same weights after them; under ZeRO-3 on 2 processes too (slow). The TRL behaviour
the override relies on is pinned, and an attention that cannot keep packed sequences apart is refused.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
import torch
import yaml
from helpers import REPO, build_stage_trainer, log_history, one_error_line, run_stage
from safetensors.torch import load_file

from posttrain.demo import fixtures
from posttrain.outputs.errors import run_cli
from posttrain.training.padding_free import PATCHED, pack, unpack
from posttrain.training.recipe import RESOLVED_RECIPE_NAME

DPO_SCRIPT = REPO / "posttrain" / "dpo.py"
TRL_WARNING = "temporarily unavailable"
# fp32 on CPU: the packed and the padded forward differ only in summation order (~1e-7 relative per value).
LOGGED_TOLERANCE = dict(rel=1e-4, abs=1e-5)
# Weights after 3 Adam steps. Adam's first step moves every weight by lr x sign(gradient), so the few weights
# whose gradient is at roundoff level (~1e-6 of the largest) can move apart by up to ~lr: all within 0.2 x lr,
# and all but 1 in 10,000 within 1e-6.
WEIGHT_TOLERANCE, WEIGHTS_APART = 1e-6, 1e-4
# 3 steps that all update the weights (no warmup), nothing saved but the final model
STEPS = dict(max_steps=3, warmup_steps=0, learning_rate=1e-3, save_strategy="no", eval_strategy="no")
LOGGED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")

write_recipe = functools.partial(helpers.write_recipe, "dpo")


def uneven_rows() -> list[dict]:
    """Pairs of very different lengths: long prompts with one-word answers, short prompts with long
    answers, and chosen and rejected of very different lengths within a pair."""
    long_answer = "The sky looks blue because the air scatters blue light more than red light."
    long_question = "Please think about it carefully first. " * 2 + "What color is the sky?"
    rows = fixtures.preference_rows()
    rows += [
        fixtures.qa_preference("Sky?", long_answer, "Green."),
        fixtures.qa_preference(long_question, "Blue.", "It is green, " + "or maybe red, " * 2 + "I think."),
        fixtures.qa_preference("Two plus two?", "Four.", "It is five, " + "or maybe six, " * 5 + "I think."),
        fixtures.qa_preference(long_question[40:], long_answer, "Red."),
    ]
    return rows


@pytest.fixture(scope="module")
def uneven_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("uneven_pairs")
    rows = uneven_rows()
    fixtures.write_jsonl(d / "train.jsonl", rows)
    fixtures.write_jsonl(d / "test.jsonl", rows[-4:])
    return d


def train_logs(out: Path) -> list[dict]:
    return [e for e in log_history(out) if "loss" in e]


# ------------------------------------------------------------------ what the model computes


def test_pack_and_unpack():
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]])
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)
    row, positions, row_labels = pack(ids, mask, labels, pad_to_multiple_of=4)
    assert row.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 0, 0]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2]]  # the pad segment is a sequence of its own
    # Each sequence's first token is never a target: in the row it would be "predicted" from its neighbour.
    assert row_labels.tolist() == [[-100, 2, 3, -100, 5, -100, 7, 8, 9, -100, -100, -100]]
    # Output k of the row predicts row token k + 1; in the padded layout [b, t] predicts token t + 1 of row b.
    per_token = torch.arange(1.0, 12.0)[None]  # 11 outputs for 12 row tokens
    assert unpack(per_token, mask).tolist() == [[1, 2, 0], [4, 0, 0], [6, 7, 8]]
    assert pack(ids, mask, labels)[0].shape == (1, 9)  # without pad_to_multiple_of: the real tokens only


def backbone_inputs(model) -> list:
    """The input_ids shapes the transformer body (below the LM head) is called with, recorded from now on."""
    seen = []
    model.model.register_forward_pre_hook(
        lambda _, args, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    return seen


def test_log_probs_and_gradients_equal_padded(tmp_path, tiny_model_dir, uneven_dir):
    """Per-sequence log-probs of the policy and of the live reference, and the policy's gradients, padding-free
    vs padded on one micro-batch of all the uneven pairs; the body sees one row of only real tokens."""
    trainers = {}
    for padding_free in (False, True):
        recipe = write_recipe(
            tmp_path / f"{padding_free}.yaml", tiny_model_dir, uneven_dir, tmp_path / "out", padding_free=padding_free
        )
        trainers[padding_free] = build_stage_trainer("dpo", recipe)
    padded, packed = trainers[False], trainers[True]
    assert getattr(packed.model, PATCHED) and getattr(packed.ref_model, PATCHED)
    assert not getattr(padded.model, PATCHED, False) and packed.padding_free and packed.args.padding_free
    batch = padded.data_collator([padded.train_dataset[i] for i in range(len(padded.train_dataset))])
    real = int(batch["attention_mask"].sum())
    assert real < 0.6 * batch["attention_mask"].numel()  # the padded batch is mostly padding

    seen = {"policy": backbone_inputs(packed.model), "reference": backbone_inputs(packed.ref_model)}
    for name in ("ref_model", "model"):
        expected = padded.compute_ref_log_probs(getattr(padded, name), batch)
        got = packed.compute_ref_log_probs(getattr(packed, name), batch)
        for a, b in zip(got, expected):  # chosen, rejected: one log-prob per sequence
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    assert seen == {"policy": [(1, real)], "reference": [(1, real)]}

    def grads(trainer):
        trainer.model.zero_grad()
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        out = trainer.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
            labels=labels, fused_lm_head=True,
        )  # fmt: skip
        chosen, rejected = out.log_probs.sum(1).chunk(2)
        (chosen - rejected).sum().backward()
        return {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    expected, got = grads(padded), grads(packed)
    for name in expected:
        scale = expected[name].abs().max().item()  # a gradient's roundoff is relative to its largest entry
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5 * scale, msg=name)


# ------------------------------------------------------------------ runs: padded == padding-free

VARIANTS = {
    # live reference, evaluated, with length-grouped batches
    "live": dict(eval_strategy="steps", eval_steps=3, train_sampling_strategy="group_by_length"),
    "precompute": dict(precompute_ref_log_probs=True),
    "reference_free": dict(reference_free=True),
    "lora": dict(use_peft=True, lora_r=8, lora_alpha=16, lora_target_modules=["q_proj", "v_proj"], learning_rate=1e-2),
}


def run_both_ways(tmp_path, tiny_model_dir, data_dir, caplog, monkeypatch, **overrides) -> tuple[dict, list]:
    """The same 3-step run padded and padding-free: ({padding_free: output dir}, [grad enabled? for each packed
    forward]). Each run reads its own copy of the data, so the second cannot reuse the first's cached
    reference log-probs. TRL's warning is never logged."""
    import shutil

    from posttrain.training import padding_free as module

    packed_calls = []

    def counting_pack(*args, **kwargs):
        packed_calls.append(torch.is_grad_enabled())
        return pack(*args, **kwargs)

    monkeypatch.setattr(module, "pack", counting_pack)
    outs = {}
    for padding_free in (False, True):
        out, data = tmp_path / f"padding_free_{padding_free}", tmp_path / f"data_{padding_free}"
        shutil.copytree(data_dir, data)
        settings = dict(STEPS, padding_free=padding_free)
        recipe = write_recipe(
            tmp_path / f"{padding_free}.yaml", tiny_model_dir, data, out, **{**settings, **overrides}
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            run_stage("dpo", recipe)
        assert TRL_WARNING not in caplog.text
        assert bool(packed_calls) == padding_free
        outs[padding_free] = out
    return outs, packed_calls


def assert_same_run(padded: Path, packed: Path) -> None:
    logs = {"padded": log_history(padded), "packed": log_history(packed)}
    assert [sorted(e) for e in logs["packed"]] == [sorted(e) for e in logs["padded"]]
    for a, b in zip(logs["padded"], logs["packed"]):
        for key in LOGGED + tuple(f"eval_{k}" for k in LOGGED):
            if key in a:
                assert b[key] == pytest.approx(a[key], **LOGGED_TOLERANCE), (a["step"], key)
    assert sum("loss" in e for e in logs["packed"]) == 3
    lr = yaml.safe_load((packed / RESOLVED_RECIPE_NAME).read_text())["learning_rate"]
    weights = "adapter_model.safetensors" if (packed / "adapter_model.safetensors").exists() else "model.safetensors"
    a, b = load_file(padded / weights), load_file(packed / weights)
    assert a.keys() == b.keys()
    apart = torch.cat([(b[name] - a[name]).abs().flatten() for name in a])
    assert apart.max() <= 0.2 * lr and (apart > WEIGHT_TOLERANCE).float().mean() < WEIGHTS_APART, apart.max()


@pytest.mark.parametrize("variant", VARIANTS)
def test_three_steps_log_the_same_both_ways(variant, tmp_path, tiny_model_dir, uneven_dir, caplog, monkeypatch):
    outs, packed_calls = run_both_ways(tmp_path, tiny_model_dir, uneven_dir, caplog, monkeypatch, **VARIANTS[variant])
    assert_same_run(outs[False], outs[True])
    logs = train_logs(outs[True])
    assert any(e["rewards/margins"] != 0 for e in logs[1:])  # it trained: the policy left the reference
    # The policy's 3 training forwards ran packed, and so did every reference forward (no gradient):
    # one per step (live, LoRA with its adapter disabled), the precompute pass, none when reference-free.
    assert packed_calls.count(True) == 3
    reference_calls = packed_calls.count(False)
    if variant == "reference_free":
        assert reference_calls == 0
        assert all(e["rewards/chosen"] == pytest.approx(0.1 * e["logps/chosen"], rel=1e-5) for e in logs)
    elif variant == "precompute":
        assert reference_calls == 4 + 1  # once over the 8 train and the 2 eval pairs, 2 per batch
    else:
        assert reference_calls >= 3
    if "eval_steps" in VARIANTS[variant]:
        assert any("eval_rewards/margins" in e for e in log_history(outs[True]))


# ------------------------------------------------------------------ what the override relies on


def test_trl_still_disables_padding_free(tmp_path, tiny_model_dir, caplog):
    """Fails when a TRL upgrade changes what the override relies on: `DPOTrainer.__init__` turning
    `padding_free` off with its warning (then TRL may have its own: drop ours), the fused LM head's
    forward taking `labels` and `fused_lm_head` and returning per-token fields in the padded (B, L - 1)
    layout, and the loss and reference pass reaching the model only through that call."""
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = datasets.Dataset.from_list(fixtures.preference_rows()[:2])
    args = trl.DPOConfig(output_dir=str(tmp_path), padding_free=True, report_to="none", use_cpu=True)
    with caplog.at_level(logging.WARNING):
        plain = trl.DPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            args=args,
            processing_class=tok,
            train_dataset=data,
        )
    assert plain.padding_free is False and TRL_WARNING in caplog.text

    batch = plain.data_collator([plain.train_dataset[0], plain.train_dataset[1]])
    calls = []
    for model in (plain.model, plain.ref_model):
        fused = model.forward

        def spy(*args, _fused=fused, **kwargs):
            calls.append((args, sorted(kwargs), kwargs.get("fused_lm_head")))
            out = _fused(*args, **kwargs)
            calls[-1] += ({k: tuple(out[k].shape) for k in out if k in ("log_probs", "entropy", "is_top1")},)
            return out

        model.forward = spy
    plain.compute_loss(plain.model, batch)
    plain.compute_ref_log_probs(plain.ref_model, batch)
    B, L = batch["input_ids"].shape
    keys = ["attention_mask", "fused_lm_head", "input_ids", "labels", "use_cache"]
    policy = ((), keys, True, {"log_probs": (B, L - 1), "entropy": (B, L - 1), "is_top1": (B, L - 1)})
    reference = ((), keys, True, {"log_probs": (B, L - 1)})
    assert calls == [policy, reference, reference]  # the loss: policy, then reference; the reference pass


# ------------------------------------------------------------------- bad input


def test_unpackable_attention_is_refused_before_training(tmp_path, tiny_model_dir, uneven_dir, capsys):
    """`paged|eager` builds no mask from position_ids (the packed sequences would attend to each other):
    one line naming the setting to use, exit 2, nothing written; from ModelConfig or model_init_kwargs."""
    for where in ("attn_implementation", "model_init_kwargs"):
        out = tmp_path / f"out_{where}"
        attention = {
            where: "paged|eager" if where == "attn_implementation" else {"attn_implementation": "paged|eager"}
        }
        recipe = write_recipe(
            tmp_path / f"{where}.yaml", tiny_model_dir, uneven_dir, out, padding_free=True, **attention
        )
        with pytest.raises(SystemExit) as exc:
            run_cli(lambda recipe=recipe: run_stage("dpo", recipe))
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "Traceback" not in err, err
        assert re.search(
            r"padding_free: attn_implementation paged\|eager cannot keep the packed chosen and rejected sequences "
            r"apart .*; set attn_implementation to sdpa \(or flash_attention_2",
            one_error_line(err),
        ), err
        assert not out.exists()


# ------------------------------------------------------------ ZeRO-3, 2 processes


@pytest.mark.slow
def test_zero3_on_two_processes_same_both_ways(tmp_path, tiny_model_dir, uneven_dir):
    """Under a 2-process DeepSpeed ZeRO-3 launch (policy and live reference sharded, DeepSpeed's engine
    calling the patched forward), and with the reference precomputed through DeepSpeed's inference
    engine: the same logs and weights as the padded run, and no TRL warning."""
    config = tmp_path / "zero3_cpu.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "compute_environment": "LOCAL_MACHINE",
                "distributed_type": "DEEPSPEED",
                "mixed_precision": "no",
                "num_machines": 1,
                "num_processes": 2,
                "deepspeed_config": {"zero_stage": 3, "zero3_init_flag": True, "zero3_save_16bit_model": True},
            }
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    accelerate = str(Path(sys.executable).parent / "accelerate")
    outs = {}
    for name, extra in {
        "padded": {},
        "padding_free": {"padding_free": True},
        "padding_free_precomputed": {"padding_free": True, "precompute_ref_log_probs": True},
    }.items():
        out = tmp_path / name
        recipe = write_recipe(tmp_path / f"{name}.yaml", tiny_model_dir, uneven_dir, out, **{**STEPS, **extra})
        cmd = [accelerate, "launch", "--config_file", str(config), str(DPO_SCRIPT), str(recipe)]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-6000:]
        assert TRL_WARNING not in proc.stdout + proc.stderr
        outs[name] = out
    assert_same_run(outs["padded"], outs["padding_free"])
    assert_same_run(outs["padded"], outs["padding_free_precomputed"])
