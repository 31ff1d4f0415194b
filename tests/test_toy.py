"""The toy world's prior-knowledge data: what each split holds is what run_all.sh's two base stages rely on."""
from datasets import load_from_disk

import toy


def test_prior_splits(prior_data):
    data = load_from_disk(str(prior_data))
    assert set(data) == {"pretrain", "train", "test"}
    # pretrain: direct questions only, one-word answers (perception first, no format to learn)
    for row in data["pretrain"]:
        assert row["category"] in toy.QUESTION_KINDS
        assert row["completion"] == row["answer"] and "<" not in row["completion"]
    # test: asked like a benchmark, never in think format, no colour grids
    assert all(r["category"] in toy.QUESTION_KINDS and "<think>" not in r["completion"] for r in data["test"])


def test_instruction_mix_has_every_kind_of_row():
    rows = toy.prior_rows("train", 200, 0, format_share=0.1)
    categories = {r["category"] for r in rows}
    assert {"color_grid", "jigsaw_format"} <= categories and set(toy.QUESTION_KINDS) <= categories
    assert any(r["completion"].startswith("<think>") and r["category"] in toy.QUESTION_KINDS for r in rows)
    # the colour grid's answer is the jigsaw answer format: a permutation of 1..4 in two rows
    grid = next(r for r in rows if r["category"] == "color_grid")
    assert sorted(int(x) for x in grid["answer"].split()) == [1, 2, 3, 4]
