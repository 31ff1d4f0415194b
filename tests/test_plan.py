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
    assert longer["rows"]["rft"]["seconds"] == pytest.approx(2 * base["rows"]["rft"]["seconds"])
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
