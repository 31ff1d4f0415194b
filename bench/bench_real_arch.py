"""Peak GPU memory and step time of sft.py and rft.py on the REAL Qwen2.5-VL-3B/7B architecture, with random
weights, next to the --dry_run memory plan: check a GPU before downloading anything.

The model is built from the shipped config (configs/qwen2_5_vl_*_instruct.json: the same layers, widths and
vocabulary size as the hub checkpoint, so the same memory and FLOPs) with random weights, and paired with the toy
tokenizer (its special-token ids are written into the config). Nothing is downloaded. A random model writes
garbage up to --max_new_tokens, which is the worst case for rollout length.

    python bench/bench_real_arch.py --config 3b --out /tmp/real_arch       # needs a CUDA GPU (~10 GB of disk)
    python bench/bench_real_arch.py --config 3b --precision bf16 --optimizer adamw8bit_sr --beta 0   # 3b_40gb
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import files  # noqa: E402
import jigsaw  # noqa: E402
import memory  # noqa: E402
import sft  # noqa: E402
import toy  # noqa: E402


@dataclass
class Args:
    config: str = "3b"
    """3b or 7b (the shipped real configs)"""
    out: str = "/tmp/real_arch"
    """work folder (the random model is saved here: 15 GB for 3B in fp32)"""
    sft_steps: int = 3
    """sft.py optimizer steps to time"""
    rft_steps: int = 2
    """rft.py steps to time"""
    batch_size: int = 4
    """SFT rows per step; GRPO puzzles per step"""
    group_size: int = 8
    """GRPO completions per puzzle (Jigsaw-R1 public default)"""
    max_new_tokens: int = 256
    """GRPO completion length (all used: random weights never stop)"""
    image_size: int = 448
    """jigsaw image side (448x448 = 256 vision tokens)"""
    optimizer: str = "adamw8bit"
    """optimizer of both runs (adamw8bit_sr with --precision bf16: the 3b_40gb preset; needs torchao)"""
    precision: str = "bf16_mixed"
    """--precision of both runs (bf16_mixed: fp32 master weights + autocast; bf16: pure bf16 weights)"""
    beta: float = 0.04
    """rft.py's KL coefficient (0: no reference model, as in the 3b_40gb preset)"""


def build_random_model(name: str, out: Path, image_size: int) -> int:
    """The real architecture of `name` (configs/), the toy tokenizer's special-token ids, random bf16 weights,
    saved with its processor to out/model, and a 3x3 procedural jigsaw set in out/data. Returns the parameter
    count. (Also used by bench/bench_fsdp_7b.py.)"""
    from transformers import AutoConfig, AutoModelForImageTextToText
    tokenizer = toy.build_tokenizer()
    processor = toy.build_processor(tokenizer, min_pixels=56 * 56, max_pixels=image_size ** 2)
    config = AutoConfig.from_pretrained(str(memory.REAL_CONFIGS[name]))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in toy.SPECIAL_TOKENS}
    config.image_token_id, config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    config.vision_start_token_id, config.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    config.text_config.eos_token_id = ids["<|im_end|>"]
    config.text_config.pad_token_id = config.text_config.bos_token_id = ids["<|endoftext|>"]
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    del model
    torch.cuda.empty_cache()
    jigsaw.build_dataset(jigsaw.BuildArgs(source="procedural", grid="3x3", train=64, test=8, output_dir=str(out / "data"),
                                          image_size=image_size))
    return params


def main(argv=None):
    args = common.parse_args(Args, __doc__, argv)
    if not torch.cuda.is_available():
        common.fail("bench_real_arch needs a CUDA GPU.")
    out = Path(args.out)
    name = {"3b": "Qwen/Qwen2.5-VL-3B-Instruct", "7b": "Qwen/Qwen2.5-VL-7B-Instruct"}[args.config]

    # ---- model: real architecture, toy tokenizer ids, random weights -------------------------------------------
    t0 = time.time()
    params = build_random_model(name, out, args.image_size)
    build_s = time.time() - t0
    results = {"config": args.config, "parameters": params, "build_s": build_s}

    # ---- sft.py and rft.py, each in its own process (each starts from an empty GPU) -------------------------
    pix = ["--min_pixels", str(56 * 56), "--max_pixels", str(args.image_size ** 2)]
    root = Path(__file__).resolve().parents[1]
    plan = sft.main(["--model", name, "--dry_run", "--optimizer", args.optimizer, "--precision", args.precision,
                     "--batch_size", str(args.batch_size),
                     "--gradient_checkpointing", "--plan_prompt_length", "512"])
    stages = {
        # fp32 master weights + bf16 autocast, gradient checkpointing
        "sft": ["sft.py", "--prompt_column", "prompt", "--completion_column", "target_non_rea", "--max_steps",
                str(args.sft_steps), "--batch_size", str(args.batch_size), "--gradient_checkpointing", "--lr", "1e-5"],
        # B x G rollouts, bf16 reference model, k3 KL, rft.py's defaults otherwise
        "rft": ["rft.py", "--max_steps", str(args.rft_steps), "--batch_size", str(args.batch_size), "--num_generations",
                str(args.group_size), "--max_completion_length", str(args.max_new_tokens), "--eval_steps", "0",
                "--save_steps", "0", "--beta", str(args.beta)],
    }
    for stage, cmd in stages.items():
        t0 = time.time()
        subprocess.run([sys.executable, *cmd, "--model", str(out / "model"), "--data", str(out / "data"),
                        "--output_dir", str(out / stage), "--optimizer", args.optimizer, "--precision", args.precision,
                        *pix], cwd=root, check=True)
        metrics = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        metrics = [m for m in metrics if "loss" in m]
        results[stage] = {"wall_s": time.time() - t0, "peak_memory_gib": max(m["peak_memory_gib"] for m in metrics),
                          "steps": metrics}
    results["sft"]["dry_run_plan_gib"] = plan["total"] / memory.GiB
    summary = {"parameters": params, **{f"{s}_peak_memory_gib": results[s]["peak_memory_gib"] for s in stages},
               "sft_dry_run_plan_gib": results["sft"]["dry_run_plan_gib"],
               "sft_s_per_step": [m["tokens"] / m["tokens_per_s"] for m in results["sft"]["steps"]],
               "rft_s_generation": [m["time_generation"] for m in results["rft"]["steps"]],
               "rft_s_training": [m["time_training"] for m in results["rft"]["steps"]],
               "rft_tokens_per_second": [m["tokens_per_second"] for m in results["rft"]["steps"]]}
    print(json.dumps(summary, indent=2))
    files.write_json_atomic(out / "bench_real_arch.json", results)


if __name__ == "__main__":
    main()
