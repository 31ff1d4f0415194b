"""The experiment's table, written once: the methods the paper compares, the SFT data source each one trains on,
and the preset variables the stages read. run_all.sh reads it (`python experiment.py shell`), report.py, plan.py
and rollout_sft.py import it; nothing else spells the list.

Adding an SFT source is one row in SOURCES (rollout_sft.py builds any row whose `made_from` and `keeps` it knows;
a new kind of selection is a second edit there). For example, SFT on the base model's own correct samples
(Retaining by Doing, arXiv 2510.18874) is
    Source("rea_base_rollout", "SFT-Rea-Base-Rollout", made_from="base", keeps="correct_sample"),
and run_all.sh samples it, trains sft_rea_base_rollout on it, evaluates its checkpoints and analyses it; the
report shows it as one more method.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    name: str
    """rollout_sft.py --source, and the folder <run>/data/sources/<name>"""
    paper_name: str
    """what the report calls the SFT run trained on it (the paper's names)"""
    made_from: str
    """answers (the data set's own true answers), teacher (reasoning another model wrote), or the checkpoint whose
    samples it keeps: rft_final, rft_early (RFT_EARLY_STEP) or base"""
    keeps: str
    """answer (the true answer alone), trace (the teacher's reasoning + the true answer), correct_sample (a sample
    whose answer is right, as written) or own_think (the sample's <think> text + the true answer)"""
    prompt_style: str = "thinking"
    """jigsaw prompt of the SFT rows and of the trained model's evaluation: thinking or answer_only"""
    own_stage: bool = False
    """trained in a stage of its own before RFT (sft_non_rea: it needs no RFT model); else in sft_sources"""

    @property
    def method(self) -> str:
        """The SFT run trained on this source: its folder <run>/<method>/ and its key in every results table."""
        return f"sft_{self.name}"

    @property
    def sampled(self) -> bool:
        return self.made_from in SAMPLED_FROM


# The checkpoints a sampled source can come from, as run_all.sh names them (rft_early: RFT_EARLY_STEP).
SAMPLED_FROM = ("rft_final", "rft_early", "base")

SOURCES = [
    Source("non_rea", "SFT-Non-Rea", made_from="answers", keeps="answer", prompt_style="answer_only", own_stage=True),
    Source("rea_external", "SFT-Rea-External (stand-in for SFT-Rea-4o)", made_from="teacher", keeps="trace"),
    Source("rea_grpo_rollout", "SFT-Rea-GRPO-Rollout", made_from="rft_final", keeps="correct_sample"),
    Source("rea_self_generated", "SFT-Rea-Self-Generated", made_from="rft_early", keeps="own_think"),
]
SOURCE_NAMES = tuple(s.name for s in SOURCES)


@dataclass(frozen=True)
class Method:
    name: str
    """the run's folder <run>/<name>/ and its key in results, metrics and the report"""
    paper_name: str
    prompt_style: str
    """the jigsaw prompt it is evaluated with"""


# The report's order: the base, RFT, then an SFT run per source.
METHODS = [Method("base", "Base model", "thinking"), Method("rft", "RFT", "thinking")] + \
    [Method(s.method, s.paper_name, s.prompt_style) for s in SOURCES]
# The training runs in the order their stages run (sft_non_rea before rft, the other SFT runs after the sources).
TRAINING_ORDER = [s.method for s in SOURCES if s.own_stage] + ["rft"] + [s.method for s in SOURCES if not s.own_stage]


# ----------------------------------------------------------------------------------------------------------
# Preset variables: every one a preset must set (presets/<name>.env), the stages that read it, and its range.
# run_all.sh records each stage's variables in <run>/settings/<stage>.json; plan.py checks them before a run.
# ----------------------------------------------------------------------------------------------------------
STAGES = ("base", "data", "eval_base", "pilot", "sft_non_rea", "rft", "sources", "sft_sources", "eval", "analyze",
          "report")
ALL = STAGES
RFT = ("pilot", "rft")
PRESET_VARIABLES = {   # name: (stages that depend on it, range of a number or None)
    # the model and how every stage runs it
    "PLAN_DEVICE": ((), None), "BUILD_TOY_BASE": (ALL, "[0, 1]"), "MODEL": (ALL, None), "PRECISION": (ALL, None),
    "OPTIMIZER": (ALL, None), "GRADIENT_CHECKPOINTING": (ALL, "[0, 1]"), "MIN_PIXELS": (ALL, ">= 0"),
    "MAX_PIXELS": (ALL, ">= 1"), "KEEP_RESUME_STATE": (ALL, "[0, 1]"), "JOBS": (("sources", "sft_sources", "eval"), ">= 1"),
    # the command sft.py and rft.py run under: empty = $PY, or accelerate launch with configs/accelerate_fsdp2.yaml
    "LAUNCH": (("base", "sft_non_rea") + RFT + ("sft_sources",), None),
    # the toy world's base model (BUILD_TOY_BASE=1 only)
    "TOY_SIZE": (("base",), None), "PRIOR_PRETRAIN": (("base",), ">= 1"), "PRIOR_TRAIN": (("base",), ">= 1"),
    "PRIOR_TEST": (("base",), ">= 1"), "TOY_FORMAT_SHARE": (("base",), "[0, 1]"),
    "BASE_PRETRAIN_STEPS": (("base",), ">= 1"), "BASE_STEPS": (("base",), ">= 1"), "BASE_BATCH": (("base",), ">= 1"),
    "BASE_GRAD_ACCUM": (("base",), ">= 1"), "LR_BASE_PRETRAIN": (("base",), "> 0"), "LR_BASE": (("base",), "> 0"),
    # the task's data
    "SOURCE": (("data",), None), "GRID": (("data",), None), "JIGSAW_IMAGE_SIZE": (("data",), ">= 28"),
    "N_TRAIN": (("data",), ">= 1"), "N_TEST": (("data",), ">= 1"),
    # SFT (SFT-Non-Rea and every source)
    "BATCH_SIZE": (("sft_non_rea", "sft_sources"), ">= 1"), "SFT_STEPS": (("sft_non_rea", "sft_sources"), ">= 1"),
    "SAVE_STEPS": (("sft_non_rea", "sft_sources"), ">= 0"), "SFT_SAVE_AT": (("sft_non_rea", "sft_sources"), None),
    "LR_SFT": (("sft_non_rea", "sft_sources"), "> 0"),
    # RFT (GRPO)
    # (the pilot runs the first PILOT_STEPS steps of the same RFT run, so it reads every RFT variable)
    "RFT_STEPS": (RFT, ">= 2"), "RFT_BATCH": (RFT, ">= 1"), "GROUP_SIZE": (RFT, ">= 2"),
    "LR_RFT": (RFT, "> 0"), "BETA": (RFT, ">= 0"), "TEMPERATURE": (RFT + ("sources",), "> 0"),
    "RFT_MAX_COMPLETION_LENGTH": (("eval_base",) + RFT + ("sources", "analyze"), ">= 1"),
    "RFT_SAVE_STEPS": (RFT, ">= 0"), "RFT_SAVE_AT": (RFT, None), "RFT_EARLY_STEP": (RFT + ("sources",), ">= 1"),
    "RFT_MICRO_BATCH": (RFT, ">= 1"), "MIN_ANSWER_IMAGE_MI": (("eval_base",) + RFT, ">= 0"),
    "RFT_EVAL_STEPS": (RFT, ">= 0"), "RFT_EVAL_SIZE": (RFT, ">= 0"),
    # the pilot: the first PILOT_STEPS RFT steps, evaluated every PILOT_EVAL_STEPS, gate the rest (pilot.py)
    "PILOT_STEPS": (RFT, ">= 0"), "PILOT_EVAL_STEPS": (("pilot",), ">= 1"), "PILOT_MIN_GAIN": (("pilot",), ">= 0"),
    # the SFT data sources
    "ROLLOUT_K": (("sources",), ">= 1"), "ROLLOUT_LIMIT": (("sources",), ">= 0"),
    "ROLLOUT_BATCH_SIZE": (("sources",), ">= 1"), "ROLLOUT_TARGET_ROWS": (("sources",), ">= 0"),
    "PLACEHOLDER_SOURCES": (("sources",), "[0, 1]"), "MIN_SOURCE_ROWS": (("sources",), ">= 0"),
    "TEACHER_URL": (("sources",), None), "TEACHER_MODEL": (("sources",), None),
    # evaluation and analysis
    "BENCHMARKS": (("eval_base", "eval", "analyze"), None), "EVAL_BATCH_SIZE": (("eval_base", "eval"), ">= 1"),
    "EVAL_LIMIT": (("eval_base", "eval", "analyze"), ">= 0"), "CHECKPOINT_EVAL_LIMIT": (("eval",), ">= 0"),
    "JIGSAW_MAX_COMPLETION_LENGTH": (("eval_base", "eval"), ">= 1"), "ANALYZE_N": (("analyze",), ">= 1"),
    "ANALYZE_PROJ_DIM": (("analyze",), ">= 0"), "KL_PUZZLES": (("analyze",), ">= 0"), "KL_SAMPLES": (("analyze",), ">= 1"),
    # the decoder of every decoding stage: hf (the kit's own) or vllm (vllm_engine.py, an optional install)
    "ROLLOUT_BACKEND": (("eval_base",) + RFT + ("sources", "eval", "analyze"), None),
}
TOY_BASE_VARIABLES = tuple(name for name, (stages, _) in PRESET_VARIABLES.items() if stages == ("base",))
# Set per run, not per preset (run_all.sh gives each its default): where, how many seeds, which machine.
RUN_VARIABLES = {"PRESET": None, "RUN": None, "SEEDS": ">= 1", "SEED": ">= 0", "SHARED_RUN": None, "BENCH_DIR": None,
                 "FAKE_MIRROR": "[0, 1]", "IGNORE_DISK_PLAN": "[0, 1]", "IGNORE_PILOT": "[0, 1]", "CPU_THREADS": ">= 1",
                 "PROBES": None, "PY": None, "GPU_MEMORY_GB": "> 0", "GPU_NAME": None, "IGNORE_GPU_PLAN": "[0, 1]"}


JOB_STAGES = ("sources", "sft_sources", "eval")   # stages that run their independent runs JOBS at a time


def stage_variables(stage: str) -> list[str]:
    """The variables `stage` depends on (what <run>/settings/<stage>.json records): its preset variables, the
    preset, the mirror and the seed, and the thread budget of the stages that run jobs side by side."""
    names = ["PRESET", "BENCH_DIR", "SEED"] + [name for name, (stages, _) in PRESET_VARIABLES.items()
                                               if stage in stages]
    return names + (["CPU_THREADS"] if stage in JOB_STAGES else [])


_RANGE = re.compile(r"^(>=|>|<=|<)\s*(-?[0-9.e+-]+)$|^([\[(])\s*(-?[0-9.e+-]+)\s*,\s*(-?[0-9.e+-]+)\s*([\])])$")


def in_range(value: float, spec: str) -> bool:
    """Whether `value` satisfies a range spec: '>= 1', '> 0', '[0, 1]', '(0, 1]', ... (NaN never does). The one
    reader of these specs: the presets' variables here, every stage's flags (common.check_ranges)."""
    match = _RANGE.match(spec.strip())
    if not match:
        raise ValueError(f"bad range spec {spec!r}")
    if value != value:  # NaN
        return False
    if match.group(1):
        bound = float(match.group(2))
        return {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[match.group(1)]
    low, high = float(match.group(4)), float(match.group(5))
    return (value >= low if match.group(3) == "[" else value > low) and \
        (value <= high if match.group(6) == "]" else value < high)


def source(name: str) -> Source:
    for s in SOURCES:
        if s.name == name:
            return s
    raise KeyError(name)


def shell() -> str:
    """The table as bash assignments (run_all.sh evals them): the one place run_all.sh learns the methods."""
    sft_sources = [s for s in SOURCES if not s.own_stage]
    lines = [
        f"STAGES=({' '.join(STAGES)})",
        f"METHOD_NAMES=({' '.join(m.name for m in METHODS)})",
        "declare -A METHOD_STYLE=(" + " ".join(f"[{m.name}]={m.prompt_style}" for m in METHODS) + ")",
        f"SOURCE_NAMES=({' '.join(SOURCE_NAMES)})",
        f"UNSAMPLED_SOURCES=({' '.join(s.name for s in SOURCES if not s.sampled)})",
        f"SAMPLED_SOURCES=({' '.join(s.name for s in SOURCES if s.sampled)})",
        f"TEACHER_SOURCES=({' '.join(s.name for s in SOURCES if s.made_from == 'teacher')})",
        "declare -A SAMPLED_FROM=(" + " ".join(f"[{s.name}]={s.made_from}" for s in SOURCES if s.sampled) + ")",
        f"SFT_SOURCES=({' '.join(s.name for s in sft_sources)})",
        f"SFT_SOURCE_RUNS=({' '.join(s.method for s in sft_sources)})",
        f"TRAINING_ORDER=({' '.join(TRAINING_ORDER)})",
        f"THINKING_RUNS=({' '.join(m.name for m in METHODS if m.name != 'base' and m.prompt_style == 'thinking')})",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["shell"]:
        sys.stdout.write(shell())
    elif sys.argv[1:] == ["names"]:
        print(" ".join([*PRESET_VARIABLES, *RUN_VARIABLES]))
    else:
        raise SystemExit("usage: python experiment.py shell|names   (for run_all.sh: bash assignments of the methods "
                         "table | the names of every run and preset variable)")
