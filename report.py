"""Write report.md for a finished run_all.sh run: the paper's tables and figures, for whatever preset ran.

Reads what the stages wrote under --run (nothing is hard-coded; every sentence is computed from the files) and
writes report.md with its figures under report/ (compare.png/.json: the changes from the base model):
    eval/<method>/results.json        jigsaw accuracy and prior-knowledge benchmarks (eval.py)
    <method>/metrics.jsonl            training curves and step counts (sft.py, rft.py)
    data/sources/*                    SFT data sources, their statistics and perplexity (rollout_sft.py)
    analysis/dynamics.json            learning dynamics (analyze.py), with its PNG figures
    settings.json                     the preset's variables (run_all.sh)

    python report.py --run_dir runs/toy --preset toy       # writes runs/toy/report.md
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import common
import experiment
import files

# (folder / results name, the paper's name for it), in the report's order: experiment.py's table
METHODS = [(m.name, m.paper_name) for m in experiment.METHODS]


@dataclass
class Args:
    run_dir: str = "runs/toy"
    """the run folder run_all.sh wrote (RUN)"""
    preset: str = "toy"
    """the preset's name, for the title"""
    output_dir: str = ""
    """where report.md goes (empty: --run_dir; figures are linked relative to it)"""


UNREADABLE_FIX = ("Rerun the stage that writes it (run_all.sh --only STAGE), or move the file away if that stage "
                  "never finished; a method is shown as not run only when its file is absent.")


def read_json(path: Path):
    """A file a stage wrote, or None when there is none. One that exists but cannot be read (not UTF-8, not
    JSON, not an object) stops the report, naming it: shown as "-" it would read as a method that never ran."""
    if not path.exists():
        return None
    return common.read_json(path, UNREADABLE_FIX)


def read_metrics(path: Path) -> list[dict]:
    return files.read_jsonl(path, UNREADABLE_FIX)


def fmt(value, digits: int = 1, signed: bool = False, spec: str = "", missing: str = "-") -> str:
    """A number in a table cell: `digits` decimals (with its sign when `signed`), or a format spec ('.3g',
    '.0%'); `missing` for None or NaN. fmt(-0.5, signed=True) -> '-0.5'; fmt(0.25, spec='.0%') -> '25%'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec or (f"+.{digits}f" if signed else f".{digits}f"))


def training_steps(run: Path, method: str) -> int | None:
    if method == "base":
        return 0
    metrics = read_metrics(run / method / "metrics.jsonl")
    steps = [m["step"] for m in metrics if isinstance(m.get("step"), int)]
    return max(steps) if steps else None


# ----------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------
def training_curves(run: Path, out_png: Path) -> bool:
    """RFT reward and accuracy, and every SFT run's loss, over training steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rft = read_metrics(run / "rft" / "metrics.jsonl")
    sft = {m: read_metrics(run / m / "metrics.jsonl") for m, _ in METHODS if m.startswith("sft")}
    if not rft and not any(sft.values()):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("reward", "reward (mean)"), ("accuracy", "accuracy (rollouts)"), ("eval_accuracy", "test accuracy")):
        points = [(m["step"], m[key]) for m in rft if key in m and m[key] is not None]
        if points:
            axes[0].plot(*zip(*points), label=label)
    axes[0].set_title("RFT (GRPO)")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=8)
    for name, metrics in sft.items():
        points = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
        if points:
            axes[1].plot(*zip(*points), label=name)
    axes[1].set_title("SFT loss")
    axes[1].set_xlabel("step")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    with files.atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------
def paper_names(run: Path) -> dict[str, str]:
    """The paper's name of every method; SFT-Rea-External is the paper's SFT-Rea-4o arm only when a real teacher
    wrote its traces (run_all.sh's TEACHER_URL / TEACHER_MODEL: stats.json's source_checkpoint teacher:<model>)."""
    names = dict(METHODS)
    for src in experiment.SOURCES:
        made_by = str((read_json(run / "data" / "sources" / src.name / "stats.json") or {}).get("source_checkpoint", ""))
        if src.made_from == "teacher" and made_by.startswith("teacher:"):
            names[src.method] = f"SFT-Rea-4o arm, traces by {made_by.split(':', 1)[1]}"
    return names


def jigsaw_section(run: Path, results: dict) -> tuple[list[str], dict]:
    settings = read_json(run / "settings.json") or {}
    names = paper_names(run)
    lines = ["## 1. The new task: jigsaw accuracy", "",
             "| method | paper name | training steps | exact accuracy (%) | hit rate (%) | format rate (%) | samples |",
             "|---|---|---|---|---|---|---|"]
    accuracy = {}
    for method, paper_name in names.items():
        metrics = (results.get(method) or {}).get("benchmarks", {}).get("jigsaw", {}).get("metrics", {})
        accuracy[method] = metrics.get("accuracy")
        lines.append(f"| {method} | {paper_name} | {fmt(training_steps(run, method), 0)} | "
                     f"{fmt(metrics.get('accuracy'))} | {fmt(metrics.get('hit_rate'))} | "
                     f"{fmt(metrics.get('format_rate'))} | {fmt(metrics.get('num_samples'), 0)} |")
    check = read_json(run / "base_check" / "base_check.json")
    if check and check.get("answer_image_mi") is not None:
        lines += ["", f"Base check (base_check.py, {check.get('answer_mi_puzzles')} test puzzles, "
                  f"{check.get('answer_mi_candidates')} candidate answers each): MI(answer; image) "
                  f"{check['answer_image_mi']:.3f} nats, p(true answer) {check['answer_p_true']:.3f} against "
                  f"{check['answer_p_chance']:.3f} by chance, greedy hit rate {100 * check['eval_hit']:.1f}%. An answer "
                  "that does not depend on the image (MI ~ 0) leaves GRPO nothing to reinforce."]
    checks = {m: read_json(run / "eval" / m / "think_check.json") for m, _ in METHODS}
    if any(checks.values()):
        lines += ["", "What the think text says about the pieces (toy world: `toy.py --think_check` on the greedy "
                  "jigsaw completions above; per cell that the think text names a colour for):", "",
                  "| method | cells claimed (%) | claim true (%) | answer follows its column (%) | "
                  "answer follows its home (%) |", "|---|---|---|---|---|"]
        lines += [f"| {m} | {fmt(c.get('claimed_pct'))} | {fmt(c.get('think_true_pct'))} | "
                  f"{fmt(c.get('answer_follows_column_pct'))} | {fmt(c.get('answer_follows_home_pct'))} |"
                  for m, c in checks.items() if c]
        lines += ["", "Chance: a claim is true 25% of the time, an answer in the claimed colour's column 50%, in its "
                  "home cell 25%. A base whose think text is true and whose answer follows it is the partly right "
                  "behaviour GRPO can reinforce."]
    grid = str(settings.get("GRID", ""))
    lines += ["", "Paper (Qwen2.5-VL, 3x3): base 0%; RFT 66% (3B) / 75% (7B) after 27,360 steps; SFT-Non-Rea 53% / 80% "
              "after 200 / 400 steps; SFT-Rea-4o 70% / 78%; SFT-Rea-GRPO-Rollout 70% / 81%."
              + (f" This run's puzzles are {grid}, so the paper's 3x3 figures are not its targets." if grid
                 and grid != "3x3" else ""), ""]
    pilot = read_json(run / "pilot" / "pilot.json")
    if pilot and pilot.get("decision", {}).get("base") is not None:
        d = pilot["decision"]
        state = "passed" if pilot.get("passed") else ("not passed, run on with IGNORE_PILOT=1" if pilot.get("ignored")
                                                      else "not passed")
        lines += [f"Pilot (pilot.py, the first {pilot['measured']['steps']} RFT steps): greedy exact accuracy "
                  + ", ".join(f"{acc:.1f}% at step {step}" for step, acc in pilot["measured"]["points"])
                  + f"; the straight line through them reaches {d['projected']:.1f}% by step {d['rft_steps']} against "
                  f"the {d['target']:.1f}% it needed (base + {d['min_gain']:g}): {state}.", ""]
    return lines, accuracy


# ----------------------------------------------------------------------------------------------------------
# Prior knowledge: changes from the base model (strict and lenient), and the base model vs published figures
# ----------------------------------------------------------------------------------------------------------
def benchmark_info(name: str, entries: list[dict]) -> dict:
    """headline / unit / published figures of a benchmark: from the results files (eval.py writes them), else
    from the benchmarks registry (results written before eval.py recorded them)."""
    info = {}
    try:
        import benchmarks
        bench = benchmarks.get(name)
    except ImportError:
        bench = None
    if bench is not None:
        info = {"headline": bench.headline, "unit": bench.unit, "published": bench.published,
                "published_source": bench.published_source, "published_note": bench.published_note,
                "paper_base": bench.paper_base, "min_pixels": bench.min_pixels, "max_pixels": bench.max_pixels,
                "max_new_tokens": bench.max_new_tokens}
    for entry in entries:
        for key in ("headline", "unit", "published", "published_source", "published_note", "paper_base"):
            if entry.get(key) not in (None, "", {}):
                info[key] = entry[key]
    info.setdefault("headline", "accuracy")
    info.setdefault("unit", "%")
    return info


def compare_rows(results: dict) -> list[dict]:
    """One row per benchmark: the headline metric of every method, strict ("metrics", the official reading)
    and lenient ("metrics_lenient"), with its change from the base model. Pure function of the results files."""
    methods = [m for m, _ in METHODS if results.get(m)]
    names = []
    for m in methods:
        names += [b for b in results[m].get("benchmarks", {}) if b not in names]
    rows = []
    for name in names:
        entries = {m: results[m]["benchmarks"][name] for m in methods if name in results[m].get("benchmarks", {})}
        info = benchmark_info(name, list(entries.values()))
        metric = info["headline"]
        values = {m: e.get("metrics", {}).get(metric) for m, e in entries.items()}
        lenient = {m: e.get("metrics_lenient", {}).get(metric) for m, e in entries.items()}
        counts = {m: e.get("num_samples", e.get("metrics", {}).get("num_samples")) for m, e in entries.items()}

        def deltas(table):
            base = table.get("base")
            return {m: (v - base if base is not None and v is not None else None) for m, v in table.items()
                    if m != "base"}
        rows.append({"benchmark": name, "metric": metric, "unit": info["unit"], "values": values,
                     "deltas": deltas(values), "values_lenient": lenient, "deltas_lenient": deltas(lenient),
                     "num_samples": counts, "same_samples": len(set(counts.values())) <= 1})
    return rows


def mean_percent_delta(rows: list[dict], method: str, key: str = "deltas") -> float | None:
    """Mean change over benchmarks whose headline is a percentage (unit '%'): MME (/2800) and OCRBench (/1000)
    would dominate a plain mean (with the paper's 7B deltas, SFT-Non-Rea: -54.3 over the four %, -414.3 with MME)."""
    deltas = [r[key].get(method) for r in rows if r["unit"] == "%"]
    deltas = [d for d in deltas if d is not None]
    return sum(deltas) / len(deltas) if deltas else None


def compare_plot(rows: list[dict], methods: list[str], path: Path) -> bool:
    """One small bar chart per benchmark (strict Δ from base; scales differ: MME is out of 2800)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not rows or not methods:
        return False
    cols = min(4, len(rows))
    n_rows = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(3.2 * cols, 2.8 * n_rows), squeeze=False)
    for ax, row in zip(axes.flat, rows):
        deltas = [row["deltas"].get(m) or 0.0 for m in methods]
        ax.bar(methods, deltas, color=["tab:green" if d >= 0 else "tab:red" for d in deltas])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{row['benchmark']} ({row['metric']}, {row['unit']})", fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle("change from the base model (strict)")
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True


def prior_section(run: Path, results: dict, out_dir: Path) -> tuple[list[str], dict]:
    rows = [r for r in compare_rows(results) if r["benchmark"] != "jigsaw"]
    methods = [m for m, _ in METHODS[1:]]
    lines = ["## 2. Prior knowledge: change from the base model", "",
             "Each cell: the strict score (the raw answer, read as lmms-eval and the benchmark's official script "
             "read it) with its change from base in brackets; next to it the lenient score (the `<answer>` block, "
             "or the text without `<think>`). **The tables, the mean and the findings use the strict scores.**", "",
             "| benchmark | metric | base | base lenient | "
             + " | ".join(f"{m} | {m} lenient" for m in methods) + " |",
             "|---|---|---|---|" + "---|---|" * len(methods)]
    for row in rows:
        metric = row["metric"] + ("" if row["unit"] == "%" else f" ({row['unit']})")
        cells = [row["benchmark"], metric, fmt(row["values"].get("base")), fmt(row["values_lenient"].get("base"))]
        for m in methods:
            for values, deltas in (("values", "deltas"), ("values_lenient", "deltas_lenient")):
                value = row[values].get(m)
                cells.append("-" if value is None else f"{fmt(value)} ({fmt(row[deltas].get(m), signed=True)})")
        lines.append("| " + " | ".join(cells) + " |")
    mean_delta = {m: mean_percent_delta(rows, m) for m in methods}
    mean_lenient = {m: mean_percent_delta(rows, m, "deltas_lenient") for m in methods}
    lines.append("| **mean Δ (benchmarks in %)** | | | | "
                 + " | ".join(f"{fmt(mean_delta[m], signed=True)} | {fmt(mean_lenient[m], signed=True)}"
                              for m in methods) + " |")
    lines += ["", "The mean counts benchmarks whose unit is % only (MME is a total out of 2800, OCRBench a score "
              "out of 1000)."]
    uneven = [r["benchmark"] for r in rows if not r["same_samples"]]
    if uneven:
        lines.append(f"Warning: methods were scored on different numbers of samples for {uneven} (check EVAL_LIMIT).")
    plot = run / "report" / "compare.png"
    if compare_plot(rows, [m for m in methods if results.get(m)], plot):
        lines += ["", f"![change from base]({os.path.relpath(plot, out_dir)})"]
    files.write_json_atomic(run / "report" / "compare.json",
                             {"base": "base", "rows": rows, "mean_delta_percent": mean_delta,
                              "mean_delta_percent_lenient": mean_lenient, "tables_use": "strict"})
    lines += ["", "Paper (7B, Δ from base): RFT -0.6 RefCOCO, 0.0 DocVQA, -8 MME, +1.7 MMStar, -0.2 POPE; SFT-Non-Rea "
              "-57.2, -27.4, -1854, -62.8, -69.9; SFT-Rea-4o -37.5, -2.3, -249, -3.7, -12.1; SFT-Rea-GRPO-Rollout "
              "-8.6, -0.9, -126, -2.4, -3.1.", ""]
    lines += published_section(results)
    return lines, mean_delta


def far_off(measured: float, reference: float, unit: str) -> bool:
    """A base model far from its published figure: > 10 points (for %) or > 10% relative."""
    gap = abs(measured - reference)
    return (unit == "%" and gap > 10) or (reference and gap / abs(reference) > 0.10)


def published_section(results: dict) -> list[str]:
    """The measured base scores next to Qwen's published Qwen2.5-VL-3B/7B-Instruct figures and the paper's own
    base figure, with the settings that differ; a base far off is flagged before anyone compares fine-tuned
    models against it."""
    base = results.get("base") or {}
    model = base.get("model", "")
    lines = ["### Base model vs published figures", ""]
    entries = {n: e for n, e in base.get("benchmarks", {}).items() if n != "jigsaw"}
    if not entries:
        return lines + ["(no base-model results)", ""]
    try:
        import benchmarks
        lmms_pixels = (benchmarks.base.LMMS_EVAL_MIN_PIXELS, benchmarks.base.LMMS_EVAL_MAX_PIXELS)
    except ImportError:
        lmms_pixels = (None, None)
    lines += [f"Measured: `{model}` (strict scores). Published: Qwen's figures for Qwen2.5-VL-3B/7B-Instruct; "
              "paper: arXiv 2506.23508's own base figure.", "",
              "| benchmark | metric | measured base | published 3B | published 7B | paper base | settings here | check |",
              "|---|---|---|---|---|---|---|---|"]
    flagged = []
    for name, entry in entries.items():
        info = benchmark_info(name, [entry])
        published, paper = info.get("published") or {}, info.get("paper_base") or {}
        measured = entry.get("metrics", {}).get(info["headline"])
        b3, b7 = published.get("Qwen/Qwen2.5-VL-3B-Instruct"), published.get("Qwen/Qwen2.5-VL-7B-Instruct")
        paper_value = paper.get(model)
        if not published and not paper:
            lines.append(f"| {name} | {info['headline']} | {fmt(measured)} | - | - | - | | no published figures |")
            continue
        s = entry.get("settings", {})
        notes = []
        if s.get("min_pixels") is not None:
            default = (s.get("min_pixels"), s.get("max_pixels")) == lmms_pixels
            notes.append(f"pixels {s.get('min_pixels')}-{s.get('max_pixels')}" + (" (lmms-eval default)" if default
                                                                                  else " (not lmms-eval's)"))
        if s.get("max_new_tokens") is not None:
            own = info.get("max_new_tokens")
            notes.append(f"cap {s['max_new_tokens']} tokens" + ("" if own in (None, s["max_new_tokens"])
                                                                else f" (lmms-eval: {own})"))
        notes.append(f"{entry.get('num_samples', '?')} samples" + (f" (--limit {s['limit']} subset)" if s.get("limit")
                                                                   else ""))
        if info.get("published_note"):
            notes.append(f"published: {info['published_note']}")
        reference = {"Qwen/Qwen2.5-VL-3B-Instruct": b3, "Qwen/Qwen2.5-VL-7B-Instruct": b7}.get(model)
        checks = [(reference, "published")] + [(paper_value, "paper")]
        status = "no published figure for this model"
        if measured is not None and any(ref is not None for ref, _ in checks):
            off = [f"{label} {fmt(ref)}" for ref, label in checks if ref is not None and far_off(measured, ref, info["unit"])]
            status = f"**FAR OFF** ({', '.join(off)})" if off else "close"
            if off:
                flagged.append(name)
        lines.append(f"| {name} | {info['headline']} ({info['unit']}) | {fmt(measured)} | {fmt(b3)} | {fmt(b7)} | "
                     f"{fmt(paper_value)} | {'; '.join(notes)} | {status} |")
    sources = []
    for name, entry in entries.items():
        info = benchmark_info(name, [entry])
        if info.get("published"):
            sources += [s.strip() for s in info.get("published_source", "").split(";") if s.strip()]
    lines += ["", "Far off = more than 10 points (benchmarks in %) or 10% relative from the figure for this model."]
    if sources:
        lines.append("Sources of the published figures: " + "; ".join(dict.fromkeys(sources)) + ".")
    if flagged:
        lines.append(f"**Warning:** the base model is far from the published figures on {flagged}: check the "
                     "settings (pixel budget, token cap, data copy, precision) before comparing fine-tuned models.")
    return lines + [""]


def sources_section(run: Path) -> list[str]:
    src = run / "data" / "sources"
    # One perplexity per source: analyze.py scores every row of each source under the base model.
    dynamics = read_json(run / "analysis" / "dynamics.json") or {}
    entries = {name: {"rows": d.get("perplexity_rows"), "mean_nll": d.get("mean_nll"), "perplexity": d.get("perplexity")}
               for name, d in (dynamics.get("sources") or {}).items()}
    lines = ["## 4. The SFT data sources", "", "| source | rows | mean NLL / token under base | perplexity | notes |",
             "|---|---|---|---|---|"]
    for name in experiment.SOURCE_NAMES:
        stats = read_json(src / name / "stats.json") or {}
        e = entries.get(name, {}) if isinstance(entries, dict) else {}
        notes = []
        if "placeholder" in stats:
            notes.append(f"PLACEHOLDER: {stats['placeholder']}")
        for key in ("sampler_accuracy", "share_puzzles_with_correct", "rows_kept"):
            if key in stats:
                value = stats[key]
                notes.append(f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}")
        lines.append(f"| {name} | {fmt(e.get('rows', stats.get('rows_kept')), 0)} | {fmt(e.get('mean_nll'), 3)} | "
                     f"{fmt(e.get('perplexity'), 2)} | {', '.join(notes)} |")
    lines += ["", "The paper's direction proxy: correct rollouts of the model are likely under it (low perplexity), "
              "reasoning written by someone else is not.", ""]
    return lines


# The figures analyze.py draws (dynamics.json "figures": key -> file next to it), in the order section 5 shows them.
DYNAMICS_FIGURES = (("lbk", "LBK per source"), ("cosine", "Cosine per source"),
                    ("perplexity_vs_influence", "Perplexity against influence"),
                    ("probe_logprob", "Probe log-probs over training"))


def dynamics_lines(dynamics: dict, figure_dir: str) -> list[str]:
    """The learning-dynamics tables of one dynamics.json (analyze.py): per source the perplexity, gradient
    alignment, first-order and exact change of the probes' log-prob and the LBK; the symmetry and calibration
    checks; the probe log-prob at the first and last checkpoint of each run; the figures, linked under
    `figure_dir` (relative to report.md)."""
    num = partial(fmt, spec=".3g", missing="–")
    cfg, stats = dynamics["config"], dynamics["sources"]
    gradients = dynamics.get("gradients")
    lines = ["### Learning dynamics", "",
             f"Model `{cfg['model']}`; {dynamics['n_probes']} probes from `{cfg['probes']}` ({cfg['probe_split']}, "
             f"{cfg['probe_answer']} answers); one SGD step of eta = {cfg['eta']:g} on a training sample's SFT loss. "
             f"Gradients: {(gradients or {}).get('mode', 'not computed')}"
             + (f" ({gradients['dims']:,} dims)" if gradients else "") + ".", "",
             "| source | n | perplexity | mean cos | cos > 0 | first-order Δ (mean) | exact Δ (mean) | "
             "LBK (mean ± std) | corr(exact, first-order) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in stats.items():
        lbk = s.get("lbk", {})
        lines.append(
            f"| {name} | {s['n']} | {num(s.get('perplexity'))} | {num(s.get('cosine', {}).get('mean'))} | "
            f"{num(s.get('cosine_positive_share'), spec='.0%')} | {num(s.get('first_order', {}).get('mean'))} | "
            f"{num(s.get('exact_delta', {}).get('mean'))} | {num(lbk.get('mean'))} ± {num(lbk.get('std'))} | "
            f"{num(s.get('calibration', {}).get('pearson'), spec='.3f')} |")
    lines += ["", "Δ = change of the probe answer's log-prob summed over its tokens; LBK uses the full-vocabulary "
              "change (see analyze.lbk). Lower perplexity should go with higher cosine if the paper's proxy holds."]
    sym = dynamics.get("symmetry")
    if sym:
        lines += ["", "**Symmetry** (T_u·Δ(v|u) against T_v·Δ(u|v), equal to first order): "
                  f"Pearson {num(sym['pearson'], spec='.3f')}, "
                  f"sign agreement {num(sym['sign_agreement'], spec='.0%')}, "
                  f"median relative asymmetry {num(sym['median_relative_asymmetry'], spec='.2g')} "
                  f"over {sym['n']} pairs."]
    cal = dynamics.get("calibration")
    if cal:
        lines += ["", f"**Calibration** of first-order against exact steps ({cal['n']} pairs): Pearson "
                  f"{num(cal['pearson'], spec='.3f')}, sign agreement {num(cal['sign_agreement'], spec='.0%')}, "
                  f"slope exact ≈ {num(cal['slope'])} × first-order."]
    tracking = dynamics.get("tracking")
    if tracking:
        lines += ["", "| run | checkpoints | steps | probe log-prob at base | at last | change |",
                  "|---|---|---|---|---|---|"]
        for run, c in tracking.items():
            first, last = c["mean_logprob"][0], c["mean_logprob"][-1]
            lines.append(f"| {run} | {len(c['steps']) - 1} | {c['steps'][1]}–{c['steps'][-1]} | "
                         f"{num(first)} | {num(last)} | {num(last - first)} |")
    figures = dynamics.get("figures") or {}
    shown = [f"![{title}]({figure_dir}/{figures[key]})" for key, title in DYNAMICS_FIGURES if key in figures]
    return lines + ([""] + shown if shown else [])


def dynamics_section(run: Path, out_dir: Path) -> tuple[list[str], dict]:
    path = run / "analysis" / "dynamics.json"
    dynamics = read_json(path) or {}
    lines = ["## 5. Learning dynamics", ""]
    if not dynamics:
        return lines + ["(analysis/dynamics.json was not written)", ""], dynamics
    return lines + dynamics_lines(dynamics, os.path.relpath(path.parent, out_dir)) + [""], dynamics


def verdict(holds: bool, tie: bool, comparable: bool = True) -> str:
    if not comparable:
        return "no verdict, since the methods were not compared at equal skill (above)"
    return "no difference, so this run cannot tell" if tie else ("agrees" if holds else "does not agree")


MIN_LEVEL_GAIN = 10.0   # jigsaw points above the base the top common level must reach before anything is concluded


def comparison_resolved(matched: dict) -> tuple[bool, str]:
    """Whether the top accuracy level every method reached supports a comparison at equal skill, and why: at
    least MIN_LEVEL_GAIN points above the base's jigsaw accuracy, and more than two standard errors of the
    difference at the puzzles scored (binomial: 100 * sqrt(p (1 - p) / n) per accuracy). A level a point above
    the base is where every curve still starts, read through noise: nothing can be concluded there.

    Example: base 2%, top 32% on 200 puzzles: 30 points against 2 x sqrt(3.3^2 + 1.0^2) = 6.9: resolved."""
    levels = (matched or {}).get("levels") or []
    if not levels:
        return False, "not every method rose above the base's jigsaw accuracy (section 3)"
    top, base, n = levels[-1], matched.get("base_accuracy", 0.0), matched.get("jigsaw_rows")
    gain = top - base
    if gain < MIN_LEVEL_GAIN:
        return False, (f"the highest jigsaw accuracy every method reached, {top:.1f}%, is {gain:.1f} points above the "
                       f"base's {base:.1f}% (a comparison needs at least {MIN_LEVEL_GAIN:.0f})")
    if not n:
        return False, "the number of jigsaw puzzles the points were scored on is unknown"

    def se(accuracy):
        p = min(1.0, max(0.0, accuracy / 100))
        return 100 * math.sqrt(p * (1 - p) / n)
    noise = 2 * math.sqrt(se(top) ** 2 + se(base) ** 2)
    if gain <= noise:
        return False, (f"the top common level, {top:.1f}% against the base's {base:.1f}%, is within two standard "
                       f"errors ({noise:.1f} points) of the {n} puzzles scored")
    return True, (f"{top:.1f}% against the base's {base:.1f}%: {gain:.1f} points, two standard errors at {n} "
                  f"puzzles {noise:.1f}")


def source_repeats(run: Path) -> dict[str, tuple[int, int]]:
    """{method: (distinct rows of its source, rows its SFT read)} of the SFT arms (data/sources/*/stats.json and
    the run's run.json: max_steps x batch_size x grad_accum)."""
    out = {}
    for src in experiment.SOURCES:
        stats = read_json(run / "data" / "sources" / src.name / "stats.json") or {}
        settings = (read_json(run / src.method / "run.json") or {}).get("settings") or {}
        rows = stats.get("rows_kept")
        if not rows or "placeholder" in stats or not settings.get("max_steps"):
            continue
        reads = int(settings["max_steps"]) * int(settings.get("batch_size", 1)) * int(settings.get("grad_accum") or 1)
        out[src.method] = (int(rows), reads)
    return out


MAX_PASSES = 4   # reads per distinct row above which an arm is flagged (Muennighoff et al. 2023, arXiv 2305.16264:
# up to ~4 epochs of repeated data cost little against fresh data; beyond, repeated rows are worth less and less)


def conclusions(accuracy: dict, mean_delta: dict, dynamics: dict, preset: str, matched: dict | None = None,
                seeds: int = 1, repeats: dict | None = None, grid: str = "") -> list[str]:
    """The paragraph stating what this run shows, computed from the numbers above (differences under 0.5
    points are called ties: a toy test split has a few hundred questions). `matched`: {"levels": [...],
    "table": {method: {level: forgetting}}, "base_accuracy", "jigsaw_rows", "best"} from the frontier section,
    the comparison at equal skill; nothing is read as agreeing or disagreeing with the paper unless that
    comparison is resolved (comparison_resolved). `repeats`: source_repeats, to flag arms trained on few rows."""
    out = ["## 6. What this run shows", ""]
    if grid and grid != "3x3":
        out.append(f"- This run's puzzles are {grid}; the paper's figures are for 3x3.")
    comparable, why = comparison_resolved(matched) if matched is not None else (False, "")
    if comparable:
        level = matched["levels"][-1]
        row = {m: v.get(level) for m, v in matched["table"].items() if v.get(level) is not None}
        if row:
            order = ", ".join(f"{m} {v:.1f}" for m, v in sorted(row.items(), key=lambda kv: kv[1]))
            out.append(f"- **At equal skill** (every method read where it first reached {level:.1f}% jigsaw "
                       f"accuracy, section 3; {why}), forgetting in points, least first: {order}.")
            if "rft" in row and "sft_non_rea" in row:
                rft_less = row["rft"] < row["sft_non_rea"]
                tie = abs(row["rft"] - row["sft_non_rea"]) < 0.5
                out.append(f"  RFT forgot {'less' if rft_less else 'more'} than SFT-Non-Rea at that accuracy: "
                           f"{verdict(rft_less, tie)} with the paper's finding 1.")
                wide = [m for m in ("rft", "sft_non_rea") if matched.get("wide", {}).get(m, {}).get(level)]
                if wide:
                    out.append(f"  But {' and '.join(wide)} had no checkpoint near {level:.1f}% (marked * in section 3): "
                               "its value there is a straight line between checkpoints far apart, so this comparison is "
                               "not a measurement. Save checkpoints more often early to make it one.")
    elif matched is not None:
        best = ", ".join(f"{m} {v:.1f}%" for m, v in (matched.get("best") or {}).items())
        out.append(f"- **No comparison at equal skill**: {why}."
                   + (f" Each method's best jigsaw accuracy along its checkpoints: {best}." if best else "")
                   + " The final-model numbers below are of runs at different skill, so none of them is read as "
                   "agreeing or disagreeing with the paper.")
    acc = {k: v for k, v in accuracy.items() if v is not None}
    d = {k: v for k, v in mean_delta.items() if v is not None}
    if "rft" in acc and "sft_non_rea" in acc and "rft" in d and "sft_non_rea" in d:
        forgets_more = d["sft_non_rea"] < d["rft"]
        tie = abs(d["sft_non_rea"] - d["rft"]) < 0.5
        out.append(
            f"- **Finding 1 (SFT learns fast but forgets; RFT keeps prior knowledge).** SFT-Non-Rea reached "
            f"{acc['sft_non_rea']:.1f}% jigsaw accuracy and changed prior knowledge by {d['sft_non_rea']:+.1f} points on "
            f"average; RFT reached {acc['rft']:.1f}% with {d['rft']:+.1f}. "
            + ("Both changed it alike: this run cannot tell." if tie else
               f"SFT-Non-Rea forgot {'more' if forgets_more else 'less'} than RFT: "
               f"{verdict(forgets_more, tie, comparable)}" + (" with the paper." if comparable else ".")))
        if acc["rft"] <= acc.get("base", 0.0):
            out.append(f"  RFT did not learn the task here (jigsaw {acc['rft']:.1f}% vs base {acc.get('base', 0.0):.1f}%), "
                       "so this is not the paper's comparison of two runs that both learned it; its forgetting "
                       "comes from the update alone.")
    if "sft_rea_grpo_rollout" in d and "sft_non_rea" in d:
        better = d["sft_rea_grpo_rollout"] > d["sft_non_rea"]
        tie = abs(d["sft_rea_grpo_rollout"] - d["sft_non_rea"]) < 0.5
        ext = d.get("sft_rea_external")
        ext_text = (f", and SFT on external reasoning {ext:+.1f}" if ext is not None else "")
        out.append(
            f"- **Finding 3 (the data matters).** SFT on correct RFT rollouts changed prior knowledge by "
            f"{d['sft_rea_grpo_rollout']:+.1f} (jigsaw {fmt(acc.get('sft_rea_grpo_rollout'))}%) against "
            f"{d['sft_non_rea']:+.1f} for SFT-Non-Rea{ext_text}. "
            + ("Both changed it alike: this run cannot tell." if tie else
               f"Rollout data forgot {'less' if better else 'more'}: {verdict(better, tie, comparable)}"
               + (" with the paper." if comparable else ".")))
    sources = dynamics.get("sources", {}) if isinstance(dynamics, dict) else {}
    lbk = {k: v.get("lbk", {}).get("mean") for k, v in sources.items() if v.get("lbk", {}).get("mean") is not None}
    if "non_rea" in lbk and "rea_grpo_rollout" in lbk:
        larger = lbk["non_rea"] > lbk["rea_grpo_rollout"]
        order = " > ".join(f"{k} ({v:.3g})" for k, v in sorted(lbk.items(), key=lambda kv: -kv[1]))
        out.append(f"- **Finding 2 (magnitude).** Mean LBK by source: {order}. The paper reports Non-Rea largest and "
                   f"GRPO rollouts smallest: non_rea {'>' if larger else '<='} rea_grpo_rollout, "
                   f"{'agrees' if larger else 'does not agree'}.")
    ppl = {k: v.get("perplexity") for k, v in sources.items() if v.get("perplexity") is not None}
    if "rea_grpo_rollout" in ppl and "rea_external" in ppl:
        low = ppl["rea_grpo_rollout"] < ppl["rea_external"]
        out.append(f"- **Direction proxy.** Base-model perplexity of rollouts {ppl['rea_grpo_rollout']:.3g} vs external "
                   f"reasoning {ppl['rea_external']:.3g}: {'agrees' if low else 'does not agree'} with the paper "
                   "(rollouts lowest).")
    for method, (rows, reads) in sorted((repeats or {}).items()):
        if reads > MAX_PASSES * rows:
            out.append(f"- **Few distinct rows**: {method} trained on {rows} distinct rows read {reads} times in all "
                       f"(~{reads / rows:.0f} times each): it measures fitting those {rows} texts more than the "
                       f"paper's arm (more than {MAX_PASSES} passes; sample more puzzles: ROLLOUT_LIMIT, or a "
                       "checkpoint that solves more).")
    if len(out) == 2:
        out.append("- Not enough finished stages to compare the methods.")
    if seeds <= 1:
        out.append("- One seed: every ordering above is a single sample. `SEEDS=3 bash run_all.sh` repeats the "
                   "training stages with three seeds and shows the spread.")
    if preset in ("toy", "smoke"):
        out.append(f"- These numbers come from the `{preset}` preset: a ~1M-parameter model trained from scratch on "
                   "procedural images for minutes on a CPU. They check that the pipeline measures the paper's "
                   "quantities end to end; they are not evidence about Qwen2.5-VL.")
    return out + [""]


# ----------------------------------------------------------------------------------------------------------
# Forgetting at equal skill: each method's curve of (jigsaw accuracy, prior knowledge) along its checkpoints
# ----------------------------------------------------------------------------------------------------------
def prior_score(results: dict | None) -> float | None:
    """Mean headline score over the prior-knowledge benchmarks measured in % (a benchmark declares its unit;
    MME's /2800 and OCRBench's /1000 would dominate a plain mean), jigsaw excluded."""
    if not results:
        return None
    values = []
    for name, entry in (results.get("benchmarks") or {}).items():
        if name == "jigsaw":
            continue
        unit = entry.get("unit", "/2800" if name == "mme" else "/1000" if name == "ocrbench" else "%")
        value = (entry.get("metrics") or {}).get(entry.get("headline", "accuracy"))
        if unit == "%" and isinstance(value, (int, float)) and not math.isnan(value):
            values.append(value)
    return sum(values) / len(values) if values else None


def jigsaw_accuracy(results: dict | None) -> float | None:
    metrics = ((results or {}).get("benchmarks") or {}).get("jigsaw", {}).get("metrics", {})
    return metrics.get("accuracy")


def value_at_accuracy(curve: list[tuple[float, float, float]], level: float) -> float | None:
    """The prior-knowledge score where a method first reaches jigsaw accuracy `level`, interpolated linearly
    between the two checkpoints that bracket it. curve: [(step, accuracy, prior)] in step order, base first.
    None when the curve never reaches the level.

    Example: [(0, 0, 90), (10, 20, 80), (20, 60, 40)] at level 40 -> halfway between 80 and 40 -> 60."""
    if not curve:
        return None
    if curve[0][1] >= level:
        return curve[0][2]
    for (_, acc0, prior0), (_, acc1, prior1) in zip(curve, curve[1:]):
        if acc0 < level <= acc1:
            return prior0 + (level - acc0) / (acc1 - acc0) * (prior1 - prior0)
    return None


def common_levels(curves: dict[str, list], count: int = 3) -> list[float]:
    """Accuracy levels every method reached: evenly spaced up to the smallest of the methods' best accuracies
    (and above the base's), so each method's forgetting is read at the same skill."""
    if not curves:
        return []
    start = max(c[0][1] for c in curves.values() if c)
    top = min(max(a for _, a, _ in c) for c in curves.values() if c)
    if top <= start:
        return []
    # Exact values (not rounded: a level rounded above the best accuracy would count as never reached).
    return [start + (top - start) * k / count for k in range(1, count + 1)]


def bracket_span(curve: list[tuple[float, float, float]], level: float) -> float:
    """Accuracy gap between the two checkpoints a level is interpolated between (0 at a checkpoint): a wide gap
    means the run has no checkpoint near that accuracy and the interpolated value is a straight line."""
    for (_, acc0, _), (_, acc1, _) in zip(curve, curve[1:]):
        if acc0 < level <= acc1:
            return 0.0 if level == acc1 else acc1 - acc0
    return 0.0


def matched_forgetting(curves: dict[str, list], levels: list[float]) -> dict[str, dict[float, float | None]]:
    """Forgetting (prior at base minus prior at that accuracy, in points) per method and level."""
    out = {}
    for method, curve in curves.items():
        base_prior = curve[0][2]
        out[method] = {}
        for level in levels:
            value = value_at_accuracy(curve, level)
            out[method][level] = None if value is None or base_prior is None else base_prior - value
    return out


def common_rows(results: list[dict]) -> dict[str, set[str]] | None:
    """Per benchmark, the sample ids every one of `results` scored (eval.py keeps each sample in results.json);
    None when a results file kept no samples (--no-save_samples, or a hand-made file): then the points cannot be
    aligned and keep their own metrics."""
    names = set.intersection(*[set((r.get("benchmarks") or {})) for r in results]) if results else set()
    shared = {}
    for name in names:
        ids = [set(r["benchmarks"][name].get("samples") or {}) for r in results]
        if not all(ids):
            return None
        shared[name] = set.intersection(*ids)
    return shared


def on_rows(results: dict, rows: dict[str, set[str]] | None) -> dict:
    """`results` with every benchmark's metrics recomputed on the given sample ids only (the benchmark's own
    aggregate over the stored scores), so that points scored on a larger subset (the base and the final models at
    EVAL_LIMIT) are read on the rows of the smaller one (the checkpoints at CHECKPOINT_EVAL_LIMIT)."""
    if rows is None:
        return results
    import benchmarks
    out = {**results, "benchmarks": {}}
    for name, entry in (results.get("benchmarks") or {}).items():
        bench = benchmarks.get(name)
        samples = entry.get("samples") or {}
        chosen = [samples[i] for i in sorted(rows.get(name, ())) if "score" in samples[i]]
        if bench is None or name not in rows or not chosen:
            continue
        metrics = bench.aggregate(chosen)
        metrics["num_samples"] = len(chosen)
        out["benchmarks"][name] = {**entry, "metrics": metrics}
    return out


def method_curves(run: Path, base_results: dict | None, info: dict | None = None
                  ) -> dict[str, list[tuple[int, float, float, str]]]:
    """Per training method, [(step, jigsaw accuracy, prior score, label)] along its evaluated checkpoints
    (eval/<method>/checkpoint-N/results.json, then eval/<method>/results.json for final/), the base first. Every
    point of every curve, the base included, is scored on the same rows: the sample ids all of them have (see
    common_rows); `info` gets {"aligned": bool, "rows": {benchmark: count}}."""
    found = {}
    for method, _ in METHODS[1:]:
        points = []
        for path in (run / "eval" / method).glob("checkpoint-*/results.json"):
            match = re.fullmatch(r"checkpoint-(\d+)", path.parent.name)
            results = read_json(path)
            if match and results:
                points.append((int(match.group(1)), path.parent.name, results))
        final = read_json(run / "eval" / method / "results.json")
        if final:
            points.append((training_steps(run, method) or 0, "final", final))
        if points:
            found[method] = points
    everything = [r for points in found.values() for _, _, r in points] + ([base_results] if base_results else [])
    rows = common_rows(everything)
    if info is not None:
        info.update(aligned=rows is not None, rows={k: len(v) for k, v in (rows or {}).items()})
    base = on_rows(base_results or {}, rows)
    base = (0, jigsaw_accuracy(base), prior_score(base), "base")
    curves = {}
    for method, points in found.items():
        scored = []
        for step, label, results in points:
            results = on_rows(results, rows)
            scored.append((step, jigsaw_accuracy(results), prior_score(results), label))
        scored = sorted(p for p in scored if p[1] is not None and p[2] is not None)
        if scored and base[1] is not None and base[2] is not None:
            curves[method] = [base] + scored
    return curves


WIDE_GAP = 25.0  # jigsaw points between the checkpoints around a level above which the value is marked


def frontier_section(run: Path, results: dict, out_dir: Path, matched: dict | None = None) -> list[str]:
    """RL's Razor's main plot (arXiv 2509.04259) for this run: prior knowledge against jigsaw accuracy along each
    method's checkpoints, the forgetting of every method at accuracies all of them reached, and the KL on the
    new task next to it. What makes a short RFT run comparable with a long SFT run."""
    rows_info = {}
    curves = method_curves(run, results.get("base"), rows_info)
    lines = ["## 3. Forgetting at equal skill", ""]
    if not curves:
        return lines + ["(no checkpoint evaluations under eval/<method>/checkpoint-N/: run the eval stage)", ""]
    dynamics = read_json(run / "analysis" / "dynamics.json") or {}
    tracking = dynamics.get("tracking") or {}
    kl_at = {m: dict(zip(t.get("labels", []), t.get("task_kl", []))) for m, t in tracking.items() if t.get("task_kl")}
    simple = {m: [(step, acc, prior) for step, acc, prior, _ in c] for m, c in curves.items()}
    levels = common_levels(simple)
    table = matched_forgetting(simple, levels)
    jigsaw_rows = rows_info.get("rows", {}).get("jigsaw") or \
        ((results.get("base") or {}).get("benchmarks", {}).get("jigsaw", {}).get("num_samples"))
    if matched is not None:
        matched.update(levels=levels, table=table,
                       wide={m: {lv: bracket_span(simple[m], lv) > WIDE_GAP for lv in levels} for m in simple},
                       base_accuracy=max(c[0][1] for c in simple.values()), jigsaw_rows=jigsaw_rows,
                       best={m: max(a for _, a, _ in c) for m, c in simple.items()})
    base_prior = next(iter(curves.values()))[0][2]
    lines += [f"Prior knowledge = mean strict score over the prior-knowledge benchmarks in % (base {base_prior:.1f}). "
              "Each method is read where it first reaches each jigsaw accuracy level, interpolated linearly between "
              "its two checkpoints around it; levels run up to the best accuracy every method reached.", ""]
    if rows_info.get("aligned"):
        lines += ["Every point, the base and the final models included, is scored on the same rows (the samples all "
                  "of them were evaluated on): " + ", ".join(f"{k} {v}" for k, v in sorted(rows_info["rows"].items()))
                  + ".", ""]
    else:
        lines += ["Warning: the results files keep no per-sample records, so each point is read on the rows it was "
                  "evaluated on (the base and final models on EVAL_LIMIT rows, checkpoints on CHECKPOINT_EVAL_LIMIT "
                  "rows): differences between subsets read as forgetting.", ""]
    if levels:
        lines += ["| method | " + " | ".join(f"forgetting at {lv:.1f}% jigsaw" for lv in levels)
                  + " | final jigsaw (%) | final forgetting | KL on the new task (final) |",
                  "|---|" + "---|" * (len(levels) + 3)]
    else:
        lines += ["Not every method got above the base's jigsaw accuracy, so no common level exists: the runs "
                  "cannot be compared at equal skill (an arm that did not learn is a failed run, not a data point).",
                  "", "| method | final jigsaw (%) | final forgetting | KL on the new task (final) |", "|---|---|---|---|"]
    xs, ys = [], []
    for method, curve in curves.items():
        final = curve[-1]
        kl = kl_at.get(method, {})
        cells = [fmt(table[method][lv]) + ("*" if table[method][lv] is not None
                                           and bracket_span(simple[method], lv) > WIDE_GAP else "")
                 for lv in levels] if levels else []
        lines.append(f"| {method} | " + " | ".join(cells + [fmt(final[1]), fmt(base_prior - final[2]),
                                                             fmt(kl.get(final[3]), 3)]) + " |")
        for _, _, prior, label in curve[1:]:
            if kl.get(label) is not None:
                xs.append(kl[label])
                ys.append(base_prior - prior)
    if any(bracket_span(simple[m], lv) > WIDE_GAP for m in simple for lv in levels):
        lines += ["", f"\\* interpolated between two checkpoints more than {WIDE_GAP:.0f} jigsaw points apart: the run has no "
                  "checkpoint near that accuracy, so the value is a straight line between them, not a measurement "
                  "(save more often early: SAVE_STEPS / RFT_SAVE_STEPS)."]
    r = common.pearson(xs, ys) if len(xs) >= 3 else None   # two points always correlate perfectly: not shown
    lines += ["", f"KL(tuned || base) on the new task, nats per completion (analyze.py, sampled jigsaw completions of "
              f"each checkpoint); its correlation with forgetting over {len(xs)} checkpoints of all methods: "
              f"Pearson {fmt(r, 2)} (RL's Razor: forgetting tracks this KL).", ""]
    png = run / "report" / "frontier.png"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, curve in curves.items():
            ax.plot([p[1] for p in curve], [p[2] for p in curve], marker="o", label=method)
        for lv in levels:
            ax.axvline(lv, color="grey", lw=0.6, ls=":")
        ax.set_xlabel("jigsaw exact accuracy (%)")
        ax.set_ylabel("prior knowledge (mean %, strict)")
        ax.set_title("Prior knowledge against new-task skill, along training")
        ax.legend(fontsize=7)
        with files.atomic_path(png) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        lines += [f"![frontier]({os.path.relpath(png, out_dir)})", ""]
    except ImportError:
        lines += ["(matplotlib is not installed: no figure)", ""]
    return lines


def environment_block(run: Path, results: dict) -> list[str]:
    """What ran, once at the top: package versions, device, CUDA, threads, the kit's commit (from the base
    model's results.json, else a training run's run.json)."""
    env = (results.get("base") or {}).get("environment")
    for method, _ in METHODS[1:]:
        if env:
            break
        env = (read_json(run / method / "run.json") or {}).get("environment")
    if not env:
        return ["Environment: not recorded.", ""]
    packages = ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items() if v)
    commit = env.get("git_commit") or "unknown"
    dirty = " (with uncommitted changes)" if env.get("git_dirty") else ""
    capability = f" ({env['cpu_capability']} kernels)" if env.get("cpu_capability") and not env.get("cuda") else ""
    driver = f" (driver {env['nvidia_driver']}, CUDA {env.get('driver_cuda') or '?'} at most)" if env.get("nvidia_driver") else ""
    return [f"Environment: {env.get('device')}{capability}; CUDA {env.get('cuda') or '-'}{driver}, cuDNN {env.get('cudnn') or '-'}; "
            f"{env.get('torch_threads')} torch threads; Python {env.get('python')}; {packages}; kit commit "
            f"`{str(commit)[:12]}`{dirty}. Compare runs made on one machine with one thread count: another CPU, "
            f"GPU or thread count rounds every float differently, and over hundreds of training steps those "
            f"differences grow into different models (README, the toy run).", ""]


def within_preset_note(settings: dict, preset: str) -> list[str]:
    """A preset that departs from the experiment as defined to fit a smaller GPU (presets/3b_40gb.env: pure bf16
    weights, RFT without a KL term) measures forgetting of other training runs: say so before any number."""
    departures = []
    if str(settings.get("PRECISION")) == "bf16":
        departures.append(f"every arm trained pure bf16 weights (optimizer `{settings.get('OPTIMIZER')}`) instead of "
                          "fp32 master weights")
    if str(settings.get("BETA", "")).strip() in ("0", "0.0", "0.") and settings.get("BUILD_TOY_BASE") != "1":
        departures.append("RFT ran without a KL term (BETA=0, no reference model)")
    if not departures:
        return []
    return [f"**Compare within this preset only.** Preset `{preset}`: {'; '.join(departures)}, to fit a smaller GPU. "
            "Its forgetting figures compare its own methods with each other; they are not comparable with the `3b` "
            "preset's or the paper's numbers.", ""]


def completions_section(run: Path, count: int = 2) -> list[str]:
    """A few things the RFT policy actually wrote (rft.py's completions.jsonl), first and last logged step: for a
    format-sensitive reward the first thing to read."""
    path = run / "rft" / "completions.jsonl"
    groups = read_metrics(path)
    if not groups:
        return []
    lines = [f"What the RFT policy wrote (from `{os.path.relpath(path, run)}`; reward = hit + acc + fmt):", ""]
    for group in [groups[0], groups[-1]] if len(groups) > 1 else groups:
        for sample in group["completions"][:count]:
            text = sample["text"].replace("\n", " ").replace("|", "/").replace("`", "'")[:160]
            lines.append(f"- step {group['step']}, puzzle {group['puzzle_id']} (answer {group['answer']}): reward "
                         f"{sample['reward']:.2f}, advantage {sample['advantage']:+.2f}: `{text}`")
    return lines + [""]


def seed_runs(run: Path) -> list[Path]:
    """The run folder itself (seed 0) and the folders of the other seeds (run_all.sh SEEDS=N: RUN/seed1, ...)."""
    others = sorted((p for p in run.glob("seed*") if (p / "eval").is_dir()), key=lambda p: p.name)
    return [run] + others


def spread(values: list[float]) -> str:
    """'mean ± sd (min..max, n)' of the per-seed values; one value is shown alone."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f} (1 seed)"
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.1f} ± {sd:.1f} ({min(values):.1f}..{max(values):.1f}, {len(values)} seeds)"


def seeds_section(run: Path, base_results: dict | None) -> tuple[list[str], int]:
    """Mean and spread over seeds of each method's final jigsaw accuracy, its change of prior knowledge, and its
    forgetting at the highest accuracy level every method reached in that seed."""
    folders = seed_runs(run)
    if len(folders) < 2:
        return [], 1
    per_method = {m: {"acc": [], "delta": [], "matched": []} for m, _ in METHODS[1:]}
    for folder in folders:
        base = read_json(folder / "eval" / "base" / "results.json") or base_results
        curves = {m: [(st, a, p) for st, a, p, _ in c] for m, c in method_curves(folder, base).items()}
        levels = common_levels(curves)
        table = matched_forgetting(curves, levels[-1:]) if levels else {}
        for method in per_method:
            final = read_json(folder / "eval" / method / "results.json")
            if final is None:
                continue
            per_method[method]["acc"].append(jigsaw_accuracy(final))
            if prior_score(final) is not None and prior_score(base) is not None:
                per_method[method]["delta"].append(prior_score(final) - prior_score(base))
            if levels and table.get(method, {}).get(levels[-1]) is not None:
                per_method[method]["matched"].append(table[method][levels[-1]])
    lines = [f"### Seeds ({len(folders)}: {', '.join(str(f.relative_to(run)) if f != run else 'seed 0' for f in folders)})",
             "", "| method | final jigsaw (%) | Δ prior (points) | forgetting at the top common level |",
             "|---|---|---|---|"]
    for method, v in per_method.items():
        lines.append(f"| {method} | {spread(v['acc'])} | {spread(v['delta'])} | {spread(v['matched'])} |")
    lines += ["", "Each seed repeats the training stages (its own data order and sampling); the base model, the data "
              "and the benchmarks are shared. An ordering of methods holds only where the spreads do not overlap.", ""]
    return lines, len(folders)


def main(argv=None):
    args = common.parse_args(Args, __doc__, argv)
    run = Path(args.run_dir)
    if not run.is_dir() or not any((run / "eval").glob("*/results.json")):
        common.fail(f"--run_dir {run}: no run folder with eval/<method>/results.json (run `bash run_all.sh`, or point "
                    "at the RUN folder it wrote).")
    out = Path(args.output_dir or run) / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {m: read_json(run / "eval" / m / "results.json") for m, _ in METHODS}
    settings = read_json(run / "settings.json") or {}

    lines = [f"# Reproduction report: preset `{args.preset}`", "",
             "Paper: *Why Reinforcement Fine-Tuning Enables MLLMs Preserve Prior Knowledge Better: A Data Perspective* "
             f"(arXiv 2506.23508). Base model: `{settings.get('MODEL', (results.get('base') or {}).get('model', '?'))}`.",
             ""]
    lines += environment_block(run, results)
    lines += within_preset_note(settings, args.preset)
    jig_lines, accuracy = jigsaw_section(run, results)
    prior_lines, mean_delta = prior_section(run, results, out.parent)
    lines += jig_lines + prior_lines
    curves = run / "report" / "training_curves.png"
    curves.parent.mkdir(parents=True, exist_ok=True)
    if training_curves(run, curves):
        lines += [f"![training curves]({os.path.relpath(curves, out.parent)})", ""]
    lines += completions_section(run)
    matched = {}
    lines += frontier_section(run, results, out.parent, matched)
    seed_lines, seeds = seeds_section(run, results.get("base"))
    lines += seed_lines
    lines += sources_section(run)
    dyn_lines, dynamics = dynamics_section(run, out.parent)
    lines += dyn_lines
    lines += conclusions(accuracy, mean_delta, dynamics, args.preset, matched, seeds, source_repeats(run),
                         str(settings.get("GRID", "")))
    lines += ["## 7. Settings", "", "| variable | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in sorted(settings.items())]
    timings = {p.name[:-len('.seconds')]: p.read_text().strip() for p in sorted((run / ".done").glob("*.seconds"))}
    if timings:
        lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in timings.items())]
    with files.write_guard(out.parent, str(out), f"{out} keeps its previous version, if any; free space and rerun."):
        files.write_text_atomic(out, "\n".join(lines) + "\n")
    print(f"[report] wrote {out}")


if __name__ == "__main__":
    main()
