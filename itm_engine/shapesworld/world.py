"""ShapesWorld: a procedural image-caption world with the compositional structure of GDBench's
CLEVR subtasks, generated from a seed (nothing to download). Its evaluation tasks read what
`write_shapesworld` writes, or take examples straight from here (`itm_engine.shapesworld.tasks`).

World. An image (default 64 x 64 px, grey background, no anti-aliasing) holds one or two objects;
an object has a colour (`COLORS`, named RGB), a shape (`SHAPES`), a size (`SIZES`: small/large)
and a centre in pixels. A `Style` varies what a caption does not say (background grey, colour
shades, object sizes, anti-aliased edges): the "varied" renderer of training data and test splits.
Two objects are separated along one axis and nearly aligned on the other, so exactly one relation
(`RELATIONS`: left of / right of / above / below) holds between them.

Captions (a small grammar, one form per subtask; the negatives edit exactly one attribute)::

    recognition_color / recognition_shape   "a small red circle"          neg: other colour / shape
    binding_color_shape                     "a red circle and a blue square"      neg: colours swapped
    binding_shape_color                     "a circle that is red and a square that is blue"
                                                                                 neg: shapes swapped
    pair_binding_color / pair_binding_size  "a large red circle and a small blue circle"
                                                                         neg: colours / sizes swapped
    spatial                                 "a red circle left of a blue square"   neg: relation flipped
    complexity (for text->image)            two objects, or one of them alone (recognition /
                                            binding form)          neg: the other of the two

Every negative caption is the caption of a negative *scene* (the positive scene with that one
attribute edited; a flipped relation swaps the two objects' positions), so the same example
serves image->text (one image, k captions) and text->image (one caption, k images).

Splits (disjoint by construction, not by chance):
    - seeds: split `s` with seed `k` draws from `random.Random(SPLIT_SEEDS[s] + k)`;
    - images: a scene's *placement bucket* is crc32 of its sorted object centres mod 10; "train"
      keeps scenes in buckets 0-6, "val" in 7, "test" in 8, "compositional" in 9. Edits (colour,
      shape, size, swapped positions) keep the set of centres, so no image of one split, negatives
      included, can equal an image of another;
    - compositional: the colour-shape combinations in `HELD_OUT_COMBOS` never appear in the
      "train" split (not in positives, negative captions or negative images); in the
      "compositional" split every object of every positive scene has a held-out combination
      (its negatives may use any). Report it separately: it measures generalisation.

On disk (`write_shapesworld`, or `itm-shapes write --out DIR`)::

    ROOT/examples.json   {"split", "seed", "size", "style", "held_out_combos", "examples": [{"id",
                         "subtask", "image", "caption", "objects", "negatives": [{"image",
                         "caption", "objects"}, ...]}, ...]}
    ROOT/images/*.png    the positive and negative scenes, by the paths named above
"""
from __future__ import annotations

import json
import random
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import PIL.Image
import PIL.ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 230),
    "yellow": (240, 220, 30), "purple": (140, 40, 190), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.2, "large": 0.36}  # diameter as a fraction of the image side
# each shape's nearest other shape in a small object's pixels as a 32 px model sees them (the varied
# renderer's anti-aliased edges blur what tells them apart most); tests/shapesworld/test_world.py
# measures it
NEAREST_SHAPE = {"circle": "square", "square": "circle", "triangle": "diamond", "diamond": "cross",
                 "cross": "diamond"}
RELATIONS = ("left of", "right of", "above", "below")
BACKGROUND = (128, 128, 128)
SUBTASKS = ("recognition_color", "recognition_shape", "binding_color_shape", "binding_shape_color",
            "pair_binding_color", "pair_binding_size", "spatial")
# built for text->image: one candidate image has one object, the other two (see `_complexity_example`)
COMPLEXITY = "complexity"
ALL_SUBTASKS = SUBTASKS + (COMPLEXITY,)
# never in "train"; each colour keeps 4 training shapes, and two shapes (triangle, circle) are held
# out in two colours each so that the pair subtasks exist in the compositional split
HELD_OUT_COMBOS = frozenset({("red", "triangle"), ("blue", "triangle"), ("green", "circle"),
                             ("yellow", "circle"), ("purple", "square"), ("orange", "diamond")})
SPLIT_SEEDS = {"train": 0, "val": 1_000_003, "test": 2_000_003, "compositional": 3_000_017}
SPLIT_BUCKETS = {"train": range(0, 7), "val": range(7, 8), "test": range(8, 9), "compositional": range(9, 10)}


@dataclass(frozen=True)
class Obj:
    """One object: attributes and its centre in pixels."""

    color: str
    shape: str
    size: str
    x: int
    y: int


Scene = tuple[Obj, ...]


# -- rendering and captions --------------------------------------------------------------------

@dataclass(frozen=True)
class Style:
    """How an image is drawn beyond its scene: the nuisances a model should ignore.

    The default is the exact renderer (grey 128 background, the named colours, the nominal sizes,
    hard edges). `varied_style` draws the nuisances of another renderer: background grey
    `VARIED_GREYS`, each object's colour shifted by up to `VARIED_SHADE` per channel, its size
    scaled by up to `VARIED_SCALE`, edges anti-aliased (`SUPERSAMPLE` x supersampling)."""

    background: int = BACKGROUND[0]
    shades: tuple[tuple[int, int, int], ...] = ()  # per object: added to its colour's RGB (clipped); () none
    scales: tuple[float, ...] = ()  # per object: its size factor; () all 1
    antialias: bool = False

    def of_object(self, k: int) -> Style:
        """The style of object `k` drawn alone."""
        return replace(self, shades=self.shades[k:k + 1], scales=self.scales[k:k + 1])


EXACT = Style()
STYLES = ("exact", "varied")  # the renderers a draw can use: the exact one, or a varied style per image
VARIED_GREYS, VARIED_SHADE, VARIED_SCALE, SUPERSAMPLE = (105, 150), 25, 0.12, 4


def varied_style(rng: random.Random, objects: int = 2) -> Style:
    """One draw of the varied renderer's nuisances (see `Style`) for up to `objects` objects."""
    return Style(background=rng.randint(*VARIED_GREYS),
                 shades=tuple(tuple(rng.randint(-VARIED_SHADE, VARIED_SHADE) for _ in range(3))
                              for _ in range(objects)),
                 scales=tuple(rng.uniform(1 - VARIED_SCALE, 1 + VARIED_SCALE) for _ in range(objects)),
                 antialias=True)


def style_for(style: str, key: str) -> Style:
    """The style of the image named `key` (e.g. split, seed and file stem) under renderer `style`:
    `EXACT`, or a varied draw seeded by `key` (the same key always gives the same style)."""
    if style == "exact":
        return EXACT
    if style == "varied":
        return varied_style(random.Random(f"style:{key}"))
    raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")


def render(scene: Scene, size: int = 64, style: Style = EXACT) -> PIL.Image.Image:
    """The scene as an RGB image [size x size] drawn in `style` (default: exact colours, no
    anti-aliasing)."""
    scale = SUPERSAMPLE if style.antialias else 1
    image = PIL.Image.new("RGB", (size * scale, size * scale), (style.background,) * 3)
    draw = PIL.ImageDraw.Draw(image)
    for k, o in enumerate(scene):
        factor = style.scales[k] if k < len(style.scales) else 1.0
        shade = style.shades[k] if k < len(style.shades) else (0, 0, 0)
        fill = tuple(min(255, max(0, c + d)) for c, d in zip(COLORS[o.color], shade))
        # supersampled: pixel (i, j) covers [i, i + 1) x [j, j + 1), so centres move by half a pixel
        r, x, y = SIZES[o.size] * size / 2 * factor * scale, o.x * scale, o.y * scale
        if scale > 1:
            x, y = x + (scale - 1) / 2, y + (scale - 1) / 2
        if o.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif o.shape == "square":
            s = r * 0.85
            draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
        else:  # cross
            t = r / 3
            draw.rectangle((x - r, y - t, x + r, y + t), fill=fill)
            draw.rectangle((x - t, y - r, x + t, y + r), fill=fill)
    return image.resize((size, size), PIL.Image.BOX) if scale > 1 else image


def relation(a: Obj, b: Obj) -> str:
    """Where `a` is relative to `b`, along the axis on which they are further apart."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def caption(scene: Scene, subtask: str) -> str:
    """The caption of `scene` in the grammar form of `subtask` (see the module docstring)."""
    a = scene[0]
    if subtask.startswith("recognition") or (subtask == COMPLEXITY and len(scene) == 1):
        return f"a {a.size} {a.color} {a.shape}"
    b = scene[1]
    if subtask in ("binding_color_shape", COMPLEXITY):
        return f"a {a.color} {a.shape} and a {b.color} {b.shape}"
    if subtask == "binding_shape_color":
        return f"a {a.shape} that is {a.color} and a {b.shape} that is {b.color}"
    if subtask.startswith("pair_binding"):
        return f"a {a.size} {a.color} {a.shape} and a {b.size} {b.color} {b.shape}"
    if subtask == "spatial":
        return f"a {a.color} {a.shape} {relation(a, b)} a {b.color} {b.shape}"
    raise ValueError(f"unknown subtask {subtask!r}; known: {', '.join(ALL_SUBTASKS)}")


# -- sampling ----------------------------------------------------------------------------------

def bucket(scene: Scene) -> int:
    """Placement bucket 0-9: a hash of the (unordered) object centres; edits keep it."""
    return zlib.crc32(repr(sorted((o.x, o.y) for o in scene)).encode()) % 10


def _centres(rng: random.Random, n: int, size: int) -> list[tuple[int, int]]:
    """n centres that keep any object (small or large) inside the image; two objects are >= 0.42
    of the side apart on one axis and <= 0.12 apart on the other (one clear relation, no overlap)."""
    lo, hi = int(SIZES["large"] * size / 2) + 1, size - int(SIZES["large"] * size / 2) - 2
    if n == 1:
        return [(rng.randint(lo, hi), rng.randint(lo, hi))]
    gap, slack = round(0.42 * size), round(0.12 * size)
    main0 = rng.randint(lo, hi - gap)
    main1 = rng.randint(main0 + gap, hi)
    cross0 = rng.randint(lo, hi)
    cross1 = min(hi, max(lo, cross0 + rng.randint(-slack, slack)))
    pair = [(main0, cross0), (main1, cross1)]
    rng.shuffle(pair)
    if rng.random() < 0.5:  # vertical instead of horizontal
        pair = [(c, m) for m, c in pair]
    return pair


def _combos(rng: random.Random, split: str, n: int, same_shape: bool) -> list[tuple[str, str]]:
    """n distinct colour-shape combos allowed as positives in `split` (distinct colours; shapes
    equal when `same_shape`, else distinct for two objects)."""
    pool = sorted(HELD_OUT_COMBOS) if split == "compositional" else \
        [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT_COMBOS]
    while True:
        picked = rng.sample(pool, n)
        if n == 1 or (picked[0][0] != picked[1][0] and (picked[0][1] == picked[1][1]) == same_shape):
            return picked


def _negatives(scene: Scene, subtask: str) -> list[Scene]:
    """The scenes that differ from `scene` in exactly the attribute `subtask` probes."""
    a = scene[0]
    if subtask == "recognition_color":
        return [(replace(a, color=c),) for c in COLORS if c != a.color]
    if subtask == "recognition_shape":
        return [(replace(a, shape=s),) for s in SHAPES if s != a.shape]
    b = scene[1]
    if subtask in ("binding_color_shape", "pair_binding_color"):
        return [(replace(a, color=b.color), replace(b, color=a.color))]
    if subtask == "binding_shape_color":
        return [(replace(a, shape=b.shape), replace(b, shape=a.shape))]
    if subtask == "pair_binding_size":
        return [(replace(a, size=b.size), replace(b, size=a.size))]
    return [(replace(a, x=b.x, y=b.y), replace(b, x=a.x, y=a.y))]  # spatial: the relation flips


def _complexity_example(rng: random.Random, split: str, size: int) -> tuple[Scene, list[Scene]]:
    """A two-object scene and one of its objects alone (same place), in random order (positive
    first): the caption of either fits the other image in part.

    Built to show text->image's modality bias: the one-object image has the lower raw denoising
    error whatever the caption, so raw T2I scores pick it even for the two-object caption;
    null-normalisation (error minus the image's own null-prompt error) removes that."""
    while True:
        pair = sample_example(rng, "binding_color_shape", split, size)[0]
        singles = [(o,) for o in pair if bucket((o,)) in SPLIT_BUCKETS[split]]
        if singles:
            single = rng.choice(singles)
            return (pair, [single]) if rng.random() < 0.5 else (single, [pair])


def sample_example(rng: random.Random, subtask: str, split: str = "train", size: int = 64) -> tuple[Scene, list[Scene]]:
    """A positive scene of `split` for `subtask` and its negative scenes (rejection sampling)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLIT_SEEDS)}")
    if subtask == COMPLEXITY:
        return _complexity_example(rng, split, size)
    two = not subtask.startswith("recognition")
    while True:
        combos = _combos(rng, split, 2 if two else 1, same_shape=subtask.startswith("pair_binding"))
        sizes = ["small", "large"] if subtask.startswith("pair_binding") else \
            [rng.choice(list(SIZES)) for _ in combos]
        rng.shuffle(sizes)
        scene = tuple(Obj(c, s, z, x, y) for (c, s), z, (x, y) in zip(combos, sizes, _centres(rng, len(combos), size)))
        if bucket(scene) not in SPLIT_BUCKETS[split]:
            continue
        negatives = _negatives(scene, subtask)
        if split == "train":  # a held-out combination never appears in training, not even as a negative
            negatives = [n for n in negatives if all((o.color, o.shape) not in HELD_OUT_COMBOS for o in n)]
        if negatives and all(caption(n, subtask) != caption(scene, subtask) for n in negatives):
            return scene, negatives


VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(
    ["a", "and", "that", "is", "of", "left", "right", "above", "below", "on", "the", "at", "top", "bottom",
     *SIZES, *COLORS, *SHAPES]))


def place(obj: Obj, size: int = 64) -> str | None:
    """Where `obj` is in the image, a phrase for training captions: "on the left" / "on the right" /
    "at the top" / "at the bottom" along the axis it is further from the centre on, or None when
    it is near the centre (within 0.15 of the side)."""
    dx, dy = obj.x - size / 2, obj.y - size / 2
    if max(abs(dx), abs(dy)) < 0.15 * size:
        return None
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def training_captions(scene: Scene, size: int = 64) -> dict[str, list[str]]:
    """Every true caption of `scene` (drawn at `size` px), grouped by form, for pretraining a model.

    The evaluation grammar: one object, "recognition" ("a small red circle"); two objects,
    "binding" (both orders of "a red circle and a blue square" and "a circle that is red and
    ..."), "pair" (with sizes, both orders) and "spatial" ("a red circle left of a blue square" and
    its converse "a blue square right of a red circle"). Plus, for training only, "position":
    absolute places ("a small red circle on the left", "a red circle at the top and a blue square
    at the bottom"), which ground the position words in the image (absent when an object is near
    the centre)."""
    places = [place(o, size) for o in scene]
    if len(scene) == 1:
        a = scene[0]
        forms = {"recognition": [caption(scene, "recognition_color")]}
        if places[0]:
            forms["position"] = [f"a {a.size} {a.color} {a.shape} {places[0]}"]
        return forms
    a, b = scene
    both = [(a, b), (b, a)]
    forms = {
        "binding": [caption(s, t) for s in both for t in ("binding_color_shape", "binding_shape_color")],
        "pair": [caption(s, "pair_binding_size") for s in both],
        "spatial": [caption(s, "spatial") for s in both],
    }
    if all(places):
        pa, pb = places
        forms["position"] = [f"a {a.color} {a.shape} {pa} and a {b.color} {b.shape} {pb}",
                             f"a {b.color} {b.shape} {pb} and a {a.color} {a.shape} {pa}"]
    return forms


_OPPOSITE_PLACES = {"left": "right", "right": "left", "above": "below", "below": "above",
                    "top": "bottom", "bottom": "top"}


def has_place_words(caption: str) -> bool:
    """Whether `caption` says where things are (left/right/above/below/top/bottom)."""
    return any(w in _OPPOSITE_PLACES for w in caption.split())


def hard_negative_caption(caption: str, rng: random.Random, nearest_share: float = 0.0) -> str | None:
    """A false caption that differs from the true training caption `caption` only in structure, for
    pretraining with hard negatives: when it says where things are, every position word flipped
    (left/right, above/below, top/bottom: "a red circle left of a blue square" -> "... right of
    ..."); otherwise, in a two-object caption, its two colours or its two sizes swapped (one of
    those that apply, drawn with `rng`); in a one-object caption, its shape replaced by another:
    with odds `nearest_share` by the shape's `NEAREST_SHAPE`, else by one drawn with `rng` from
    all the others. None when none applies (the null prompt).

    Each is the caption of a different scene: the swapped-position, swapped-colour or
    swapped-size scene of the spatial and pair subtasks' negatives, or the other-shape scene of
    recognition_shape's. No negative names a held-out colour-shape combination."""
    words = caption.split()
    if has_place_words(caption):
        return " ".join(_OPPOSITE_PLACES.get(w, w) for w in words)
    named_shapes = [i for i, w in enumerate(words) if w in SHAPES]
    if len(named_shapes) == 1:
        at = named_shapes[0]
        edits = [words[:at] + [other] + words[at + 1:] for other in SHAPES if other != words[at]]
        nearest = words[:at] + [NEAREST_SHAPE[words[at]]] + words[at + 1:]
        if nearest_share and rng.random() < nearest_share and not _names_held_out_combo(nearest):
            return " ".join(nearest)
    else:
        edits = []
        for vocabulary in (COLORS, SIZES):
            present = [w for w in words if w in vocabulary]
            if len(present) == 2 and present[0] != present[1]:
                swap = {present[0]: present[1], present[1]: present[0]}
                edits.append([swap.get(w, w) for w in words])
    edits = [e for e in edits if not _names_held_out_combo(e)]  # not even a negative may name one
    return " ".join(rng.choice(edits)) if edits else None


def later_object_side(caption: str) -> tuple[list[int], int] | None:
    """For a spatial caption "a X REL a Y": the word positions (0-based, split on spaces) of Y's
    colour and shape, and where Y is relative to X as an index into `RELATIONS` (the converse of
    REL: "a red circle left of a blue square" -> ([6, 7], 1), the square being right of the
    circle). None for any other caption. A function of the words alone, for the text encoder's
    layout objective in pretraining (`pretrain.PretrainConfig.layout_weight`)."""
    words = caption.split()
    for index, rel in enumerate(RELATIONS):
        rel_words = rel.split()
        cut = len(words) - 3 - len(rel_words)
        if cut == 3 and words[cut:cut + len(rel_words)] == rel_words and words[0] == words[-3] == "a" \
                and words[1] in COLORS and words[-2] in COLORS and words[2] in SHAPES and words[-1] in SHAPES:
            return [len(words) - 2, len(words) - 1], index ^ 1  # RELATIONS pairs converses: 0<->1, 2<->3
    return None


def _names_held_out_combo(words: list[str]) -> bool:
    """Whether caption `words` name a held-out colour-shape combination ("red triangle" or
    "triangle that is red")."""
    pairs = list(zip(words, words[1:])) + [(words[i + 3], words[i]) for i in range(len(words) - 3)
                                            if words[i + 1:i + 3] == ["that", "is"]]
    return any(pair in HELD_OUT_COMBOS for pair in pairs)


@dataclass(frozen=True)
class Draw:
    """Which examples to draw: `n` per subtask of `split`, in the order of `subtasks`, from
    `random.Random(SPLIT_SEEDS[split] + seed)`, images rendered at `size` px by the exact renderer
    or, with `style` "varied", each image in its own varied style (`style_for`, keyed by split,
    seed and file stem): the same scenes under another renderer's nuisances. The same Draw always
    gives the same examples, on disk (`write_shapesworld`) or in memory (`example_rows`)."""

    split: str = "test"
    n: int = 50
    seed: int = 0
    size: int = 64
    subtasks: tuple[str, ...] = ALL_SUBTASKS
    style: str = "exact"

    def __post_init__(self) -> None:
        if self.split not in SPLIT_SEEDS:
            raise ValueError(f"unknown split {self.split!r}; known: {', '.join(SPLIT_SEEDS)}")
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {', '.join(STYLES)}, got {self.style!r}")
        unknown = [s for s in self.subtasks if s not in ALL_SUBTASKS]
        if unknown or not self.subtasks:
            raise ValueError(f"subtasks must name some of {', '.join(ALL_SUBTASKS)}, got {list(self.subtasks)}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    def render(self, scene: Scene, stem: str) -> PIL.Image.Image:
        """The image of `scene`, the draw's image file `stem`, in the draw's style."""
        return render(scene, self.size, style_for(self.style, f"{self.split}:{self.seed}:{stem}"))


def draw_scenes(draw: Draw) -> list[tuple[str, Scene, list[Scene]]]:
    """(subtask, positive scene, negative scenes) of each example of `draw`, in order."""
    rng = random.Random(SPLIT_SEEDS[draw.split] + draw.seed)
    return [(subtask, *sample_example(rng, subtask, draw.split, draw.size))
            for subtask in draw.subtasks for _ in range(draw.n)]


def example_rows(draw: Draw, image: Callable[[Scene, str], Any]) -> list[dict]:
    """The rows of `examples.json` for `draw` (layout: module docstring), each scene's "image" being
    `image(scene, stem)`: a file path for the writer, the rendered image for examples in memory."""
    rows = []
    for index, (subtask, scene, negatives) in enumerate(draw_scenes(draw)):
        k = index % draw.n
        stem = f"{subtask}_{k:05d}"
        rows.append({
            "id": f"{subtask}/{k:05d}", "subtask": subtask, "image": image(scene, stem),
            "caption": caption(scene, subtask), "objects": [asdict(o) for o in scene],
            "negatives": [{"image": image(neg, f"{stem}_neg{j}"), "caption": caption(neg, subtask),
                           "objects": [asdict(o) for o in neg]} for j, neg in enumerate(negatives)],
        })
    return rows


def write_shapesworld(root, split: str = "test", n: int = 50, seed: int = 0, size: int = 64,
                      subtasks: Sequence[str] = ALL_SUBTASKS, style: str = "exact") -> Path:
    """Generate `n` examples per subtask of `split` into `root` (images/ + examples.json) drawn by
    the renderer `style` ("exact" or "varied", see `Draw`); returns root.

    The same (split, n, seed, size, subtasks, style) always writes the same files."""
    draw = Draw(split, n, seed, size, tuple(subtasks), style)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)

    def save(scene: Scene, stem: str) -> str:
        relative = f"images/{stem}.png"
        draw.render(scene, stem).save(root / relative)
        return relative

    meta = {"split": split, "seed": seed, "size": size, "style": style, "held_out_combos": sorted(HELD_OUT_COMBOS),
            "examples": example_rows(draw, save)}
    (root / "examples.json").write_text(json.dumps(meta, indent=1))
    return root


def write_negclip_tsv(root) -> Path:
    """Write ROOT/negclip.tsv from ROOT/examples.json: HardNeg training data in NegCLIP's format
    (`itm-train --data ROOT/negclip.tsv`). Every positive and negative scene is a row (title =
    its caption, filepath = its image); a positive's hard negatives are its negatives' captions and
    rows, and each negative's are the positive's (so both caption and image negatives exist)."""
    import csv

    root = Path(root)
    rows: list[dict] = []
    for ex in json.loads((root / "examples.json").read_text())["examples"]:
        first = len(rows)
        negs = list(range(first + 1, first + 1 + len(ex["negatives"])))
        rows.append({"title": ex["caption"], "filepath": ex["image"],
                     "neg_caption": repr([n["caption"] for n in ex["negatives"]]), "neg_image": repr(negs)})
        rows += [{"title": n["caption"], "filepath": n["image"], "neg_caption": repr([ex["caption"]]),
                  "neg_image": repr([first])} for n in ex["negatives"]]
    path = root / "negclip.tsv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["title", "filepath", "neg_caption", "neg_image"], delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path
