"""The memory plan of `--dry_run` (sft.py, rft.py) and of plan.py's GPU check: bytes of weights, gradients,
optimizer states, the reference model and activations per GPU, from a model built on the meta device (no weights
loaded) or from parameter counts, and the card classes a plan is compared with."""
from __future__ import annotations

from pathlib import Path

import torch

from common import OPTIMIZER_STATE_BYTES, count_parameters, fail, freeze_vision

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
REAL_CONFIGS = {"Qwen/Qwen2.5-VL-3B-Instruct": CONFIGS_DIR / "qwen2_5_vl_3b_instruct.json",
                "Qwen/Qwen2.5-VL-7B-Instruct": CONFIGS_DIR / "qwen2_5_vl_7b_instruct.json"}


def meta_model(name_or_path: str):
    """The architecture on the meta device (no memory, no download): shipped configs for the real models,
    else the config.json of a local folder."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    if name_or_path in REAL_CONFIGS:
        config = AutoConfig.from_pretrained(str(REAL_CONFIGS[name_or_path]))
    elif Path(name_or_path).is_dir():
        config = AutoConfig.from_pretrained(name_or_path)
    elif Path(name_or_path).suffix == ".json":
        config = AutoConfig.from_pretrained(name_or_path)
    else:
        fail(f"--dry_run knows {list(REAL_CONFIGS)} and local folders; {name_or_path} is neither.")
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return model


GiB = 1024 ** 3


def activation_plan(config, micro_batch: int, seq_len: int, completion_len: int, gradient_checkpointing: bool,
                    generation_sequences: int = 0) -> dict:
    """Rough peak activation bytes of one training step (and of generation), bf16 (2 bytes per value); the ONE
    formula of every --dry_run (sft.py and rft.py), for planning only: the exact figure depends on kernels.

    training, per micro-batch of b sequences of s = prompt + completion tokens (image tokens included):
      layer inputs kept (checkpointing):  L * b * s * h * 2
      full activations of a layer:        34 * b * s * h  (Korthikanti et al. 2022, flash/SDPA attention: no s^2
                                          term); one layer at a time with checkpointing, all L without
      completion logits:                  b * Tc * V * 4 + min(b, 4) * Tc * V * 8  (bf16 logits and their grad,
                                          fp32 chunks of selective_log_softmax)
    generation (GRPO rollouts), all sequences at once:
      KV cache:                           n * s * L * 2 (k, v) * kv_heads * head_dim * 2
    The two phases do not overlap (the KV cache is freed before training), so the peak is the larger.
    """
    text = getattr(config, "text_config", config)
    layers, hidden, vocab = text.num_hidden_layers, text.hidden_size, text.vocab_size
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    b, tc = micro_batch, completion_len
    kept = layers * b * seq_len * hidden * 2 if gradient_checkpointing else 0
    full = 34 * b * seq_len * hidden * (1 if gradient_checkpointing else layers)
    logits = b * tc * vocab * 4 + min(b, 4) * tc * vocab * 8
    kv_cache = generation_sequences * seq_len * layers * 2 * kv_heads * head_dim * 2
    training = kept + full + logits
    return {"training": int(training), "generation": int(kv_cache), "peak": int(max(training, kv_cache))}


def memory_plan(model, optimizer: str, precision: str, reference_model: bool = False,
                activations_bytes: int = 0, reference_bytes: int = 2, shards: int = 1) -> dict:
    """Bytes of weights, gradients, optimizer states and master copy for the chosen options, per GPU.

    precision bf16_mixed or fp32: fp32 weights (4 B) and grads (4 B); bf16: pure bf16 weights and grads (2 B).
    AdamW states 8 B/param (fp32 m, v), 8-bit AdamW 2 B/param. The reference model (GRPO's KL) is a frozen
    copy of `reference_bytes` per parameter. A lower bound: measured peaks on an H100 were up to 1.45x the
    plan (README, bench/bench_real_arch.py), from autocast weight copies, logits and allocator slack.

    shards > 1: FSDP over that many processes (configs/accelerate_fsdp2.yaml). Weights, gradients and optimizer
    states are split evenly; the optimizer is torch AdamW whatever `optimizer` says (make_optimizer: 8-bit AdamW
    does not take DTensor shards); the reference model stays a whole copy per GPU (rft.py loads it outside FSDP);
    and the units FSDP gathers for compute come on top: the embedding and the final norm + lm_head (kept gathered
    from forward to backward) and two decoder layers (the one computing and the next one prefetched), in the
    compute dtype. Activations are per process (each rank runs its own micro-batches).
    """
    layer = ends = 0
    if shards > 1:
        language = model.model.language_model if hasattr(model.model, "language_model") else model.model
        layer = max(sum(p.numel() for p in block.parameters()) for block in language.layers)
        ends = {id(p): p for m in (model.get_input_embeddings(), model.get_output_embeddings()) for p in m.parameters()}
        ends = sum(p.numel() for p in ends.values())   # tied embeddings (3B) count once
    return memory_plan_of_counts(*count_parameters(model), optimizer, precision, reference_model,
                                 activations_bytes, reference_bytes, shards, layer, ends)


def memory_plan_of_counts(trainable: int, frozen: int, optimizer: str, precision: str, reference_model: bool = False,
                          activations_bytes: int = 0, reference_bytes: int = 2, shards: int = 1,
                          layer_params: int = 0, end_params: int = 0) -> dict:
    """memory_plan from parameter counts (the GPU check plans a preset from its config.json without building a
    model). Under FSDP (shards > 1) `layer_params` (the largest decoder layer) and `end_params` (embeddings and
    lm_head, once when tied) size the units gathered for compute: two layers and both ends."""
    total = trainable + frozen
    weight_bytes = 2 if precision == "bf16" else 4
    optimizer = "adamw" if shards > 1 else optimizer
    plan = {
        "parameters_total": total, "parameters_trainable": trainable, "parameters_frozen": frozen,
        "weights": total * weight_bytes / shards,
        "gradients": trainable * weight_bytes / shards,
        "optimizer_states": trainable * OPTIMIZER_STATE_BYTES.get(optimizer, 8) / shards,
        "reference_model": total * reference_bytes if reference_model else 0,
        "activations_estimate": activations_bytes,
    }
    if shards > 1:
        plan["gathered_parameters"] = (2 * layer_params + end_params) * (4 if precision == "fp32" else 2)
    plan["total"] = sum(v for k, v in plan.items() if not k.startswith("parameters"))
    return plan


def print_memory_plan(plan: dict, title: str) -> None:
    print(f"\n{title}")
    print(f"  parameters: {plan['parameters_total']:,} total, {plan['parameters_trainable']:,} trainable, "
          f"{plan['parameters_frozen']:,} frozen")
    for key in ("weights", "gradients", "optimizer_states", "reference_model", "gathered_parameters",
                "activations_estimate", "total"):
        if key in plan:
            print(f"  {key:<22} {plan[key] / GiB:8.2f} GiB")
    for label, gib, cards in GPU_CARDS:
        fits = plan["total"] * MEMORY_HEADROOM / GiB <= gib
        print(f"  fits on {label} ({cards}; {gib:g} GiB usable) with {MEMORY_HEADROOM}x headroom: "
              f"{'yes' if fits else 'no'}")


def stage_plan(model_name: str, title: str, optimizer: str, precision: str, micro_batch: int, seq_len: int,
               completion_len: int, gradient_checkpointing: bool, shards: int = 1, frozen=(False, False),
               generation_sequences: int = 0, reference_bytes: int = 0) -> dict:
    """A training stage's --dry_run (sft.py, rft.py): the architecture on the meta device with the stage's frozen
    parts (vision tower, merger), its activations, the plan per GPU, printed under `title`. reference_bytes: bytes
    per parameter of GRPO's frozen reference model (0: none); generation_sequences: GRPO's rollout batch."""
    model = meta_model(model_name)
    freeze_vision(model, *frozen)
    acts = activation_plan(model.config, micro_batch, seq_len, completion_len, gradient_checkpointing,
                           generation_sequences=generation_sequences)
    plan = memory_plan(model, optimizer, precision, reference_model=reference_bytes > 0,
                       activations_bytes=acts["peak"], reference_bytes=reference_bytes or 2, shards=shards)
    sharding = f", FSDP over {shards} GPUs (per GPU; torch AdamW)" if shards > 1 else ""
    print_memory_plan(plan, title + sharding)
    if generation_sequences:
        print(f"  activations: training {acts['training'] / GiB:.2f} GiB, generation KV cache "
              f"{acts['generation'] / GiB:.2f} GiB (not at the same time)")
    return plan


# Measured peaks reached 1.45x the plan (GRPO, 3B, H100, fp32 master weights + autocast: README memory table):
# every "fits" keeps that much headroom. Not measured for pure bf16 (no autocast weight copies), where it is
# likely smaller: the plan errs towards "does not fit".
MEMORY_HEADROOM = 1.45
# The cards a user may have, by memory class: (label, GiB the smallest card of the class reports, examples).
# GiB = memory.total of nvidia-smi / 1024, public figures of each card: T4 15,360 MiB; L4 23,034; A10 23,028;
# A100-40GB 40,960; L40S 46,068; RTX A6000 49,140; H100 80GB HBM3 81,559; A100-80GB 81,920; RTX PRO 6000
# Blackwell 97,887; H200 143,771.
GPU_CARDS = (("16 GB", 15.0, "T4, V100-16GB"), ("24 GB", 22.49, "L4, A10, RTX 4090"), ("40 GB", 40.0, "A100-40GB"),
             ("48 GB", 44.99, "L40S, RTX A6000"), ("80 GB", 79.65, "H100, A100-80GB"),
             ("96 GB", 95.59, "RTX PRO 6000 (Colab G4)"), ("141 GB", 140.4, "H200"))
