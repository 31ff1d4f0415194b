"""The jigsaw task of the paper: puzzles, prompts, answer parsing, rewards, and the data builder.

Every stage imports this file, so that a puzzle, a prompt or a reward can never differ between training,
rollout and evaluation. Conventions follow Jigsaw-R1 (arXiv 2505.23590) where the paper is silent.

Worked example (2x2, Jigsaw-R1 convention "position_to_index"):
    original patches  1 2      puzzle shows  3 1      answer  3 1
                      3 4                    4 2              4 2
    i.e. for each current position (row-major, from 1) the original index of the patch standing there.
    The "index_to_position" convention answers the inverse: for each original patch, where it stands now
    (here 2 4 1 3).

Build a data set (one row per puzzle, saved with `datasets.save_to_disk`):
    # the toy run's puzzles (run_all.sh's data stage, preset toy)
    python jigsaw.py --source procedural --grid 2x2 --train 512 --test 64 --image_size 112 --max_side 112 \\
        --output_dir runs/toy/data/jigsaw
    # the 3b preset's, from COCO; or from a folder of your own images
    python jigsaw.py --source detection-datasets/coco --grid 3x3 --train 2500 --test 500 --image_size 448 \\
        --max_side 448 --output_dir runs/3b/data/jigsaw
    python jigsaw.py --source /path/to/image_folder --grid 3x3 --train 2500 --test 500 --image_size 448 \\
        --max_side 448 --output_dir runs/3b/data/jigsaw
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

CONVENTIONS = ("position_to_index", "index_to_position")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


# ----------------------------------------------------------------------------------------------------------
# Grid and puzzle
# ----------------------------------------------------------------------------------------------------------
def parse_grid(grid: str) -> tuple[int, int]:
    """'3x3' -> (3, 3); rows first, as in the paper's 'm x n'."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(grid))
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1 or int(match.group(1)) * int(match.group(2)) < 2:
        raise ValueError(f"grid {grid!r} is not of the form ROWSxCOLS with at least 2 cells (e.g. 3x3, 2x3).")
    return int(match.group(1)), int(match.group(2))


@dataclass
class Puzzle:
    images: list            # what the model sees: [composite] or the tiles in their shuffled order
    answer: list[int]       # 1-based indices, row-major, in the chosen convention
    rows: int
    cols: int
    convention: str = "position_to_index"
    original: Image.Image | None = field(default=None, repr=False)  # the cropped original, for checks


def crop_to_grid(image: Image.Image, rows: int, cols: int) -> Image.Image:
    """Centre-crop so that width divides by cols and height by rows (Jigsaw-R1 crops so the sides divide)."""
    width, height = image.size
    if width < cols or height < rows:
        raise ValueError(f"image of {width}x{height} pixels is smaller than the {rows}x{cols} grid; "
                         "use larger images or a smaller --grid.")
    new_w, new_h = width - width % cols, height - height % rows
    left, top = (width - new_w) // 2, (height - new_h) // 2
    return image.crop((left, top, left + new_w, top + new_h))


def make_puzzle(image: Image.Image, rows: int, cols: int, seed: int, convention: str = "position_to_index",
                tiles: bool = False) -> Puzzle:
    """Cut `image` into rows x cols patches, shuffle them with a seeded RNG and paste them back.

    The permutation is never the identity (an unshuffled puzzle teaches nothing). With `tiles=True` the
    shuffled patches are returned as separate images (the Visual Jigsaw presentation) instead of a composite.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention {convention!r} unknown; choose one of {CONVENTIONS}.")
    image = crop_to_grid(image.convert("RGB"), rows, cols)
    n = rows * cols
    patches = cut(image, rows, cols)
    patch_w, patch_h = patches[0].size
    rng = random.Random(seed)
    order = list(range(n))
    while order == list(range(n)):
        rng.shuffle(order)
    # order[p] = original index of the patch shown at position p
    shown = [patches[order[p]] for p in range(n)]
    if tiles:
        images = shown
    else:
        composite = Image.new("RGB", image.size)
        for p in range(n):
            composite.paste(shown[p], ((p % cols) * patch_w, (p // cols) * patch_h))
        images = [composite]
    if convention == "position_to_index":
        answer = [order[p] + 1 for p in range(n)]
    else:
        answer = [0] * n
        for p in range(n):
            answer[order[p]] = p + 1
    return Puzzle(images=images, answer=answer, rows=rows, cols=cols, convention=convention, original=image)


def cut(image: Image.Image, rows: int, cols: int) -> list[Image.Image]:
    """The rows x cols cells of a composite puzzle image, row by row (cell size: the image size // the grid)."""
    patch_w, patch_h = image.width // cols, image.height // rows
    return [image.crop(((p % cols) * patch_w, (p // cols) * patch_h, (p % cols + 1) * patch_w,
                        (p // cols + 1) * patch_h)) for p in range(rows * cols)]


def reassemble(images: list, answer: list[int], rows: int, cols: int,
               convention: str = "position_to_index") -> Image.Image:
    """Put the pieces back where `answer` says they belong; the inverse of make_puzzle for the right answer."""
    n = rows * cols
    pieces = cut(images[0], rows, cols) if len(images) == 1 else list(images)
    patch_w, patch_h = pieces[0].size
    out = Image.new("RGB", (patch_w * cols, patch_h * rows))
    for p in range(n):
        original_index = answer[p] - 1 if convention == "position_to_index" else p
        position = p if convention == "position_to_index" else answer[p] - 1
        out.paste(pieces[position], ((original_index % cols) * patch_w, (original_index // cols) * patch_h))
    return out


# ----------------------------------------------------------------------------------------------------------
# Prompt and answer text
# ----------------------------------------------------------------------------------------------------------
def index_grid_text(rows: int, cols: int) -> str:
    return "\n".join(" ".join(str(r * cols + c + 1) for c in range(cols)) for r in range(rows))


def answer_text(answer: list[int], rows: int, cols: int) -> str:
    """The grid as the model should write it: one line per row, indices separated by spaces."""
    return "\n".join(" ".join(str(answer[r * cols + c]) for c in range(cols)) for r in range(rows))


GRID_FORMAT_THINKING = ("First think step by step inside <think> </think> tags, then give the final grid inside "
                        "<answer> </answer> tags, one row per line, numbers separated by spaces.")
GRID_FORMAT_PLAIN = ("Give only the final grid inside <answer> </answer> tags, one row per line, numbers separated "
                     "by spaces.")


def build_prompt(rows: int, cols: int, thinking: bool = True, tiles: bool = False,
                 convention: str = "position_to_index") -> str:
    """User-turn text of the jigsaw question (images go before it in the chat message).

    Follows Jigsaw-R1: the index grid drawn in text, the answer an index grid in <answer> tags; with
    `thinking` the model is asked to reason in <think> tags first (the format R_fmt rewards).
    """
    n = rows * cols
    grid = index_grid_text(rows, cols)
    if tiles:
        seen = (f"The {n} images are the pieces of one picture cut into a {rows}x{cols} grid, given in shuffled "
                f"order. Number the pieces 1 to {n} in the order given.")
    else:
        seen = (f"The image is a picture cut into a {rows}x{cols} grid of pieces that were shuffled and pasted "
                f"back together.")
    if convention == "position_to_index":
        task = (f"The positions are numbered row by row:\n{grid}\nFor each position X, write the original "
                f"position Y of the piece now standing at X, in the same {rows}x{cols} layout.")
    else:
        task = (f"The positions are numbered row by row:\n{grid}\nFor each original position Y, write the "
                f"position X where its piece stands now, in the same {rows}x{cols} layout.")
    return f"{seen} {task} {GRID_FORMAT_THINKING if thinking else GRID_FORMAT_PLAIN}"


def target_answer_only(answer: list[int], rows: int, cols: int) -> str:
    """SFT target of SFT-Non-Rea: the ground-truth grid only, no reasoning."""
    return f"<answer>\n{answer_text(answer, rows, cols)}\n</answer>"


# ----------------------------------------------------------------------------------------------------------
# Parsing and rewards (model outputs are untrusted text: plain regex, never eval)
# ----------------------------------------------------------------------------------------------------------
# ASCII only: a model writing "３" or "٣" has not written a grid index (and \d would match them).
_ALLOWED_GRID_CHARS = re.compile(r"[0-9\s,;|\[\]\(\)\{\}]*", re.ASCII)
_THINK_FORMAT_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL | re.ASCII)
_PLAIN_FORMAT_RE = re.compile(r"\s*<answer>(.*?)</answer>\s*", re.DOTALL | re.ASCII)


def parse_grid_answer(body: str, n: int) -> list[int] | None:
    """Read n indices from an answer body written as lines, commas, spaces or brackets; None if unparseable.

    Duplicates parse (they earn partial credit on the other positions); letters, signs, decimals, a wrong
    count or an index outside 1..n make the answer unparseable.
    """
    if not isinstance(body, str) or not _ALLOWED_GRID_CHARS.fullmatch(body):
        return None
    numbers = re.findall(r"[0-9]+", body)
    if len(numbers) != n or any(len(x) > 6 for x in numbers):
        return None
    values = [int(x) for x in numbers]
    if any(v < 1 or v > n for v in values):
        return None
    return values


def extract_answer(text: str, n: int) -> list[int] | None:
    """Indices from the last <answer>...</answer> block of a completion, or None."""
    if not isinstance(text, str):
        return None
    # Scan from the right (linear time, unlike a lazy regex over thousands of unclosed tags).
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end >= 0 else -1
    return parse_grid_answer(text[start + len("<answer>"):end], n) if start >= 0 else None


def format_ok(text: str, n: int, thinking: bool = True) -> bool:
    """R_fmt's test: exactly `<think>...</think><answer>...</answer>` (or only the answer block when not
    thinking), each tag once, and an answer that parses."""
    if not isinstance(text, str):
        return False
    expected = {"<answer>": 1, "</answer>": 1, "<think>": int(thinking), "</think>": int(thinking)}
    if any(text.count(tag) != count for tag, count in expected.items()):
        return False
    match = (_THINK_FORMAT_RE if thinking else _PLAIN_FORMAT_RE).fullmatch(text)
    if not match:
        return False
    return parse_grid_answer(match.groups()[-1], n) is not None


def jigsaw_reward(completion: str, answer: list[int], thinking: bool = True, w_hit: float = 1.0,
                  w_acc: float = 1.0, w_fmt: float = 1.0) -> dict:
    """R = w_hit * R_hit + w_acc * R_acc + w_fmt * R_fmt (the paper; weights 1, 1, 1 as far as is known).

    R_hit: share of positions right (0 when the answer does not parse into exactly m*n indices);
    R_acc: 1 if the whole permutation is right; R_fmt: 1 if format_ok. Returns every component.
    """
    n = len(answer)
    if n == 0:
        raise ValueError("jigsaw_reward needs the ground-truth answer (an empty list was given).")
    parsed = extract_answer(completion, n)
    hit = 0.0 if parsed is None else sum(int(p == a) for p, a in zip(parsed, answer)) / n
    acc = float(parsed is not None and list(parsed) == list(answer))
    fmt = float(format_ok(completion, n, thinking))
    return {"reward": w_hit * hit + w_acc * acc + w_fmt * fmt, "hit": hit, "acc": acc, "fmt": fmt,
            "parsed": parsed is not None}


def score_completions(texts: list[str], answers: list[list[int]], thinking: bool = True, **weights) -> dict:
    """jigsaw_reward of every completion, as lists per component (reward, hit, acc, fmt, parsed) plus `errors`.
    Completions are untrusted text: jigsaw_reward only uses regexes, and anything that still raises scores 0
    (counted in `errors`), so one odd completion never crashes a long run."""
    parts = {"reward": [], "hit": [], "acc": [], "fmt": [], "parsed": []}
    errors = 0
    for text, answer in zip(texts, answers):
        try:
            r = jigsaw_reward(text, list(answer), thinking=thinking, **weights)
        except Exception:
            errors += 1
            r = {"reward": 0.0, "hit": 0.0, "acc": 0.0, "fmt": 0.0, "parsed": False}
        for key in parts:
            parts[key].append(float(r[key]))
    return {**parts, "errors": errors}


# ----------------------------------------------------------------------------------------------------------
# Image sources for the data builder
# ----------------------------------------------------------------------------------------------------------
def procedural_image(seed: int, size: int = 112) -> Image.Image:
    """An image whose pieces a small model can place: a colour gradient (red grows left->right, green
    top->bottom, blue fades from the top-left corner, so every piece's colour tells where it came from: the
    top-left quarter is bluish, top-right reddish, bottom-left greenish, bottom-right yellowish) with a per-image
    shift of the blue channel and a few random shapes over it. (With a uniformly random blue channel the
    top-left and top-right pieces of a bright-blue image were both purple-blue, and the toy GRPO run plateaued
    at 20% exact with those two confused: docs/LOG.md.)"""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size))
    pixels = image.load()
    shift = rng.randint(-48, 48)
    for y in range(size):
        for x in range(size):
            fade = 1 - (x + y) / (2 * (size - 1))
            pixels[x, y] = (int(255 * x / (size - 1)), int(255 * y / (size - 1)),
                            min(255, max(0, int(255 * fade) + shift)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        x0, y0 = rng.randint(0, size - size // 4), rng.randint(0, size - size // 4)
        side = rng.randint(size // 8, size // 4)
        color = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x0 + side, y0 + side), outline=color,
                                                                width=2)
    return image


def iter_folder_images(folder: Path, strict: bool):
    """Yield (image_id, PIL image) for the images of a folder, sorted; corrupt files are skipped and
    counted (or fatal with strict)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder}; "
                                "point --source at a folder of images, a hub data set id, or 'procedural'.")
    skipped = 0
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
                image = im.convert("RGB")
        except Exception as err:  # PIL raises many types for truncated/corrupt files
            if strict:
                raise ValueError(f"corrupt or truncated image {path}: {err}. Remove it, or drop "
                                 "--strict_images to skip such files.") from err
            skipped += 1
            print(f"[jigsaw] skipping unreadable image {path} ({err.__class__.__name__})", file=sys.stderr)
            continue
        yield str(path.relative_to(folder)), image
    if skipped:
        print(f"[jigsaw] skipped {skipped} unreadable image(s) under {folder}", file=sys.stderr)


def iter_hub_images(dataset_id: str, split: str, image_column: str, id_column: str | None):
    """Yield (image_id, PIL image) from a hub image data set, streamed so nothing big is downloaded first."""
    from datasets import load_dataset
    stream = load_dataset(dataset_id, split=split, streaming=True)
    for i, row in enumerate(stream):
        if image_column not in row:
            raise KeyError(f"hub data set {dataset_id} has no column {image_column!r} (columns: {list(row)}); "
                           "pass --image_column.")
        image = row[image_column]
        if not isinstance(image, Image.Image):
            continue
        yield str(row[id_column]) if id_column and id_column in row else f"{split}/{i}", image.convert("RGB")


# ----------------------------------------------------------------------------------------------------------
# Data builder
# ----------------------------------------------------------------------------------------------------------
@dataclass
class BuildArgs:
    source: str = "procedural"
    """'procedural' (PIL-drawn, offline), a local image folder, or a hub image data set id (the default hub
    source, detection-datasets/coco, holds COCO 2017 images; Jigsaw-R1 used COCO train2014)"""
    grid: str = "3x3"
    """ROWSxCOLS of the puzzle (the paper: 3x3)"""
    train: int = 1000
    """number of training puzzles"""
    test: int = 200
    """number of held-out test puzzles (their source images never appear in training)"""
    output_dir: str = "data/jigsaw"
    """output folder (datasets.save_to_disk, with train/ and test/ splits)"""
    seed: int = 0
    """seed of image choice and of every puzzle's shuffle"""
    convention: str = "position_to_index"
    """answer convention: position_to_index (Jigsaw-R1) or index_to_position (inverse)"""
    tiles: bool = False
    """give the shuffled pieces as separate images (Visual Jigsaw) instead of one composite"""
    image_size: int = 112
    """side of procedural images; other sources are resized so their longer side is at most --max_side"""
    max_side: int = 448
    """longer side of folder/hub images after resizing (keeps image-token counts bounded)"""
    puzzles_per_image: int = 1
    """training puzzles made from each training image (different shuffles); test always uses 1"""
    hub_split: str = "train"
    """split of the hub data set to stream"""
    image_column: str = "image"
    """image column of the hub data set"""
    id_column: str = "image_id"
    """id column of the hub data set (falls back to the row number)"""
    strict_images: bool = False
    """fail on the first corrupt image instead of skipping it"""
    overwrite: bool = False
    """replace --out even when jigsaw.py did not make it (by default only its own data sets are replaced)"""


def _resize(image: Image.Image, max_side: int) -> Image.Image:
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)


def _puzzle_seed(base_seed: int, split: str, index: int) -> int:
    # Seeded by sample index (Jigsaw-R1 makes puzzles on the fly seeded by index); hashed so splits differ.
    return int(hashlib.sha256(f"{base_seed}/{split}/{index}".encode()).hexdigest()[:12], 16)


def build_rows(args: BuildArgs) -> dict[str, list[dict]]:
    rows_n, cols_n = parse_grid(args.grid)
    need_images = args.test + -(-args.train // max(1, args.puzzles_per_image))
    if args.source == "procedural":
        # Test images use seeds from a disjoint range, so no test image can ever be a training image.
        images = {"test": [(f"procedural/test/{i}", procedural_image(_puzzle_seed(args.seed, "img-test", i),
                                                                      args.image_size)) for i in range(args.test)],
                  "train": [(f"procedural/train/{i}", procedural_image(_puzzle_seed(args.seed, "img-train", i),
                                                                        args.image_size))
                            for i in range(need_images - args.test)]}
    else:
        folder = Path(args.source)
        if folder.exists():
            source_iter = iter_folder_images(folder, args.strict_images)
            collected = list(source_iter)
            random.Random(args.seed).shuffle(collected)  # test/train split independent of file names
        else:
            if os.sep in args.source and not re.fullmatch(r"[\w.-]+/[\w.-]+", args.source):
                raise FileNotFoundError(f"--source {args.source}: no such folder (and not a hub id).")
            collected = []
            try:
                for item in iter_hub_images(args.source, args.hub_split, args.image_column, args.id_column):
                    collected.append(item)
                    if len(collected) >= need_images:
                        break
            except (OSError, ConnectionError, ValueError) as err:  # datasets raises several types offline
                raise FileNotFoundError(f"--source {args.source}: not a local folder, and loading it as a hub data "
                                        f"set failed ({err.__class__.__name__}: {err}). Check the path, or the hub "
                                        "id and your connection; 'procedural' works offline.") from err
        collected = [(i, _resize(im, args.max_side)) for i, im in collected]
        if len(collected) < args.test + 1:
            raise ValueError(f"--source {args.source} gave {len(collected)} usable images; need more than "
                             f"--test {args.test} so that training images stay disjoint from test images.")
        images = {"test": collected[:args.test], "train": collected[args.test:]}
    # Every source image large enough for the grid, checked before any puzzle is made (pieces of at least 2
    # pixels a side, as for procedural images; a folder or hub image may be tiny, or thin after --max_side).
    for image_id, image in [item for pool in images.values() for item in pool]:
        if image.width < 2 * cols_n or image.height < 2 * rows_n:
            raise ValueError(f"--source image {image_id}: {image.width}x{image.height} pixels is smaller than the "
                             f"{rows_n}x{cols_n} grid needs (at least {2 * cols_n}x{2 * rows_n}: pieces of 2 pixels "
                             "a side). Remove it, or use larger images or a smaller --grid.")
    out = {}
    for split, count in (("train", args.train), ("test", args.test)):
        pool = images[split]
        rows = []
        for k in range(count):
            image_id, image = pool[k % len(pool)]
            seed = _puzzle_seed(args.seed, split, k)
            puzzle = make_puzzle(image, rows_n, cols_n, seed, args.convention, args.tiles)
            rows.append({
                "id": f"{split}-{k:06d}",
                "images": puzzle.images,
                "prompt": build_prompt(rows_n, cols_n, True, args.tiles, args.convention),
                "prompt_no_think": build_prompt(rows_n, cols_n, False, args.tiles, args.convention),
                "answer": puzzle.answer,
                "grid": f"{rows_n}x{cols_n}",
                "rows": rows_n,
                "cols": cols_n,
                "convention": args.convention,
                "source_id": image_id,
                "seed": seed,
                "target_non_rea": target_answer_only(puzzle.answer, rows_n, cols_n),
            })
        out[split] = rows
    return out


def build_dataset(args: BuildArgs):
    from datasets import Dataset, DatasetDict, Features, Image as ImageFeature, List, Value
    features = Features({
        "id": Value("string"), "images": List(ImageFeature()), "prompt": Value("string"),
        "prompt_no_think": Value("string"), "answer": List(Value("int32")), "grid": Value("string"),
        "rows": Value("int32"), "cols": Value("int32"), "convention": Value("string"),
        "source_id": Value("string"), "seed": Value("int64"), "target_non_rea": Value("string"),
    })
    splits = build_rows(args)
    dataset = DatasetDict({name: Dataset.from_list(rows, features=features) for name, rows in splits.items()})
    import runs
    runs.save_dataset_atomic(dataset, args.output_dir, stage="jigsaw.py", overwrite=args.overwrite)
    return dataset


def main(argv=None):
    from common import check_ranges, fail, parse_args  # the shared dataclass -> argparse helper
    args = parse_args(BuildArgs, __doc__, argv)
    check_ranges(args, {"train": ">= 1", "test": ">= 1", "image_size": ">= 8", "max_side": ">= 8",
                        "puzzles_per_image": ">= 1"})
    try:
        rows, cols = parse_grid(args.grid)
    except ValueError as err:
        fail(f"--grid: {err}")
    if args.source == "procedural" and args.image_size < max(rows, cols) * 2:
        fail(f"--image_size {args.image_size} is too small for a {args.grid} grid (pieces of at least 2 pixels).")
    import files
    import runs
    runs.check_output_dir(args.output_dir, "jigsaw.py", args.overwrite)  # before any image is read
    try:
        with files.write_guard(Path(args.output_dir).parent, args.output_dir,
                              f"{args.output_dir} was not replaced (its previous version, if any, is intact)."):
            dataset = build_dataset(args)
    except (ValueError, FileNotFoundError, KeyError) as err:  # the source's faults, each named by build_rows
        fail(str(err.args[0]) if err.args else repr(err))
    print(f"[jigsaw] wrote {args.output_dir}: " + ", ".join(f"{k} {len(v)} puzzles" for k, v in dataset.items()))


if __name__ == "__main__":
    main()
