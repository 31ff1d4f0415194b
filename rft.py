"""RFT: GRPO on the jigsaw task, the whole loop in one file (rollout -> reward -> advantages -> clipped loss).

The paper's RFT arm: Qwen2.5-VL learns 3x3 jigsaw puzzles with GRPO and the reward R_hit + R_acc + R_fmt
(jigsaw.jigsaw_reward). Each step draws `batch_size` puzzles, samples `num_generations` completions per puzzle in
one batched decode, scores them, turns rewards into group-relative advantages, and takes `num_iterations`
PPO-clipped passes over that rollout batch (with a k3 KL penalty to the frozen starting model).

Where this departs from textbook GRPO (DeepSeekMath, arXiv 2402.03300), on purpose:
  * mu = num_iterations = 1 by default (TRL's default): the "old" policy is the current one, the ratio is
    exactly 1, the clip never engages, and the update is REINFORCE with a group-mean (std-scaled) baseline plus
    the KL term. With mu > 1 the old log-probs are the first pass's own, detached (no extra forward).
  * The KL to the reference uses Schulman's k3 estimator exp(r) - r - 1 per token, added to the loss (not to
    the reward), with beta 0.04 (the GRPO paper, Jigsaw-R1): unbiased, never negative, cheap.
  * Sampling is our own decode loop (sequences.generate): each prompt is prefilled once and its cache copied to
    its G samples; plain multinomial sampling at --temperature, no top-k; vision tokens are never sampled.
    --rollout_backend vllm samples the same distribution with an in-process vLLM engine instead (TRL's colocate
    mode: weights pushed after every optimizer step, the engine asleep while the trainer runs; vllm_engine.py).
    The sampler's log-probs against the trainer's are logged at every step (sampling_logp_difference_mean/max,
    for either backend); --vllm_importance_sampling_correction reweights the loss by their truncated ratio.
  * Loss aggregation: grpo (per-sequence token mean, the paper's), dapo or dr_grpo with TRL's normalisers.

Run it (one GPU; fp32 master weights + bf16 autocast, 8-bit AdamW, gradient checkpointing), in the 3b preset's folders:
    python rft.py --model Qwen/Qwen2.5-VL-3B-Instruct --data runs/3b/data/jigsaw --output_dir runs/3b/rft \\
        --max_steps 500 --batch_size 32 --num_generations 4 --lr 2e-6
    python rft.py --model Qwen/Qwen2.5-VL-3B-Instruct --data runs/3b/data/jigsaw --output_dir runs/3b/rft \\
        --max_steps 500 --batch_size 32 --num_generations 4 --lr 2e-6 --resume
A finished run goes on with a larger --max_steps and --resume when the lr is constant (the default
--min_lr_ratio 1): run_all.sh's pilot is the first steps of the RFT run, and its rft stage continues it.
    accelerate launch --config_file configs/accelerate_fsdp2.yaml --num_processes 4 rft.py \\
        --model Qwen/Qwen2.5-VL-7B-Instruct --data runs/7b/data/jigsaw --output_dir runs/7b/rft --batch_size 1
    (FSDP2 over 4 GPUs, B per process; decoding steps until every rank is done, since each forward gathers)
    python rft.py ... --rollout_backend vllm    # rollouts by vLLM (pip install: vllm_engine.py says how)
Memory plan only (architecture on the meta device, no weights loaded, nothing downloaded):
    python rft.py --model Qwen/Qwen2.5-VL-7B-Instruct --dry_run --batch_size 4 --num_generations 8
    python rft.py --model Qwen/Qwen2.5-VL-7B-Instruct --dry_run --batch_size 1 --plan_processes 4   # per GPU, FSDP
On the CPU, after `bash run_all.sh` made the toy run (runs/toy/): its RFT stage as run_all.sh runs it (the same
command resumes it after an interruption), then a short run of your own in a folder of its own:
    python rft.py --model runs/toy/base/final --data runs/toy/data/jigsaw --output_dir runs/toy/rft --max_steps 160 \\
        --batch_size 4 --num_generations 8 --lr 1e-4 --max_completion_length 64 --save_steps 20 --save_at 10 \\
        --min_answer_image_mi 0.1 --micro_batch_size 32 --no_gradient_checkpointing --precision fp32 \\
        --optimizer adamw --min_pixels 3136 --max_pixels 12544 --resume
    python rft.py --model runs/toy/base/final --data runs/toy/data/jigsaw --output_dir /tmp/rft_short --max_steps 20 \\
        --batch_size 2 --num_generations 4 --max_completion_length 32 --lr 1e-3 --optimizer adamw --eval_size 8

Step 0 of a fresh run evaluates the starting model (exact, hit, format) and checks that its answer depends on the
image (base_check.check: MI(answer; image); stops below --min_answer_image_mi). The same check alone, without a
training run, is base_check.py (run_all.sh's eval_base stage runs it on the base model).

Outputs in --output_dir (runs.py's layout): run.json (settings), metrics.jsonl (one line per step, plus eval
lines), completions.jsonl (what the policy wrote: a few groups with rewards and advantages at step 1 and every
--eval_steps), checkpoint-N/ (model-only snapshots every --save_steps, bf16 on a GPU), resume/ (the one resume
state: weights, optimizer, data position, RNG), final/ (save_pretrained model + processor).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import base_check
import common
import fsdp
import jigsaw
import memory
import runs
import sequences


@dataclass
class Args:
    # --- model and data ---
    model: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    """policy to train: hub id or save_pretrained folder (the paper: Qwen2.5-VL-3B/7B-Instruct)"""
    data: str = "data/jigsaw"
    """jigsaw data set folder written by jigsaw.py (save_to_disk with train/test splits)"""
    output_dir: str = "runs/rft"
    """where metrics.jsonl, checkpoint-N/ and final/ go"""
    split: str = "train"
    """split to train on"""
    eval_split: str = "test"
    """split whose first --eval_size puzzles are scored (greedy, exact accuracy) every --eval_steps"""
    prompt_style: str = "thinking"
    """thinking (the paper's format: <think>..</think><answer>..</answer>, column prompt) or answer_only (column
    prompt_no_think; R_fmt then needs only the <answer> block)"""
    w_hit: float = 1.0
    """weight of R_hit, share of positions right (the paper: R = R_hit + R_acc + R_fmt, weights 1)"""
    w_acc: float = 1.0
    """weight of R_acc, 1 if the whole permutation is right (the paper)"""
    w_fmt: float = 1.0
    """weight of R_fmt, 1 if <think>..</think><answer>..</answer> and the answer parses (the paper)"""
    min_pixels: int | None = None
    """image processor min_pixels (None: the processor's own setting)"""
    max_pixels: int | None = None
    """image processor max_pixels (None: the processor's own; lower it rather than ever truncating prompts)"""
    # --- rollout ---
    max_steps: int = 1000
    """GRPO steps (one rollout batch each; the paper's RFT ran 27,360 steps, see README for budgets)"""
    batch_size: int = 4
    """puzzles per step and process (B); B * num_generations sequences per rollout batch (this project's choice: 32 sequences
    fit one 80 GB GPU for 3B, see --dry_run)"""
    num_generations: int = 8
    """completions sampled per puzzle (G; Jigsaw-R1 and TRL's num_generations: 8)"""
    max_completion_length: int = 512
    """max completion length (Jigsaw-R1: 512); also the constant of the dr_grpo loss"""
    temperature: float = 1.0
    """sampling temperature, also applied to training log-probs (Jigsaw-R1 and TRL: 1.0)"""
    top_p: float = 1.0
    """nucleus sampling (TRL default 1.0: no truncation, so log-probs stay those of the sampled policy)"""
    rollout_backend: str = "hf"
    """decoder of the rollouts, the evaluations and the step-0 check: hf (sequences.generate, the reference) or
    vllm (an in-process vLLM engine, vllm_engine.py; an optional install: requirements-vllm.txt on a CPU,
    constraints-vllm-cuda.txt on a GPU). One process only"""
    vllm_importance_sampling_correction: bool = False
    """vllm backend: multiply each token's policy loss by min(pi_trainer / pi_sampler, cap), the truncated importance
    sampling correction (TIS) of Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
    Training", as TRL's GRPOTrainer applies it (truncated_importance_weights). TRL turns it on with vLLM; off here
    so that both backends run the same algorithm: turn it on when sampling_logp_difference_mean grows"""
    vllm_importance_sampling_cap: float = 2.0
    """the cap C of that correction (TRL's vllm_importance_sampling_cap, 2.0 where it was introduced)"""
    # --- loss ---
    lr: float = 1e-6
    """learning rate (Jigsaw-R1 and TRL's GRPOConfig: 1e-6)"""
    beta: float = 0.04
    """KL coefficient to the frozen reference, k3 estimator (Jigsaw-R1 and the DeepSeekMath GRPO paper: 0.04;
    0 loads no reference model)"""
    epsilon: float = 0.2
    """PPO clip range, lower side (TRL and PPO: 0.2)"""
    epsilon_high: float | None = None
    """PPO clip range, upper side (None: = epsilon; DAPO's clip-higher uses 0.28)"""
    num_iterations: int = 1
    """mu: optimizer passes over each rollout batch (TRL default 1; >1 keeps old log-probs for the ratio)"""
    loss_type: str = "grpo"
    """aggregation: grpo (per-sequence token mean, then mean; the GRPO paper), dapo (token sum / tokens of the
    step; TRL's default), dr_grpo (token sum / (sequences * max_completion_length))"""
    scale_rewards: bool = True
    """divide advantages by the group std + 1e-4 (GRPO; --no-scale_rewards is Dr. GRPO's choice)"""
    mask_truncated: bool = False
    """drop completions that hit --max_completion_length from the loss (DAPO's overlong filtering; TRL default off)"""
    micro_batch_size: int = 2
    """sequences per forward/backward; the B*G rollout sequences are accumulated in chunks of this size (2: the
    largest measured to fit an H100 with the 3B architecture; docs/LOG.md)"""
    max_grad_norm: float = 1.0
    """gradient clipping (HF Trainer / TRL default 1.0)"""
    weight_decay: float = 0.0
    """AdamW weight decay (TRL/HF default 0.0)"""
    warmup_steps: int = 0
    """linear warmup optimizer steps (TRL default 0)"""
    min_lr_ratio: float = 1.0
    """cosine floor as a share of --lr; 1.0 = constant lr (nano-aha-moment and Jigsaw-R1 use a constant lr)"""
    # --- memory and precision ---
    optimizer: str = "adamw8bit"
    """adamw, adamw8bit or paged_adamw8bit (bitsandbytes 8-bit states: 2 B/param instead of 8), adamw8bit_sr
    (torchao 8-bit states with bf16 stochastic rounding, for --precision bf16; requirements-torchao.txt)"""
    precision: str = "auto"
    """bf16_mixed (fp32 master weights + bf16 autocast; the default on GPU), bf16 (pure bf16 weights: lr 1e-6
    updates mostly round to zero unless --optimizer adamw8bit_sr rounds stochastically), fp32 (the default on
    CPU), auto"""
    ref_precision: str = "auto"
    """reference model precision: auto = bf16 on GPU (frozen, so no rounding trap), fp32 on CPU; bf16, fp16, fp32"""
    gradient_checkpointing: bool = True
    """recompute activations in backward (use_reentrant=False), the usual trade on one GPU"""
    freeze_vision_tower: bool = False
    """freeze the vision tower (not the merger); the paper's choice is unknown, Jigsaw-R1 trains everything"""
    attn_implementation: str | None = None
    """attention kernel (None: transformers' default, sdpa; flash_attention_2 if installed)"""
    # --- operations ---
    seed: int = 0
    """seed of puzzle order and sampling (rank r of several processes samples with seed + r)"""
    save_steps: int = 100
    """every N steps: a model-only snapshot checkpoint-N/ (bf16 on a GPU) and the one resume state"""
    save_at: str = ""
    """extra model-only snapshots at these steps, comma-separated (e.g. 10: the early checkpoint that
    rollout_sft.py's rea_self_generated source samples; points of the accuracy/forgetting curve)"""
    save_total_limit: int = 0
    """snapshots kept (oldest deleted; 0 keeps all: evaluation along training and analyze.py read them)"""
    eval_steps: int = 50
    """evaluate every N steps (0: never)"""
    eval_size: int = 64
    """puzzles of --eval_split scored at each evaluation (the first N: a fixed subset)"""
    eval_batch_size: int = 16
    """prompts per greedy generate call during evaluation"""
    mi_puzzles: int = 32
    """test puzzles of the step-0 check MI(answer; image) (0: skip it; base_check.py)"""
    mi_candidates: int = 24
    """candidate answers teacher-forced per puzzle: all n! when n! <= this (2x2: the 24 permutations), else a
    seeded sample of this many plus the true answers"""
    min_answer_image_mi: float = 0.1
    """stop at step 0 when MI(answer; image) is below this, in nats (0: never): GRPO would reinforce luck. 0.1 is
    3% of the 2x2 maximum log(24) = 3.18; a blind toy base measured 0.04 (docs/LOG.md)"""
    resume: bool = False
    """continue the run in --output_dir from its resume state (weights, optimizer, schedule, data position, RNG);
    refused when the recorded settings differ"""
    overwrite: bool = False
    """start again in an --output_dir that already holds a run (removes that run's checkpoints and metrics)"""
    report_to: str = "none"
    """experiment tracking besides metrics.jsonl: none | tensorboard | wandb (HF Trainer's flag; off by default)"""
    log_completions: int = 2
    """groups (puzzle, its completions, reward components, advantages) written to completions.jsonl at every
    --eval_steps and the first step: what the policy actually wrote (TRL's log_completions); 0 = none"""
    max_nonfinite: int = 3
    """stop after this many non-finite losses/gradients in a row (each one skips its update)"""
    dry_run: bool = False
    """print the memory plan for these options (meta device, no weights) and exit"""
    plan_prompt_length: int = 512
    """prompt length assumed by --dry_run's activation estimate (Jigsaw-R1's max prompt length: 512)"""
    plan_processes: int = 1
    """GPUs the --dry_run plan shards the policy over with FSDP (accelerate launch --config_file
    configs/accelerate_fsdp2.yaml --num_processes N): the plan per GPU. 1: one GPU (DDP too: a whole copy each)"""


# ----------------------------------------------------------------------------------------------------------
# Loss math: small pure functions (tests check them by hand)
# ----------------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4):
    """Group-relative advantages: (reward - group mean) / (group std + eps); no division when scale=False
    (Dr. GRPO). Rewards are ordered group by group (the G completions of puzzle 1, then of puzzle 2, ...).
    The std is the unbiased one, as TRL's GRPOTrainer computes it.

    Worked example, one 2x2 puzzle, a group of 3 generations:
        "<think>..</think><answer>3 1\\n4 2</answer>"  (right)          R = 1 + 1 + 1 = 3.0
        "<think>..</think><answer>3 1\\n2 4</answer>"  (2 of 4 right)   R = 0.5 + 0 + 1 = 1.5
        "the pieces are shuffled"                      (no answer)      R = 0.0
    mean 1.5, std sqrt((1.5^2 + 0 + 1.5^2) / 2) = 1.5, so the advantages are
        [1.5, 0.0, -1.5] / (1.5 + 1e-4) = [0.99993, 0.0, -0.99993]
    and with scale=False simply [1.5, 0.0, -1.5]. A group whose rewards are all equal gets advantages 0:
    it teaches nothing (logged as zero_std_groups).
    """
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) by Schulman's k3 estimator: exp(r) - r - 1 with r = log pi_ref - log pi.
    Never negative, unbiased, and exactly 0 where both models agree (the GRPO paper's KL term)."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              ref_logprobs: torch.Tensor | None = None, beta: float = 0.0, epsilon: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "grpo", max_completion_length: int = 512,
              num_sequences: int | None = None, num_tokens: int | float | None = None,
              importance_weights: torch.Tensor | None = None):
    """PPO-clipped GRPO loss of one (micro-)batch, [B, T] tensors, advantages [B].

    per-token loss = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) + beta * k3_kl,
    ratio = exp(logprobs - old_logprobs). Aggregation, with the normalisers of TRL's GRPOTrainer:
      grpo:    sum over sequences of (token mean of the sequence) / num_sequences
      dapo:    sum over tokens / num_tokens
      dr_grpo: sum over tokens / (num_sequences * max_completion_length)
    `num_sequences` and `num_tokens` are those of the whole step (default: this batch), so that the losses of
    the micro-batches of one step add up to the loss of the step (gradient accumulation needs no rescaling).
    `importance_weights` [B, T] (detached; truncated_importance_weights) multiply the clipped policy term of each
    token, not the KL term, as in TRL. Returns (loss, stats) with stats holding detached per-token tensors (ratio,
    kl, clipped).

    Example (grpo, beta 0, one sequence of 2 tokens, A = 1): ratios [1.0, 1.5] -> token losses [-1.0, -1.2]
    (1.5 is clipped to 1.2) -> loss -1.1; the clipped token has no gradient.
    """
    if loss_type not in ("grpo", "dapo", "dr_grpo"):
        raise ValueError(f"loss_type {loss_type!r} unknown; choose grpo, dapo or dr_grpo")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logprobs.dtype)
    advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logprobs - old_logprobs)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped_ratio * advantages)
    if importance_weights is not None:
        per_token = per_token * importance_weights
    kl = torch.zeros_like(logprobs)
    if beta != 0.0:
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
    num_sequences = logprobs.shape[0] if num_sequences is None else num_sequences
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_sequences
    elif loss_type == "dapo":
        num_tokens = mask.sum() if num_tokens is None else num_tokens
        loss = (per_token * mask).sum() / max(float(num_tokens), 1.0)
    else:
        loss = (per_token * mask).sum() / (num_sequences * max_completion_length)
    # Where the clipped term is the smaller one and the ratio is out of range, the gradient is zero.
    clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    return loss, {"ratio": ratio.detach(), "kl": kl.detach(), "clipped": clipped.detach()}


def truncated_importance_weights(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                                 cap: float = 2.0) -> torch.Tensor:
    """Truncated importance sampling (TIS, Yao et al. 2025, fengyao.notion.site/off-policy-rl): the rollouts were
    drawn by the sampler (vLLM), whose log-probs differ slightly from the trainer's own for the same weights, so
    each token's policy-gradient term is reweighted by pi_trainer / pi_sampler, truncated at `cap` to bound the
    variance: w = min(exp(trainer_logprobs - sampler_logprobs), cap), detached. TRL's token-level form
    (trl/trainer/grpo_trainer.py at 12fc85fd, "Truncated Importance Sampling to address rollout-training mismatch",
    PR #3867: old_per_token_logps - sampling_per_token_logps, clamp(max=vllm_importance_sampling_cap)); the
    trainer log-probs are the "old" policy's (with mu = 1 the current policy's own, detached). TRL has since
    added sequence-level and masking variants and defaults to sequence_mask at 3.0 (grpo_config.py at f2cd577);
    this is the token_truncate one.

    Example, one sequence of 3 tokens, cap 2: trainer [-1.0, -0.5, -2.0], sampler [-1.0, -1.0, -0.1] ->
    exp([0.0, 0.5, -1.9]) = [1.0, 1.6487, 0.1496]; nothing above the cap. With sampler [-1.0, -2.0, -2.0] the
    second token's exp(1.5) = 4.48 is truncated to 2.0. Padding positions (both 0) get weight 1 and are masked
    by the loss anyway."""
    return torch.exp(trainer_logprobs.detach() - sampler_logprobs).clamp(max=cap)


# ----------------------------------------------------------------------------------------------------------
# Rollout and policy update
# ----------------------------------------------------------------------------------------------------------
def rollout(model, processor, rows: list[dict], args: Args, autocast=contextlib.nullcontext, engine=None,
            seed: int | None = None) -> dict:
    """Sample G completions for each of the B puzzles in ONE batched decode (sequences.generate prefills each
    puzzle and its images once and copies the cache G times; or the vLLM engine, with its request seed), score
    them, and compute advantages. The completions come group by group: puzzle 1's G samples, then puzzle 2's, ..."""
    prompt_column = PROMPT_COLUMNS[args.prompt_style]
    answers = [row["answer"] for row in rows for _ in range(args.num_generations)]
    prompts, images = [row[prompt_column] for row in rows], [common.row_images(row) for row in rows]
    if engine is None:
        with autocast():
            out = sequences.generate(model, processor, prompts, images, max_new_tokens=args.max_completion_length,
                                     temperature=args.temperature, top_p=args.top_p, do_sample=True,
                                     num_samples=args.num_generations)
    else:  # vLLM's kernels in the engine's own dtype: no autocast
        out = engine.generate(prompts, images, max_new_tokens=args.max_completion_length,
                              temperature=args.temperature, top_p=args.top_p, num_samples=args.num_generations,
                              processor=processor, seed=seed)
    scores = jigsaw.score_completions(out["texts"], answers, args.prompt_style == "thinking", w_hit=args.w_hit,
                                      w_acc=args.w_acc, w_fmt=args.w_fmt)
    scores = {k: v if k == "errors" else torch.tensor(v) for k, v in scores.items()}
    advantages = group_advantages(scores["reward"], args.num_generations, scale=args.scale_rewards)
    return {"prompt_batch": out["batch"], "completion_ids": out["completion_ids"], "texts": out["texts"],
            "truncated": torch.tensor(out["truncated"]), "scores": scores, "advantages": advantages,
            "sampler_logprobs": out["logprobs"]}


def micro_batches(processor, batch: dict, args: Args) -> list[dict]:
    """The rollout as training micro-batches of `micro_batch_size` sequences (prompt left-padded, completion
    right-padded). Sequence i is completion i after prompt i // G, taken from the prompts the rollout already
    encoded (sequences.select_prompt_rows: no second pass of the image processor); reused by every pass."""
    chunks = []
    n = len(batch["completion_ids"])
    for start in range(0, n, args.micro_batch_size):
        end = min(n, start + args.micro_batch_size)
        rows = [i // args.num_generations for i in range(start, end)]
        prompts = sequences.select_prompt_rows(batch["prompt_batch"], rows)
        mb = sequences.append_completions(prompts, batch["completion_ids"][start:end], processor.tokenizer.pad_token_id)
        # The chunk's distinct prompts, for the no-gradient log-probs that run each prompt once.
        distinct = sorted(set(rows))
        mb["prefix"] = sequences.select_prompt_rows(batch["prompt_batch"], distinct)
        mb["prefix_index"] = torch.tensor([distinct.index(r) for r in rows])
        loss_mask = mb["completion_mask"].clone()
        if args.mask_truncated:
            loss_mask = loss_mask * (~batch["truncated"][start:end]).long().unsqueeze(1)
        mb["loss_mask"] = loss_mask
        mb["advantages"] = batch["advantages"][start:end]
        sampler = torch.zeros(mb["completion_ids"].shape, dtype=torch.float32)   # padded like completion_ids
        for row, values in enumerate(batch["sampler_logprobs"][start:end]):
            sampler[row, :len(values)] = torch.tensor(values, dtype=torch.float32)
        mb["sampler_logprobs"] = sampler
        chunks.append(mb)
    return chunks


def policy_update(accelerator, model, ref_model, optimizer, scheduler, chunks: list[dict], args: Args) -> dict:
    """num_iterations PPO-clipped passes over one rollout batch, each pass one optimizer step with gradient
    accumulation over the micro-batches. Returns per-pass statistics and the number of skipped updates."""
    device = accelerator.device
    num_sequences = sum(mb["loss_mask"].shape[0] for mb in chunks)
    # dapo divides by the tokens of the whole step: under several processes that is the count summed over ranks
    # (TRL's num_items_in_batch), scaled by the number of processes because DDP averages the ranks' gradients.
    local_tokens = sum(int(mb["loss_mask"].sum()) for mb in chunks)
    world = accelerator.num_processes
    num_tokens = float(accelerator.reduce(torch.tensor(float(local_tokens), device=device), "sum")) / world
    # Reference log-probs (KL): once per rollout, without gradient.
    # With mu = 1 the "old" policy IS the current one: ratio = exp(lp - lp.detach()) = 1, the clip never
    # engages, and GRPO reduces to REINFORCE with a group-mean baseline; no extra forward is needed.
    # The reference runs each distinct prompt once for its completions of the chunk (shared_prefix_logprobs).
    # Old log-probs (mu > 1) need no forward of their own: they are the first pass's log-probs, detached, taken
    # before any update of this rollout (so the first pass has ratio exactly 1).
    with torch.no_grad():
        for mb in chunks:
            inputs = sequences.to_device(mb, device)
            prefix = (sequences.to_device(mb["prefix"], device), inputs["prefix_index"], inputs["completion_ids"],
                      inputs["completion_mask"], args.temperature)
            if ref_model is not None:
                mb["ref_logprobs"] = sequences.shared_prefix_logprobs(ref_model, *prefix).float().cpu()

    passes, skipped = [], 0
    # sampler-vs-trainer mismatch on the rollout's tokens, before any update (TRL's sampling_logp_difference)
    mismatch = {"sum": 0.0, "max": 0.0, "tokens": 0}
    for iteration in range(args.num_iterations):
        stats = {"loss": 0.0, "kl_sum": 0.0, "clipped_sum": 0.0, "ratio_sum": 0.0, "tokens": 0,
                 "ratio_min": math.inf, "ratio_max": -math.inf}
        finite = True
        for i, mb in enumerate(chunks):
            inputs = sequences.to_device(mb, device)
            sync = accelerator.no_sync(model) if i < len(chunks) - 1 else contextlib.nullcontext()
            with sync, accelerator.autocast():
                logprobs = sequences.completion_logprobs(model, inputs, args.temperature).float()
                if args.num_iterations > 1 and "old_logprobs" not in mb:
                    # first pass (or one after a skipped first pass: the weights have not moved either way)
                    mb["old_logprobs"] = logprobs.detach().cpu()
                old = mb["old_logprobs"].to(device) if args.num_iterations > 1 else logprobs.detach()
                if iteration == 0:
                    difference = (logprobs.detach() - inputs["sampler_logprobs"]).abs()
                    difference = difference[inputs["completion_mask"].bool()]
                    mismatch["sum"] += float(difference.sum())
                    mismatch["max"] = max(mismatch["max"], float(difference.max()) if difference.numel() else 0.0)
                    mismatch["tokens"] += difference.numel()
                weights = None
                if args.vllm_importance_sampling_correction:
                    weights = truncated_importance_weights(old, inputs["sampler_logprobs"],
                                                           args.vllm_importance_sampling_cap)
                loss, s = grpo_loss(logprobs, old, inputs["advantages"].float(), inputs["loss_mask"],
                                    inputs.get("ref_logprobs"), args.beta, args.epsilon, args.epsilon_high,
                                    args.loss_type, args.max_completion_length, num_sequences, num_tokens,
                                    importance_weights=weights)
                if not torch.isfinite(loss):
                    finite = False
                    break
                accelerator.backward(loss)
            mask = inputs["loss_mask"].bool()
            stats["loss"] += float(loss.detach())
            stats["kl_sum"] += float(s["kl"][mask].sum())
            stats["clipped_sum"] += float(s["clipped"][mask].sum())
            stats["ratio_sum"] += float(s["ratio"][mask].sum())
            stats["tokens"] += int(mask.sum())
            if mask.any():
                stats["ratio_min"] = min(stats["ratio_min"], float(s["ratio"][mask].min()))
                stats["ratio_max"] = max(stats["ratio_max"], float(s["ratio"][mask].max()))
        grad_norm = float("nan")
        if finite:
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
            finite = math.isfinite(grad_norm)
        if finite:
            optimizer.step()
            scheduler.step()
        else:  # a non-finite loss or gradient: drop this update, keep the weights as they were
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
        tokens = max(stats["tokens"], 1)
        passes.append({"loss": stats["loss"] if finite else float("nan"), "kl": stats["kl_sum"] / tokens,
                       "clip_fraction": stats["clipped_sum"] / tokens, "ratio_mean": stats["ratio_sum"] / tokens,
                       "ratio_min": stats["ratio_min"], "ratio_max": stats["ratio_max"], "grad_norm": grad_norm,
                       "finite": finite})
    # over all processes: the mean over every token of the step, the largest difference anywhere
    totals = accelerator.reduce(torch.tensor([mismatch["sum"], float(mismatch["tokens"])], device=device), "sum")
    largest = accelerator.gather(torch.tensor([mismatch["max"]], device=device)).max()
    return {"passes": passes, "skipped": skipped,
            "sampling_logp_difference_mean": float(totals[0] / totals[1].clamp(min=1)),
            "sampling_logp_difference_max": float(largest)}


# ----------------------------------------------------------------------------------------------------------
# Memory plan (--dry_run)
# ----------------------------------------------------------------------------------------------------------
def dry_run(args: Args, precision: str, ref_dtype: str) -> dict:
    sequences_per_step = args.batch_size * args.num_generations
    return memory.stage_plan(
        args.model, f"GRPO memory plan: {args.model}, B={args.batch_size} G={args.num_generations} micro="
                    f"{args.micro_batch_size} prompt~{args.plan_prompt_length} completion<="
                    f"{args.max_completion_length}, {args.optimizer}, precision {precision}, beta={args.beta}",
        args.optimizer, precision,
        min(args.micro_batch_size, sequences_per_step), args.plan_prompt_length + args.max_completion_length,
        args.max_completion_length, args.gradient_checkpointing, args.plan_processes, (args.freeze_vision_tower, False),
        generation_sequences=sequences_per_step,
        reference_bytes=common.DTYPES[ref_dtype].itemsize if args.beta != 0.0 else 0)


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------
PROMPT_COLUMNS = {"thinking": "prompt", "answer_only": "prompt_no_think"}
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
RANGES = {"max_steps": ">= 0", "batch_size": ">= 1", "num_generations": ">= 2", "max_completion_length": ">= 1",
          "temperature": "> 0", "top_p": "(0, 1]", "lr": "> 0", "beta": ">= 0", "epsilon": "(0, 1)",
          "epsilon_high": "(0, 10]", "num_iterations": ">= 1", "micro_batch_size": ">= 1", "max_grad_norm": "> 0",
          "weight_decay": ">= 0", "warmup_steps": ">= 0", "min_lr_ratio": "[0, 1]", "save_steps": ">= 0",
          "save_total_limit": ">= 0", "eval_steps": ">= 0", "eval_size": ">= 0", "eval_batch_size": ">= 1",
          "max_nonfinite": ">= 1", "plan_prompt_length": ">= 1", "log_completions": ">= 0", "w_hit": ">= 0",
          "w_acc": ">= 0", "w_fmt": ">= 0", "min_pixels": ">= 0", "max_pixels": ">= 0", "mi_puzzles": ">= 0",
          "mi_candidates": ">= 2", "min_answer_image_mi": ">= 0", "plan_processes": ">= 1",
          "vllm_importance_sampling_cap": "> 0"}
# Flags that do not change the trajectory: a --resume may change them (runs.prepare_run compares the rest).
OPERATIONAL = ("save_steps", "save_at", "save_total_limit", "eval_steps", "eval_size", "eval_batch_size",
               "max_nonfinite", "report_to", "log_completions", "dry_run", "plan_prompt_length", "mi_puzzles",
               "mi_candidates", "min_answer_image_mi", "plan_processes")


def operational_flags(args: Args) -> tuple[str, ...]:
    """OPERATIONAL, plus --max_steps when the lr is constant (--min_lr_ratio 1: the schedule never reads the
    total), so a run continues past the steps it was started with: run_all.sh's pilot is the first steps of
    the RFT run, and its RFT stage resumes it with the full --max_steps (the same trajectory as one run; a test
    checks the weights bit for bit). With a decaying lr the total shapes every step, so it must match."""
    return OPERATIONAL + (("max_steps",) if args.min_lr_ratio == 1.0 else ())


def resolve_precision(args: Args) -> tuple[str, str, str, str]:
    """(precision name, accelerate mixed_precision, policy dtype, reference dtype); a --dry_run plans for a GPU."""
    cuda = torch.cuda.is_available() or args.dry_run
    precision = common.resolve_precision(args.precision, cuda)
    ref_dtype = common.resolve_dtype(args.ref_precision, "cuda" if cuda else "cpu", "--ref_precision")
    return (precision, *common.PRECISIONS[precision], ref_dtype)


def check_args(args: Args) -> None:
    """Every numeric flag range-checked (exit 2, before any model is loaded), then the named choices."""
    common.check_ranges(args, RANGES)
    common.check_attn_implementation(args.attn_implementation)
    if args.prompt_style not in PROMPT_COLUMNS:
        common.fail(f"--prompt_style {args.prompt_style}: choose thinking or answer_only.")
    if args.loss_type not in LOSS_TYPES:
        common.fail(f"--loss_type {args.loss_type} unknown; choose grpo, dapo or dr_grpo.")
    common.check_optimizer(args.optimizer, args.precision)
    if args.min_pixels and args.max_pixels and args.min_pixels > args.max_pixels:
        common.fail(f"--min_pixels {args.min_pixels} is larger than --max_pixels {args.max_pixels}.")
    if args.rollout_backend != "hf":
        import vllm_engine
        vllm_engine.check_backend(args.rollout_backend)
    elif args.vllm_importance_sampling_correction:
        common.fail("--vllm_importance_sampling_correction corrects the vLLM sampler's mismatch with the trainer; it "
                    "needs --rollout_backend vllm (the hf backend samples with the trainer's own model).")


def completion_records(step: int, rows: list[dict], batch: dict, args: Args) -> list[dict]:
    """The first --log_completions groups of a rollout as JSON lines: puzzle, true answer, and every completion
    with its reward components and advantage (nano-aha-moment's episode dumps, TRL's log_completions)."""
    out, g = [], args.num_generations
    for k, row in enumerate(rows[:args.log_completions]):
        samples = []
        for i in range(k * g, (k + 1) * g):
            samples.append({"text": batch["texts"][i], "reward": float(batch["scores"]["reward"][i]),
                            "hit": float(batch["scores"]["hit"][i]), "acc": float(batch["scores"]["acc"][i]),
                            "fmt": float(batch["scores"]["fmt"][i]), "advantage": float(batch["advantages"][i]),
                            "truncated": bool(batch["truncated"][i]), "tokens": len(batch["completion_ids"][i]),
                            "completion_ids": list(batch["completion_ids"][i])})
        out.append({"step": step, "puzzle_id": row.get("id"), "answer": list(row["answer"]), "completions": samples})
    return out


def main(argv=None) -> dict:
    # ------------------------------------------------------------------ config
    args = common.parse_args(Args, __doc__, argv)
    check_args(args)
    save_at = runs.parse_save_at(args.save_at)
    precision, mixed_precision, policy_dtype, ref_dtype = resolve_precision(args)
    if args.dry_run:
        dry_run(args, precision, ref_dtype)
        return {}
    from tqdm import tqdm

    # ------------------------------------------------------------------ output folder, model, data
    # (the folder writable, ours and locked: a second rft.py on it stops here; the model's weights complete;
    # the data checked: all before any model loads)
    runs.claim_output_dir(args.output_dir, "rft.py", args.overwrite)
    common.check_model_path(args.model)
    prompt_column = PROMPT_COLUMNS[args.prompt_style]
    train = common.load_rows(args.data, args.split, required=(prompt_column, "answer", "images"), verify_images=True)
    eval_rows = []
    if args.eval_steps > 0 and args.eval_size > 0:
        test = common.load_rows(args.data, args.eval_split, required=(prompt_column, "answer", "images"))
        eval_rows = [test[i] for i in range(min(args.eval_size, len(test)))]
    if len(train) == 0:
        common.fail(f"data {args.data} split {args.split} is empty; rebuild it with jigsaw.py.")

    output_dir = Path(args.output_dir)
    accelerator = runs.make_accelerator(mixed_precision, args.report_to, output_dir)
    resume_from = runs.prepare_run(accelerator, output_dir, "rft.py", dataclasses.asdict(args), args.resume,
                                     args.overwrite, operational_flags(args))
    # before any model is loaded: a finished run stops here, one continued past its end keeps that end's snapshot
    if runs.continue_run(accelerator, resume_from, output_dir, args.max_steps, args.save_steps, save_at, "rft"):
        return {"step": args.max_steps}
    # Each process samples with its own seed and draws its own puzzles (common.data_indices at its rank's
    # positions): N GPUs must not generate N copies of the same rollouts.
    world, rank = accelerator.num_processes, accelerator.process_index
    common.seed_everything(args.seed + rank)
    if args.rollout_backend == "vllm" and world > 1:
        common.fail(f"--rollout_backend vllm runs one in-process engine: {world} processes would need vLLM's "
                    "external launcher, which this kit has not tested. Run one process, or use --rollout_backend hf.")

    # ------------------------------------------------------------------ model
    model, processor = common.load_model_and_processor(args.model, policy_dtype, args.attn_implementation,
                                                       args.min_pixels or None, args.max_pixels or None,
                                                       str(accelerator.device))
    if args.freeze_vision_tower:
        # The frozen tower's parameters need no grad and its input (pixels) none either, so autograd records
        # nothing inside it: it runs as if under no_grad.
        common.freeze_vision(model, True, False)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    ref_model = None
    if args.beta != 0.0:  # no reference model at all when there is no KL term
        # Never prepared: under FSDP too a whole frozen copy per GPU (no gathers in its forwards; the plan counts it)
        ref_model = common.load_model(args.model, ref_dtype, args.attn_implementation, str(accelerator.device))
        ref_model.eval().requires_grad_(False)
    optimizer = common.make_optimizer(model.parameters(), args.optimizer, args.lr, args.weight_decay,
                                      sharded=fsdp.is_sharded(accelerator), quiet=not accelerator.is_main_process)
    scheduler = common.warmup_cosine(optimizer, args.warmup_steps, max(1, args.max_steps) * args.num_iterations,
                                     args.min_lr_ratio)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # Training mode: transformers checkpoints a layer only while the module is in training mode, and
    # from_pretrained returns eval mode. sequences.generate switches to eval for sampling and back afterwards.
    model.train()
    trainable, frozen = common.count_parameters(model)
    accelerator.print(f"[rft] {args.model}: {trainable:,} trainable / {frozen:,} frozen parameters; "
                      f"{len(train)} puzzles; B={args.batch_size} G={args.num_generations} per process, {world} "
                      f"process(es); precision {mixed_precision}/{policy_dtype}; reference "
                      f"{ref_dtype if ref_model is not None else 'none'}" + fsdp.sharding_note(accelerator, model))

    # ------------------------------------------------------------------ resume
    # accelerate's load_state restores every process's RNG (the sampler draws from torch's); runs checks it did.
    state = runs.start_or_resume(accelerator, resume_from, output_dir, args.resume, "rft")
    step, position, nonfinite_total, last = state["step"], state["data_position"], state.get("nonfinite_total", 0), {}
    if args.report_to != "none":
        accelerator.init_trackers("rft", config={k: v for k, v in dataclasses.asdict(args).items()
                                                 if isinstance(v, (int, float, str, bool))})
    logger = runs.MetricsLogger(output_dir / "metrics.jsonl", enabled=accelerator.is_main_process,
                                accelerator=accelerator)
    # Every process records what it sampled (rank r > 0 in completions.rank{r}.jsonl): N GPUs must show N
    # different sets of puzzles and completions.
    completions_log = runs.MetricsLogger(
        output_dir / ("completions.jsonl" if rank == 0 else f"completions.rank{rank}.jsonl"),
        enabled=args.log_completions > 0)
    snapshot_dtype = runs.snapshot_dtype(precision)
    policy = accelerator.unwrap_model(model)

    # ------------------------------------------------------------------ the vllm engine (--rollout_backend vllm)
    # One in-process engine on --model (TRL's colocate mode), in the dtype the hf backend samples in, sized for
    # the longest prompt of the data + --max_completion_length; on a resume it gets the restored weights.
    engine = None
    if args.rollout_backend == "vllm":
        import vllm_engine
        longest = max(vllm_engine.longest_prompt(processor, train, prompt_column),
                      vllm_engine.longest_prompt(processor, eval_rows, prompt_column))
        engine = vllm_engine.engine_for(
            args.model, args.min_pixels or None, args.max_pixels or None, seed=args.seed + rank,
            dtype="bfloat16" if mixed_precision == "bf16" else policy_dtype,
            max_model_len=longest + args.max_completion_length,
            gpu_memory_utilization=0.3)   # TRL's colocate default (grpo_config.py at f2cd577); the rest: the trainer
        if step > 0:
            engine.push_weights(policy)
        accelerator.print(f"[rft] vllm engine ready in {engine.start_seconds:.1f} s (max_model_len "
                          f"{engine.max_model_len})")

    # ------------------------------------------------------------------ step 0: the base check as a guard
    # (base_check.py: greedy exact/hit/format and MI(answer; image); stops below --min_answer_image_mi)
    if step == 0 and eval_rows:
        last = {"step": 0, **base_check.check(
            policy, processor, eval_rows, args.prompt_style, args.max_completion_length, args.eval_batch_size,
            args.mi_puzzles, args.mi_candidates, args.min_answer_image_mi, args.seed, accelerator.autocast, "rft",
            engine=engine)}
        logger.log(last)
    if args.max_steps == 0:
        return last

    # ------------------------------------------------------------------ loop
    nonfinite_in_row = 0
    bar = tqdm(total=args.max_steps, initial=step, desc="rft", disable=not accelerator.is_local_main_process)
    while step < args.max_steps:
        step += 1
        # rollout: B puzzles x G samples per process, one generate call
        t0 = time.perf_counter()
        indices = common.data_indices(len(train), args.seed, position + rank * args.batch_size, args.batch_size)
        position += args.batch_size * world
        rows = [train[i] for i in indices]
        # vllm: a seed per (seed, rank, step), so a resumed run draws the rollouts the uninterrupted one drew
        batch = rollout(policy, processor, rows, args, accelerator.autocast, engine,
                        None if engine is None else vllm_engine.derived_seed(args.seed, rank, step))
        if engine is not None:
            engine.sleep()            # GPU: the engine's weights to host memory, its KV cache freed (CPU: nothing)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the KV cache of generate is garbage now; give its memory to training
        t1 = time.perf_counter()
        # loss: num_iterations clipped passes with gradient accumulation over micro-batches
        chunks = micro_batches(processor, batch, args)
        update = policy_update(accelerator, model, ref_model, optimizer, scheduler, chunks, args)
        if engine is not None:
            update["time_weight_push"] = engine.push_weights(policy)   # once per step, after the last pass
        t2 = time.perf_counter()

        scores, lengths = batch["scores"], torch.tensor([len(c) for c in batch["completion_ids"]], dtype=torch.float)
        first = update["passes"][0]
        grouped = scores["reward"].view(-1, args.num_generations)
        record = {
            "step": step, "lr": scheduler.get_last_lr()[0],
            "reward": float(scores["reward"].mean()), "reward_std": float(scores["reward"].std()),
            "reward_hit": float(scores["hit"].mean()), "reward_acc": float(scores["acc"].mean()),
            "reward_fmt": float(scores["fmt"].mean()), "parsed_rate": float(scores["parsed"].mean()),
            "accuracy": float(scores["acc"].mean()), "format_rate": float(scores["fmt"].mean()),
            "reward_errors": scores["errors"],
            "completion_length": float(lengths.mean()), "truncated_share": float(batch["truncated"].float().mean()),
            "zero_std_groups": float((grouped.std(dim=1) == 0).float().mean()),
            # the step's loss over all processes (each rank's loss is normalised by the step's global counts)
            "loss": float(accelerator.reduce(torch.tensor(first["loss"], device=accelerator.device), "mean")),
            "kl": first["kl"],
            "clip_fraction": sum(p["clip_fraction"] for p in update["passes"]) / len(update["passes"]),
            "ratio_max": max(p["ratio_max"] for p in update["passes"]), "grad_norm": first["grad_norm"],
            "skipped_updates": update["skipped"], "time_generation": t1 - t0, "time_training": t2 - t1,
            "sampling_logp_difference_mean": update["sampling_logp_difference_mean"],
            "sampling_logp_difference_max": update["sampling_logp_difference_max"],
            **({"time_weight_push": update["time_weight_push"]} if engine is not None else {}),
            "tokens_per_second": float(lengths.sum()) / max(t2 - t0, 1e-9),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / memory.GiB if torch.cuda.is_available() else None,
        }
        # ------------------------------------------------------------------ faults
        if update["skipped"]:
            nonfinite_total += update["skipped"]
            nonfinite_in_row += update["skipped"]
            record["nonfinite_total"] = nonfinite_total
            accelerator.print(f"[rft] step {step}: non-finite loss or gradient, update skipped "
                              f"({nonfinite_in_row} in a row, {nonfinite_total} in all)")
        else:
            nonfinite_in_row = 0
        logger.log(record)
        if args.log_completions and (step == 1 or (args.eval_steps and step % args.eval_steps == 0)):
            for line in completion_records(step, rows, batch, args):
                completions_log.log(line)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.4f}")
        if nonfinite_in_row >= args.max_nonfinite:
            bar.close()
            good = runs.resume_state(output_dir)
            common.fail(f"{nonfinite_in_row} non-finite losses/gradients in a row at step {step}: stopping. The "
                        f"last good state is {good or 'none (nothing was saved yet)'}; lower --lr, use "
                        "--precision bf16_mixed, or raise --max_nonfinite, then --resume.")
        # ------------------------------------------------------------------ eval and save
        if eval_rows and (step % args.eval_steps == 0 or step == args.max_steps):
            t3 = time.perf_counter()
            result = base_check.greedy_scores(policy, processor, eval_rows, args.prompt_style,
                                              args.max_completion_length, args.eval_batch_size, accelerator.autocast,
                                              engine=engine)
            result["time_eval"] = time.perf_counter() - t3   # the pilot rescales the plan's evaluations by it
            logger.log({"step": step, **result})
            record.update(result)
        # A skipped update left the weights and optimizer as they were (known-good), so the snapshot is taken
        # anyway: later stages rely on checkpoint-N existing at every --save_steps and --save_at step (the early
        # RFT checkpoint).
        snapshot, resume_due = runs.snapshot_due(step, args.max_steps, args.save_steps, save_at)
        if snapshot:
            runs.save_checkpoint(accelerator, model, processor, output_dir, step, snapshot_dtype,
                                 {"data_position": position, "nonfinite_total": nonfinite_total} if resume_due
                                 else None, keep_snapshots=args.save_total_limit)
        last = record
    bar.close()

    # ------------------------------------------------------------------ save
    final = runs.finish_run(accelerator, model, processor, output_dir, step, snapshot_dtype,
                            {"data_position": position, "nonfinite_total": nonfinite_total}, {"model": args.model})
    accelerator.print(f"[rft] done: {final}")
    return last


if __name__ == "__main__":
    main()
