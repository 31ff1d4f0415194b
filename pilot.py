r"""The pilot's gate: can RFT learn the task in this run's budget? Decided on the run's own first hours.

run_all.sh's pilot stage runs the first PILOT_STEPS steps of the RFT run (rft.py, evaluated greedily on the first
RFT_EVAL_SIZE test puzzles at step 0 and every PILOT_EVAL_STEPS steps), then this script reads what rft.py wrote
(<run>/rft/metrics.jsonl) and prints
  * the measured seconds per GRPO step (rollout, training) and per evaluation, against the plan's own figures,
  * the accuracy trend and where it leads by RFT_STEPS,
  * the plan of the rest of the run recomputed with the measured constants (plan.py),
and stops the run (exit 2) before the SFT and sources stages spend anything when the trend does not reach
PILOT_MIN_GAIN points over the base, saying what would: more steps and their GPU-hours at the measured speed, the
2x2 grid, the vLLM rollout backend, or IGNORE_PILOT=1 to go on anyway. <run>/pilot/pilot.json keeps the numbers.

The rule, stated once and not tuned on any outcome: the trend is the least-squares straight line through the
pilot's (step, exact accuracy in %) points, the base's step-0 point included, extended to RFT_STEPS (and held
within 0..100). The gate passes when that line reaches the base's accuracy + PILOT_MIN_GAIN points. A straight
line uses every point and assumes no shape: it over-promises a curve that is flattening and under-promises one that
takes off late (public RL curves on jigsaw puzzles do both), which is why the message shows every point, the
line's standard error and the binomial noise of one evaluation, and why IGNORE_PILOT=1 exists.

    settings_lines | python pilot.py --run runs/3b          # what run_all.sh does (settings on stdin)
    python pilot.py --run runs/3b --settings runs/3b/settings.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import files
import plan


def median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float, float | None]:
    """(intercept, slope, standard error of the slope) of the least-squares line through (x, y) points; the
    standard error needs three points (None below).

    Example: [(0, 0), (25, 1), (50, 2)] -> (0.0, 0.04, 0.0): 0.04 points per step, no scatter."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return mean_y, 0.0, None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx
    intercept = mean_y - slope * mean_x
    if n < 3:
        return intercept, slope, None
    residual = sum((y - intercept - slope * x) ** 2 for x, y in points)
    return intercept, slope, math.sqrt(residual / (n - 2) / sxx)


def measure(metrics: list[dict], pilot_steps: int) -> dict:
    """What the pilot's metrics.jsonl says: the evaluation points (step, accuracy %), the median seconds of a
    rollout, of an update and of an evaluation, the mean completion length and truncated share."""
    steps = [m for m in metrics if "reward" in m and m.get("step", 0) <= pilot_steps]
    evals = {}
    for m in metrics:
        if m.get("eval_accuracy") is not None and m.get("step", 0) <= pilot_steps:
            evals[m["step"]] = m   # the last line of a step wins (a resumed step is logged again)
    return {
        "steps": len(steps),
        "points": [(step, 100.0 * m["eval_accuracy"]) for step, m in sorted(evals.items())],
        "eval_size": next((m.get("eval_size") for m in evals.values() if m.get("eval_size")), None),
        "generation_s": median([m.get("time_generation") for m in steps]),
        "training_s": median([m.get("time_training") for m in steps]),
        "eval_s": median([m.get("time_eval") for m in evals.values()]),
        "completion_length": (sum(m["completion_length"] for m in steps) / len(steps)) if steps else None,
        "truncated_share": (sum(m.get("truncated_share", 0.0) for m in steps) / len(steps)) if steps else None,
        "rollout_accuracy": (100.0 * sum(m.get("accuracy", 0.0) for m in steps[-10:]) / len(steps[-10:]))
        if steps else None,
    }


def gate(settings: dict, measured: dict) -> dict:
    """The decision and its numbers: base, line, projection at RFT_STEPS, the gain it needs, pass or not."""
    rft_steps, min_gain = int(settings["RFT_STEPS"]), float(settings["PILOT_MIN_GAIN"])
    points = measured["points"]
    if not points:
        return {"passed": False, "reason": "no evaluation in the pilot's metrics.jsonl (RFT_EVAL_SIZE=0?)"}
    base = points[0][1] if points[0][0] == 0 else None
    if base is None:
        return {"passed": False, "reason": "no step-0 evaluation of the base in the pilot's metrics.jsonl"}
    intercept, slope, slope_se = fit_line(points)
    projected = min(100.0, max(0.0, intercept + slope * rft_steps))
    n = measured.get("eval_size") or 0
    noise = 100 * math.sqrt(max(base, 1.0) / 100 * (1 - max(base, 1.0) / 100) / n) if n else None
    return {"passed": projected - base >= min_gain, "base": base, "intercept": intercept, "slope": slope,
            "slope_se": slope_se, "projected": projected, "gain": projected - base, "min_gain": min_gain,
            "target": base + min_gain, "rft_steps": rft_steps, "noise": noise,
            "steps_needed": math.ceil((base + min_gain - intercept) / slope) if slope > 0 else None}


def step_seconds(settings: dict, measured: dict) -> tuple[dict, dict]:
    """(scales, planned): measured / planned seconds of the same work, for plan.plan(measured=scales)."""
    planned = plan.rft_step_seconds(settings)
    scales = {}
    for key, name in (("generation_s", "rollout"), ("training_s", "train"), ("eval_s", "eval")):
        reference = planned["generation" if name == "rollout" else "training" if name == "train" else "eval"]
        if measured.get(key) and reference:
            scales[name] = measured[key] / reference
    return scales, planned


def advice(settings: dict, decision: dict, measured: dict, replanned: dict) -> list[str]:
    """What would reach the minimum: more steps (at the measured speed), the 2x2 grid, the vLLM backend."""
    lines = []
    step_s = (measured.get("generation_s") or 0) + (measured.get("training_s") or 0)
    if decision.get("steps_needed"):
        extra = max(0, decision["steps_needed"] - decision["rft_steps"])
        lines.append(f"- more steps: the line reaches {decision['target']:.1f}% at step {decision['steps_needed']:,}, "
                     f"i.e. RFT_STEPS={decision['steps_needed']} ({extra:,} more steps, about "
                     f"{extra * step_s / 3600:.1f} GPU-hours more at the measured {step_s:.0f} s per step; "
                     "a straight line, so a guess past the pilot's last point)")
    else:
        lines.append("- more steps: the pilot shows no upward trend, so more of the same steps are not indicated")
    if settings.get("GRID") != "2x2":
        lines.append("- GRID=2x2 (PRESET=3b_2x2): the public evidence favours it for a one-day budget (AGILE: "
                     "Qwen2.5-VL from 9.5% to 82.8% on 2x2 jigsaws with ~16k RL prompts, 5% on 3x3; Jigsaw-R1 "
                     "reached near-perfect accuracy only on its smaller grids)")
    if settings.get("ROLLOUT_BACKEND", "hf") != "vllm":
        hf, vllm = (plan.plan({**settings, "ROLLOUT_BACKEND": b}, ["rft"])["rft_step"] for b in ("hf", "vllm"))
        faster = (hf["generation"] + hf["training"]) / max(1e-9, vllm["generation"] + vllm["training"])
        if settings.get("PLAN_DEVICE", "gpu") != "gpu":
            lines.append("- ROLLOUT_BACKEND=vllm on a GPU: GRPO's rollouts decoded by vLLM")
        elif faster > 1:
            lines.append(f"- ROLLOUT_BACKEND=vllm: GRPO's rollouts decoded by vLLM, about {faster:.1f}x the steps per "
                         "GPU-hour by the plan's estimate (not measured with this kit): more steps in the same budget")
    lines.append("- or go on as planned: IGNORE_PILOT=1 bash run_all.sh (the report will say whether the methods "
                 "reached a common accuracy level to compare at)")
    return lines


def report(settings: dict, run: Path, stages: list[str], ignore: bool) -> tuple[bool, str, dict]:
    metrics = files.read_jsonl(run / "rft" / "metrics.jsonl",
                               "Move the rft/ folder away and rerun the pilot (run_all.sh --from pilot).")
    pilot_steps = int(settings["PILOT_STEPS"])
    measured = measure(metrics, pilot_steps)
    if measured["steps"] < pilot_steps:
        return False, (f"pilot: {run}/rft/metrics.jsonl holds {measured['steps']} of the pilot's {pilot_steps} steps; "
                       "run the pilot stage again (bash run_all.sh --from pilot)."), {"measured": measured}
    decision = gate(settings, measured)
    gpu = settings.get("PLAN_DEVICE", "gpu") == "gpu"
    scales, planned = step_seconds(settings, measured)
    if not gpu:
        scales = {}   # a CPU preset's plan is its stage times, not the GPU formulas: nothing to rescale
    after = stages[stages.index("pilot") + 1:] if "pilot" in stages else stages
    replanned = plan.plan(settings, after, scales)
    table, summary = plan.render(replanned, settings, run, {})
    lines = [f"[pilot] {measured['steps']} RFT steps measured ({settings.get('ROLLOUT_BACKEND', 'hf')} rollouts):"]
    for label, key, reference in (("rollout", "generation_s", planned["generation"]),
                                  ("update", "training_s", planned["training"]),
                                  (f"evaluation of {measured.get('eval_size')} puzzles", "eval_s", planned["eval"])):
        value = measured.get(key)
        lines.append(f"  {label:<28} {'-' if value is None else f'{value:.1f} s'}"
                     + (f" (plan: {reference:.1f} s)" if gpu else ""))
    if measured.get("completion_length") is not None:
        lines.append(f"  completions: {measured['completion_length']:.0f} tokens on average, "
                     f"{100 * measured['truncated_share']:.1f}% cut at RFT_MAX_COMPLETION_LENGTH; rollouts right "
                     f"{measured['rollout_accuracy']:.1f}% over the last 10 steps")
    if "base" in decision:
        shown = ", ".join(f"{step}: {acc:.1f}" for step, acc in measured["points"])
        trend = f"  trend: {decision['slope'] * 100:+.2f} points per 100 steps"
        if decision["slope_se"] is not None:
            trend += f" (standard error {decision['slope_se'] * 100:.2f})"
        if decision["noise"] is not None:
            trend += f"; one evaluation's binomial noise about +-{decision['noise']:.1f} points"
        lines += [f"[pilot] greedy exact accuracy (%) on {measured.get('eval_size')} test puzzles by step: {shown}",
                  trend,
                  f"  projected at RFT_STEPS={decision['rft_steps']}: {decision['projected']:.1f}% against the base's "
                  f"{decision['base']:.1f}%: {decision['gain']:+.1f} points; the minimum is PILOT_MIN_GAIN="
                  f"{decision['min_gain']:g} (rule: a straight line through every point, pilot.py's docstring)"]
    lines += ["[pilot] the rest of the run, recomputed with the measured constants:", table]
    passed = decision["passed"]
    if passed:
        lines.append(f"[pilot] PASSED: the trend reaches {decision['target']:.1f}% by step {decision['rft_steps']}; "
                     "the run goes on.")
    else:
        why = decision.get("reason") or (f"the trend reaches {decision['projected']:.1f}% by step "
                                         f"{decision['rft_steps']}, short of {decision['target']:.1f}%")
        head = "[pilot] NOT PASSED, going on because IGNORE_PILOT=1" if ignore else \
            "run_all.sh: pilot: RFT does not learn enough in this budget; stopped before SFT and the sources spend anything"
        lines += [f"{head}: {why}. What would:"] + advice(settings, decision, measured, replanned)
    record = {"passed": passed, "ignored": ignore and not passed, "measured": measured, "decision": decision,
              "scales": scales, "planned_step": planned, "replanned_seconds": summary["seconds"],
              "rule": "least-squares line through (step, accuracy) incl. the base, extended to RFT_STEPS; passes "
                      "when it reaches the base + PILOT_MIN_GAIN"}
    return passed or ignore, "\n".join(lines), record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the run folder (its rft/metrics.jsonl is the pilot's)")
    parser.add_argument("--settings", default="", help="a settings.json instead of the settings on stdin")
    parser.add_argument("--stages", default="", help="stages in order, space separated (default: all)")
    parser.add_argument("--summary", default="", help="also write the printed text here (run_all.sh shows it)")
    parser.add_argument("--ignore", action="store_true", help="go on (exit 0) when the gate is not passed")
    args = parser.parse_args(argv)
    settings = ({k: str(v) for k, v in json.loads(Path(args.settings).read_text()).items()} if args.settings
                else plan.read_settings(sys.stdin))
    run = Path(args.run)
    go_on, text, record = report(settings, run, args.stages.split() or list(plan.experiment_stages()), args.ignore)
    print(text, file=sys.stdout if go_on else sys.stderr)
    if args.summary:
        files.write_text_atomic(Path(args.summary), text + "\n")
    files.write_json_atomic(run / "pilot" / "pilot.json", record)
    return 0 if go_on else 2


if __name__ == "__main__":
    sys.exit(main())
