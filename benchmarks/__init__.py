"""The benchmarks eval.py knows: one small file per benchmark, listed once here.

Each file defines BENCHMARK = Benchmark(...) (benchmarks/base.py): its hub id and split, the columns it reads,
the prompt builder (row -> samples), the scorer (answer text -> score), the aggregate (records -> metrics), its
headline metric and unit, lmms-eval's token cap and pixel budget, the lmms-eval task and the official evaluation
code it follows, and the published Qwen2.5-VL-3B/7B base figures where they exist.

Adding a benchmark: write benchmarks/<name>.py with its BENCHMARK and add it to the list below (or call
register() from your own code, as tests/test_eval.py does with a fake one).
"""
from __future__ import annotations

import random
from collections import defaultdict

from benchmarks import (ai2d, chartqa, docvqa, jigsaw_task, mathvista, mme, mmmu, mmstar, ocrbench, pope, refcoco,
                        toy_prior)
from benchmarks.base import Benchmark, Context  # noqa: F401  (re-exported: what benchmark files build on)

REGISTRY: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    if benchmark.name in REGISTRY and REGISTRY[benchmark.name] is not benchmark:
        raise ValueError(f"benchmark {benchmark.name!r} is registered twice")
    REGISTRY[benchmark.name] = benchmark
    return benchmark


for _module in (jigsaw_task, toy_prior, refcoco, docvqa, mme, mmstar, pope, mmmu, chartqa, ai2d, ocrbench, mathvista):
    register(_module.BENCHMARK)


def get(name: str) -> Benchmark | None:
    return REGISTRY.get(name)


def registry_text() -> str:
    lines = ["benchmarks (name: metric [unit] | default data | max new tokens | lmms-eval task):"]
    for b in REGISTRY.values():
        data = f"{b.hub_id} [{b.split}]" if b.hub_id else f"--data {b.name}=PATH [{b.split}]"
        lines.append(f"  {b.name:<10} {b.metric} [{b.unit}] | {data} | {b.max_new_tokens} | {b.lmms_eval_task}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Data: open a benchmark's split, pick the seeded subset, export probe rows (eval.py and analyze.py share these)
# ----------------------------------------------------------------------------------------------------------
def parse_data_flag(text: str, flag: str = "--data") -> dict[str, str]:
    """'jigsaw=data/jigsaw,mme=/copies/MME' -> {'jigsaw': 'data/jigsaw', 'mme': '/copies/MME'}."""
    import common
    out = {}
    for item in [s.strip() for s in (text or "").split(",") if s.strip()]:
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            common.fail(f"{flag} entry {item!r}: expected NAME=PATH (e.g. {flag} jigsaw=data/jigsaw,mme=/copies/MME).")
        if name not in REGISTRY:
            common.fail(f"{flag} {name}: no such benchmark; known: {', '.join(REGISTRY)}.")
        if name in out:
            common.fail(f"{flag} {name} is given twice.")
        out[name] = path
    return out


def open_data(bench: Benchmark, source: str | None, flag: str = "--data"):
    """The benchmark's split from a local save_to_disk folder, a parquet file/folder (a hub snapshot), a .jsonl
    file, or the hub id; columns checked here, before any model is loaded. A benchmark without a hub default
    and without a local copy is an error (never a scan of the working folder)."""
    import re
    from pathlib import Path

    import common
    from datasets import load_dataset
    where = f"{flag} {bench.name}={source}"
    if not source:
        if bench.hub_id is None:
            common.fail(f"benchmark {bench.name} has no hub copy: give {flag} {bench.name}=PATH "
                        f"({bench.local_hint or 'a local copy'}).")
        source = bench.hub_id
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "state.json")):
            # its split alone (common.load_saved: an empty split is an error line, not datasets' IndexError)
            dataset = common.load_saved(path, bench.split, where, f"the benchmark reads '{bench.split}'")
        elif path.is_dir() or path.suffix == ".parquet":
            files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
            if not files:
                common.fail(f"{where}: neither a save_to_disk folder nor a folder of .parquet files.")
            in_split = [f for f in files if re.search(rf"(^|[/_-]){re.escape(bench.split)}([-_.]|$)", str(f))]
            dataset = load_dataset("parquet", data_files=[str(f) for f in (in_split or files)], split="train")
        elif path.suffix in (".jsonl", ".json"):
            dataset = load_dataset("json", data_files=str(path), split="train")
        else:
            common.fail(f"{where}: expected a save_to_disk folder, parquet file/folder or .jsonl file.")
    elif bench.hub_id is not None and re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        try:
            dataset = load_dataset(source, bench.config, split=bench.split, revision=bench.revision)
        except Exception as err:  # offline, gated, renamed: all end the same way for the user
            common.fail(f"{bench.name}: could not load hub data set {source} (split {bench.split}): "
                        f"{err.__class__.__name__}: {str(err)[:300]}. On an offline machine, download it elsewhere "
                        f"(datasets save_to_disk or the hub's parquet files) and pass {flag} {bench.name}=/path/to/copy.")
    else:
        common.fail(f"{where}: no such file or folder" + (f" (and not a hub id like {bench.hub_id})." if bench.hub_id
                                                          else f"; {bench.name} needs {bench.local_hint}."))
    missing = [c for c in bench.columns if c not in dataset.column_names]
    if missing:
        common.fail(f"{bench.name} data {source}: missing column(s) {missing}; it has {dataset.column_names}. "
                    f"Point {flag} {bench.name}=PATH at a copy of {bench.hub_id or 'the data set'} with its original columns.")
    return dataset


def select_rows(dataset, bench: Benchmark, limit: int, seed: int) -> list[int]:
    """All row indices, or a fixed seeded subset of `limit` rows (whole groups for MME: both questions of an
    image). Seeded by (seed, benchmark), independent of the model, so every model sees the same rows. Nested: the
    first `limit` rows of one seeded order, so a smaller limit's rows are among a larger one's (the checkpoints'
    --checkpoint_limit rows are rows the final models and the base were scored on too; report.py scores every point
    of a curve on those common rows). random.sample is not nested across sizes: it switches algorithms with k."""
    n = len(dataset)
    if limit <= 0 or limit >= n:
        return list(range(n))
    rng = random.Random(f"{seed}/{bench.name}")
    if bench.group_column:
        groups = defaultdict(list)
        for i, key in enumerate(dataset[bench.group_column]):
            groups[key].append(i)
        keys = sorted(groups)
        rows = []
        for key in rng.sample(keys, len(keys)):
            if len(rows) >= limit:
                break
            rows.extend(groups[key])
        return sorted(rows)
    order = list(range(n))
    rng.shuffle(order)
    return sorted(order[:limit])


def probe_rows(names: list[str], data: dict[str, str], limit: int, seed: int, per_benchmark: int = 0,
               flag: str = "--probe_data") -> list[dict]:
    """The prior-knowledge probes of analyze.py: the same seeded --limit subset of each benchmark that eval.py
    scores, one row per sample: id, images, prompt, answer (the benchmark's reference as text, the first one
    where there are several), benchmark. Prompts are built at each benchmark's own pixel budget.
    per_benchmark > 0 keeps that many rows of each benchmark's evaluated subset (seeded), so the probes stay
    inside what eval.py scores without decoding every image of a 500-row subset."""
    rows = []
    for name in names:
        bench = REGISTRY.get(name)
        if bench is None:
            import common
            common.fail(f"probes: no benchmark {name!r}; known: {', '.join(REGISTRY)}.")
        dataset = open_data(bench, data.get(name), flag)
        ctx = Context(min_pixels=bench.min_pixels, max_pixels=bench.max_pixels)
        chosen = select_rows(dataset, bench, limit, seed)
        if 0 < per_benchmark < len(chosen):
            chosen = sorted(random.Random(f"{seed}/{name}/probes").sample(chosen, per_benchmark))
        for row_index in chosen:
            for k, s in enumerate(bench.build(dataset[row_index], ctx)):
                target = s["target"][0] if isinstance(s["target"], (list, tuple)) and s["target"] else s["target"]
                rows.append({"id": f"{name}/{row_index}/{k}", "images": s["images"], "prompt": s["prompt"],
                             "answer": str(target), "benchmark": name})
    return rows
