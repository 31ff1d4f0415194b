"""Bench: first-order influence scores (one backward pass per sample) against the exact pairwise method
(one SGD step per training sample, every probe re-scored), on the toy Qwen2.5-VL; and the memory of per-sample
LoGra-projected gradients as a function of r, measured on the toy model and counted for the real 3B/7B configs.

Everything is built in memory (toy model in a temp folder, procedural jigsaw samples and toy prior questions), so
the bench needs neither the hub nor the `datasets` package.

    python bench/bench_influence.py                                  # tiny model, CPU, 8 x 8 pairs
    python bench/bench_influence.py --size small --n_u 16 --n_v 16 --ranks 4,8,16,32,64 --out runs/bench_influence.json

Worked example of the output lines:
    exact pairwise   8 x 8 pairs: 12.1 s  (8 steps + 64 probe forwards)
    first-order full 16 backward passes: 1.9 s; Pearson 0.9999, sign agreement 100%
    projected r=8    ... dims 256, Pearson 0.93 with exact; per-sample store 1.0 KiB; peak extra (CUDA) ...
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import analyze  # noqa: E402
import common  # noqa: E402
import files  # noqa: E402
import jigsaw  # noqa: E402
import memory  # noqa: E402
import sequences  # noqa: E402
import toy  # noqa: E402


@dataclass
class Args:
    size: str = "tiny"
    """toy model size: tiny (tests) or small (the toy preset)"""
    n_u: int = 8
    """training samples (half non_rea-like answer-only targets, half reasoning-like targets)"""
    n_v: int = 8
    """probe samples (toy prior-knowledge questions with their reference answers)"""
    eta: float = 1e-4
    """SGD step of the exact method (analyze.py's default)"""
    ranks: str = "4,8,16,32"
    """LoGra ranks r to measure (r x r block per adapted linear layer)"""
    dtype: str = "float32"
    """model dtype (float32 as analyze.py's default)"""
    device: str = ""
    """cuda or cpu (default: cuda when available)"""
    threads: int = 1
    """CPU intra-op threads (1 avoids oversubscription on small shared machines)"""
    out: str = "runs/bench_influence.json"
    """JSON with every figure"""
    seed: int = 0
    """seed of the toy model, samples and projections"""


def build_samples(processor, n_u: int, n_v: int, seed: int) -> tuple[list[dict], list[dict]]:
    rows = jigsaw.build_rows(jigsaw.BuildArgs(source="procedural", grid="2x2", train=n_u, test=1, image_size=56,
                                              seed=seed))["train"]
    train = []
    for k, row in enumerate(rows):
        if k % 2 == 0:  # non_rea-like: answer only
            train.append(analyze.make_batch(processor, row["prompt_no_think"], row["images"], row["target_non_rea"]))
        else:           # reasoning-like: a short <think> then the answer
            train.append(analyze.make_batch(processor, row["prompt"], row["images"],
                                            f"<think>The piece at position 1 came from position {row['answer'][0]}."
                                            f"</think>\n{row['target_non_rea']}"))
    probes = [analyze.make_batch(processor, r["prompt"], r["images"], r["answer"])
              for r in toy.prior_rows("test", n_v, seed + 1, think_share=0.0)]
    return train, probes


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def real_config_memory(ranks: list[int], n_samples: int) -> dict:
    """Projected dims and bytes for Qwen2.5-VL-3B/7B (meta device: no weights, no download)."""
    out = {}
    for name in memory.REAL_CONFIGS:
        model = memory.meta_model(name)
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        adapted = analyze.match_names(linear, analyze.Args.proj_modules)
        shapes = [(model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in adapted]
        named = dict(model.named_parameters())
        lm_params = sum(named[n].numel() for n in analyze.match_names(list(named), analyze.Args.params))
        out[name] = {"adapted_layers": len(adapted), "language_model_params": lm_params,
                     "full_gradient_store_gib": n_samples * lm_params * 4 / memory.GiB,
                     "ranks": {r: {"dims": len(adapted) * r * r,
                                   "store_mib": n_samples * len(adapted) * r * r * 4 / 2 ** 20,
                                   "projection_buffers_mib": sum((i + o) * r for i, o in shapes) * 4 / 2 ** 20}
                               for r in ranks}}
        del model
    return out


def main(argv=None) -> dict:
    args = common.parse_args(Args, __doc__, argv)
    device = args.device or common.default_device()
    torch.set_num_threads(args.threads)
    common.seed_everything(args.seed)
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    results = {"config": asdict(args), "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
               "torch": torch.__version__}

    # ---- model and samples --------------------------------------------------------------------------------
    folder = tempfile.mkdtemp(prefix="bench_influence_")
    toy.build_toy_model(folder, size=args.size, seed=args.seed)
    model, processor = common.load_model_and_processor(folder, args.dtype, device=device)
    model.eval()
    train, probes = build_samples(processor, args.n_u, args.n_v, args.seed)
    train = [sequences.to_device(b, device) for b in train]
    probes = [sequences.to_device(b, device) for b in probes]
    named = dict(model.named_parameters())
    params = [named[n] for n in analyze.match_names(list(named), analyze.Args.params)]
    analyze.set_trainable(model, params)
    results["stepped_params"] = sum(p.numel() for p in params)
    base = [analyze.score_sample(model, b)["token_logprobs"].sum().item() for b in probes]
    tokens_u = torch.tensor([int(b["completion_mask"].sum()) for b in train])
    # warm-up (first calls allocate and pick kernels)
    analyze.summed_logprob_gradient(model, probes[0], params, torch.float32)

    # ---- exact pairwise: N_u steps, N_u x N_v re-scorings ------------------------------------------------------
    synchronize(device)
    t0 = time.perf_counter()
    backup = analyze.backup_params(params, "cpu" if device == "cpu" else device)
    exact = torch.zeros(args.n_v, args.n_u, dtype=torch.float64)
    for j, batch in enumerate(train):
        after = analyze.exact_step(model, params, backup, batch, args.eta, probes)
        for i, scored in enumerate(after):
            exact[i, j] = scored["token_logprobs"].sum().item() - base[i]
    synchronize(device)
    results["exact"] = {"seconds": time.perf_counter() - t0, "steps": args.n_u, "probe_forwards": args.n_u * args.n_v}
    del backup
    print(f"exact pairwise   {args.n_v} x {args.n_u} pairs: {results['exact']['seconds']:.2f} s "
          f"({args.n_u} steps + {args.n_u * args.n_v} probe forwards)")

    # ---- first-order, full gradients and projected ---------------------------------------------------------------
    def first_order(proj_dim: int) -> dict:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        synchronize(device)
        start = time.perf_counter()
        grads, info = analyze.per_sample_gradients(model, probes + train, params, proj_dim, analyze.Args.proj_modules,
                                                   args.seed, desc=f"r={proj_dim}")
        grads = grads.double()
        scores = analyze.first_order_delta(grads[:args.n_v] @ grads[args.n_v:].T, tokens_u, args.eta)
        synchronize(device)
        seconds = time.perf_counter() - start
        record = {"seconds": seconds, "backward_passes": args.n_u + args.n_v, "dims": info["dims"],
                  "pearson_vs_exact": analyze.pearson(exact, scores),
                  "sign_agreement_vs_exact": analyze.sign_agreement(exact, scores),
                  "slope_vs_exact": float((exact.flatten() @ scores.flatten()) / (scores.flatten() @ scores.flatten())),
                  "median_relative_error": float(((exact - scores).abs() / scores.abs().clamp(min=1e-300)).median()),
                  "per_sample_store_bytes": info["dims"] * 4,
                  "store_bytes": (args.n_u + args.n_v) * info["dims"] * 4}
        if device.startswith("cuda"):
            record["cuda_peak_extra_mib"] = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
        return record, scores

    results["first_order_full"], full_scores = first_order(0)
    f = results["first_order_full"]
    print(f"first-order full {f['backward_passes']} backward passes, {f['dims']:,} dims: {f['seconds']:.2f} s "
          f"(exact/first-order time {results['exact']['seconds'] / f['seconds']:.1f}x); Pearson "
          f"{f['pearson_vs_exact']:.5f}, sign agreement {f['sign_agreement_vs_exact']:.0%}, median rel. error "
          f"{f['median_relative_error']:.2g}" + (f", CUDA peak +{f['cuda_peak_extra_mib']:.1f} MiB"
                                               if "cuda_peak_extra_mib" in f else ""))
    # The projection only sees the adapted layers: separate its own error (projected vs the full gradient of
    # those layers' weights) from the error of leaving the other parameters out (that reference vs exact).
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    adapted = [model.get_submodule(n).weight for n in analyze.match_names(linear, analyze.Args.proj_modules)]
    layer_grads, _ = analyze.per_sample_gradients(model, probes + train, adapted, 0, "", args.seed)
    layer_grads = layer_grads.double()
    layer_inner = layer_grads @ layer_grads.T
    layer_scores = analyze.first_order_delta(layer_inner[:args.n_v, args.n_v:], tokens_u, args.eta)
    pairs_i, pairs_j = torch.triu_indices(args.n_u + args.n_v, args.n_u + args.n_v, offset=1)
    results["adapted_layers_full"] = {"dims": layer_grads.shape[1], "pearson_vs_exact": analyze.pearson(exact,
                                                                                                          layer_scores),
                                      "median_abs_cosine_probe_train": float(analyze.cosine_matrix(
                                          layer_grads[:args.n_v], layer_grads[args.n_v:]).abs().median())}
    print(f"adapted layers, full gradients ({layer_grads.shape[1]:,} dims): Pearson vs exact "
          f"{results['adapted_layers_full']['pearson_vs_exact']:.3f}; median |cos| probe-train "
          f"{results['adapted_layers_full']['median_abs_cosine_probe_train']:.3f}")
    results["projected"] = {}
    for r in ranks:
        record, scores = first_order(r)
        record["pearson_vs_full_first_order"] = analyze.pearson(full_scores, scores)
        record["pearson_vs_adapted_layers_cross_pairs"] = analyze.pearson(layer_scores, scores)
        grads_r, _ = analyze.per_sample_gradients(model, probes + train, params, r, analyze.Args.proj_modules,
                                                  args.seed, desc=f"r={r}")
        grads_r = grads_r.double()
        record["pearson_vs_adapted_layers_all_pairs"] = analyze.pearson(layer_inner[pairs_i, pairs_j],
                                                                        (grads_r @ grads_r.T)[pairs_i, pairs_j])
        results["projected"][r] = record
        print(f"projected r={r:<3} dims {record['dims']:>6,}: {record['seconds']:.2f} s; Pearson vs exact "
              f"{record['pearson_vs_exact']:.3f}, vs full first-order {record['pearson_vs_full_first_order']:.3f}, "
              f"vs same-layer full gradients {record['pearson_vs_adapted_layers_cross_pairs']:.3f} (probe x train) / "
              f"{record['pearson_vs_adapted_layers_all_pairs']:.3f} (all pairs of inner products), "
              f"sign agreement {record['sign_agreement_vs_exact']:.0%}; per-sample store "
              f"{record['per_sample_store_bytes'] / 1024:.1f} KiB"
              + (f", CUDA peak +{record['cuda_peak_extra_mib']:.1f} MiB" if "cuda_peak_extra_mib" in record else ""))

    # ---- the real models, counted on the meta device ------------------------------------------------------------
    n_real = 4 * 16 + 16  # analyze.py's defaults: 4 sources x --n_train 16 + --n_probe 16
    results["real_configs"] = real_config_memory(ranks, n_real)
    for name, info in results["real_configs"].items():
        per_rank = ", ".join(f"r={r}: {v['dims']:,} dims / {v['store_mib']:.2f} MiB"
                             for r, v in info["ranks"].items())
        print(f"{name}: {info['adapted_layers']} adapted layers; {n_real} samples: full LM gradients "
              f"{info['full_gradient_store_gib']:.0f} GiB vs projected {per_rank}")
    files.write_json_atomic(args.out, results)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
