"""Convert a pre-training checkpoint (docs/source_format.md) into a
Hugging Face `LlamaForCausalLM` directory that computes exactly what the
original computed.

    convert-checkpoint CKPT --tokenizer qwen3|TOKENIZER_DIR --output-dir OUT \
        [--dtype bfloat16|float32] [--verify] [--overwrite]

`--tokenizer qwen3` is the built-in Qwen3 tokenizer pre-training used
(posttrain/conversion/qwen3_tokenizer.py); a directory is any tokenizer with the Qwen
special tokens. The tokenizer must fit the checkpoint: no more tokens than its
vocab_size, and, when the ids training used are known, the same
`<|endoftext|>`, `<|im_start|>`, `<|im_end|>` ids. They are known when the
checkpoint has Qwen3's vocab_size (151669: pre-training used the Qwen3
tokenizer) or the tokenizer is `qwen3`; then they must be 151643, 151644,
151645.

Why Llama and not Qwen3: the original has no QK-norm, and Qwen3ForCausalLM
always applies one; LlamaForCausalLM without biases is exactly this model.

Memory: the checkpoint is opened with `mmap=True, weights_only=True`, so the
optimizer state (2x the model) is never read, and tensors are converted and
written one safetensors shard at a time straight from the mapped file. Only the
permuted q/k rows (and a dtype change, if asked for) are copied.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from posttrain.conversion import qwen3_tokenizer
from posttrain.conversion.chat_template import ENDOFTEXT, IM_END
from posttrain.conversion.source_format import (
    DTYPES,
    SWIGLU_ACTIVATION,
    Rows,
    check_model_args,
    check_vocab,
    interleaved_to_rotate_half,
    llama_config,
    load_checkpoint,
    source_weights,
    weight_table,
)
from posttrain.conversion.tokenizer import is_builtin_qwen3, load_chat_tokenizer
from posttrain.outputs.atomic import atomic_output_dir, check_output_dir
from posttrain.outputs.errors import PosttrainError, run_cli
from posttrain.outputs.flags import ArgumentParser
from posttrain.outputs.lock import output_lock

MAX_SHARD_BYTES = 1 << 30  # 1 GiB: bounds the copies held at once when a dtype change is asked for
FP32_TOLERANCE = 1e-4
VERIFY_TOKENS = 32


def convert_tensor(src: torch.Tensor, rows: Rows | None, dtype: torch.dtype) -> torch.Tensor:
    if rows is not None:
        src = src[rows.start : rows.stop]  # a view: row blocks of a contiguous matrix stay contiguous
        if rows.rope_heads:
            src = interleaved_to_rotate_half(src, rows.rope_heads)
    return src.to(dtype).contiguous()


def entry_bytes(weights: dict, source: str, rows: Rows | None, dtype: torch.dtype) -> int:
    """Bytes one table entry takes in the output."""
    src = weights[source]
    numel = src[rows.start : rows.stop].numel() if rows else src.numel()
    return numel * torch.empty((), dtype=dtype).element_size()


def non_finite(t: torch.Tensor) -> str | None:
    """'NaN' or 'Inf' if the tensor holds one, else None. min and max propagate NaN and show an Inf, and
    one aminmax pass makes no copy: ~10x faster than isfinite(t).all() on bf16, ~1.5 s for 1.8B weights."""
    if not t.numel():
        return None
    lo, hi = torch.aminmax(t)
    if torch.isfinite(lo) and torch.isfinite(hi):
        return None
    return "NaN" if torch.isnan(lo) or torch.isnan(hi) else "Inf"


def write_shards(out: Path, weights: dict, table: list, dtype: torch.dtype) -> int:
    """Write the table as safetensors shards, one shard in memory at a time; return the shard count.
    A weight holding NaN or Inf stops the write, naming its source key."""
    shards, size = [[]], 0
    for target, source, rows in table:
        n_bytes = entry_bytes(weights, source, rows, dtype)
        if shards[-1] and size + n_bytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((target, source, rows))
        size += n_bytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        tensors = {}
        for target, source, rows in shard:
            tensors[target] = convert_tensor(weights[source], rows, dtype)
            bad = non_finite(tensors[target])
            if bad:
                raise PosttrainError(f"checkpoint weight '{source}' holds {bad} values; refusing to convert it")
        save_file(tensors, out / name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return len(names)


def reference_for_verify(weights: dict, a: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed token sequence and the original architecture's fp32 logits for it.

    The reference first rounds the source weights to the output dtype, so it and the
    converted model use bit-identical weights and differ only in summation order
    (~1e-6). That makes the fp32 tolerance, 1e-4, right for bf16 output too: a
    bf16-arithmetic tolerance (~5e-2) would hide small mapping errors, while the
    missing RoPE permutation moves the tiny models' logits by ~0.5.
    """
    from posttrain.conversion.source_model import reference_logits

    tokens = verify_tokens(a)
    return tokens, reference_logits(weights, a, tokens, weight_dtype=dtype)


def verify_tokens(a: dict) -> torch.Tensor:
    """The fixed token sequence --verify compares logits on (also export-checkpoint's)."""
    n = min(VERIFY_TOKENS, a["block_size"])
    return torch.randint(0, a["vocab_size"], (1, n), generator=torch.Generator().manual_seed(0))


def compare_logits(logits: torch.Tensor, expected: torch.Tensor, dtype: str) -> dict:
    """The verification result: max |logit difference| of two fp32 forwards on the same tokens."""
    diff = (logits - expected).abs().max().item()
    return {
        "max_abs_logit_diff": diff,
        "tolerance": FP32_TOLERANCE,
        "tokens": logits.shape[1],
        "compute_dtype": "float32",
        "weights_dtype": dtype,
        "passed": diff <= FP32_TOLERANCE,
    }


def verify_logits(model_dir: Path, tokens: torch.Tensor, expected: torch.Tensor, dtype: str) -> dict:
    """Max |logit difference| between the converted model (loaded in fp32) and the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return compare_logits(model(tokens).logits, expected, dtype)


def report_verification(result: dict, output) -> None:
    """Print the verify line; a failed check is a PosttrainError saying nothing was written to `output`."""
    print(
        f"verify: max |logit diff| = {result['max_abs_logit_diff']:.3e} over {result['tokens']} tokens "
        f"(tolerance {result['tolerance']:.0e}, fp32 compute, {result['weights_dtype']} weights): "
        + ("OK" if result["passed"] else "FAILED")
    )
    if not result["passed"]:
        raise PosttrainError(
            f"verification failed: max |logit diff| {result['max_abs_logit_diff']:.3e} exceeds "
            f"{result['tolerance']:.0e}; nothing was written to {output}"
        )


def convert_checkpoint(
    ckpt_path,
    tokenizer_dir,
    output_dir,
    dtype: str = "bfloat16",
    verify: bool = False,
    overwrite: bool = False,
) -> dict:
    """Convert; return the report that is also written as OUT/conversion.json.

    Every input is checked before anything is written; the output appears only
    complete (written to a temporary sibling, renamed into place), and not at all
    if --verify fails.
    """
    ckpt_path, output_dir = Path(ckpt_path), Path(output_dir)
    if dtype not in DTYPES:
        raise PosttrainError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    builtin = is_builtin_qwen3(tokenizer_dir)
    inputs = (ckpt_path,) if builtin else (ckpt_path, tokenizer_dir)
    check_output_dir(output_dir, overwrite, inputs)
    tokenizer = load_chat_tokenizer(tokenizer_dir)  # before the checkpoint: a typo fails in a second
    ckpt = load_checkpoint(ckpt_path)
    a = check_model_args(ckpt["model_args"], ckpt_path)
    weights = source_weights(ckpt["model"], a, ckpt_path)
    check_vocab(tokenizer, str(tokenizer_dir), a["vocab_size"])
    table = weight_table(a)

    report = {
        "source": str(ckpt_path.resolve()),
        "iter_num": ckpt.get("iter_num"),
        "model_args": ckpt["model_args"],
        "ffn": {"type": "swiglu", "model_args_activation": a.get("activation"), "applied": SWIGLU_ACTIVATION},
        "dtype": dtype,
        "tokenizer": f"{qwen3_tokenizer.NAME} (built in, {qwen3_tokenizer.PACKAGE})"
        if builtin
        else str(Path(tokenizer_dir).resolve()),
        "verification": None,
    }
    reference = reference_for_verify(weights, a, DTYPES[dtype]) if verify else None
    needed = sum(entry_bytes(weights, source, rows, DTYPES[dtype]) for _, source, rows in table)
    with atomic_output_dir(output_dir, overwrite=overwrite, inputs=inputs, needed_bytes=needed) as tmp:
        report["shards"] = write_shards(tmp, weights, table, DTYPES[dtype])
        del ckpt, weights  # unmap the source before verify loads an fp32 copy of the model
        eos = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
        config = llama_config(a, dtype, eos)
        config.save_pretrained(tmp)
        from transformers import GenerationConfig

        GenerationConfig(
            bos_token_id=None, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        ).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if reference is not None:
            report["verification"] = verify_logits(tmp, *reference, dtype)
            report_verification(report["verification"], output_dir)
        (tmp / "conversion.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def checkpoint_cli(parser, argv, output_key: str, helps: tuple[str, str], work, summary) -> None:
    """The end of convert-checkpoint's and export-checkpoint's command lines: `--dtype`, `--verify` and
    `--overwrite` (`helps` of the last two), `work(args)` under the output's lock, taken before any input is
    read so that a second run is refused at once, then the `summary(args, report)` line; bad input one line."""
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="weights dtype (default bfloat16)")
    parser.add_argument("--verify", action="store_true", help=helps[0])
    parser.add_argument("--overwrite", action="store_true", help=helps[1])
    args = parser.parse_args(argv)

    def run():
        with output_lock(getattr(args, output_key)):
            report = work(args)
        print(summary(args, report))

    run_cli(run)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="convert-checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="ckpt_NNNNNN.pt written by the pre-training system")
    parser.add_argument(
        "--tokenizer", required=True, help="qwen3 (the built-in Qwen3 tokenizer) or a tokenizer directory"
    )
    parser.add_argument("--output-dir", required=True, help="where the Hugging Face model directory goes")
    checkpoint_cli(
        parser,
        argv,
        "output_dir",
        ("compare logits with a reference forward", "replace a non-empty output directory"),
        lambda a: convert_checkpoint(
            a.checkpoint, a.tokenizer, a.output_dir, a.dtype, verify=a.verify, overwrite=a.overwrite
        ),
        lambda a, report: (
            f"wrote {a.output_dir} ({report['shards']} shard(s), {a.dtype}, iter_num {report['iter_num']})"
        ),
    )


if __name__ == "__main__":
    main()
