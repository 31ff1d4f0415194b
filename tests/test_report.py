"""report.py's pure readers: forgetting at equal skill along hand-made checkpoint curves, and the learning-dynamics
section rendered from a dynamics.json."""
import pytest

import report


def test_value_at_accuracy_interpolates_at_the_first_crossing():
    curve = [(0, 0.0, 90.0), (10, 20.0, 80.0), (20, 60.0, 40.0), (30, 50.0, 30.0), (40, 80.0, 20.0)]
    assert report.value_at_accuracy(curve, 40.0) == pytest.approx(60.0)   # halfway between 80 and 40
    assert report.value_at_accuracy(curve, 20.0) == pytest.approx(80.0)   # exactly at a checkpoint
    assert report.value_at_accuracy(curve, 55.0) == pytest.approx(45.0)   # first crossing, not the later one
    assert report.value_at_accuracy(curve, 70.0) == pytest.approx(30 - 10 * 20 / 30)  # the 50 -> 80 segment
    assert report.value_at_accuracy(curve, 90.0) is None                  # never reached
    assert report.value_at_accuracy(curve, 0.0) == 90.0                   # the base already has it


def test_matched_forgetting_reads_every_method_at_the_same_accuracy():
    curves = {"rft": [(0, 2.0, 90.0), (50, 30.0, 89.0), (100, 60.0, 88.0)],
              "sft": [(0, 2.0, 90.0), (10, 80.0, 50.0), (20, 100.0, 40.0)]}
    levels = report.common_levels(curves, count=2)
    assert levels == [31.0, 60.0]  # up to the smaller best accuracy (RFT's 60), above the base's 2
    table = report.matched_forgetting(curves, levels)
    assert table["rft"][60.0] == pytest.approx(2.0)
    # SFT at 31%: between (2, 90) and (80, 50): 90 - 40 * 29/78
    assert table["sft"][31.0] == pytest.approx(40 * 29 / 78)
    assert table["sft"][60.0] == pytest.approx(40 * 58 / 78)
    assert report.common_levels({"a": [(0, 5.0, 1.0)], "b": [(0, 5.0, 1.0), (1, 9.0, 0.0)]}) == []


def test_prior_score_is_the_mean_of_percentage_benchmarks():
    results = {"benchmarks": {"jigsaw": {"metrics": {"accuracy": 50.0}, "unit": "%", "headline": "accuracy"},
                              "pope": {"metrics": {"accuracy": 80.0}, "unit": "%", "headline": "accuracy"},
                              "mmstar": {"metrics": {"accuracy": 60.0}, "unit": "%", "headline": "accuracy"},
                              "mme": {"metrics": {"total": 2000.0}, "unit": "/2800", "headline": "total"}}}
    assert report.prior_score(results) == pytest.approx(70.0)
    assert report.jigsaw_accuracy(results) == 50.0


def _results(acc, prior):
    return {"benchmarks": {"jigsaw": {"metrics": {"accuracy": acc}, "headline": "accuracy", "unit": "%"},
                           "toy_prior": {"metrics": {"accuracy": prior}, "headline": "accuracy", "unit": "%"}}}


def test_frontier_section_reads_the_checkpoint_evaluations(tmp_path):
    import json
    run = tmp_path / "run"

    def write(path, obj):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))
    write(run / "eval" / "base" / "results.json", _results(0.0, 90.0))
    write(run / "eval" / "rft" / "checkpoint-10" / "results.json", _results(20.0, 89.0))
    write(run / "eval" / "rft" / "results.json", _results(40.0, 88.0))
    write(run / "eval" / "sft_non_rea" / "checkpoint-5" / "results.json", _results(80.0, 50.0))
    write(run / "eval" / "sft_non_rea" / "results.json", _results(100.0, 40.0))
    for method, steps in (("rft", 20), ("sft_non_rea", 10)):
        (run / method).mkdir(parents=True)
        (run / method / "metrics.jsonl").write_text(json.dumps({"step": steps}) + "\n")
    write(run / "analysis" / "dynamics.json", {"tracking": {
        "rft": {"labels": ["base", "checkpoint-10", "final"], "task_kl": [0.0, 0.1, 0.2]},
        "sft_non_rea": {"labels": ["base", "checkpoint-5", "final"], "task_kl": [0.0, 2.0, 3.0]}}})
    results = {"base": json.loads((run / "eval" / "base" / "results.json").read_text())}
    text = "\n".join(report.frontier_section(run, results, run))
    # levels up to 40% (RFT's best); SFT at 40%: half-way from (0, 90) to (80, 50) -> forgetting 20
    assert "forgetting at 40.0% jigsaw" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| rft") or
            line.startswith("| sft_non_rea")}
    assert rows["rft"].split("|")[4].strip() == "2.0"
    # SFT jumped from 0% to 80% between two checkpoints: its value at 40% is a straight line, and says so
    assert rows["sft_non_rea"].split("|")[4].strip() == "20.0*" and "more than 25 jigsaw points apart" in text
    assert "over 4 checkpoints" in text and (run / "report" / "frontier.png").exists()


def test_no_report_for_a_missing_or_empty_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for run in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(SystemExit) as err:
            report.main(["--run_dir", str(run)])
        assert err.value.code == 2 and "no run folder" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "report.md").exists()


def test_seeds_section_shows_mean_and_spread(tmp_path):
    import json
    run = tmp_path / "run"

    def write(path, obj):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))
    for folder, rft_acc in ((run, 40.0), (run / "seed1", 60.0)):
        write(folder / "eval" / "base" / "results.json", _results(0.0, 90.0))
        write(folder / "eval" / "rft" / "results.json", _results(rft_acc, 88.0))
        write(folder / "eval" / "sft_non_rea" / "results.json", _results(100.0, 40.0))
    lines, seeds = report.seeds_section(run, None)
    text = "\n".join(lines)
    assert seeds == 2
    assert "| rft | 50.0 ± 14.1 (40.0..60.0, 2 seeds) | -2.0 ± 0.0 (-2.0..-2.0, 2 seeds) |" in text
    assert report.seeds_section(tmp_path / "run" / "seed1", None) == ([], 1)  # one folder: no section


def test_environment_names_the_cpu_and_its_kernels_and_the_report_shows_them(tmp_path):
    # Another CPU trains another toy base (README, the toy run): a run's record must say which CPU it ran on.
    import runs
    env = runs.environment()
    line = "\n".join(report.environment_block(tmp_path, {"base": {"environment": env}}))
    assert env["device"] in line
    if not env["cuda"]:   # on a GPU the device is the GPU's name and the CPU's kernels do not matter
        assert env["cpu_capability"] and env["device"].startswith("cpu (") and env["device"] != "cpu ()"
        assert f"{env['cpu_capability']} kernels" in line
    assert f"{env['torch_threads']} torch threads" in line


def _dynamics():
    """A dynamics.json as analyze.py writes it (the keys the section reads): one source with gradients and exact
    steps, one probe-only source without them."""
    full = {"n": 4, "perplexity": 12.3456, "cosine": {"mean": -0.12345}, "cosine_positive_share": 0.25,
            "first_order": {"mean": -0.0086512}, "exact_delta": {"mean": -0.031},
            "lbk": {"mean": 6.85e-06, "std": 4.3e-07}, "calibration": {"pearson": 0.86666}}
    return {"config": {"model": "runs/toy/base", "probes": "runs/toy/prior", "probe_split": "test",
                       "probe_answer": "greedy", "eta": 0.0001},
            "n_probes": 4, "gradients": {"mode": "projected", "dims": 16128},
            "sources": {"non_rea": full, "rea_external": {"n": 4, "perplexity": float("nan")}},
            "symmetry": {"n": 8, "pearson": 0.99951, "sign_agreement": 0.75, "median_relative_asymmetry": 0.0391},
            "calibration": {"n": 16, "pearson": float("nan"), "sign_agreement": 1.0, "slope": 2.7912},
            "tracking": {"rft": {"steps": [0, 10, 20], "mean_logprob": [-3.0, -3.25, -3.5]}},
            "figures": {"probe_logprob": "probe_logprob.png", "lbk": "lbk.png"}}


def test_dynamics_section_is_rendered_from_dynamics_json(tmp_path):
    import json
    run = tmp_path / "run"
    (run / "analysis").mkdir(parents=True)
    (run / "analysis" / "dynamics.json").write_text(json.dumps(_dynamics()))
    lines, dynamics = report.dynamics_section(run, run)
    text = "\n".join(lines)
    assert dynamics["n_probes"] == 4 and lines[:4] == ["## 5. Learning dynamics", "", "### Learning dynamics", ""]
    assert ("4 probes from `runs/toy/prior` (test, greedy answers); one SGD step of eta = 0.0001 on a training "
            "sample's SFT loss. Gradients: projected (16,128 dims).") in text
    assert "| non_rea | 4 | 12.3 | -0.123 | 25% | -0.00865 | -0.031 | 6.85e-06 ± 4.3e-07 | 0.867 |" in lines
    assert "| rea_external | 4 | – | – | – | – | – | – ± – | – |" in lines     # NaN and absent alike
    assert ("Pearson 1.000, sign agreement 75%, median relative asymmetry 0.039 over 8 pairs." in text
            and "(16 pairs): Pearson –, sign agreement 100%, slope exact ≈ 2.79 × first-order." in text)
    assert "| rft | 2 | 10–20 | -3 | -3.5 | -0.5 |" in lines
    # figures in a fixed order, linked from report.md's folder; the section ends with one blank line
    assert lines[-3:] == ["![LBK per source](analysis/lbk.png)",
                          "![Probe log-probs over training](analysis/probe_logprob.png)", ""]
    elsewhere, _ = report.dynamics_section(run, tmp_path / "out" / "md")
    assert "![LBK per source](../../run/analysis/lbk.png)" in elsewhere
    probe_only = {k: v for k, v in _dynamics().items() if k not in ("gradients", "symmetry", "calibration", "figures")}
    (run / "analysis" / "dynamics.json").write_text(json.dumps(probe_only))
    text = "\n".join(report.dynamics_section(run, run)[0])
    assert "Gradients: not computed." in text and "Symmetry" not in text and "![" not in text
    assert report.dynamics_section(tmp_path / "none", tmp_path)[0][2] == "(analysis/dynamics.json was not written)"


def test_fmt_cells():
    assert report.fmt(None) == "-" and report.fmt(float("nan"), missing="–") == "–"
    assert report.fmt(2.345) == "2.3" and report.fmt(12, 0) == "12" and report.fmt(-0.26, signed=True) == "-0.3"
    assert report.fmt(1.5, signed=True) == "+1.5" and report.fmt(0.25, spec=".0%") == "25%"
    assert report.fmt(0.000123456, spec=".3g") == "0.000123"


# ----------------------------------------------------------------------------------------------------------
# Concluding only from a resolved comparison, on the same rows
# ----------------------------------------------------------------------------------------------------------
def _write(path, obj):
    import json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _gated_run(tmp_path, top_gain):
    """Hand-made curves on 200 puzzles: the base at 2% jigsaw, RFT's best at 2 + top_gain (the top common level),
    SFT-Non-Rea far above; RFT forgets 1 point, SFT-Non-Rea 30 at RFT's best accuracy."""
    run = tmp_path / f"run{top_gain}"

    def results(acc, prior):
        out = _results(acc, prior)
        out["benchmarks"]["jigsaw"]["num_samples"] = 200
        return out
    _write(run / "eval" / "base" / "results.json", results(2.0, 90.0))
    _write(run / "eval" / "rft" / "checkpoint-10" / "results.json", results(2.0 + top_gain / 2, 89.5))
    _write(run / "eval" / "rft" / "results.json", results(2.0 + top_gain, 89.0))
    _write(run / "eval" / "sft_non_rea" / "checkpoint-1" / "results.json", results(2.0 + top_gain, 60.0))
    _write(run / "eval" / "sft_non_rea" / "results.json", results(90.0, 40.0))
    return run


@pytest.mark.parametrize("top_gain,concluded", [(1.0, False), (30.0, True)])
def test_conclusions_need_a_resolved_top_level(tmp_path, top_gain, concluded):
    import json
    run = _gated_run(tmp_path, top_gain)
    results = {"base": json.loads((run / "eval" / "base" / "results.json").read_text())}
    matched = {}
    report.frontier_section(run, results, run, matched)
    assert matched["levels"][-1] == pytest.approx(2.0 + top_gain) and matched["jigsaw_rows"] == 200
    accuracy = {"base": 2.0, "rft": 2.0 + top_gain, "sft_non_rea": 90.0}
    text = "\n".join(report.conclusions(accuracy, {"rft": -1.0, "sft_non_rea": -50.0}, {}, "3b", matched))
    if concluded:
        assert "**At equal skill**" in text and "agrees with the paper's finding 1" in text, text
        assert "No comparison" not in text and "30.0 points" in text
    else:
        assert "**No comparison at equal skill**" in text and "1.0 points above the base's 2.0%" in text, text
        assert "rft 3.0%" in text and "sft_non_rea 90.0%" in text          # each method's best accuracy
        assert "agrees" not in text and "no verdict" in text                # finding 1 gets numbers, no verdict
    if concluded:   # enough points, too few puzzles to resolve them: on 8 puzzles 30 points are within the noise
        resolved, why = report.comparison_resolved({**matched, "jigsaw_rows": 8})
        assert not resolved and "within two standard errors" in why


def _records(name, correct, ids):
    if name == "jigsaw":
        return {i: {"id": i, "score": {"acc": float(c), "hit": float(c), "fmt": 1.0, "parsed": True}}
                for i, c in zip(ids, correct)}
    meta = {"mmstar": lambda i: {"category": "coarse perception", "l2_category": "x"},
            "mme": lambda i: {"category": "color", "question_id": f"img{i}"}}[name]
    return {i: {"id": i, "score": {"correct": bool(c), "parsed": True}, "meta": meta(i)} for i, c in zip(ids, correct)}


def test_every_point_of_the_frontier_is_scored_on_the_same_rows(tmp_path):
    """The base and the final model were scored on 6 rows of each benchmark (EVAL_LIMIT), the checkpoint on 3 of
    them (CHECKPOINT_EVAL_LIMIT, a nested subset): every point is read on those 3 rows, MMStar and MME included."""
    import benchmarks
    run = tmp_path / "run"
    every, few = [str(i) for i in range(6)], ["0", "2", "4"]

    def results(correct, ids):
        out = {"benchmarks": {}}
        for name in ("jigsaw", "mmstar", "mme"):
            bench = benchmarks.get(name)
            samples = _records(name, correct, ids)
            out["benchmarks"][name] = {"headline": bench.headline, "unit": bench.unit, "samples": samples,
                                       "metrics": bench.aggregate(list(samples.values())), "num_samples": len(ids)}
        return out
    base = results([1, 1, 1, 0, 0, 0], every)     # 50% on 6 rows, 66.7% on rows 0, 2, 4
    _write(run / "eval" / "base" / "results.json", base)
    _write(run / "eval" / "rft" / "checkpoint-5" / "results.json", results([1, 0, 1], few))
    _write(run / "eval" / "rft" / "results.json", results([0, 1, 1, 1, 1, 1], every))
    info = {}
    curves = report.method_curves(run, base, info)
    assert info == {"aligned": True, "rows": {"jigsaw": 3, "mmstar": 3, "mme": 3}}
    assert [round(acc, 1) for _, acc, _, _ in curves["rft"]] == [66.7, 66.7, 66.7]   # base, checkpoint-5, final
    assert [round(prior, 1) for _, _, prior, _ in curves["rft"]] == [66.7, 66.7, 66.7]   # MMStar on the same rows
    assert report.jigsaw_accuracy(base) == 50.0            # the recorded 6-row figure is not what the curve reads
    # without per-sample records the points cannot be aligned, and the section says so
    assert report.common_rows([base, {"benchmarks": {"jigsaw": {"metrics": {}}}}]) is None


def test_the_teacher_arm_and_arms_trained_on_few_rows_are_named(tmp_path):
    run = tmp_path / "run"
    assert "stand-in" in report.paper_names(run)["sft_rea_external"]
    _write(run / "data" / "sources" / "rea_external" / "stats.json", {"source_checkpoint": "teacher:gpt-4o",
                                                                        "rows_kept": 4000})
    assert report.paper_names(run)["sft_rea_external"] == "SFT-Rea-4o arm, traces by gpt-4o"
    # SFT-Rea-GRPO-Rollout read 800 rows of a 40-row source (20 passes); the teacher's 4,000 rows once
    _write(run / "data" / "sources" / "rea_grpo_rollout" / "stats.json", {"rows_kept": 40})
    for method in ("sft_rea_grpo_rollout", "sft_rea_external"):
        _write(run / method / "run.json", {"settings": {"max_steps": 200, "batch_size": 4, "grad_accum": 1}})
    repeats = report.source_repeats(run)
    assert repeats == {"sft_rea_grpo_rollout": (40, 800), "sft_rea_external": (4000, 800)}
    text = "\n".join(report.conclusions({}, {}, {}, "3b", None, 1, repeats, "2x2"))
    assert "sft_rea_grpo_rollout trained on 40 distinct rows read 800 times in all (~20 times each)" in text
    assert "sft_rea_external trained on" not in text and "This run's puzzles are 2x2" in text
