"""The toy world's prior-knowledge data: what each split holds is what run_all.sh's two base stages rely on, and
the prior the base gets on the jigsaw task is true of the pieces and only half the skill."""
import random

from datasets import load_from_disk
from PIL import ImageStat

import jigsaw
import toy


def test_prior_splits(prior_data):
    data = load_from_disk(str(prior_data))
    assert set(data) == {"pretrain", "train", "test"}
    # pretrain: direct questions only, one-word answers (perception first, no format to learn)
    for row in data["pretrain"]:
        assert row["category"] in toy.QUESTION_KINDS
        assert row["completion"] == row["answer"] and "<" not in row["completion"]
    # test: asked like a benchmark, never in think format, no colour grids, no jigsaw prompts
    assert all(r["category"] in toy.QUESTION_KINDS and "<think>" not in r["completion"] for r in data["test"])


def test_instruction_mix_has_every_kind_of_row():
    rows = toy.prior_rows("train", 300, 0, format_share=0.15)
    categories = {r["category"] for r in rows}
    assert {"color_grid", "jigsaw_prior"} <= categories and set(toy.QUESTION_KINDS) <= categories
    assert any(r["completion"].startswith("<think>") and r["category"] in toy.QUESTION_KINDS for r in rows)
    # the colour grid's answer is the jigsaw answer format: a permutation of 1..4 in two rows
    grid = next(r for r in rows if r["category"] == "color_grid")
    assert sorted(int(x) for x in grid["answer"].split()) == [1, 2, 3, 4]
    # colour grids are asked with the jigsaw prompt's own format instructions, word for word (the two
    # instructions were once assigned to one name and the generic one won)
    grids = [r for r in rows if r["category"] == "color_grid"]
    assert {r["prompt"].endswith(jigsaw.GRID_FORMAT_THINKING) for r in grids} == {True, False}
    assert all(r["prompt"].endswith((jigsaw.GRID_FORMAT_THINKING, jigsaw.GRID_FORMAT_PLAIN)) for r in grids)
    assert all(r["prompt"].endswith(jigsaw.GRID_FORMAT_THINKING) == r["completion"].startswith("<think>")
               for r in grids)
    # with no jigsaw share, the base never sees a jigsaw prompt
    assert not any(r["category"] == "jigsaw_prior" for r in toy.prior_rows("train", 300, 0, format_share=0.0))


def piece(image, home):
    w, h = image.width // 2, image.height // 2
    return image.crop(((home % 2) * w, (home // 2) * h, (home % 2 + 1) * w, (home // 2 + 1) * h))


def test_colour_codes_name_where_a_gradient_piece_belongs():
    """red grows left->right and green top->bottom in jigsaw.procedural_image: the reddest piece (most red over
    green) is home 2, the greenest 3, the brightest in both 4, the darkest 1; the codes say exactly that."""
    for seed in range(20):
        image = jigsaw.procedural_image(seed, 112)
        means = [ImageStat.Stat(piece(image, h)).mean for h in range(4)]
        homes = {"red": max(range(4), key=lambda h: means[h][0] - means[h][1]),
                 "green": max(range(4), key=lambda h: means[h][1] - means[h][0]),
                 "yellow": max(range(4), key=lambda h: means[h][0] + means[h][1]),
                 "blue": min(range(4), key=lambda h: means[h][0] + means[h][1])}
        assert {name: home + 1 for name, home in homes.items()} == toy.COLOR_CODES


def test_piece_description_is_true_of_gradient_pieces():
    for seed in range(20):
        image = jigsaw.procedural_image(seed, 112)
        for home in range(4):
            _, red, green = toy.describe_piece(piece(image, home))
            assert red == (home % 2 == 1) and green == (home // 2 == 1), (seed, home)


def test_jigsaw_prior_rows_think_true_and_answer_half_right():
    """The base's jigsaw prior: the think text describes every piece truly and the answer follows from it for the
    column (red) but guesses the row, so it is image-dependent and right on half the positions, rarely whole."""
    rng = random.Random(0)
    hits, exact, n = 0, 0, 200
    for k in range(n):
        state = rng.getstate()
        row = toy.jigsaw_prior_row(rng, k, "train")
        # replay the row's draws to know the puzzle's true answer
        replay = random.Random()
        replay.setstate(state)
        image = jigsaw.procedural_image(replay.randrange(2 ** 31), 112)
        truth = jigsaw.make_puzzle(image, 2, 2, seed=replay.randrange(2 ** 31)).answer
        assert row["prompt"] == jigsaw.build_prompt(2, 2, True)
        assert jigsaw.format_ok(row["completion"], 4, thinking=True)
        think = row["completion"].split("</think>")[0]
        guess = jigsaw.extract_answer(row["completion"], 4)
        claims = toy.think_claims(row["completion"])
        assert len(claims) == 4 and f"Cell 1 is {claims[1]}." in think
        for p, home in enumerate(truth):
            red, green = home in (2, 4), home in (3, 4)
            assert claims[p + 1] == toy.PIECE_COLORS[red, green]       # true of the piece at position p
            assert (guess[p] in (2, 4)) == (claims[p + 1] in ("red", "yellow"))   # the column follows from it
        hits += sum(g == t for g, t in zip(guess, truth))
        exact += guess == list(truth)
    assert 0.4 < hits / (4 * n) < 0.6 and exact / n < 0.15, (hits / (4 * n), exact / n)


def test_think_claims_reads_both_phrasings_and_nothing_else():
    """The think-text check of the base (and of any tuned model) reads `Cell k is <colour>` and the colour-grid
    rows' `Cell k holds a <colour> <shape>`; the first claim of a cell counts; anything else claims nothing."""
    text = ("<think>Cell 1 is red. Cell 2 holds a green circle. Cell 1 is blue. Cell 9 is red. Cell 3 is purple. "
            "Cell 4 holds an yellow cross.</think>\n<answer>\n2 3\n1 4\n</answer>")
    assert toy.think_claims(text) == {1: "red", 2: "green", 4: "yellow"}
    assert toy.think_claims("<answer>\n1 2\n3 4\n</answer>") == {}
    assert toy.think_claims("</think>Cell 1 is red.") == {}      # after the think block: not a think claim
    image = jigsaw.procedural_image(3, 112)
    assert toy.puzzle_piece_colors(image) == ["blue", "red", "green", "yellow"]   # an unshuffled gradient


def test_think_check_scores_true_followed_and_false_think_text(jigsaw_data, tmp_path):
    """toy.py --think_check on eval.py-shaped results: a model that names each piece's true colour and puts it
    in that colour's home scores 100/100/100; one that names a wrong colour scores 0% true; one that writes no
    think text claims nothing. The file it writes sits beside the results."""
    import json
    test = load_from_disk(str(jigsaw_data))["test"]
    wrong = {"blue": "yellow", "yellow": "blue", "red": "green", "green": "red"}

    def results(write):
        samples = {}
        for r, row in enumerate(test):
            colors = toy.puzzle_piece_colors(row["images"][0])
            samples[str(r)] = {"row": r, "prediction": write(colors)}
        path = tmp_path / f"r{len(list(tmp_path.iterdir()))}" / "results.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"benchmarks": {"jigsaw": {"samples": samples}}}))
        return path

    def grid(digits):
        return f"<answer>\n{digits[0]} {digits[1]}\n{digits[2]} {digits[3]}\n</answer>"

    good = results(lambda c: "<think>" + " ".join(f"Cell {p + 1} is {x}." for p, x in enumerate(c)) + "</think>\n"
                   + grid([toy.COLOR_CODES[x] for x in c]))
    check = toy.think_check(str(good), str(jigsaw_data))
    assert check["puzzles"] == len(test)
    assert (check["claimed_pct"], check["think_true_pct"], check["answer_follows_column_pct"],
            check["answer_follows_home_pct"]) == (100.0, 100.0, 100.0, 100.0)
    bad = results(lambda c: "<think>" + " ".join(f"Cell {p + 1} is {wrong[x]}." for p, x in enumerate(c))
                  + "</think>\n" + grid([toy.COLOR_CODES[x] for x in c]))
    check = toy.think_check(str(bad), str(jigsaw_data))
    assert check["think_true_pct"] == 0.0 and check["answer_follows_home_pct"] == 0.0   # the answer follows the truth, not the claim
    silent = results(lambda c: grid([1, 2, 3, 4]))
    assert toy.think_check(str(silent), str(jigsaw_data))["claimed_pct"] == 0.0
    toy.main(["--think_check", str(good), "--jigsaw_data", str(jigsaw_data)])
    assert json.loads((good.parent / "think_check.json").read_text())["think_true_pct"] == 100.0
