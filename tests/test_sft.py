"""SFT on the tiny converted model: what is trained (label positions), that packing changes
nothing but speed, resume, memorisation with a learnt stop, recipes, LoRA, the output
directory, and one-line refusals of bad input before training starts.

One memorisation run (module fixture) serves the generation and output-directory tests.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import helpers
import pytest
import torch
import yaml
from helpers import (
    REPO,
    RESUMABLE,
    build_stage_trainer,
    one_error_line,
    parse_production_recipe,
    parse_stage,
    run_stage,
)
from safetensors.torch import load_file

from posttrain.conversion.chat_template import IM_END, IM_START
from posttrain.demo import fixtures
from posttrain.outputs.errors import PosttrainError
from posttrain.training.recipe import MERGED_DIR, RESOLVED_RECIPE_NAME
from posttrain.training.run_dir import claim_output_dir, resume_checkpoint

SFT_SCRIPT = REPO / "posttrain" / "sft.py"
TWO_TURN = 6  # index of the two-turn conversation in fixtures.sft_rows()


write_recipe = functools.partial(helpers.write_recipe, "sft")
run_sft = functools.partial(run_stage, "sft")
SHORT_RUN = dict(eval_strategy="no", save_strategy="no")  # train and save the final model only


def parse(*argv):
    return parse_stage("sft", *argv).arguments


def make_trainer(recipe: Path, *argv):
    """The SFT trainer exactly as sft.main builds it, without training."""
    return build_stage_trainer("sft", recipe, *argv)


def greedy(model, tokenizer, messages):
    """Greedy reply token ids, stopping wherever the saved generation_config says."""
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


# --------------------------------------------------------------------------- labels


def expected_labels(tokenizer, messages, input_ids):
    """-100 everywhere but the tokens of each assistant message's content and its <|im_end|>,
    found from the rendered text and the tokenizer's character offsets (not from TRL's masks)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == input_ids
    spans, pos = [], 0
    for m in messages:
        head = f"{IM_START}{m['role']}\n"
        start = text.index(head + m["content"] + IM_END, pos) + len(head)
        pos = start + len(m["content"]) + len(IM_END)
        if m["role"] == "assistant":
            spans.append((start, pos))
    return [
        tok if any(s <= a and b <= e for s, e in spans) else -100
        for tok, (a, b) in zip(input_ids, enc["offset_mapping"])
    ]


@pytest.mark.parametrize("model", ["tiny_model_dir", "qwen3_model_dir"])  # the tiny and the real Qwen3 vocabulary
@pytest.mark.parametrize("packing", [False, True])
def test_labels_of_a_two_turn_conversation(tmp_path, request, sft_data_dir, packing, model):
    model_dir = request.getfixturevalue(model)
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, sft_data_dir, tmp_path / "out", packing=packing)
    trainer = make_trainer(recipe, "--eval_strategy", "no")
    tok = trainer.processing_class
    messages = fixtures.sft_rows()[TWO_TURN]["messages"]
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    # The labels TRL's collator hands the model, for the conversation as it sits in a batch.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    if packing:  # one padding-free row; cut it where position_ids restart
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        rows = [
            (batch["input_ids"][0, s:e].tolist(), batch["labels"][0, s:e].tolist()) for s, e in zip(starts, starts[1:])
        ]
    else:
        rows = [
            (i[m.bool()].tolist(), lab[m.bool()].tolist())
            for i, lab, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])
        ]
    labels = next(lab for i, lab in rows if i == ids)

    assert labels == expected_labels(tok, messages, ids)
    trained = [t for t in labels if t != -100]
    (_, a1), (_, a2) = (m.values() for m in messages[2:5:2])
    assert tok.decode(trained) == a1 + IM_END + a2 + IM_END
    im_end = tok.convert_tokens_to_ids(IM_END)
    assert ids.count(im_end) == 5 and trained.count(im_end) == 2  # system, user, user masked
    if model == "qwen3_model_dir":  # the real ids: the answers as Qwen3 tokenizes them, each closed by 151645
        answer_ids = [tok(a, add_special_tokens=False)["input_ids"] + [151645] for a in (a1, a2)]
        assert trained == answer_ids[0] + answer_ids[1] and im_end == 151645


@pytest.mark.parametrize("packing", [True, False])
def test_overlong_conversations_are_dropped_not_cut(tmp_path, tiny_model_dir, capsys, packing):
    """A conversation longer than max_length would lose its answer's <|im_end|> (TRL cuts it,
    silently when packing): it is dropped and counted; every kept answer still ends on <|im_end|>."""
    rows = fixtures.sft_rows()
    long_row = {"messages": [{"role": "user", "content": "tell me " * 80}, {"role": "assistant", "content": "No."}]}
    data = tmp_path / "data"
    fixtures.write_jsonl(data / "train.jsonl", rows[:3] + [long_row])
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data, tmp_path / "out", packing=packing)
    trainer = make_trainer(recipe, "--eval_strategy", "no")
    assert "sft: dropped 1 of 4 train conversations longer than max_length=128" in capsys.readouterr().out
    im_end = trainer.processing_class.convert_tokens_to_ids(IM_END)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    trained = batch["labels"][batch["labels"] != -100].tolist()
    assert trained.count(im_end) == 3  # one stop per kept answer, none lost to a cut


# -------------------------------------------------------------------------- packing


def test_packed_loss_equals_unpacked_loss(tmp_path, tiny_model_dir, sft_data_dir):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, sft_data_dir, tmp_path / "out", packing=True)
    trainer = make_trainer(recipe, "--eval_strategy", "no")
    trainer.model.eval()
    padded = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id)

    def loss_and_count(batch):
        """TRL's training loss (mean over label tokens, use_cache=False) and how many tokens it averages."""
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, dict(batch))
        return loss.item(), int((batch["labels"][:, 1:] != -100).sum())

    bins = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert any(len(b["seq_lengths"]) > 1 for b in bins)
    packed = trainer.data_collator(bins)  # every conversation in one padding-free row
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    packed_loss, n = loss_and_count(packed)

    singles = []
    for b in bins:
        offsets = torch.tensor([0, *b["seq_lengths"]]).cumsum(0).tolist()
        singles += [
            {"input_ids": b["input_ids"][s:e], "labels": b["labels"][s:e]} for s, e in zip(offsets, offsets[1:])
        ]
    assert len(singles) == len(fixtures.sft_rows())
    parts = [loss_and_count(padded([s])) for s in singles]
    unpacked_loss = sum(loss * k for loss, k in parts) / sum(k for _, k in parts)

    assert n == sum(k for _, k in parts)
    assert packed_loss == pytest.approx(unpacked_loss, rel=1e-5)
    # Sensitivity: the same row run as one causal sequence (conversations see each other) differs.
    leaky = {
        "input_ids": packed["input_ids"],
        "labels": packed["labels"],
        "attention_mask": torch.ones_like(packed["input_ids"]),
    }
    assert abs(loss_and_count(leaky)[0] - unpacked_loss) > 1e-3


# --------------------------------------------------------------------------- resume


def test_resume_equals_uninterrupted(tmp_path, tiny_model_dir, sft_data_dir):
    # Checkpoints with optimizer state, all kept (the demo recipe saves none).
    common = dict(max_steps=6, save_steps=3, eval_strategy="no", learning_rate=1e-2, **RESUMABLE)
    full = write_recipe(tmp_path / "full.yaml", tiny_model_dir, sft_data_dir, tmp_path / "full", **common)
    run_sft(full)
    # A run stopped after step 3 leaves exactly checkpoint-3 on disk; resume it for the other 3 steps.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed = write_recipe(tmp_path / "resumed.yaml", tiny_model_dir, sft_data_dir, resumed_dir, **common)
    run_sft(resumed, "--resume_from_checkpoint", "true")

    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(resumed_dir / "model.safetensors")
    half = load_file(resumed_dir / "checkpoint-3" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert any(not torch.allclose(half[k], a[k]) for k in a)  # the second half did train
    state = json.loads((resumed_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 6


def test_resume_and_output_dir_errors(tmp_path, tiny_model_dir, sft_data_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, sft_data_dir, tmp_path / "out")
    script_args, training_args, *_ = parse(recipe, "--resume_from_checkpoint", "true")
    with pytest.raises(PosttrainError, match=r"no checkpoint-N directory in .*out"):
        resume_checkpoint(script_args, training_args)
    (tmp_path / "out" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-3" / "trainer_state.json").write_text('{"global_step": 3}')
    (tmp_path / "out" / "checkpoint-3" / "model.safetensors").write_bytes(b"")
    script_args, training_args, *_ = parse(recipe)
    with pytest.raises(PosttrainError, match="checkpoints of an earlier run.*--resume_from_checkpoint true"):
        resume_checkpoint(script_args, training_args)
    (tmp_path / "out" / RESOLVED_RECIPE_NAME).write_text("{}")  # the completion marker of an earlier run
    script_args, training_args, *_ = parse(recipe, "--resume_from_checkpoint", "true")
    resume = resume_checkpoint(script_args, training_args)
    assert resume == str(tmp_path / "out" / "checkpoint-3")
    assert (tmp_path / "out" / RESOLVED_RECIPE_NAME).exists()  # nothing changes while inputs are checked
    claim_output_dir(training_args, resume)
    # the marker stays until save_run replaces the model: a run that fails before then leaves it as it was
    assert (tmp_path / "out" / RESOLVED_RECIPE_NAME).exists()
    script_args, training_args, *_ = parse(recipe, "--overwrite_output_dir", "true")
    assert resume_checkpoint(script_args, training_args) is None
    assert (tmp_path / "out" / "checkpoint-3").exists()
    claim_output_dir(training_args, None)
    assert not (tmp_path / "out" / "checkpoint-3").exists()


# ------------------------------------------------------------- memorisation + outputs


@pytest.fixture(scope="module")
def trained(memorised_sft):
    return memorised_sft


def test_memorised_replies_end_on_im_end(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = trained
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    im_end = tok.convert_tokens_to_ids(IM_END)
    for question, answer in fixtures.QA_PAIRS:
        reply = greedy(model, tok, fixtures.sft_rows()[0]["messages"][:1] + [{"role": "user", "content": question}])
        assert reply[-1] == im_end, tok.decode(reply)  # it stopped by itself, on the end of turn
        assert tok.decode(reply[:-1]) == answer


def test_output_directory(trained):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from trl.chat_template_utils import has_generation_markers

    recipe, out = trained
    assert (out / "model.safetensors").is_file() and AutoConfig.from_pretrained(out).architectures == [
        "LlamaForCausalLM"
    ]
    tok = AutoTokenizer.from_pretrained(out)
    assert has_generation_markers((out / "chat_template.jinja").read_text()) and tok.chat_template
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    assert tok.convert_tokens_to_ids(IM_END) in ([eos] if isinstance(eos, int) else eos)

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 64
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    evals = [h["eval_loss"] for h in state["log_history"] if "eval_loss" in h]
    assert len(losses) >= 6 and losses[-1] < losses[0] / 5 and len(evals) == 2 and evals[-1] < evals[0]
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # TensorBoard

    # The resolved recipe re-parses, silently, to the same run.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = parse(out / RESOLVED_RECIPE_NAME)
    first = parse(recipe)
    for a, b in zip(first, again):
        da = a.to_dict() if hasattr(a, "to_dict") else vars(a)
        db = b.to_dict() if hasattr(b, "to_dict") else vars(b)
        assert da == db
    saved = yaml.safe_load((out / RESOLVED_RECIPE_NAME).read_text())
    assert saved["assistant_only_loss"] is True and saved["packing"] is True and saved["num_train_epochs"] == 16
    assert saved["resume_from_checkpoint"] is None and "hub_token" not in saved


# --------------------------------------------------------------------------- recipes


def test_recipe_yaml_override_and_unknown_keys(tmp_path, tiny_model_dir, sft_data_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, sft_data_dir, tmp_path / "out")
    script_args, args, model_args, _ = parse(recipe, "--learning_rate", "1e-4", "--lora_r", "4")
    assert args.learning_rate == 1e-4 and model_args.lora_r == 4  # the command line wins
    assert args.max_length == 128 and args.packing and script_args.dataset_name == str(sft_data_dir)  # YAML
    assert parse("--config", recipe)[1].learning_rate == 1e-2
    with pytest.raises(PosttrainError, match="--lerning_rate"):
        parse(recipe, "--lerning_rate", "1e-4")
    bad = write_recipe(tmp_path / "bad.yaml", tiny_model_dir, sft_data_dir, tmp_path / "out", packin=True)
    with pytest.raises(PosttrainError, match=r"bad.yaml: unknown key\(s\) packin"):
        parse(bad)
    # A bad value or a bad mixture entry: one line naming where it came from, not argparse's usage.
    with pytest.raises(
        PosttrainError,
        match=r"--learning_rate/--learning-rate: invalid float value: 'abc' \(in recipe .*r.yaml or the command line\)",
    ):
        parse(recipe, "--learning_rate", "abc")
    entry = write_recipe(
        tmp_path / "entry.yaml", tiny_model_dir, sft_data_dir, tmp_path / "out", datasets=[{"path": "x", "weight": 1}]
    )
    with pytest.raises(PosttrainError, match=r"unexpected keyword argument 'weight' \(in recipe .*entry.yaml"):
        parse(entry)
    with pytest.raises(PosttrainError, match=r"^usage: \S+ RECIPE.yaml \[--key value ...\]"):
        parse()


def test_dataset_mixture_with_weights(tmp_path, tiny_model_dir, sft_data_dir):
    from posttrain.data.loading import load_datasets, validate_sft_rows

    rows = fixtures.sft_rows()
    fixtures.write_jsonl(tmp_path / "b.jsonl", rows[:4])
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model_dir,
        sft_data_dir,
        tmp_path / "out",
        dataset_name=None,
        eval_strategy="no",
        datasets=[
            {"path": str(sft_data_dir), "fraction": 0.75},
            {"path": str(tmp_path / "b.jsonl"), "fraction": 0.25},
        ],
    )
    script_args, args, _, dataset_args = parse(recipe)
    train, evaluation = load_datasets(script_args, dataset_args, args, validate_sft_rows)
    # TRL keeps the first round(w * total) rows of each source, total capped so none is oversampled: 7/0.75.
    assert len(train) == 9 and evaluation is None
    assert train["messages"][:7] == [r["messages"] for r in rows[:7]] and train["messages"][7:] == [
        r["messages"] for r in rows[:2]
    ]


def test_production_recipe():
    script_args, args, model_args, _ = parse_production_recipe("sft")
    gpus = 8
    # 8 packed rows (~150 conversations) per update; tests/test_recipes.py checks the figures
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * gpus == 8
    assert args.bf16 and args.packing and args.padding_free is False and args.packing_strategy == "bfd"
    assert args.assistant_only_loss and args.activation_checkpointing and args.max_length == 2048
    assert args.num_train_epochs == 3 and args.max_steps == -1  # epochs decide the step count
    assert args.learning_rate == 2e-5 and args.lr_scheduler_kwargs == {
        "min_lr_rate": 0.1
    }  # 2e-6; min_lr would crash under DeepSpeed
    assert args.lr_scheduler_type.value == "cosine_with_min_lr" and 0 < args.warmup_steps < 1
    assert (args.weight_decay, args.adam_beta2, args.max_grad_norm) == (0.01, 0.95, 1.0)
    assert args.eval_strategy.value == "steps" and args.save_steps > 0 and args.report_to == ["tensorboard"]
    assert model_args.attn_implementation in ("sdpa", "flash_attention_2")
    assert (REPO / "accelerate_configs" / "zero2.yaml").is_file()


def test_no_module_shadows_an_import_when_run_as_a_file():
    """`python posttrain/sft.py` puts posttrain/ first on sys.path: no module there may hide another."""
    import importlib.metadata

    installed = set(importlib.metadata.packages_distributions())
    names = {p.stem for p in (REPO / "posttrain").glob("*.py")} | {
        p.name for p in (REPO / "posttrain").iterdir() if p.is_dir()
    }
    # evaluate.py keeps the name its users run, and takes posttrain/ off sys.path first (tested in test_evaluate)
    assert not names & (set(sys.stdlib_module_names) | installed) - {"evaluate"}


# ------------------------------------------------------------------------------ LoRA


def test_lora_trains_and_saves_adapter_and_merged_model(tmp_path, tiny_model_dir, sft_data_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model_dir,
        sft_data_dir,
        out,
        max_steps=4,
        **SHORT_RUN,
        learning_rate=1e-2,
        use_peft=True,
        lora_r=8,
        lora_alpha=16,
        lora_target_modules=["q_proj", "v_proj"],
        merge_lora_after_training=True,
    )
    run_sft(recipe)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 4 and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it trained
    assert (out / RESOLVED_RECIPE_NAME).is_file() and (out / "generation_config.json").is_file()

    ids = torch.tensor([[5, 17, 42, 99, 7]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        with_adapter = PeftModel.from_pretrained(base, out).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / MERGED_DIR).eval()(ids).logits
    torch.testing.assert_close(merged, with_adapter, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(merged, base_logits, atol=1e-3)
    assert (out / MERGED_DIR / "tokenizer.json").is_file()


# ------------------------------------------------------------------- bad input, CLI


def test_bad_input_is_one_line_before_training(tmp_path, tiny_model_dir, sft_data_dir, monkeypatch):
    rows = fixtures.sft_rows()
    cases = {}

    malformed = tmp_path / "malformed"
    fixtures.write_jsonl(malformed / "train.jsonl", rows[:2])
    with open(malformed / "train.jsonl", "a") as fh:
        fh.write('{"messages": [{"role": "user"\n')
    cases["malformed"] = (malformed, tiny_model_dir, r"malformed/train.jsonl line 3: malformed JSON")

    empty_rows = tmp_path / "empty_rows.jsonl"
    empty_rows.write_text("{}\n{}\n")
    cases["empty_rows"] = (
        empty_rows,
        tiny_model_dir,
        r"empty_rows.jsonl: all 2 rows are empty .*; training reads messages",
    )

    no_answer = tmp_path / "no_answer.jsonl"
    fixtures.write_jsonl(no_answer, rows[:2] + [{"messages": rows[0]["messages"][:2]}])
    cases["no_answer"] = (no_answer, tiny_model_dir, r"no_answer.jsonl \(train\) row 3: no assistant turn")

    plain = tmp_path / "plain_template_model"
    shutil.copytree(tiny_model_dir, plain)
    template = plain / "chat_template.jinja"
    template.write_text(template.read_text().replace("{%- generation %}", "").replace("{%- endgeneration %}", ""))
    cases["no_markers"] = (
        sft_data_dir,
        plain,
        r"plain_template_model: its chat template has no \{% generation %\} markers",
    )

    # A path that is not there: local-looking, or taken for a hub id (the Hub is unreachable here).
    cases["missing_dir"] = (
        tmp_path / "nowhere",
        tiny_model_dir,
        r"dataset .*nowhere not found \(prepare it with data_scripts",
    )
    cases["not_on_hub"] = (
        "data/sft_never_prepared",
        tiny_model_dir,
        r"dataset data/sft_never_prepared: no such local file or directory, and not loadable as a hub dataset",
    )

    monkeypatch.chdir(tmp_path)
    for name, (data, model, _) in cases.items():
        recipe = write_recipe(tmp_path / f"{name}.yaml", model, data, tmp_path / f"out_{name}", eval_strategy="no")
        proc = helpers.run_stage_cli_here("sft", recipe)
        err = proc.stderr
        assert proc.returncode == 2, err
        assert "Traceback" not in err
        error = one_error_line(err)
        assert err.rstrip().endswith(error), err
        assert re.search(cases[name][2], error), error
        assert not any((tmp_path / f"out_{name}").rglob("*"))  # nothing written


@pytest.mark.slow
def test_lora_merge_under_zero3(tmp_path, tiny_model_dir, sft_data_dir):
    """The merged model is built on the main process alone (under ZeRO-3 that once hung in
    zero.Init); and a min_lr the ZeRO optimizer cannot serve is refused in one line."""
    out = tmp_path / "out"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_model_dir,
        sft_data_dir,
        out,
        max_steps=2,
        **SHORT_RUN,
        use_peft=True,
        lora_r=8,
        lora_target_modules=["q_proj", "v_proj"],
        merge_lora_after_training=True,
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def launch(*overrides):
        cmd = [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            "--num_processes",
            "2",
            "--mixed_precision",
            "no",
            "--config_file",
            str(REPO / "accelerate_configs" / "zero3.yaml"),
            str(SFT_SCRIPT),
            str(recipe),
            *overrides,
        ]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    proc = launch()
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / MERGED_DIR / "model.safetensors").is_file()
    assert (out / RESOLVED_RECIPE_NAME).is_file()

    proc = launch("--lr_scheduler_kwargs", '{"min_lr": 2e-6}', "--output_dir", tmp_path / "min_lr")
    assert proc.returncode != 0 and "error: lr_scheduler_kwargs min_lr crashes under DeepSpeed" in proc.stderr
    assert "Traceback" not in proc.stderr.split("error: lr_scheduler_kwargs")[0]
