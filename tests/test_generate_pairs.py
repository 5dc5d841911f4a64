"""posttrain/generate_pairs.py with the memorised SFT model as the policy and the marker-trained reward model:
every written score is the reward model's own (recomputed here one conversation at a time) and chosen / rejected
are the best / worst of the replies the policy sampled; truncated replies never appear; a rerun with the same seed
gives the same bytes, also on two processes; a run stopped part-way resumes without repeating or losing a prompt;
dpo.py trains on the output as it is; the scoring tokenizes as TRL's RewardTrainer; bad input is one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
import torch
from helpers import REPO, log_history, run_stage, tree_hashes

from posttrain import generate_pairs
from posttrain.generation import pairs

SETTINGS = dict(
    num_samples=4,
    temperature=1.5,
    max_new_tokens=12,
    chunk_size=3,
    generation_batch_size=2,
    test_split=0.3,
    min_margin=0.0,
    dtype="float32",
    system_prompt="",
)


def argv(policy, reward, prompts, out, **overrides) -> list[str]:
    values = {"policy": policy, "reward_model": reward, "prompts": prompts, "output_dir": out, **SETTINGS, **overrides}
    return [str(REPO / "recipes" / "demo" / "generate_pairs.yaml")] + [f"--{k}={v}" for k, v in values.items()]


def run(*args, **overrides) -> int:
    """generate_pairs' command line in this process; its exit code."""
    try:
        generate_pairs.cli(argv(*args, **overrides))
    except SystemExit as done:
        return done.code
    return 0


def read_rows(out: Path) -> list[dict]:
    return [
        json.loads(line) for name in ("train.jsonl", "test.jsonl") for line in (out / name).read_text().splitlines()
    ]


@pytest.fixture(scope="module")
def inputs(memorised_sft, marker_reward, sft_data_dir):
    """(policy, reward model, prompts): 9 prompts, 2 of them repeated (the test split repeats the train split)."""
    return memorised_sft[1], marker_reward[1], sft_data_dir


@pytest.fixture(scope="module")
def generated(tmp_path_factory, inputs):
    """(output_dir, what generate_batch returned for each chunk, as (prompts, replies)) of one run."""
    out = tmp_path_factory.mktemp("pairs") / "out"
    calls = []
    real = pairs.generate_batch

    def spy(model, tokenizer, conversations, **kwargs):
        replies = real(model, tokenizer, conversations, **kwargs)
        calls.append((conversations, replies))
        return replies

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pairs, "generate_batch", spy)
        assert run(*inputs, out) == 0
    return out, calls


def test_scores_are_the_reward_models_and_chosen_is_the_best_reply(generated, inputs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, calls = generated
    policy_tokenizer = AutoTokenizer.from_pretrained(inputs[0])
    model = AutoModelForSequenceClassification.from_pretrained(inputs[1]).eval()
    tokenizer = AutoTokenizer.from_pretrained(inputs[1])

    def score(prompt, reply) -> float:
        conversation = prompt + [{"role": "assistant", "content": reply}]
        ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, 0].item()

    stopped = {}  # prompt -> the distinct replies that ended on a stop token
    for conversations, replies in calls:
        for prompt, samples in zip(conversations, replies):
            texts = {policy_tokenizer.decode(ids[:-1], skip_special_tokens=True).strip() for ids, ok in samples if ok}
            stopped[json.dumps(prompt)] = sorted(t for t in texts if t)
    rows = read_rows(out)
    assert len(rows) >= 3
    for row in rows:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert row["chosen_score"] == pytest.approx(score(row["prompt"], chosen), abs=1e-4)
        assert row["rejected_score"] == pytest.approx(score(row["prompt"], rejected), abs=1e-4)
        assert row["chosen_score"] > row["rejected_score"]
        candidates = stopped[json.dumps(row["prompt"])]
        by_score = sorted(candidates, key=lambda t: score(row["prompt"], t))
        assert (chosen, rejected) == (by_score[-1], by_score[0])


def test_truncated_replies_never_appear_and_every_reply_is_counted(generated, inputs):
    from transformers import AutoTokenizer

    out, calls = generated
    tokenizer = AutoTokenizer.from_pretrained(inputs[0])
    stopped, truncated = set(), set()
    for _, replies in calls:
        for samples in replies:
            for ids, ok in samples:
                (stopped if ok else truncated).add(
                    tokenizer.decode(ids[:-1] if ok else ids, skip_special_tokens=True).strip()
                )
    written = {row[key][0]["content"] for row in read_rows(out) for key in ("chosen", "rejected")}
    assert written <= stopped and not written & (truncated - stopped)
    meta = json.loads((out / "meta.json").read_text())
    n_truncated = sum(not ok for _, replies in calls for samples in replies for _, ok in samples)
    assert meta["samples"]["truncated"] == n_truncated > 0  # the test sees some: max_new_tokens 12 at temperature 1.5
    assert meta["samples"]["sampled"] == 7 * 4 == sum(v for k, v in meta["samples"].items() if k != "sampled")
    counts = meta["counts"]
    assert counts["prompts"] == 9 and meta["dropped"]["duplicate_prompt"] == 2
    assert counts["prompts"] == counts["dropped"] + counts["train"] + counts["test"] == 9
    assert counts["dropped"] == sum(meta["dropped"].values())
    assert meta["scores"]["margin"]["n"] == counts["train"] + counts["test"] == len(read_rows(out))
    assert meta["recipe"]["num_samples"] == 4 and "resume" not in meta["recipe"]


def test_rerun_gives_the_same_bytes_and_a_stopped_run_resumes_without_repeating_or_losing(
    generated, inputs, monkeypatch, capsys
):
    """Run 2 is stopped after its first chunk, run 3 resumes it: together they sample every chunk again with the same
    seed, and the output is the first run's, byte for byte."""
    out, _ = generated
    finished = tree_hashes(out)
    real_commit, committed = pairs.PartialResults.commit, []

    def commit_then_stop(store, index, result):
        if committed:
            raise KeyboardInterrupt
        real_commit(store, index, result)
        committed.append(index)

    monkeypatch.setattr(pairs.PartialResults, "commit", commit_then_stop)
    capsys.readouterr()
    assert run(*inputs, out, overwrite_output_dir=True) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("interrupted: stopped by Ctrl-C with 1 of 3 chunks") and "--resume true" in line
    assert tree_hashes(out) == finished  # the finished output is untouched until the new one is complete
    partial = out.with_name(f".{out.name}.partial")
    assert sorted(p.name for p in partial.iterdir()) == ["chunk-000000.json", "settings.json"]

    monkeypatch.setattr(pairs.PartialResults, "commit", real_commit)
    sampled = []
    real_sample = pairs.sample_pairs
    monkeypatch.setattr(pairs, "sample_pairs", lambda *a: sampled.append(a[4]) or real_sample(*a))
    assert run(*inputs, out, overwrite_output_dir=True, temperature=1.0, resume=True) == 2  # a changed recipe
    assert "the stopped run of" in capsys.readouterr().err and not sampled
    assert run(*inputs, out, overwrite_output_dir=True, resume=True) == 0
    assert "resuming: 1 of 3 chunks of 3 prompts were done" in capsys.readouterr().err
    prompts = [p["messages"] for p in generate_pairs.read_prompts(generate_pairs.parse(argv(*inputs, out)))]
    unique = [p for i, p in enumerate(prompts) if p not in prompts[:i]]
    assert [[p["messages"] for p in chunk] for chunk in sampled] == [unique[3:6], unique[6:]]  # only the rest
    assert tree_hashes(out) == finished and not partial.exists()


def test_dpo_trains_on_the_output(generated, inputs, tmp_path):
    out, _ = generated
    recipe = helpers.write_recipe(  # padding-free, as recipes/dpo_on_policy.yaml trains
        "dpo",
        tmp_path / "dpo.yaml",
        inputs[0],
        out,
        tmp_path / "dpo",
        max_steps=2,
        eval_steps=2,
        save_strategy="no",
        padding_free=True,
    )
    run_stage("dpo", recipe)
    history = log_history(tmp_path / "dpo")
    assert any("rewards/accuracies" in e for e in history) and any("eval_loss" in e for e in history)


def test_the_production_recipes_chain():
    """recipes/dpo_on_policy.yaml trains on what recipes/generate_pairs.yaml writes, from the policy it samples."""
    import yaml

    sampling = yaml.safe_load((REPO / "recipes" / "generate_pairs.yaml").read_text())
    args = generate_pairs.parse([str(REPO / "recipes" / "generate_pairs.yaml")])
    generate_pairs.check_values(args)
    assert (args.num_samples, args.max_new_tokens, args.test_split) == (5, 1024, 0.05)
    script_args, training_args, model_args, _ = helpers.parse_production_recipe("dpo", "dpo_on_policy")
    assert script_args.dataset_name == sampling["output_dir"] and model_args.model_name_or_path == sampling["policy"]
    reward = yaml.safe_load((REPO / "recipes" / "reward.yaml").read_text())
    assert sampling["reward_model"] == reward["output_dir"] and reward["model_name_or_path"] == sampling["policy"]


def test_the_on_policy_demo_prints_every_pair_with_its_margin(generated, capsys):
    from posttrain.demo.on_policy import print_pairs

    out, _ = generated
    print_pairs(out)
    printed = capsys.readouterr().out
    for row in read_rows(out):
        margin = row["chosen_score"] - row["rejected_score"]
        assert f"chosen   {row['chosen_score']:+.3f}  " in printed and f"margin {margin:.3f}" in printed
    meta = json.loads((out / "meta.json").read_text())
    assert (
        f"{meta['counts']['prompts']} prompts -> {meta['counts']['train']} train + {meta['counts']['test']} test"
        in printed
    )


def test_scoring_tokenizes_and_pads_as_the_reward_trainer(marker_reward, memorised_sft, tmp_path):
    """The ids the reward model scores are the ids RewardTrainer trained on (TRL's own tokenization of the same
    rows), and a batch of right-padded conversations scores as each one alone."""
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from posttrain.demo import fixtures
    from posttrain.reward import RewardModelTrainer
    from posttrain.training.trainers import build_trainer

    recipe = helpers.parse_stage("reward", marker_reward[0], "--eval_strategy", "no", "--output_dir", str(tmp_path))
    rows = fixtures.preference_rows() + [marker_reward[2][0]]
    tokenizer = AutoTokenizer.from_pretrained(memorised_sft[1])
    trainer = build_trainer(RewardModelTrainer, recipe, tokenizer, datasets.Dataset.from_list(rows))
    for row, prepared in zip(rows, trainer.train_dataset):
        assert prepared["chosen_ids"] == pairs.reward_input_ids(tokenizer, row["prompt"] + row["chosen"])
        assert prepared["rejected_ids"] == pairs.reward_input_ids(tokenizer, row["prompt"] + row["rejected"])

    model, reward_tokenizer = pairs.load_reward_model(marker_reward[1], "cpu", "float32")
    conversations = [row["prompt"] + row[key] for row in rows for key in ("chosen", "rejected")]
    batched = pairs.reward_scores(model, reward_tokenizer, conversations, batch_size=5)
    alone = [pairs.reward_scores(model, reward_tokenizer, [c], batch_size=1)[0] for c in conversations]
    assert batched == pytest.approx(alone, abs=2e-6) and len(set(batched)) > 2
    reference = AutoModelForSequenceClassification.from_pretrained(marker_reward[1]).eval()
    with torch.no_grad():
        ids = torch.tensor([pairs.reward_input_ids(reward_tokenizer, conversations[0])])
        assert alone[0] == pytest.approx(reference(input_ids=ids).logits[0, 0].item(), abs=1e-6)


def test_margins_and_what_a_resume_may_change(tmp_path):
    prompt = {"messages": [{"role": "user", "content": "Hi"}]}
    tie = {"best": ["Hello.", 0.25], "worst": ["Hey.", 0.25]}
    assert pairs.pair_row(prompt, tie, min_margin=0.0) == (None, pairs.SMALL_MARGIN)  # no preference: always dropped
    apart = {"best": ["Hello.", 0.75], "worst": ["Hey.", 0.25]}
    assert pairs.pair_row(prompt, apart, min_margin=0.6) == (None, pairs.SMALL_MARGIN)
    row, reason = pairs.pair_row(prompt, apart, min_margin=0.5)
    assert reason is None and (row["chosen_score"], row["rejected_score"]) == (0.75, 0.25)
    assert pairs.pair_row(prompt, {"dropped": pairs.TOO_FEW_REPLIES}, 0.0) == (None, pairs.TOO_FEW_REPLIES)

    settings = {"temperature": 0.8, "min_margin": 0.0, "test_split": 0.05}
    pairs.PartialResults(tmp_path / "out", settings).open(resume=False)
    may_change = generate_pairs.MAY_CHANGE_ON_RESUME
    pairs.PartialResults(tmp_path / "out", {**settings, "min_margin": 1.0, "test_split": 0.1}).check(
        True, False, may_change
    )
    with pytest.raises(pairs.PosttrainError, match=r"made with temperature: 0.8; set it back"):
        pairs.PartialResults(tmp_path / "out", {**settings, "temperature": 1.0}).check(True, False, may_change)
    with pytest.raises(pairs.PosttrainError, match=r"holds 0 finished chunks of a stopped run"):
        pairs.PartialResults(tmp_path / "out", settings).check(False, False, may_change)


# ------------------------------------------------------------------ bad input: one line, nothing written


def reward_copy(tmp_path, reward, change) -> Path:
    copy = tmp_path / "reward_copy"
    shutil.copytree(reward, copy)
    change(copy)
    return copy


def two_scores(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    config.update(id2label={"0": "bad", "1": "good"}, label2id={"bad": 0, "good": 1})
    (d / "config.json").write_text(json.dumps(config))


def template_refusing_system(d: Path) -> None:
    (d / "chat_template.jinja").write_text(
        "{%- for m in messages %}{%- if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{%- endif %}{{ m['content'] }}{%- endfor %}"
    )


def template_without_reply(d: Path) -> None:
    (d / "chat_template.jinja").write_text(
        "{%- for m in messages if m['role'] != 'assistant' %}{{ m['content'] }}{%- endfor %}"
    )


def no_template(d: Path) -> None:
    (d / "chat_template.jinja").unlink()


BAD_INPUTS = [
    ({"reward_model": "POLICY"}, "is not a sequence-classification model (its config says LlamaForCausalLM)"),
    ({"reward_model": two_scores}, "gives 2 scores (num_labels 2); a reward model gives one"),
    (
        {"reward_model": template_refusing_system},
        "its chat template cannot render prompt 1 of the policy's conversations",
    ),
    ({"reward_model": template_without_reply}, "its chat template does not render the assistant's reply"),
    ({"reward_model": no_template}, "its tokenizer has no chat template"),
    ({"num_samples": 1}, "num_samples must be at least 2"),
    ({"temperature": 0}, "temperature must be > 0 with num_samples 4"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"prompts": "NO_REPLY"}, "no row has messages that end before an assistant turn"),
    ({"prompts": "TOO_LONG"}, "none of its 1 prompts is usable (prompt_too_long: 1)"),
    ({"resume": True}, "--resume true: no stopped run of"),
    ({"output_dir": "FINISHED"}, "is not empty; pass --overwrite_output_dir true to replace it"),
]


@pytest.mark.parametrize(
    "overrides, message", BAD_INPUTS, ids=[m.split(" ")[0] + str(i) for i, (_, m) in enumerate(BAD_INPUTS)]
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, inputs, overrides, message, capsys):
    from posttrain.demo import fixtures

    policy, reward, prompts = inputs
    values = dict(overrides)
    if callable(values.get("reward_model")):
        values["reward_model"] = reward_copy(tmp_path, reward, values["reward_model"])
    elif values.get("reward_model") == "POLICY":
        values["reward_model"] = policy
    if values.get("prompts") == "NO_REPLY":
        values["prompts"] = fixtures.write_jsonl(
            tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}]
        )
    elif values.get("prompts") == "TOO_LONG":
        long = {"messages": [{"role": "user", "content": "bees " * 400}, {"role": "assistant", "content": "ok"}]}
        values["prompts"] = fixtures.write_jsonl(tmp_path / "p.jsonl", [long])
    out = tmp_path / "out"
    if values.pop("output_dir", None) == "FINISHED":
        (out / "train.jsonl").parent.mkdir()
        (out / "train.jsonl").write_text("{}\n")
    before = tree_hashes(tmp_path)
    args = {"reward_model": reward, "prompts": prompts, **values}
    code = run(policy, args.pop("reward_model"), args.pop("prompts"), out, **args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert message in helpers.one_error_line(err)
    assert tree_hashes(tmp_path) == before  # no partial results, no output, a finished one as it was


def test_a_second_run_into_the_same_output_is_refused(tmp_path, inputs, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from posttrain.outputs.lock import output_lock\nimport time\nwith output_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run(*inputs, out) == 2
        assert "is being written by another run" in helpers.one_error_line(capsys.readouterr().err)
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------ two processes (slow)


@pytest.mark.slow
def test_two_processes_give_the_bytes_of_one(tmp_path, inputs):
    """The chunks are shared round-robin between 2 processes (`accelerate launch --cpu`): the output is the same
    bytes as one process's (both launched with one thread each, so their arithmetic is the same)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = str(REPO / "posttrain" / "generate_pairs.py")
    out = tmp_path / "out"
    one = subprocess.run(
        [sys.executable, script, *argv(*inputs, out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert one.returncode == 0, one.stderr[-3000:]
    single = tree_hashes(out)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    started = time.monotonic()
    two = subprocess.run(
        [
            accelerate,
            "launch",
            "--cpu",
            "--num_processes",
            "2",
            script,
            *argv(*inputs, out, overwrite_output_dir=True),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert tree_hashes(out) == single, time.monotonic() - started
