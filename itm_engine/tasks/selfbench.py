"""Self-Bench (Jeong, Uselis, Oh and Rohrbach, NeurIPS 2025 D&B): a diffusion model's own
generations for the GenEval prompts, each matched against the prompt's hard-negative prompts."""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Sequence

import torch

from itm_engine.metrics import accuracy_by_group
from itm_engine.tasks import register
from itm_engine.tasks.base import (
    DataError,
    Example,
    MissingData,
    Task,
    check_list,
    check_string,
    check_strings,
    malformed,
    require,
    wrong_field,
)

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SUBSETS = ("full", "correct")
# GenEval's prompts/object_names.txt: the 80 COCO classes, in its order (the order of the candidates)
GENEVAL_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
POSITIONS = ("left of", "right of", "above", "below")
NUMBERS = ("one", "two", "three", "four")
TWO_OBJECT_SIDE = 50  # two_object: negatives that keep the first object, and as many that keep the second
# Jeong et al.'s --geneval_version names -> their folders ({cfg}/{model}, cfg 9.0 as they ship it)
GENERATORS = {"1.5": "9.0/stable-diffusion-v1-5", "2.0": "9.0/stable-diffusion-2-base",
              "3-m": "9.0/stable-diffusion-3-medium-diffusers", "flux": "9.0/FLUX.1-dev"}
PROMPT_FOLDER = re.compile(r"\d+")
SAMPLE_FILE = re.compile(r"(\d+)\.png")  # GenEval's evaluate_images.py reads the samples matching \d+\.png


def with_article(name: str) -> str:
    """GenEval's article rule: "an" before a vowel letter, else "a"."""
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def plural(name: str) -> str:
    """GenEval's plural rule: "es" after an "s", else "s"."""
    return f"{name}es" if name[-1] == "s" else f"{name}s"


def geneval_candidates(tag: str, classes: Sequence[str], prompt: str) -> list[str]:
    """The candidate prompts of an image of GenEval tag `tag` whose objects are `classes` (the
    classes of its metadata's "include", in order), as Jeong et al. build them: the "photo" domain
    of their zero_shot_prompts.json (filter_prompts/prompts/zero_prompts.py) over GenEval's classes;
    for two_object their two_object_subset.json (two_object_subset.py), which `prompt` fills in."""
    photo = with_article("photo")
    if tag == "single_object":
        return [f"{photo} of {with_article(c)}" for c in GENEVAL_CLASSES]
    if tag == "colors":
        return [f"{photo} of {with_article(color)} {classes[0]}" for color in COLORS]
    if tag == "counting":
        name = classes[0]
        return [f"{photo} of one {name}" if n == "one" else f"{photo} of {n} {plural(name)}" for n in NUMBERS]
    if tag == "position":  # include[1] is the object placed relative to include[0]
        a, b = classes[1], classes[0]
        return [f"{photo} of {with_article(a)} {position} {with_article(b)}" for position in POSITIONS]
    if tag == "color_attr":
        a, b = classes[0], classes[1]
        return [f"{photo} of {with_article(ca)} {a} and {with_article(cb)} {b}" for ca in COLORS for cb in COLORS]
    if tag == "two_object":
        first, second = classes[0], classes[1]
        head, tail = f"{photo} of {with_article(first)} and", f"and {with_article(second)}"
        out, kept_first, kept_second = [], 0, 0
        for a in GENEVAL_CLASSES:
            for b in GENEVAL_CLASSES:
                text = f"{photo} of {with_article(a)} and {with_article(b)}"
                if text == f"{head} {with_article(second)}":
                    out.append(prompt)
                elif kept_first < TWO_OBJECT_SIDE and text.startswith(head) and second not in text:
                    kept_first += 1
                    out.append(text)
                elif kept_second < TWO_OBJECT_SIDE and not text.startswith(head) and text.endswith(tail):
                    kept_second += 1
                    out.append(text)
        return out
    raise ValueError(f"unknown GenEval tag {tag!r}; known: {', '.join(TAGS)}")


def sample_key(path: str) -> str:
    """"{prompt folder}/samples/{file}": the last three parts of an image path (either slash), the
    key by which GenEval's results rows name an image whatever folder they were run from."""
    parts = PureWindowsPath(path).parts if "\\" in path else PurePosixPath(path).parts
    return "/".join(parts[-3:])


@register
class SelfBench(Task):
    """Self-Bench (Jeong et al., 2025): image->text on a text-to-image model's own generations for
    the GenEval prompts, against hard-negative prompts; on all of them ("full") or on those judged
    correct ("correct").

    Layout (GenEval's generation output, one folder per generator as Jeong et al. keep them)::

        ROOT/{generator}/{index:05d}/metadata.jsonl   one JSON object: that prompt's row of GenEval's
                                           prompts/evaluation_metadata.jsonl: "tag" (single_object,
                                           two_object, counting, colors, position, color_attr),
                                           "include" (a list of {"class", "count", "color"?,
                                           "position"?}), "prompt"
        ROOT/{generator}/{index:05d}/samples/{k}.png  its generations: every file named digits.png
                                           (00000.png as generation/diffusers_generate.py writes
                                           them, 0000.png as GenEval's README shows them; grid.png
                                           is ignored)
        ROOT/{generator}/results.jsonl     GenEval's evaluation/evaluate_images.py output, one row
                                           per image: "filename" (.../{index}/samples/{k}.png),
                                           "correct" (true/false), "tag", "prompt", "reason", ...;
                                           read for the "correct" subset only (also accepted at
                                           ROOT/results/{generator folder name}/results.jsonl, where
                                           Jeong et al.'s agreement.py reads it, or ROOT/results.jsonl)

    {generator} is Jeong et al.'s {cfg}/{model} folder (9.0/stable-diffusion-2-base, ...), or ROOT
    itself when it holds the prompt folders. A metadata row may instead list its own "candidates"
    (a list of prompts that holds "prompt"): a Self-Bench of another generator's own prompts (the
    ShapesWorld lab's `itm-shapes selfbench` writes one); its "tag" is then any name.

    Candidates per tag (Jeong et al.'s "photo" domain of zero_shot_prompts.json, built by its rule,
    filter_prompts/prompts/zero_prompts.py, over GenEval's 80 classes): single_object, the 80
    "a photo of a {class}"; colors, the 10 colours of the class; counting, "one" to "four" of it;
    position, the 4 relations of include[1] to include[0]; color_attr, the 100 colour pairs of
    the two classes; two_object, Jeong et al.'s two_object_subset.json (two_object_subset.py, the
    subset their geneval_two task reads): in the order of all "a photo of a {A} and a {B}", the
    prompt, the first 50 that keep the first class (and do not contain the second's name) and the
    first 50 that keep the second. The label is the prompt's index among them.

    Example (one per image, id "{index folder}/{file stem}", in folder then sample order): images =
    (the generation,), texts = the candidates, label = the prompt's index, meta {"tag"}.

    Options:
        generator: the generator folder under ROOT, or Jeong et al.'s name for it (1.5, 2.0, 3-m,
            flux: 9.0/stable-diffusion-v1-5, ...); default ROOT itself when it holds prompt folders,
            else its one generator folder.
        subset: "full" (default: every generation) or "correct" (those GenEval's results mark
            correct).
        tags: the tags to load, a list or a comma-separated string (default: all present).
        results: the results file, relative to ROOT (default: the places above).

    Metrics, as Jeong et al. compute them per task (utils.evaluate_retrieval: the prediction is the
    argmax of the image's scores; accuracy = the fraction of images whose prediction is the prompt;
    ties per the protocol, numpy's argmax being "argmax-first"): "accuracy/<tag>"; overall,
    "accuracy/macro" the mean over the tags (GenEval's overall score, summary_scores.py) and
    "accuracy" over all images.

    Where this differs from Jeong et al.'s code: their "correct" subset is human-labelled (their
    filter/SD-{version}-CFG={cfg}.json, images every annotator labelled "original_good"); this
    loader reads GenEval's detector verdicts, in whose format human labels can be given as well.
    They read exactly samples/0000{j}.png for j < 4; this loader reads every sample, as GenEval's
    evaluation does. The candidates are built by their rule rather than read from their 35 MB
    zero_shot_prompts.json.
    """

    name = "selfbench"
    modes = ("i2t",)
    description = "Self-Bench: a model's own GenEval generations vs hard-negative prompts, full or correct subset"
    option_names = ("generator", "subset", "tags", "results")

    def __init__(self, root, skip_missing: bool = False, **options: Any) -> None:
        super().__init__(root, skip_missing, **options)
        self.subset = options.get("subset", "full")
        if self.subset not in SUBSETS:
            raise ValueError(f"{self.name}: option subset must be one of {', '.join(SUBSETS)}, got {self.subset!r}")
        chosen = options.get("tags")
        names = [t.strip() for t in chosen.split(",")] if isinstance(chosen, str) else chosen
        if names is not None and (not isinstance(names, (list, tuple)) or not names
                                  or not all(isinstance(t, str) and t for t in names)):
            raise ValueError(f"{self.name}: option tags must be a non-empty list of tag names, got {chosen!r}")
        self.tags = tuple(names) if names is not None else None
        self.generator = self._generator(options.get("generator"))

    def _generator(self, value: Any) -> str:
        """The generator folder relative to the root: the option's (a folder inside the root), else
        the root itself or its one folder of prompt folders (one or two levels down)."""
        if value is not None:
            if not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{self.name}: option generator must be a folder, got {value!r}")
            relative = GENERATORS.get(str(value), value)
            folder = self.real_path(relative)
            if folder is None or not folder.is_dir():
                raise ValueError(f"{self.name}: option generator {str(value)!r} is not a folder inside {self.root}")
            return str(folder.relative_to(self.root))
        if _holds_prompts(self.root):
            return "."
        found = sorted(str(d.relative_to(self.root)) for d in [*self.root.glob("*"), *self.root.glob("*/*")]
                       if d.is_dir() and _holds_prompts(d))
        if len(found) != 1:
            what = f"several: {', '.join(found)}" if found else "none"
            raise FileNotFoundError(f"{self.name}: expected one generator folder of GenEval prompt folders "
                                    f"({{index:05d}}/metadata.jsonl) in {self.root}, found {what}; choose one with "
                                    "--task-option generator=FOLDER (layout: docs/evaluation.md)")
        return found[0]

    def _verdicts(self) -> dict[str, bool]:
        """{sample_key: correct} from GenEval's results file."""
        given = self.options.get("results")
        if given is not None and (not isinstance(given, str) or self.real_path(given) is None):
            raise ValueError(f"{self.name}: option results must be a file path inside {self.root}, got {given!r}")
        name = Path(self.root / self.generator).resolve().name
        places = [given] if given is not None else [f"{self.generator}/results.jsonl",
                                                    f"results/{name}/results.jsonl", "results.jsonl"]
        relative = next((p for p in places if (self.root / p).is_file()), places[0])
        verdicts = {}
        for where, row in self.read_jsonl(relative):
            require(row, ("filename", "correct"), where, self.name)
            filename = check_string(row["filename"], "filename", where, self.name)
            if not isinstance(row["correct"], bool):
                raise wrong_field(row["correct"], "correct", "true or false", where, self.name)
            verdicts[sample_key(filename)] = row["correct"]
        return verdicts

    def _candidates(self, row: dict, where: str) -> tuple[str, list[str]]:
        """(tag, candidate prompts) of a metadata row, checked."""
        require(row, ("tag", "prompt"), where, self.name)
        tag = check_string(row["tag"], "tag", where, self.name)
        prompt = check_string(row["prompt"], "prompt", where, self.name)
        if "candidates" in row:
            candidates = check_strings(row["candidates"], "candidates", where, self.name)
        else:
            if tag not in TAGS:
                raise wrong_field(tag, "tag", f"one of {', '.join(TAGS)} (or the row must list its candidates)",
                                  where, self.name)
            require(row, ("include",), where, self.name)
            needed = 1 if tag in ("single_object", "colors", "counting") else 2
            include = check_list(row["include"], "include", where, self.name, of="objects")
            if len(include) < needed:
                raise wrong_field(row["include"], "include", f"a list of at least {needed} objects", where, self.name)
            classes = []
            for i, item in enumerate(include[:needed]):
                require(item, ("class",), f"{where} include[{i}]", self.name)
                classes.append(check_string(item["class"], "class", f"{where} include[{i}]", self.name))
            candidates = geneval_candidates(tag, classes, prompt)
        if prompt not in candidates:
            raise malformed(where, f"prompt {prompt!r} is not among its candidate prompts", self.name)
        return tag, candidates

    def load_examples(self) -> Iterable[Example]:
        folder = self.root / self.generator
        rows = []
        for prompt_folder in sorted(d for d in folder.iterdir() if d.is_dir() and PROMPT_FOLDER.fullmatch(d.name)):
            relative = f"{self.generator}/{prompt_folder.name}"
            data = self.read_json(f"{relative}/metadata.jsonl")
            where = f"{prompt_folder.name}/metadata.jsonl"
            tag, candidates = self._candidates(data, where)
            if self.tags is None or tag in self.tags:
                rows.append((where, (where, relative, tag, candidates, candidates.index(data["prompt"]))))
        present = {item[2] for _, item in rows}
        absent = [t for t in self.tags or () if t not in present]
        if absent:
            raise ValueError(f"{self.name}: no prompt of tag(s) {', '.join(absent)} in {folder}")
        examples = [ex for chunk in self.examples_from(rows, self._build) for ex in chunk]
        if self.subset == "correct":
            verdicts = self._verdicts()
            keys = {ex.id: "{}/samples/{}.png".format(*ex.id.split("/")) for ex in examples}
            missing = [key for key in keys.values() if key not in verdicts]
            if missing:
                raise DataError(f"{self.name}: the results file has no row for {len(missing)} image(s), e.g. "
                                f"{missing[0]} (results of another run?)")
            examples = [ex for ex in examples if verdicts[keys[ex.id]]]
        return examples

    def _build(self, item: tuple[str, str, str, list[str], int]) -> list[Example]:
        """The examples of one prompt folder: one per sample, in sample order."""
        where, relative, tag, candidates, label = item
        samples = self.root / relative / "samples"
        names = sorted((f.name for f in samples.iterdir() if SAMPLE_FILE.fullmatch(f.name)),
                       key=lambda n: int(SAMPLE_FILE.fullmatch(n).group(1))) if samples.is_dir() else []
        if not names:
            raise MissingData(f"{self.name}: {where}: no generated image in {samples} (samples/{{k}}.png)")
        prompt_id = PurePosixPath(relative).name
        return [Example(id=f"{prompt_id}/{Path(n).stem}", images=(self.path(f"{relative}/samples/{n}", where),),
                        texts=tuple(candidates), label=label, meta={"tag": tag}) for n in names]

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        return accuracy_by_group(self.correct(examples, scores), [ex.meta["tag"] for ex in examples])


def _holds_prompts(folder: Path) -> bool:
    """Whether `folder` holds GenEval prompt folders ({index}/metadata.jsonl)."""
    return any(d.is_dir() and PROMPT_FOLDER.fullmatch(d.name) and (d / "metadata.jsonl").is_file()
               for d in folder.iterdir())
