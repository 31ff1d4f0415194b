"""RefCOCO val (visual grounding): the paper's first prior-knowledge benchmark (7B: RFT -0.6, SFT-Non-Rea -57.2).

Data: lmms-eval's copy, one row per annotation: `answer` a list of referring expressions, `bbox` [x, y, w, h]
in original pixels. Hub id checked against lmms-eval's task yamls (lmms_eval/tasks/refcoco/*.yaml at commit
75571cf, 2026-08: dataset_path lmms-lab-encoder/RefCOCO, split val); the old lmms-lab/RefCOCO redirects
there. The data set card itself cannot be read from this machine (no hub access), so no revision is pinned.

Prompt: lmms_eval/tasks/refcoco_grounding (JSON boxes, the form Qwen2.5-VL was trained to emit; the older
refcoco_bbox_rec prompt asks for 0..1 floats, which Qwen2.5-VL does not use), one sample per expression as
lmms-eval's refcoco_bbox_rec explodes them (refcoco_grounding joins them into one prompt).
Metric: the standard referring-expression accuracy, a box right when IoU >= 0.5 with the ground truth (ACC@0.5
of lmms-eval's refcoco tasks; Qwen2.5-VL report Table 6). Where lmms-eval's refcoco_grounding keeps the
best-IoU box among several the model gives (an oracle choice), we take the first box the model commits to.
"""
from benchmarks import parsers
from benchmarks.base import QWEN_7B, Benchmark, pct, parse_failure_rate, resized_size, sample, to_pil


def build(row: dict, ctx) -> list[dict]:
    image = to_pil(row["image"])
    seen_w, seen_h = resized_size(image.width, image.height, ctx.min_pixels, ctx.max_pixels)
    x, y, w, h = [float(v) for v in row["bbox"]]
    refs = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
    return [sample(f'Locate every object that matches the description "{ref}" in the image. Report bbox '
                   "coordinates in JSON format.", [image], [x, y, x + w, y + h], ref=ref, width=image.width,
                   height=image.height, seen_width=seen_w, seen_height=seen_h, question_id=str(row["question_id"]))
            for ref in refs]


def box_to_original(box: list[float], seen_w: int, seen_h: int, orig_w: int, orig_h: int) -> list[float]:
    """Qwen2.5-VL grounds in ABSOLUTE PIXELS OF THE RESIZED INPUT (the smart_resize'd image the model saw;
    Qwen2.5-VL technical report and cookbook; Qwen2-VL used 0..1000 coordinates). RefCOCO's ground truth
    lives in original pixels: scale back."""
    sx, sy = orig_w / seen_w, orig_h / seen_h
    return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]


def score(text: str, s: dict) -> dict:
    box = parsers.parse_box(text)
    if box is None:
        return {"correct": 0.0, "iou": 0.0, "parsed": False, "extracted": None}
    m = s["meta"]
    box = box_to_original(box, m["seen_width"], m["seen_height"], m["width"], m["height"])
    iou = parsers.box_iou(box, s["target"])
    return {"correct": float(iou >= 0.5), "iou": iou, "parsed": True, "extracted": [round(v, 1) for v in box]}


def aggregate(records: list[dict]) -> dict:
    ious = [r["score"]["iou"] for r in records]
    return {"acc@0.5": pct(i >= 0.5 for i in ious), "mean_iou": pct(ious),
            "parse_failure_rate": parse_failure_rate(records), "num_samples": len(records)}


BENCHMARK = Benchmark(
    name="refcoco", hub_id="lmms-lab-encoder/RefCOCO", split="val", columns=("image", "answer", "bbox", "question_id"),
    build=build, score=score, aggregate=aggregate, headline="acc@0.5", unit="%",
    metric="accuracy % at IoU >= 0.5 (Qwen2.5-VL absolute-pixel boxes)",
    max_new_tokens=512,  # lmms_eval/tasks/refcoco_grounding/_default_template_yaml
    lmms_eval_task="refcoco_grounding (prompt), refcoco_bbox_rec_val (one sample per expression, ACC@0.5)",
    official="ACC@0.5 of referring-expression comprehension (Mao et al. 2016; lmms-eval refcoco utils)",
    # Qwen2.5-VL report (arXiv 2502.13923) Table 6, RefCOCO val: 7B 90.0. The 3B row is not in that table.
    published={QWEN_7B: 90.0}, published_source="Qwen2.5-VL technical report, arXiv 2502.13923, Table 6",
    published_note="Qwen's own grounding evaluation")
