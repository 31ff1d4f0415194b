"""base_check.py: MI(answer; image) by hand, its candidate set, 0 for a model whose answer ignores the image,
clearly positive for one that reads it; the CLI that the eval_base stage runs, and rft.py's step-0 guard that
logs step 0 and stops on it."""
import copy
import itertools
import json
import math

import pytest
import torch
from PIL import Image

import common
import runs
import sequences
import base_check
import jigsaw
import rft


def test_mi_by_hand():
    same = torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    assert base_check.answer_distribution_mi(same) == 0.0
    # each puzzle's answer names the puzzle: p_bar = [0.5, 0.5], KL(p_i || p_bar) = log 2
    assert base_check.answer_distribution_mi(torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(math.log(2))
    # partly informative: p_1 = [0.75, 0.25], p_2 = [0.25, 0.75]
    partial = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert base_check.answer_distribution_mi(torch.tensor([[0.75, 0.25], [0.25, 0.75]])) == pytest.approx(partial)


def test_candidates_all_24_on_2x2_and_a_seeded_sample_with_the_true_answers_beyond():
    candidates, exhaustive = base_check.answer_candidates([[2, 1, 4, 3]], 24)
    assert exhaustive and len(candidates) == 24 and len({tuple(c) for c in candidates}) == 24
    answers = [[2, 1, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
    sample, exhaustive = base_check.answer_candidates(answers, 24, seed=3)
    assert not exhaustive and len(sample) == 26 and len({tuple(c) for c in sample}) == 26
    assert all(a in sample for a in answers) and all(sorted(c) == list(range(1, 10)) for c in sample)
    assert base_check.answer_candidates(answers, 24, seed=3)[0] == sample  # seeded
    assert base_check.answer_candidates(answers, 24, seed=4)[0] != sample
    # a sample never asks for more permutations than exist (23 true answers of 2x2 + a sample of 10 -> all 24)
    many = [list(p) for p in itertools.permutations(range(1, 5))][:23]
    assert len(base_check.answer_candidates(many, 10)[0]) == 24


@pytest.fixture(scope="module")
def tiny(toy_model_dir, jigsaw_data):
    model, processor = common.load_model_and_processor(str(toy_model_dir))
    return model, processor, list(common.load_rows(str(jigsaw_data), "train"))


def blind_copy(model):
    """The fixture whose answer ignores the image: the vision merger's last layer zeroed, so every image enters
    the language model as the same (zero) embeddings."""
    blind = copy.deepcopy(model)
    with torch.no_grad():
        blind.model.visual.merger.mlp[-1].weight.zero_()
        blind.model.visual.merger.mlp[-1].bias.zero_()
    return blind


def contrast_rows(row):
    """Four puzzles that differ only in a flat image colour, each with its own answer: easy to read for the tiny
    model, so a few SFT steps give a model whose answer depends on the image."""
    colors = [(0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 0, 255)]
    answers = [[2, 1, 4, 3], [3, 4, 1, 2], [4, 3, 2, 1], [1, 3, 2, 4]]
    return [dict(row, images=[Image.new("RGB", (56, 56), color)], answer=answer,
                 target_non_rea=jigsaw.target_answer_only(answer, 2, 2)) for color, answer in zip(colors, answers)]


def reading_copy(model, processor, rows, steps=60):
    """A copy trained (SFT, answer-only targets, 60 steps) to answer each contrast row: it reads the image."""
    reader = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(reader.parameters(), lr=3e-3)
    batch = sequences.build_batch(processor, [r["prompt_no_think"] for r in rows], [common.row_images(r) for r in rows],
                               [r["target_non_rea"] for r in rows])
    for _ in range(steps):
        loss, _ = sequences.sft_loss(reader, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return reader.eval()


@pytest.mark.parametrize("thinking", [False, True])
def test_mi_is_zero_when_the_answer_ignores_the_image(tiny, thinking):
    model, processor, rows = tiny
    result = base_check.answer_image_mutual_information(blind_copy(model), processor, rows, thinking=thinking,
                                                 num_puzzles=8, max_new_tokens=8, batch_size=8)
    assert result["answer_mi_candidates"] == 24 and result["answer_mi_exhaustive"]
    assert result["answer_image_mi"] == pytest.approx(0.0, abs=1e-9)
    assert result["answer_p_chance"] == pytest.approx(1 / 24)


def test_mi_is_positive_when_the_model_reads_the_image(tiny):
    model, processor, rows = tiny
    rows = contrast_rows(rows[0])
    reader = reading_copy(model, processor, rows)
    result = base_check.answer_image_mutual_information(reader, processor, rows, thinking=False, batch_size=8)
    blind = base_check.answer_image_mutual_information(blind_copy(reader), processor, rows, thinking=False, batch_size=8)
    # 4 puzzles: at most log(4) = 1.39 nats, reached when each answer is certain and names its image
    assert result["answer_image_mi"] > 0.5 * math.log(4), result
    assert result["answer_p_true"] > 0.5 and result["answer_top1_true"] == 1.0, result
    assert blind["answer_image_mi"] < 1e-9  # the same model with the image taken away


def test_max_steps_0_logs_step_0_and_the_check_stops_a_blind_model(tiny, jigsaw_data, tmp_path, capsys):
    model, processor, rows = tiny
    args = ["--data", str(jigsaw_data), "--max_steps", "0", "--max_completion_length", "8", "--optimizer", "adamw",
            "--eval_size", "4", "--eval_batch_size", "4", "--mi_puzzles", "4", "--beta", "0"]
    out = tmp_path / "check"
    blind_dir = tmp_path / "blind"
    blind_copy(model).save_pretrained(blind_dir)
    processor.save_pretrained(blind_dir)
    # --min_answer_image_mi 0: the check only measures; step 0 is logged and nothing is trained or saved
    rft.main(["--model", str(blind_dir), "--output_dir", str(out), "--min_answer_image_mi", "0"] + args)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["step"] == 0
    assert {"eval_accuracy", "eval_hit", "eval_format_rate", "answer_image_mi", "answer_p_true"} <= set(lines[0])
    assert lines[0]["answer_image_mi"] == pytest.approx(0.0, abs=1e-9)
    assert not (out / "final").exists() and runs.resume_state(out) is None
    # the random model writes no <answer> block: step 0 warns that GRPO's first steps will go to the format
    assert lines[0]["eval_format_rate"] < base_check.LOW_FORMAT_RATE
    assert "in the prompt's format" in capsys.readouterr().out
    # the default threshold stops the same model with exit 2 and says why
    with pytest.raises(SystemExit) as stop:
        rft.main(["--model", str(blind_dir), "--output_dir", str(tmp_path / "stopped")] + args)
    assert stop.value.code == 2
    assert "hardly depends on the image" in capsys.readouterr().err


def test_the_cli_writes_its_result_and_stops_a_blind_model(tiny, jigsaw_data, tmp_path, capsys):
    # what run_all.sh's eval_base stage runs: the same measurement as rft.py's step 0, in base_check.json
    model, processor, rows = tiny
    blind_dir = tmp_path / "blind"
    blind_copy(model).save_pretrained(blind_dir)
    processor.save_pretrained(blind_dir)
    args = ["--model", str(blind_dir), "--data", str(jigsaw_data), "--max_completion_length", "8", "--eval_size", "4",
            "--batch_size", "4", "--mi_puzzles", "4"]
    result = base_check.main(args + ["--output_dir", str(tmp_path / "check")])
    written = json.loads((tmp_path / "check" / "base_check.json").read_text())
    assert written["answer_image_mi"] == pytest.approx(0.0, abs=1e-9) == result["answer_image_mi"]
    assert written["eval_size"] == 4 and written["model"] == str(blind_dir) and "environment" in written
    with pytest.raises(SystemExit) as stop:
        base_check.main(args + ["--output_dir", str(tmp_path / "stopped"), "--min_answer_image_mi", "0.1"])
    assert stop.value.code == 2 and "hardly depends on the image" in capsys.readouterr().err
    assert not (tmp_path / "stopped" / "base_check.json").exists()
