"""Convert a pre-training checkpoint (docs/source_format.md) into a
Hugging Face `LlamaForCausalLM` directory that computes exactly what the
original computed.

    convert-checkpoint CKPT --tokenizer qwen3|TOKENIZER_DIR --output-dir OUT \
        [--dtype bfloat16|float32] [--verify] [--overwrite]

`--tokenizer qwen3` is the built-in Qwen3 tokenizer pre-training used
(posttrain/qwen3_tokenizer.py); a directory is any tokenizer with the Qwen
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

import argparse
import json
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from posttrain import qwen3_tokenizer
from posttrain.atomic import atomic_output_dir, check_output_dir, output_lock
from posttrain.chat_template import ENDOFTEXT, IM_END, is_builtin_qwen3, load_chat_tokenizer
from posttrain.errors import PosttrainError, run_cli

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
PREFIXES = ("_orig_mod.", "module.")
# Buffers, not weights: RoPE tables (HF recomputes them from rope_theta) and the causal mask.
BUFFER_KEY = re.compile(r"blocks\.\d+\.attn\.(rope\.cos_cached|rope\.sin_cached|bias)")
REQUIRED_ARGS = ("vocab_size", "n_layer", "n_head", "n_embd", "d_ff", "norm_eps", "rope_theta", "block_size")
POSITIVE_INTS = ("vocab_size", "n_layer", "n_head", "n_embd", "d_ff", "block_size", "num_key_value_heads")
# model_args fields whose other values LlamaForCausalLM cannot represent exactly.
SUPPORTED = {
    "normalization": ("rmsnorm",),
    "norm_position": ("pre",),
    "position_encoding": ("rope",),
    "ffn_type": ("swiglu",),
    "bias": (False,),
}
# The source's SwiGLU block always applies SiLU to the gate: model_args['activation'] is read only by
# its other FFN, so any value is converted (and recorded in conversion.json as not applied).
SWIGLU_ACTIVATION = "silu"
MAX_SHARD_BYTES = 1 << 30  # 1 GiB: bounds the copies held at once when a dtype change is asked for
FP32_TOLERANCE = 1e-4
VERIFY_TOKENS = 32


# ----------------------------------------------------------------- the mapping


@dataclass(frozen=True)
class Rows:
    """Take rows [start, stop) of the source matrix; with rope_heads, also reorder
    each of those heads' rows from interleaved to rotate-half RoPE."""

    start: int
    stop: int
    rope_heads: int = 0


def interleaved_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """THE non-obvious transform. The original rotates adjacent pairs (0,1), (2,3), ...
    of each head (pair j by pos * theta^(-j/(D/2))); HF Llama rotates pairs (j, j+D/2)
    by the same angle. Reordering each head's q (and k) rows to [0, 2, ..., D-2, 1, 3,
    ..., D-1] puts original pair j at (j, j+D/2), so every pair rotates exactly as
    before, and q.k is unchanged because q and k get the same reordering. v is not
    rotated and keeps its order. Forgetting this raises no error, only wrong logits.
    """
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def weight_table(a: dict) -> list[tuple[str, str, Rows | None]]:
    """(target key, source key, transform): the whole conversion. None = copied as is."""
    E, H, KV = a["n_embd"], a["n_head"], a["num_key_value_heads"]
    KVD = KV * E // H
    table = [("model.embed_tokens.weight", "token_embeddings.weight", None)]
    for i in range(a["n_layer"]):
        s, t = f"blocks.{i}.", f"model.layers.{i}."
        table.append((t + "input_layernorm.weight", s + "norm1.weight", None))
        if KV == H:  # MHA: fused q, k, v row blocks
            table += [
                (t + "self_attn.q_proj.weight", s + "attn.c_attn.weight", Rows(0, E, rope_heads=H)),
                (t + "self_attn.k_proj.weight", s + "attn.c_attn.weight", Rows(E, 2 * E, rope_heads=H)),
                (t + "self_attn.v_proj.weight", s + "attn.c_attn.weight", Rows(2 * E, 3 * E)),
            ]
        else:  # GQA: q alone, then k rows and v rows fused
            table += [
                (t + "self_attn.q_proj.weight", s + "attn.c_q.weight", Rows(0, E, rope_heads=H)),
                (t + "self_attn.k_proj.weight", s + "attn.c_kv.weight", Rows(0, KVD, rope_heads=KV)),
                (t + "self_attn.v_proj.weight", s + "attn.c_kv.weight", Rows(KVD, 2 * KVD)),
            ]
        table += [
            (t + "self_attn.o_proj.weight", s + "attn.c_proj.weight", None),
            (t + "post_attention_layernorm.weight", s + "norm2.weight", None),
            (t + "mlp.gate_proj.weight", s + "ffn.w_gate.weight", None),
            (t + "mlp.up_proj.weight", s + "ffn.w_value.weight", None),
            (t + "mlp.down_proj.weight", s + "ffn.w_out.weight", None),
        ]
    table.append(("model.norm.weight", "final_norm.weight", None))
    if not a["weight_tying"]:  # tied: HF ties lm_head to embed_tokens itself
        table.append(("lm_head.weight", "lm_head.weight", None))
    return table


def source_shapes(a: dict) -> dict[str, tuple[int, ...]]:
    """Every weight the source state dict must hold, with its shape."""
    E, H, KV, F, V = a["n_embd"], a["n_head"], a["num_key_value_heads"], a["d_ff"], a["vocab_size"]
    shapes = {"token_embeddings.weight": (V, E), "final_norm.weight": (E,), "lm_head.weight": (V, E)}
    for i in range(a["n_layer"]):
        s = f"blocks.{i}."
        if KV == H:
            shapes[s + "attn.c_attn.weight"] = (3 * E, E)
        else:
            shapes[s + "attn.c_q.weight"] = (E, E)
            shapes[s + "attn.c_kv.weight"] = (2 * KV * (E // H), E)
        shapes.update(
            {
                s + "norm1.weight": (E,),
                s + "attn.c_proj.weight": (E, E),
                s + "norm2.weight": (E,),
                s + "ffn.w_gate.weight": (F, E),
                s + "ffn.w_value.weight": (F, E),
                s + "ffn.w_out.weight": (E, F),
            }
        )
    return shapes


def convert_tensor(src: torch.Tensor, rows: Rows | None, dtype: torch.dtype) -> torch.Tensor:
    if rows is not None:
        src = src[rows.start : rows.stop]  # a view: row blocks of a contiguous matrix stay contiguous
        if rows.rope_heads:
            src = interleaved_to_rotate_half(src, rows.rope_heads)
    return src.to(dtype).contiguous()


# ------------------------------------------------------------ reading the source


def load_checkpoint(path: Path) -> dict:
    """torch.load with mmap (the optimizer state is never read) and weights_only
    (a pickle that would import or call anything is refused before it runs)."""
    if not path.is_file():
        raise PosttrainError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise PosttrainError(f"checkpoint {path}: file is empty")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise PosttrainError(
            f"checkpoint {path} refused: it needs arbitrary unpickling, which a checkpoint of this format "
            f"never does ({detail or str(err).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise PosttrainError(
            f"checkpoint {path} cannot be read (truncated or not a torch.save zip file): "
            + str(err).splitlines()[0].split(". ")[0]
        ) from None
    if not isinstance(ckpt, dict):
        raise PosttrainError(f"checkpoint {path} holds a {type(ckpt).__name__}, not the expected dict")
    for key in ("model", "model_args"):
        if not isinstance(ckpt.get(key), dict):
            raise PosttrainError(f"checkpoint {path} has no '{key}' dict (keys: {sorted(map(str, ckpt))})")
    return ckpt


def check_model_args(model_args: dict, path: Path) -> dict:
    """Fail on anything LlamaForCausalLM cannot compute exactly, naming field and value."""
    a = dict(model_args)
    for field in REQUIRED_ARGS + tuple(SUPPORTED) + ("weight_tying",):
        if field not in a:
            raise PosttrainError(f"{path}: model_args lacks the field '{field}'")
    for field, accepted in SUPPORTED.items():
        if a[field] not in accepted:
            raise PosttrainError(
                f"{path}: unsupported architecture: model_args['{field}'] = {a[field]!r} "
                f"(LlamaForCausalLM can represent only {' or '.join(map(repr, accepted))})"
            )
    a["num_key_value_heads"] = a.get("num_key_value_heads") or a["n_head"]
    for field in POSITIVE_INTS:
        if type(a[field]) is not int or a[field] < 1:
            raise PosttrainError(f"{path}: model_args['{field}'] = {a[field]!r} is not a positive integer")
    for field, word in (("norm_eps", "non-negative"), ("rope_theta", "positive")):
        value = a[field]
        if type(value) not in (int, float) or not (value > 0 or (value == 0 and field == "norm_eps")):
            raise PosttrainError(f"{path}: model_args['{field}'] = {value!r} is not a {word} number")
    E, H, KV = a["n_embd"], a["n_head"], a["num_key_value_heads"]
    if E % H or (E // H) % 2 or H % KV:
        raise PosttrainError(
            f"{path}: model_args n_embd={E}, n_head={H}, num_key_value_heads={KV} do not give an even "
            "head dim with KV heads dividing the query heads"
        )
    return a


def check_rope_table(cos_cached: torch.Tensor | None, a: dict, path: Path) -> None:
    """The RoPE table we drop must be the one HF recomputes from model_args' rope_theta.
    A rope_theta that disagrees with training would pass --verify (both sides read
    model_args) and still be wrong; the table the checkpoint carries settles it."""
    if cos_cached is None:
        print(
            f"note: {path} carries no RoPE table (blocks.0.attn.rope.cos_cached), so rope_theta and the head "
            "count in model_args could not be cross-checked against it",
            file=sys.stderr,
        )
        return
    half = a["n_embd"] // a["n_head"] // 2
    table = cos_cached.float().reshape(-1, half) if cos_cached.numel() % half == 0 else None
    if table is not None:
        from posttrain.source_model import rope_angles

        angles = rope_angles(table.shape[0], 2 * half, a["rope_theta"], dtype=torch.float64)
        error = (table.double() - angles.cos()).abs().max().item()
    if table is None or error > 1e-2:  # 1e-2: above bf16 rounding of a [-1, 1] table
        raise PosttrainError(
            f"{path}: buffer 'blocks.0.attn.rope.cos_cached' {list(cos_cached.shape)} is not the RoPE table of "
            f"rope_theta={a['rope_theta']} with head dim {2 * half}; model_args disagree with the trained model"
        )


def source_weights(state_dict: dict, a: dict, path: Path) -> dict[str, torch.Tensor]:
    """Strip prefixes, drop buffers, and check every key, type and shape against model_args."""
    weights, buffers, origin = {}, {}, {}
    for key, tensor in state_dict.items():
        name = key
        while name.startswith(PREFIXES):
            name = name.split(".", 1)[1]
        if name in origin:
            raise PosttrainError(
                f"{path}: model keys '{origin[name]}' and '{key}' are both '{name}' without their prefixes"
            )
        origin[name] = key
        is_buffer = BUFFER_KEY.fullmatch(name)
        if not isinstance(tensor, torch.Tensor) or not (is_buffer or tensor.is_floating_point()):
            kind = f"a {tensor.dtype} tensor" if isinstance(tensor, torch.Tensor) else f"a {type(tensor).__name__}"
            raise PosttrainError(f"{path}: model['{key}'] is {kind}, not a floating-point tensor")
        (buffers if is_buffer else weights)[name] = tensor
    check_rope_table(buffers.get("blocks.0.attn.rope.cos_cached"), a, path)
    expected = source_shapes(a)
    if a["weight_tying"]:
        # torch.save keeps a tied head as the very same storage; accept it or its absence.
        head, emb = weights.pop("lm_head.weight", None), weights.get("token_embeddings.weight")
        if head is not None and emb is not None and head.data_ptr() != emb.data_ptr() and not torch.equal(head, emb):
            raise PosttrainError(
                f"{path}: weight_tying is True but lm_head.weight differs from token_embeddings.weight"
            )
        del expected["lm_head.weight"]
    for name, shape in expected.items():
        if name not in weights:
            raise PosttrainError(f"{path}: missing weight '{name}' (expected shape {list(shape)})")
        if tuple(weights[name].shape) != shape:
            raise PosttrainError(
                f"{path}: weight '{name}' has shape {list(weights[name].shape)}, model_args imply {list(shape)}"
            )
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise PosttrainError(f"{path}: unexpected weight '{unexpected[0]}' ({len(unexpected)} unexpected in all)")
    return weights


def check_vocab(tokenizer, tokenizer_name: str, vocab_size: int) -> None:
    """The tokenizer must fit the embedding, and use the chat token ids training used where known."""
    if len(tokenizer) > vocab_size:
        raise PosttrainError(
            f"tokenizer {tokenizer_name} has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}"
        )
    if vocab_size != qwen3_tokenizer.VOCAB_SIZE and not is_builtin_qwen3(tokenizer_name):
        return  # another vocabulary: the ids training used are not known
    for token, trained_id in qwen3_tokenizer.CHAT_TOKEN_IDS.items():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id != trained_id:
            raise PosttrainError(
                f"tokenizer {tokenizer_name} has {token} = {token_id}, but this checkpoint (vocab_size {vocab_size}, "
                f"the Qwen3 vocabulary) was trained with {token} = {trained_id}; pass the tokenizer pre-training "
                "used (--tokenizer qwen3)"
            )


# ---------------------------------------------------------------- writing the model


def llama_config(a: dict, dtype: str, eos: list[int] | None = None):
    """The LlamaForCausalLM config that computes what the source model `a` (its model_args) computed;
    `eos`: [<|im_end|>, <|endoftext|>] ids, the second also the padding id."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=a["vocab_size"],
        hidden_size=a["n_embd"],
        intermediate_size=a["d_ff"],
        num_hidden_layers=a["n_layer"],
        num_attention_heads=a["n_head"],
        num_key_value_heads=a["num_key_value_heads"],
        head_dim=a["n_embd"] // a["n_head"],
        hidden_act=SWIGLU_ACTIVATION,
        max_position_embeddings=a["block_size"],
        rms_norm_eps=a["norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": float(a["rope_theta"])},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=bool(a["weight_tying"]),
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=eos[1] if eos else None,
        architectures=["LlamaForCausalLM"],
        dtype=dtype,
    )


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
    from posttrain.source_model import reference_logits

    n = min(VERIFY_TOKENS, a["block_size"])
    tokens = torch.randint(0, a["vocab_size"], (1, n), generator=torch.Generator().manual_seed(0))
    return tokens, reference_logits(weights, a, tokens, weight_dtype=dtype)


def verify_logits(model_dir: Path, tokens: torch.Tensor, expected: torch.Tensor, dtype: str) -> dict:
    """Max |logit difference| between the converted model (loaded in fp32) and the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        diff = (model(tokens).logits - expected).abs().max().item()
    return {
        "max_abs_logit_diff": diff,
        "tolerance": FP32_TOLERANCE,
        "tokens": tokens.shape[1],
        "compute_dtype": "float32",
        "weights_dtype": dtype,
        "passed": diff <= FP32_TOLERANCE,
    }


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
            result = verify_logits(tmp, *reference, dtype)
            report["verification"] = result
            print(
                f"verify: max |logit diff| = {result['max_abs_logit_diff']:.3e} over {result['tokens']} tokens "
                f"(tolerance {result['tolerance']:.0e}, fp32 compute, {result['weights_dtype']} weights): "
                + ("OK" if result["passed"] else "FAILED")
            )
            if not result["passed"]:
                raise PosttrainError(
                    f"verification failed: max |logit diff| {result['max_abs_logit_diff']:.3e} exceeds "
                    f"{result['tolerance']:.0e}; nothing was written to {output_dir}"
                )
        (tmp / "conversion.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="convert-checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="ckpt_NNNNNN.pt written by the pre-training system")
    parser.add_argument(
        "--tokenizer", required=True, help="qwen3 (the built-in Qwen3 tokenizer) or a tokenizer directory"
    )
    parser.add_argument("--output-dir", required=True, help="where the Hugging Face model directory goes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--verify", action="store_true", help="compare logits with a reference forward")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)

    def run():
        with output_lock(args.output_dir):  # before the inputs are read: a second run is refused at once
            report = convert_checkpoint(
                args.checkpoint,
                args.tokenizer,
                args.output_dir,
                args.dtype,
                verify=args.verify,
                overwrite=args.overwrite,
            )
        print(f"wrote {args.output_dir} ({report['shards']} shard(s), {args.dtype}, iter_num {report['iter_num']})")

    run_cli(run)


if __name__ == "__main__":
    main()
