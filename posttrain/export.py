"""Export a Hugging Face model directory (convert-checkpoint, SFT or DPO output) back into the
pre-training checkpoint format (docs/source_format.md), for the pre-training system's own tools.

    export-checkpoint MODEL_DIR --output CKPT.pt [--dtype bfloat16|float32] [--iter-num N] [--verify] [--overwrite]

The file holds `model` (the source's key names, q/k rows back in interleaved RoPE order, a tied head
as the embedding tensor itself, the RoPE and mask buffers), `model_args`, `iter_num`,
`best_val_loss` and `config` (provenance), and no optimizer state; it loads with
`torch.load(weights_only=True)`. `model_args` are the original's (from conversion.json, found by
following each stage's recipe.resolved.yaml back to the converted directory) with every field the
model's config.json holds taken from it. A LoRA adapter directory is merged into its base model on
export (as `merge_lora_after_training` would). What the format cannot hold is refused: biases,
QK-norm, RoPE scaling, another architecture, a resized vocabulary.

Memory: the safetensors files are read one tensor at a time, so the peak is about the exported model.
--verify first runs the Hugging Face model in fp32 (with its mapped shards ~3x a bf16 model, as
convert-checkpoint --verify), freed before the export is built. It reads the written file back as convert-checkpoint would and compares its reference
forward (posttrain/conversion/source_model.py) with the Hugging Face model's logits; above 1e-4
nothing is left.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from posttrain import __version__
from posttrain.conversion.source_format import (
    DTYPES,
    check_model_args,
    check_vocab,
    hf_shapes,
    hf_to_source,
    load_checkpoint,
    model_args_from_config,
    source_buffers,
    source_weights,
)
from posttrain.conversion.source_model import reference_logits
from posttrain.convert import checkpoint_cli, compare_logits, non_finite, report_verification, verify_tokens
from posttrain.data.loading import load_errors
from posttrain.outputs.atomic import atomic_output_file, check_output_file
from posttrain.outputs.errors import PosttrainError
from posttrain.outputs.flags import ArgumentParser
from posttrain.training.recipe import MERGED_DIR, RESOLVED_RECIPE_NAME

CONVERSION_REPORT = "conversion.json"
MAX_STAGES = 64  # a recipe chain longer than this is a loop of model_name_or_path


# --------------------------------------------------------------------- where the model came from


@dataclass
class Lineage:
    """The stages that made a model directory, oldest first, and what convert-checkpoint recorded."""

    stages: list[str] = field(default_factory=list)
    conversion: dict | None = None  # conversion.json of the converted directory the chain starts from
    base: Path | None = None  # the model the newest stage started from (a LoRA adapter's base)


def run_dir_of(d: Path) -> Path | None:
    """The training run a model directory belongs to: itself, or the run holding it as `merged/` or
    `checkpoint-N/`; None if it is no training run."""
    if (d / RESOLVED_RECIPE_NAME).is_file():
        return d
    if (d.name == MERGED_DIR or d.name.startswith("checkpoint-")) and (d.parent / RESOLVED_RECIPE_NAME).is_file():
        return d.parent
    return None


def path_in_run(name: str, output_dir: str | None, run: Path) -> Path:
    """A path a recipe names, as the run saw it. A relative one was relative to the directory the run was
    started from: the run directory less its own relative output_dir (`demo_runs/dpo` in /home/me/demo_runs/dpo
    means /home/me), else the current directory."""
    path, out = Path(name), Path(output_dir or "")
    n = len(out.parts)
    if not path.is_absolute() and output_dir and not out.is_absolute() and run.parts[-n:] == out.parts:
        path = Path(*run.parts[:-n]) / path
    return path.resolve()


def read_lineage(model_dir: Path) -> Lineage:
    """Follow model_name_or_path from each run's recipe.resolved.yaml back to convert-checkpoint's output."""
    lineage, d = Lineage(), model_dir.resolve()
    for _ in range(MAX_STAGES):
        report = d / CONVERSION_REPORT
        if report.is_file():
            with load_errors(f"{report} cannot be read"):
                lineage.conversion = json.loads(report.read_text(encoding="utf-8"))
            lineage.stages.append(
                f"convert-checkpoint {lineage.conversion.get('source')} (iter_num {lineage.conversion.get('iter_num')})"
            )
            break
        run = run_dir_of(d)
        if run is None:
            lineage.stages.append(f"{d} (no {CONVERSION_REPORT} or {RESOLVED_RECIPE_NAME}: origin unknown)")
            break
        with load_errors(f"{run / RESOLVED_RECIPE_NAME} cannot be read"):
            recipe = yaml.safe_load((run / RESOLVED_RECIPE_NAME).read_text(encoding="utf-8")) or {}
        stage = "dpo" if "beta" in recipe else "sft"  # DPOConfig's beta: a key SFTConfig lacks
        lora = f" (LoRA{', merged' if d != run else ''})" if recipe.get("use_peft") else ""
        lineage.stages.append(f"{stage} {d}{lora}")
        parent = recipe.get("model_name_or_path")
        base = path_in_run(str(parent), recipe.get("output_dir"), run) if parent else None
        if lineage.base is None:
            lineage.base = base
        if base is None or not base.is_dir():
            lineage.stages.append(f"{parent} (not found: origin unknown)")
            break
        d = base
    lineage.stages.reverse()
    return lineage


# --------------------------------------------------------------------- reading the model


class SafetensorsWeights(Mapping):
    """The tensors of a model directory's safetensors file(s), each read only when asked for."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            with load_errors(f"{index} cannot be read"):
                where = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        elif (model_dir / "model.safetensors").is_file():
            where = None
        else:
            raise PosttrainError(f"{model_dir}: no model.safetensors (or its index) to export")
        self.files, self.where, self.shapes = {}, {}, {}
        for name in sorted(set(where.values())) if where else ["model.safetensors"]:
            with load_errors(f"{model_dir / name} is not readable"):
                f = self.files[name] = safe_open(model_dir / name, framework="pt")
                for key in f.keys():
                    self.where[key], self.shapes[key] = name, tuple(f.get_slice(key).get_shape())

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.files[self.where[key]].get_tensor(key)

    def __iter__(self):
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def merged_adapter(model_dir: Path, base: Path | None):
    """A LoRA adapter directory merged into its base model (in memory), as merge_lora_after_training does."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if base is None:
        with load_errors(f"{model_dir / 'adapter_config.json'} cannot be read"):
            named = json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = Path(named).resolve()
    if not (base / "config.json").is_file():
        raise PosttrainError(
            f"{model_dir} is a LoRA adapter whose base model {base} is not a model directory here; "
            f"export the run's {MERGED_DIR}/ (merge_lora_after_training: true) or restore the base model there"
        )
    print(f"note: {model_dir} is a LoRA adapter: merging it into its base model {base}", file=sys.stderr)
    with load_errors(f"{model_dir}: the adapter cannot be merged into {base}"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft 0.21 asks transformers 5.24 a deprecated question
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
        return PeftModel.from_pretrained(model, model_dir).merge_and_unload()


def check_weights(weights: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple], a: dict, path: Path) -> None:
    """Every weight the format needs, with its shape (`shapes`: read from the file headers), and nothing it
    cannot hold."""
    expected = hf_shapes(a)
    for key, shape in expected.items():
        if key not in shapes:
            raise PosttrainError(f"{path}: missing weight '{key}' (expected shape {list(shape)})")
        if tuple(shapes[key]) != shape:
            raise PosttrainError(
                f"{path}: weight '{key}' has shape {list(shapes[key])}, config.json implies {list(shape)}"
            )
    extra = sorted(set(shapes) - set(expected) - ({"lm_head.weight"} if a["weight_tying"] else set()))
    for key in extra:
        if key.endswith(".bias"):
            raise PosttrainError(f"{path}: weight '{key}' is a bias; the pre-training format has no biases")
        if "q_norm" in key or "k_norm" in key:
            raise PosttrainError(f"{path}: weight '{key}' is a QK-norm; the pre-training format has no QK-norm")
    if extra:
        raise PosttrainError(f"{path}: unexpected weight '{extra[0]}' ({len(extra)} unexpected in all)")
    head, embedding = "lm_head.weight", "model.embed_tokens.weight"
    if a["weight_tying"] and head in shapes and not torch.equal(weights[head], weights[embedding]):
        raise PosttrainError(f"{path}: tie_word_embeddings is true but lm_head.weight differs from the embedding")


# --------------------------------------------------------------------- the export


def hf_logits(model, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The Hugging Face model's fp32 logits, its weights first rounded to the export dtype: the reference
    then runs on bit-identical weights and the two differ only in summation order (as in convert-checkpoint).
    Only the parameters are rounded: the RoPE inv_freq buffer stays fp32, as transformers keeps it."""
    model = model.float().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(dtype))
        return model(tokens).logits


@dataclass
class OpenModel:
    """A model directory opened for export: its config, its weights (read lazily) with their shapes, and how to
    get the Hugging Face model itself for --verify."""

    config: object
    weights: Mapping[str, torch.Tensor]
    shapes: Mapping[str, tuple]
    load_model: Callable[[], object]


def open_model(model_dir: Path, lineage: Lineage) -> OpenModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        merged = merged_adapter(model_dir, lineage.base)
        weights = merged.state_dict()
        return OpenModel(merged.config, weights, {k: tuple(v.shape) for k, v in weights.items()}, lambda: merged)
    if not (model_dir / "config.json").is_file():
        raise PosttrainError(f"{model_dir} is not a model directory (no config.json, no LoRA adapter)")
    with load_errors(f"{model_dir}: its config.json cannot be read"):
        config = AutoConfig.from_pretrained(model_dir)
    weights = SafetensorsWeights(model_dir)

    def load_model():
        with load_errors(f"{model_dir}: the model cannot be loaded"):
            return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    return OpenModel(config, weights, weights.shapes, load_model)


def provenance(model_dir: Path, lineage: Lineage, dtype: str, iter_from: str) -> dict:
    """The checkpoint's `config` entry: plain strings, like the training settings the format keeps there."""
    entry = {
        "exported_by": f"posttrain {__version__} export-checkpoint",
        "model_dir": str(model_dir.resolve()),
        "stages": " -> ".join(lineage.stages),
        "dtype": dtype,
        "iter_num_from": iter_from,
    }
    if lineage.conversion and lineage.conversion.get("source"):
        entry["source_checkpoint"] = str(lineage.conversion["source"])
    return entry


def export_checkpoint(
    model_dir,
    output,
    dtype: str = "bfloat16",
    iter_num: int | None = None,
    verify: bool = False,
    overwrite: bool = False,
) -> dict:
    """Export; return the report (what was written and where it came from).

    Every input is checked before anything is written; the file appears only complete (a temporary
    sibling renamed into place), and not at all if --verify fails.
    """
    from transformers import AutoTokenizer

    model_dir, output = Path(model_dir), Path(output)
    if dtype not in DTYPES:
        raise PosttrainError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if not model_dir.is_dir():
        raise PosttrainError(f"model directory {model_dir} does not exist")
    check_output_file(output, overwrite, (model_dir,))
    lineage = read_lineage(model_dir)
    conversion = lineage.conversion or {}
    model = open_model(model_dir, lineage)
    a, notes = model_args_from_config(model.config, conversion.get("model_args"), model_dir)
    a_checked = check_model_args(a, model_dir)  # as convert-checkpoint will read them back
    check_weights(model.weights, model.shapes, a_checked, model_dir)
    with load_errors(f"{model_dir}: its tokenizer cannot be loaded (it is how the vocabulary is checked)"):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    check_vocab(tokenizer, str(model_dir), a_checked["vocab_size"])
    if "model_args" not in conversion:
        notes.append(
            f"no {CONVERSION_REPORT} along {' -> '.join(lineage.stages)}: model_args fields config.json lacks "
            "(activation, attention_backend, dropouts, ffn_expansion_ratio) take defaults"
        )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if iter_num is not None:
        iter_from = "--iter-num"
    elif type(conversion.get("iter_num")) is int:
        iter_num, iter_from = conversion["iter_num"], CONVERSION_REPORT
    else:
        iter_num, iter_from = 0, "default"

    target = DTYPES[dtype]
    if verify:  # the Hugging Face side first, so its fp32 copy is gone before the export is built
        tokens = verify_tokens(a_checked)
        logits = hf_logits(model.load_model(), tokens, target)
    state = {}
    for key, tensor in hf_to_source(model.weights, a_checked, target):
        bad = non_finite(tensor)
        if bad:
            raise PosttrainError(f"{model_dir}: weight for '{key}' holds {bad} values; refusing to export it")
        state[key] = tensor
    report = {"output": str(output), "model_args": a, "iter_num": iter_num, "iter_num_from": iter_from}
    report.update(stages=lineage.stages, dtype=dtype, weights=len(state), verification=None)
    state.update(source_buffers(a_checked))
    del model
    ckpt = {
        "model": state,
        "model_args": a,
        "iter_num": iter_num,
        "best_val_loss": math.inf,  # never measured on the pre-training validation set
        "config": provenance(model_dir, lineage, dtype, iter_from),
    }
    needed = sum(t.numel() * t.element_size() for t in {id(t): t for t in state.values()}.values())
    with atomic_output_file(output, overwrite=overwrite, inputs=(model_dir,), needed_bytes=needed) as tmp:
        torch.save(ckpt, tmp)
        del ckpt, state
        if verify:  # the file as convert-checkpoint reads it: mmap, weights_only, every check
            written = load_checkpoint(tmp)
            back = check_model_args(written["model_args"], tmp)
            expected = reference_logits(source_weights(written["model"], back, tmp), back, tokens)
            report["verification"] = compare_logits(logits, expected, dtype)
            del written
            report_verification(report["verification"], output)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="export-checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a convert-checkpoint, SFT or DPO output (or a LoRA run's adapter)")
    parser.add_argument("--output", required=True, help="the checkpoint file to write, e.g. ckpt_160000.pt")
    parser.add_argument(
        "--iter-num", type=int, default=None, help="iter_num to record (default: the converted checkpoint's, else 0)"
    )
    checkpoint_cli(
        parser,
        argv,
        "output",
        ("compare logits of the written file with the model's", "replace an existing output file"),
        lambda a: export_checkpoint(
            a.model_dir, a.output, a.dtype, iter_num=a.iter_num, verify=a.verify, overwrite=a.overwrite
        ),
        lambda a, report: (
            f"wrote {a.output} ({report['weights']} weights, {a.dtype}, iter_num {report['iter_num']} "
            f"from {report['iter_num_from']}); stages: {' -> '.join(report['stages'])}"
        ),
    )


if __name__ == "__main__":
    main()
