"""report.py's prior-knowledge part: the table of changes from the base model (strict, with the lenient score
next to it), the mean over percentage benchmarks only, and the base model against the published figures."""
import json
import re

import pytest

import report

# The paper's 7B changes from base (paper.md); base values are made up but plausible.
BASE_7B = {"refcoco": 90.0, "docvqa": 94.0, "mme": 2300.0, "mmstar": 40.0, "pope": 86.0}
PAPER_DELTAS = {"rft": {"refcoco": -0.6, "docvqa": 0.0, "mme": -8, "mmstar": 1.7, "pope": -0.2},
                "sft_non_rea": {"refcoco": -57.2, "docvqa": -27.4, "mme": -1854, "mmstar": -62.8, "pope": -69.9},
                "sft_rea_external": {"refcoco": -37.5, "docvqa": -2.3, "mme": -249, "mmstar": -3.7, "pope": -12.1},
                "sft_rea_grpo_rollout": {"refcoco": -8.6, "docvqa": -0.9, "mme": -126, "mmstar": -2.4, "pope": -3.1}}
HEADLINE = {"refcoco": "acc@0.5", "docvqa": "anls", "mme": "total", "mmstar": "accuracy", "pope": "accuracy"}


def _results(model: str, values: dict, lenient_shift: float = 0.0, **settings) -> dict:
    benchmarks_ = {}
    for name, value in values.items():
        metric = HEADLINE.get(name, "accuracy")
        benchmarks_[name] = {"headline": metric, "unit": "/2800" if name == "mme" else "%",
                             "metrics": {metric: value, "num_samples": 100},
                             "metrics_lenient": {metric: value + lenient_shift, "num_samples": 100},
                             "num_samples": 100, "settings": {"min_pixels": 200704, "max_pixels": 1605632,
                                                              "max_new_tokens": 16, "limit": 0, **settings}}
    return {"model": model, "benchmarks": benchmarks_}


def _write_run(tmp_path, base_model="Qwen/Qwen2.5-VL-7B-Instruct", base=BASE_7B, deltas=PAPER_DELTAS):
    run = tmp_path / "run"
    (run / "eval" / "base").mkdir(parents=True)
    (run / "eval" / "base" / "results.json").write_text(json.dumps(_results(base_model, base)))
    for method, change in deltas.items():
        (run / "eval" / method).mkdir(parents=True)
        values = {k: base[k] + change[k] for k in change}
        (run / "eval" / method / "results.json").write_text(json.dumps(_results(base_model, values, lenient_shift=5)))
    return run


def test_mean_of_percentages_leaves_mme_out(tmp_path):
    run = _write_run(tmp_path)
    results = {m: report.read_json(run / "eval" / m / "results.json") for m, _ in report.METHODS}
    lines, mean_delta = report.prior_section(run, results, run)
    assert mean_delta["sft_non_rea"] == pytest.approx(-54.325)       # (-57.2 - 27.4 - 62.8 - 69.9) / 4
    assert mean_delta["rft"] == pytest.approx((-0.6 + 0.0 + 1.7 - 0.2) / 4)
    text = "\n".join(lines)
    assert "-54.3" in text and "-414.3" not in text
    row = next(l for l in lines if l.startswith("| mme |"))
    assert "(/2800)" in row and "(-1854.0)" in row
    assert (run / "report" / "compare.png").stat().st_size > 1000
    saved = json.loads((run / "report" / "compare.json").read_text())
    assert saved["tables_use"] == "strict" and saved["mean_delta_percent"]["sft_non_rea"] == pytest.approx(-54.325)


def test_table_shows_strict_with_delta_next_to_lenient(tmp_path):
    run = _write_run(tmp_path)
    results = {m: report.read_json(run / "eval" / m / "results.json") for m, _ in report.METHODS}
    lines, _ = report.prior_section(run, results, run)
    row = next(l for l in lines if l.startswith("| pope |"))
    # SFT-Non-Rea: strict 86 - 69.9 = 16.1 (Δ -69.9); lenient 21.1 (Δ lenient vs base lenient 86: -64.9)
    assert "16.1 (-69.9) | 21.1 (-64.9)" in row
    assert any("use the strict scores" in l for l in lines)


def test_base_far_from_published_figures_is_flagged(tmp_path):
    run = _write_run(tmp_path)
    results = {m: report.read_json(run / "eval" / m / "results.json") for m, _ in report.METHODS}
    lines = report.published_section(results)
    rows = {l.split("|")[1].strip(): l for l in lines if l.startswith("| ") and not l.startswith("| benchmark")}
    assert "close" in rows["refcoco"] and "90.0" in rows["refcoco"]             # published 7B: 90.0
    assert "FAR OFF" in rows["mmstar"] and "63.9" in rows["mmstar"]            # measured 40 vs 63.9
    assert "no published figures" in rows["mme"] and "no published figures" in rows["pope"]
    assert "pixels 200704-1605632 (lmms-eval default)" in rows["docvqa"] and "test split" in rows["docvqa"]
    assert any("Warning" in l and "mmstar" in l for l in lines)
    assert report.far_off(51.3, 58.6, "%") and not report.far_off(2300, 2200, "/2800")


def test_toy_run_says_no_published_figures(tmp_path):
    run = _write_run(tmp_path, base_model="runs/toy/base/final", base={"toy_prior": 70.0},
                     deltas={"sft_non_rea": {"toy_prior": -20.0}})
    out = run / "report.md"
    report.main(["--run_dir", str(run), "--preset", "toy"])
    text = out.read_text()
    assert re.search(r"^\| toy_prior \| accuracy \| 70\.0 \| - \| - \| - \| \| no published figures \|", text, re.M)
    assert "(-20.0)" in text
