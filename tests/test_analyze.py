"""analyze.py on the tiny model: the influence math by hand, first-order against exact steps, LoGra projections,
symmetry, bitwise restore, and one end-to-end run with tiny sources built here (the real sources are made by
other stages and may not exist yet)."""
import json
import math

import pytest
import torch

import analyze
import common
import report
import sequences
from conftest import perturbed_copy

LM_PARAMS = "model.language_model.*,lm_head.*"




@pytest.fixture(scope="module")
def tiny(toy_model_dir):
    model, processor = common.load_model_and_processor(str(toy_model_dir))
    model.eval()
    return model, processor


@pytest.fixture(scope="module")
def tiny64(toy_model_dir):
    """float64 copy: first-order vs exact comparisons need more digits than fp32 has at small eta."""
    model, processor = common.load_model_and_processor(str(toy_model_dir))
    model.to(torch.float64).eval()
    return model, processor


@pytest.fixture(scope="module")
def samples(tiny, jigsaw_data, prior_data):
    """Two probes (prior questions, reference answers), two non_rea-like and two reasoning-like jigsaw samples."""
    _, processor = tiny
    jig = common.load_rows(str(jigsaw_data), "train")
    prior = common.load_rows(str(prior_data), "test")
    probes = [analyze.make_batch(processor, prior[i]["prompt"], common.row_images(prior[i]), prior[i]["answer"])
              for i in range(2)]
    non_rea = [analyze.make_batch(processor, jig[i]["prompt_no_think"], common.row_images(jig[i]),
                                  jig[i]["target_non_rea"]) for i in range(2)]
    rea = [analyze.make_batch(processor, jig[i]["prompt"], common.row_images(jig[i]),
                              "<think>The piece at position 1 shows the top left part, so it came from position "
                              f"{jig[i]['answer'][0]}.</think>\n{jig[i]['target_non_rea']}") for i in range(2, 4)]
    return {"probes": probes, "non_rea": non_rea, "rea": rea}


def lm_params(model):
    named = dict(model.named_parameters())
    params = [named[n] for n in analyze.match_names(list(named), LM_PARAMS)]
    analyze.set_trainable(model, params)
    return params


def n_tokens(batch):
    return int(batch["completion_mask"].sum())


# ---------------------------------------------------------------------------------------------------------
# The math by hand
# ---------------------------------------------------------------------------------------------------------
def test_norms_match_explicit_matrices():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, 5, dtype=torch.float64), -1)
    targets = torch.tensor([0, 4, 2])
    for t in range(3):
        jacobian = torch.eye(5, dtype=torch.float64) - torch.ones(5, 1, dtype=torch.float64) @ probs[t:t + 1]
        assert analyze.log_softmax_jacobian_fro2(probs)[t].item() == pytest.approx((jacobian ** 2).sum().item())
        g = probs[t] - torch.nn.functional.one_hot(targets[t], 5).double()
        assert analyze.ce_gradient_fro2(probs, targets)[t].item() == pytest.approx((g ** 2).sum().item())
    # uniform pi over V=4: ||A||^2 = 4 - 2 + 4 * 4 * (1/16) = 3; ||G||^2 = 1/4 - 1/2 + 1 = 3/4
    uniform = torch.full((1, 4), 0.25, dtype=torch.float64)
    assert analyze.log_softmax_jacobian_fro2(uniform).item() == pytest.approx(3.0)
    assert analyze.ce_gradient_fro2(uniform, torch.tensor([1])).item() == pytest.approx(0.75)
    assert analyze.lbk(0.09, 3.0, 0.75) == pytest.approx(0.04)


def test_first_order_and_cosine_by_hand():
    grads_v = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    grads_u = torch.tensor([[3.0, 4.0], [-1.0, 0.0], [0.0, -5.0]], dtype=torch.float64)
    inner = grads_v @ grads_u.T                                  # [[3, -1, 0], [8, 0, -10]]
    scores = analyze.first_order_delta(inner, torch.tensor([2, 1, 5]), eta=0.1)
    assert torch.allclose(scores, torch.tensor([[0.15, -0.1, 0.0], [0.4, 0.0, -0.2]], dtype=torch.float64))
    cos = analyze.cosine_matrix(grads_v, grads_u)
    assert torch.allclose(cos, torch.tensor([[0.6, -1.0, 0.0], [0.8, 0.0, -1.0]], dtype=torch.float64))
    assert common.pearson([1, 2, 3], [2, 4, 6.5]) > 0.99 and analyze.sign_agreement([1, -1], [2, 1]) == 0.5


def test_parse_sources_and_errors():
    entries = analyze.parse_named_paths("non_rea=data/j:prompt_no_think:target_non_rea,rea_external=x.jsonl",
                                        "--sources", with_columns=True)
    assert entries[0] == {"name": "non_rea", "path": "data/j", "prompt_column": "prompt_no_think",
                          "target_column": "target_non_rea"}
    assert entries[1]["path"] == "x.jsonl" and entries[1]["target_column"] == "completion"
    for bad in ("no_equals_sign", "a=x,a=y", "a=x::t"):
        with pytest.raises(SystemExit):
            analyze.parse_named_paths(bad, "--sources", with_columns=True)


# ---------------------------------------------------------------------------------------------------------
# Exact step, first order, symmetry
# ---------------------------------------------------------------------------------------------------------
def test_restore_after_exact_step_is_bitwise(tiny, samples):
    model, _ = tiny  # float32: the dtype of real runs
    params = lm_params(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = samples["probes"][0]
    base = analyze.score_sample(model, probe)
    backup = analyze.backup_params(params, "cpu")
    after = analyze.exact_step(model, params, backup, samples["rea"][0], 1e-2, [probe])[0]
    # the step did move the probe (so restoring is not trivially true) ...
    assert (after["token_logprobs"] - base["token_logprobs"]).abs().max() > 1e-5
    # ... and every tensor is back bit for bit
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(analyze.score_sample(model, probe)["token_logprobs"], base["token_logprobs"])


def test_first_order_matches_exact_for_small_eta(tiny64, samples):
    model, _ = tiny64
    params = lm_params(model)
    probe, train = samples["probes"][0], samples["non_rea"][0]
    dtype = torch.float64
    g_v = analyze.summed_logprob_gradient(model, probe, params, dtype)
    g_u = analyze.summed_logprob_gradient(model, train, params, dtype)
    base = analyze.score_sample(model, probe)["token_logprobs"].sum().item()
    backup = analyze.backup_params(params, "cpu")
    errors = []
    for eta in (1e-2, 1e-3, 1e-4):
        predicted = analyze.first_order_delta((g_v @ g_u).view(1, 1), torch.tensor([n_tokens(train)]), eta).item()
        after = analyze.exact_step(model, params, backup, train, eta, [probe])[0]
        exact = after["token_logprobs"].sum().item() - base
        errors.append(abs(exact - predicted) / abs(predicted))
    # O(eta^2) remainder: the relative error shrinks about tenfold per tenfold smaller eta (measured on two
    # builds of the tiny model: 2.4e-2, 3.0e-3, 2.6e-4 and 8.9e-2, 1.0e-2, 1.1e-3); below eta ~1e-5 it hits a
    # floor, since RMSNorm computes in fp32 even in a float64 model.
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[0] / errors[1] > 5 and errors[1] / errors[2] > 5 and errors[2] < 3e-3, errors


def test_symmetry_holds_to_first_order(tiny64, samples):
    """T_u * Delta(v|u) = T_v * Delta(u|v) + O(eta^2): the asymmetry shrinks with eta and is small at 1e-4."""
    model, _ = tiny64
    params = lm_params(model)
    backup = analyze.backup_params(params, "cpu")
    for probe, train in ((samples["probes"][0], samples["rea"][0]), (samples["probes"][1], samples["non_rea"][1])):
        base_v = analyze.score_sample(model, probe)["token_logprobs"].sum().item()
        base_u = analyze.score_sample(model, train)["token_logprobs"].sum().item()
        asymmetry = []
        for eta in (1e-3, 1e-4):
            v_given_u = analyze.exact_step(model, params, backup, train, eta, [probe])[0]["token_logprobs"] \
                .sum().item() - base_v
            u_given_v = analyze.exact_step(model, params, backup, probe, eta, [train])[0]["token_logprobs"] \
                .sum().item() - base_u
            # token-mean SFT losses: normalise by the stepped sample's length (see analyze's docstring)
            a, b = n_tokens(train) * v_given_u, n_tokens(probe) * u_given_v
            asymmetry.append(abs(a - b) / ((abs(a) + abs(b)) / 2))
            # the raw (unnormalised) values differ by the length ratio: the normalisation is not vacuous
            assert abs(v_given_u - u_given_v) / abs(u_given_v) > 0.5
        # The O(eta^2) claim is the shrink with eta (10x smaller eta: asymmetry ~10x smaller); the absolute level at
        # 1e-4 depends on the random tiny model (0.030 for the tokenizer of 2026-12-01), so its bound has room.
        assert asymmetry[1] < 0.05 and asymmetry[0] / asymmetry[1] > 5, asymmetry


# ---------------------------------------------------------------------------------------------------------
# LoGra-style projection
# ---------------------------------------------------------------------------------------------------------
def test_projection_adapters_leave_output_unchanged(tiny, samples):
    model, _ = tiny
    batch = samples["rea"][1]
    with torch.no_grad():
        reference = sequences.completion_logits(model, batch)
    keys = set(model.state_dict())
    with analyze.projection_adapters(model, analyze.Args.proj_modules, 4, seed=0) as adapters:
        assert len(adapters) == 14  # 2 decoder layers x 7 linear layers
        with torch.no_grad():
            adapted = sequences.completion_logits(model, batch)
    assert torch.equal(adapted, reference)
    assert all(isinstance(model.get_submodule(name), torch.nn.Linear) for name, _ in adapters)
    assert set(model.state_dict()) == keys


def test_projected_gradient_is_projected_weight_gradient(tiny64, samples):
    """dL/dB = P_out^T (dL/dW) P_in^T exactly, and projected inner products track the full ones (corr >= 0.95)."""
    model, _ = tiny64
    batches = samples["probes"] + samples["non_rea"] + samples["rea"]
    patterns = analyze.Args.proj_modules
    modules = analyze.match_names([n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)], patterns)
    weights = [model.get_submodule(n).weight for n in modules]
    full, _ = analyze.per_sample_gradients(model, batches, weights, 0, patterns, 0)
    projected, info = analyze.per_sample_gradients(model, batches, weights, 24, patterns, 0)
    assert info["dims"] == len(modules) * 24 ** 2 and projected.shape == (len(batches), info["dims"])
    # the identity, on the first layer of the first sample
    with analyze.projection_adapters(model, patterns, 24, seed=0) as adapters:
        first = adapters[0][1]
        w_numel = weights[0].numel()
        grad_w = full[0, :w_numel].view_as(weights[0])
        expected = first.proj_out.T @ grad_w @ first.proj_in.T
    assert torch.allclose(projected[0, :24 * 24].view(24, 24), expected, rtol=1e-9, atol=1e-12)
    # inner products over distinct pairs (the diagonal would flatter the correlation)
    i, j = torch.triu_indices(len(batches), len(batches), offset=1)
    exact_inner = (full @ full.T)[i, j]
    proj_inner = (projected @ projected.T)[i, j]
    correlation = common.pearson(exact_inner, proj_inner)
    assert correlation >= 0.95, correlation
    for p in model.parameters():  # trainable flags restored
        assert p.requires_grad == any(p is w for w in weights)


# ---------------------------------------------------------------------------------------------------------
# End to end: tiny sources, probes, a run with checkpoints
# ---------------------------------------------------------------------------------------------------------
def write_reasoning_jsonl(jigsaw_data, folder):
    """A reasoning-like source in sft.py's JSONL shape (images as paths relative to the file)."""
    jig = common.load_rows(str(jigsaw_data), "train")
    (folder / "img").mkdir(parents=True)
    with (folder / "rea.jsonl").open("w") as f:
        for k in range(4):
            row = jig[k]
            row["images"][0].save(folder / "img" / f"{k}.png")
            f.write(json.dumps({"id": f"rea-{k}", "images": [f"img/{k}.png"], "prompt": row["prompt"],
                                "completion": f"<think>Position 1 holds piece {row['answer'][0]}.</think>\n"
                                              + row["target_non_rea"]}) + "\n")
    return folder / "rea.jsonl"


def make_run(toy_model_dir, folder):
    """The training-run layout (common.py): checkpoint-2/ = the base weights; final/ = perturbed weights at step 3."""
    model, _ = common.load_model_and_processor(str(toy_model_dir))
    folder.mkdir(parents=True)
    model.save_pretrained(folder / "checkpoint-2")
    (folder / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"step": 2}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder / "final")
    (folder / "final" / "trainer_state.json").write_text(json.dumps({"step": 3}))
    return folder


def test_end_to_end(toy_model_dir, jigsaw_data, prior_data, tmp_path):
    rea = write_reasoning_jsonl(jigsaw_data, tmp_path / "rea")
    run = make_run(toy_model_dir, tmp_path / "run")
    out = tmp_path / "analysis"
    results = analyze.main([
        "--model", str(toy_model_dir), "--sources",
        f"non_rea={jigsaw_data}:prompt_no_think:target_non_rea,rea_self_generated={rea}",
        "--probes", str(prior_data), "--probe_answer", "greedy", "--max_completion_length", "6",
        "--runs", f"sft_non_rea={run}", "--output_dir", str(out), "--n_train", "3", "--n_probe", "3",
        "--exact_pairs", "2", "--proj_dim", "8", "--eta", "1e-3"])
    saved = json.loads((out / "dynamics.json").read_text())
    assert saved["gradients"]["mode"] == "projected" and saved["gradients"]["dims"] == 14 * 64
    for name in ("non_rea", "rea_self_generated"):
        stats = saved["sources"][name]
        assert stats["n"] == 3 and stats["perplexity"] > 1
        # every row of the source (16 puzzles, 4 JSONL rows), not only the 3 drawn
        assert stats["perplexity_rows"] == {"non_rea": 16, "rea_self_generated": 4}[name]
        assert len(stats["cosines"]) == 9 and all(-1 <= c <= 1 for c in stats["cosines"])
        assert len(stats["exact_pairs"]) == 4 and stats["lbk"]["mean"] > 0
        assert all(len(p["delta_per_token"]) == saved["samples"]["probes"][p["probe"]]["tokens"]
                   for p in stats["exact_pairs"])
    assert saved["symmetry"]["n"] == 2 * 2 * 2 and saved["calibration"]["n"] == 8
    curve = saved["tracking"]["sft_non_rea"]
    assert curve["steps"] == [0, 2, 3] and curve["labels"] == ["base", "checkpoint-2", "final"]
    # forward-only re-scoring: the checkpoint holding the base weights reproduces the base log-probs exactly
    assert curve["logprob"][1] == curve["logprob"][0] and curve["logprob"][2] != curve["logprob"][0]
    for png in ("lbk.png", "cosine.png", "perplexity_vs_influence.png", "probe_logprob.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # JSON only: report.py renders the section from what analyze.py saved (and the lock it held while writing)
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".png")) == [".kit_stage.lock", "dynamics.json"]
    markdown = "\n".join(report.dynamics_lines(saved, "analysis"))
    assert "### Learning dynamics" in markdown and "](analysis/probe_logprob.png)" in markdown
    assert "| non_rea | 3 |" in markdown and "Gradients: projected (896 dims)." in markdown
    assert math.isfinite(results["calibration"]["pearson"])


def test_bad_column_fails_before_loading_the_model(jigsaw_data, prior_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        analyze.main(["--model", str(tmp_path / "no_model_here"), "--sources", f"non_rea={jigsaw_data}:prompt:nope",
                      "--probes", str(prior_data), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "nope" in err and str(jigsaw_data) in err


def test_full_gradients_of_3b_refused_before_loading(jigsaw_data, prior_data, tmp_path, capsys):
    """Counted on the meta device from the shipped config: no download, no weights, a fix in the message."""
    with pytest.raises(SystemExit):
        analyze.main(["--model", "Qwen/Qwen2.5-VL-3B-Instruct", "--sources",
                      f"non_rea={jigsaw_data}:prompt_no_think:target_non_rea", "--probes", str(prior_data),
                      "--output_dir", str(tmp_path / "o")])
    assert "--proj_dim 8" in capsys.readouterr().err


def test_task_kl_equals_the_enumerated_kl(toy_model_dir, jigsaw_data):
    """RL's Razor's KL(tuned || base) on the new task: for one-token completions the estimate is exact (the full
    vocabulary at the only position); for two tokens it matches the KL enumerated over every first token."""
    model, processor = common.load_model_and_processor(str(toy_model_dir))
    model.eval()
    tuned = perturbed_copy(model)
    rows = [common.load_rows(str(jigsaw_data), "test")[i] for i in range(2)]
    prompts, images = [r["prompt"] for r in rows], [common.row_images(r) for r in rows]

    def first_position(m, prompt_batch, completion_ids):
        batch = sequences.append_completions(prompt_batch, completion_ids, processor.tokenizer.pad_token_id)
        return torch.log_softmax(sequences.completion_logits(m, batch).double(), -1)  # [N, T, V]

    torch.manual_seed(0)
    estimate = analyze.task_kl(tuned, model, processor, prompts, images, num_samples=3, max_completion_length=1)
    exact = []
    with torch.no_grad():
        for p, im in zip(prompts, images):
            prompt_batch = sequences.build_batch(processor, [p], [im])
            lt, lb = first_position(tuned, prompt_batch, [[0]])[0, 0], first_position(model, prompt_batch, [[0]])[0, 0]
            exact.append(float((lt.exp() * (lt - lb)).sum()))
    assert estimate["samples"] == 6 and estimate["kl"] == pytest.approx(sum(exact) / 2, rel=1e-4)

    # two tokens, one puzzle: enumerate every first token y1 (eos ends the sequence there)
    eos = processor.tokenizer.eos_token_id
    with torch.no_grad():
        prompt_batch = sequences.build_batch(processor, prompts[:1], images[:1])
        vocab = tuned.config.text_config.vocab_size
        lt1 = first_position(tuned, prompt_batch, [[0]])[0, 0]
        lb1 = first_position(model, prompt_batch, [[0]])[0, 0]
        second = torch.zeros(vocab, dtype=torch.float64)
        # vision tokens are never sampled (sequences.generate suppresses them) and cannot follow a prompt
        never = {getattr(tuned.config, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id")}
        for start in range(0, vocab, 256):
            ids = [[v if v not in never else 0, 0] for v in range(start, min(vocab, start + 256))]
            many = sequences.select_prompt_rows(prompt_batch, [0] * len(ids))
            lt2, lb2 = first_position(tuned, many, ids)[:, 1], first_position(model, many, ids)[:, 1]
            second[start:start + len(ids)] = (lt2.exp() * (lt2 - lb2)).sum(-1)
        second[eos] = 0.0
        second[list(never)] = 0.0
        exact2 = float((lt1.exp() * ((lt1 - lb1) + second)).sum())
    torch.manual_seed(1)
    sampled = analyze.task_kl(tuned, model, processor, prompts[:1], images[:1], num_samples=300,
                              max_completion_length=2, batch_size=1)
    assert sampled["kl"] == pytest.approx(exact2, rel=0.1), (sampled, exact2)
