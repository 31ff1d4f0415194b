"""eval.py: scorers on hand-made cases, loaders on tiny data sets with the real benchmarks' columns, an
end-to-end run of the tiny model (toy_prior + jigsaw, cache, compare), and batched == one-by-one greedy."""
import json
import math

import pytest
from PIL import Image

import eval as ev




# ----------------------------------------------------------------------------------------------------------
# Scorers (values computed by hand)
# ----------------------------------------------------------------------------------------------------------
def test_anls_near_misses():
    assert ev.anls("Hello  World", ["hello world"]) == 1.0                       # case and spaces ignored
    assert ev.anls("helo world", ["hello world"]) == pytest.approx(1 - 1 / 11)   # one deletion in 11 chars
    assert ev.anls("abxy", ["abcd"]) == pytest.approx(0.5)                       # exactly at the threshold: kept
    assert ev.anls("axyze", ["abcde"]) == 0.0                                    # 1 - 3/5 = 0.4 < 0.5 -> 0
    assert ev.anls("1999", ["in 1998", "1998"]) == pytest.approx(0.75)           # best reference wins
    assert ev.anls("", ["x"]) == 0.0


def test_relaxed_accuracy_edges_and_percent():
    assert ev.relaxed_correct("105", "100") and ev.relaxed_correct("95", "100")  # exactly 5%: right
    assert not ev.relaxed_correct("105.1", "100") and not ev.relaxed_correct("94.9", "100")
    assert ev.relaxed_correct("21", "20")                                         # 1/20 = 5% again
    assert ev.relaxed_correct("12%", "0.12") and ev.relaxed_correct("0.12", "12%")
    assert not ev.relaxed_correct("12%", "12")
    assert ev.relaxed_correct("Yes", "yes") and not ev.relaxed_correct("yes.", "yes")
    assert not ev.relaxed_correct("0.0", "0")                                    # zero target: exact string only
    s = {"target": "100", "meta": {}}
    assert ev.score_chartqa("<think>...</think><answer>104</answer>", s)["correct"] == 1.0


def test_mmmu_letter_and_content_parsing():
    options = ["cat", "dog", "mitochondria", "bird"]
    assert ev.parse_mmmu_choice("(B)", options) == "B"
    assert ev.parse_mmmu_choice("C", options) == "C"
    assert ev.parse_mmmu_choice("The answer is D.", options) == "D"
    assert ev.parse_mmmu_choice("I think the right organelle here is clearly mitochondria", options) == "C"
    assert ev.parse_mmmu_choice("A is wrong, so (B) it is; not (A)", options) == "A"   # last bracket mentioned
    assert ev.parse_mmmu_choice("", options) is None
    assert ev.parse_mmmu_choice("no idea", options) is None          # lmms-eval would guess at random
    assert ev.mmmu_open_correct("The answer is 3.14", "3.14")
    assert ev.mmmu_open_correct("so the total is 1,200 dollars", "1200")
    assert ev.mmmu_open_correct("Paris", "paris")
    assert ev.mmmu_open_correct("x = 7", ["6", "7"])
    assert not ev.mmmu_open_correct("The answer is 8", "7")
    mc = {"target": "C", "meta": {"question_type": "multiple-choice", "options": options}}
    assert ev.score_mmmu("(C) mitochondria", mc) == {"correct": 1.0, "parsed": True, "extracted": "C"}
    assert ev.score_mmmu("", mc)["parsed"] is False


@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"), ("yes.", "yes"), (" YES, there is a dog.", "yes"), ("No, there is not.", "no"), ("n", "no"),
    ("The answer is no.", "no"), ("<think>hmm</think><answer>Yes</answer>", "yes"), ("", None), ("maybe", None),
    ("Is it yes or no", None)])
def test_yes_no_variants(text, expected):
    assert ev.parse_yes_no(text) == expected


def test_pope_metrics_by_hand():
    def rec(gold, pred, split="random"):
        return {"target": gold, "meta": {"category": split},
                "score": {"extracted": pred, "correct": float(pred == gold), "parsed": pred is not None}}
    records = [rec("yes", "yes"), rec("yes", None), rec("no", "yes"), rec("no", "no")]
    m = ev.yes_no_metrics(records)
    # TP 1, predicted yes 2, gold yes 2: precision 50, recall 50, F1 50; accuracy 2/4; yes-ratio 2/4.
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (50, 50, 50, 50, 50)
    assert m["parse_failure_rate"] == 25
    both = ev.pope_metrics(records + [rec("yes", "yes", "adversarial")])
    assert both["splits"]["adversarial"]["accuracy"] == 100 and both["accuracy"] == pytest.approx(75)


def test_refcoco_box_parsing_and_iou():
    assert ev.parse_box('```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "dog"}]\n```') == [10, 20, 30, 40]
    assert ev.parse_box("[1.5, 2, 3, 4.25]") == [1.5, 2, 3, 4.25]
    assert ev.parse_box("The box is (1,2,3,4).") == [1, 2, 3, 4]
    assert ev.parse_box('{"bbox_2d": [30, 40, 10, 20]}') is None      # x2 < x1: not a box
    assert ev.parse_box("a dog on the left") is None
    assert ev.box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert ev.box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert ev.resized_size(100, 50, 3136, 1605632) == (112, 56)          # sides rounded to multiples of 28
    # The model saw a 28x28 resize of a 56x56 image: its box [0,0,14,14] is [0,0,28,28] in the original.
    s = {"target": [0.0, 0.0, 28.0, 28.0], "meta": {"seen_width": 28, "seen_height": 28, "width": 56, "height": 56}}
    assert ev.score_refcoco('{"bbox_2d": [0, 0, 14, 14]}', s)["iou"] == pytest.approx(1.0)
    half = ev.score_refcoco('{"bbox_2d": [0, 0, 14, 7]}', s)                 # original [0,0,28,14]: IoU 0.5
    assert half["iou"] == pytest.approx(0.5) and half["correct"] == 1.0
    assert ev.score_refcoco("", s) == {"correct": 0.0, "iou": 0.0, "parsed": False, "extracted": None}


def test_mme_acc_plus_pairing():
    def rec(task, image, correct):
        return {"meta": {"category": task, "question_id": image}, "score": {"correct": correct, "parsed": True}}
    records = [rec("color", "a.png", 1.0), rec("color", "a.png", 1.0), rec("color", "b.png", 1.0),
               rec("color", "b.png", 0.0), rec("code_reasoning", "c.png", 0.0), rec("code_reasoning", "c.png", 0.0)]
    m = ev.mme_scores(records)
    assert m["subtasks"]["color"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "images": 2}
    assert (m["perception"], m["cognition"], m["total"]) == (125.0, 0.0, 125.0)


def test_letters_counts_mathvista_and_final_answer():
    assert ev.parse_choice_letter("B") == "B"
    assert ev.parse_choice_letter("(C) a square") == "C"
    assert ev.parse_choice_letter("Answer: D") == "D"
    assert ev.parse_choice_letter("The answer is (A).") == "A"
    assert ev.parse_choice_letter("either A or B") is None
    assert ev.parse_choice_letter("E", "ABCD") is None
    assert ev.parse_count("There are three shapes.") == 3 and ev.parse_count("2") == 2 and ev.parse_count("x") is None
    assert ev.final_answer("<think>2 or 3</think>\n<answer> 3 </answer>") == "3"
    assert ev.final_answer("<think>unfinished") == ""
    assert ev.mathvista_extract("B", "multi_choice", "text", ["1", "2", "3"], 0) == "2"
    assert ev.mathvista_extract("3", "multi_choice", "text", ["1", "2", "3"], 0) == "3"
    assert ev.mathvista_extract("It is 2.456", "free_form", "float", None, 2) == "2.46"
    assert ev.mathvista_extract("12", "free_form", "integer", None, 0) == "12"
    assert ev.mathvista_extract("[1, 2,3]", "free_form", "list", None, 0) == "[1, 2,3]"
    assert ev.mathvista_extract("seven", "free_form", "integer", None, 0) is None


def test_empty_or_garbage_predictions_count_wrong_never_crash():
    for name, bench in ev.REGISTRY.items():
        for text in ("", "\x00\ufffd)]}{", None):
            score = ev.score_record(bench, {"prediction": text, "target": _TARGETS[name], "meta": _METAS[name]})
            assert score["correct"] == 0.0, (name, text, score)
            if not text:  # empty: counted as a parse failure (garbage text is just wrong for free-text scorers)
                assert score["parsed"] is False, (name, score)


_TARGETS = {"jigsaw": [2, 1, 4, 3], "toy_prior": "3", "refcoco": [0, 0, 10, 10], "docvqa": ["x"], "mme": "yes",
            "mmstar": "A", "pope": "yes", "mmmu": "A", "chartqa": "5", "ai2d": "A", "ocrbench": ["abc"],
            "mathvista": "2"}
_METAS = {"jigsaw": {"thinking": True}, "toy_prior": {"category": "count"},
          "refcoco": {"seen_width": 28, "seen_height": 28, "width": 28, "height": 28}, "docvqa": {}, "mme": {},
          "mmstar": {}, "pope": {}, "mmmu": {"question_type": "multiple-choice", "options": ["a", "b"]},
          "chartqa": {}, "ai2d": {"letters": "AB"}, "ocrbench": {"dataset": "IIIT5K"},
          "mathvista": {"question_type": "free_form", "answer_type": "integer", "choices": [], "precision": 0}}


# ----------------------------------------------------------------------------------------------------------
# Loaders: tiny data sets with the real columns (lmms-lab dataset cards / lmms-eval task utils)
# ----------------------------------------------------------------------------------------------------------
def _image(w=64, h=32):
    return Image.new("RGB", (w, h), (200, 10, 10))


def _tiny(name):
    """(features, rows) with the columns and types of the hub data set."""
    from datasets import Features, Image as Img, List, Value
    s, i = Value("string"), Img()
    if name == "refcoco":
        return Features({"question_id": s, "image": i, "question": s, "answer": List(s), "bbox": List(Value("float32")),
                         "iscrowd": Value("int64"), "file_name": s}), \
            [{"question_id": "1", "image": _image(), "question": "", "answer": ["left dog", "brown dog"],
              "bbox": [8.0, 4.0, 16.0, 8.0], "iscrowd": 0, "file_name": "a.jpg"}]
    if name == "docvqa":
        return Features({"questionId": s, "question": s, "question_types": List(s), "image": i, "docId": Value("int64"),
                         "answers": List(s), "data_split": s}), \
            [{"questionId": "337", "question": "What is the date?", "question_types": ["form"], "image": _image(),
              "docId": 1, "answers": ["1/8/93", "january 8, 1993"], "data_split": "val"}]
    if name == "mme":
        return Features({"question_id": s, "image": i, "question": s, "answer": s, "category": s}), \
            [{"question_id": "code_reasoning/0020.png", "image": _image(), "category": "code_reasoning",
              "question": "Is a c++ code shown in the picture? Please answer yes or no.", "answer": "Yes"}]
    if name == "mmstar":
        return Features({"index": Value("int64"), "question": s, "image": i, "answer": s, "category": s,
                         "l2_category": s, "meta_info": {"source": s}}), \
            [{"index": 0, "question": "Which is red?\nOptions: A: x, B: y", "image": _image(), "answer": "A",
              "category": "coarse perception", "l2_category": "image style & quality", "meta_info": {"source": "x"}}]
    if name == "pope":
        return Features({"id": s, "question_id": s, "question": s, "answer": s, "image_source": s, "image": i,
                         "category": s}), \
            [{"id": "0", "question_id": "1", "question": "Is there a snowboard in the image?", "answer": "yes",
              "image_source": "COCO_val2014_000000310196", "image": _image(), "category": "adversarial"}]
    if name == "mmmu":
        feats = {"id": s, "question": s, "options": s, "explanation": s, "img_type": s, "answer": s,
                 "topic_difficulty": s, "question_type": s, "subfield": s}
        feats.update({f"image_{k}": i for k in range(1, 8)})
        row = {"id": "validation_Art_Theory_3", "question": "<image 1> Who painted this? <image 2>",
               "options": "['Monet', 'Manet', 'Degas']", "explanation": "", "img_type": "['Painting']", "answer": "B",
               "topic_difficulty": "Easy", "question_type": "multiple-choice", "subfield": "x"}
        row.update({f"image_{k}": (_image() if k <= 2 else None) for k in range(1, 8)})
        return Features(feats), [row]
    if name == "chartqa":
        return Features({"type": s, "question": s, "answer": s, "image": i}), \
            [{"type": "human_test", "question": "How many bars?", "answer": "5", "image": _image()}]
    if name == "ai2d":
        return Features({"question": s, "options": List(s), "answer": s, "image": i}), \
            [{"question": "Which stage?", "options": ["egg", "larva", "adult"], "answer": "1", "image": _image()}]
    if name == "ocrbench":
        return Features({"dataset": s, "question": s, "question_type": s, "answer": List(s), "image": i}), \
            [{"dataset": "IIIT5K", "question": "what is written in the image?",
              "question_type": "Regular Text Recognition", "answer": ["CENTRE"], "image": _image()}]
    if name == "mathvista":
        return Features({"pid": s, "question": s, "image": s, "decoded_image": i, "choices": List(s), "unit": s,
                         "precision": Value("float64"), "answer": s, "question_type": s, "answer_type": s,
                         "query": s}), \
            [{"pid": "1", "question": "Which angle is larger?", "image": "images/1.jpg", "decoded_image": _image(),
              "choices": ["a", "b"], "unit": None, "precision": None, "answer": "b", "question_type": "multi_choice",
              "answer_type": "text", "query": "..."}]
    raise KeyError(name)


EXPECTED = {  # (prompt must end with / contain, target)
    "refcoco": ('Locate every object that matches the description "left dog"', [8.0, 4.0, 24.0, 12.0]),
    "docvqa": ("What is the date?\nAnswer the question using a single word or phrase.", ["1/8/93", "january 8, 1993"]),
    "mme": ("Is a c++ code shown in the picture?\nAnswer the question using a single word or phrase.", "yes"),
    "mmstar": ("B: y\nAnswer with the option's letter from the given choices directly", "A"),
    "pope": ("Is there a snowboard in the image?\nAnswer the question using a single word or phrase.", "yes"),
    "mmmu": ("A. Monet\nB. Manet\nC. Degas\n\nAnswer with the option's letter from the given choices directly.", "B"),
    "chartqa": ("How many bars?\nAnswer the question with a single word.", "5"),
    "ai2d": ("Which stage?\nA. egg\nB. larva\nC. adult\nAnswer with the option's letter from the given choices "
             "directly.", "B"),
    "ocrbench": ("what is written in the image?", ["CENTRE"]),
    "mathvista": ("Which angle is larger?\nA. a\nB. b\nAnswer with the option's letter from the given choices "
                  "directly.", "b"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_loader_on_tiny_dataset(name, tmp_path):
    from datasets import Dataset, DatasetDict
    features, rows = _tiny(name)
    bench = ev.REGISTRY[name]
    DatasetDict({bench.split: Dataset.from_list(rows, features=features)}).save_to_disk(str(tmp_path / name))
    dataset = ev.open_benchmark_data(bench, str(tmp_path / name))
    samples = bench.build(dataset[0], ev.Context())
    prompt_part, target = EXPECTED[name]
    assert prompt_part in samples[0]["prompt"]
    assert samples[0]["target"] == pytest.approx(target) if name == "refcoco" else samples[0]["target"] == target
    assert all(im.mode == "RGB" for im in samples[0]["images"]) and samples[0]["images"]
    if name == "refcoco":  # one sample per referring expression; 64x32 (< min_pixels) is upscaled to 84x56 (smart_resize)
        assert len(samples) == 2 and (samples[0]["meta"]["seen_width"], samples[0]["meta"]["seen_height"]) == (84, 56)
    if name == "mmmu":     # only the images the question names
        assert len(samples[0]["images"]) == 2
    if name == "mme":      # the question's own yes/no instruction is replaced by the post-prompt
        assert "Please answer yes or no" not in samples[0]["prompt"]


def test_parquet_copy_and_schema_errors(tmp_path, capsys):
    from datasets import Dataset
    features, rows = _tiny("pope")
    folder = tmp_path / "POPE" / "data"
    folder.mkdir(parents=True)
    Dataset.from_list(rows * 3, features=features).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    dataset = ev.open_benchmark_data(ev.REGISTRY["pope"], str(tmp_path / "POPE"))   # a hub snapshot folder
    assert len(dataset) == 3 and ev.rows_pope(dataset[0], ev.Context())[0]["images"][0].size == (64, 32)
    Dataset.from_list([{k: v for k, v in rows[0].items() if k != "category"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(SystemExit):
        ev.open_benchmark_data(ev.REGISTRY["pope"], str(tmp_path / "bad"))
    assert "missing column(s) ['category']" in capsys.readouterr().err


def test_unknown_benchmark_lists_valid_ones(tmp_path, capsys, toy_model_dir):
    with pytest.raises(SystemExit):
        ev.main(["--model", str(toy_model_dir), "--benchmarks", "pope,nope", "--output", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert "['nope']" in err and all(name in err for name in ev.REGISTRY)


def test_limit_subset_is_fixed_and_keeps_mme_pairs():
    from datasets import Dataset
    ds = Dataset.from_dict({"question_id": [f"{i // 2}.png" for i in range(20)]})
    rows = ev.select_rows(ds, ev.REGISTRY["mme"], 6, seed=0)
    assert rows == ev.select_rows(ds, ev.REGISTRY["mme"], 6, seed=0) and len(rows) == 6
    assert all(r ^ 1 in rows for r in rows)                          # both questions of each image
    assert ev.select_rows(ds, ev.REGISTRY["pope"], 5, 0) != ev.select_rows(ds, ev.REGISTRY["pope"], 5, 1)


# ----------------------------------------------------------------------------------------------------------
# The tiny model: end to end, cache, compare, batched == one-by-one
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def varied_model_dir(toy_model_dir, tmp_path_factory):
    """The tiny random model with its weights spread out (std +0.1), so greedy outputs differ from prompt
    to prompt; the plain init answers '\\n' to everything, which would make the batching check vacuous."""
    import torch
    import common
    model, processor = common.load_model_and_processor(str(toy_model_dir))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    out = tmp_path_factory.mktemp("varied") / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_batched_and_one_by_one_greedy_agree(varied_model_dir, prior_data, jigsaw_data):
    import common
    from datasets import load_from_disk
    model, processor = common.load_model_and_processor(str(varied_model_dir), min_pixels=ev.DEFAULT_MIN_PIXELS,
                                                       max_pixels=ev.DEFAULT_MAX_PIXELS)
    ctx = ev.Context()
    prior, puzzles = load_from_disk(str(prior_data))["test"], load_from_disk(str(jigsaw_data))["test"]
    samples = [ev.rows_toy_prior(prior[i], ctx)[0] for i in range(12)] + \
              [ev.rows_jigsaw(puzzles[i], ctx)[0] for i in range(4)]
    batched = ev.generate_records(model, processor, samples, 8, 12, ctx)
    single = ev.generate_records(model, processor, samples, 1, 12, ctx)
    assert len({r["prediction"] for r in batched}) > 4                   # outputs really depend on the prompt
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in single]


def test_end_to_end_cache_and_compare(varied_model_dir, prior_data, jigsaw_data, tmp_path, monkeypatch):
    out = tmp_path / "base" / "results.json"
    argv = ["--model", str(varied_model_dir), "--benchmarks", "jigsaw,toy_prior", "--jigsaw_data", str(jigsaw_data),
            "--jigsaw_prompt", "thinking", "--toy_prior_data", str(prior_data), "--output", str(out),
            "--max_new_tokens", "8", "--batch_size", "8"]
    results = ev.main(argv + ["--limit", "6"])
    saved = json.loads(out.read_text())
    assert set(saved["benchmarks"]) == {"jigsaw", "toy_prior"}
    for name in ("jigsaw", "toy_prior"):
        entry = saved["benchmarks"][name]
        assert len(entry["samples"]) == 6 and entry["metrics"]["num_samples"] == 6
        correct = [r["score"]["correct"] for r in entry["samples"].values()]
        assert entry["metrics"]["accuracy"] == pytest.approx(100 * sum(correct) / 6)
        assert all("prediction" in r and "prompt" in r for r in entry["samples"].values())
    jig = next(iter(saved["benchmarks"]["jigsaw"]["samples"].values()))
    assert "<think>" in jig["prompt"]                                     # thinking style -> column prompt
    assert results["benchmarks"]["toy_prior"]["metrics"]["accuracy_by_category"]

    # Rerun without --limit: only the 16 - 6 missing prior rows (and 8 - 6 puzzles) are generated.
    generated = []
    real = ev.generate_records
    monkeypatch.setattr(ev, "generate_records", lambda m, p, samples, *a, **k: generated.extend(samples)
                        or real(m, p, samples, *a, **k))
    ev.main(argv)
    assert len(generated) == (16 - 6) + (8 - 6)
    generated.clear()
    ev.main(argv)                                                         # everything cached: no generation
    assert generated == []
    full = json.loads(out.read_text())
    assert full["benchmarks"]["toy_prior"]["metrics"]["num_samples"] == 16

    # A second "model": the same file with a better toy_prior score; compare writes the table of changes.
    other = json.loads(out.read_text())
    other["benchmarks"]["toy_prior"]["metrics"]["accuracy"] = full["benchmarks"]["toy_prior"]["metrics"]["accuracy"] + 12.5
    other_path = tmp_path / "rft" / "results.json"
    other_path.parent.mkdir()
    other_path.write_text(json.dumps(other))
    ev.main(["--compare", f"base={out}", f"rft={other_path}", "--out_dir", str(tmp_path / "cmp")])
    table = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    row = next(r for r in table["rows"] if r["benchmark"] == "toy_prior")
    assert row["deltas"]["rft"] == pytest.approx(12.5) and row["metric"] == "accuracy"
    assert "+12.5" in (tmp_path / "cmp" / "compare.md").read_text()
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert not math.isnan(next(r for r in table["rows"] if r["benchmark"] == "jigsaw")["values"]["base"])


def test_export_probes_writes_the_limited_subset(prior_data, tmp_path):
    """--export_probes: the seeded --limit subset of a benchmark as a probe set for analyze.py, no model."""
    from datasets import load_from_disk
    out = tmp_path / "probes"
    ev.main(["--export_probes", str(out), "--benchmarks", "toy_prior", "--toy_prior_data", str(prior_data),
                   "--limit", "5"])
    probes = load_from_disk(str(out))
    assert len(probes) == 5 and set(probes.column_names) >= {"images", "prompt", "answer"}
    test_rows = load_from_disk(str(prior_data))["test"]
    questions = {(r["prompt"], r["answer"]) for r in test_rows}
    assert all((p["prompt"], p["answer"]) in questions for p in probes)


def test_cache_is_dropped_when_the_weights_change(toy_model_dir, tmp_path):
    """A model folder retrained in place (run_all.sh --from) must not reuse the old model's predictions."""
    import shutil
    model = tmp_path / "model"
    shutil.copytree(toy_model_dir, model)
    args = ev.Args(model=str(model))
    bench = ev.REGISTRY["toy_prior"]
    before = ev.settings_fingerprint(args, bench, "data", 8)
    assert ev.settings_fingerprint(args, bench, "data", 8) == before
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"")  # rewritten: new modification time
    import os
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert ev.settings_fingerprint(args, bench, "data", 8) != before
