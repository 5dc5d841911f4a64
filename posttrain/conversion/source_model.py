"""The ORIGINAL pre-training architecture as a plain forward pass, written from
docs/source_format.md and nothing else, so that `convert-checkpoint --verify`
compares the converted Hugging Face model against an independent statement of
what the checkpoint computes (not against the conversion's own assumptions).

Pre-norm blocks, RMSNorm, SwiGLU, causal attention with *interleaved* RoPE
(pairs (0,1), (2,3), ... of each head), MHA `c_attn` or GQA `c_q`/`c_kv` with
repeat-interleaved KV heads, tied or untied output head. Everything runs in
fp32; weights are read one at a time from a (possibly mmap-backed) state dict,
so the reference never holds more than one layer's fp32 copy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_angles(positions: int, head_dim: int, theta: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[positions, head_dim/2]: pair j at position pos rotates by pos * theta^(-j/(head_dim/2)).
    (The source system's `rope.cos_cached` / `sin_cached` buffers are cos and sin of this.)"""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))
    return torch.outer(torch.arange(positions, dtype=dtype), inv_freq)


def interleaved_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs (2j, 2j+1) of the last dim of x [B, H, T, D] by pos * theta^(-j/(D/2))."""
    angles = rope_angles(x.shape[-2], x.shape[-1], theta)  # [T, D/2]
    cos, sin = angles.cos(), angles.sin()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


@torch.no_grad()
def reference_logits(
    weights: Mapping[str, torch.Tensor],
    model_args: dict,
    tokens: torch.Tensor,
    weight_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """fp32 logits [B, T, V] of the original model for `tokens` [B, T].

    `weights` uses the source keys without `_orig_mod.`/`module.` prefixes.
    `weight_dtype` first rounds every weight to that dtype (the dtype the
    converted model is saved in), so a comparison isolates the conversion from
    the precision the user chose.
    """
    a = model_args
    E, H = a["n_embd"], a["n_head"]
    KV = a.get("num_key_value_heads") or H
    D = E // H
    eps = a["norm_eps"]

    def w(key: str) -> torch.Tensor:
        t = weights[key]
        return (t.to(weight_dtype) if weight_dtype is not None else t).float()

    x = F.embedding(tokens, weights["token_embeddings.weight"])  # gather first: no fp32 copy of the table
    x = (x.to(weight_dtype) if weight_dtype is not None else x).float()
    B, T, _ = x.shape
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(a["n_layer"]):
        p = f"blocks.{i}."
        h = rms_norm(x, w(p + "norm1.weight"), eps)
        if KV == H:
            q, k, v = F.linear(h, w(p + "attn.c_attn.weight")).split(E, dim=-1)
        else:
            q = F.linear(h, w(p + "attn.c_q.weight"))
            k, v = F.linear(h, w(p + "attn.c_kv.weight")).split(KV * D, dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, KV, D).transpose(1, 2).repeat_interleave(H // KV, dim=1)
        v = v.view(B, T, KV, D).transpose(1, 2).repeat_interleave(H // KV, dim=1)
        q, k = interleaved_rope(q, a["rope_theta"]), interleaved_rope(k, a["rope_theta"])
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + F.linear(att.transpose(1, 2).reshape(B, T, E), w(p + "attn.c_proj.weight"))
        h = rms_norm(x, w(p + "norm2.weight"), eps)
        gate, value = F.linear(h, w(p + "ffn.w_gate.weight")), F.linear(h, w(p + "ffn.w_value.weight"))
        x = x + F.linear(F.silu(gate) * value, w(p + "ffn.w_out.weight"))
    x = rms_norm(x, w("final_norm.weight"), eps)
    head = "token_embeddings.weight" if a.get("weight_tying") else "lm_head.weight"
    return F.linear(x, w(head))
