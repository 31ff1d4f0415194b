"""eval.py and benchmarks/: each benchmark's official reading on hand-made answers, loaders on tiny data sets with
the real benchmarks' columns, a benchmark added by registering one record, and end-to-end runs of the tiny model
(results.json schema, strict vs lenient, the cache key, resume, batched == one-by-one greedy)."""
import json

import pytest
from PIL import Image

import benchmarks
import eval as ev
from benchmarks import Benchmark, Context, parsers
from benchmarks import ai2d, chartqa, docvqa, mathvista, mme, mmmu, mmstar, ocrbench, pope, refcoco

R = benchmarks.REGISTRY
TOY_CTX = Context(min_pixels=3136, max_pixels=2048 * 28 * 28)   # the old eval.py budget the expected sizes use


# ----------------------------------------------------------------------------------------------------------
# Official readings (values worked out by hand from each benchmark's evaluation code)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"), ("no", "no"), ("Yes, there is.", "yes"), ("None", "no"), ("nope", "no"),
    ("Not that I can see.", "no"), ("I think yes", "other"), ("y", "other"), ("", "other"), (" No", "no")])
def test_mme_reads_the_first_four_characters(text, expected):
    assert mme.parse_official(text) == expected


def test_mme_acc_plus_pairing():
    def rec(task, image, correct):
        return {"meta": {"category": task, "question_id": image}, "score": {"correct": correct, "parsed": True}}
    records = [rec("color", "a.png", 1.0), rec("color", "a.png", 1.0), rec("color", "b.png", 1.0),
               rec("color", "b.png", 0.0), rec("code_reasoning", "c.png", 0.0), rec("code_reasoning", "c.png", 0.0)]
    m = mme.aggregate(records)
    assert m["subtasks"]["color"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "images": 2}
    assert (m["perception"], m["cognition"], m["total"]) == (125.0, 0.0, 125.0)


@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"), ("Yes.", "yes"), ("yes, there is a dog", "yes"), ("No, there is not.", "no"),
    ("There is not a dog.", "no"), ("NO", "yes"), ("Yes. But no.", "yes"), ("", "yes")])
def test_pope_official_reading(text, expected):
    # POPE's evaluate.py: first sentence, words 'No'/'no'/'not' -> no, everything else -> yes.
    assert pope.parse_official(text) == expected


def test_pope_metrics_by_hand():
    def rec(gold, text, split="random"):
        s = {"target": gold, "meta": {"category": split}}
        return {**s, "score": pope.score(text, s)}
    records = [rec("yes", "Yes."), rec("yes", "No"), rec("no", "yes"), rec("no", "no")]
    m = pope.yes_no_metrics(records)
    # TP 1, predicted yes 2, gold yes 2: precision 50, recall 50, F1 50; accuracy 2/4; yes-ratio 2/4.
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (50, 50, 50, 50, 50)
    both = pope.aggregate(records + [rec("yes", "yes", "adversarial")])
    assert both["splits"]["adversarial"]["accuracy"] == 100 and both["accuracy"] == pytest.approx(75)


def test_mmstar_authors_rule_lower_case_and_macro_mean():
    s = {"target": "B", "meta": {}}
    for right in ("B", "b", "(b) cat", "Option B", "the answer is b", "B. a cat"):
        assert mmstar.score(right, s)["correct"] == 1.0, right
    for wrong in ("Answer: B", "A", "", "I think B"):
        assert mmstar.score(wrong, s)["correct"] == 0.0, wrong

    def rec(category, correct):
        return {"meta": {"category": category, "l2_category": category + "/x"}, "score": {"correct": correct,
                                                                                         "parsed": True}}
    records = [rec("math", 1.0)] * 3 + [rec("math", 0.0)] + [rec("logic", 0.0)] * 2   # 75% and 0%
    m = mmstar.aggregate(records)
    assert m["accuracy"] == pytest.approx(37.5)              # macro: (75 + 0) / 2
    assert m["micro_accuracy"] == pytest.approx(50.0)        # 3 of 6
    assert m["accuracy_by_category"] == {"logic": 0.0, "math": 75.0}


def test_ai2d_lmms_eval_reading_accepts_lower_case():
    s = {"target": "B", "meta": {"letters": "ABCD"}}
    for right in ("B", "b", "b.", "(B)", "B. larva", " B."):
        assert ai2d.score(right, s)["correct"] == 1.0, right
    for wrong in ("B) larva", "The answer is B", "A", ""):
        assert ai2d.score(wrong, s)["correct"] == 0.0, wrong


def test_mathvista_official_normalisation():
    def sc(text, answer, qtype="free_form", atype="float", choices=(), precision=2):
        s = {"target": answer, "meta": {"question_type": qtype, "answer_type": atype, "choices": list(choices),
                                         "precision": precision}}
        return mathvista.score(text, s)
    assert sc(".67", "0.67")["correct"] == 1.0                 # float('.67') = 0.67, not 67
    assert sc("It is 2.456", "2.46")["correct"] == 1.0         # round(x, int(2.0)): the official int(precision)
    assert sc("1.5", "1.5", precision=1.0)["correct"] == 1.0   # a float precision from the data set works
    assert sc("12", "12", atype="integer", precision=None)["correct"] == 1.0
    assert sc("12.0", "12", atype="integer", precision=None)["correct"] == 1.0     # str(int(float(x)))
    assert sc("seven", "7", atype="integer", precision=None)["correct"] == 0.0
    mc = dict(qtype="multi_choice", atype="text", choices=["1", "2", "3"], precision=None)
    assert sc("B", "2", **mc)["correct"] == 1.0 and sc("(b)", "2", **mc)["correct"] == 1.0
    assert sc("3", "3", **mc)["correct"] == 1.0
    snapped = sc("22", "2", **mc)                               # most similar option, as officially
    assert snapped["correct"] == 1.0 and snapped["parsed"] is False
    assert sc("[1, 2,3]", "[1, 2,3]", atype="list", precision=None)["correct"] == 1.0


def test_mmmu_official_parsing():
    options = ["cat", "dog", "mitochondria", "bird"]
    assert mmmu.parse_choice("(B)", options)[0] == "B"
    assert mmmu.parse_choice("C", options)[0] == "C"
    assert mmmu.parse_choice("The answer is D.", options)[0] == "D"
    assert mmmu.parse_choice("I think the right organelle here is clearly mitochondria", options)[0] == "C"
    assert mmmu.parse_choice("A is wrong, so (B) it is; not (A)", options)[0] == "A"   # last bracket mentioned
    guess = mmmu.parse_choice("no idea", options, "q1")
    assert guess[1] is False and guess == mmmu.parse_choice("no idea", options, "q1")  # seeded random letter
    assert mmmu.open_correct(mmmu.open_candidates("The answer is 3.14"), "3.14")
    assert mmmu.open_correct(mmmu.open_candidates("so the total is 1,200 dollars"), "1200")
    assert mmmu.open_correct(mmmu.open_candidates("Paris"), "paris")
    assert mmmu.open_correct(mmmu.open_candidates("x = 7"), ["6", "7"])
    assert not mmmu.open_correct(mmmu.open_candidates("The answer is 8"), "7")
    mc = {"target": "C", "meta": {"question_type": "multiple-choice", "options": options, "question_id": "x"}}
    assert mmmu.score("(C) mitochondria", mc) == {"correct": 1.0, "parsed": True, "extracted": "C"}


def test_anls_relaxed_ocr_and_boxes():
    assert parsers.anls("Hello  World", ["hello world"]) == 1.0
    assert parsers.anls("helo world", ["hello world"]) == pytest.approx(1 - 1 / 11)
    assert parsers.anls("abxy", ["abcd"]) == pytest.approx(0.5)               # exactly at the threshold: kept
    assert parsers.anls("axyze", ["abcde"]) == 0.0
    assert parsers.anls("1999", ["in 1998", "1998"]) == pytest.approx(0.75)
    assert parsers.anls("x" * 50, ["xx"]) == 0.0                              # long answers skip the edit distance
    assert parsers.relaxed_correct("105", "100") and not parsers.relaxed_correct("105.1", "100")
    assert parsers.relaxed_correct("12%", "0.12") and not parsers.relaxed_correct("yes.", "yes")
    assert ocrbench.score("The word is CENTRE", {"target": ["centre"], "meta": {"dataset": "IIIT5K"}})["correct"] == 1
    assert ocrbench.score("x ^ 2", {"target": ["x^2"], "meta": {"dataset": "HME100k"}})["correct"] == 1
    assert parsers.parse_box('```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "dog"}]\n```') == [10, 20, 30, 40]
    assert parsers.parse_box("The box is (1,2,3,4).") == [1, 2, 3, 4]
    assert parsers.parse_box('{"bbox_2d": [30, 40, 10, 20]}') is None
    s = {"target": [0.0, 0.0, 28.0, 28.0], "meta": {"seen_width": 28, "seen_height": 28, "width": 56, "height": 56}}
    assert refcoco.score('{"bbox_2d": [0, 0, 14, 14]}', s)["iou"] == pytest.approx(1.0)
    assert refcoco.score('{"bbox_2d": [0, 0, 14, 7]}', s)["correct"] == 1.0      # IoU exactly 0.5
    assert chartqa.score("104", {"target": "100", "meta": {}})["correct"] == 1.0
    assert docvqa.score("1/8/93", {"target": ["1/8/93"], "meta": {}})["anls"] == 1.0


def test_strict_reads_the_raw_answer_lenient_the_answer_block():
    record = {"prediction": "<think>the first option</think><answer>B</answer>", "target": "B",
              "meta": {"letters": "ABCD"}}
    ev.score_both(R["ai2d"], record)
    assert record["score"]["correct"] == 0.0 and record["score_lenient"]["correct"] == 1.0
    assert parsers.final_answer("<think>2 or 3</think>\n<answer> 3 </answer>") == "3"
    assert parsers.final_answer("<think>unfinished") == ""
    assert parsers.final_answer("<think>a</think> yes <think>b</think> ok") == "yes  ok"


def test_empty_or_garbage_predictions_count_wrong_never_crash():
    for name, bench in R.items():
        for text in ("", "\x00\ufffd)]}{", None):
            record = {"prediction": text, "target": _TARGETS[name], "meta": _METAS[name]}
            ev.score_both(bench, record)
            for key in ("score", "score_lenient"):
                assert record[key]["correct"] == 0.0 or name in ("pope", "mathvista", "mmmu"), (name, text, record)
            if not text:
                assert record["score"]["parsed"] is False, (name, record)


_TARGETS = {"jigsaw": [2, 1, 4, 3], "toy_prior": "3", "refcoco": [0, 0, 10, 10], "docvqa": ["x"], "mme": "yes",
            "mmstar": "A", "pope": "no", "mmmu": "A", "chartqa": "5", "ai2d": "A", "ocrbench": ["abc"],
            "mathvista": "2"}
_METAS = {"jigsaw": {"thinking": True}, "toy_prior": {"category": "count"},
          "refcoco": {"seen_width": 28, "seen_height": 28, "width": 28, "height": 28}, "docvqa": {}, "mme": {},
          "mmstar": {}, "pope": {}, "mmmu": {"question_type": "multiple-choice", "options": ["a", "b"]},
          "chartqa": {}, "ai2d": {"letters": "AB"}, "ocrbench": {"dataset": "IIIT5K"},
          "mathvista": {"question_type": "free_form", "answer_type": "integer", "choices": [], "precision": None}}


def test_every_benchmark_declares_what_the_report_needs():
    for name, b in R.items():
        assert b.unit in ("%", "/2800", "/1000"), name
        assert b.max_new_tokens >= 1 and 0 < b.min_pixels <= b.max_pixels, name
        assert b.lmms_eval_task and b.official and b.metric, name
        assert all(k in (benchmarks.base.QWEN_3B, benchmarks.base.QWEN_7B) for k in b.published), name
        assert not b.published or b.published_source, name
    assert R["mme"].unit == "/2800" and R["ocrbench"].unit == "/1000"
    assert R["mmmu"].paper_base == {benchmarks.base.QWEN_7B: 51.3}


# ----------------------------------------------------------------------------------------------------------
# Loaders: tiny data sets with the real columns (lmms-lab data set cards / lmms-eval task utils)
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
    bench = R[name]
    DatasetDict({bench.split: Dataset.from_list(rows, features=features)}).save_to_disk(str(tmp_path / name))
    dataset = benchmarks.open_data(bench, str(tmp_path / name))
    samples = bench.build(dataset[0], TOY_CTX)
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
    dataset = benchmarks.open_data(R["pope"], str(tmp_path / "POPE"))   # a hub snapshot folder
    assert len(dataset) == 3 and pope.build(dataset[0], Context())[0]["images"][0].size == (64, 32)
    Dataset.from_list([{k: v for k, v in rows[0].items() if k != "category"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(SystemExit):
        benchmarks.open_data(R["pope"], str(tmp_path / "bad"))
    assert "missing column(s) ['category']" in capsys.readouterr().err


def test_limit_subset_is_fixed_and_keeps_mme_pairs():
    from datasets import Dataset
    ds = Dataset.from_dict({"question_id": [f"{i // 2}.png" for i in range(20)]})
    rows = benchmarks.select_rows(ds, R["mme"], 6, seed=0)
    assert rows == benchmarks.select_rows(ds, R["mme"], 6, seed=0) and len(rows) == 6
    assert all(r ^ 1 in rows for r in rows)                          # both questions of each image
    assert benchmarks.select_rows(ds, R["pope"], 5, 0) != benchmarks.select_rows(ds, R["pope"], 5, 1)


# ----------------------------------------------------------------------------------------------------------
# Flags and errors (before any model is loaded)
# ----------------------------------------------------------------------------------------------------------
def test_unknown_benchmark_lists_valid_ones(tmp_path, capsys, toy_model_dir):
    with pytest.raises(SystemExit):
        ev.main(["--model", str(toy_model_dir), "--benchmarks", "pope,nope", "--output_dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert "['nope']" in err and all(name in err for name in R)


@pytest.mark.parametrize("name", ["toy_prior", "jigsaw"])
def test_local_only_benchmark_without_data_is_a_clear_error(name, tmp_path, capsys, toy_model_dir, monkeypatch):
    """No hub copy and no --data: stop with the fix, never scan the working folder for parquet files."""
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "test-0.parquet").write_bytes(b"not data")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["--model", str(toy_model_dir), "--benchmarks", name, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"--data {name}=PATH" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--batch_size", "0"), ("--limit", "-1"), ("--max_completion_length", "0"),
                                        ("--min_pixels", "-5"), ("--benchmark_max_completion_length", "-1"),
                                        ("--precision", "int8"), ("--prompt_style", "cot")])
def test_bad_flags_stop_before_loading(flag, value, tmp_path, capsys, toy_model_dir):
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["--model", str(toy_model_dir), "--output_dir", str(tmp_path / "o"), flag, value])
    assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_benchmark_settings_jigsaw_takes_the_run_flags_prior_benchmarks_their_own():
    args = ev.Args(min_pixels=3136, max_pixels=12544, max_completion_length=320)
    assert ev.benchmark_settings(args, R["jigsaw"])["max_pixels"] == 12544
    assert ev.benchmark_settings(args, R["jigsaw"])["max_new_tokens"] == 320
    assert ev.benchmark_settings(args, R["docvqa"]) == {"max_new_tokens": 32, "min_pixels": 256 * 28 * 28,
                                                        "max_pixels": 2048 * 28 * 28}
    args = ev.Args(benchmark_max_completion_length=7, benchmark_max_pixels=50176)
    assert ev.benchmark_settings(args, R["mme"])["max_new_tokens"] == 7
    assert ev.benchmark_settings(args, R["mme"])["max_pixels"] == 50176
    assert ev.benchmark_settings(args, R["jigsaw"])["max_pixels"] == benchmarks.jigsaw_task.MAX_PIXELS


# ----------------------------------------------------------------------------------------------------------
# The tiny model: end to end, schema, cache key, resume, a registered benchmark, batched == one-by-one
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
    model, processor = common.load_model_and_processor(str(varied_model_dir))
    ctx = Context(min_pixels=ev.DEFAULT_MIN_PIXELS, max_pixels=ev.DEFAULT_MAX_PIXELS)
    ev.set_pixel_budget(processor, ctx.min_pixels, ctx.max_pixels)
    prior, puzzles = load_from_disk(str(prior_data))["test"], load_from_disk(str(jigsaw_data))["test"]
    samples = [R["toy_prior"].build(prior[i], ctx)[0] for i in range(12)] + \
              [R["jigsaw"].build(puzzles[i], ctx)[0] for i in range(4)]
    batched = ev.generate_records(model, processor, samples, 8, 12, ctx)
    single = ev.generate_records(model, processor, samples, 1, 12, ctx)
    assert len({r["prediction"] for r in batched}) > 4                   # outputs really depend on the prompt
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in single]


def _counting(monkeypatch):
    generated = []
    real = ev.generate_records
    monkeypatch.setattr(ev, "generate_records", lambda m, p, samples, *a, **k: generated.extend(samples)
                        or real(m, p, samples, *a, **k))
    return generated


def test_end_to_end_schema_cache_and_resume(varied_model_dir, prior_data, jigsaw_data, tmp_path, monkeypatch):
    out = tmp_path / "base"
    argv = ["--model", str(varied_model_dir), "--benchmarks", "jigsaw,toy_prior", "--prompt_style", "thinking",
            "--data", f"jigsaw={jigsaw_data},toy_prior={prior_data}", "--output_dir", str(out),
            "--max_completion_length", "8", "--batch_size", "8"]
    ev.main(argv + ["--limit", "6"])
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) >= {"model", "model_identity", "settings", "environment", "benchmarks"}
    assert saved["environment"]["packages"]["torch"] and saved["settings"]["limit"] == 6
    for name in ("jigsaw", "toy_prior"):
        entry = saved["benchmarks"][name]
        assert {"metrics", "metrics_lenient", "headline", "unit", "metric", "source", "num_rows"} <= set(entry)
        assert entry["unit"] == "%" and entry["num_rows"] == 6 and entry["complete"]
        assert len(entry["samples"]) == 6 and entry["metrics"]["num_samples"] == 6
        correct = [r["score"]["correct"] for r in entry["samples"].values()]
        assert entry["metrics"]["accuracy"] == pytest.approx(100 * sum(correct) / 6)
        lenient = [r["score_lenient"]["correct"] for r in entry["samples"].values()]
        assert entry["metrics_lenient"]["accuracy"] == pytest.approx(100 * sum(lenient) / 6)
    assert saved["benchmarks"]["jigsaw"]["settings"]["max_new_tokens"] == 8           # the jigsaw cap
    assert saved["benchmarks"]["toy_prior"]["settings"]["max_new_tokens"] == R["toy_prior"].max_new_tokens
    jig = next(iter(saved["benchmarks"]["jigsaw"]["samples"].values()))
    assert "<think>" in jig["prompt"]                                     # thinking style -> column prompt

    # Rerun without --limit: only the 16 - 6 missing prior rows (and 8 - 6 puzzles) are generated.
    generated = _counting(monkeypatch)
    ev.main(argv)
    assert len(generated) == (16 - 6) + (8 - 6)
    generated.clear()
    ev.main(argv)                                                         # everything cached: no generation
    assert generated == []
    # Another token cap for the prior benchmarks changes their key only.
    ev.main(argv + ["--benchmark_max_completion_length", "5"])
    assert len(generated) == 16

    # Interrupted run: a crash after the first window leaves it on disk; the rerun generates the rest only.
    generated.clear()
    resumed = tmp_path / "resumed"
    calls = {"n": 0}
    real = ev.generate_records

    def crash_on_second(m, p, samples, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(m, p, samples, *a, **k)
    monkeypatch.setattr(ev, "generate_records", crash_on_second)
    small_windows = ["--batch_size", "2", "--window_batches", "1"]
    argv_resumed = [a if a != str(out) else str(resumed) for a in argv] + small_windows
    with pytest.raises(KeyboardInterrupt):
        ev.main(argv_resumed)
    partial = json.loads((resumed / "results.json").read_text())
    assert len(partial["benchmarks"]["jigsaw"]["samples"]) == 2 and not partial["benchmarks"]["jigsaw"]["complete"]
    generated = _counting(monkeypatch)
    ev.main(argv_resumed)
    assert len(generated) == (8 - 2) + 16


def test_rebuilt_3x3_data_is_not_served_stale_2x2_predictions(varied_model_dir, tmp_path, monkeypatch):
    """The same --output_dir after rebuilding the jigsaw data as 3x3: every puzzle is generated again."""
    import jigsaw
    data = tmp_path / "jigsaw"
    argv = ["--model", str(varied_model_dir), "--benchmarks", "jigsaw", "--data", f"jigsaw={data}",
            "--output_dir", str(tmp_path / "eval"), "--max_completion_length", "4"]
    jigsaw.build_dataset(jigsaw.BuildArgs(source="procedural", grid="2x2", train=4, test=4, output_dir=str(data), image_size=56))
    ev.main(argv)
    jigsaw.build_dataset(jigsaw.BuildArgs(source="procedural", grid="3x3", train=4, test=4, output_dir=str(data),
                                          image_size=84, overwrite=True))
    generated = _counting(monkeypatch)
    ev.main(argv)
    assert len(generated) == 4
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert all(len(r["target"]) == 9 for r in saved["benchmarks"]["jigsaw"]["samples"].values())


def test_weight_hash_follows_content_and_is_computed_once(toy_model_dir, tmp_path, monkeypatch):
    import os
    import shutil
    model = tmp_path / "model"
    shutil.copytree(toy_model_dir, model)
    first = ev.model_identity(str(model))
    hashed = []
    real = ev.file_sha256
    monkeypatch.setattr(ev, "file_sha256", lambda p: hashed.append(p.name) or real(p))
    assert ev.model_identity(str(model), first)["digest"] == first["digest"] and hashed == []   # size+mtime cache
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))   # touched, same bytes
    assert ev.model_identity(str(model), first)["digest"] == first["digest"] and hashed == ["model.safetensors"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1                                                                 # retrained in place
    weights.write_bytes(bytes(data))
    assert ev.model_identity(str(model), first)["digest"] != first["digest"]
    assert ev.model_identity("Qwen/Qwen2.5-VL-3B-Instruct")["hub_id"] == "Qwen/Qwen2.5-VL-3B-Instruct"


def test_a_benchmark_is_one_record(varied_model_dir, tmp_path, monkeypatch):
    """Adding a benchmark = one file with a Benchmark and one registry line: here, a fake one registered in
    the test runs end to end through eval.py with its own data, scorer, unit and token cap."""
    from datasets import Dataset, DatasetDict

    def build(row, ctx):
        return [benchmarks.base.sample(f"Name the colour. {row['q']}", [Image.new("RGB", (56, 56), (0, 0, 200))],
                                       row["a"], kind=row["kind"])]

    def score(text, s):
        return {"correct": float(s["target"] in text), "parsed": bool(text.strip())}
    fake = Benchmark(name="fake_colours", hub_id=None, split="test", columns=("q", "a", "kind"), build=build,
                     score=score, aggregate=lambda rs: benchmarks.base.accuracy_by(rs, "kind"), headline="accuracy",
                     unit="%", metric="accuracy %", max_new_tokens=3, lmms_eval_task="none", official="this test",
                     min_pixels=3136, max_pixels=3136)
    monkeypatch.setitem(benchmarks.REGISTRY, "fake_colours", fake)
    data = tmp_path / "fake"
    DatasetDict({"test": Dataset.from_list([{"q": f"#{i}", "a": "blue", "kind": "k"} for i in range(3)])}) \
        .save_to_disk(str(data))
    results = ev.main(["--model", str(varied_model_dir), "--benchmarks", "fake_colours", "--data",
                       f"fake_colours={data}", "--output_dir", str(tmp_path / "out")])
    entry = results["benchmarks"]["fake_colours"]
    assert entry["num_rows"] == 3 and entry["settings"]["max_new_tokens"] == 3 and entry["unit"] == "%"
    assert "accuracy_by_kind" in entry["metrics"]


def test_probe_rows_are_the_evaluated_subset(prior_data):
    """analyze.py --probes benchmarks:toy_prior: rows of the seeded --limit subset eval.py scores."""
    from datasets import load_from_disk
    rows = benchmarks.probe_rows(["toy_prior"], {"toy_prior": str(prior_data)}, limit=5, seed=0)
    assert len(rows) == 5 and set(rows[0]) == {"id", "images", "prompt", "answer", "benchmark"}
    test_rows = load_from_disk(str(prior_data))["test"]
    chosen = benchmarks.select_rows(test_rows, R["toy_prior"], 5, 0)
    assert [(r["prompt"], r["answer"]) for r in rows] == [(test_rows[i]["prompt"], test_rows[i]["answer"]) for i in chosen]
    two = benchmarks.probe_rows(["toy_prior"], {"toy_prior": str(prior_data)}, limit=5, seed=0, per_benchmark=2)
    assert len(two) == 2 and {r["id"] for r in two} <= {r["id"] for r in rows}


def test_each_benchmark_is_seen_at_its_own_pixel_budget(toy_model_dir):
    """The processor is re-set per benchmark: the jigsaw task at the run's budget, a prior benchmark at its own."""
    import common
    import sequences
    processor = common.load_processor(str(toy_model_dir))
    image = Image.new("RGB", (224, 224))
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for bench, args in ((R["jigsaw"], ev.Args(min_pixels=3136, max_pixels=3136)), (R["docvqa"], ev.Args())):
        settings = ev.benchmark_settings(args, bench)
        ev.set_pixel_budget(processor, settings["min_pixels"], settings["max_pixels"])
        batch = sequences.build_batch(processor, ["x"], [[image]])
        w, h = benchmarks.base.resized_size(224, 224, settings["min_pixels"], settings["max_pixels"])
        assert int((batch["input_ids"] == pad).sum()) == (w // 28) * (h // 28)
    assert (w, h) == (448, 448)   # docvqa: lmms-eval's min 256*28*28 upscales a 224x224 image


def test_analyze_takes_benchmark_probes(toy_model_dir, prior_data, jigsaw_data, tmp_path):
    """analyze.py --probes benchmarks:toy_prior --probe_data toy_prior=... --probe_limit N: its probes are rows
    of the subset eval.py --limit N scores (what run_all.sh's analyze stage passes for the real presets)."""
    import analyze
    from datasets import load_from_disk
    results = analyze.main(["--model", str(toy_model_dir), "--sources", f"x={jigsaw_data}:prompt_no_think:target_non_rea",
                            "--source_split", "test", "--probes", "benchmarks:toy_prior", "--probe_data",
                            f"toy_prior={prior_data}", "--probe_limit", "6", "--n_train", "2", "--n_probe", "3",
                            "--no_first_order", "--no_exact", "--no_symmetry", "--no_track", "--output_dir",
                            str(tmp_path / "analysis")])
    assert results["n_probes"] == 3
    test_rows = load_from_disk(str(prior_data))["test"]
    evaluated = {f"toy_prior/{i}/0" for i in benchmarks.select_rows(test_rows, R["toy_prior"], 6, 0)}
    assert {p["id"] for p in results["samples"]["probes"]} <= evaluated


def test_checkpoints_of_a_run_are_evaluated_in_one_process(varied_model_dir, prior_data, jigsaw_data, tmp_path):
    """--checkpoints: final/ on --limit, every checkpoint-N/ beside it on --checkpoint_limit, each into its own
    OUTPUT_DIR/checkpoint-N/results.json (the layout report.py's frontier reads)."""
    import shutil
    run = tmp_path / "sft_run"
    for name in ("final", "checkpoint-2", "checkpoint-10"):
        shutil.copytree(varied_model_dir, run / name)
    shutil.copytree(varied_model_dir, run / "checkpoint-5-broken")       # not a checkpoint-N name: skipped
    out = tmp_path / "eval" / "sft"
    ev.main(["--model", str(run / "final"), "--benchmarks", "jigsaw,toy_prior", "--output_dir", str(out),
             "--data", f"jigsaw={jigsaw_data},toy_prior={prior_data}", "--max_completion_length", "4",
             "--limit", "5", "--checkpoints", "--checkpoint_limit", "3"])
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-10", "checkpoint-2"]
    final = json.loads((out / "results.json").read_text())
    assert final["model"] == str(run / "final") and final["benchmarks"]["toy_prior"]["num_rows"] == 5
    for label in ("checkpoint-2", "checkpoint-10"):
        saved = json.loads((out / label / "results.json").read_text())
        assert saved["model"] == str(run / label) and saved["settings"]["limit"] == 3
        assert saved["benchmarks"]["jigsaw"]["num_rows"] == 3 and saved["benchmarks"]["toy_prior"]["num_rows"] == 3


@pytest.mark.parametrize("name", sorted(R))
def test_a_smaller_limit_selects_rows_among_a_larger_ones(name):
    """The checkpoints' CHECKPOINT_EVAL_LIMIT rows are rows the base and the final models were scored on at
    EVAL_LIMIT, for every benchmark (MMStar's 1,500 rows included: random.sample picks unrelated rows at 100 and
    500), so report.py can read every point of a curve on the same rows."""
    from datasets import Dataset
    bench = R[name]
    column = bench.group_column or "x"
    ds = Dataset.from_dict({column: [f"{i // 2}.png" for i in range(1500)]})
    for small, large in ((100, 500), (200, 500), (200, 1000)):
        few, many = (benchmarks.select_rows(ds, bench, n, seed=0) for n in (small, large))
        assert set(few) <= set(many) and len(few) >= small and len(many) >= large
