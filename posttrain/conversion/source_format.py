"""The pre-training checkpoint format (docs/source_format.md), and the Hugging Face Llama model that
computes exactly what it computes: one place that knows both sides, for `convert-checkpoint` and its
way back.

Why Llama and not Qwen3: the original has no QK-norm, and Qwen3ForCausalLM always applies one;
LlamaForCausalLM without biases is exactly this model. The whole mapping is `weight_table`: source
key -> target key, with the one non-obvious transform (the RoPE permutation) explained where it
happens; `export-checkpoint` reads the same table backwards (`hf_to_source`). Reading checks every key,
shape, dtype and `model_args` field against what Llama can represent, and names what it refuses; the
way back checks that the Hugging Face model is still one the format can hold (`model_args_from_config`).
"""

from __future__ import annotations

import pickle
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.conversion import qwen3_tokenizer
from posttrain.conversion.tokenizer import is_builtin_qwen3
from posttrain.outputs.errors import PosttrainError

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
PREFIXES = ("_orig_mod.", "module.")
# Buffers, not weights: RoPE tables (HF recomputes them from rope_theta) and the causal mask.
BUFFER_KEY = re.compile(r"blocks\.\d+\.attn\.(rope\.cos_cached|rope\.sin_cached|bias)")
# Every model_args field the source's model builder reads, in the format's order.
MODEL_ARGS_FIELDS = (
    "block_size",
    "vocab_size",
    "n_layer",
    "n_head",
    "n_embd",
    "normalization",
    "norm_eps",
    "activation",
    "attention_backend",
    "num_key_value_heads",
    "position_encoding",
    "rope_theta",
    "norm_position",
    "ffn_type",
    "bias",
    "dropout",
    "weight_tying",
    "d_ff",
    "ffn_expansion_ratio",
    "attention_dropout",
    "residual_dropout",
)
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


def rotate_half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The way back: each head's rows [0, 2, ..., D-2, 1, 3, ..., D-1] return to [0, 1, ..., D-1]."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)


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


def hf_shapes(a: dict) -> dict[str, tuple[int, ...]]:
    """Every weight the Hugging Face model must hold, with its shape: the table's row blocks of `source_shapes`."""
    shapes = source_shapes(a)
    return {
        target: (rows.stop - rows.start, *shapes[source][1:]) if rows else shapes[source]
        for target, source, rows in weight_table(a)
    }


def hf_to_source(hf: Mapping[str, torch.Tensor], a: dict, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The table read backwards, one source weight at a time: the row blocks that came from one source
    matrix (q, k, v of `c_attn`; k, v of `c_kv`) concatenated in row order, the q/k rows put back into
    interleaved RoPE order, in `dtype`. Tied: the head is the embedding tensor itself, as torch.save
    writes a tied module. `hf` is read lazily, so only the tensors of one source weight are held at once."""
    parts: dict[str, list[tuple[str, Rows | None]]] = {}
    for target, source, rows in weight_table(a):
        parts.setdefault(source, []).append((target, rows))
    for source, blocks in parts.items():
        pieces = []
        for target, rows in sorted(blocks, key=lambda block: block[1].start if block[1] else 0):
            t = hf[target]
            if rows is not None and rows.rope_heads:
                t = rotate_half_to_interleaved(t, rows.rope_heads)
            pieces.append(t.to(dtype))
        weight = torch.cat(pieces) if len(pieces) > 1 else pieces[0].contiguous()
        del pieces
        yield source, weight
        if source == "token_embeddings.weight" and a["weight_tying"]:
            yield "lm_head.weight", weight


def source_buffers(a: dict) -> dict[str, torch.Tensor]:
    """The buffers the source model saves beside its weights (fp32, one tensor shared by every layer): the
    RoPE tables of `rope_theta`, and the causal mask of the `manual` attention backend. A strict
    load_state_dict of the source's model needs them."""
    from posttrain.conversion.source_model import rope_angles

    angles = rope_angles(a["block_size"], a["n_embd"] // a["n_head"], a["rope_theta"], dtype=torch.float64)
    cos, sin = angles.cos().float(), angles.sin().float()
    T = a["block_size"]
    mask = torch.ones(T, T).tril().view(1, 1, T, T) if a.get("attention_backend") == "manual" else None
    buffers = {}
    for i in range(a["n_layer"]):
        buffers[f"blocks.{i}.attn.rope.cos_cached"] = cos
        buffers[f"blocks.{i}.attn.rope.sin_cached"] = sin
        if mask is not None:
            buffers[f"blocks.{i}.attn.bias"] = mask
    return buffers


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
        from posttrain.conversion.source_model import rope_angles

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


# ---------------------------------------------------------------- the Hugging Face side


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


# model_args fields a Llama config does not hold (they change nothing the model computes at inference): the
# original's values when the model came from convert-checkpoint, else these (and ffn_expansion_ratio d_ff / n_embd,
# attention_dropout the config's).
NOT_IN_LLAMA_CONFIG = {
    "activation": SWIGLU_ACTIVATION,
    "attention_backend": "sdpa",
    "dropout": 0.0,
    "residual_dropout": 0.0,
}


def check_llama_config(config, path) -> None:
    """Refuse a Hugging Face model the format cannot hold, naming what it has that the format lacks."""
    model_type, architectures = getattr(config, "model_type", None), getattr(config, "architectures", None) or []
    if model_type != "llama":
        qk_norm = " (its q/k RMSNorm, QK-norm, has no place in the format)" if "qwen3" in str(model_type) else ""
        raise PosttrainError(
            f"{path}: model_type {model_type!r} is not Llama{qk_norm}; the pre-training format holds only a "
            "LlamaForCausalLM without biases, QK-norm or RoPE scaling"
        )
    if architectures != ["LlamaForCausalLM"]:
        raise PosttrainError(
            f"{path}: architectures {architectures} is not ['LlamaForCausalLM'] (a language model head); "
            "the pre-training format holds only that"
        )
    for field, what in (("attention_bias", "attention"), ("mlp_bias", "MLP")):
        if getattr(config, field, False):
            raise PosttrainError(f"{path}: {field} is true, but the pre-training format has no {what} biases")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    scaling = {k: v for k, v in rope.items() if k != "rope_theta" and not (k == "rope_type" and v == "default")}
    if scaling:
        raise PosttrainError(
            f"{path}: RoPE scaling {scaling} (rope_parameters); the pre-training format has only plain RoPE "
            "of rope_theta"
        )
    if config.hidden_act != SWIGLU_ACTIVATION:
        raise PosttrainError(
            f"{path}: hidden_act {config.hidden_act!r}; the pre-training format's SwiGLU always applies silu"
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise PosttrainError(
            f"{path}: head_dim {head_dim} x {config.num_attention_heads} heads is not hidden_size "
            f"{config.hidden_size}, as the pre-training format requires"
        )


def model_args_from_config(config, original: dict | None, path) -> tuple[dict, list[str]]:
    """The source's `model_args` for a Hugging Face Llama config (the inverse of `llama_config`), and a note
    for each field that differs from `original` (the model_args convert-checkpoint read, if known).

    The fields the config holds come from it; the rest (dropouts, attention backend, the unused
    activation, the expansion ratio) are the original's, or defaults. A model that still computes
    what the original did gets the original model_args back exactly, down to a None
    num_key_value_heads. A vocabulary of another size than the original's is refused: the
    pre-training tokenizer no longer fits it.
    """
    check_llama_config(config, path)
    from_config = {
        "block_size": config.max_position_embeddings,
        "vocab_size": config.vocab_size,
        "n_layer": config.num_hidden_layers,
        "n_head": config.num_attention_heads,
        "n_embd": config.hidden_size,
        "normalization": "rmsnorm",
        "norm_eps": config.rms_norm_eps,
        "num_key_value_heads": config.num_key_value_heads or config.num_attention_heads,
        "position_encoding": "rope",
        "rope_theta": config.rope_parameters["rope_theta"],
        "norm_position": "pre",
        "ffn_type": "swiglu",
        "bias": False,
        "weight_tying": bool(config.tie_word_embeddings),
        "d_ff": config.intermediate_size,
    }
    defaults = {
        **NOT_IN_LLAMA_CONFIG,
        "ffn_expansion_ratio": config.intermediate_size / config.hidden_size,
        "attention_dropout": float(config.attention_dropout),
    }
    if original is None:
        return {field: from_config.get(field, defaults.get(field)) for field in MODEL_ARGS_FIELDS}, []
    a, notes = dict(original), []
    known = check_model_args(original, path)  # num_key_value_heads: None means n_head
    if from_config["vocab_size"] != known["vocab_size"]:
        raise PosttrainError(
            f"{path}: vocab_size {from_config['vocab_size']} no longer matches the original model_args' "
            f"{known['vocab_size']} (the embedding was resized after conversion); the pre-training tokenizer "
            "does not fit it"
        )
    for field, value in from_config.items():
        if known[field] != value:
            notes.append(f"model_args['{field}'] = {value!r} from config.json (the original had {known[field]!r})")
            a[field] = value
    for field in MODEL_ARGS_FIELDS:
        if field not in a:
            a[field] = from_config.get(field, defaults.get(field))
            notes.append(f"model_args['{field}'] = {a[field]!r} (the original model_args lacked it)")
    return a, notes
