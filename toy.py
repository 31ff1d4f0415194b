"""The offline toy world: a tiny Qwen2.5-VL built locally, and procedural "prior knowledge".

Nothing here downloads anything. It makes:
  1. a byte-level BPE tokenizer with Qwen's special tokens and a Qwen2.5-VL chat template,
  2. a Qwen2.5-VL processor and a randomly initialised tiny Qwen2.5-VL (same classes as the real model,
     saved with save_pretrained and loaded by path like a hub id),
  3. "prior knowledge" data: procedural scenes (shapes, colours, counts) with questions in the styles of the
     real benchmarks (short answer, multiple choice, POPE-style yes/no, counting); a `pretrain` split of
     direct questions, a `train` split in SFT format (some targets in the <think>...</think><answer>...</answer>
     format so the base model can follow it) and a held-out `test` split that eval.py scores like any benchmark.
The toy *base* model is then made by sft.py itself, in two runs: the `pretrain` split (direct questions), then
the `train` split (instruction tuning); see run_all.sh.

How much jigsaw skill the base gets, and why. Qwen2.5-VL scores 0% on 3x3 puzzles, but it sees the pieces, so
GRPO has partly right behaviour to reinforce. The toy base must be like that, in the paper's thinking format:
think text that says something true about the pieces, an answer that follows from it better than chance, exact
accuracy low. Its instruction mix (`train` split) holds two kinds of jigsaw-like rows:
  * the colour-grid question (write the colour code of each cell's shape in a 2x2 grid), asked with the jigsaw
    prompt's own format instructions word for word (jigsaw.GRID_FORMAT_*), with and without thinking ("Cell 1
    holds a red square. ..."). Its codes (COLOR_CODES) name where a piece of that colour belongs in the gradient
    images the toy jigsaw is cut from (jigsaw.procedural_image: bluish top-left, reddish top-right, greenish
    bottom-left, yellowish bottom-right).
  * with --format_share > 0 (the toy preset: TOY_FORMAT_SHARE 0.25), jigsaw prompts on gradient puzzles
    (jigsaw_prior_row) whose think text names every piece's true colour ("Cell 1 is red. ...", from
    describe_piece) and whose answer follows from it for the column only (red and yellow pieces belong right),
    the row a coin flip: a base that says true things and half-knows what they mean (1/16 of these rows are
    right as a whole). Never a jigsaw prompt with a random answer: a base trained on those learns exactly "the
    answer does not depend on the image", and GRPO then reinforces luck.
think_check measures the first property on any toy model (run_all.sh runs it after the base's evaluation and
on the thinking-format arms; the report shows it). The toy preset's base on an AVX2 EPYC: think text 90% true,
answer in the claimed colour's column for 93% of the cells, exact 20%, prior knowledge 94% (docs/LOG.md, with
the shares tried and the earlier bases).

    # the toy run's first step (run_all.sh's base stage, preset toy): runs/toy/toy/init (model + processor)
    # and runs/toy/toy/prior (the prior-knowledge questions)
    python toy.py --output_dir runs/toy/toy --format_share 0.25     # the preset's other values are the defaults
    python toy.py --think_check runs/toy/eval/base/results.json --jigsaw_data runs/toy/data/jigsaw
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageStat

import jigsaw

# Qwen2.5's special tokens, in Qwen's order (ids are small here; the real ids start at 151643).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# The Qwen2-VL / Qwen2.5-VL chat format: default system turn, <|vision_start|><|image_pad|><|vision_end|> per
# image, <|im_start|>role\n ... <|im_end|>\n per turn. Written here so the toy world needs no download.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
# The jigsaw prompt's own format instructions (jigsaw.GRID_FORMAT_*), word for word: the colour-grid rows share
# them, so the thinking format the base learns on colour grids is the one the jigsaw prompt asks for.
GRID_THINK_INSTRUCTION = jigsaw.GRID_FORMAT_THINKING
GRID_PLAIN_INSTRUCTION = jigsaw.GRID_FORMAT_PLAIN
# Think format for the one-word questions (their answer is a word, not a grid).
THINK_INSTRUCTION = ("First think step by step inside <think> </think> tags, then give the final answer inside "
                     "<answer> </answer> tags.")

# Sizes of the toy model; `tiny` is what the tests use (fast), `small` what run_all.sh's toy preset uses.
MODEL_SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_hidden=32, vision_depth=2,
                 vision_heads=2, vision_intermediate=64),
    "small": dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, vision_hidden=64, vision_depth=2,
                  vision_heads=2, vision_intermediate=128),
}
TOY_MIN_PIXELS = 56 * 56
TOY_MAX_PIXELS = 112 * 112


# ----------------------------------------------------------------------------------------------------------
# Scenes and questions
# ----------------------------------------------------------------------------------------------------------
def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=color)
    else:
        w, h = x1 - x0, y1 - y0
        draw.rectangle((x0 + w // 3, y0, x1 - w // 3, y1), fill=color)
        draw.rectangle((x0, y0 + h // 3, x1, y1 - h // 3), fill=color)


def make_scene(rng: random.Random, size: int = 112, full: bool = False,
               count: int | None = None) -> tuple[Image.Image, list[dict]]:
    """1-3 non-overlapping shapes (one per quadrant) on a light background; returns image and objects (each
    with its quadrant 0..3, row-major). `full`: one shape in every quadrant, the four colours all different."""
    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    count = 4 if full else (count or rng.randint(1, 3))
    quadrants = list(range(4)) if full else rng.sample(range(4), count)
    colors = rng.sample(list(COLORS), 4) if full else [rng.choice(list(COLORS)) for _ in range(count)]
    objects = []
    half = size // 2
    for q, color in zip(quadrants, colors):
        shape = rng.choice(SHAPES)
        side = rng.randint(half * 6 // 10, half * 9 // 10)
        x0 = (q % 2) * half + rng.randint(0, half - side)
        y0 = (q // 2) * half + rng.randint(0, half - side)
        draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), COLORS[color])
        objects.append({"shape": shape, "color": color, "quadrant": q})
    return image, objects


# The colour-grid codes name where a piece of that colour belongs in a jigsaw.procedural_image gradient (red
# grows left->right, green top->bottom): the dark/blue corner is position 1, red 2, green 3, red+green (yellow) 4.
COLOR_CODES = {"blue": 1, "red": 2, "green": 3, "yellow": 4}


def color_grid_question(objects: list[dict]) -> dict:
    """The toy world's instruction-following skill: answer a 2x2 grid of numbers, one per cell, in the exact
    answer format of the jigsaw task (so the toy base model, like Qwen2.5-VL, can write a well-formed grid
    but has never placed a jigsaw piece). The answer is a permutation of 1..4 (four distinct colours)."""
    by_quadrant = sorted(objects, key=lambda o: o["quadrant"])
    codes = [COLOR_CODES[o["color"]] for o in by_quadrant]
    legend = ", ".join(f"{name}={code}" for name, code in sorted(COLOR_CODES.items(), key=lambda kv: kv[1]))
    return {"category": "color_grid",
            "prompt": f"The image is divided into a 2x2 grid of cells numbered row by row:\n1 2\n3 4\nFor each "
                      f"cell, write the code of the colour of its shape ({legend}), in the same 2x2 layout.",
            "answer": jigsaw.answer_text(codes, 2, 2),
            "reason": " ".join(f"Cell {i + 1} holds a {o['color']} {o['shape']}." for i, o in enumerate(by_quadrant))}


QUESTION_KINDS = ("color", "color_mc", "yesno", "count")


def make_question(rng: random.Random, kind: str, objects: list[dict]) -> dict:
    """One question about a scene in a benchmark style: short answer (color), multiple choice (color_mc, as in
    MMStar), POPE-style yes/no (yesno), counting (count). Returns prompt, answer, category and a short
    reasoning sentence used for the thinking-format targets. Each answer follows from the image alone (no
    binding of a word in the question to the image), which a 1M-parameter model learns in minutes; shape names
    only decorate the reasoning."""
    first = objects[0]
    if kind == "color":
        return {"category": "color", "prompt": "What color is the shape? Answer with one word.",
                "answer": first["color"], "reason": f"The {first['shape']} is {first['color']}."}
    if kind == "color_mc":
        options = list(COLORS)  # fixed order: the answer letter follows from the image alone
        lines = "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(options))
        return {"category": "color_mc",
                "prompt": f"What color is the shape?\n{lines}\n"
                          "Answer with the option's letter from the given choices directly.",
                "answer": "ABCD"[options.index(first["color"])],
                "reason": f"The {first['shape']} is {first['color']}."}
    if kind == "yesno":
        several = len(objects) > 1
        return {"category": "yesno",
                "prompt": "Is there more than one shape in the image? Please answer yes or no.",
                "answer": "yes" if several else "no",
                "reason": f"I count {len(objects)} shape{'s' if several else ''}."}
    return {"category": "count", "prompt": "How many shapes are in the image? Answer with a number.",
            "answer": str(len(objects)), "reason": f"I count {len(objects)} shapes."}


# The toy colour a gradient piece is nearest to, from its red and green levels (describe_piece): the same four
# names as the colour-grid question, so the think text of a jigsaw row is in the words the base already reads.
PIECE_COLORS = {(False, False): "blue", (True, False): "red", (False, True): "green", (True, True): "yellow"}


def describe_piece(piece: Image.Image) -> tuple[str, bool, bool]:
    """What the toy base's perception says about a jigsaw piece: the toy colour it is nearest to, from how much
    red and how much green it holds (mean of its pixels above or below half scale). True of the piece by
    construction; on a jigsaw.procedural_image gradient, red says the column (red grows left->right) and green
    the row (green grows top->bottom): blue top-left, red top-right, green bottom-left, yellow bottom-right."""
    mean_red, mean_green, _ = ImageStat.Stat(piece.convert("RGB")).mean
    red, green = mean_red > 127.5, mean_green > 127.5
    return PIECE_COLORS[red, green], red, green


THINK_CELL = re.compile(r"Cell ([1-4]) (?:is|holds an?) (blue|red|green|yellow)\b")


def think_claims(completion: str) -> dict[int, str]:
    """The colours a completion's think text claims, {position 1..4: colour}, from `Cell k is <colour>` (jigsaw
    prior rows) or `Cell k holds a <colour> ..` (colour-grid rows) sentences; the first claim of a position
    counts. Plain regex on untrusted model text, over at most 2,000 characters of it."""
    think = completion.split("</think>")[0]
    claims: dict[int, str] = {}
    for m in THINK_CELL.finditer(think[:2000]):
        claims.setdefault(int(m.group(1)), m.group(2))
    return claims


def puzzle_piece_colors(composite: Image.Image) -> list[str]:
    """The true toy colour (describe_piece) of each of the four pieces of a 2x2 puzzle image, row by row."""
    return [describe_piece(piece)[0] for piece in jigsaw.cut(composite, 2, 2)]


def think_check(results_path: str, jigsaw_data: str) -> dict:
    """Does a toy model's think text say true things about the pieces, and does its answer follow from it?
    Read off the greedy jigsaw completions eval.py saved (results.json, benchmark `jigsaw`) against the test
    puzzles' images (the jigsaw data folder): for every cell the think text names a colour for (think_claims),
    whether that is the piece's true colour (chance: 25%), whether the answer puts the piece in the column the
    colour says (red and yellow right; chance 50%), and whether it puts it in the colour's home cell (COLOR_CODES;
    chance 25%). The base's prior must be true and used (docs/LOG.md), and this measures it instead of assuming it."""
    import common
    results = common.read_json(results_path, "Point --think_check at the results.json eval.py wrote (rerun eval.py if "
                               "it was cut short).")
    samples = (results.get("benchmarks") or {}).get("jigsaw", {}).get("samples", {})
    if not isinstance(samples, dict) or not all(isinstance(s, dict) and "row" in s and "prediction" in s
                                                for s in samples.values()):
        common.fail(f"{results_path}: its jigsaw samples are not eval.py's records (each with row and prediction); "
                    "point --think_check at the results.json eval.py wrote.")
    if not samples:
        common.fail(f"{results_path}: no jigsaw samples (run eval.py with --benchmarks jigsaw and save_samples on).")
    test = common.load_rows(jigsaw_data, "test", required=("images", "answer"))
    cells = claimed = true = column = home = puzzles = 0
    for sample in samples.values():
        row = test[int(sample["row"])]
        if row["rows"] != 2 or row["cols"] != 2:
            common.fail(f"{jigsaw_data}: the think check reads 2x2 toy puzzles; row {sample['row']} is "
                        f"{row['rows']}x{row['cols']}.")
        colors = puzzle_piece_colors(row["images"][0])
        claims = think_claims(sample["prediction"])
        guess = jigsaw.extract_answer(sample["prediction"], 4)
        puzzles += 1
        cells += 4
        for pos, color in claims.items():
            claimed += 1
            true += color == colors[pos - 1]
            if guess is not None:
                column += (guess[pos - 1] in (2, 4)) == (COLOR_CODES[color] in (2, 4))   # right column
                home += guess[pos - 1] == COLOR_CODES[color]
    share = lambda a, b: round(100 * a / b, 1) if b else None
    return {"puzzles": puzzles, "claimed_pct": share(claimed, cells), "think_true_pct": share(true, claimed),
            "answer_follows_column_pct": share(column, claimed), "answer_follows_home_pct": share(home, claimed),
            "chance_pct": {"think_true": 25.0, "answer_follows_column": 50.0, "answer_follows_home": 25.0}}


def jigsaw_prior_row(rng: random.Random, k: int, split: str) -> dict:
    """The base's prior on the jigsaw prompt (thinking format): a 2x2 puzzle of a gradient image, its think text
    the true colour of every piece (describe_piece: "Cell 1 is red."), its answer what the base can conclude from
    it: the column of each piece's home from its red (red and yellow pieces belong right), the row a coin flip per
    position (it has not learnt what green means). So the answer depends on the image and follows the think text
    for the column, gets half the positions on average, and a whole puzzle only when all four coin flips are
    right (1/16)."""
    image = jigsaw.procedural_image(rng.randrange(2 ** 31), 112)
    puzzle = jigsaw.make_puzzle(image, 2, 2, seed=rng.randrange(2 ** 31))
    colors = puzzle_piece_colors(puzzle.images[0])
    guess = [rng.choice((1, 3)) + int(COLOR_CODES[color] in (2, 4)) for color in colors]  # the colour's column
    think = " ".join(f"Cell {p + 1} is {color}." for p, color in enumerate(colors))
    completion = f"<think>{think}</think>\n{jigsaw.target_answer_only(guess, 2, 2)}"
    return {"id": f"toy-{split}-jigsaw-{k:06d}", "images": puzzle.images, "prompt": jigsaw.build_prompt(2, 2, True),
            "question": "jigsaw prior", "answer": jigsaw.answer_text(guess, 2, 2), "category": "jigsaw_prior",
            "completion": completion}


def prior_rows(split: str, count: int, seed: int, think_share: float = 0.3, grid_share: float = 0.2,
               format_share: float = 0.0) -> list[dict]:
    rng = random.Random(f"{seed}/{split}")
    rows = []
    for k in range(count):
        if rng.random() < format_share:
            rows.append(jigsaw_prior_row(rng, k, split))
            continue
        grid_question = rng.random() < grid_share
        kind = "color_grid" if grid_question else rng.choice(QUESTION_KINDS)
        image, objects = make_scene(rng, full=grid_question, count=1 if kind in ("color", "color_mc") else None)
        q = color_grid_question(objects) if grid_question else make_question(rng, kind, objects)
        think = rng.random() < think_share
        if grid_question:
            # Same instructions and answer layout as jigsaw.build_prompt / jigsaw.target_answer_only.
            prompt = f"{q['prompt']} {GRID_THINK_INSTRUCTION if think else GRID_PLAIN_INSTRUCTION}"
            answer_block = f"<answer>\n{q['answer']}\n</answer>"
            completion = f"<think>{q['reason']}</think>\n{answer_block}" if think else answer_block
        else:
            prompt = f"{q['prompt']} {THINK_INSTRUCTION}" if think else q["prompt"]
            completion = f"<think>{q['reason']}</think>\n<answer>{q['answer']}</answer>" if think else q["answer"]
        rows.append({"id": f"toy-{split}-{k:06d}", "images": [image], "prompt": prompt,
                     "question": q["prompt"], "answer": q["answer"], "category": q["category"],
                     "completion": completion})
    return rows


def build_prior_dataset(out: str, train: int = 3000, test: int = 300, seed: int = 0, pretrain: int = 3000,
                        format_share: float = 0.0):
    """Three splits. `pretrain`: the direct questions only (one-word answers), the toy model's "pretraining"
    in perception; `train`: the instruction-tuning mix (the same questions, some in think format, colour grids
    in the jigsaw answer format; jigsaw rows only with format_share > 0); `test`: held-out direct questions
    (the toy benchmark).
    Why two stages: trained on the mix from random init, the 1M-parameter model spends its steps on the long
    text targets (think rows, grids: most of the loss tokens) and reads the image late. In our runs (small
    model, batch 32, lr 1e-3), 250 steps on the mix left colour questions near chance (42% overall on `test`);
    250 steps on `pretrain` reached 99.7%, and 150 more on the mix kept 99.3% and taught the formats.
    Real MLLMs are made the same way: perception pretraining first, then instruction tuning."""
    from datasets import Dataset, DatasetDict, Features, Image as ImageFeature, List, Value
    features = Features({"id": Value("string"), "images": List(ImageFeature()), "prompt": Value("string"),
                         "question": Value("string"), "answer": Value("string"), "category": Value("string"),
                         "completion": Value("string")})
    dataset = DatasetDict({"pretrain": Dataset.from_list(prior_rows("pretrain", pretrain, seed + 2, think_share=0.0,
                                                                    grid_share=0.0), features=features),
                           "train": Dataset.from_list(prior_rows("train", train, seed, format_share=format_share),
                                                      features=features),
                           # The test split is asked directly (like the benchmarks), never in think format, and
                           # holds no colour-grid questions: that skill exists to teach the answer format.
                           "test": Dataset.from_list(prior_rows("test", test, seed + 1, think_share=0.0,
                                                                grid_share=0.0), features=features)})
    import runs
    runs.save_dataset_atomic(dataset, out, stage="toy.py")
    return dataset


# ----------------------------------------------------------------------------------------------------------
# Tokenizer, processor, model
# ----------------------------------------------------------------------------------------------------------
def tokenizer_corpus() -> list[str]:
    """Text the toy tokenizer is trained on: every prompt and answer form the toy world produces."""
    lines = [CHAT_TEMPLATE.replace("{", " ").replace("}", " "), "You are a helpful assistant.", THINK_INSTRUCTION]
    rng = random.Random(0)
    for row in prior_rows("corpus", 400, 0, think_share=0.5):
        lines += [row["prompt"], row["completion"]]
    for rows, cols in ((2, 2), (3, 3), (2, 3), (3, 2), (4, 4)):
        for thinking in (True, False):
            for tiles in (True, False):
                for convention in jigsaw.CONVENTIONS:
                    lines.append(jigsaw.build_prompt(rows, cols, thinking, tiles, convention))
        for _ in range(50):
            perm = list(range(1, rows * cols + 1))
            rng.shuffle(perm)
            lines.append(jigsaw.target_answer_only(perm, rows, cols))
            lines.append(f"<think>The piece at position 1 shows the top left part, so it came from position "
                         f"{perm[0]}.</think>\n" + jigsaw.target_answer_only(perm, rows, cols))
    lines += [str(i) for i in range(100)] + list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?()[]")
    return lines


def build_tokenizer(vocab_size: int = 800):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL_TOKENS[1:], padding_side="left",
                                        model_max_length=32768)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer, min_pixels: int = TOY_MIN_PIXELS, max_pixels: int = TOY_MAX_PIXELS):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


TOY_ROPE_THETA = 10.0  # see build_model: the real models use 1e6


def build_model(tokenizer, size: str = "tiny", seed: int = 0):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    s = MODEL_SIZES[size]
    head_dim = s["hidden"] // s["heads"]
    # mrope_section splits the head_dim/2 rotary frequencies into temporal/height/width chunks and must sum to
    # head_dim/2; the same 2:3:3 split as the real models (128 -> [16, 24, 24]). The width chunk gets the lowest
    # frequencies: with 8 of them and the usual theta 1e4 they turn < 0.003 rad per position, so the tiny model
    # could not tell the image tokens of a piece apart. rope_theta 10 (toy only) gives width ~0.13-0.24 rad.
    # Measured with the toy preset (3D positions on): theta 1e4: base prior 98%, SFT-Non-Rea 120 steps 4.7% on
    # the 2x2 puzzles; theta 100: 98% / 25%; theta 10: 93% / 100%.
    quarter = head_dim // 2
    t = quarter * 2 // 8
    mrope = [t, (quarter - t) // 2, quarter - t - (quarter - t) // 2]
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                         num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                         intermediate_size=s["intermediate"], max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": TOY_ROPE_THETA, "mrope_section": mrope},
                         tie_word_embeddings=True, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=s["vision_depth"], hidden_size=s["vision_hidden"], num_heads=s["vision_heads"],
                           intermediate_size=s["vision_intermediate"], out_hidden_size=s["hidden"], patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[s["vision_depth"] - 1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model


def build_toy_model(out: str, size: str = "tiny", seed: int = 0) -> Path:
    """Tokenizer + processor + random tiny Qwen2.5-VL, saved with save_pretrained to `out`."""
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, size, seed)
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_path)
    processor.save_pretrained(out_path)
    return out_path


@dataclass
class Args:
    output_dir: str = "runs/toy/toy"
    """folder for init/ (the random tiny model + processor) and prior/ (the prior-knowledge data set)"""
    size: str = "small"
    """toy model size: tiny (tests) or small (the toy preset)"""
    prior_pretrain: int = 3000
    """direct prior-knowledge questions of the first base stage (perception "pretraining")"""
    prior_train: int = 3000
    """prior-knowledge instruction-tuning rows of the second base stage (with think, grid and jigsaw-format rows)"""
    prior_test: int = 300
    """held-out prior-knowledge questions (the toy benchmark eval.py scores)"""
    seed: int = 0
    """seed of the model init and the scenes"""
    format_share: float = 0.0
    """share of the instruction-tuning rows that are jigsaw-prompt rows (jigsaw_prior_row; the toy preset:
    TOY_FORMAT_SHARE, see the module docstring)"""
    think_check: str = ""
    """instead of building: an eval.py results.json of a toy model; writes think_check.json beside it (does the
    think text say true things about the pieces, does the answer follow; see think_check)"""
    jigsaw_data: str = ""
    """with --think_check: the jigsaw data folder whose test split eval.py scored (jigsaw.py --output_dir)"""


def main(argv=None):
    import common
    import files
    import runs
    args = common.parse_args(Args, __doc__, argv)
    if args.think_check:
        if not args.jigsaw_data:
            common.fail("--think_check needs --jigsaw_data, the jigsaw folder eval.py scored.")
        check = think_check(args.think_check, args.jigsaw_data)
        files.write_json_atomic(Path(args.think_check).with_name("think_check.json"), check)
        said = (f"; of those {check['think_true_pct']}% true (chance 25%), the answer follows the column in "
                f"{check['answer_follows_column_pct']}% (chance 50%) and the home in "
                f"{check['answer_follows_home_pct']}% (chance 25%)") if check["claimed_pct"] else ""
        print(f"[toy] think check of {args.think_check}: {check['claimed_pct']}% of cells claimed a colour{said}")
        return
    if args.size not in MODEL_SIZES:
        common.fail(f"--size {args.size} unknown; choose one of {list(MODEL_SIZES)}.")
    common.check_ranges(args, {"prior_pretrain": ">= 1", "prior_train": ">= 1", "prior_test": ">= 1",
                               "format_share": "[0, 1]"})
    runs.check_output_dir(args.output_dir, "toy.py", overwrite=False)
    path = build_toy_model(f"{args.output_dir}/init", args.size, args.seed)
    build_prior_dataset(f"{args.output_dir}/prior", args.prior_train, args.prior_test, args.seed, args.prior_pretrain,
                        args.format_share)
    runs.mark_output_dir(args.output_dir, "toy.py")
    print(f"[toy] wrote {path} (tiny Qwen2.5-VL, random init) and {args.output_dir}/prior "
          f"({args.prior_pretrain} pretrain / {args.prior_train} train / {args.prior_test} test questions)")


if __name__ == "__main__":
    main()
