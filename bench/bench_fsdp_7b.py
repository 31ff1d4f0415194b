"""GPU acceptance of the 7B presets: a few steps of sft.py and rft.py on the REAL Qwen2.5-VL-7B architecture with
random weights, run the way the preset for the GPUs present runs them, with peak memory and seconds per step next
to the --dry_run plan (and the kit's 1.45x headroom rule).

  one GPU (presets/7b.env, an H200):  plain processes; SFT batch 4, 8-bit AdamW; GRPO B=4 x G=8 with beta 0 (no
                                      reference model: with one, the plan does not pass the rule on 141 GB)
  N >= 2 GPUs (presets/7b_fsdp.env):  accelerate launch --config_file configs/accelerate_fsdp2.yaml --num_processes N;
                                      4 // N rows / puzzles per process (the same global batch), torch AdamW (what
                                      FSDP runs), GRPO with the paper's beta 0.04 and a bf16 reference per GPU

Everything else as the presets: fp32 master weights + bf16 autocast, gradient checkpointing, 448x448 3x3 puzzles,
micro-batch 2. The model is built from configs/qwen2_5_vl_7b_instruct.json with the toy tokenizer's special ids
(bench_real_arch.build_random_model; nothing is downloaded; 16.6 GB of disk in bf16). A random model never writes
<|im_end|>, so every rollout runs to --max_new_tokens: the worst case. Each run is stopped once it has logged its
steps (before its final save: a 7B resume state is 50-100 GB). Peak memory is rank 0's
torch.cuda.max_memory_allocated, as sft.py/rft.py log it.

    python bench/bench_fsdp_7b.py --out /tmp/fsdp_7b            # needs CUDA GPUs; ~10 min on one H200
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import common  # noqa: E402
import files  # noqa: E402
import memory  # noqa: E402
import rft  # noqa: E402
import runs  # noqa: E402
import sft  # noqa: E402
from bench_real_arch import build_random_model  # noqa: E402

MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"


@dataclass
class Args:
    out: str = "/tmp/fsdp_7b"
    """work folder (the random 7B model in bf16: 16.6 GB)"""
    gpus: int = 0
    """GPUs to use (0: all that torch sees)"""
    sft_steps: int = 3
    """sft.py steps timed (the first includes warm-up)"""
    rft_steps: int = 2
    """rft.py steps timed"""
    max_new_tokens: int = 256
    """GRPO completion length (all used: random weights never stop; the presets allow 512)"""
    image_size: int = 448
    """jigsaw image side (448x448 = 256 vision tokens, the presets')"""
    stage_timeout: int = 900
    """seconds before a stage is stopped and reported as timed out"""


def run_until_logged(cmd: list[str], metrics: Path, steps: int, key: str, timeout: int) -> tuple[list[dict], str]:
    """Start a stage in its own process group, stop it once metrics.jsonl holds `steps` records with `key`."""
    log = metrics.parent.with_suffix(".log")
    metrics.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        started, status = time.time(), "timed out"
        while time.time() - started < timeout:
            records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
            records = [r for r in records if key in r]
            if len(records) >= steps:
                status = "ok"
                break
            if proc.poll() is not None:
                status = f"exited with {proc.returncode} (log: {log})"
                break
            time.sleep(2)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return [r for r in records if key in r][:steps], status


def main(argv=None):
    args = common.parse_args(Args, __doc__, argv)
    if not torch.cuda.is_available():
        common.fail("bench_fsdp_7b needs CUDA GPUs.")
    gpus = args.gpus or torch.cuda.device_count()
    out = Path(args.out)
    device_gib = torch.cuda.get_device_properties(0).total_memory / memory.GiB
    t0 = time.time()
    if not (out / "model" / "config.json").exists():
        build_random_model(MODEL, out, args.image_size)
    build_s = time.time() - t0

    per_process = max(1, 4 // gpus)
    if gpus == 1:
        launch, variant = [sys.executable], "one GPU (presets/7b.env): plain processes, 8-bit AdamW, GRPO beta 0"
        optimizer, beta = "adamw8bit", "0"
    else:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate_fsdp2.yaml",
                  "--num_processes", str(gpus)]
        variant = f"FSDP2 over {gpus} GPUs (presets/7b_fsdp.env): torch AdamW, GRPO beta 0.04"
        optimizer, beta = "adamw", "0.04"
    pix = ["--min_pixels", str(56 * 56), "--max_pixels", str(args.image_size ** 2)]
    data = ["--model", str(out / "model"), "--data", str(out / "data"), "--precision", "bf16_mixed", "--optimizer",
            optimizer, *pix, "--overwrite"]
    sft_plan = sft.main(["--model", MODEL, "--dry_run", "--optimizer", optimizer, "--batch_size", str(per_process),
                         "--gradient_checkpointing", "--plan_processes", str(gpus)])
    rft_args = rft.Args(model=MODEL, batch_size=per_process, num_generations=8, beta=float(beta), optimizer=optimizer,
                        max_completion_length=args.max_new_tokens, plan_processes=gpus, dry_run=True)
    rft_plan = rft.dry_run(rft_args, "bf16_mixed", "bfloat16")

    results = {"variant": variant, "gpus": gpus, "device": torch.cuda.get_device_name(0), "device_gib": device_gib,
               "build_s": build_s, "per_process_batch": per_process, "environment": runs.environment()}
    stages = {
        "sft": (["sft.py", "--prompt_column", "prompt", "--completion_column", "target_non_rea", "--batch_size",
                 str(per_process), "--gradient_checkpointing", "--lr", "1e-5", "--max_steps", str(args.sft_steps + 1),
                 "--save_steps", "0"], args.sft_steps, "loss", sft_plan),
        "rft": (["rft.py", "--batch_size", str(per_process), "--num_generations", "8", "--beta", beta,
                 "--max_completion_length", str(args.max_new_tokens), "--micro_batch_size", "2", "--eval_steps", "0",
                 "--save_steps", "0", "--max_steps", str(args.rft_steps + 1), "--min_answer_image_mi", "0"],
                args.rft_steps, "reward", rft_plan),
    }
    for stage, (cmd, steps, key, plan) in stages.items():
        t0 = time.time()
        records, status = run_until_logged([*launch, *cmd, *data, "--output_dir", str(out / stage)],
                                           out / stage / "metrics.jsonl", steps, key, args.stage_timeout)
        peak = max((r["peak_memory_gib"] or 0 for r in records), default=None)
        seconds = [r["tokens"] / r["tokens_per_s"] for r in records] if stage == "sft" else \
            [r["time_generation"] + r["time_training"] for r in records]
        results[stage] = {"status": status, "wall_s": time.time() - t0, "steps": records,
                          "peak_memory_gib": peak, "s_per_step": seconds, "plan_gib": plan["total"] / memory.GiB,
                          "plan_x_headroom_gib": plan["total"] * memory.MEMORY_HEADROOM / memory.GiB,
                          "peak_over_plan": peak / (plan["total"] / memory.GiB) if peak else None}
        if stage == "rft":
            results[stage]["s_generation"] = [r["time_generation"] for r in records]
            results[stage]["s_training"] = [r["time_training"] for r in records]
    files.write_json_atomic(out / "bench_fsdp_7b.json", results)
    print(f"\n{variant}; {results['device']} x {gpus} ({device_gib:.1f} GiB each)")
    for stage in stages:
        r = results[stage]
        print(f"  {stage}: {r['status']}; peak {r['peak_memory_gib']} GiB (rank 0) against the plan {r['plan_gib']:.1f} GiB"
              f" (x{memory.MEMORY_HEADROOM} = {r['plan_x_headroom_gib']:.1f}); s/step {[round(x, 1) for x in r['s_per_step']]}")
    print(f"  details: {out / 'bench_fsdp_7b.json'}")
    return results


if __name__ == "__main__":
    main()
