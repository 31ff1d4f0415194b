"""Tests of the jigsaw task (jigsaw.py): puzzles, answer parsing, rewards and the data builder.

Everything here is offline and CPU-only; the whole file runs in a few seconds:
    python -m pytest -q tests/test_jigsaw.py
Expected values in the reward table are written by hand from the paper's definitions (R_hit: share of right
positions, 0 unless the answer parses into exactly m*n indices in 1..m*n; R_acc: whole permutation right;
R_fmt: exactly <think>...</think><answer>...</answer> with a parseable answer), not computed by the code.
"""
import hashlib
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import common
import jigsaw

ROOT = Path(__file__).resolve().parents[1]


def pixels(image: Image.Image) -> bytes:
    return image.convert("RGB").tobytes()


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """Random pixels: every patch differs from every other, so a misplaced patch cannot go unnoticed."""
    rng = random.Random(seed)
    return Image.frombytes("RGB", (width, height), bytes(rng.randrange(256) for _ in range(width * height * 3)))


# ----------------------------------------------------------------------------------------------------------
# Puzzles: make_puzzle / reassemble
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows, cols, width, height", [
    (2, 2, 64, 64), (3, 3, 90, 90), (2, 3, 96, 64), (3, 2, 64, 96),
    (3, 3, 101, 77),   # sides that do not divide: cropped to 99x75
    (2, 3, 101, 77),   # cropped to 99x76
    (1, 2, 31, 17),    # smallest grid allowed
])
@pytest.mark.parametrize("convention", jigsaw.CONVENTIONS)
@pytest.mark.parametrize("tiles", [False, True])
def test_reassemble_with_answer_gives_original(rows, cols, width, height, convention, tiles):
    image = noise_image(width, height, seed=rows * 100 + cols)
    for seed in range(4):
        puzzle = jigsaw.make_puzzle(image, rows, cols, seed, convention, tiles)
        expected_w, expected_h = width - width % cols, height - height % rows
        assert puzzle.original.size == (expected_w, expected_h)
        assert len(puzzle.images) == (rows * cols if tiles else 1)
        if not tiles:
            assert puzzle.images[0].size == puzzle.original.size
            # the composite really is shuffled (never the identity), so it differs from the original
            assert pixels(puzzle.images[0]) != pixels(puzzle.original)
        rebuilt = jigsaw.reassemble(puzzle.images, puzzle.answer, rows, cols, convention)
        assert rebuilt.size == puzzle.original.size
        assert pixels(rebuilt) == pixels(puzzle.original)


def test_reassemble_with_wrong_answer_differs():
    """The check above can fail: a wrong (but valid) permutation does not rebuild the original."""
    image = noise_image(60, 60, seed=1)
    puzzle = jigsaw.make_puzzle(image, 2, 2, seed=3)
    wrong = puzzle.answer[1:] + puzzle.answer[:1]
    assert pixels(jigsaw.reassemble(puzzle.images, wrong, 2, 2)) != pixels(puzzle.original)


def test_crop_is_centred():
    image = noise_image(101, 77, seed=2)
    cropped = jigsaw.crop_to_grid(image, 3, 3)  # 99x75, offset ((101-99)//2, (77-75)//2) = (1, 1)
    assert pixels(cropped) == pixels(image.crop((1, 1, 100, 76)))


def test_docstring_example_2x2():
    """The module docstring's example: patches shown 3 1 / 4 2 -> answer 3 1 / 4 2, inverse 2 4 1 3."""
    image = noise_image(40, 40, seed=5)
    patches = [image.crop(((i % 2) * 20, (i // 2) * 20, (i % 2 + 1) * 20, (i // 2 + 1) * 20)) for i in range(4)]
    composite = Image.new("RGB", (40, 40))
    for position, original_index in enumerate([3, 1, 4, 2]):
        composite.paste(patches[original_index - 1], ((position % 2) * 20, (position // 2) * 20))
    assert pixels(jigsaw.reassemble([composite], [3, 1, 4, 2], 2, 2, "position_to_index")) == pixels(image)
    assert pixels(jigsaw.reassemble([composite], [2, 4, 1, 3], 2, 2, "index_to_position")) == pixels(image)
    assert jigsaw.answer_text([3, 1, 4, 2], 2, 2) == "3 1\n4 2"
    assert jigsaw.target_answer_only([3, 1, 4, 2], 2, 2) == "<answer>\n3 1\n4 2\n</answer>"


def test_make_puzzle_deterministic_permutation_never_identity():
    image = noise_image(48, 48, seed=3)
    for rows, cols in [(1, 2), (2, 1), (2, 2), (3, 3), (2, 3)]:
        n = rows * cols
        answers = set()
        for seed in range(300 if n <= 4 else 60):
            a = jigsaw.make_puzzle(image, rows, cols, seed)
            b = jigsaw.make_puzzle(image, rows, cols, seed)
            assert a.answer == b.answer and pixels(a.images[0]) == pixels(b.images[0])
            assert sorted(a.answer) == list(range(1, n + 1)), "answer must be a permutation of 1..n"
            assert a.answer != list(range(1, n + 1)), f"identity permutation for seed {seed}, grid {rows}x{cols}"
            inverse = jigsaw.make_puzzle(image, rows, cols, seed, "index_to_position").answer
            # index_to_position is the inverse permutation of position_to_index for the same seed
            assert [a.answer[inverse[k] - 1] for k in range(n)] == list(range(1, n + 1))
            answers.add(tuple(a.answer))
        # the seed matters: many different shuffles appear (a 2-cell grid has only one non-identity one)
        if n == 2:
            assert answers == {(2, 1)}
        else:
            assert len(answers) >= 10


def test_make_puzzle_bad_convention():
    with pytest.raises(ValueError, match="convention"):
        jigsaw.make_puzzle(noise_image(20, 20, 0), 2, 2, 0, convention="row_major")


# ----------------------------------------------------------------------------------------------------------
# Grid strings
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [("3x3", (3, 3)), ("2X3", (2, 3)), (" 4 x 4 ", (4, 4)), ("1x2", (1, 2)),
                                            ("3×2", (3, 2))])
def test_parse_grid_good(text, expected):
    assert jigsaw.parse_grid(text) == expected


@pytest.mark.parametrize("text", ["abc", "0x3", "3x0", "1x1", "3x", "x3", "3*3", "-2x3", "3x3x3", ""])
def test_parse_grid_bad(text):
    with pytest.raises(ValueError, match=r"ROWSxCOLS.*e\.g\. 3x3"):
        jigsaw.parse_grid(text)


# ----------------------------------------------------------------------------------------------------------
# Rewards: a hand-written table (answer 3 1 / 4 2 of the docstring example unless stated)
# ----------------------------------------------------------------------------------------------------------
A = [3, 1, 4, 2]
A9 = [2, 1, 3, 4, 5, 6, 7, 9, 8]  # a 3x3 answer
T = True   # thinking prompt: format is <think>..</think><answer>..</answer>
F = False  # no-think prompt: format is <answer>..</answer> only

# (case id, completion, answer, thinking, R_hit, R_acc, R_fmt)
REWARD_TABLE = [
    ("perfect", "<think>The sky is at the bottom left.</think>\n<answer>\n3 1\n4 2\n</answer>", A, T, 1, 1, 1),
    ("perfect_no_think", "<answer>\n3 1\n4 2\n</answer>", A, F, 1, 1, 1),
    ("perfect_one_line", "<think>x</think><answer>3 1 4 2</answer>", A, T, 1, 1, 1),
    ("surrounding_whitespace", "\n <think>x</think>\n\n<answer>3 1\n4 2</answer>\n\n", A, T, 1, 1, 1),
    ("empty_think", "<think></think><answer>3 1\n4 2</answer>", A, T, 1, 1, 1),
    ("partial_2_of_4", "<think>x</think><answer>3 1\n2 4</answer>", A, T, 0.5, 0, 1),
    ("all_wrong_identity", "<think>x</think><answer>1 2\n3 4</answer>", A, T, 0, 0, 1),
    ("partial_3x3_7_of_9", "<think>x</think><answer>2 1 3\n4 5 6\n7 8 9</answer>", A9, T, 7 / 9, 0, 1),
    ("perfect_3x3", "<think>x</think><answer>2 1 3\n4 5 6\n7 9 8</answer>", A9, T, 1, 1, 1),
    ("malformed_close_tag", "<think>x</think><answer>3 1\n4 2</answr>", A, T, 0, 0, 0),
    ("wrong_case_tags", "<think>x</think><Answer>3 1\n4 2</Answer>", A, T, 0, 0, 0),
    ("unclosed_answer", "<think>x</think><answer>3 1\n4 2", A, T, 0, 0, 0),
    ("missing_think_in_thinking_mode", "<answer>3 1\n4 2</answer>", A, T, 1, 1, 0),
    ("missing_close_think", "<think>x <answer>3 1\n4 2</answer>", A, T, 1, 1, 0),
    ("think_in_no_think_mode", "<think>x</think><answer>3 1\n4 2</answer>", A, F, 1, 1, 0),
    ("answer_inside_think_only", "<think><answer>3 1\n4 2</answer></think>", A, T, 1, 1, 0),
    ("text_after_answer", "<think>x</think><answer>3 1\n4 2</answer> Hope this helps!", A, T, 1, 1, 0),
    ("text_before_think", "Sure. <think>x</think><answer>3 1\n4 2</answer>", A, T, 1, 1, 0),
    ("text_after_answer_no_think", "<answer>3 1\n4 2</answer>\nDone.", A, F, 1, 1, 0),
    ("duplicated_index", "<think>x</think><answer>3 3\n4 2</answer>", A, T, 0.75, 0, 1),  # duplicates parse
    ("out_of_range_index", "<think>x</think><answer>3 1\n5 2</answer>", A, T, 0, 0, 0),
    ("zero_index", "<think>x</think><answer>3 1\n0 2</answer>", A, T, 0, 0, 0),
    ("too_few_numbers", "<think>x</think><answer>3 1\n4</answer>", A, T, 0, 0, 0),
    ("too_many_numbers", "<think>x</think><answer>3 1\n4 2\n1</answer>", A, T, 0, 0, 0),
    ("letters", "<think>x</think><answer>3 1\n4 b</answer>", A, T, 0, 0, 0),
    ("words_around_grid", "<think>x</think><answer>The grid is 3 1 4 2</answer>", A, T, 0, 0, 0),
    ("negative_number", "<think>x</think><answer>-3 1\n4 2</answer>", A, T, 0, 0, 0),
    ("decimal", "<think>x</think><answer>3.0 1\n4 2</answer>", A, T, 0, 0, 0),
    ("nested_brackets", "<think>x</think><answer>[[3, 1], [4, 2]]</answer>", A, T, 1, 1, 1),
    ("commas", "<think>x</think><answer>3,1,4,2</answer>", A, T, 1, 1, 1),
    ("semicolons", "<think>x</think><answer>3 1; 4 2</answer>", A, T, 1, 1, 1),
    ("pipes_and_parens", "<think>x</think><answer>|3|1|\n(4)(2)</answer>", A, T, 1, 1, 1),
    ("one_number_per_line", "<think>x</think><answer>\n3\n1\n4\n2\n</answer>", A, T, 1, 1, 1),
    ("leading_zeros", "<think>x</think><answer>03 01\n04 02</answer>", A, T, 1, 1, 1),
    ("two_answers_last_right", "<think>x</think><answer>1 2\n3 4</answer><answer>3 1\n4 2</answer>", A, T, 1, 1, 0),
    ("two_answers_last_partial", "<think>x</think><answer>3 1\n4 2</answer>\n<answer>3 1\n2 4</answer>", A, T,
     0.5, 0, 0),
    ("two_answers_no_think_mode", "<answer>3 1\n4 2</answer><answer>3 1\n4 2</answer>", A, F, 1, 1, 0),
    ("two_think_blocks", "<think>a</think><think>b</think><answer>3 1\n4 2</answer>", A, T, 1, 1, 0),
    ("nested_think", "<think><think>x</think></think><answer>3 1\n4 2</answer>", A, T, 1, 1, 0),
    ("nested_answer", "<think>x</think><answer><answer>3 1\n4 2</answer></answer>", A, T, 0, 0, 0),
    ("empty_answer", "<think>x</think><answer></answer>", A, T, 0, 0, 0),
    ("empty_string", "", A, T, 0, 0, 0),
    ("whitespace_only", "   \n ", A, F, 0, 0, 0),
    ("the_word_None", "None", A, T, 0, 0, 0),
    ("huge_number", "<think>x</think><answer>3 1\n4 99999999999999999999999</answer>", A, T, 0, 0, 0),
    ("seven_digit_index", "<think>x</think><answer>3 1\n4 0000002</answer>", A, T, 0, 0, 0),
    # Only ASCII digits are grid indices: Arabic-Indic, full-width and superscript digits are unparseable.
    ("arabic_indic_digits", "<think>x</think><answer>\u0663 \u0661\n\u0664 \u0662</answer>", A, T, 0, 0, 0),
    ("fullwidth_digits", "<think>x</think><answer>\uff13 \uff11\n\uff14 \uff12</answer>", A, T, 0, 0, 0),
    ("superscript_digits", "<think>x</think><answer>\u00b3 \u00b9\n\u2074 \u00b2</answer>", A, T, 0, 0, 0),
]


def test_reward_table_is_large_and_ids_unique():
    assert len(REWARD_TABLE) >= 25
    assert len({case[0] for case in REWARD_TABLE}) == len(REWARD_TABLE)


@pytest.mark.parametrize("case, completion, answer, thinking, hit, acc, fmt", REWARD_TABLE,
                         ids=[case[0] for case in REWARD_TABLE])
def test_reward_table(case, completion, answer, thinking, hit, acc, fmt):
    result = jigsaw.jigsaw_reward(completion, answer, thinking=thinking)
    assert result["hit"] == pytest.approx(hit)
    assert result["acc"] == acc
    assert result["fmt"] == fmt
    assert result["reward"] == pytest.approx(hit + acc + fmt)
    # `parsed` says whether extract_answer found a grid; R_hit can only be > 0 then
    assert result["parsed"] == (jigsaw.extract_answer(completion, len(answer)) is not None)
    if hit > 0:
        assert result["parsed"]
    assert jigsaw.format_ok(completion, len(answer), thinking) == bool(fmt)


def test_reward_of_none_completion():
    """A None completion (a failed generation) scores 0 everywhere and never raises."""
    assert jigsaw.jigsaw_reward(None, A) == {"reward": 0.0, "hit": 0.0, "acc": 0.0, "fmt": 0.0, "parsed": False}
    assert jigsaw.extract_answer(None, 4) is None
    assert jigsaw.format_ok(None, 4) is False


@pytest.mark.parametrize("w_hit, w_acc, w_fmt", [(1, 1, 1), (0.5, 2.0, 0.25), (0, 0, 1), (2, 0, 0)])
def test_reward_weights_scale_the_total(w_hit, w_acc, w_fmt):
    partial = "<think>x</think><answer>3 1\n2 4</answer>"           # hit 0.5, acc 0, fmt 1
    perfect = "<think>x</think><answer>3 1\n4 2</answer>"           # hit 1, acc 1, fmt 1
    no_format = "<answer>3 1\n2 4</answer> trailing"                 # hit 0.5, acc 0, fmt 0
    for text, (hit, acc, fmt) in ((partial, (0.5, 0, 1)), (perfect, (1, 1, 1)), (no_format, (0.5, 0, 0))):
        result = jigsaw.jigsaw_reward(text, A, True, w_hit=w_hit, w_acc=w_acc, w_fmt=w_fmt)
        assert (result["hit"], result["acc"], result["fmt"]) == (hit, acc, fmt)  # components are unweighted
        assert result["reward"] == pytest.approx(w_hit * hit + w_acc * acc + w_fmt * fmt)


def test_sft_targets_earn_full_reward():
    """The SFT-Non-Rea target gets full marks under the no-think prompt; with a think block, under the
    thinking prompt (so SFT targets and RFT rewards agree on the format)."""
    for answer, rows, cols in ((A, 2, 2), (A9, 3, 3), ([2, 3, 1, 6, 4, 5], 2, 3)):
        target = jigsaw.target_answer_only(answer, rows, cols)
        assert jigsaw.jigsaw_reward(target, answer, thinking=False)["reward"] == 3.0
        assert jigsaw.jigsaw_reward(target, answer, thinking=True)["fmt"] == 0.0
        assert jigsaw.jigsaw_reward("<think>because</think>\n" + target, answer, thinking=True)["reward"] == 3.0


# ----------------------------------------------------------------------------------------------------------
# Fuzz: parsing untrusted text never raises
# ----------------------------------------------------------------------------------------------------------
FUZZ_PIECES = ["<think>", "</think>", "<answer>", "</answer>", "<answer", "answer>", "</", "<", ">", "[", "]", "[[",
               "(", ")", "{", "}", ",", ";", "|", " ", "\n", "\t", "\r", "1", "2", "3", "4", "9", "0", "10", "-",
               ".", "e", "x", "None", "\u0663", "\uff12", "\u00b2", "\u2028", "\u00a0", "\u200b", "🧩", "\x00",
               "\\d", "(.*?)", "9" * 12, "\ufffd"]


def random_completion(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.6:
        return "".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(0, 40)))
    if kind < 0.75:  # well-formed tags around a random grid body: reaches the R_fmt = 1 branch
        body = "".join(rng.choice(["1", "2", "3", "4", "5", "6", " ", "\n", ",", "[", "]", "0", "x"])
                       for _ in range(rng.randint(0, 20)))
        return f"<think>{rng.choice(FUZZ_PIECES[20:])}</think>{rng.choice(['', chr(10)])}<answer>{body}</answer>"
    if kind < 0.9:  # arbitrary code points (no lone surrogates, which a str from a tokenizer never holds)
        return "".join(chr(rng.choice([rng.randint(0, 0x7f), rng.randint(0, 0xd7ff), rng.randint(0xe000, 0x10ffff)]))
                       for _ in range(rng.randint(0, 60)))
    # long: a valid-looking completion buried in a lot of text
    filler = "".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(500, 3000)))
    return filler + "<think>" + filler + "</think><answer>3 1\n4 2</answer>" + filler[:rng.randint(0, 50)]


def test_fuzz_parsing_never_raises():
    rng = random.Random(1234)
    seen_parsed = seen_fmt = 0
    for _ in range(3000):
        text = random_completion(rng)
        n = rng.choice([2, 4, 6, 9])
        answer = list(range(1, n + 1))
        rng.shuffle(answer)
        parsed = jigsaw.extract_answer(text, n)
        assert parsed is None or (len(parsed) == n and all(1 <= v <= n for v in parsed))
        for thinking in (True, False):
            ok = jigsaw.format_ok(text, n, thinking)
            assert isinstance(ok, bool)
            result = jigsaw.jigsaw_reward(text, answer, thinking)
            assert 0.0 <= result["hit"] <= 1.0 and result["acc"] in (0.0, 1.0) and result["fmt"] in (0.0, 1.0)
            assert result["reward"] == pytest.approx(result["hit"] + result["acc"] + result["fmt"])
            seen_fmt += ok
        seen_parsed += parsed is not None
    for text in ("9" * 100_000, "<answer>" + "1 " * 50_000 + "</answer>", "\u0663" * 50_000,
                 "<think>" + "x" * 200_000 + "</think><answer>2 1</answer>"):
        jigsaw.jigsaw_reward(text, [2, 1])
    assert jigsaw.jigsaw_reward("<think>" + "x" * 200_000 + "</think><answer>2 1</answer>", [2, 1])["reward"] == 3.0
    # the fuzz reached the interesting branches (long strings parse), not only the trivial `None` path
    assert seen_parsed > 0 and seen_fmt > 0


def test_parsing_time_on_adversarial_tags():
    """Many unclosed tags (a degenerate sampled completion) still score quickly at realistic lengths.
    The regexes are quadratic in the number of unclosed tags (16k chars ~0.2 s, 160k chars ~25 s on 2 cores),
    which is fine for completions capped at ~512-1024 tokens."""
    text = "<think>" + "</think><answer>" * 500  # 8k characters, ~2k tokens
    start = time.perf_counter()
    jigsaw.jigsaw_reward(text, A)
    jigsaw.jigsaw_reward("<answer>" * 1000, A)
    assert time.perf_counter() - start < 5.0


# ----------------------------------------------------------------------------------------------------------
# Data builder
# ----------------------------------------------------------------------------------------------------------
def image_hash(image) -> str:
    return hashlib.sha256(pixels(image)).hexdigest()


def test_procedural_build_deterministic_and_splits_disjoint():
    args = jigsaw.BuildArgs(source="procedural", grid="2x3", train=10, test=5, output_dir="unused", seed=7, image_size=48)
    first, second = jigsaw.build_rows(args), jigsaw.build_rows(args)
    assert [len(first["train"]), len(first["test"])] == [10, 5]
    for split in ("train", "test"):
        for a, b in zip(first[split], second[split]):
            assert {k: v for k, v in a.items() if k != "images"} == {k: v for k, v in b.items() if k != "images"}
            assert [pixels(im) for im in a["images"]] == [pixels(im) for im in b["images"]]
    # another seed gives other puzzles
    other = jigsaw.build_rows(jigsaw.BuildArgs(source="procedural", grid="2x3", train=10, test=5, seed=8,
                                               image_size=48))
    assert [r["answer"] for r in other["train"]] != [r["answer"] for r in first["train"]]
    train_ids = {r["source_id"] for r in first["train"]}
    test_ids = {r["source_id"] for r in first["test"]}
    assert not train_ids & test_ids
    # disjoint in content too, not only in name: no test image reassembles to a training image
    def originals(rows):
        return {image_hash(jigsaw.reassemble(r["images"], r["answer"], r["rows"], r["cols"])) for r in rows}
    assert not originals(first["train"]) & originals(first["test"])
    for row in first["train"] + first["test"]:
        n = row["rows"] * row["cols"]
        assert sorted(row["answer"]) == list(range(1, n + 1)) and row["answer"] != list(range(1, n + 1))
        assert row["grid"] == "2x3" and row["convention"] == "position_to_index"
        assert jigsaw.jigsaw_reward(row["target_non_rea"], row["answer"], thinking=False)["reward"] == 3.0
        assert "<think>" in row["prompt"] and "<think>" not in row["prompt_no_think"]


def test_saved_dataset_round_trips(jigsaw_data):
    """The conftest data set (2x2 procedural, saved to disk): stored composites (PNG, lossless) reassemble
    into the procedural image their source_id names."""
    from datasets import load_from_disk
    dataset = load_from_disk(str(jigsaw_data))
    assert set(dataset) == {"train", "test"} and (len(dataset["train"]), len(dataset["test"])) == (16, 8)
    assert set(dataset["train"][0]) == {"id", "images", "prompt", "prompt_no_think", "answer", "grid", "rows",
                                        "cols", "convention", "source_id", "seed", "target_non_rea"}
    for split, tag in (("train", "img-train"), ("test", "img-test")):
        for row in dataset[split].select(range(4)):
            index = int(row["source_id"].rsplit("/", 1)[1])
            expected = jigsaw.procedural_image(jigsaw._puzzle_seed(0, tag, index), 56)
            rebuilt = jigsaw.reassemble(row["images"], row["answer"], row["rows"], row["cols"], row["convention"])
            assert pixels(rebuilt) == pixels(jigsaw.crop_to_grid(expected, 2, 2))


def write_folder(folder: Path, count: int, size=(60, 45)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"img_{i:02d}.png"
        noise_image(*size, seed=100 + i).save(folder / name)
        names.append(name)
    return names


def write_corrupt_png(path: Path) -> None:
    buffer = path.with_suffix(".full.bin")
    noise_image(60, 45, seed=999).save(buffer, format="PNG")
    path.write_bytes(buffer.read_bytes()[:200])  # truncated after the header
    buffer.unlink()


def test_folder_source_skips_corrupt_files_with_a_count(tmp_path, capsys):
    folder = tmp_path / "images"
    names = write_folder(folder, 6)
    write_corrupt_png(folder / "broken.png")
    (folder / "notes.txt").write_text("not an image, ignored by suffix")
    args = jigsaw.BuildArgs(source=str(folder), grid="2x2", train=4, test=2, seed=3)
    rows = jigsaw.build_rows(args)
    err = capsys.readouterr().err
    assert "broken.png" in err and "skipped 1 unreadable image(s)" in err
    train_ids = {r["source_id"] for r in rows["train"]}
    test_ids = {r["source_id"] for r in rows["test"]}
    assert len(test_ids) == 2 and not train_ids & test_ids
    assert train_ids | test_ids <= set(names)
    for row in rows["train"] + rows["test"]:
        original = jigsaw.crop_to_grid(Image.open(folder / row["source_id"]).convert("RGB"), 2, 2)
        assert pixels(jigsaw.reassemble(row["images"], row["answer"], 2, 2)) == pixels(original)
    assert jigsaw.build_rows(args)["test"][0]["source_id"] == rows["test"][0]["source_id"]  # deterministic


def test_folder_source_strict_names_the_corrupt_file(tmp_path):
    folder = tmp_path / "images"
    write_folder(folder, 4)
    write_corrupt_png(folder / "broken.png")
    with pytest.raises(ValueError, match=r"broken\.png.*strict_images"):
        jigsaw.build_rows(jigsaw.BuildArgs(source=str(folder), grid="2x2", train=2, test=1, strict_images=True))


def test_folder_source_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        jigsaw.build_rows(jigsaw.BuildArgs(source=str(empty), grid="2x2", train=2, test=1))
    few = tmp_path / "few"
    write_folder(few, 2)
    with pytest.raises(ValueError, match="disjoint"):
        jigsaw.build_rows(jigsaw.BuildArgs(source=str(few), grid="2x2", train=2, test=2))


def test_image_smaller_than_grid(tmp_path):
    with pytest.raises(ValueError, match=r"smaller than the 3x3 grid.*smaller --grid"):
        jigsaw.crop_to_grid(noise_image(2, 10, 0), 3, 3)
    folder = tmp_path / "tiny"
    write_folder(folder, 3, size=(2, 2))
    with pytest.raises(ValueError, match=r"2x2 pixels is smaller than the 3x3 grid.*larger images or a smaller --grid"):
        jigsaw.build_rows(jigsaw.BuildArgs(source=str(folder), grid="3x3", train=2, test=1))


def test_cli_help_lists_options():
    result = subprocess.run([sys.executable, "jigsaw.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("--source", "--grid", "--train", "--test", "--output_dir", "--strict_images"):
        assert option in result.stdout
    flat = " ".join(result.stdout.split())
    assert "ROWSxCOLS of the puzzle (the paper: 3x3)" in flat  # field docstrings are the help
    assert "python jigsaw.py --source procedural" in flat        # module docstring's run commands


def test_cli_main_builds_a_dataset(tmp_path):
    from datasets import load_from_disk
    out = tmp_path / "jig"
    jigsaw.main(["--source", "procedural", "--grid", "3x2", "--train", "3", "--test", "2", "--output_dir", str(out),
                 "--image_size", "48", "--convention", "index_to_position", "--tiles"])
    dataset = load_from_disk(str(out))
    row = dataset["train"][0]
    assert (row["rows"], row["cols"], row["convention"], len(row["images"])) == (3, 2, "index_to_position", 6)
    assert not (tmp_path / "jig.tmp").exists()
    with pytest.raises(SystemExit):  # a clear message, no traceback
        jigsaw.main(["--grid", "3x", "--output_dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_output_dir_it_did_not_make_is_never_deleted(tmp_path, capsys):
    """--output_dir over a run folder (checkpoints inside) stops with a message and deletes nothing; a data set
    jigsaw.py made itself is rebuilt in place; --overwrite replaces anything, for the user who means it."""
    run = tmp_path / "run"
    (run / "checkpoint-5").mkdir(parents=True)
    (run / "checkpoint-5" / "model.safetensors").write_bytes(b"weights")
    argv = ["--source", "procedural", "--grid", "2x2", "--train", "2", "--test", "1", "--image_size", "56"]
    with pytest.raises(SystemExit) as err:
        jigsaw.main(argv + ["--output_dir", str(run)])
    assert err.value.code == 2 and "was not made by this kit" in capsys.readouterr().err
    assert (run / "checkpoint-5" / "model.safetensors").read_bytes() == b"weights"
    jigsaw.main(argv + ["--output_dir", str(tmp_path / "data")])
    jigsaw.main(argv + ["--output_dir", str(tmp_path / "data"), "--train", "3"])  # its own: rebuilt
    assert len(common.load_rows(str(tmp_path / "data"), "train")) == 3
    jigsaw.main(argv + ["--output_dir", str(run), "--overwrite"])
    assert not (run / "checkpoint-5").exists() and len(common.load_rows(str(run), "test")) == 1
