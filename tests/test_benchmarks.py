"""benchmarks/gpu.py cannot measure here (no GPU): its arithmetic (parameters, FLOPs per token, MFU,
wall times), its CLI, and, on a tiny shape on CPU (--smoke), that every stage of it runs."""

from __future__ import annotations

import json

import pytest
from helpers import REPO

REAL_PARAMS = 1_829_246_976  # the real checkpoint's count


@pytest.fixture()
def gpu(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu

    return gpu


def test_parameters_and_flops_per_token(gpu):
    import common
    from transformers import LlamaForCausalLM

    real = gpu.model_config()
    assert gpu.param_count(real) == REAL_PARAMS
    assert common.matmul_params(real) == REAL_PARAMS - 151_669 * 2048 - 49 * 2048  # no input embedding, no norms
    assert gpu.train_flops_per_token(real) == 6 * common.matmul_params(real)
    tiny = gpu.model_config(**{**gpu.TINY, "num_key_value_heads": 2})  # GQA counts too
    model = LlamaForCausalLM(tiny)
    assert gpu.param_count(tiny) == sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if type(m).__name__ == "Linear")
    assert common.matmul_params(tiny) == linear


def test_mfu_and_peaks(gpu):
    assert gpu.peak_tflops("NVIDIA B200") == 2250 and gpu.peak_tflops("NVIDIA GB200") == 2500
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989 and gpu.peak_tflops("NVIDIA H100 PCIe") == 756
    assert gpu.peak_tflops("NVIDIA H200") == 989 and gpu.peak_tflops("Some GPU") is None
    flops = gpu.train_flops_per_token(gpu.model_config())
    # 40% of a B200 is 9e14 FLOP/s: ~99K tokens/s at 6 x 1.52e9 FLOPs per token
    assert gpu.mfu(0.4 * 2250e12 / flops, flops, 2250e12) == pytest.approx(0.4)
    assert gpu.mfu(1e5, 9e9, 1e15) == pytest.approx(0.9)


def test_wall_times(gpu):
    # 1,000 updates of 16,000 tokens on 8 GPUs at 50K tokens/s each: 0.04 s + 0.015 s sync per update
    assert gpu.sft_wall_time_s(1000, 16_000, 50_000, gpus=8, sync_s=0.015) == pytest.approx(55.0)
    assert gpu.sft_wall_time_s(10, 8_000, 1_000, gpus=8, sync_s=0.0) == pytest.approx(10.0)
    # 57,600 pairs at 10 pairs/s/GPU on 8 GPUs: 720 s, + 450 updates x 0.01 s; a reference pass at 40 pairs/s: 180 s
    assert gpu.dpo_wall_time_s(57_600, 450, 10, gpus=8, sync_s=0.01) == pytest.approx(724.5)
    assert gpu.dpo_wall_time_s(57_600, 450, 10, 40, gpus=8, sync_s=0.01) == pytest.approx(904.5)


def test_implied_wall_times_use_the_recipe_figures(gpu):
    from recipe_figures import DPO_TRAIN_PAIRS, computed_figures

    dpo = {"live": {"pairs_per_s": 10.0}, "precomputed": {"pairs_per_s": 12.0, "reference_pass_pairs_per_s": 30.0}}
    assert gpu.implied_wall_times(50_000.0, dpo, eval_rps=100.0)["dpo_1_epoch_live_reference_padding_free_s"] is None
    dpo |= {
        "live_padding_free_sdpa": {"pairs_per_s": 14.0},
        "live_padding_free_flash_attention_2": {"pairs_per_s": 16.0},
    }
    times = gpu.implied_wall_times(50_000.0, dpo, eval_rps=100.0)
    sft = computed_figures("sft")
    updates = computed_figures("dpo")["updates in all"]
    assert times["sft_3_epochs_s"] == pytest.approx(
        sft["updates in all"] * (sft["real tokens per update"] / 400_000 + gpu.SYNC_S)
    )
    assert times["dpo_1_epoch_live_reference_s"] == pytest.approx(DPO_TRAIN_PAIRS / 80 + updates * gpu.SYNC_S)
    assert times["dpo_1_epoch_precomputed_reference_s"] == pytest.approx(
        DPO_TRAIN_PAIRS / 96 + updates * gpu.SYNC_S + DPO_TRAIN_PAIRS / 240
    )
    assert times["dpo_1_epoch_live_reference_padding_free_s"] == pytest.approx(  # the faster: flash-attention's
        DPO_TRAIN_PAIRS / 128 + updates * gpu.SYNC_S
    )
    assert times["eval_arc_obqa_one_gpu_s"] == pytest.approx(gpu.EVAL_REQUESTS / 100)


def test_cli(gpu, capsys):
    args = gpu.parse_args([])
    assert (args.steps, args.warmup, args.smoke, args.output) == (10, 3, False, gpu.RESULTS)
    with pytest.raises(SystemExit) as exit_info:
        gpu.parse_args(["--help"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        gpu.main([])  # no GPU here
    assert exit_info.value.code == 2
    assert "error: this benchmark needs a CUDA GPU" in capsys.readouterr().err


def test_every_stage_runs_on_a_tiny_shape(gpu, tmp_path):
    out = tmp_path / "gpu.json"
    gpu.main(["--smoke", "--steps", "2", "--warmup", "1", "--output", str(out)])
    result = json.loads(out.read_text())
    assert result["parameters"] == gpu.param_count(gpu.model_config(**gpu.TINY))
    assert result["sft"]["sdpa"]["real_tokens_per_s"] > 0 and result["sft"]["sdpa"]["mfu"] is None  # no peak: cpu
    assert result["dpo"]["live"]["pairs_per_s"] > 0 and result["dpo"]["precomputed"]["reference_pass_pairs_per_s"] > 0
    assert "reference_pass_pairs_per_s" not in result["dpo"]["live"]
    # Padded, the policy computes pad tokens; padding-free (sdpa on CPU), none.
    padded, packed = result["dpo"]["live"], result["dpo"]["live_padding_free_sdpa"]
    assert padded["padding_fraction"] > 0.05 and packed["padding_fraction"] == 0 and packed["pairs_per_s"] > 0
    assert result["implied_wall_time_8_gpus"]["dpo_1_epoch_live_reference_padding_free_s"] > 0
    assert result["eval_loglikelihood"]["requests_per_s"] > 0
    assert result["implied_wall_time_8_gpus"]["sft_3_epochs_s"] > 0
    assert result["on_policy_sampling"]["decoded_tokens_per_s"] > 0 and result["reward_scoring"]["rows_per_s"] > 0
    assert result["implied_on_policy_pairs_8_gpus"]["sampling_minutes"] > 0
    assert result["eval_generation"]["decoding_steps_per_s"] > 0 and result["eval_generation"]["batch"] == 4
    assert result["implied_evaluation_8_gpus"]["generation_minutes_upper_bound"] > 0


def test_evaluation_minutes_use_the_recipe_figures(gpu):
    """At the modelled ~13 ms a decoding step the measured-rate minutes are the recipe's stated ones."""
    from common import DECODE_STEP_S, computed_figures

    figures = computed_figures("evaluate")
    minutes = gpu.evaluation_minutes({"decoding_steps_per_s": 1 / DECODE_STEP_S})
    assert minutes["decoding_steps_per_gpu"] == figures["decoding steps per gpu"]
    assert round(minutes["generation_minutes_upper_bound"]) == figures["generation minutes"]


def test_on_policy_minutes_use_the_recipe_figures(gpu):
    import yaml
    from common import RECIPES, sampling_figures

    figures = sampling_figures(yaml.safe_load(RECIPES["generate_pairs"].read_text()), 8)
    minutes = gpu.on_policy_minutes({"decoded_tokens_per_s": 6_000.0}, {"rows_per_s": 300.0})
    # the modelled rates give the recipe's stated minutes
    assert round(minutes["sampling_minutes"]) == figures["sampling minutes"]
    assert round(minutes["scoring_minutes"]) == figures["scoring minutes"]
    assert minutes["sampling_minutes"] == pytest.approx(figures["decoded slots"] / 48_000 / 60)
