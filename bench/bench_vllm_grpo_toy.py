"""Does GRPO learn the same with the vllm backend? The toy preset's RFT stage (presets/toy.env, run_all.sh's
stage_rft flags) run twice from the same toy base, data and seed, once per --rollout_backend: held-out exact
accuracy, hit and format along the run (every --eval_steps), the mean reward of the last steps, the
sampler-vs-trainer log-prob mismatch, and the wall time of each, side by side.

The two runs cannot be equal token for token: the backends draw from the same distribution with different random
streams, so the comparison is statistical (one seed each here; the toy's seed-to-seed spread is in docs/LOG.md).

    PRESET=toy RUN=runs/toyv bash run_all.sh --only base && PRESET=toy RUN=runs/toyv bash run_all.sh --only data
    python bench/bench_vllm_grpo_toy.py --run runs/toyv --out /tmp/grpo_toy      # ~20 min on 2 CPU cores
Needs vllm (pip install --no-deps -r requirements-vllm.txt).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import files  # noqa: E402


@dataclass
class Args:
    run: str = "runs/toyv"
    """a toy run folder holding base/final (the toy base model) and data/jigsaw (run_all.sh's base and data stages)"""
    out: str = "/tmp/grpo_toy"
    """where the two rft.py runs and bench_vllm_grpo_toy.json go"""
    steps: int = 0
    """GRPO steps (0: the toy preset's RFT_STEPS)"""
    eval_steps: int = 20
    """held-out evaluation every N steps (the toy preset's RFT_SAVE_STEPS: where the report's curve is drawn)"""
    seed: int = 0
    """rft.py --seed of both runs"""
    threads: int = 1
    """OMP_NUM_THREADS of each run (1: on a shared 2-core machine two threads spin-wait; conftest.py says why)"""


def preset_values(path: Path) -> dict[str, str]:
    """The `: "${VAR:=value}"` assignments of a preset file."""
    return dict(re.findall(r':\s*"\$\{([A-Z_0-9]+):=([^}]*)\}"', path.read_text()))


def main(argv=None) -> dict:
    args = common.parse_args(Args, __doc__, argv)
    import vllm_engine
    vllm_engine.check_backend("vllm")
    run, out = Path(args.run), Path(args.out)
    base, data = run / "base" / "final", run / "data" / "jigsaw"
    if not (base / "config.json").exists() or not data.exists():
        common.fail(f"--run {run}: no base/final or data/jigsaw; build them with PRESET=toy RUN={run} bash run_all.sh "
                    "--only base, then --only data.")
    toy = preset_values(ROOT / "presets" / "toy.env")
    steps = args.steps or int(toy["RFT_STEPS"])
    results = {"args": vars(args), "preset": {k: toy[k] for k in (
        "RFT_STEPS", "RFT_BATCH", "GROUP_SIZE", "LR_RFT", "BETA", "TEMPERATURE", "RFT_MAX_COMPLETION_LENGTH",
        "RFT_MICRO_BATCH", "PRECISION", "OPTIMIZER", "MIN_PIXELS", "MAX_PIXELS")}, "steps": steps}
    for backend in ("hf", "vllm"):
        folder = out / backend
        command = [sys.executable, str(ROOT / "rft.py"), "--model", str(base), "--data", str(data),
                   "--output_dir", str(folder), "--overwrite", "--max_steps", str(steps), "--batch_size",
                   toy["RFT_BATCH"], "--num_generations", toy["GROUP_SIZE"], "--lr", toy["LR_RFT"], "--beta",
                   toy["BETA"], "--temperature", toy["TEMPERATURE"], "--max_completion_length",
                   toy["RFT_MAX_COMPLETION_LENGTH"], "--micro_batch_size", toy["RFT_MICRO_BATCH"],
                   "--no_gradient_checkpointing", "--precision", toy["PRECISION"], "--optimizer", toy["OPTIMIZER"],
                   "--min_pixels", toy["MIN_PIXELS"], "--max_pixels", toy["MAX_PIXELS"], "--min_answer_image_mi",
                   toy["MIN_ANSWER_IMAGE_MI"], "--eval_steps", str(args.eval_steps), "--save_steps", str(steps),
                   "--seed", str(args.seed), "--rollout_backend", backend]
        start = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        seconds = time.perf_counter() - start
        lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        evals = [m for m in lines if "eval_accuracy" in m]
        train = [m for m in lines if "reward" in m]
        last = train[-20:]
        results[backend] = {
            "seconds": round(seconds, 1),
            "curve": [{"step": m["step"], "exact": m["eval_accuracy"], "hit": m["eval_hit"],
                       "format": m["eval_format_rate"]} for m in evals],
            "final_exact": evals[-1]["eval_accuracy"], "final_hit": evals[-1]["eval_hit"],
            "final_format": evals[-1]["eval_format_rate"],
            "reward_last_20_steps": sum(m["reward"] for m in last) / len(last),
            "sampling_logp_difference_mean": sum(m["sampling_logp_difference_mean"] for m in train) / len(train),
            "sampling_logp_difference_max": max(m["sampling_logp_difference_max"] for m in train)}
        print(f"[bench] {backend}: exact {results[backend]['final_exact']:.3f} (hit {results[backend]['final_hit']:.3f},"
              f" format {results[backend]['final_format']:.3f}) after {steps} steps, reward of the last 20 steps "
              f"{results[backend]['reward_last_20_steps']:.3f}, {seconds:.0f} s", flush=True)
    print("[bench] held-out exact accuracy along the run (hf | vllm):")
    for a, b in zip(results["hf"]["curve"], results["vllm"]["curve"]):
        print(f"  step {a['step']:>4}: {a['exact']:.3f} | {b['exact']:.3f}")
    print(f"[bench] wall time vllm / hf: {results['vllm']['seconds'] / results['hf']['seconds']:.2f}; mismatch mean "
          f"(hf {results['hf']['sampling_logp_difference_mean']:.1e}, vllm "
          f"{results['vllm']['sampling_logp_difference_mean']:.1e})")
    files.write_json_atomic(out / "bench_vllm_grpo_toy.json", results)
    return results


if __name__ == "__main__":
    main()
