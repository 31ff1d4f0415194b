"""GRPO rollouts with the vllm backend (vllm_engine.py) against the hf backend (sequences.generate), in one run:
tokens/s of each (median over rounds) and their ratio, the engine's start time, the weight-push time (fp32 master
weights into the engine, after an optimizer step), GPU memory with the engine awake and asleep, the device's peak
during one rft.py training step with the engine awake and asleep (what sleep mode gives the trainer), greedy
agreement, and the sampler-vs-trainer log-prob mismatch that GRPO's importance ratio sees. These are the figures
that replace plan.py's estimated vLLM constants.

The shape is the 3b preset's rollout (presets/3b.env): B=4 puzzles x G=8 completions, up to 512 new tokens,
448x448 3x3 puzzles. The model is the REAL Qwen2.5-VL-3B architecture with random weights and the toy tokenizer
(bench/bench_real_arch.py's approach: the shipped config, the toy special-token ids written into it, nothing
downloaded); random weights write garbage up to the token cap, the worst case for rollout length.

    python bench/bench_vllm_rollout.py --out /tmp/vllm_rollout          # CUDA GPU, ~10 min, ~10 GB of disk
    python bench/bench_vllm_rollout.py --toy --out /tmp/vllm_rollout    # CPU, the small toy model, ~1 min

--toy runs the same code on the CPU with the toy preset's model (fp32, 112-px puzzles, shorter completions): it
proves the script and the correctness figures, not the speed. Needs vllm (requirements-vllm.txt on a CPU,
constraints-vllm-cuda.txt on a GPU).
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import common  # noqa: E402
import files  # noqa: E402
import jigsaw  # noqa: E402
import memory  # noqa: E402
import sequences  # noqa: E402
import toy  # noqa: E402


@dataclass
class Args:
    out: str = "/tmp/vllm_rollout"
    """work folder (the random model is saved here: 7.5 GB for 3B in bf16) and bench_vllm_rollout.json"""
    toy: bool = False
    """CPU run with the toy preset's small model (fp32), 112-px puzzles and --toy_max_new_tokens"""
    config: str = "3b"
    """3b or 7b (the shipped real configs; GPU only)"""
    batch_size: int = 4
    """puzzles per rollout B (presets/3b.env RFT_BATCH)"""
    group_size: int = 8
    """completions per puzzle G (presets/3b.env GROUP_SIZE; Jigsaw-R1, TRL num_generations)"""
    max_new_tokens: int = 512
    """completion cap (presets/3b.env RFT_MAX_COMPLETION_LENGTH; Jigsaw-R1)"""
    toy_max_new_tokens: int = 128
    """completion cap with --toy"""
    image_size: int = 448
    """puzzle side in pixels (presets/3b.env JIGSAW_IMAGE_SIZE: 256 merged vision tokens); --toy uses 112"""
    rounds: int = 3
    """timed rounds per backend after one warm-up round; medians are reported"""
    temperature: float = 1.0
    """sampling temperature (presets/3b.env TEMPERATURE)"""
    gpu_memory_utilization: float = 0.3
    """the engine's share of the GPU (weights + KV cache); the rest stays with the trainer"""
    enforce_eager: bool = False
    """GPU: skip CUDA graphs and torch.compile (faster start, slower decoding)"""


def reference_logprobs(model, processor, prompts, images, completion_ids, vision_ids, temperature, chunk_rows=4):
    """Teacher-forced log-probs of each completion's tokens, renormalized without the vision tokens (as both
    samplers draw them), a few rows at a time (152k-vocabulary logits)."""
    out = []
    for start in range(0, len(prompts), chunk_rows):
        end = start + chunk_rows
        batch = sequences.build_batch(processor, prompts[start:end], images[start:end],
                                   completion_ids=completion_ids[start:end])
        batch = sequences.to_device(batch, next(model.parameters()).device)
        logits = sequences.completion_logits(model, batch).float()
        logits[..., vision_ids] = float("-inf")
        logprobs = torch.log_softmax(logits / temperature, dim=-1)
        logprobs = logprobs.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
        out += [row[mask.bool()].cpu() for row, mask in zip(logprobs, batch["completion_mask"])]
    return out


def gib_in_use() -> float | None:
    """GPU memory in use on the device (all allocators: torch's and vLLM's sleep-mode pool)."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return round((total - free) / memory.GiB, 2)


def main(argv=None):
    args = common.parse_args(Args, __doc__, argv)
    cuda = torch.cuda.is_available()
    if not args.toy and not cuda:
        common.fail("bench_vllm_rollout needs a CUDA GPU; on a CPU run it with --toy.")
    import vllm_engine
    vllm_engine.import_vllm()
    common.seed_everything(0)
    out = Path(args.out)
    max_new_tokens = args.toy_max_new_tokens if args.toy else args.max_new_tokens
    image_size = 112 if args.toy else args.image_size
    dtype = "bfloat16" if cuda else "float32"
    device = "cuda" if cuda else "cpu"

    # ---- model: the toy preset's, or the real architecture with the toy tokenizer and random weights -----------
    t0 = time.perf_counter()
    if args.toy:
        # the random init greedily repeats one token: spread its language weights (seeded) so that greedy
        # agreement means something (as tests/test_vllm_engine.py does)
        folder = toy.build_toy_model(str(out / "model"), size="small", seed=0)
        min_pixels, max_pixels = toy.TOY_MIN_PIXELS, toy.TOY_MAX_PIXELS
        model, processor = common.load_model_and_processor(str(folder))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "visual" not in name:
                    param.add_(torch.randn(param.shape, generator=generator) * 0.1)
        model.save_pretrained(folder)
    else:
        from transformers import AutoConfig, AutoModelForImageTextToText
        name = {"3b": "Qwen/Qwen2.5-VL-3B-Instruct", "7b": "Qwen/Qwen2.5-VL-7B-Instruct"}[args.config]
        tokenizer = toy.build_tokenizer()
        min_pixels, max_pixels = 56 * 56, image_size ** 2
        processor = toy.build_processor(tokenizer, min_pixels=min_pixels, max_pixels=max_pixels)
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
        folder = out / "model"
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
    model, processor = common.load_model_and_processor(str(folder), dtype=dtype, min_pixels=min_pixels,
                                                       max_pixels=max_pixels, device=device)
    model.eval()
    build_s = time.perf_counter() - t0
    jigsaw.build_dataset(jigsaw.BuildArgs(source="procedural", grid="2x2" if args.toy else "3x3",
                                                 train=args.batch_size, test=1, output_dir=str(out / "data"),
                                                 image_size=image_size))
    rows = common.load_rows(str(out / "data"), "train")
    prompts = [row["prompt"] for row in rows][:args.batch_size]
    images = [common.row_images(row) for row in rows][:args.batch_size]
    results = {"args": vars(args), "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": dtype,
               "parameters": sum(p.numel() for p in model.parameters()), "build_s": round(build_s, 1),
               "gib_in_use_hf_model": gib_in_use()}
    print(f"[bench] {results['parameters']:,} parameters ({dtype}, {results['device']}); "
          f"{args.batch_size} x {args.group_size} completions, up to {max_new_tokens} tokens")

    def timed_rounds(generate):
        """(median tokens/s, median seconds, last output) over args.rounds rounds after one warm-up."""
        generate()
        speeds, seconds = [], []
        for _ in range(args.rounds):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = generate()
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            speeds.append(sum(len(ids) for ids in result["completion_ids"]) / elapsed)
            seconds.append(elapsed)
        return statistics.median(speeds), statistics.median(seconds), result

    # ---- hf backend: the kit's own decoder --------------------------------------------------------------------
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    hf_speed, hf_seconds, _ = timed_rounds(lambda: sequences.generate(
        model, processor, prompts, images, max_new_tokens, temperature=args.temperature,
        num_samples=args.group_size))
    results["hf"] = {"tokens_per_s": round(hf_speed, 1), "seconds_per_rollout": round(hf_seconds, 2),
                     "peak_gib": round(torch.cuda.max_memory_allocated() / memory.GiB, 2) if cuda else None}
    hf_greedy = sequences.generate(model, processor, prompts, images, max_new_tokens, do_sample=False)
    print(f"[bench] hf:   {hf_speed:8.1f} tokens/s ({hf_seconds:.2f} s per rollout)")

    # ---- vllm backend: start, rollouts, weight push, sleep --------------------------------------------------
    engine = vllm_engine.VLLMGenerator(str(folder), min_pixels=min_pixels, max_pixels=max_pixels, dtype=dtype,
                                       seed=0, max_model_len=4096, gpu_memory_utilization=args.gpu_memory_utilization,
                                       kv_cache_gib=0.25, enforce_eager=args.enforce_eager or not cuda)
    results["vllm_start_s"] = round(engine.start_seconds, 1)
    results["gib_in_use_engine_awake"] = gib_in_use()
    calls = iter(range(10 ** 6))
    vllm_speed, vllm_seconds, sampled = timed_rounds(lambda: engine.generate(
        prompts, images, max_new_tokens, temperature=args.temperature, num_samples=args.group_size,
        processor=processor, seed=next(calls)))
    results["vllm"] = {"tokens_per_s": round(vllm_speed, 1), "seconds_per_rollout": round(vllm_seconds, 2)}
    results["ratio_vllm_over_hf"] = round(vllm_speed / hf_speed, 2)
    print(f"[bench] vllm: {vllm_speed:8.1f} tokens/s ({vllm_seconds:.2f} s per rollout), "
          f"{results['ratio_vllm_over_hf']}x the hf backend; engine start {engine.start_seconds:.1f} s")

    # greedy agreement (fp32 on the CPU: all equal; bf16 kernels on a GPU may part ways after a near-tie)
    vllm_greedy = engine.generate(prompts, images, max_new_tokens, do_sample=False, processor=processor)
    agree = [a == b for a, b in zip(vllm_greedy["completion_ids"], hf_greedy["completion_ids"])]
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in zip(vllm_greedy["completion_ids"], hf_greedy["completion_ids"])]
    results["greedy_equal"] = f"{sum(agree)}/{len(agree)}"
    results["greedy_common_prefix_tokens"] = prefix

    # what GRPO's importance ratio pi_trainer / pi_sampler sees on these samples (TRL logs the same two figures)
    with torch.no_grad():
        trainer = reference_logprobs(model, processor, [p for p in prompts for _ in range(args.group_size)],
                                     [im for im in images for _ in range(args.group_size)],
                                     sampled["completion_ids"], engine.vision_token_ids, args.temperature)
    difference = torch.cat([(t.double() - torch.tensor(s, dtype=torch.float64)).abs()
                            for t, s in zip(trainer, sampled["logprobs"])])
    results["logprob_difference_mean"] = float(difference.mean())
    results["logprob_difference_max"] = float(difference.max())
    print(f"[bench] greedy equal {results['greedy_equal']}; sampler-vs-trainer log-prob difference mean "
          f"{difference.mean():.1e}, max {difference.max():.1e} over {difference.numel()} tokens")

    # rft.py's cycle on the 3b preset's settings: rollouts, the engine asleep while the trainer takes a step (fp32
    # master weights, bf16 autocast, gradient checkpointing, 8-bit AdamW; one micro-batch of RFT_MICRO_BATCH 2
    # rollout sequences), the updated weights pushed, the engine woken. The first step runs with the engine awake:
    # the difference of the two peaks is what sleep mode gives the trainer.
    model.float()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    optimizer = common.make_optimizer(model.parameters(), "adamw8bit" if cuda else "adamw", 1e-6)
    micro = sequences.to_device(sequences.build_batch(
        processor, [prompts[0]] * 2, [images[0]] * 2, completion_ids=sampled["completion_ids"][:2]), device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    pushes, peaks = [], {}
    for step in range(args.rounds + 1):
        asleep = step > 0
        if asleep:
            engine.sleep()
            results["gib_in_use_engine_asleep"] = gib_in_use()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            in_use, reserved = gib_in_use(), torch.cuda.memory_reserved() / memory.GiB
        with autocast:
            logprobs = sequences.completion_logprobs(model, micro).float()
        loss = -(logprobs * micro["completion_mask"]).sum() / micro["completion_mask"].sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:   # the device's peak: what was in use before the step + what torch's allocator grew by during it
            torch.cuda.synchronize()
            peaks["asleep" if asleep else "awake"] = round(
                in_use + torch.cuda.max_memory_reserved() / memory.GiB - reserved, 2)
        seconds = engine.push_weights(model)
        if asleep:
            pushes.append(seconds)
        engine.wake_up()
    results["push_weights_s"] = round(statistics.median(pushes), 3)
    results["gib_in_use_engine_woken"] = gib_in_use()
    results["peak_gib_training_step_engine_awake"] = peaks.get("awake")
    results["peak_gib_training_step_engine_asleep"] = peaks.get("asleep")
    model.eval()
    with autocast:
        expected = sequences.generate(model, processor, prompts, images, max_new_tokens, do_sample=False)
    after = engine.generate(prompts, images, max_new_tokens, do_sample=False, processor=processor)
    results["greedy_equal_after_push"] = f"{sum(a == b for a, b in zip(after['completion_ids'], expected['completion_ids']))}" \
                                         f"/{len(prompts)}"
    print(f"[bench] push_weights {results['push_weights_s']:.3f} s (median of {args.rounds}, {dtype} engine from "
          f"fp32 weights); greedy equal after push {results['greedy_equal_after_push']}; GPU GiB in use: hf model "
          f"{results['gib_in_use_hf_model']}, +engine awake {results['gib_in_use_engine_awake']}, asleep "
          f"{results['gib_in_use_engine_asleep']}, woken {results['gib_in_use_engine_woken']}; hf rollout peak "
          f"{results['hf']['peak_gib']}; training step peak with the engine awake "
          f"{results['peak_gib_training_step_engine_awake']}, asleep {results['peak_gib_training_step_engine_asleep']}")
    files.write_json_atomic(out / "bench_vllm_rollout.json", results)
    print(json.dumps({k: v for k, v in results.items() if k != "args"}, indent=2))
    return results


if __name__ == "__main__":
    main()
