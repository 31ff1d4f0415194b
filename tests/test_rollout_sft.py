"""rollout_sft.py: the four SFT data sources, resumable rollout generation, and the perplexity of a source."""
import json
import math
import shutil

import pytest
import torch

import common
import sequences
import jigsaw
import rollout_sft

FAST = ["--num_generations", "2", "--max_completion_length", "8", "--batch_size", "4", "--limit", "4"]


def stub_reward(correct_texts):
    """A reward that calls exactly `correct_texts` correct (acc 1, fmt 1) and everything else wrong."""
    def reward(completion, answer):
        ok = completion in correct_texts
        return {"reward": 3.0 if ok else 0.0, "hit": float(ok), "acc": float(ok), "fmt": float(ok), "parsed": ok}
    return reward


def accept_all(completion, answer):
    return {"reward": 3.0, "hit": 1.0, "acc": 1.0, "fmt": 1.0, "parsed": True}


def load_split(path, split="train"):
    # exactly how sft.py reads its data
    return common.load_rows(str(path), split, required=("prompt", "completion"))




@pytest.fixture(scope="module")
def model_and_processor(toy_model_dir):
    return common.load_model_and_processor(str(toy_model_dir))


# ---------------------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------------------
def test_select_keeps_only_correct_rows_dedups_and_caps():
    row = {"answer": [3, 1, 4, 2], "rows": 2, "cols": 2}
    texts = ["A", "B", "C", "A", "D"]
    reward = stub_reward({"A", "C"})
    kept, counts = rollout_sft.select_completions("rea_grpo_rollout", texts, row, reward, max_per_puzzle=5)
    assert [k["completion"] for k in kept] == ["A", "C"]  # B, D wrong; the second A a duplicate
    assert counts == {"samples": 5, "acc": 3, "fmt": 3, "correct": 3, "no_think": 0, "duplicates": 1,
                      "invalid_target": 0, "kept": 2}
    kept, _ = rollout_sft.select_completions("rea_grpo_rollout", texts, row, reward, max_per_puzzle=1)
    assert [k["completion"] for k in kept] == ["A"]
    # with the real reward: right answer but no think block (fmt 0) is not kept
    good = "<think>blue is top left</think>\n<answer>\n3 1\n4 2\n</answer>"
    kept, counts = rollout_sft.select_completions(
        "rea_grpo_rollout", ["<answer>3 1\n4 2</answer>", good, "<think>x</think><answer>1 3\n4 2</answer>"],
        row, rollout_sft.default_reward, 4)
    assert [k["completion"] for k in kept] == [good] and counts["acc"] == 2 and counts["correct"] == 1


def test_self_generated_keeps_reasoning_with_ground_truth_answer():
    row = {"answer": [3, 1, 4, 2], "rows": 2, "cols": 2}
    texts = ["<think> the red piece is at the top </think><answer>1 2\n3 4</answer>",  # wrong answer, kept
             "no tags at all",                                                          # skipped
             "<think>   </think><answer>3 1\n4 2</answer>",                              # empty think, skipped
             "<think>a <answer>1</answer> b</think>",                                   # tags inside, skipped
             "<think>blue corner</think> and then it rambles"]
    kept, counts = rollout_sft.select_completions("rea_self_generated", texts, row, rollout_sft.default_reward, 5)
    assert [k["completion"] for k in kept] == [
        "<think>the red piece is at the top</think>\n<answer>\n3 1\n4 2\n</answer>",
        "<think>blue corner</think>\n<answer>\n3 1\n4 2\n</answer>"]
    assert counts["no_think"] == 3 and counts["kept"] == 2
    assert counts["acc"] == 1  # the checkpoint's own accuracy is counted on its raw samples
    for item in kept:
        assert jigsaw.jigsaw_reward(item["completion"], row["answer"]) == {
            "reward": 3.0, "hit": 1.0, "acc": 1.0, "fmt": 1.0, "parsed": True}


def test_token_weighted_nll_by_hand():
    mean_nll, ppl = sequences.token_weighted_nll([-2.0, -18.0], [2, 6])
    assert mean_nll == pytest.approx(2.5) and ppl == pytest.approx(math.exp(2.5))
    # not the mean of per-row means (1.0 and 3.0 -> 2.0)
    assert mean_nll != pytest.approx(2.0)


def test_programmatic_reasoning_is_correct_and_valid():
    answer = [3, 1, 4, 2]
    text = rollout_sft.programmatic_reasoning(answer, 2, 2)
    assert "The piece now at position 1 (row 1, column 1) shows the part of the picture that belongs at " \
           "position 3 (row 2, column 1)." in text
    target = rollout_sft.reasoning_target(text, answer, 2, 2)
    assert jigsaw.jigsaw_reward(target, answer)["reward"] == 3.0
    inverse = rollout_sft.programmatic_reasoning([2, 4, 1, 3], 2, 2, "index_to_position")
    assert "The piece that belongs at position 1 (row 1, column 1) now stands at position 2" in inverse


# ---------------------------------------------------------------------------------------------------------
# Perplexity equals exp of the mean NLL computed by hand from a plain forward
# ---------------------------------------------------------------------------------------------------------
def test_perplexity_matches_hand_computation(model_and_processor, jigsaw_data):
    model, processor = model_and_processor
    data = common.load_rows(str(jigsaw_data), "train")
    rows = [{"prompt": data[i]["prompt"], "images": data[i]["images"],
             "completion": c} for i, c in ((0, "<think>short</think>\n<answer>\n1 2\n3 4\n</answer>"),
                                            (1, "<answer>\n2 1\n4 3\n</answer> and a longer tail of words here"))]
    total_logprob, total_tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            batch = sequences.build_batch(processor, [row["prompt"]], [common.row_images(row)],
                                       completions=[row["completion"]])
            logits = model(**sequences.model_inputs(batch)).logits[0]       # plain forward, all positions
            logprobs = torch.log_softmax(logits.double(), dim=-1)
            start = batch["prompt_length"]
            targets = batch["input_ids"][0, start:]
            picked = logprobs[start - 1:-1].gather(-1, targets[:, None]).squeeze(-1)  # t-1 predicts t
            total_logprob += float(picked.sum())
            total_tokens += len(targets)
    expected_nll = -total_logprob / total_tokens
    scores = sequences.sequence_logprobs(model, processor, [r["prompt"] for r in rows],
                                      [common.row_images(r) for r in rows], [r["completion"] for r in rows],
                                      batch_size=2)  # padded together
    mean_nll, perplexity = sequences.token_weighted_nll([s for s, _ in scores], [c for _, c in scores])
    assert sum(c for _, c in scores) == total_tokens
    assert mean_nll == pytest.approx(expected_nll, rel=1e-4)
    assert perplexity == pytest.approx(math.exp(expected_nll), rel=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Resume: interrupted + resumed == uninterrupted
# ---------------------------------------------------------------------------------------------------------
def test_interrupted_generation_resumes_to_identical_rows(toy_model_dir, jigsaw_data, tmp_path):
    argv = ["--source", "rea_grpo_rollout", "--data", str(jigsaw_data), "--model", str(toy_model_dir),
            "--num_generations", "2", "--max_completion_length", "8", "--batch_size", "4", "--limit", "4", "--max_per_puzzle", "2"]
    reference = tmp_path / "reference"
    rollout_sft.main(argv + ["--output_dir", str(reference)], reward_fn=accept_all)

    calls = {"n": 0}

    def crashing_sampler(model, processor, rows, args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash in chunk 2")
        return rollout_sft.sample_completions(model, processor, rows, args)

    resumed = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        rollout_sft.main(argv + ["--output_dir", str(resumed)], reward_fn=accept_all, sample_fn=crashing_sampler)
    shard, _ = rollout_sft.shard_paths(str(resumed))
    assert len(shard.read_text().splitlines()) == 2  # chunk 1 (2 puzzles) survived the crash
    assert not resumed.exists()                      # no half data set for sft.py
    with shard.open("a") as f:                       # and a write torn by the crash
        f.write('{"id": "train-000002", "counts": {"sampl')

    seen = []

    def recording_sampler(model, processor, rows, args):
        seen.append([r["id"] for r in rows])
        return rollout_sft.sample_completions(model, processor, rows, args)

    rollout_sft.main(argv + ["--output_dir", str(resumed)], reward_fn=accept_all, sample_fn=recording_sampler)
    assert seen == [["train-000002", "train-000003"]]  # the done chunk is skipped, the torn one redone
    a, b = load_split(reference), load_split(resumed)
    assert a["id"] == b["id"] and a["completion"] == b["completion"]
    assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-5)
    assert len(set(a["id"])) == 4 and len(a) > 4  # several distinct samples kept per puzzle

    # a resume with a different sampler is refused instead of mixing two distributions
    with pytest.raises(SystemExit):
        rollout_sft.main([x if x != "8" else "9" for x in argv] + ["--output_dir", str(resumed)], reward_fn=accept_all)


# ---------------------------------------------------------------------------------------------------------
# The four sources through the CLI entry
# ---------------------------------------------------------------------------------------------------------
def test_four_sources_build_via_cli(toy_model_dir, jigsaw_data, tmp_path, capsys):
    data, model = str(jigsaw_data), str(toy_model_dir)
    train = common.load_rows(data, "train")
    answers = dict(zip(train["id"], train["answer"]))

    # non_rea: prompt without thinking, ground-truth answer only
    rollout_sft.main(["--source", "non_rea", "--data", data, "--output_dir", str(tmp_path / "non_rea")])
    non_rea = load_split(tmp_path / "non_rea")
    assert len(non_rea) == 16 and non_rea["prompt"][0] == train["prompt_no_think"][0]
    assert non_rea["completion"] == train["target_non_rea"]
    assert list(non_rea.column_names) == list(rollout_sft.OUT_COLUMNS)

    # rea_external, programmatic stand-in and a traces file (one id unknown, one puzzle without a trace)
    rollout_sft.main(["--source", "rea_external", "--data", data, "--output_dir", str(tmp_path / "rea_external")])
    external = load_split(tmp_path / "rea_external")
    assert len(external) == 16 and all("shows the part of the picture" in c for c in external["completion"])
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps({"id": f"train-{i:06d}", "reasoning": f"GPT says {i}"}) + "\n"
                              for i in range(15)) + json.dumps({"id": "nope", "reasoning": "x"}) + "\n")
    stats = rollout_sft.main(["--source", "rea_external", "--data", data, "--traces", str(traces),
                              "--output_dir", str(tmp_path / "rea_external_traces")])
    assert stats["rows_kept"] == 15 and stats["traces_unmatched"] == 1
    with_traces = load_split(tmp_path / "rea_external_traces")
    assert with_traces["completion"][3] == "<think>GPT says 3</think>\n" + jigsaw.target_answer_only(
        answers["train-000003"], 2, 2)

    # rea_grpo_rollout on the tiny model's real samples (the stub reward calls them all correct)
    stats = rollout_sft.main(["--source", "rea_grpo_rollout", "--data", data, "--model", model, *FAST,
                              "--output_dir", str(tmp_path / "rollout")], reward_fn=accept_all)
    rollout = load_split(tmp_path / "rollout")
    assert len(rollout) == 4 and stats["rows_kept"] == 4 and stats["sampler_accuracy"] == 1.0
    assert all(lp < 0 for lp in rollout["logprob"]) and set(rollout["source_checkpoint"]) == {model}
    saved = json.loads((tmp_path / "rollout" / "stats.json").read_text())
    assert saved["share_puzzles_with_correct"] == 1.0 and saved["rows_kept"] == 4

    # rea_self_generated: the tiny model's real samples, wrapped in think tags (a random model never writes
    # them); the kept rows hold that text and the ground-truth answer
    raw = {}

    def think_sampler(model_, processor, rows, args):
        samples = rollout_sft.sample_completions(model_, processor, rows, args)
        wrapped = [[f"<think>step {t.replace('<', '')}</think><answer>1 1\n1 1</answer>" for t in texts]
                   for texts in samples]
        raw.update({row["id"]: w for row, w in zip(rows, wrapped)})
        return wrapped

    stats = rollout_sft.main(["--source", "rea_self_generated", "--data", data, "--model", model, *FAST,
                              "--output_dir", str(tmp_path / "self")], sample_fn=think_sampler)
    assert stats["sampler_accuracy"] == 0.0  # the real reward: the sampled answers were all wrong
    own = load_split(tmp_path / "self")
    assert len(own) == 4
    for row in own:
        reasoning = rollout_sft.think_text(raw[row["id"]][0])
        assert row["completion"] == f"<think>{reasoning}</think>\n" + jigsaw.target_answer_only(
            answers[row["id"]], 2, 2)
        assert jigsaw.jigsaw_reward(row["completion"], row["answer"])["acc"] == 1.0

    # every source is a data set sft.py can batch
    processor = common.load_processor(model)
    for name in ("non_rea", "rea_external", "rollout", "self"):
        rows = load_split(tmp_path / name).select(range(2))
        batch = sequences.build_batch(processor, rows["prompt"], [common.row_images(r) for r in rows],
                                   completions=rows["completion"])
        assert batch["completion_mask"].sum() > 0



# ---------------------------------------------------------------------------------------------------------
# Bad input: clear message with counts, never an empty data set
# ---------------------------------------------------------------------------------------------------------
def test_bad_inputs_fail_clearly(toy_model_dir, jigsaw_data, tmp_path, capsys):
    data = str(jigsaw_data)
    # checkpoint folder with weights but no processor
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(toy_model_dir / name, bare / name)
    with pytest.raises(SystemExit):
        rollout_sft.main(["--source", "rea_grpo_rollout", "--data", data, "--model", str(bare), *FAST,
                          "--output_dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert "no processor" in err and "3 files" in err

    # traces whose ids match no puzzle
    traces = tmp_path / "t.jsonl"
    traces.write_text("".join(json.dumps({"id": f"other-{i}", "reasoning": "r"}) + "\n" for i in range(3)))
    with pytest.raises(SystemExit):
        rollout_sft.main(["--source", "rea_external", "--data", data, "--traces", str(traces),
                          "--output_dir", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert "3 trace(s)" in err and "16 puzzles" in err
    assert not (tmp_path / "y").exists()

    # zero correct rollouts (the real reward on a random tiny model)
    with pytest.raises(SystemExit):
        rollout_sft.main(["--source", "rea_grpo_rollout", "--data", data, "--model", str(toy_model_dir), *FAST,
                          "--output_dir", str(tmp_path / "z")])
    err = capsys.readouterr().err
    # a sparse source samples its whole budget (4 puzzles x 2 samples), then stops with the counts
    assert "gave 0 rows from 4 puzzles" in err and '"samples": 8' in err
    assert not (tmp_path / "z").exists()


def test_a_sparse_source_samples_its_whole_budget(toy_model_dir, jigsaw_data, tmp_path):
    """Only the last puzzle has a right sample: the first chunks keep nothing, and sampling goes on."""
    seen = []

    def last_one_right(model_, processor, rows, args):
        seen.extend(r["id"] for r in rows)
        return [["right" if r["id"] == last else "wrong"] * args.num_generations for r in rows]
    data = common.load_rows(str(jigsaw_data), "train", required=("id",))
    last = data[7]["id"]
    stats = rollout_sft.main(["--source", "rea_grpo_rollout", "--data", str(jigsaw_data), "--model",
                              str(toy_model_dir), *FAST[:-2], "--limit", "8", "--output_dir", str(tmp_path / "s")],
                             reward_fn=stub_reward({"right"}), sample_fn=last_one_right)
    assert len(seen) == 8 and stats["rows_kept"] == 1 and stats["puzzles"] == 8


def write_rft_metrics(path, accuracy, steps=30, format_rate=1.0):
    path.write_text("".join(json.dumps({"step": 0, "eval_accuracy": 0.0}) + "\n" if i == 0 else
                            json.dumps({"step": i, "reward": 1.0, "accuracy": accuracy, "format_rate": format_rate})
                            + "\n" for i in range(steps + 1)))


def test_the_sources_guard_stops_before_any_decoding_naming_the_numbers(toy_model_dir, jigsaw_data, tmp_path,
                                                                        capsys, monkeypatch):
    """RFT's rollouts were right 0.5% of the time: 4 samples keep a row from ~2% of the puzzles, so 16 puzzles give
    ~0 rows: the run stops before any model is loaded or anything decoded, with those numbers."""
    metrics = tmp_path / "metrics.jsonl"
    write_rft_metrics(metrics, 0.005)
    calls = []
    real_load = rollout_sft.load_sampler
    monkeypatch.setattr(rollout_sft, "load_sampler", lambda args: calls.append("load") or real_load(args))
    guard = ["--sampler_metrics", str(metrics), "--sampler_step", "30", "--min_rows", "10"]
    args = ["--source", "rea_grpo_rollout", "--data", str(jigsaw_data), "--model", str(toy_model_dir),
            "--num_generations", "4", "--max_completion_length", "8", "--batch_size", "8"]
    with pytest.raises(SystemExit) as err:
        rollout_sft.main(args + guard + ["--output_dir", str(tmp_path / "x")],
                         sample_fn=lambda *a: calls.append("decode"))
    message = capsys.readouterr().err
    assert err.value.code == 2 and calls == [] and not (tmp_path / "x").exists()
    for number in ("steps 11-30", "0.50% of the time", "probability 1.99%", "16 puzzles give about 0 rows",
                   "--min_rows 10", "504 puzzles would be needed (the split has 16"):
        assert number in message, (number, message)
    assert rollout_sft.kept_per_puzzle(0.005, 4, 1) == pytest.approx(1 - 0.995 ** 4)
    # rea_self_generated keeps samples with a think block: its prediction reads the format rate
    write_rft_metrics(metrics, 0.0, format_rate=0.9)
    stats = rollout_sft.main(["--source", "rea_self_generated"] + args[2:] + guard
                             + ["--output_dir", str(tmp_path / "y")],
                             sample_fn=lambda m, p, rows, a: [["<think>t</think><answer>1</answer>"] * 4 for _ in rows])
    assert calls == ["load"] and stats["predicted_rows"] == pytest.approx(16 * (1 - 0.1 ** 4))


def test_max_rows_stops_sampling_early(toy_model_dir, jigsaw_data, tmp_path):
    seen = []

    def counting_sampler(model_, processor, rows, args):
        seen.extend(r["id"] for r in rows)
        return [[f"<think>t{r['id']}</think><answer>1 1\n1 1</answer>"] * args.num_generations for r in rows]

    stats = rollout_sft.main(["--source", "rea_self_generated", "--data", str(jigsaw_data), "--model",
                              str(toy_model_dir), "--num_generations", "2", "--max_completion_length", "8",
                              "--batch_size", "4", "--max_rows", "5", "--output_dir", str(tmp_path / "s")],
                             sample_fn=counting_sampler)
    assert stats["rows_kept"] == 6 and len(seen) == 6  # three chunks of 2 puzzles, then stop (16 available)
    assert stats["puzzles_available"] == 16 and len(load_split(tmp_path / "s")) == 6


def test_output_dir_it_did_not_make_is_refused(jigsaw_data, tmp_path, capsys):
    mine = tmp_path / "run"
    mine.mkdir()
    (mine / "checkpoint-7").mkdir()
    with pytest.raises(SystemExit):
        rollout_sft.main(["--source", "non_rea", "--data", str(jigsaw_data), "--output_dir", str(mine)])
    assert "was not made by this kit" in capsys.readouterr().err and (mine / "checkpoint-7").exists()
    rollout_sft.main(["--source", "non_rea", "--data", str(jigsaw_data), "--output_dir", str(tmp_path / "ok")])
    rollout_sft.main(["--source", "non_rea", "--data", str(jigsaw_data), "--output_dir", str(tmp_path / "ok")])
