"""Learning dynamics: how much, and in which direction, one step on a training sample moves prior knowledge.

After Ren & Sutherland ("Learning Dynamics of LLM Finetuning", arXiv 2407.10490), as used by the paper
(arXiv 2506.23508) to explain why RFT forgets less: a plain SGD step of size eta on a training sample u changes
the log-probability of a prior-knowledge sample v by

    Delta log pi(v | u) = -eta * A(v) K(v, u) G(u) + O(eta^2)      (A: log-softmax Jacobian, K: eNTK, G: pi - e_y)

For each training-data source (SFT-Non-Rea data, GPT-4o traces, GRPO rollouts, self-generated traces, ...) and a
probe set of prior-knowledge questions with a reference answer, this script measures:
  1. exact one-step influence: step on u's SFT loss (sequences.sft_loss), re-score v, restore the weights bitwise;
  2. magnitude: the paper's LBK = ||Delta log pi(v|u)||^2 / (||A(v)||_F^2 ||G(u)||_F^2) from those steps;
  3. direction: the first-order estimate eta * <grad log pi(v), grad log pi(u)> (token-mean loss: / T_u), the
     cosine of the two gradients, its sign distribution, the symmetry Delta(v|u) vs Delta(u|v), and the base
     model's perplexity of each source (the paper's proxy for alignment) next to the measured cosine;
  4. at scale: one backward pass per sample (N_u + N_v, not N_u x N_v); optionally LoGra-style projected
     gradients (--proj_dim r: a zero-initialised r x r block between fixed seeded random projections on chosen
     linear layers, so the block's gradient is the projected weight gradient); the exact step calibrates them;
  5. probe tracking: log pi(reference answer) of every probe at every saved checkpoint of each run.
Outputs in --output_dir: dynamics.json (report.py renders the report's learning-dynamics section from it) and PNG
figures.

Worked example of the symmetry check (token-mean SFT loss, T_u = 40 response tokens in u, T_v = 2 in v):
    Delta(v|u) = eta <g_v, g_u> / 40 = 0.003  and  Delta(u|v) = eta <g_u, g_v> / 2 = 0.060
    -> the normalised values T_u * Delta(v|u) = 0.12 and T_v * Delta(u|v) = 0.12 agree to first order.

The data sources are made by other stages (sft data from jigsaw.py, rollouts from rollout_sft.py, ...) and may not
exist yet while you develop: tests/test_analyze.py builds tiny ones from the jigsaw fixture. Run commands:

    # on the CPU, after `bash run_all.sh` made the toy run (runs/toy/): two of its sources, its probe questions
    # and two of its runs (a few minutes), in a folder of its own
    python analyze.py --model runs/toy/base/final --probes runs/toy/toy/prior --min_pixels 3136 --max_pixels 12544 \\
        --sources non_rea=runs/toy/data/sources/non_rea,rea_grpo_rollout=runs/toy/data/sources/rea_grpo_rollout \\
        --runs sft_non_rea=runs/toy/sft_non_rea:answer_only,rft=runs/toy/rft --kl_data runs/toy/data/jigsaw \\
        --kl_max_completion_length 64 --output_dir /tmp/analysis --n_train 8 --n_probe 8 --exact_pairs 4
    # only the probe curves along the toy run's RFT checkpoints
    python analyze.py --model runs/toy/base/final --sources non_rea=runs/toy/data/sources/non_rea \\
        --probes runs/toy/toy/prior --runs rft=runs/toy/rft --output_dir /tmp/probe_curves --no_first_order --no_exact
    # Qwen2.5-VL-3B on one GPU, the 3b preset's run: project gradients to 7 x 36 x 8^2 = 16,128 dims per sample
    python analyze.py --model Qwen/Qwen2.5-VL-3B-Instruct \\
        --sources non_rea=runs/3b/data/sources/non_rea,rea_external=runs/3b/data/sources/rea_external,rea_grpo_rollout=runs/3b/data/sources/rea_grpo_rollout,rea_self_generated=runs/3b/data/sources/rea_self_generated \\
        --probes benchmarks:refcoco,docvqa,mme,mmstar,pope,mmmu --probe_limit 500 --probe_answer greedy \\
        --runs sft_non_rea=runs/3b/sft_non_rea:answer_only,rft=runs/3b/rft --kl_data runs/3b/data/jigsaw \\
        --output_dir runs/3b/analysis --n_train 16 --n_probe 16 --eta 1e-4 --exact_pairs 8 --proj_dim 8
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import common
import files
import memory
import runs
import sequences


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Args:
    model: str = "runs/toy/base/final"
    """model whose learning dynamics are measured (usually the base model): hub id or save_pretrained folder"""
    sources: str = ""
    """training-data sources, comma-separated name=path[:prompt_col:target_col] (default columns prompt/completion);
    path is a datasets folder (split --source_split) or a .jsonl file with columns images, prompt, target. Names
    used by the report: non_rea, rea_external, rea_grpo_rollout, rea_self_generated"""
    source_split: str = "train"
    """split read from datasets folders among --sources (sft.py trains on train)"""
    probes: str = ""
    """prior-knowledge probe set (benchmark questions with a reference answer): datasets folder or .jsonl, or
    benchmarks:NAME,NAME (rows of eval.py's benchmarks, the seeded subset it scores; see --probe_data)"""
    probe_data: str = ""
    """with --probes benchmarks:...: local copies NAME=PATH,... (as eval.py --data; toy_prior/jigsaw need one)"""
    probe_limit: int = 0
    """with --probes benchmarks:...: eval.py's --limit (the probes are drawn from the rows it scores; 0 = all)"""
    probe_split: str = "test"
    """split of --probes (toy.build_prior_dataset's held-out questions are in test)"""
    probe_prompt_column: str = "prompt"
    """question column of --probes"""
    probe_answer_column: str = "answer"
    """reference-answer column of --probes (ground truth)"""
    probe_answer: str = "reference"
    """which answer v's log-prob is measured on: reference (the ground truth) or greedy (the model's own greedy
    answer, i.e. what it currently 'knows'; Ren & Sutherland track both kinds of responses)"""
    runs: str = ""
    """runs to track, comma-separated name=run_dir[:prompt_style] (its checkpoint-N/ snapshots and final/;
    prompt_style thinking (default) or answer_only is the jigsaw prompt the run was trained on, for --kl_data)"""
    kl_data: str = ""
    """jigsaw data folder: at every tracked checkpoint also measure KL(tuned || base) on its --kl_split puzzles,
    RL's Razor's predictor of forgetting (arXiv 2509.04259); empty: skip"""
    kl_split: str = "test"
    """split of --kl_data"""
    kl_puzzles: int = 16
    """puzzles of --kl_split (the first N) the KL is measured on"""
    kl_samples: int = 4
    """completions sampled per puzzle from the tuned model (temperature 1)"""
    kl_max_completion_length: int = 512
    """token cap of those sampled completions (the RFT rollouts' cap: Jigsaw-R1's 512)"""
    rollout_backend: str = "hf"
    """sampler of those completions: hf (sequences.generate, the reference) or vllm (vllm_engine.py, an optional
    install: one engine, each checkpoint's weights loaded into it; fp32 for --precision fp64). The KL itself is
    always the HF models' teacher-forced forward"""
    output_dir: str = "runs/analysis"
    """where dynamics.json and the PNG figures go"""
    n_train: int = 16
    """training samples drawn per source (seeded); first-order scores cost one backward pass per sample"""
    n_probe: int = 16
    """probe samples drawn (seeded)"""
    eta: float = 1e-4
    """SGD step size of the exact one-step influence (small enough for the first-order regime: the test shows the
    first-order error shrinks with eta; ~10x the usual SFT lr of 1e-5 so the change stands out of fp32 noise)"""
    exact_pairs: int = 8
    """K: exact steps on the first K training samples of each source, each re-scored on the first K probes
    (K x K pairs per source), plus K steps on probes for the symmetry check; 0 disables"""
    proj_dim: int = 0
    """r of the LoGra-style projection (r x r block per chosen linear layer, so n_layers * r^2 dims per sample);
    0 = exact full gradients on --params (fine for tiny models, not for 3B/7B)"""
    params: str = "model.language_model.*,lm_head.*"
    """parameter-name patterns (fnmatch, comma-separated) stepped by the exact step and, with --proj_dim 0, used for
    the gradients. Default: the language model (the paper does not say which parameters; an assumption)"""
    proj_modules: str = "model.language_model.layers.*"
    """nn.Linear module-name patterns that get projection adapters when --proj_dim > 0 (LoGra adapts every linear
    layer; default: the 7 linear layers of each decoder block, 7 x 36 x r^2 dims for 3B: 4,032 at r=4, 16,128 at r=8)"""
    max_completion_length: int = 512
    """response tokens kept per sample, and the cap of greedy probe answers (public GRPO work on the task used
    512; benchmark answers stop far earlier)"""
    first_order: bool = True
    """compute the per-sample gradients: first-order scores, cosines, sign distribution"""
    exact: bool = True
    """run the exact one-step influence (LBK, calibration of the first-order scores)"""
    symmetry: bool = True
    """also step on probes and re-score training samples: Delta(u|v) against Delta(v|u)"""
    track: bool = True
    """track probe log-probs over the checkpoints of --runs"""
    precision: str = "fp32"
    """fp32 (the default even on a GPU: an eta=1e-4 step is lost in bf16 rounding), bf16, or fp64 (CPU checks)"""
    device: str = ""
    """cuda or cpu (default: cuda when available)"""
    backup_device: str = "cpu"
    """where the copy of the weights that restores them after each exact step lives (cpu: no extra GPU memory)"""
    max_grad_gib: float = 8.0
    """refuse full per-sample gradients larger than this in total (use --proj_dim or narrower --params)"""
    min_pixels: int | None = None
    """processor min_pixels (default: the model folder's processor config)"""
    max_pixels: int | None = None
    """processor max_pixels (default: the model folder's processor config)"""
    seed: int = 0
    """seed of sample choice and of the random projections"""
    perplexity_rows: int = 0
    """rows of each source scored for its perplexity under --model (0: all rows; the n_train drawn rows give the
    rest of the analysis). The report's one perplexity per source"""


PROBE_ANSWERS = ("reference", "greedy")
RANGES = {"n_train": ">= 1", "n_probe": ">= 1", "eta": "> 0", "exact_pairs": ">= 0", "proj_dim": ">= 0",
          "max_completion_length": ">= 1", "max_grad_gib": "> 0", "perplexity_rows": ">= 0", "kl_puzzles": ">= 1",
          "kl_samples": ">= 1", "probe_limit": ">= 0",
          "kl_max_completion_length": ">= 1"}
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")


def parse_named_paths(text: str, flag: str, with_columns: bool) -> list[dict]:
    """'a=dir1,b=f.jsonl:q:t' -> [{'name': 'a', 'path': 'dir1', 'prompt_column': 'prompt', ...}, ...]."""
    entries, seen = [], set()
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        if "=" not in item:
            common.fail(f"{flag} entry {item!r} is not name=path (example: {flag} non_rea=data/jigsaw).")
        name, rest = item.split("=", 1)
        name = name.strip()
        if not NAME_RE.fullmatch(name) or name in seen:
            common.fail(f"{flag} entry {item!r}: name must be unique and use letters, digits, _ . - only.")
        seen.add(name)
        entry = {"name": name, "path": rest}
        if with_columns:
            entry.update(prompt_column="prompt", target_column="completion")
            if rest.count(":") >= 2:
                path, prompt_column, target_column = rest.rsplit(":", 2)
                if not (path and prompt_column and target_column):
                    common.fail(f"{flag} entry {item!r}: expected name=path:prompt_col:target_col.")
                entry.update(path=path, prompt_column=prompt_column, target_column=target_column)
        entries.append(entry)
    return entries


def match_names(names: list[str], patterns: str) -> list[str]:
    """Names matching any comma-separated fnmatch pattern, in the given order."""
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]


def pick(count: int, n: int, seed: int, salt: str) -> list[int]:
    """n row indices out of count, seeded per data set; sorted so the report lists rows in file order."""
    return sorted(random.Random(f"{seed}/{salt}").sample(range(count), min(n, count)))


# ----------------------------------------------------------------------------------------------------------
# The math, as small pure functions (checked by hand in tests/test_analyze.py)
# ----------------------------------------------------------------------------------------------------------
def log_softmax_jacobian_fro2(probs: torch.Tensor) -> torch.Tensor:
    """||A_t||_F^2 per token for A_t = I - 1 pi_t^T (the Jacobian of log-softmax, [V, V]), without building it:
    column j holds 1 - pi_j once and -pi_j (V-1) times, so the sum is V - 2 + V * sum_j pi_j^2.  [T, V] -> [T]."""
    vocab = probs.shape[-1]
    return vocab - 2 + vocab * (probs * probs).sum(-1)


def ce_gradient_fro2(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """||G_t||^2 = ||pi_t - e_{y_t}||^2 = sum pi^2 - 2 pi_y + 1 per token (the cross-entropy gradient wrt logits)."""
    picked = probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (probs * probs).sum(-1) - 2 * picked + 1


def lbk(delta_fro2: float, a_fro2: float, g_fro2: float) -> float:
    """The paper's LBK = ||Delta log pi(v|u)||^2 / (||A(v)||_F^2 ||G(u)||_F^2).

    Stacking (ours, stated because the paper's text was not available): a sample's per-token matrices form a
    block-diagonal operator, so ||A(v)||_F^2 = sum over v's response tokens of ||A_t||_F^2 (each V x V);
    G(u) stacks u's per-token (pi_t - e_y) vectors into a T_u x V matrix, ||G(u)||_F^2 = sum_t ||G_t||^2; and
    Delta log pi(v|u) is the T_v x V matrix of changes of the full log-softmax at v's response positions (not only
    the observed tokens), ||.||_F^2 summed over tokens and vocabulary. A, G are taken at the model before the step.
    Since Delta = -eta A K G + O(eta^2), LBK / eta^2 lower-bounds ||K(v,u)||_2^2 to first order (eta-free)."""
    return delta_fro2 / max(a_fro2 * g_fro2, 1e-300)


def first_order_delta(inner: torch.Tensor, train_tokens: torch.Tensor, eta: float) -> torch.Tensor:
    """First-order Delta log pi(y_v|x_v) of one SGD step on u's token-mean SFT loss (sequences.sft_loss):
    the step is eta * grad S_u / T_u (S = summed response log-prob), so Delta ~ eta <grad S_v, grad S_u> / T_u.
    inner [N_v, N_u] = <grad S_v, grad S_u>, train_tokens [N_u] = T_u."""
    return eta * inner / train_tokens.to(inner.dtype).unsqueeze(0)


def cosine_matrix(grads_v: torch.Tensor, grads_u: torch.Tensor) -> torch.Tensor:
    """cos(grad S_v, grad S_u) for all pairs: [N_v, D] x [N_u, D] -> [N_v, N_u] (scale-free: sum or mean loss)."""
    norms = grads_v.norm(dim=1, keepdim=True) * grads_u.norm(dim=1).unsqueeze(0)
    return (grads_v @ grads_u.T) / norms.clamp(min=1e-300)


def sign_agreement(x, y) -> float:
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    y = torch.as_tensor(y, dtype=torch.float64).flatten()
    return float((torch.sign(x) == torch.sign(y)).double().mean().item()) if x.numel() else float("nan")


def summary(values) -> dict:
    """mean, std (population), median, quartiles, count: the spread shown in tables and error bars."""
    t = torch.as_tensor(values, dtype=torch.float64).flatten()
    if t.numel() == 0:
        return {"n": 0}
    q = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return {"n": t.numel(), "mean": t.mean().item(), "std": t.std(unbiased=False).item(), "q25": q[0],
            "median": q[1], "q75": q[2], "min": t.min().item(), "max": t.max().item()}


# ----------------------------------------------------------------------------------------------------------
# Scoring one sample (batch of one: no padding inside the response, exact per-sample quantities)
# ----------------------------------------------------------------------------------------------------------
def response_logsoftmax(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(full log-softmax [T, V], response token ids [T]) at a one-sample batch's response positions.

    Computed in max(model dtype, fp32) rather than through sequences.selective_log_softmax (which casts to fp32), so
    that float64 checks keep float64 precision; only response positions go through lm_head (completion_logits)."""
    logits = sequences.completion_logits(model, batch)[0]
    mask = batch["completion_mask"][0].bool()
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return torch.log_softmax(logits[mask].to(dtype), dim=-1), batch["completion_ids"][0][mask]


def token_logprobs(model, batch: dict) -> torch.Tensor:
    logp, ids = response_logsoftmax(model, batch)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def score_sample(model, batch: dict, keep_full: bool = False) -> dict:
    """Base quantities of a sample: per-token log-probs, ||A||_F^2 and ||G||_F^2 (summed over tokens)."""
    logp, ids = response_logsoftmax(model, batch)
    probs = logp.exp()
    out = {"token_logprobs": logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1),
           "a_fro2": log_softmax_jacobian_fro2(probs).sum().item(),
           "g_fro2": ce_gradient_fro2(probs, ids).sum().item()}
    if keep_full:
        out["logsoftmax"] = logp
    return out


# ----------------------------------------------------------------------------------------------------------
# Exact one-step influence
# ----------------------------------------------------------------------------------------------------------
def set_trainable(model, params: list[torch.nn.Parameter]) -> None:
    """Only `params` get gradients (saves the memory of every other parameter's gradient)."""
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def backup_params(params: list[torch.nn.Parameter], device: str) -> list[torch.Tensor]:
    return [p.detach().to(device, copy=True) for p in params]


def exact_step(model, params: list[torch.nn.Parameter], backup: list[torch.Tensor], train_batch: dict, eta: float,
               targets: list[dict], keep_full: list[bool] | None = None) -> list[dict]:
    """One plain SGD step theta <- theta - eta * grad sequences.sft_loss(u) on `params`, re-score every target,
    then copy the weights back from `backup` (bitwise: the step is never 'undone' by subtraction, which would
    leave rounding residue). Returns score_sample of each target after the step."""
    keep_full = keep_full or [False] * len(targets)
    try:
        loss, _ = sequences.sft_loss(model, train_batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.add_(g.to(p.dtype), alpha=-eta)
        del grads, loss
        return [score_sample(model, batch, keep) for batch, keep in zip(targets, keep_full)]
    finally:
        with torch.no_grad():
            for p, saved in zip(params, backup):
                p.copy_(saved)


def pair_record(before_v: dict, after_v: dict, g_fro2_u: float) -> dict:
    """Delta log pi(v|u) summed over v's tokens, per token, and the LBK from the full-vocabulary change."""
    delta_tokens = (after_v["token_logprobs"] - before_v["token_logprobs"]).double()
    record = {"delta": delta_tokens.sum().item(), "delta_per_token": delta_tokens.tolist(),
              "delta_mean_token": delta_tokens.mean().item(),
              "lbk_tokens": lbk((delta_tokens ** 2).sum().item(), before_v["a_fro2"], g_fro2_u)}
    if "logsoftmax" in before_v and "logsoftmax" in after_v:
        delta_full = ((after_v["logsoftmax"] - before_v["logsoftmax"]).double() ** 2).sum().item()
        record["lbk"] = lbk(delta_full, before_v["a_fro2"], g_fro2_u)
    return record


# ----------------------------------------------------------------------------------------------------------
# Per-sample gradients: full, or LoGra-style projected
# ----------------------------------------------------------------------------------------------------------
class ProjectedLinear(torch.nn.Module):
    """y = W x + b + P_out B P_in x with B = 0 (r x r, the only trainable tensor) and fixed seeded Gaussian
    P_in [r, d_in], P_out [d_out, r] of variance 1/r.

    Because B is zero the output is bitwise that of the wrapped layer (adding exact zeros), and
    dL/dB = P_out^T (sum_t delta_t x_t^T) P_in^T = P_out^T (dL/dW) P_in^T: the weight gradient projected to r x r
    (LoGra, arXiv 2405.13954). With variance-1/r entries E[P P^T] = I on both sides, so inner products of projected
    gradients are unbiased estimates of the weight-gradient inner products."""

    def __init__(self, base: torch.nn.Linear, rank: int, seed: int):
        super().__init__()
        self.base = base
        generator = torch.Generator().manual_seed(seed)  # CPU generator: the same projection on every device
        weight = base.weight
        self.register_buffer("proj_in", (torch.randn(rank, base.in_features, generator=generator) / math.sqrt(rank))
                             .to(weight.dtype).to(weight.device), persistent=False)
        self.register_buffer("proj_out", (torch.randn(base.out_features, rank, generator=generator)
                                          / math.sqrt(rank)).to(weight.dtype).to(weight.device), persistent=False)
        self.block = torch.nn.Parameter(torch.zeros(rank, rank, dtype=weight.dtype, device=weight.device))

    def forward(self, x):
        side = torch.nn.functional.linear(x, self.proj_in)
        side = torch.nn.functional.linear(side, self.block)
        return self.base(x) + torch.nn.functional.linear(side, self.proj_out)


@contextlib.contextmanager
def projection_adapters(model, patterns: str, rank: int, seed: int):
    """Wrap every nn.Linear whose name matches `patterns` in a ProjectedLinear; unwrap on exit.
    Yields [(name, adapter)] in module order (the projected gradient's layout)."""
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    names = match_names(linear_names, patterns)
    if not names:
        common.fail(f"--proj_modules {patterns!r} matches no nn.Linear of the model; examples of names: "
                    f"{linear_names[:3] + linear_names[-3:]}.")
    adapters = []
    for index, name in enumerate(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        adapter = ProjectedLinear(getattr(parent, child), rank, seed * 1_000_003 + index)
        setattr(parent, child, adapter)
        adapters.append((name, adapter))
    try:
        yield adapters
    finally:
        for name, adapter in adapters:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, adapter.base)


def summed_logprob_gradient(model, batch: dict, params: list[torch.nn.Parameter], dtype) -> torch.Tensor:
    """grad of S = sum of the response's log-probs wrt `params`, flattened into one vector (one backward pass)."""
    total = token_logprobs(model, batch).sum()
    grads = torch.autograd.grad(total, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                      for g, p in zip(grads, params)])


def per_sample_gradients(model, batches: list[dict], params: list[torch.nn.Parameter], proj_dim: int,
                         proj_modules: str, seed: int, desc: str = "gradients") -> tuple[torch.Tensor, dict]:
    """[N, D] gradients of each sample's summed response log-prob, on CPU: the full gradient on `params`
    (proj_dim 0) or the LoGra-projected one (D = n_adapted_layers * proj_dim^2). Trainable flags are restored."""
    from tqdm import tqdm
    store_dtype = torch.promote_types(params[0].dtype, torch.float32)
    rows = []
    if proj_dim > 0:
        with projection_adapters(model, proj_modules, proj_dim, seed) as adapters:
            blocks = [a.block for _, a in adapters]
            set_trainable(model, blocks)
            try:
                for batch in tqdm(batches, desc=desc, leave=False):
                    rows.append(summed_logprob_gradient(model, batch, blocks, store_dtype).cpu())
            finally:
                set_trainable(model, params)
        info = {"mode": "projected", "proj_dim": proj_dim, "layers": [n for n, _ in adapters]}
    else:
        set_trainable(model, params)
        for batch in tqdm(batches, desc=desc, leave=False):
            rows.append(summed_logprob_gradient(model, batch, params, store_dtype).cpu())
        info = {"mode": "full"}
    grads = torch.stack(rows)
    info["dims"] = grads.shape[1]
    return grads, info


# ----------------------------------------------------------------------------------------------------------
# Data: samples as (prompt, images, response) with one-sample batches
# ----------------------------------------------------------------------------------------------------------
def load_source_rows(entry: dict, split: str):
    return common.load_rows(entry["path"], split, required=(entry["prompt_column"], entry["target_column"]))


def make_batch(processor, prompt: str, images: list, completion: str | None = None,
               completion_ids: list[int] | None = None, max_tokens: int | None = None) -> dict:
    if completion_ids is not None:
        return sequences.build_batch(processor, [prompt], [images], completion_ids=[completion_ids],
                                  max_completion_tokens=max_tokens)
    return sequences.build_batch(processor, [prompt], [images], completions=[completion],
                              max_completion_tokens=max_tokens)


def data_base_dir(path: str) -> Path | None:
    """Folder that JSONL image paths are relative to (as sft.py reads them); None for datasets folders."""
    return Path(path).parent if Path(path).is_file() else None


def answer_string(value) -> str:
    """Reference answers may be strings or lists (e.g. a jigsaw permutation): plain text either way."""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


# ----------------------------------------------------------------------------------------------------------
# Probe tracking over checkpoints (forward passes only)
# ----------------------------------------------------------------------------------------------------------
def run_checkpoints(run_dir: str, name: str) -> list[tuple[int, str, Path]]:
    """[(step, label, model_folder)] of a run's model snapshots and final/ (runs.list_checkpoints: the one
    place that knows the layout), by step."""
    if not Path(run_dir).is_dir():
        common.fail(f"--runs {name}={run_dir}: no such folder (a training run's --output_dir).")
    found = runs.list_checkpoints(run_dir)
    if not found:
        common.fail(f"--runs {name}={run_dir}: no checkpoint-N/ or final/ folder with a config.json inside.")
    return found


@torch.no_grad()
def probe_logprobs(model, batches: list[dict]) -> list[float]:
    return [token_logprobs(model, batch).sum().item() for batch in batches]


# ----------------------------------------------------------------------------------------------------------
# RL's Razor's predictor of forgetting: KL(tuned || base) on the new task
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def task_kl(model, base_model, processor, prompts: list[str], images: list[list], num_samples: int,
            max_completion_length: int, batch_size: int = 8, engine=None, seed: int = 0) -> dict:
    """E_{x ~ new task, y ~ pi(.|x)} KL per completion (nats), RL's Razor (arXiv 2509.04259): forgetting tracks
    the KL from the base to the tuned model measured on the task being learnt. Completions are sampled from the
    tuned model at temperature 1 (sequences.generate, vision tokens suppressed: a log(1 - p) ~ 0 change; or a
    vllm_engine engine holding the tuned model's weights, with request seeds from `seed`)."""
    values = []
    for start in range(0, len(prompts), batch_size):
        if engine is None:
            out = sequences.generate(model, processor, prompts[start:start + batch_size],
                                     images[start:start + batch_size], max_completion_length, temperature=1.0,
                                     do_sample=True, num_samples=num_samples)
        else:
            out = engine.generate(prompts[start:start + batch_size], images[start:start + batch_size],
                                  max_completion_length, temperature=1.0, num_samples=num_samples, processor=processor,
                                  seed=seed + start * num_samples)
        rows = [i // num_samples for i in range(len(out["completion_ids"]))]
        device = next(model.parameters()).device
        for begin in range(0, len(rows), 4):  # 4 sequences at a time: [4, T, V] fp32 logits of a 152k vocabulary
            ids = [c or [processor.tokenizer.eos_token_id] for c in out["completion_ids"][begin:begin + 4]]
            chunk = sequences.append_completions(sequences.select_prompt_rows(out["batch"], rows[begin:begin + 4]), ids,
                                              processor.tokenizer.pad_token_id)
            chunk = sequences.to_device(chunk, device)
            tuned = torch.log_softmax(sequences.completion_logits(model, chunk).float(), -1)
            base = torch.log_softmax(sequences.completion_logits(base_model, chunk).float(), -1)
            per_token = (tuned.exp() * (tuned - base)).sum(-1) * chunk["completion_mask"]
            values += per_token.sum(1).double().tolist()
    return {"kl": sum(values) / max(1, len(values)), "kl_std": summary(values).get("std"), "samples": len(values)}


# ----------------------------------------------------------------------------------------------------------
# Figures (report.py shows them, with the tables it renders from dynamics.json)
# ----------------------------------------------------------------------------------------------------------
def save_figure(fig, path: Path) -> None:
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def make_figures(results: dict, out_dir: Path) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figures = {}
    names = list(results["sources"])
    stats = results["sources"]

    with_lbk = [n for n in names if stats[n].get("lbk", {}).get("n")]
    if with_lbk:
        fig, ax = plt.subplots(figsize=(1.6 * len(with_lbk) + 2, 3.5))
        means = [stats[n]["lbk"]["mean"] for n in with_lbk]
        stds = [stats[n]["lbk"]["std"] for n in with_lbk]
        ax.bar(with_lbk, means, yerr=stds, capsize=4, color="tab:blue")
        if all(m > 0 for m in means):
            ax.set_yscale("log")
        ax.set_ylabel("LBK (mean ± std over pairs)")
        ax.set_title(f"Update magnitude per source (eta={results['config']['eta']:g})")
        ax.tick_params(axis="x", rotation=20)
        save_figure(fig, out_dir / "lbk.png")
        plt.close(fig)
        figures["lbk"] = "lbk.png"

    with_cos = [n for n in names if "cosines" in stats[n]]
    if with_cos:
        fig, ax = plt.subplots(figsize=(1.6 * len(with_cos) + 2, 3.5))
        ax.boxplot([stats[n]["cosines"] for n in with_cos], showmeans=True)
        ax.set_xticks(range(1, len(with_cos) + 1), with_cos)  # (boxplot's labels= was renamed in matplotlib 3.9)
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_ylabel("cos(grad log pi(v), grad log pi(u))")
        ax.set_title("Gradient alignment with prior-knowledge probes")
        ax.tick_params(axis="x", rotation=20)
        save_figure(fig, out_dir / "cosine.png")
        plt.close(fig)
        figures["cosine"] = "cosine.png"

    key = "first_order" if any("first_order" in stats[n] for n in names) else "exact_delta"
    with_infl = [n for n in names if stats[n].get(key, {}).get("n") and "perplexity" in stats[n]]
    if with_infl:
        panels = [(key, f"mean {'first-order' if key == 'first_order' else 'exact'} Delta log pi(v|u)")]
        if with_cos:
            panels.append(("cosine", "mean cosine"))
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
        for ax, (stat, label) in zip(axes[0], panels):
            xs = [stats[n]["perplexity"] for n in with_infl]
            ys = [stats[n][stat]["mean"] for n in with_infl]
            ax.scatter(xs, ys)
            for x, y, n in zip(xs, ys, with_infl):
                ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            ax.axhline(0.0, color="grey", lw=0.8, ls="--")
            ax.set_xlabel("base-model perplexity of the source")
            ax.set_ylabel(label)
        fig.suptitle("Perplexity (the paper's proxy) against measured influence")
        save_figure(fig, out_dir / "perplexity_vs_influence.png")
        plt.close(fig)
        figures["perplexity_vs_influence"] = "perplexity_vs_influence.png"

    tracking = results.get("tracking") or {}
    if tracking:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for run, curve in tracking.items():
            steps = curve["steps"]
            mean = curve["mean_logprob"]
            ax.plot(steps, mean, marker="o", label=run)
            ax.fill_between(steps, curve["q25_logprob"], curve["q75_logprob"], alpha=0.15)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"probe log pi({results['config']['probe_answer']} answer)")
        ax.set_title("Prior-knowledge probes over training (mean, IQR band)")
        ax.legend(fontsize=8)
        save_figure(fig, out_dir / "probe_logprob.png")
        plt.close(fig)
        figures["probe_logprob"] = "probe_logprob.png"
    return figures


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------
def check_gradient_memory(model, args: Args, n_samples: int) -> None:
    """Full per-sample gradients of a 3B model are 12 GiB each: refuse them with the fix, not an OOM later."""
    named = dict(model.named_parameters())
    numel = sum(named[n].numel() for n in match_names(list(named), args.params))
    grad_bytes = numel * n_samples * 4
    if grad_bytes > args.max_grad_gib * memory.GiB:
        common.fail(f"full per-sample gradients would take {grad_bytes / memory.GiB:.1f} GiB ({n_samples} samples x "
                    f"{numel:,} parameters) > --max_grad_gib {args.max_grad_gib}; use --proj_dim 8 (LoGra-style "
                    "projection), narrower --params, or --no_first_order.")


def check_args(args: Args) -> None:
    """Every check that needs no model: flags, ranges, names."""
    if args.probe_answer not in PROBE_ANSWERS:
        common.fail(f"--probe_answer {args.probe_answer!r}: choose one of {PROBE_ANSWERS}.")
    if not args.sources:
        common.fail("--sources is empty: give name=path[:prompt_col:target_col],... (e.g. non_rea=data/jigsaw).")
    if not args.probes:
        common.fail("--probes is empty: give the prior-knowledge probe set (e.g. runs/toy/prior).")
    if args.precision not in ("fp32", "bf16", "fp16", "fp64"):
        common.fail(f"--precision {args.precision}: choose fp32, bf16, fp16 or fp64.")
    if args.rollout_backend != "hf":
        import vllm_engine
        vllm_engine.check_backend(args.rollout_backend)
    common.check_ranges(args, RANGES)


def parse_runs(args: Args) -> list[dict]:
    """--runs entries name=run_dir[:prompt_style], each with its checkpoints (checked now, before any model)."""
    tracked = parse_named_paths(args.runs, "--runs", with_columns=False) if args.track else []
    for r in tracked:
        r["prompt_style"] = "thinking"
        if r["path"].endswith((":thinking", ":answer_only")):
            r["path"], r["prompt_style"] = r["path"].rsplit(":", 1)
        r["checkpoints"] = run_checkpoints(r["path"], r["name"])
    return tracked


def load_inputs(args: Args, sources: list[dict], tracked: list[dict]) -> dict:
    """The drawn training samples of each source (and the whole source, for its perplexity), the probes, and the
    new-task puzzles of the KL: every data set opened and its columns checked before the model is loaded."""
    source_rows, source_data = {}, {}
    for entry in sources:
        dataset = load_source_rows(entry, args.source_split)
        if len(dataset) == 0:
            common.fail(f"--sources {entry['name']}={entry['path']}: no rows.")
        source_rows[entry["name"]] = (entry, [dataset[i] for i in pick(len(dataset), args.n_train, args.seed,
                                                                        entry["name"])])
        source_data[entry["name"]] = dataset
    if args.probes.startswith("benchmarks:"):  # rows of eval.py's benchmarks: id, images, prompt, answer, benchmark
        import benchmarks
        names = [n.strip() for n in args.probes.split(":", 1)[1].split(",") if n.strip()]
        probe_set = benchmarks.probe_rows(names, benchmarks.parse_data_flag(args.probe_data, "--probe_data"),
                                          args.probe_limit, args.seed, per_benchmark=-(-args.n_probe // max(1, len(names))))
        if not probe_set:
            common.fail(f"--probes {args.probes}: no rows selected (check --probe_limit and --probe_data).")
    else:
        probe_set = common.load_rows(args.probes, args.probe_split,
                                     required=(args.probe_prompt_column, args.probe_answer_column))
    kl_rows = []
    if args.kl_data and tracked:
        kl_set = common.load_rows(args.kl_data, args.kl_split, required=("prompt", "prompt_no_think", "images"))
        kl_rows = [kl_set[i] for i in range(min(args.kl_puzzles, len(kl_set)))]
    return {"source_rows": source_rows, "source_data": source_data, "kl_rows": kl_rows,
            "probe_rows": [probe_set[i] for i in pick(len(probe_set), args.n_probe, args.seed, "probes")]}


def load_base_model(args: Args, device: str, n_samples: int):
    """The model whose dynamics are measured, in eval mode (no dropout: the exact step and the re-scoring must see
    the same function), with only --params trainable."""
    if args.first_order and args.proj_dim == 0 and (args.model in memory.REAL_CONFIGS or Path(args.model).is_dir()):
        check_gradient_memory(memory.meta_model(args.model), args, n_samples)  # before minutes of loading
    model, processor = common.load_model_and_processor(
        args.model, "fp32" if args.precision == "fp64" else args.precision, min_pixels=args.min_pixels,
        max_pixels=args.max_pixels, device=device)
    if args.precision == "fp64":
        model.to(torch.float64)
    model.eval()
    named = dict(model.named_parameters())
    param_names = match_names(list(named), args.params)
    if not param_names:
        common.fail(f"--params {args.params!r} matches no parameter; examples: {list(named)[:2] + list(named)[-2:]}.")
    params = [named[n] for n in param_names]
    set_trainable(model, params)
    if args.first_order and args.proj_dim == 0:
        check_gradient_memory(model, args, n_samples)
    print(f"[analyze] {args.model}: {len(params)} parameter tensors stepped "
          f"({sum(p.numel() for p in params):,} values); device {device}")
    return model, processor, params


def make_samples(args: Args, model, processor, inputs: dict, device: str) -> dict:
    """Probes (with the reference or the model's own greedy answer) and training samples as one-sample batches."""
    probe_rows = inputs["probe_rows"]
    probe_prompts = [r[args.probe_prompt_column] for r in probe_rows]
    probe_images = [common.row_images(r, data_base_dir(args.probes)) for r in probe_rows]
    if args.probe_answer == "greedy":
        completion_ids = []
        for i in range(0, len(probe_rows), 8):
            out = sequences.generate(model, processor, probe_prompts[i:i + 8], probe_images[i:i + 8],
                                  args.max_completion_length, do_sample=False)
            completion_ids += [ids or [processor.tokenizer.eos_token_id] for ids in out["completion_ids"]]
        probe_answers = processor.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        probe_batches = [make_batch(processor, p, im, completion_ids=ids, max_tokens=args.max_completion_length)
                         for p, im, ids in zip(probe_prompts, probe_images, completion_ids)]
    else:
        probe_answers = [answer_string(r[args.probe_answer_column]) for r in probe_rows]
        probe_batches = [make_batch(processor, p, im, a, max_tokens=args.max_completion_length)
                         for p, im, a in zip(probe_prompts, probe_images, probe_answers)]
    train_batches = {}
    for name, (entry, rows) in inputs["source_rows"].items():
        train_batches[name] = [sequences.to_device(make_batch(processor, r[entry["prompt_column"]],
                                                           common.row_images(r, data_base_dir(entry["path"])),
                                                           str(r[entry["target_column"]]),
                                                           max_tokens=args.max_completion_length), device)
                               for r in rows]
    return {"probe_batches": [sequences.to_device(b, device) for b in probe_batches], "probe_answers": probe_answers,
            "train_batches": train_batches}


def source_perplexity(args: Args, model, processor, entry: dict, dataset) -> dict:
    """Perplexity pooled over the source's response tokens (each token counts once), the paper's proxy: over all
    rows (or --perplexity_rows) with the one scoring function rollout_sft.py also uses (sequences.sequence_logprobs),
    so the report shows one perplexity per source."""
    from tqdm import tqdm
    count = min(args.perplexity_rows or len(dataset), len(dataset))
    sums, counts = [], []
    for begin in tqdm(range(0, count, 8), desc=f"perplexity {entry['name']}", leave=False):
        chunk = [dataset[i] for i in range(begin, min(count, begin + 8))]
        pairs = sequences.sequence_logprobs(model, processor, [r[entry["prompt_column"]] for r in chunk],
                                         [common.row_images(r, data_base_dir(entry["path"])) for r in chunk],
                                         [str(r[entry["target_column"]]) for r in chunk], batch_size=8)
        sums += [lp for lp, _ in pairs]
        counts += [c for _, c in pairs]
    mean_nll, perplexity = sequences.token_weighted_nll(sums, counts)
    return {"perplexity": perplexity, "mean_nll": mean_nll, "perplexity_rows": count, "perplexity_tokens": sum(counts)}


def base_scores(args: Args, model, processor, inputs: dict, samples: dict, k_exact: int) -> dict:
    """Log-probs, ||A(v)||_F^2 and ||G(u)||_F^2 of every sample under the base model, and each source's perplexity."""
    from tqdm import tqdm
    probe_base = [score_sample(model, b, keep_full=i < k_exact) for i, b in enumerate(samples["probe_batches"])]
    train_base = {name: [score_sample(model, b) for b in tqdm(batches, desc=f"score {name}", leave=False)]
                  for name, batches in samples["train_batches"].items()}
    sources, records = {}, {"probes": [
        {"id": r.get("id", i), "answer": a, "tokens": len(s["token_logprobs"]),
         "logprob": s["token_logprobs"].sum().item(), "a_fro2": s["a_fro2"]}
        for i, (r, a, s) in enumerate(zip(inputs["probe_rows"], samples["probe_answers"], probe_base))]}
    for name, scores in train_base.items():
        entry, rows = inputs["source_rows"][name]
        tokens = [len(s["token_logprobs"]) for s in scores]
        logps = [s["token_logprobs"].sum().item() for s in scores]
        sources[name] = {
            "path": entry["path"], "n": len(scores),
            **source_perplexity(args, model, processor, entry, inputs["source_data"][name]),
            "perplexity_drawn": math.exp(-sum(logps) / max(1, sum(tokens))),
            "perplexity_per_sample": summary([math.exp(-lp / max(1, t)) for lp, t in zip(logps, tokens)]),
            "response_tokens": summary(tokens), "g_fro2": summary([s["g_fro2"] for s in scores])}
        records[name] = [{"id": r.get("id", i), "tokens": t, "logprob": lp, "g_fro2": s["g_fro2"]}
                         for i, (r, t, lp, s) in enumerate(zip(rows, tokens, logps, scores))]
    return {"probe_base": probe_base, "train_base": train_base, "sources": sources, "samples": records}


def first_order_phase(args: Args, model, params, samples: dict, train_base: dict) -> dict:
    """One backward pass per sample: first-order Delta, cosines and their sign distribution per source."""
    probe_batches, train_batches = samples["probe_batches"], samples["train_batches"]
    all_batches = probe_batches + [b for batches in train_batches.values() for b in batches]
    grads, info = per_sample_gradients(model, all_batches, params, args.proj_dim, args.proj_modules, args.seed)
    grads = grads.double()
    grads_v, offset = grads[:len(probe_batches)], len(probe_batches)
    scores_by_source, stats = {}, {}
    for name, batches in train_batches.items():
        grads_u = grads[offset:offset + len(batches)]
        offset += len(batches)
        tokens_u = torch.tensor([len(s["token_logprobs"]) for s in train_base[name]])
        scores = first_order_delta(grads_v @ grads_u.T, tokens_u, args.eta)
        cosines = cosine_matrix(grads_v, grads_u)
        scores_by_source[name] = scores
        stats[name] = {"first_order": summary(scores), "cosine": summary(cosines), "cosines": cosines.flatten().tolist(),
                       "cosine_positive_share": float((cosines > 0).double().mean()),
                       "cosine_negative_share": float((cosines < 0).double().mean()),
                       "pairs_first_order": scores.tolist()}  # [probe][train sample]
    return {"gradients": info, "scores": scores_by_source, "stats": stats}


def exact_phase(args: Args, model, params, backup, samples: dict, base: dict, first_order: dict, k_exact: int) -> dict:
    """Exact one-step influence on a K x K subset per source: Delta, LBK, and the calibration of the first-order
    scores against these exact steps."""
    from tqdm import tqdm
    probe_batches, probe_base = samples["probe_batches"], base["probe_base"]
    stats, exact_all, first_all = {}, [], []
    for name, batches in samples["train_batches"].items():
        pairs = []
        for j in tqdm(range(min(k_exact, len(batches))), desc=f"exact {name}", leave=False):
            after = exact_step(model, params, backup, batches[j], args.eta, probe_batches[:k_exact],
                               keep_full=[True] * k_exact)
            for i, after_v in enumerate(after):
                record = {"probe": i, "train": j, **pair_record(probe_base[i], after_v,
                                                                 base["train_base"][name][j]["g_fro2"])}
                if name in first_order:
                    record["first_order"] = first_order[name][i, j].item()
                pairs.append(record)
        s = {"exact_pairs": pairs, "exact_delta": summary([p["delta"] for p in pairs]),
             "lbk": summary([p["lbk"] for p in pairs]), "lbk_over_eta2": summary([p["lbk"] / args.eta ** 2 for p in pairs]),
             "lbk_tokens": summary([p["lbk_tokens"] for p in pairs]),
             "exact_positive_share": sum(p["delta"] > 0 for p in pairs) / len(pairs)}
        if name in first_order:
            e, f = [p["delta"] for p in pairs], [p["first_order"] for p in pairs]
            s["calibration"] = {"pearson": common.pearson(e, f), "sign_agreement": sign_agreement(e, f)}
            exact_all += e
            first_all += f
        stats[name] = s
    out = {"stats": stats}
    if exact_all:
        e, f = torch.tensor(exact_all, dtype=torch.float64), torch.tensor(first_all, dtype=torch.float64)
        out["calibration"] = {"n": len(exact_all), "pearson": common.pearson(e, f),
                              "sign_agreement": sign_agreement(e, f),
                              "slope": float((e @ f) / (f @ f).clamp(min=1e-300)),
                              "median_relative_error": float(((e - f).abs() / f.abs().clamp(min=1e-300)).median())}
    return out


def symmetry_phase(args: Args, model, params, backup, samples: dict, base: dict, exact: dict, k_exact: int) -> dict:
    """Delta(u|v): step on probe v's SFT loss, re-score training sample u. With token-mean losses the first-order
    terms are eta<g_u,g_v>/T_v and eta<g_v,g_u>/T_u, so T_v*Delta(u|v) ~ T_u*Delta(v|u)."""
    from tqdm import tqdm
    train_batches, probe_base, train_base = samples["train_batches"], base["probe_base"], base["train_base"]
    pairs = []
    targets = [(name, j) for name, batches in train_batches.items() for j in range(min(k_exact, len(batches)))]
    for i in tqdm(range(k_exact), desc="symmetry", leave=False):
        after = exact_step(model, params, backup, samples["probe_batches"][i], args.eta,
                           [train_batches[n][j] for n, j in targets])
        t_v = len(probe_base[i]["token_logprobs"])
        for (name, j), after_u in zip(targets, after):
            u_given_v = (after_u["token_logprobs"] - train_base[name][j]["token_logprobs"]).sum().item()
            v_given_u = next(p["delta"] for p in exact["stats"][name]["exact_pairs"] if p["probe"] == i and p["train"] == j)
            t_u = len(train_base[name][j]["token_logprobs"])
            pairs.append({"source": name, "probe": i, "train": j, "delta_v_given_u": v_given_u,
                          "delta_u_given_v": u_given_v, "normalised_v_given_u": t_u * v_given_u,
                          "normalised_u_given_v": t_v * u_given_v})
    a = torch.tensor([p["normalised_v_given_u"] for p in pairs], dtype=torch.float64)
    b = torch.tensor([p["normalised_u_given_v"] for p in pairs], dtype=torch.float64)
    return {"n": len(pairs), "pearson": common.pearson(a, b), "sign_agreement": sign_agreement(a, b),
            "median_relative_asymmetry": float(((a - b).abs() / ((a.abs() + b.abs()) / 2).clamp(min=1e-300)).median()),
            "pearson_raw": common.pearson([p["delta_v_given_u"] for p in pairs], [p["delta_u_given_v"] for p in pairs]),
            "pairs": pairs}


def tracking_phase(args: Args, base_model, processor, tracked: list[dict], samples: dict, base: dict,
                   kl_rows: list[dict], device: str) -> dict:
    """Probe log-probs at every checkpoint of each run (forward passes only), and, with --kl_data, the KL from
    the base to that checkpoint on the new task (RL's Razor)."""
    from tqdm import tqdm
    base_curve = [s["token_logprobs"].sum().item() for s in base["probe_base"]]
    tracking = {}
    if kl_rows and args.rollout_backend == "vllm":
        import vllm_engine
        kl_prompt_tokens = max(vllm_engine.longest_prompt(processor, kl_rows, column)
                               for column in ("prompt", "prompt_no_think"))
    for run in tracked:
        steps, labels, logprobs, kls = [0], ["base"], [base_curve], [0.0]
        column = "prompt" if run["prompt_style"] == "thinking" else "prompt_no_think"
        for step, label, folder in tqdm(run["checkpoints"], desc=f"track {run['name']}", leave=False):
            checkpoint = common.load_model(str(folder), "fp32" if args.precision == "fp64" else args.precision,
                                           device=device)
            if args.precision == "fp64":
                checkpoint.to(torch.float64)
            checkpoint.eval()
            logprobs.append(probe_logprobs(checkpoint, samples["probe_batches"]))
            if kl_rows:
                # The completions are sampled: the same seed at every checkpoint makes the KL reproducible (a
                # rerun gave other values before) and compares checkpoints on common random numbers.
                torch.manual_seed(args.seed)
                engine = None
                if args.rollout_backend == "vllm":   # one engine: this checkpoint's weights loaded into it
                    engine = vllm_engine.engine_for(
                        str(folder), args.min_pixels, args.max_pixels, seed=args.seed,
                        dtype="float32" if args.precision == "fp64" else args.precision,
                        max_model_len=kl_prompt_tokens + args.kl_max_completion_length,
                        gpu_memory_utilization=0.3)   # the HF base, checkpoint and gradients keep the rest
                kls.append(task_kl(checkpoint, base_model, processor, [r[column] for r in kl_rows],
                                   [common.row_images(r) for r in kl_rows], args.kl_samples,
                                   args.kl_max_completion_length, engine=engine, seed=args.seed)["kl"])
            steps.append(step)
            labels.append(label)
            del checkpoint
        table = torch.tensor(logprobs, dtype=torch.float64)
        tracking[run["name"]] = {"path": run["path"], "steps": steps, "labels": labels, "logprob": table.tolist(),
                                 "mean_logprob": table.mean(1).tolist(),
                                 "q25_logprob": table.quantile(0.25, dim=1).tolist(),
                                 "q75_logprob": table.quantile(0.75, dim=1).tolist(),
                                 **({"task_kl": kls} if kl_rows else {})}
    return tracking


def main(argv=None) -> dict:
    # ---- config: every check before any model is loaded ------------------------------------------------------
    args = common.parse_args(Args, __doc__, argv)
    check_args(args)
    timings, start = {}, time.time()
    sources = parse_named_paths(args.sources, "--sources", with_columns=True)
    tracked = parse_runs(args)
    device = args.device or common.default_device()
    out_dir = Path(args.output_dir)
    # writable, and one writer: a second analyze.py on an existing folder stops here (a new one: when made)
    files.lock_output_dir(out_dir, "analyze.py", create=False)

    # ---- data ------------------------------------------------------------------------------------------------
    inputs = load_inputs(args, sources, tracked)

    # ---- model and samples -----------------------------------------------------------------------------------
    files.lock_output_dir(out_dir, "analyze.py")
    model, processor, params = load_base_model(args, device, args.n_train * len(sources) + args.n_probe)
    samples = make_samples(args, model, processor, inputs, device)
    k_exact = min(args.exact_pairs, args.n_probe, len(samples["probe_batches"])) if args.exact else 0

    # ---- base scores: log-probs, perplexity, ||A(v)||_F^2, ||G(u)||_F^2 --------------------------------------
    base = base_scores(args, model, processor, inputs, samples, k_exact)
    results = {"config": asdict(args), "environment": runs.environment(), "n_probes": len(samples["probe_batches"]),
               "sources": base["sources"], "samples": base["samples"]}
    timings["base_scores_s"] = time.time() - start

    # ---- first-order scores: one backward pass per sample ----------------------------------------------------
    first_order = {}
    if args.first_order:
        t0 = time.time()
        phase = first_order_phase(args, model, params, samples, base["train_base"])
        results["gradients"], first_order = phase["gradients"], phase["scores"]
        for name, stats in phase["stats"].items():
            results["sources"][name].update(stats)
        timings["first_order_s"] = time.time() - t0

    # ---- exact one-step influence (a K x K subset per source) and the symmetry check -------------------------
    if k_exact > 0:
        t0 = time.time()
        set_trainable(model, params)
        backup = backup_params(params, args.backup_device if device != "cpu" else "cpu")
        exact = exact_phase(args, model, params, backup, samples, base, first_order, k_exact)
        for name, stats in exact["stats"].items():
            results["sources"][name].update(stats)
        if "calibration" in exact:
            results["calibration"] = exact["calibration"]
        if args.symmetry:
            results["symmetry"] = symmetry_phase(args, model, params, backup, samples, base, exact, k_exact)
        del backup
        timings["exact_s"] = time.time() - t0

    # ---- probe tracking over each run's checkpoints, and the KL on the new task ------------------------------
    if tracked:
        t0 = time.time()
        results["tracking"] = tracking_phase(args, model, processor, tracked, samples, base, inputs["kl_rows"], device)
        timings["tracking_s"] = time.time() - t0

    # ---- save ------------------------------------------------------------------------------------------------
    timings["total_s"] = time.time() - start
    results["timings"] = timings
    with files.write_guard(out_dir, f"{out_dir / 'dynamics.json'} and its figures",
                          "dynamics.json keeps its previous version, if any; free space and rerun the same command."):
        results["figures"] = make_figures(results, out_dir)
        files.write_json_atomic(out_dir / "dynamics.json", results)
    print(f"[analyze] wrote {out_dir / 'dynamics.json'} and {len(results['figures'])} figures in "
          f"{timings['total_s']:.1f}s")
    return results


if __name__ == "__main__":
    main()
