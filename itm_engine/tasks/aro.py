"""ARO (Yuksekgonul et al., "When and why vision-language models behave like bags-of-words",
ICLR 2023): VG-Relation and VG-Attribution over image crops, COCO-Order and Flickr30K-Order over
caption-order perturbations generated here, deterministically, without a POS-tagger download."""
from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from itm_engine.metrics import macro_accuracy
from itm_engine.tasks import register
from itm_engine.tasks.base import (
    Crop,
    DataError,
    Example,
    Task,
    check_id,
    check_number,
    check_string,
    check_strings,
    malformed,
    require,
    wrong_field,
)
from itm_engine.tasks.flickr30k import karpathy_captions

# -- VG-Relation / VG-Attribution -----------------------------------------------------------------

# The relations ARO leaves out of its reported VG-Relation macro accuracy (the list in its
# "Replicate ARO! VG-Relation, VG-Attribution" notebook): swapping their arguments does not make
# the caption false, or not reliably.
SYMMETRIC_RELATIONS = frozenset("""
adjusting|attached to|between|bigger than|biting|boarding|brushing|chewing|cleaning|climbing|close to|
coming from|coming out of|contain|crossing|dragging|draped over|drinking|drinking from|driving|
driving down|driving on|eating from|eating in|enclosing|exiting|facing|filled with|floating in|
floating on|flying|flying above|flying in|flying over|flying through|full of|going down|going into|
going through|grazing in|growing in|growing on|guiding|hanging from|hanging in|hanging off|
hanging over|higher than|holding onto|hugging|in between|jumping off|jumping on|jumping over|kept in|
larger than|leading|leaning over|leaving|licking|longer than|looking in|looking into|looking out|
looking over|looking through|lying next to|lying on top of|making|mixed with|mounted on|moving|
on the back of|on the edge of|on the front of|on the other side of|opening|painted on|parked at|
parked beside|parked by|parked in|parked in front of|parked near|parked next to|perched on|petting|
piled on|playing|playing in|playing on|playing with|pouring|reaching for|reading|reflected on|
riding on|running in|running on|running through|seen through|sitting behind|sitting beside|
sitting by|sitting in front of|sitting near|sitting next to|sitting under|skiing down|skiing on|
sleeping in|sleeping on|smiling at|sniffing|splashing|sprinkled on|stacked on|standing against|
standing around|standing behind|standing beside|standing in front of|standing near|standing next to|
staring at|stuck in|surrounding|swimming in|swinging|talking to|topped with|touching|traveling down|
traveling on|tying|typing on|underneath|wading in|waiting for|walking across|walking by|walking down|
walking next to|walking through|working in|working on|worn on|wrapped around|wrapped in|by|of|near|
next to|with|beside|on the side of|around""".replace("\n", "").split("|"))

# ARO's VG-Attribution macro accuracy averages only over attribute pairs with at least this many
# examples (its `evaluate_scores`).
ATTRIBUTE_PAIR_MIN_COUNT = 25


class _VisualGenome(Task):
    """What VG-Relation and VG-Attribution share: the annotation rows, the crops, the checks."""

    modes = ("i2t",)
    annotations: str = ""   # file name at the root
    group_field: str = ""   # "relation_name" or "attributes"

    def load_examples(self) -> Iterable[Example]:
        rows = self.read_json(self.annotations)
        if not isinstance(rows, list):
            raise DataError(f"{self.name}: {self.root / self.annotations}: expected a JSON list of rows")
        return list(self.examples_from(
            ((f"{self.annotations} row {i}", (i, row)) for i, row in enumerate(rows)), self._build))

    def _build(self, item: tuple[int, Any]) -> Example:
        index, row = item
        where = f"{self.annotations} row {index}"
        keys = ("image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption", self.group_field)
        require(row, keys, where, self.name)
        texts = tuple(check_string(row[k], k, where, self.name) for k in ("true_caption", "false_caption"))
        image = check_string(row["image_path"], "image_path", where, self.name)
        # fractional boxes are rounded to whole pixels
        x, y, w, h = (int(round(check_number(row[k], k, where, self.name)))
                      for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
        if w <= 0 or h <= 0:
            raise malformed(where, f"empty box (bbox_w={w}, bbox_h={h})", self.name)
        meta = self._meta(row[self.group_field], where)
        path = self.path(Path("images") / image, where)
        return Example(id=str(index), images=(Crop(path, (x, y, x + w, y + h)),), texts=texts, label=0, meta=meta)

    def _meta(self, value: Any, where: str) -> dict:
        raise NotImplementedError


@register
class VGRelation(_VisualGenome):
    """ARO VG-Relation: does the model prefer "the horse is eating the grass" to "the grass is eating
    the horse" on a crop showing both?

    Layout::

        ROOT/visual_genome_relation.json   ARO's annotations: a JSON list of rows
                                           {"image_path": "2315375.jpg", "bbox_x", "bbox_y",
                                            "bbox_w", "bbox_h": pixels, "true_caption",
                                            "false_caption", "relation_name": strings}
        ROOT/images/                       the images (ARO's vgr_vga_images.zip), by image_path

    Example (one per row, id = the row index): images = (the crop (x, y, x + w, y + h) of the
    image, exactly ARO's `image.crop(...)`; fractional boxes are rounded to whole pixels),
    texts = (true_caption, false_caption), label 0. ARO lists the captions the other way round
    ([false, true], label 1); the order does not change the accuracy. A tie between the two
    captions counts as wrong (ARO's argmax would pick the first, i.e. the false caption).
    No options.

    Metrics (ARO's conventions):
        accuracy: macro accuracy, the mean over relations of each relation's accuracy, leaving
            out the relations ARO deems symmetric (`SYMMETRIC_RELATIONS`, the list of ARO's
            replication notebook) -- the number ARO reports. If every relation present is in
            that list, the mean over all of them.
        accuracy/macro_all: the mean over all relations present, none left out.
        accuracy/micro: the fraction of all examples (what the DiffusionITM research code prints).
    """

    name = "vg_relation"
    description = "ARO VG-Relation: true vs argument-swapped caption on VG crops, macro accuracy over relations"
    annotations = "visual_genome_relation.json"
    group_field = "relation_name"

    def _meta(self, value: Any, where: str) -> dict:
        return {"relation": check_string(value, "relation_name", where, self.name)}

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        correct = self.correct(examples, scores)
        relations = [ex.meta["relation"] for ex in examples]
        kept = [(c, r) for c, r in zip(correct, relations) if r not in SYMMETRIC_RELATIONS]
        macro_all = macro_accuracy(correct, relations)
        macro = macro_accuracy([c for c, _ in kept], [r for _, r in kept]) if kept else macro_all
        return {"accuracy": macro, "accuracy/macro_all": macro_all, "accuracy/micro": sum(correct) / len(correct)}


@register
class VGAttribution(_VisualGenome):
    """ARO VG-Attribution: does the model prefer "the crouched cat and the open door" to "the open cat
    and the crouched door"?

    Layout::

        ROOT/visual_genome_attribution.json  ARO's annotations: a JSON list of rows
                                             {"image_path", "bbox_x", "bbox_y", "bbox_w",
                                              "bbox_h", "true_caption", "false_caption",
                                              "attributes": [two strings]}
        ROOT/images/                         the images (ARO's vgr_vga_images.zip), by image_path

    Example (one per row, id = the row index): images = (the crop (x, y, x + w, y + h) of the
    image, exactly ARO's `image.crop(...)`; fractional boxes are rounded to whole pixels),
    texts = (true_caption, false_caption), label 0. ARO lists the captions the other way round
    ([false, true], label 1); the order does not change the accuracy. A tie between the two
    captions counts as wrong (ARO's argmax would pick the first, i.e. the false caption).
    No options.

    Metrics:
        accuracy: the fraction of all examples (micro; what the DiffusionITM research code reports).
        accuracy/macro: ARO's number: the mean over attribute pairs ("a_b") with at least 25
            examples of each pair's accuracy; absent when no pair has 25 examples.
    """

    name = "vg_attribution"
    description = "ARO VG-Attribution: true vs attribute-swapped caption on VG crops, accuracy"
    annotations = "visual_genome_attribution.json"
    group_field = "attributes"

    def _meta(self, value: Any, where: str) -> dict:
        return {"attributes": check_strings(value, "attributes", where, self.name, length=2)}

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        correct = self.correct(examples, scores)
        out = {"accuracy": sum(correct) / len(correct)}
        pairs = ["_".join(ex.meta["attributes"]) for ex in examples]
        counts = Counter(pairs)
        kept = [(c, p) for c, p in zip(correct, pairs) if counts[p] >= ATTRIBUTE_PAIR_MIN_COUNT]
        if kept:
            out["accuracy/macro"] = macro_accuracy([c for c, _ in kept], [p for _, p in kept])
        return out


# -- caption-order perturbations ------------------------------------------------------------------
#
# ARO tags words with spaCy's en_core_web_sm (nouns: NN, NNS, NNP, NNPS; adjectives: JJ, JJR, JJS)
# and splits trigrams on NLTK tokens. Neither is available offline, so words are tagged with a
# small lexicon: listed adjectives (colours, sizes, materials, ...) and a few adjective suffixes
# are adjectives; listed determiners, numbers, pronouns, prepositions, conjunctions, auxiliaries,
# adverbs and common verbs, and words ending in -ing / -ed / -ly (minus listed nouns such as
# "building" or "family") are "other"; every other word counts as a noun. Captions are short
# descriptions dominated by determiner-adjective-noun phrases, where this matches the tagger on
# most words; it errs on rarer verbs (tagged nouns).

_ADJECTIVES = set("""
red orange yellow green blue purple pink brown black white gray grey silver golden beige tan maroon
teal cyan violet blond blonde dark bright pale colorful colourful multicolored striped spotted
colored coloured checkered plaid big small large little tiny huge giant tall short long wide narrow
thick thin high low deep shallow flat round old young new ancient antique modern vintage empty full
open closed wooden plastic metallic leather wet dry clean dirty messy busy crowded cluttered
quiet hot cold warm cool fresh ripe raw sunny cloudy snowy rainy foggy grassy sandy rocky dusty
muddy leafy lush tropical beautiful pretty cute nice good great fine fancy ugly happy sad funny
friendly lovely lonely curly silly chilly early elderly adult male female several many few other
various different same multiple assorted favorite favourite stuffed furry fluffy fuzzy hairy
shiny fat skinny heavy light-colored electric professional public private main single double
""".split())

_OTHER = set("""
a an the this that these those some any each every no another either neither its his her their my
your our whose what which all both half such one two three four five six seven eight nine ten eleven
twelve dozen hundred first second third
in on at of with without near next to by from into onto over under above below behind beside besides
between through across along around down up out off inside outside against toward towards during for
about like among beneath underneath atop upon past via within throughout beyond before after until
than as and or but nor so yet because if then while where when how why
he she it they we you i me him them us itself himself herself themselves who whom there here
is are was were be been being am has have had do does did can could will would should may might must
very too also just still not together away alone almost nearly really quite rather again even only
well
sit sits sat stand stands stood lie lies lay lays hold holds held ride rides rode walk walks look looks
eat eats ate eaten play plays fly flies flew jump jumps run runs ran wait waits wear wears wore worn
carry carries take takes took taken make makes made get gets got go goes went gone come comes came
watch watches show shows shown see sees saw seen use uses try tries throw throws threw catch catches
caught hit hits pull pulls push pushes drive drives drove pose poses lean leans hang hangs hung graze
grazes contain contains cross crosses read reads talk talks smile smiles prepare prepares cook cooks
feed feeds fill fills serve serves turn turns appear appears seem seems sleep sleeps slept swim swims
surf surfs skate skates ski skis kick kicks cut cuts let lets put puts
""".split())

_NOUNS_LIKE_OTHERS = set("""
building ceiling clothing dining living king ring string wing swing spring thing something nothing
everything anything evening morning railing painting icing frosting topping stuffing dressing awning
pudding wedding parking housing siding bedding sibling sling duckling dumpling lightning seating
bed red shed sled sledding
family belly jelly lily bully rally ally italy july butterfly dragonfly assembly supply reply doily
gully tally
""".split())

_ADJECTIVE_SUFFIXES = ("ful", "ous", "less", "able", "ible", "ish")


def word_class(token: str) -> str:
    """"noun", "adj" or "other" for a caption token, by the lexicon heuristic above."""
    word = token.lower().strip(",'\"?!.;:")
    if word.endswith("'s"):
        word = word[:-2]
    if not any(ch.isalpha() for ch in word):
        return "other"  # numbers, punctuation
    if word in _ADJECTIVES:
        return "adj"
    if word in _OTHER:
        return "other"
    if word not in _NOUNS_LIKE_OTHERS and (
        (word.endswith("ing") and len(word) > 5) or (word.endswith("ed") and len(word) > 4)
        or (word.endswith("ly") and len(word) > 4)
    ):
        return "other"  # gerunds, participles, adverbs
    if word.endswith(_ADJECTIVE_SUFFIXES) and len(word) > 5:
        return "adj"
    return "noun"


def normalize_caption(caption: str, max_words: int = 30) -> str:
    """ARO's `pre_caption`: lower-case, drop . ! " ( ) * # : ; ~, one space between words, at most
    `max_words` words."""
    text = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    return " ".join(text.split()[:max_words])


def _shuffle_positions(tokens: list[str], positions: list[int], rng: random.Random) -> list[str]:
    out = list(tokens)
    values = [tokens[i] for i in positions]
    rng.shuffle(values)
    for i, v in zip(positions, values):
        out[i] = v
    return out


def shuffle_nouns_and_adj(tokens: list[str], rng: random.Random) -> list[str]:
    """Permute the nouns among the noun positions and the adjectives among the adjective positions."""
    classes = [word_class(t) for t in tokens]
    out = _shuffle_positions(tokens, [i for i, c in enumerate(classes) if c == "noun"], rng)
    return _shuffle_positions(out, [i for i, c in enumerate(classes) if c == "adj"], rng)


def shuffle_allbut_nouns_and_adj(tokens: list[str], rng: random.Random) -> list[str]:
    """Permute every word that is neither a noun nor an adjective among those positions."""
    return _shuffle_positions(tokens, [i for i, t in enumerate(tokens) if word_class(t) == "other"], rng)


def _trigrams(tokens: list[str]) -> list[list[str]]:
    return [tokens[i : i + 3] for i in range(0, len(tokens), 3)]


def shuffle_within_trigrams(tokens: list[str], rng: random.Random) -> list[str]:
    """Cut into consecutive trigrams (the last may be shorter) and permute the words inside each."""
    out = []
    for trigram in _trigrams(tokens):
        rng.shuffle(trigram)
        out += trigram
    return out


def shuffle_trigrams(tokens: list[str], rng: random.Random) -> list[str]:
    """Cut into consecutive trigrams (the last may be shorter) and permute their order."""
    trigrams = _trigrams(tokens)
    rng.shuffle(trigrams)
    return [t for trigram in trigrams for t in trigram]


# ARO's order of the negative captions (COCO_Order / Flickr30k_Order `caption_options[1:]`).
PERTURBATIONS: tuple[tuple[str, Callable[[list[str], random.Random], list[str]]], ...] = (
    ("shuffle_nouns_and_adj", shuffle_nouns_and_adj),
    ("shuffle_allbut_nouns_and_adj", shuffle_allbut_nouns_and_adj),
    ("shuffle_within_trigrams", shuffle_within_trigrams),
    ("shuffle_trigrams", shuffle_trigrams),
)
RETRIES = 10  # extra draws when a perturbation returns the caption unchanged


def perturbations(caption: str, key: str, seed: int = 0) -> tuple[str, ...]:
    """The four perturbed versions of a (normalised) caption, in `PERTURBATIONS` order.

    Each is drawn from `random.Random(f"{seed}|{key}|{name}")`: the same (seed, key) always gives
    the same captions, on any machine. A draw equal to the caption is redrawn up to `RETRIES`
    times, then kept (e.g. a caption with a single noun and no adjective cannot change).
    """
    tokens = caption.split()
    out = []
    for name, perturb in PERTURBATIONS:
        rng = random.Random(f"{seed}|{key}|{name}")
        for _ in range(1 + RETRIES):
            shuffled = perturb(tokens, rng)
            if shuffled != tokens:
                break
        out.append(" ".join(shuffled))
    return tuple(out)


class _Order(Task):
    """What COCO-Order and Flickr30K-Order share: options, captions, perturbations, the metric."""

    modes = ("i2t",)
    annotation_files: tuple[str, ...] = ()  # tried in order; the first present is read
    image_dirs: tuple[str, ...] = ()
    option_names = ("seed", "limit_captions", "max_words", "image_dir")

    def __init__(self, root, skip_missing: bool = False, **options: Any) -> None:
        super().__init__(root, skip_missing, **options)
        self.seed = options.get("seed", 0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{self.name}: option seed must be an integer, got {self.seed!r}")
        self.limit_captions = options.get("limit_captions")
        self.max_words = options.get("max_words", 30)
        for key in ("limit_captions", "max_words"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{self.name}: option {key} must be a positive integer, got {value!r}")
        self.image_dir = self.image_folder(options.get("image_dir"), self.image_dirs)

    def sources(self) -> tuple[tuple[str, ...], str]:
        """(the annotation files, tried in order; the split read from a Karpathy split file)."""
        return self.annotation_files, "test"

    def _images(self) -> list[tuple[str, str, list[str]]]:
        """(where, image file name, captions) per image, in file order, from the first annotation
        file present."""
        files, split = self.sources()
        for file in files:
            if (self.root / file).is_file():
                data = self.read_json(file)
                if isinstance(data, dict) and "images" in data and "annotations" not in data:
                    return _karpathy(self.name, file, data, split)
                reader = _coco_captions if isinstance(data, dict) else _caption_list
                return reader(self.name, file, data)
        raise FileNotFoundError(f"{self.name}: expected one of {', '.join(files)} in {self.root} "
                                "(layout: docs/evaluation.md)")

    def load_examples(self) -> Iterable[Example]:
        rows = []
        for where, filename, captions in self._images():
            for j, caption in enumerate(captions[: self.limit_captions]):
                rows.append((f"{where} caption {j}", (where, filename, j, caption)))
        return list(self.examples_from(rows, self._build))

    def _build(self, item: tuple[str, str, int, str]) -> Example:
        where, filename, j, caption = item
        path = self.path(Path(self.image_dir) / filename, where)
        example_id = f"{filename}#{j}"
        text = normalize_caption(caption, self.max_words)
        texts = (text, *perturbations(text, example_id, self.seed))
        return Example(id=example_id, images=(path,), texts=texts, label=0)

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        correct = self.correct(examples, scores)
        return {"accuracy": sum(correct) / len(correct)}


def _file_name(value: Any, key: str, where: str, task: str) -> str:
    """An image file name (a path whose last part names a file), checked."""
    name = check_string(value, key, where, task)
    if name.endswith(("/", "\\")) or Path(name).name in ("..", "."):
        raise wrong_field(value, key, "an image file name", where, task)
    return name


def _karpathy(task: str, file: str, data: dict, split: str = "test") -> list[tuple[str, str, list[str]]]:
    """Karpathy split file {"images": [{"filename", "split", "sentences": [{"raw"}]}]}: one split."""
    if not isinstance(data["images"], list):
        raise DataError(f"{task}: {file}: expected an object with an 'images' list")
    out = []
    for i, row in enumerate(data["images"]):
        where = f"{file} images[{i}]"
        require(row, ("split",), where, task)
        if check_string(row["split"], "split", where, task) != split:
            continue
        require(row, ("filename", "sentences"), where, task)
        out.append((where, _file_name(row["filename"], "filename", where, task),
                    karpathy_captions(row["sentences"], where, task)))
    return out


def _caption_list(task: str, file: str, data: Any) -> list[tuple[str, str, list[str]]]:
    """ARO's own split files (coco_karpathy_test.json, flickr30k_test.json): [{"image": "dir/name.jpg",
    "caption": [captions] or a caption}]; the image is looked up by file name in the image folder."""
    if not isinstance(data, list):
        raise DataError(f"{task}: {file}: expected a JSON list of {{'image', 'caption'}} rows")
    out = []
    for i, row in enumerate(data):
        where = f"{file} row {i}"
        require(row, ("image", "caption"), where, task)
        image = _file_name(row["image"], "image", where, task)
        caption = row["caption"]
        texts = (check_strings(caption, "caption", where, task) if isinstance(caption, list)
                 else [check_string(caption, "caption", where, task)])
        out.append((where, Path(image).name, texts))
    return out


def _coco_captions(task: str, file: str, data: dict) -> list[tuple[str, str, list[str]]]:
    """COCO captions file {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}:
    images in file order, each with its captions in annotation order; images without captions
    are left out. Image ids are compared as strings (`check_id`): 7 and "7" are one image."""
    images, annotations = data.get("images"), data.get("annotations")
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise DataError(f"{task}: {file}: expected an object with 'images' and 'annotations' lists")
    rows: dict[str, tuple[str, str, list[str]]] = {}
    for i, row in enumerate(images):
        where = f"{file} images[{i}]"
        require(row, ("id", "file_name"), where, task)
        image_id = check_id(row["id"], "id", where, task)
        if image_id in rows:
            raise DataError(f"{task}: {where}: image id {image_id!r} is listed twice")
        rows[image_id] = (where, _file_name(row["file_name"], "file_name", where, task), [])
    for i, row in enumerate(annotations):
        where = f"{file} annotations[{i}]"
        require(row, ("image_id", "caption"), where, task)
        image_id = check_id(row["image_id"], "image_id", where, task)
        if image_id not in rows:
            raise malformed(where, f"image_id {row['image_id']!r} is not in 'images'", task)
        rows[image_id][2].append(check_string(row["caption"], "caption", where, task))
    return [r for r in rows.values() if r[2]]


_ORDER_DOC = """
    The first annotation file present is read. Example (one per caption, id = "{image file
    name}#{caption index}"): images = (the image,), texts = (the caption, then its four
    perturbations in ARO's order: shuffle_nouns_and_adj, shuffle_allbut_nouns_and_adj,
    shuffle_within_trigrams, shuffle_trigrams), label 0. Metric: "accuracy" (ARO's
    Precision@1; a tie with a perturbation counts as wrong).

    Captions are normalised as ARO does (lower case, . ! " ( ) * # : ; ~ removed, single spaces,
    at most `max_words` words), then perturbed; words are the space-separated tokens (a comma
    stays attached to its word), so every perturbation is a permutation of the caption's words.
    ARO perturbs spaCy/NLTK tokens of the raw caption, then normalises; the part-of-speech tags
    here come from a built-in lexicon (see `word_class`). The perturbations of a caption depend
    on (option seed, example id) only (see `perturbations`); one that cannot differ from the
    caption (e.g. a single noun to shuffle) is kept equal to it.

    Options:
        seed: the perturbation seed (default 0).
        limit_captions: use only the first N captions of each image (default: all, as ARO).
        max_words: truncate captions to this many words (default 30, as ARO).
        image_dir: the image folder, relative to ROOT (default: the first of the layout's
            image folders that exists).
"""


@register
class COCOOrder(_Order):
    """ARO COCO-Order: the caption against four word-order perturbations of it.

    Layout::

        ROOT/coco_karpathy_test.json   ARO's file (Karpathy test split, 5,000 images):
                                       [{"image": "val2014/COCO_val2014_...jpg",
                                         "caption": [...]}], or
        ROOT/dataset_coco.json         Karpathy's split file (its "test" images), or
        ROOT/captions_val2014.json     the COCO captions file (or ROOT/annotations/...):
                                       {"images": [{"id", "file_name"}],
                                        "annotations": [{"image_id", "caption"}]}
                                       (every image in it: 40,504 for val2014)
        ROOT/val2014/                  the images, by file name (or ROOT/images/)

    """

    __doc__ += _ORDER_DOC
    name = "coco_order"
    description = "ARO COCO-Order: caption vs four word-order perturbations, accuracy"
    annotation_files = ("coco_karpathy_test.json", "dataset_coco.json", "captions_val2014.json",
                        "annotations/captions_val2014.json")
    image_dirs = ("val2014", "images")


@register
class Flickr30KOrder(_Order):
    """ARO Flickr30K-Order: the caption against four word-order perturbations of it.

    Layout::

        ROOT/flickr30k_test.json       ARO's file (Karpathy test split, 1,000 images):
                                       [{"image": "flickr30k-images/...jpg", "caption": [...]}], or
        ROOT/dataset_flickr30k.json    Karpathy's split file (its "test" images)
        ROOT/flickr30k-images/         the images, by file name (or ROOT/images/)

    Under the DiffusionITM research code's conventions, its split: the validation split,
    ROOT/flickr30k_val.json (BLIP's file, the one it downloads; the same row format), or the
    "val" images of dataset_flickr30k.json.

    """

    __doc__ += _ORDER_DOC
    name = "flickr30k_order"
    description = "ARO Flickr30K-Order: caption vs four word-order perturbations, accuracy"
    annotation_files = ("flickr30k_test.json", "dataset_flickr30k.json")
    image_dirs = ("flickr30k-images", "images")

    def sources(self) -> tuple[tuple[str, ...], str]:
        if self.protocol.conventions == "diffusion-itm":
            return ("flickr30k_val.json", "dataset_flickr30k.json"), "val"
        return self.annotation_files, "test"


__all__ = ["COCOOrder", "Flickr30KOrder", "VGAttribution", "VGRelation", "normalize_caption", "perturbations",
           "word_class", "SYMMETRIC_RELATIONS"]
