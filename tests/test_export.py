"""export-checkpoint: a trained model back in the pre-training format, its reference forward equal to the
Hugging Face logits, an exact round trip through convert-checkpoint, and one-line refusals of what the
format cannot hold."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, run_stage, write_recipe
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from posttrain import convert, export
from posttrain.conversion import source_format
from posttrain.conversion.source_format import check_model_args, source_shapes
from posttrain.conversion.source_model import reference_logits
from posttrain.demo import fixtures
from posttrain.outputs.atomic import atomic_output_file
from posttrain.outputs.paths import umask
from posttrain.training.recipe import MERGED_DIR

# The converter's layouts: MHA with the real run's d_ff trap, GQA (sharded on disk), tied with mask buffers.
LAYOUTS = {
    "mha": fixtures.tiny_model_args(d_ff=250, dropout=0.1, residual_dropout=0.05),
    "gqa": fixtures.tiny_model_args(num_key_value_heads=2, rope_theta=1e6, activation="gelu"),
    "tied": fixtures.tiny_model_args(weight_tying=True, attention_backend="manual"),
}


def train_in_place(model_dir: Path, seed: int) -> None:
    """Stand-in for training: every weight moves by noise of ~20% of its spread (what the export must carry)."""
    gen = torch.Generator().manual_seed(seed)
    for shard in sorted(model_dir.glob("*.safetensors")):
        tensors = load_file(shard)
        for key, t in tensors.items():
            tensors[key] = t + 0.2 * t.std() * torch.randn(t.shape, generator=gen)
        save_file(tensors, shard, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir):
    """layout -> a converted (fp32) model directory whose weights then changed, as after SFT."""
    d = tmp_path_factory.mktemp("trained")
    dirs = {}
    for i, (name, args) in enumerate(LAYOUTS.items()):
        ckpt = fixtures.write_source_checkpoint(d / f"{name}.pt", args, seed=i, with_optimizer=False)
        with pytest.MonkeyPatch.context() as mp:
            if name == "gqa":  # several shards and an index: the export streams them
                mp.setattr(convert, "MAX_SHARD_BYTES", 100_000)
            convert.convert_checkpoint(ckpt, tokenizer_dir, d / name, dtype="float32")
        train_in_place(d / name, seed=i)
        dirs[name] = d / name
    assert len(list(dirs["gqa"].glob("*.safetensors"))) > 1
    return dirs


def weights_of(model_dir: Path) -> dict:
    return {k: v for shard in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(shard).items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_trained_model_exports_in_the_format_and_back_exactly(trained, tmp_path, layout):
    model_dir, args = trained[layout], LAYOUTS[layout]
    report = export.export_checkpoint(model_dir, tmp_path / "ckpt.pt", dtype="float32", verify=True)
    assert report["verification"]["passed"] and report["verification"]["max_abs_logit_diff"] < 1e-4

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert sorted(ckpt) == ["best_val_loss", "config", "iter_num", "model", "model_args"]  # no optimizer state
    assert ckpt["model_args"] == args and list(ckpt["model_args"]) == list(args)  # the original's, dropouts too
    a = check_model_args(ckpt["model_args"], "exported")
    buffers = {f"blocks.{i}.attn.rope.{t}_cached" for i in range(a["n_layer"]) for t in ("cos", "sin")}
    if args["attention_backend"] == "manual":
        buffers |= {f"blocks.{i}.attn.bias" for i in range(a["n_layer"])}
    assert set(ckpt["model"]) == set(source_shapes(a)) | buffers
    if a["weight_tying"]:  # one tensor under both keys, as torch.save writes a tied module
        assert ckpt["model"]["lm_head.weight"].data_ptr() == ckpt["model"]["token_embeddings.weight"].data_ptr()
    assert ckpt["iter_num"] == 160000 and ckpt["config"]["iter_num_from"] == "conversion.json"
    assert ckpt["config"]["model_dir"] == str(model_dir) and ckpt["config"]["stages"].startswith("convert-checkpoint ")

    # The trained weights, not the checkpoint the model was converted from.
    original = torch.load(model_dir.parent / f"{layout}.pt", weights_only=True)["model"]
    name = "blocks.0.ffn.w_out.weight"
    assert not torch.allclose(ckpt["model"][name], next(v for k, v in original.items() if k.endswith(name)).float())

    # Independently of --verify: the source architecture on the export computes the HF model's logits.
    tokens = torch.randint(0, a["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(7))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        hf = model(tokens).logits
    assert (reference_logits(ckpt["model"], a, tokens) - hf).abs().max().item() < 1e-4

    # convert-checkpoint of the export gives back the same weights, bit for bit (fp32).
    convert.convert_checkpoint(tmp_path / "ckpt.pt", model_dir, tmp_path / "back", dtype="float32")
    before, after = weights_of(model_dir), weights_of(tmp_path / "back")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bf16_conversion_exports_to_the_very_tensors_it_came_from(source_checkpoint, tokenizer_dir, tmp_path):
    """bf16 -> convert -> export bf16: the original checkpoint's tensors and model_args, exactly."""
    convert.convert_checkpoint(source_checkpoint, tokenizer_dir, tmp_path / "m", dtype="bfloat16")
    export.export_checkpoint(tmp_path / "m", tmp_path / "ckpt.pt")
    exported = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    source = torch.load(source_checkpoint, weights_only=True)
    assert exported["model_args"] == source["model_args"]
    for key, tensor in source["model"].items():
        key = key.removeprefix("_orig_mod.")
        if "rope" in key:  # recomputed from rope_theta (in fp64; the fixture's fp32 angles drift by ~7e-6)
            assert (exported["model"][key] - tensor).abs().max() < 1e-5
        else:
            assert exported["model"][key].dtype == torch.bfloat16 and torch.equal(exported["model"][key], tensor), key


# ------------------------------------------------------------------ what the stages write


def test_sft_output_exports_from_the_cli_with_its_stages(memorised_sft, tmp_path):
    _, sft_out = memorised_sft
    exe = Path(sys.executable).with_name("export-checkpoint")
    run = subprocess.run(
        [exe, sft_out, "--output", tmp_path / "ckpt_sft.pt", "--verify", "--iter-num", "7"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    verify_line = next(ln for ln in run.stdout.splitlines() if ln.startswith("verify: "))
    assert float(verify_line.split("= ")[1].split()[0]) < 1e-4 and verify_line.endswith("OK")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_sft.pt"]  # no temporary file or lock left
    assert oct((tmp_path / "ckpt_sft.pt").stat().st_mode & 0o777) == oct(0o666 & ~umask())
    ckpt = torch.load(tmp_path / "ckpt_sft.pt", weights_only=True)
    assert ckpt["model_args"] == fixtures.tiny_model_args() and ckpt["iter_num"] == 7
    assert ckpt["model"]["blocks.0.ffn.w_out.weight"].dtype == torch.bfloat16  # the default dtype
    stages = ckpt["config"]["stages"].split(" -> ")
    assert stages[0].startswith("convert-checkpoint ") and stages[0].endswith("ckpt_000100.pt (iter_num 160000)")
    assert stages[1] == f"sft {sft_out}"
    assert ckpt["config"]["iter_num_from"] == "--iter-num" and "export-checkpoint" in ckpt["config"]["exported_by"]


@pytest.fixture(scope="module")
def lora_dpo(tmp_path_factory, memorised_sft, preference_data_dir):
    """A 2-step LoRA DPO run from the SFT output with merge_lora_after_training, started from its own directory
    with relative paths (as `make demo`'s recipes are): the recipe and adapter name the base relative to it."""
    _, sft_out = memorised_sft
    root = tmp_path_factory.mktemp("lora_run")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        recipe = write_recipe(
            "dpo",
            root / "dpo.yaml",
            os.path.relpath(sft_out, root),
            preference_data_dir,
            "runs/dpo",
            max_steps=2,
            eval_strategy="no",
            save_strategy="no",
            learning_rate=1e-2,
            use_peft=True,
            lora_r=8,
            lora_alpha=16,
            lora_target_modules=["q_proj", "k_proj", "v_proj"],
            merge_lora_after_training=True,
        )
        run_stage("dpo", recipe)
    finally:
        os.chdir(cwd)
    return root / "runs" / "dpo"


def test_lora_adapter_is_merged_on_export_like_the_merged_model(lora_dpo, memorised_sft, tmp_path):
    """The adapter directory (base found through the run's relative paths) exports to what its merged/ does."""
    assert (lora_dpo / "adapter_config.json").is_file() and not (lora_dpo / "config.json").exists()
    adapter = export.export_checkpoint(lora_dpo, tmp_path / "adapter.pt", dtype="float32", verify=True)
    merged = export.export_checkpoint(lora_dpo / MERGED_DIR, tmp_path / "merged.pt", dtype="float32", verify=True)
    assert adapter["verification"]["passed"] and merged["verification"]["passed"]
    assert adapter["stages"][1:] == [f"sft {memorised_sft[1]}", f"dpo {lora_dpo} (LoRA)"]
    assert merged["stages"][-1] == f"dpo {lora_dpo / MERGED_DIR} (LoRA, merged)"
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("adapter", "merged"))
    assert a["model_args"] == b["model_args"] == fixtures.tiny_model_args()
    assert all(torch.allclose(a["model"][k], b["model"][k], rtol=0, atol=1e-6) for k in b["model"])
    sft = export.export_checkpoint(memorised_sft[1], tmp_path / "sft.pt", dtype="float32")
    assert sft["model_args"] == a["model_args"]
    name = "blocks.1.attn.c_attn.weight"  # q, k, v carry the adapter
    assert not torch.allclose(torch.load(tmp_path / "sft.pt", weights_only=True)["model"][name], a["model"][name])


# ----------------------------------------------------------------------------- refusals


def edit_config(model_dir: Path, **fields) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(fields)
    (model_dir / "config.json").write_text(json.dumps(config))


def add_weight(model_dir: Path, key: str, tensor: torch.Tensor) -> None:
    tensors = load_file(model_dir / "model.safetensors")
    tensors[key] = tensor
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def qwen3_model(model_dir: Path, tokenizer_dir: Path) -> None:
    """A Qwen3 model directory: Llama-shaped, plus the q/k RMSNorm the format cannot hold."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=400, hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
    )
    Qwen3ForCausalLM(config).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model_dir)


def resize_vocab(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(402)
    model.save_pretrained(model_dir)


def refusal_cases(d: Path, base: Path, tokenizer_dir: Path) -> dict:
    """name -> (model dir, output path, the fragment the one-line error holds)."""

    def variant(name, edit=None, **config):
        m = d / name
        shutil.copytree(base, m)
        if config:
            edit_config(m, **config)
        if edit:
            edit(m)
        return m

    out_exists = d / "exists.pt"
    out_exists.write_bytes(b"an earlier export")
    adapter_alone = d / "adapter_alone"
    adapter_alone.mkdir()
    (adapter_alone / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "gone/base"}))
    qwen3 = d / "qwen3"
    qwen3_model(qwen3, tokenizer_dir)
    (d / "empty").mkdir()
    return {
        "attention_bias": (
            variant(
                "attn_bias",
                lambda m: add_weight(m, "model.layers.0.self_attn.q_proj.bias", torch.zeros(96)),
                attention_bias=True,
            ),
            "attention_bias is true, but the pre-training format has no attention biases",
        ),
        "mlp_bias_weight": (
            variant("mlp_bias", lambda m: add_weight(m, "model.layers.1.mlp.down_proj.bias", torch.zeros(96))),
            "weight 'model.layers.1.mlp.down_proj.bias' is a bias; the pre-training format has no biases",
        ),
        "qk_norm": (qwen3, "model_type 'qwen3' is not Llama (its q/k RMSNorm, QK-norm, has no place in the format)"),
        "rope_scaling": (
            variant("rope", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
            "RoPE scaling {'rope_type': 'linear', 'factor': 2.0} (rope_parameters)",
        ),
        "not_a_language_model": (
            variant("classifier", architectures=["LlamaForSequenceClassification"]),
            "architectures ['LlamaForSequenceClassification'] is not ['LlamaForCausalLM']",
        ),
        "resized_vocab": (
            variant("resized", resize_vocab),
            "vocab_size 402 no longer matches the original model_args' 400",
        ),
        "nan_weight": (
            variant("nan", lambda m: add_weight(m, "model.norm.weight", torch.full((96,), float("nan")))),
            "weight for 'final_norm.weight' holds NaN values; refusing to export it",
        ),
        "output_exists": (base, out_exists, "exists; pass --overwrite to replace it"),
        "output_inside_model_dir": (base, base / "ckpt.pt", "is inside the input directory"),
        "not_a_model_dir": (d / "empty", None, "is not a model directory (no config.json, no LoRA adapter)"),
        "adapter_without_base": (adapter_alone, None, "is a LoRA adapter whose base model"),
    }


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, tiny_model_dir, tokenizer_dir):
    d = tmp_path_factory.mktemp("refusals")
    cases = refusal_cases(d, tiny_model_dir, tokenizer_dir)
    return d, {name: (case if len(case) == 3 else (case[0], None, case[1])) for name, case in cases.items()}


@pytest.mark.parametrize(
    "case",
    [
        "attention_bias",
        "mlp_bias_weight",
        "qk_norm",
        "rope_scaling",
        "not_a_language_model",
        "resized_vocab",
        "nan_weight",
        "output_exists",
        "output_inside_model_dir",
        "not_a_model_dir",
        "adapter_without_base",
    ],
)
def test_what_the_format_cannot_hold_is_one_line_and_writes_nothing(refusals, tiny_model_dir, capsys, case):
    d, cases = refusals
    model_dir, output, fragment = cases[case]
    output = output or d / f"out_{case}.pt"
    before = output.read_bytes() if output.exists() else None
    listing = sorted(os.listdir(output.parent))
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(model_dir), "--output", str(output)])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and fragment in errors[0], err
    assert sorted(os.listdir(output.parent)) == listing  # no output, temporary file or lock left
    assert (output.read_bytes() if output.exists() else None) == before


def test_failed_verify_exits_2_and_leaves_nothing(trained, tmp_path, monkeypatch, capsys):
    """Without putting the RoPE rows back nothing errors, the logits are only wrong: --verify catches it."""
    monkeypatch.setattr(source_format, "rotate_half_to_interleaved", lambda w, n_heads: w)
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(trained["gqa"]), "--output", str(tmp_path / "ckpt.pt"), "--verify"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "FAILED" in captured.out
    assert captured.err.strip().splitlines()[-1].startswith("error: verification failed: max |logit diff|")
    assert float(captured.out.split("= ")[1].split()[0]) > 0.1
    assert os.listdir(tmp_path) == []


def test_module_cli_refuses_an_existing_output_and_replaces_it_with_overwrite(trained, tmp_path):
    out = tmp_path / "ckpt.pt"
    out.write_bytes(b"old")
    argv = [trained["mha"], "--output", out, "--dtype", "float32"]
    refused = subprocess.run([sys.executable, "-m", "posttrain.export", *argv], capture_output=True, text=True)
    assert_one_line_error(refused, f"output {out} exists; pass --overwrite to replace it")
    assert out.read_bytes() == b"old"
    export.main([*map(str, argv), "--overwrite"])
    assert torch.load(out, weights_only=True)["model_args"] == LAYOUTS["mha"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_atomic_output_file_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output_file(target, overwrite=True) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
    with atomic_output_file(target, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask()


def test_a_model_of_unknown_origin_gets_model_args_from_its_config(tiny_model_dir, tmp_path, capsys):
    """No conversion.json to follow: the config's fields, defaults for the rest, and a note saying so."""
    shutil.copytree(tiny_model_dir, tmp_path / "m", ignore=shutil.ignore_patterns("conversion.json"))
    report = export.export_checkpoint(tmp_path / "m", tmp_path / "ckpt.pt", iter_num=None)
    assert report["model_args"] == {**fixtures.tiny_model_args(), "activation": "silu"}
    assert report["iter_num"] == 0 and report["iter_num_from"] == "default"
    assert f"note: no conversion.json along {tmp_path / 'm'} (no conversion.json or recipe.resolved.yaml" in (
        capsys.readouterr().err
    )
