"""rft.py: the GRPO loss math by hand, log-probs of generate vs a teacher-forced forward, KL and clipping on the
tiny model, learning on a reward the tiny model can reach, exact resume, and the non-finite guard."""
import json
import math
import shutil

import pytest
import torch

import common
import runs
import sequences
import jigsaw
import rft
from conftest import perturbed_copy

TINY = ["--batch_size", "2", "--num_generations", "4", "--max_completion_length", "8", "--micro_batch_size", "4",
        "--optimizer", "adamw", "--eval_size", "4", "--eval_batch_size", "4",
        "--min_answer_image_mi", "0"]  # the random tiny model does not read the image (tests/test_rft_step0.py)


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------
# Pure loss math
# ----------------------------------------------------------------------------------------------------------
def test_group_advantages_worked_example():
    rewards = torch.tensor([3.0, 1.5, 0.0, 2.0, 2.0, 2.0])  # two groups of 3; the second has no spread
    adv = rft.group_advantages(rewards, 3)
    expected = torch.tensor([1.5 / 1.5001, 0.0, -1.5 / 1.5001, 0.0, 0.0, 0.0])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(rft.group_advantages(rewards, 3, scale=False), torch.tensor([1.5, 0, -1.5, 0, 0, 0.]))


def test_k3_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.0, -2.0 + math.log(2.0)]])  # equal, then the reference twice as likely
    kl = rft.k3_kl(logprobs, ref)
    assert kl[0, 0].item() == 0.0
    assert kl[0, 1].item() == pytest.approx(2.0 - math.log(2.0) - 1.0)


def _two_group_example():
    """4 sequences (2 groups of 2), up to 3 tokens; old log-probs 0 so ratio = exp(logprobs)."""
    ratios = torch.tensor([[1.1, 1.1, 1.1], [0.9, 1.0, 1.0], [1.3, 1.0, 1.0], [0.7, 1.0, 1.1]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    return ratios.log(), torch.zeros(4, 3), advantages, mask


def test_loss_modes_by_hand():
    logprobs, old, advantages, mask = _two_group_example()
    # Token losses -min(r*A, clip(r, 0.8, 1.2)*A):
    #   seq 1 (A=1):    -1.1, -1.1, -1.1                sum -3.3, 3 tokens
    #   seq 2 (A=-1):    0.9,  1.0                      sum  1.9, 2 tokens
    #   seq 3 (A=0.5):  -0.6 (1.3 clipped to 1.2)       sum -0.6, 1 token
    #   seq 4 (A=-0.5):  0.4 (0.7 clipped to 0.8), 0.5, 0.55   sum 1.45, 3 tokens
    grpo = (-3.3 / 3 + 1.9 / 2 - 0.6 / 1 + 1.45 / 3) / 4
    dapo = (-3.3 + 1.9 - 0.6 + 1.45) / 9
    dr_grpo = (-3.3 + 1.9 - 0.6 + 1.45) / (4 * 4)
    for loss_type, expected in (("grpo", grpo), ("dapo", dapo), ("dr_grpo", dr_grpo)):
        loss, stats = rft.grpo_loss(logprobs, old, advantages, mask, loss_type=loss_type, max_completion_length=4)
        assert loss.item() == pytest.approx(expected, abs=1e-6), loss_type
        # Two micro-batches with the step's totals add up to the whole-batch loss (gradient accumulation).
        parts = [rft.grpo_loss(logprobs[s], old[s], advantages[s], mask[s], loss_type=loss_type,
                               max_completion_length=4, num_sequences=4, num_tokens=9)[0]
                 for s in (slice(0, 2), slice(2, 4))]
        assert sum(p.item() for p in parts) == pytest.approx(expected, abs=1e-6), loss_type
    expected_clipped = torch.zeros(4, 3, dtype=torch.bool)
    expected_clipped[2, 0] = expected_clipped[3, 0] = True
    assert torch.equal(stats["clipped"] & mask.bool(), expected_clipped)
    # KL term: beta * k3 added per token before aggregation (dapo: one token with k3 = 1 - ln 2).
    ref = logprobs.clone()
    ref[0, 0] += math.log(2.0)
    loss, _ = rft.grpo_loss(logprobs, old, advantages, mask, ref_logprobs=ref, beta=0.5, loss_type="dapo")
    assert loss.item() == pytest.approx(dapo + 0.5 * (1 - math.log(2.0)) / 9, abs=1e-6)


def test_clipped_tokens_get_no_gradient():
    logprobs, old, advantages, mask = _two_group_example()
    logprobs = logprobs.clone().requires_grad_(True)
    loss, stats = rft.grpo_loss(logprobs, old, advantages, mask, loss_type="dapo")
    loss.backward()
    grad = logprobs.grad
    assert grad[2, 0].item() == 0.0 and grad[3, 0].item() == 0.0  # clipped
    # unclipped: d/dlogp of -r*A/9 = -r*A/9
    assert grad[0, 0].item() == pytest.approx(-1.1 / 9, abs=1e-6)
    assert grad[3, 2].item() == pytest.approx(1.1 * 0.5 / 9, abs=1e-6)
    assert grad[1, 2].item() == 0.0  # padding


def test_truncated_importance_weights_by_hand():
    """TIS (Yao et al. 2025; TRL's token-level form): w = min(exp(trainer - sampler), cap), detached, multiplying the
    clipped policy term of each token and not the KL term (the docstring's worked example)."""
    trainer = torch.tensor([[-1.0, -0.5, -2.0]], requires_grad=True)
    weights = rft.truncated_importance_weights(trainer, torch.tensor([[-1.0, -1.0, -0.1]]), cap=2.0)
    assert weights == pytest.approx(torch.tensor([[1.0, math.exp(0.5), math.exp(-1.9)]]), abs=1e-6)
    assert not weights.requires_grad
    capped = rft.truncated_importance_weights(trainer, torch.tensor([[-1.0, -2.0, -2.0]]), cap=2.0)
    assert capped == pytest.approx(torch.tensor([[1.0, 2.0, 1.0]]), abs=1e-6)   # exp(1.5) = 4.48 -> 2
    # In the loss (dapo, beta 0.5, A = 1, ratio 1 on every token, ref = policy except token 0 with k3 = 1 - ln 2):
    # token terms -1 * w + 0.5 * k3 = [-1 + 0.5 (1 - ln 2), -2, -1] over 3 tokens.
    logprobs, mask = torch.tensor([[-1.0, -0.5, -2.0]]), torch.ones(1, 3)
    ref = logprobs.clone()
    ref[0, 0] += math.log(2.0)
    loss, _ = rft.grpo_loss(logprobs, logprobs, torch.tensor([1.0]), mask, ref_logprobs=ref, beta=0.5,
                            loss_type="dapo", importance_weights=capped)
    assert loss.item() == pytest.approx((-1 + 0.5 * (1 - math.log(2.0)) - 2 - 1) / 3, abs=1e-6)
    plain, _ = rft.grpo_loss(logprobs, logprobs, torch.tensor([1.0]), mask, ref_logprobs=ref, beta=0.5,
                             loss_type="dapo")
    assert plain.item() == pytest.approx((-1 + 0.5 * (1 - math.log(2.0)) - 1 - 1) / 3, abs=1e-6)


def test_importance_sampling_correction_needs_the_vllm_backend(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        rft.main(["--model", str(tmp_path / "none"), "--data", str(tmp_path / "none"), "--output_dir",
                  str(tmp_path / "out"), "--vllm_importance_sampling_correction"])
    assert exit_info.value.code == 2 and "--rollout_backend vllm" in capsys.readouterr().err


def test_data_order_is_a_function_of_position():
    first = common.data_indices(5, seed=3, start=0, count=12)
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:10]) == list(range(5))
    assert common.data_indices(5, seed=3, start=7, count=5) == first[7:12]
    # two ranks of batch 2 at one step read the rows one process of batch 4 reads
    assert common.data_indices(5, 3, 4, 2) + common.data_indices(5, 3, 6, 2) == common.data_indices(5, 3, 4, 4)


def test_score_never_crashes_on_bad_completions():
    answer = [2, 1, 4, 3]
    texts = ["", "<answer>", "<think>x</think><answer>2 1\n4 3</answer>", "<answer>1e9 ; rm -rf</answer>",
             "\x00" * 50, "<think></think><answer>" + "9" * 10_000 + "</answer>"]
    scores = jigsaw.score_completions(texts, [answer] * len(texts))
    assert scores["reward"] == [0.0, 0.0, 3.0, 0.0, 0.0, 0.0]
    assert scores["errors"] == 0
    # an answer that makes the reward raise scores 0 and is counted, the others are still scored
    broken = jigsaw.score_completions(texts[2:3] * 2, [answer, []])
    assert broken["reward"] == [3.0, 0.0] and broken["errors"] == 1


# ----------------------------------------------------------------------------------------------------------
# The tiny model
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(toy_model_dir, jigsaw_data):
    model, processor = common.load_model_and_processor(str(toy_model_dir))
    rows = common.load_rows(str(jigsaw_data), "train")
    return model, processor, [rows[i] for i in range(2)]


def test_generate_logprobs_equal_teacher_forced(tiny):
    """Log-probs of the sampled tokens as the sampler drew them (sequences.generate, at the sampling temperature)
    equal a fresh teacher-forced forward on the same sequences: 2 prompts with different image sizes, G = 3,
    the group sharing one prefill (num_samples)."""
    model, processor, rows = tiny
    temperature, group = 0.7, 3
    images = [common.row_images(rows[0]), [common.row_images(rows[1])[0].resize((112, 84))]]
    prompts = [rows[0]["prompt"], rows[1]["prompt"]]
    torch.manual_seed(0)
    model.eval()
    out = sequences.generate(model, processor, prompts, images, max_new_tokens=12, temperature=temperature,
                          num_samples=group)
    completion_ids = out["completion_ids"]
    assert len(completion_ids) == 2 * group and len(set(map(tuple, completion_ids))) > 1  # real sampling
    forced_batch = sequences.build_batch(processor, [p for p in prompts for _ in range(group)],
                                      [im for im in images for _ in range(group)], completion_ids=completion_ids)
    assert forced_batch["image_grid_thw"].prod(-1).tolist() == [16] * 3 + [48] * 3  # sizes differ, in order
    assert (forced_batch["attention_mask"][:3, :forced_batch["prompt_length"]] == 0).any()  # left padding
    with torch.no_grad():
        forced = sequences.completion_logprobs(model, forced_batch, temperature=temperature)
        logits = sequences.completion_logits(model, forced_batch, temperature).float()
    mask = forced_batch["completion_mask"].bool()
    sampled = torch.zeros_like(forced)
    for i, lps in enumerate(out["logprobs"]):
        sampled[i, :len(lps)] = torch.tensor(lps)
    # The suppressed vision tokens hold ~1/800 of the tiny model's mass: the sampler renormalises without
    # them, so log pi_sampler = log pi - log(1 - suppressed mass).
    suppressed = [model.config.image_token_id, model.config.video_token_id, model.config.vision_start_token_id]
    correction = torch.log1p(-torch.softmax(logits, -1)[..., suppressed].sum(-1))
    assert (sampled[mask] < 0).all()
    assert torch.allclose(sampled[mask] + correction[mask], forced[mask], atol=1e-4), \
        (sampled[mask] + correction[mask] - forced[mask]).abs().max()


def test_generate_matches_transformers_greedy_and_shares_the_prefill(tiny):
    """Greedy decoding with our loop gives model.generate's tokens (so positions and cache are handled as
    transformers does), and a group of G copies made from one prefill equals G separately encoded prompts."""
    model, processor, rows = tiny
    model = perturbed_copy(model)
    images = [common.row_images(rows[0]), [common.row_images(rows[1])[0].resize((112, 84))]]
    prompts = [rows[0]["prompt"], rows[1]["prompt"]]
    ours = sequences.generate(model, processor, prompts, images, max_new_tokens=10, do_sample=False)
    batch = sequences.build_batch(processor, prompts, images)
    tokenizer = processor.tokenizer
    suppressed = [model.config.image_token_id, model.config.video_token_id, model.config.vision_start_token_id]
    with torch.no_grad():
        theirs = model.generate(**sequences.model_inputs(batch), max_new_tokens=10, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                suppress_tokens=suppressed, temperature=None, top_p=None, top_k=None)
    for row, ids in enumerate(theirs[:, batch["input_ids"].shape[1]:].tolist()):
        ids = ids[:ids.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in ids else ids
        assert ours["completion_ids"][row] == ids
    assert len(set(map(tuple, ours["completion_ids"]))) == 2 and len(set(ours["completion_ids"][0])) > 2
    grouped = sequences.generate(model, processor, prompts, images, max_new_tokens=10, do_sample=False, num_samples=3)
    assert grouped["completion_ids"] == [ids for ids in ours["completion_ids"] for _ in range(3)]


def test_kl_zero_at_step0_and_clipping_with_two_iterations(tiny):
    """Reference = policy: KL exactly 0 on the first pass (ratio exactly 1, nothing clipped). With mu = 2 and a
    large lr the second pass sees ratio != 1 and the clip engages exactly on out-of-range tokens whose
    advantage pushes further out."""
    import copy
    from accelerate import Accelerator
    model, processor, rows = tiny
    model = copy.deepcopy(model)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    args = rft.Args(batch_size=2, num_generations=3, max_completion_length=8, micro_batch_size=4, num_iterations=2,
                    beta=0.04, lr=3e-2, optimizer="adamw", loss_type="dapo", epsilon=0.1)
    torch.manual_seed(1)
    batch = rft.rollout(model, processor, rows, args)
    batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0])  # random model: rewards all 0
    chunks = rft.micro_batches(processor, batch, args)
    accelerator = Accelerator(cpu=True)
    optimizer = common.make_optimizer(model.parameters(), "adamw", args.lr)
    scheduler = common.warmup_cosine(optimizer, 0, 2, 1.0)
    # the sampler-vs-trainer mismatch, before any update: the sampler's log-probs moved by a known amount on the
    # completion tokens (the sampler drew with the vision tokens masked: -log(1 - p_vision) >= 0 per token)
    with torch.no_grad():
        trainer = [sequences.completion_logprobs(model, mb).float() for mb in chunks]
    shift = [torch.full_like(mb["sampler_logprobs"], 0.25) * mb["completion_mask"] for mb in chunks]
    shift[0][0, 0] = -0.75
    for mb, lp, delta in zip(chunks, trainer, shift):
        mb["sampler_logprobs"] = lp + delta
    tokens = sum(int(mb["completion_mask"].sum()) for mb in chunks)
    result = rft.policy_update(accelerator, model, ref_model, optimizer, scheduler, chunks, args)
    assert result["sampling_logp_difference_max"] == pytest.approx(0.75, abs=1e-5)
    assert result["sampling_logp_difference_mean"] == pytest.approx((0.75 + 0.25 * (tokens - 1)) / tokens, abs=1e-5)
    first, second = result["passes"]
    assert first["kl"] == 0.0 and first["ratio_min"] == 1.0 and first["ratio_max"] == 1.0
    assert first["clip_fraction"] == 0.0
    assert second["ratio_max"] > 1 + args.epsilon or second["ratio_min"] < 1 - args.epsilon
    assert second["kl"] > 0 and second["clip_fraction"] > 0
    # Where exactly: recompute the second pass's ratios at the current weights against the kept old log-probs.
    mb = chunks[0]
    logprobs = sequences.completion_logprobs(model, mb).float()
    loss, stats = rft.grpo_loss(logprobs, mb["old_logprobs"], mb["advantages"], mb["loss_mask"],
                                mb["ref_logprobs"], args.beta, args.epsilon, loss_type="dapo")
    ratio, adv = stats["ratio"], mb["advantages"].unsqueeze(1)
    expected = ((ratio > 1 + args.epsilon) & (adv > 0)) | ((ratio < 1 - args.epsilon) & (adv < 0))
    assert torch.equal(stats["clipped"], expected)
    assert not torch.allclose(ratio[mb["loss_mask"].bool()], torch.ones(1))


# ----------------------------------------------------------------------------------------------------------
# Whole runs: learning, exact resume, non-finite guard
# ----------------------------------------------------------------------------------------------------------
def digit_reward(completion, answer, thinking=True, w_hit=1.0, w_acc=1.0, w_fmt=1.0):
    """A reward the random tiny model reaches from the start (it never writes the <think>/<answer> format, so
    R_fmt alone is 0 for every sample and teaches nothing): digits written, up to 4."""
    digits = min(1.0, sum(ch.isdigit() for ch in completion) / 4)
    return {"reward": digits, "hit": 0.0, "acc": 0.0, "fmt": digits, "parsed": False}


def test_reward_rises_and_resume_is_exact(toy_model_dir, jigsaw_data, tmp_path, monkeypatch):
    monkeypatch.setattr(jigsaw, "jigsaw_reward", digit_reward)
    kept = tmp_path / "state15"
    original = runs.save_resume_state

    def keep_step_15(accelerator, output_dir, at_step, extra):  # the run keeps only its latest resume state
        path = original(accelerator, output_dir, at_step, extra)
        if at_step == 15:
            shutil.copytree(path, kept)
        return path
    monkeypatch.setattr(runs, "save_resume_state", keep_step_15)
    out = tmp_path / "full"
    common_args = ["--model", str(toy_model_dir), "--data", str(jigsaw_data), "--lr", "3e-2", "--beta", "0.04",
                   "--eval_steps", "100", "--no-gradient_checkpointing", "--output_dir", str(out),
                   "--max_steps", "30", "--save_steps", "15"] + TINY + ["--max_completion_length", "6"]
    rft.main(common_args)
    metrics = [m for m in read_metrics(out / "metrics.jsonl") if "reward" in m]
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert metrics[0]["kl"] == 0.0  # the reference is the starting policy
    early = sum(m["reward"] for m in metrics[:4]) / 4
    late = sum(m["reward"] for m in metrics[-4:]) / 4
    assert late > early + 0.2, (early, late)
    assert (out / "final" / "config.json").exists() and (out / "checkpoint-15" / "config.json").exists()
    assert not any((out / "checkpoint-15").glob("optimizer*"))  # snapshots are model-only
    common.load_model(str(out / "checkpoint-15"))  # and load like any checkpoint
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert logged[0]["step"] == 1 and len(logged[0]["completions"]) == 4 and "advantage" in logged[0]["completions"][0]

    # Interrupted right after step 15's save: resume; the weights after step 30 equal the uninterrupted run's.
    from safetensors.torch import load_file
    full_weights = load_file(str(out / "final" / "model.safetensors"))
    shutil.rmtree(out / "final")
    shutil.rmtree(out / runs.RESUME_DIR)
    shutil.copytree(kept, out / runs.RESUME_DIR)
    rft.main(common_args + ["--resume"])
    resumed_weights = load_file(str(out / "final" / "model.safetensors"))
    assert full_weights.keys() == resumed_weights.keys()
    for key in full_weights:
        assert torch.equal(full_weights[key], resumed_weights[key]), key
    rewards = [m["reward"] for m in read_metrics(out / "metrics.jsonl") if "reward" in m]
    assert rewards == [m["reward"] for m in metrics]


def test_a_pilot_continued_to_more_steps_is_one_uninterrupted_run(toy_model_dir, jigsaw_data, tmp_path, monkeypatch):
    """run_all.sh's pilot: the RFT run stopped at --max_steps 4 (evaluated more often), then resumed with
    --max_steps 8, gives bit for bit the weights, the rewards and the snapshots of one 8-step run (constant lr)."""
    monkeypatch.setattr(jigsaw, "jigsaw_reward", digit_reward)
    from safetensors.torch import load_file
    args = ["--model", str(toy_model_dir), "--data", str(jigsaw_data), "--lr", "3e-2", "--beta", "0.04",
            "--no-gradient_checkpointing", "--save_steps", "4", "--save_at", "2"] + TINY + ["--max_completion_length", "6"]
    one, two = tmp_path / "one", tmp_path / "two"
    rft.main(args + ["--output_dir", str(one), "--max_steps", "8", "--eval_steps", "8"])
    rft.main(args + ["--output_dir", str(two), "--max_steps", "4", "--eval_steps", "1"])           # the pilot
    assert rft.main(args + ["--output_dir", str(two), "--max_steps", "4", "--eval_steps", "1", "--resume"]) == \
        {"step": 4}                                                     # a finished pilot is not redone
    rft.main(args + ["--output_dir", str(two), "--max_steps", "8", "--eval_steps", "8", "--resume"])  # the rest
    assert [label for _, label, _ in runs.list_checkpoints(one)] == [label for _, label, _ in runs.list_checkpoints(two)] \
        == ["checkpoint-2", "checkpoint-4", "final"]
    for folder in ("final", "checkpoint-4", "checkpoint-2"):
        a, b = (load_file(str(run / folder / "model.safetensors")) for run in (one, two))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    rewards = [[m["reward"] for m in read_metrics(run / "metrics.jsonl") if "reward" in m] for run in (one, two)]
    assert rewards[0] == rewards[1] and len(rewards[0]) == 8
    evals = [m["step"] for m in read_metrics(two / "metrics.jsonl") if "eval_accuracy" in m]
    assert evals == [0, 1, 2, 3, 4, 8] and "time_eval" in read_metrics(two / "metrics.jsonl")[-1]
    # A decaying lr reads --max_steps at every step: there a larger --max_steps is another run, refused.
    three = tmp_path / "three"
    rft.main(args + ["--output_dir", str(three), "--max_steps", "2", "--eval_steps", "0", "--min_lr_ratio", "0.1"])
    with pytest.raises(SystemExit):
        rft.main(args + ["--output_dir", str(three), "--max_steps", "4", "--eval_steps", "0", "--min_lr_ratio", "0.1",
                         "--resume"])
    # and a run cannot go back to fewer steps than it has made
    with pytest.raises(SystemExit):
        rft.main(args + ["--output_dir", str(two), "--max_steps", "6", "--eval_steps", "8", "--resume"])


def test_nonfinite_losses_stop_the_run_and_keep_good_checkpoints(toy_model_dir, jigsaw_data, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    args = ["--model", str(toy_model_dir), "--data", str(jigsaw_data), "--output_dir", str(out), "--beta", "0",
            "--max_steps", "10", "--save_steps", "1", "--eval_steps", "0", "--max_completion_length", "4",
            "--max_nonfinite", "2"] + TINY[:2] + ["--num_generations", "2", "--optimizer", "adamw", "--micro_batch_size", "4"]
    real_loss = rft.grpo_loss
    calls = {"n": 0}

    def loss_nan_after_first_step(*a, **k):
        loss, stats = real_loss(*a, **k)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 1 else loss), stats

    monkeypatch.setattr(rft, "grpo_loss", loss_nan_after_first_step)
    with pytest.raises(SystemExit):
        rft.main(args)
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["skipped_updates"] for m in metrics] == [0, 1, 1]
    # Step 2's update was skipped, so its snapshot holds step 1's weights: the checkpoint exists (later stages
    # rely on checkpoint-N at every --save_steps) and is good.
    from safetensors.torch import load_file
    one, two = (load_file(str(out / f"checkpoint-{n}" / "model.safetensors")) for n in (1, 2))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert json.loads((runs.resume_state(out) / "trainer_state.json").read_text())["step"] == 2
    good = common.load_model(str(out / "checkpoint-2"))
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_save_at_adds_model_only_snapshots(toy_model_dir, jigsaw_data, tmp_path, monkeypatch):
    """--save_at 1 (run_all.sh passes RFT_EARLY_STEP this way): checkpoint-1/ exists although --save_steps never
    falls on step 1; the resume state is written only at the --save_steps steps."""
    out = tmp_path / "early"
    resume_steps = []
    real_resume = runs.save_resume_state
    monkeypatch.setattr(runs, "save_resume_state", lambda acc, d, step, extra: resume_steps.append(step)
                        or real_resume(acc, d, step, extra))
    rft.main(["--model", str(toy_model_dir), "--data", str(jigsaw_data), "--output_dir", str(out), "--beta", "0",
              "--max_steps", "3", "--save_steps", "2", "--save_at", "1", "--eval_steps", "0"] + TINY)
    assert [label for _, label, _ in runs.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "final"]
    assert resume_steps == [2, 3]
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["step"] == 1


def test_training_forward_checkpoints_its_layers(toy_model_dir, jigsaw_data, tmp_path, monkeypatch):
    """--gradient_checkpointing must act: count the checkpointed layer calls of one training step (transformers
    checkpoints a layer only in training mode; from_pretrained returns eval mode, and generate switches to it)."""
    import transformers.modeling_utils as modeling_utils
    calls = {"n": 0}
    real = modeling_utils.checkpoint

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)
    monkeypatch.setattr(modeling_utils, "checkpoint", counting)
    args = ["--model", str(toy_model_dir), "--data", str(jigsaw_data), "--beta", "0", "--max_steps", "1",
            "--eval_steps", "0", "--optimizer", "adamw", "--output_dir", str(tmp_path / "gc")] + TINY
    rft.main(args + ["--gradient_checkpointing"])
    layers = common.load_model(str(toy_model_dir)).config.text_config.num_hidden_layers
    micro_batches = 2 * 4 // 4  # B * G sequences in micro-batches of 4
    assert calls["n"] >= layers * micro_batches, calls
    calls["n"] = 0
    rft.main(args[:-2] + ["--output_dir", str(tmp_path / "nogc"), "--no-gradient_checkpointing"])
    assert calls["n"] == 0


BAD_FLAGS = [("--max_steps", "-1"), ("--batch_size", "0"), ("--num_generations", "1"), ("--lr", "-1e-3"),
             ("--beta", "-0.1"), ("--epsilon", "-0.2"), ("--max_grad_norm", "-1"), ("--max_completion_length", "0"),
             ("--micro_batch_size", "0"), ("--num_iterations", "0"), ("--temperature", "0"), ("--top_p", "1.5"),
             ("--save_steps", "-5"), ("--eval_steps", "-1"), ("--min_lr_ratio", "2"), ("--warmup_steps", "-1"),
             ("--prompt_style", "nope"), ("--loss_type", "ppo")]


@pytest.mark.parametrize("flag,value", BAD_FLAGS)
def test_bad_numbers_stop_before_any_model_loads(flag, value, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(common, "load_model_and_processor", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(SystemExit) as err:
        rft.main(["--model", str(tmp_path / "m"), "--data", str(tmp_path / "d"), "--output_dir", str(tmp_path / "o"),
                  flag, value])
    assert err.value.code == 2 and flag.lstrip("-") in capsys.readouterr().err


def test_dry_run_prints_plan_without_weights(capsys):
    rft.main(["--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--dry_run", "--optimizer", "adamw8bit"])
    out = capsys.readouterr().out
    assert "GRPO memory plan" in out and "3,754,622,976" in out and "generation KV cache" in out


def test_two_processes_sample_different_puzzles_and_share_one_loss(toy_model_dir, jigsaw_data, tmp_path):
    """Under accelerate launch each rank draws its own puzzles with its own sampling seed, and dapo divides by the
    token count gathered over ranks: the logged loss of the step is the loss of one process on the union."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(root / "rft.py"), "--model", str(toy_model_dir),
         "--data", str(jigsaw_data), "--output_dir", str(out), "--max_steps", "1", "--beta", "0", "--loss_type", "dapo",
         "--eval_steps", "0", "--log_completions", "2", "--no-gradient_checkpointing"] + TINY,
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    ranks = [[json.loads(line) for line in (out / name).read_text().splitlines()]
             for name in ("completions.jsonl", "completions.rank1.jsonl")]
    ids = [{group["puzzle_id"] for group in rank} for rank in ranks]
    assert len(ids[0]) == len(ids[1]) == 2 and not ids[0] & ids[1]  # four different puzzles, not two twice
    samples = [c for rank in ranks for group in rank for c in group["completions"]]
    # mu = 1: ratio exactly 1, so each token's loss is -A of its sequence; over the union of both ranks
    union = -sum(c["advantage"] * c["tokens"] for c in samples) / sum(c["tokens"] for c in samples)
    logged = read_metrics(out / "metrics.jsonl")[0]["loss"]
    assert logged == pytest.approx(union, rel=1e-5, abs=1e-7)
