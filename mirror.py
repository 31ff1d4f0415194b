r"""An offline mirror of everything a preset reads from the hub: the model, the COCO images, the benchmarks.

Compute nodes often have no internet. On a login node that has it, `--download` writes one folder (BENCH_DIR);
on the compute node `BENCH_DIR=... bash run_all.sh` then reads only from there (run_all.sh points --model,
jigsaw.py --source, eval.py --data and analyze.py --probe_data at it and sets the hub libraries offline).

    PRESET=3b BENCH_DIR=/data/mirror bash run_all.sh --download      # what run_all.sh --download runs:
    python mirror.py --download /data/mirror --model Qwen/Qwen2.5-VL-3B-Instruct \
        --benchmarks refcoco,docvqa,mme,mmstar,pope,mmmu --source detection-datasets/coco --coco_images 3000
    python mirror.py --check /data/mirror --model Qwen/Qwen2.5-VL-3B-Instruct --benchmarks refcoco,mme
    python mirror.py --fake /tmp/mirror --model Qwen/Qwen2.5-VL-3B-Instruct   # tiny local stand-ins (rehearsal)

Layout of BENCH_DIR:
    mirror.json            what is there: model id, COCO source and image count, each benchmark's hub id, config,
                           split and rows; "fake": true for the stand-ins
    model/                 the model snapshot (huggingface_hub.snapshot_download), loadable by from_pretrained
    coco/                  COCO images as JPEG files: an image folder for `jigsaw.py --source BENCH_DIR/coco`
    <benchmark>/           the benchmark's evaluation split as a datasets save_to_disk DatasetDict (one split, its
                           hub name), e.g. refcoco/ (val), docvqa/ (validation, config DocVQA), mme/ (test)

`--fake` writes stand-ins with the hub's schemas (split names, column names and types, image fields, MMMU's
image_1..image_7 columns and string-encoded options) holding a few rows each, a folder of small images for COCO,
and a tiny random Qwen2.5-VL saved in the real layout (toy.build_toy_model) as the model: the dress rehearsal of
a real preset on a CPU (presets/rehearsal.env).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

MIRROR_FILE = "mirror.json"


def benchmark_specs() -> dict:
    """name -> (hub id, config, split, columns read) from the evaluation registry (one place for hub ids)."""
    from benchmarks import REGISTRY
    return {name: (b.hub_id, b.config, b.split, tuple(b.columns)) for name, b in REGISTRY.items()}


def read_manifest(root: Path) -> dict:
    path = root / MIRROR_FILE
    return json.loads(path.read_text()) if path.is_file() else {"benchmarks": {}}


def write_manifest(root: Path, manifest: dict) -> None:
    import files
    files.write_text_atomic(root / MIRROR_FILE, json.dumps(manifest, indent=2) + "\n")


def save_split(dataset, split: str, out: Path) -> None:
    """One split as a DatasetDict folder, swapped in whole so a half-written copy is never read."""
    from datasets import DatasetDict
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    DatasetDict({split: dataset}).save_to_disk(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# ----------------------------------------------------------------------------------------------------------
# --download (a machine with internet)
# ----------------------------------------------------------------------------------------------------------
def download(root: Path, model: str, benchmarks: list[str], coco_source: str, coco_images: int,
             load_dataset=None, snapshot_download=None) -> dict:
    """Fetch what is missing; entries already in mirror.json are kept (rerun after an interruption)."""
    if load_dataset is None:
        from datasets import load_dataset
    root.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(root)
    specs = benchmark_specs()
    for name in benchmarks:
        if name not in specs or specs[name][0] is None:
            raise SystemExit(f"mirror.py: benchmark {name} has no hub data set to download "
                             f"(known: {', '.join(n for n, s in specs.items() if s[0])}).")
        hub_id, config, split, _ = specs[name]
        if name in manifest["benchmarks"] and (root / name / "dataset_dict.json").is_file():
            print(f"[mirror] {name}: already there")
            continue
        print(f"[mirror] {name}: {hub_id} {config or ''} split {split}")
        # Only the split that is evaluated: `datasets` downloads every split of a repo unless one is named.
        dataset = load_dataset(hub_id, config, split=split) if config else load_dataset(hub_id, split=split)
        save_split(dataset, split, root / name)
        manifest["benchmarks"][name] = {"hub_id": hub_id, "config": config, "split": split, "rows": len(dataset)}
        write_manifest(root, manifest)
    if coco_source and coco_source != "procedural" and manifest.get("coco", {}).get("images", 0) < coco_images:
        print(f"[mirror] coco: {coco_images} images streamed from {coco_source}")
        import jigsaw
        folder = root / "coco"
        folder.mkdir(exist_ok=True)
        count = 0
        for image_id, image in jigsaw.iter_hub_images(coco_source, "train", "image", "image_id"):
            image.save(folder / f"{str(image_id).replace('/', '_')}.jpg", quality=95)
            count += 1
            if count >= coco_images:
                break
        manifest["coco"] = {"source": coco_source, "images": count}
        write_manifest(root, manifest)
    if model and manifest.get("model") != model:
        if snapshot_download is None:
            from huggingface_hub import snapshot_download
        print(f"[mirror] model: {model}")
        snapshot_download(repo_id=model, local_dir=str(root / "model"))
        manifest["model"] = model
        write_manifest(root, manifest)
    print(f"[mirror] {root}: " + ", ".join(sorted(manifest["benchmarks"])) + " + coco + model")
    return manifest


# ----------------------------------------------------------------------------------------------------------
# --check (run_all.sh, before any stage)
# ----------------------------------------------------------------------------------------------------------
def check(root: Path, model: str, benchmarks: list[str], coco_source: str, preset: str = "") -> list[str]:
    """What is missing, each problem naming the data set and the command that fetches it."""
    fetch = (f"run on a machine with internet: PRESET={preset or '<preset>'} BENCH_DIR={root} bash run_all.sh "
             "--download")
    if not (root / MIRROR_FILE).is_file():
        return [f"BENCH_DIR={root} is not a mirror (no {MIRROR_FILE}); {fetch}"]
    manifest = read_manifest(root)
    problems = []
    for name in benchmarks:
        if name in ("jigsaw", "toy_prior"):
            continue
        if not (root / name / "dataset_dict.json").is_file():
            problems.append(f"BENCH_DIR={root} has no {name} (expected {root / name}/, a save_to_disk copy of its "
                            f"evaluation split); {fetch}")
    if coco_source and coco_source != "procedural" and not any((root / "coco").glob("*.jpg")):
        problems.append(f"BENCH_DIR={root} has no COCO images (expected {root / 'coco'}/*.jpg, from "
                        f"{coco_source}); {fetch}")
    if model and not Path(model).exists():
        if not (root / "model" / "config.json").is_file():
            problems.append(f"BENCH_DIR={root} has no model snapshot (expected {root / 'model'}/config.json, "
                            f"{model}); {fetch}")
        elif manifest.get("model") != model:
            problems.append(f"BENCH_DIR={root} holds the model {manifest.get('model')!r}, the preset wants {model!r}; "
                            f"{fetch} into another folder")
    return problems


# ----------------------------------------------------------------------------------------------------------
# --fake (tiny stand-ins with the hub's schemas, for the rehearsal)
# ----------------------------------------------------------------------------------------------------------
def _photo(rng: random.Random, width: int, height: int):
    """A small 'photo': a smooth colour field with a few shapes (JPEG-friendly, not a flat colour)."""
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (width, height))
    base = [rng.randint(0, 255) for _ in range(6)]
    pixels = image.load()
    for y in range(height):
        for x in range(width):
            pixels[x, y] = (int(base[0] + (base[1] - base[0]) * x / width), int(base[2] + (base[3] - base[2]) * y / height),
                            (base[4] + base[5] * (x + y)) % 256)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.randint(0, width - 20), rng.randint(0, height - 20)
        draw.ellipse((x0, y0, x0 + rng.randint(10, 40), y0 + rng.randint(10, 40)),
                     fill=tuple(rng.randint(0, 255) for _ in range(3)))
    return image


def fake_benchmark(name: str, rows: int, rng: random.Random):
    """(split, Dataset) with the hub copy's split name, columns and feature types (from its data set card)."""
    from datasets import Dataset, Features, Image, List, Value
    photo = lambda: _photo(rng, 96, 72)  # noqa: E731
    if name == "refcoco":   # lmms-lab/RefCOCO (splits val/test/testA/testB)
        features = Features({"question_id": Value("string"), "image": Image(), "question": Value("string"),
                             "answer": List(Value("string")), "segmentation": List(Value("float32")),
                             "bbox": List(Value("float32")), "iscrowd": Value("int8"), "file_name": Value("string")})
        data = [{"question_id": str(1000 + i), "image": photo(), "question": "Please carefully observe the area "
                 "circled in the image and come up with a caption for the area.", "answer": ["red ball", "the ball"],
                 "segmentation": [10.0, 10.0, 40.0, 10.0, 40.0, 30.0], "bbox": [10.0, 10.0, 30.0, 20.0],
                 "iscrowd": 0, "file_name": f"COCO_train2014_{i:012d}.jpg"} for i in range(rows)]
        return "val", Dataset.from_list(data, features=features)
    if name == "docvqa":    # lmms-lab/DocVQA, config DocVQA (splits validation/test)
        features = Features({"questionId": Value("string"), "question": Value("string"),
                             "question_types": List(Value("string")), "image": Image(), "docId": Value("int64"),
                             "ucsf_document_id": Value("string"), "ucsf_document_page_no": Value("string"),
                             "answers": List(Value("string")), "data_split": Value("string")})
        data = [{"questionId": str(5000 + i), "question": "What is the date on the letter?", "question_types":
                 ["handwritten"], "image": photo(), "docId": 100 + i, "ucsf_document_id": f"doc{i}",
                 "ucsf_document_page_no": "1", "answers": ["May 5, 1972"], "data_split": "val"} for i in range(rows)]
        return "validation", Dataset.from_list(data, features=features)
    if name == "mme":       # lmms-lab/MME (split test): two questions per image share a question_id
        features = Features({"question_id": Value("string"), "image": Image(), "question": Value("string"),
                             "answer": Value("string"), "category": Value("string")})
        data = []
        for i in range(max(1, rows // 2)):
            image = photo()
            for answer in ("Yes", "No"):
                data.append({"question_id": f"existence/{i:06d}.jpg", "image": image, "answer": answer,
                             "question": "Is there a ball in this image? Please answer yes or no.",
                             "category": ["existence", "OCR", "commonsense_reasoning"][i % 3]})
        return "test", Dataset.from_list(data, features=features)
    if name == "mmstar":    # Lin-Chen/MMStar (split val)
        features = Features({"index": Value("int64"), "question": Value("string"), "image": Image(),
                             "answer": Value("string"), "category": Value("string"), "l2_category": Value("string"),
                             "meta_info": {"source": Value("string"), "split": Value("string"),
                                           "image_path": Value("string")}})
        data = [{"index": i, "question": "Which colour is the ball?\nOptions: A: red, B: blue, C: green, D: white",
                 "image": photo(), "answer": "ABCD"[i % 4], "category": "coarse perception",
                 "l2_category": "image scene and topic", "meta_info": {"source": "MMBench", "split": "val",
                                                                      "image_path": f"images/{i}.jpg"}}
                for i in range(rows)]
        return "val", Dataset.from_list(data, features=features)
    if name == "pope":      # lmms-lab/POPE (split test)
        features = Features({"id": Value("string"), "question_id": Value("string"), "question": Value("string"),
                             "answer": Value("string"), "image_source": Value("string"), "image": Image(),
                             "category": Value("string")})
        data = [{"id": str(i), "question_id": str(i + 1), "question": "Is there a dog in the image?",
                 "answer": ["yes", "no"][i % 2], "image_source": f"COCO_val2014_{i:012d}",
                 "image": photo(), "category": ["adversarial", "popular", "random"][i % 3]} for i in range(rows)]
        return "test", Dataset.from_list(data, features=features)
    if name == "mmmu":      # lmms-lab/MMMU (splits dev/validation/test): options as the string of a list
        columns = {"id": Value("string"), "question": Value("string"), "options": Value("string"),
                   "explanation": Value("string")}
        columns.update({f"image_{k}": Image() for k in range(1, 8)})
        columns.update({"img_type": Value("string"), "answer": Value("string"), "topic_difficulty": Value("string"),
                        "question_type": Value("string"), "subfield": Value("string")})
        data = []
        for i in range(rows):
            mc = i % 2 == 0
            row = {"id": f"validation_Art_{i + 1}", "options": "['red', 'blue', 'green', 'white']" if mc else "[]",
                   "question": "<image 1> What colour dominates the picture?" if mc else
                   "<image 1> How many shapes are drawn?", "explanation": "", "img_type": "['Photographs']",
                   "answer": "A" if mc else "3", "topic_difficulty": "Easy",
                   "question_type": "multiple-choice" if mc else "open", "subfield": "Fine Arts"}
            row.update({f"image_{k}": photo() if k == 1 else None for k in range(1, 8)})
            data.append(row)
        return "validation", Dataset.from_list(data, features=Features(columns))
    raise SystemExit(f"mirror.py --fake: no stand-in for benchmark {name} (stand-ins: refcoco, docvqa, mme, mmstar, "
                     "pope, mmmu)")


def fake(root: Path, model: str, benchmarks: list[str], coco_images: int, rows: int = 6, seed: int = 0,
         size: str = "tiny") -> dict:
    import datasets
    datasets.disable_progress_bars()
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    specs = benchmark_specs()
    manifest = {"fake": True, "benchmarks": {}}
    for name in benchmarks:
        split, dataset = fake_benchmark(name, rows, rng)
        if name in specs and specs[name][2] != split:
            raise SystemExit(f"mirror.py --fake: {name} stand-in split {split} but eval.py reads {specs[name][2]}")
        save_split(dataset, split, root / name)
        manifest["benchmarks"][name] = {"hub_id": specs.get(name, (None,))[0], "config": specs.get(name, (0, None))[1],
                                        "split": split, "rows": len(dataset), "fake": True}
    folder = root / "coco"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for i in range(coco_images):   # COCO-like sizes (640x480 scaled down) so jigsaw.py's resize path runs
        _photo(rng, 480, 360).save(folder / f"COCO_train2014_{i:012d}.jpg", quality=90)
    manifest["coco"] = {"source": "fake", "images": coco_images}
    import toy
    shutil.rmtree(root / "model", ignore_errors=True)
    toy.build_toy_model(str(root / "model"), size=size, seed=seed)
    manifest["model"] = model
    manifest["model_stand_in"] = f"toy.build_toy_model(size={size!r}): tiny random Qwen2.5-VL, real layout"
    write_manifest(root, manifest)
    print(f"[mirror] fake mirror in {root}: {', '.join(benchmarks)} ({rows} rows each), {coco_images} COCO-like "
          f"images, tiny model standing in for {model}")
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--download", metavar="BENCH_DIR", help="fetch the preset's data sets and model into BENCH_DIR")
    mode.add_argument("--check", metavar="BENCH_DIR", help="exit 2 naming each missing entry and its fetch command")
    mode.add_argument("--fake", metavar="BENCH_DIR", help="write tiny local stand-ins with the hub's schemas")
    parser.add_argument("--model", default="", help="hub id of the model (the preset's MODEL)")
    parser.add_argument("--benchmarks", default="refcoco,docvqa,mme,mmstar,pope,mmmu", help="comma-separated")
    parser.add_argument("--source", default="detection-datasets/coco", help="hub image data set for jigsaw.py")
    parser.add_argument("--coco_images", type=int, default=3000, help="COCO images to keep (N_TRAIN + N_TEST)")
    parser.add_argument("--preset", default="", help="preset name, for the fetch command in messages")
    parser.add_argument("--rows", type=int, default=6, help="--fake: rows per benchmark stand-in")
    args = parser.parse_args(argv)
    benchmarks = [b for b in args.benchmarks.split(",") if b]
    if args.download:
        download(Path(args.download), args.model, benchmarks, args.source, args.coco_images)
    elif args.fake:
        fake(Path(args.fake), args.model, benchmarks, args.coco_images, rows=args.rows)
    else:
        problems = check(Path(args.check), args.model, benchmarks, args.source, args.preset)
        for problem in problems:
            print(f"run_all.sh: {problem}", file=sys.stderr)
        return 2 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
