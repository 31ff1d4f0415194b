"""plan.py: parameter counts from configs, the disk model's bytes per parameter, and the verdict a run gets."""
import json
from pathlib import Path

import pytest

import plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("size,expected", [("3b", 3_754_622_976), ("7b", 8_292_166_656)])
def test_parameter_count_of_the_real_configs_matches_the_model_built_on_meta(size, expected):
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration
    path = ROOT / f"configs/qwen2_5_vl_{size}_instruct.json"
    assert plan.count_params(json.loads(path.read_text()))["total"] == expected
    config = AutoConfig.for_model(**{k: v for k, v in json.loads(path.read_text()).items() if k != "architectures"})
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_parameter_count_of_the_toy_and_its_checkpoint_bytes(toy_model_dir):
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(toy_model_dir)
    numel = sum(p.numel() for p in model.parameters())
    assert plan.count_params(json.loads((toy_model_dir / "config.json").read_text()))["total"] == numel
    config, _ = plan.model_config({"BUILD_TOY_BASE": "1", "TOY_SIZE": "tiny", "MODEL": ""})
    assert plan.count_params(config)["total"] == numel      # before the base stage has made the model
    # An fp32 save_pretrained folder is 4 bytes per parameter + the processor files, as the disk model says.
    weights = sum(f.stat().st_size for f in toy_model_dir.glob("*.safetensors"))
    assert abs(weights - 4 * numel) <= 0.02 * weights
    folder = sum(f.stat().st_size for f in toy_model_dir.rglob("*") if f.is_file())
    assert folder - weights <= plan.PROCESSOR_BYTES_TOY * 1.5


def _settings(**override):
    settings = {"PRESET": "3b", "PLAN_DEVICE": "gpu", "BUILD_TOY_BASE": "0", "MODEL": "Qwen/Qwen2.5-VL-3B-Instruct",
                "PRECISION": "bf16_mixed", "OPTIMIZER": "adamw8bit", "SOURCE": "detection-datasets/coco", "GRID": "3x3",
                "JIGSAW_IMAGE_SIZE": "448", "MAX_PIXELS": "200704", "N_TRAIN": "2500", "N_TEST": "500",
                "BATCH_SIZE": "4", "SFT_STEPS": "200", "SAVE_STEPS": "50", "RFT_STEPS": "500", "RFT_BATCH": "4",
                "GROUP_SIZE": "8", "RFT_SAVE_STEPS": "100", "RFT_MAX_COMPLETION_LENGTH": "512",
                "JIGSAW_MAX_COMPLETION_LENGTH": "512", "ROLLOUT_K": "4", "ROLLOUT_LIMIT": "1100",
                "ROLLOUT_BATCH_SIZE": "64", "EVAL_BATCH_SIZE": "32", "EVAL_LIMIT": "500", "CHECKPOINT_EVAL_LIMIT": "100",
                "BENCHMARKS": "refcoco,docvqa,mme,mmstar,pope,mmmu", "ANALYZE_N": "32", "KEEP_RESUME_STATE": "0"}
    settings.update(override)
    return settings


def test_the_plan_follows_the_preset_numbers():
    stages = list(plan.TOY_SECONDS)
    base = plan.plan(_settings(), stages)
    assert base["snapshot_bytes"] == pytest.approx(2 * 3_754_622_976 + plan.PROCESSOR_BYTES_REAL)
    assert base["resume_bytes"] == 6 * 3_754_622_976                  # fp32 weights + 8-bit AdamW
    longer = plan.plan(_settings(RFT_STEPS="1000"), stages)
    step = base["rft_step"]["generation"] + base["rft_step"]["training"]
    assert longer["rows"]["rft"]["seconds"] - base["rows"]["rft"]["seconds"] == pytest.approx(500 * step)
    fewer = plan.plan(_settings(RFT_SAVE_STEPS="250"), stages)       # 2 checkpoints instead of 5
    assert base["rows"]["rft"]["disk"] - fewer["rows"]["rft"]["disk"] == pytest.approx(3 * base["snapshot_bytes"])
    early = plan.plan(_settings(SFT_SAVE_AT="5,10,50"), stages)      # 50 is a SAVE_STEPS checkpoint already
    assert early["rows"]["sft_non_rea"]["disk"] - base["rows"]["sft_non_rea"]["disk"] == \
        pytest.approx(2 * base["snapshot_bytes"])
    fp32 = plan.plan(_settings(OPTIMIZER="adamw", PRECISION="fp32"), stages)
    assert fp32["resume_bytes"] == 12 * 3_754_622_976 and fp32["snapshot_bytes"] > 2 * base["snapshot_bytes"] - 1e8
    seven = plan.plan(_settings(MODEL="Qwen/Qwen2.5-VL-7B-Instruct"), stages)
    assert seven["rows"]["sft_non_rea"]["seconds"] == pytest.approx(
        base["rows"]["sft_non_rea"]["seconds"] * 8_292_166_656 / 3_754_622_976)


def test_the_toy_plan_scales_its_measured_stage_times_by_steps():
    """The toy's times are measured constants (no throughput model), so RFT_STEPS=320 must plan twice the RFT time
    of the 160 they were measured at, and leave the other stages alone."""
    stages = list(plan.TOY_SECONDS)
    toy = _settings(PRESET="toy", PLAN_DEVICE="cpu", RFT_STEPS="160", SFT_STEPS="120")
    base, longer = plan.plan(toy, stages), plan.plan({**toy, "RFT_STEPS": "320"}, stages)
    assert base["rows"]["rft"]["seconds"] == pytest.approx(plan.TOY_SECONDS["rft"])
    assert longer["rows"]["rft"]["seconds"] == pytest.approx(2 * plan.TOY_SECONDS["rft"])
    assert longer["rows"]["sft_sources"]["seconds"] == base["rows"]["sft_sources"]["seconds"]


def test_the_verdict_names_the_stage_the_shortfall_and_the_variable(tmp_path):
    result = plan.plan(_settings(), list(plan.TOY_SECONDS))
    _, summary = plan.render(result, _settings(), tmp_path, {})
    assert plan.disk_verdict(summary, tmp_path, int(1e15)) is None
    needed_before_rft = sum(r["disk"] for s, r in summary["to_run"] if s in ("base", "data", "eval_base",
                                                                            "sft_non_rea"))
    free = int(needed_before_rft + result["rows"]["sft_non_rea"]["peak"] + 1e9)   # room for sft_non_rea's peak
    message = plan.disk_verdict(summary, tmp_path, free)
    assert "stage rft" in message and "RFT_SAVE_STEPS" in message and "IGNORE_DISK_PLAN=1" in message
    short = needed_before_rft + result["rows"]["rft"]["disk"] + result["rows"]["rft"]["peak"] - free
    assert plan.gb(short) in message


def test_the_plan_counts_the_pilot_the_evaluations_in_training_and_real_puzzle_sizes():
    stages = ["pilot", "rft", "sources"]
    settings = _settings(RFT_EVAL_SIZE="200", RFT_EVAL_STEPS="100", PILOT_STEPS="50", PILOT_EVAL_STEPS="10",
                         PILOT_MIN_GAIN="10", ROLLOUT_BACKEND="hf")
    result = plan.plan(settings, stages)
    # a 640x480 COCO photo at JIGSAW_IMAGE_SIZE 448 is a 448x336 puzzle: 16 x 12 = 192 merged vision tokens
    assert plan.puzzle_size(settings)[:2] == (447, 336) and plan.smart_resize(336, 447, 3136, 200704) == (336, 448)
    assert result["prompt_tokens"] == 192 + len(__import__("jigsaw").build_prompt(3, 3, True)) // 4 + 20
    step, one_eval = result["rft_step"], result["rft_step"]["eval"]
    assert one_eval > 0
    # the pilot: 50 steps, evaluated at 0, 10, ..., 50 (6 evaluations); RFT the other 450, evaluated at 100..500
    assert result["rows"]["pilot"]["seconds"] == pytest.approx(
        50 * (step["generation"] + step["training"]) + 6 * one_eval + plan.SECONDS_OTHER_STAGE)
    assert result["rows"]["rft"]["seconds"] == pytest.approx(
        450 * (step["generation"] + step["training"]) + 5 * one_eval + plan.SECONDS_OTHER_STAGE)
    assert plan.eval_points(50, 500, 100) == 5 and plan.eval_points(0, 48, 12) == 4 and plan.eval_points(0, 50, 12) == 5
    # vLLM rollouts: the estimated constants, marked; the pilot's measured ratios rescale the same work
    vllm = plan.plan({**settings, "ROLLOUT_BACKEND": "vllm"}, stages)
    assert vllm["rft_step"]["generation"] < step["generation"] and vllm["rft_step"]["training"] == step["training"]
    assert "(est.)" in vllm["rows"]["rft"]["note"] and "(est.)" not in result["rows"]["rft"]["note"]
    assert "vLLM rollouts (4,000 tokens/s" in plan.constants_line(vllm)
    measured = plan.plan({**settings, "ROLLOUT_BACKEND": "vllm"}, stages, {"rollout": 2.0, "train": 0.5, "eval": 1.0})
    assert measured["rft_step"]["generation"] == pytest.approx(2 * vllm["rft_step"]["generation"])
    assert measured["rft_step"]["training"] == pytest.approx(0.5 * vllm["rft_step"]["training"])
    assert "(est.)" not in measured["rows"]["rft"]["note"] and "measured by this run's pilot" in plan.constants_line(measured)


def test_the_settings_check_names_the_new_rules():
    import experiment
    settings = {name: "1" for name in experiment.PRESET_VARIABLES}
    settings.update(_settings(), RFT_EARLY_STEP="100", ROLLOUT_BACKEND="vllm", PILOT_STEPS="48", RFT_EVAL_SIZE="200",
                    CHECKPOINT_EVAL_LIMIT="200", TEACHER_URL="", TEACHER_MODEL="", SFT_SAVE_AT="", RFT_SAVE_AT="",
                    BENCHMARKS="mme", TOY_SIZE="tiny", SOURCE="x", GRID="3x3", BUILD_TOY_BASE="0")
    assert plan.check_settings(settings, "3b", {}) == []
    problems = " ".join(plan.check_settings({**settings, "ROLLOUT_BACKEND": "sglang", "PILOT_STEPS": "500",
                                             "TEACHER_URL": "http://localhost:8000/v1", "RFT_EVAL_SIZE": "64",
                                             "CHECKPOINT_EVAL_LIMIT": "100"}, "3b", {}))
    for text in ("ROLLOUT_BACKEND=sglang must be one of hf, vllm", "PILOT_STEPS=500 must be below RFT_STEPS=500",
                 "TEACHER_URL and TEACHER_MODEL go together", "RFT_EVAL_SIZE=64 gives 64 jigsaw puzzles",
                 "CHECKPOINT_EVAL_LIMIT=100 gives 100 jigsaw puzzles"):
        assert text in problems, (text, problems)
    assert plan.check_settings({**settings, "PLAN_DEVICE": "cpu", "RFT_EVAL_SIZE": "4"}, "3b", {}) == []
