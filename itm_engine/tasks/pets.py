"""Oxford-IIIT Pet: zero-shot classification of 37 cat and dog breeds."""
from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import torch

from itm_engine.metrics import macro_accuracy
from itm_engine.tasks import register
from itm_engine.tasks.base import DataError, Example, Task, check_int, malformed

PROMPT = "a photo of a {breed}, a type of pet."
_IMAGE_NAME = re.compile(r"^(?P<breed>.+)_(?P<n>\d+)$")  # Breed_Name_123 (cats capitalised, dogs lower case)
SPLITS = ("all", "test", "trainval")
DIFFUSION_ITM_CLASSES = (  # data/pets/classes.txt of McGill-NLP/diffusion-itm, in its order
    "american pit bull terrier", "havanese", "chihuahua", "keeshond", "yorkshire terrier", "boxer",
    "english cocker spaniel", "scottish terrier", "shiba inu", "siamese", "abyssinian", "pomeranian", "samoyed",
    "bengal", "japanese chin", "staffordshire bull terrier", "wheaten terrier", "bombay", "persian",
    "miniature pinscher", "great pyrenees", "ragdoll", "sphynx", "beagle", "english setter", "german shorthaired",
    "american bulldog", "birman", "british shorthair", "saint bernard", "pug", "russian blue", "maine coon",
    "egyptian mau", "basset hound", "newfoundland", "leonberger",
)
# prompts/pets_prompts.csv of diffusion-classifier/diffusion-classifier: (class name, prompt), class index order
DIFFUSION_CLASSIFIER_PROMPTS = (
    ("abyssinian", "a photo of a Abyssinian cat, a type of pet."),
    ("american bulldog", "a photo of a American Bulldog, a type of pet."),
    ("american pit bull terrier", "a photo of a American Pit Bull Terrier dog, a type of pet."),
    ("basset hound", "a photo of a Basset Hound dog, a type of pet."),
    ("beagle", "a photo of a Beagle dog, a type of pet."),
    ("bengal", "a photo of a Bengal cat, a type of pet."),
    ("birman", "a photo of a Birman cat, a type of pet."),
    ("bombay", "a photo of a Bombay cat, a type of pet."),
    ("boxer", "a photo of a Boxer dog, a type of pet."),
    ("british shorthair", "a photo of a British Shorthair cat, a type of pet."),
    ("chihuahua", "a photo of a Chihuahua dog, a type of pet."),
    ("egyptian mau", "a photo of a Egyptian Mau cat, a type of pet."),
    ("english cocker spaniel", "a photo of a English Cocker Spaniel dog, a type of pet."),
    ("english setter", "a photo of a English Setter dog, a type of pet."),
    ("german shorthaired", "a photo of a German Shorthaired dog, a type of pet."),
    ("great pyrenees", "a photo of a Great Pyrenees dog, a type of pet."),
    ("havanese", "a photo of a Havanese dog, a type of pet."),
    ("japanese chin", "a photo of a Japanese Chin dog, a type of pet."),
    ("keeshond", "a photo of a Keeshond dog, a type of pet."),
    ("leonberger", "a photo of a Leonberger dog, a type of pet."),
    ("maine coon", "a photo of a Maine Coon cat, a type of pet."),
    ("miniature pinscher", "a photo of a Miniature Pinscher dog, a type of pet."),
    ("newfoundland", "a photo of a Newfoundland dog, a type of pet."),
    ("persian", "a photo of a Persian cat, a type of pet."),
    ("pomeranian", "a photo of a Pomeranian dog, a type of pet."),
    ("pug", "a photo of a Pug dog, a type of pet."),
    ("ragdoll", "a photo of a Ragdoll cat, a type of pet."),
    ("russian blue", "a photo of a Russian Blue cat, a type of pet."),
    ("saint bernard", "a photo of a Saint Bernard dog, a type of pet."),
    ("samoyed", "a photo of a Samoyed dog, a type of pet."),
    ("scottish terrier", "a photo of a Scottish Terrier dog, a type of pet."),
    ("shiba inu", "a photo of a Shiba Inu dog, a type of pet."),
    ("siamese", "a photo of a Siamese cat, a type of pet."),
    ("sphynx", "a photo of a Sphynx cat, a type of pet."),
    ("staffordshire bull terrier", "a photo of a Staffordshire Bull Terrier dog, a type of pet."),
    ("wheaten terrier", "a photo of a Wheaten Terrier dog, a type of pet."),
    ("yorkshire terrier", "a photo of a Yorkshire Terrier dog, a type of pet."),
)


def breed_text(breed: str) -> str:
    """The breed as it goes into the prompt: "american_bulldog" / "British_Shorthair" -> "british shorthair"."""
    return breed.replace("_", " ").lower()


@register
class Pets(Task):
    """Oxford-IIIT Pet (Parkhi et al., 2012), image->text over one prompt per breed.

    Layout (the dataset's own)::

        ROOT/images/{Breed_Name}_{n}.jpg    e.g. Abyssinian_1.jpg, american_bulldog_10.jpg (cats
                                            capitalised, dogs lower case; other files are ignored)
        ROOT/annotations/test.txt           only for option split: "Abyssinian_201 1 1 1" a line
        ROOT/annotations/trainval.txt       (image name, class id 1-37, species, breed id)

    Classes and prompts follow the protocol's `conventions`:
    - "engine": split "all" -> the breeds among the images, sorted case-insensitively (the
      dataset's class-id order); split "test"/"trainval" -> the breeds of the split file, by class
      id; texts "a photo of a {breed}, a type of pet." with the breed's underscores as spaces, lower
      case, in class order;
    - "diffusion-itm": the research code's 37 classes in its `classes.txt` order
      (`DIFFUSION_ITM_CLASSES`), texts "a photo of a {class}" (its prompt, lower case);
    - "diffusion-classifier": its 37 prompts of `prompts/pets_prompts.csv`
      (`DIFFUSION_CLASSIFIER_PROMPTS`, e.g. "a photo of a Abyssinian cat, a type of pet."), and the
      test split by default (torchvision's `OxfordIIITPet(split="test")`).
    One tuple of texts is shared by every example. Example per image (id = the image name without
    extension): images = (the image,), texts = every class prompt, label = the class index.
    Examples come in class order, then by image number ("all"), or in file order (split files).

    Options:
        split: "all" (default, but "test" under Diffusion Classifier's conventions: every image in
            images/), "test" or "trainval" (the official 3,669 / 3,680-image splits).

    Metrics: "accuracy" (top-1, the research code's number; a tie with the right breed counts as
    wrong) and "accuracy/per_class_mean" (mean of the per-breed accuracies, the number CLIP
    reports for Pets).
    """

    name = "pets"
    modes = ("i2t",)
    description = "Oxford-IIIT Pet: 37-way zero-shot breed classification, accuracy"
    option_names = ("split",)

    def __init__(self, root, skip_missing: bool = False, **options: Any) -> None:
        super().__init__(root, skip_missing, **options)
        self.split = options.get("split", "test" if self.protocol.conventions == "diffusion-classifier" else "all")
        if self.split not in SPLITS:
            raise ValueError(f"{self.name}: option split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        self.classes: list[str] = []  # breed names as in the file names, in class order (after loading)

    def _all_images(self) -> list[tuple[str, str, str]]:
        """(image file, image name, breed) for every .jpg in images/, in class order then image number."""
        folder = self.root / "images"
        if not folder.is_dir():
            raise FileNotFoundError(f"{self.name}: expected the image folder {str(folder)!r} (layout: "
                                    "docs/evaluation.md)")
        rows = []
        for file in folder.iterdir():
            if file.suffix.lower() != ".jpg" or file.is_dir():
                continue
            match = _IMAGE_NAME.match(file.stem)
            if not match:
                raise DataError(f"{self.name}: images/{file.name}: file name is not {{Breed_Name}}_{{n}}.jpg")
            rows.append((f"images/{file.name}", file.stem, match["breed"], int(match["n"])))
        if not rows:
            raise DataError(f"{self.name}: no {{Breed_Name}}_{{n}}.jpg images in {folder}")
        rows.sort(key=lambda r: (r[2].lower(), r[3], r[1]))
        breeds: dict[str, str] = {}
        for row in rows:
            breeds.setdefault(row[2].lower(), row[2])
        self.classes = list(breeds.values())
        return [(file, stem, breed) for file, stem, breed, _ in rows]

    def _split_images(self) -> list[tuple[str, str, str]]:
        """(where, image name, breed) for each line of annotations/{split}.txt, in file order; the
        image is images/{image name}.jpg."""
        relative = f"annotations/{self.split}.txt"
        file = self.root / relative
        if not file.is_file():
            raise FileNotFoundError(f"{self.name}: expected {str(file)!r} for split {self.split!r} (layout: "
                                    "docs/evaluation.md)")
        rows, class_of = [], {}
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip() or line.startswith("#"):
                continue
            where = f"{relative}:{number}"
            fields = line.split()
            match = _IMAGE_NAME.match(fields[0])
            if len(fields) < 2 or not match:
                raise malformed(where, f"{line.strip()!r}: expected 'Breed_Name_n CLASS-ID ...'", self.name)
            breed, class_id = match["breed"], check_int(fields[1], "class id", where, self.name, low=1)
            if class_of.setdefault(class_id, breed).lower() != breed.lower():
                raise DataError(f"{self.name}: {where}: class id {class_id} is {class_of[class_id]!r} elsewhere, "
                                f"here {breed!r}")
            rows.append((where, fields[0], class_of[class_id]))
        if not rows:
            raise DataError(f"{self.name}: {file}: no images listed")
        breeds = [class_of[c] for c in sorted(class_of)]
        if len({b.lower() for b in breeds}) != len(breeds):
            raise DataError(f"{self.name}: {file}: a breed appears under two class ids")
        self.classes = breeds
        return rows

    def load_examples(self) -> Iterable[Example]:
        rows = self._all_images() if self.split == "all" else self._split_images()
        names, texts = self._class_prompts()
        index = {name: i for i, name in enumerate(names)}

        def build(item: tuple[str, str, str]) -> Example:
            where, stem, breed = item
            path = self.path(where if self.split == "all" else f"images/{stem}.jpg", where)
            if breed_text(breed) not in index:
                raise DataError(f"{self.name}: {where}: breed {breed!r} is not one of the "
                                f"{self.protocol.conventions} conventions' {len(names)} classes")
            return Example(id=stem, images=(path,), texts=texts, label=index[breed_text(breed)],
                           meta={"breed": breed_text(breed)})

        return list(self.examples_from(((r[0], r) for r in rows), build))

    def _class_prompts(self) -> tuple[list[str], tuple[str, ...]]:
        """(class names as `breed_text` gives them, in class order; their prompts), per the
        protocol's conventions (class docstring)."""
        conventions = self.protocol.conventions
        if conventions == "diffusion-itm":
            return list(DIFFUSION_ITM_CLASSES), tuple("a photo of a " + c for c in DIFFUSION_ITM_CLASSES)
        if conventions == "diffusion-classifier":
            return [n for n, _ in DIFFUSION_CLASSIFIER_PROMPTS], tuple(p for _, p in DIFFUSION_CLASSIFIER_PROMPTS)
        names = [breed_text(b) for b in self.classes]
        return names, tuple(PROMPT.format(breed=n) for n in names)

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        correct = self.correct(examples, scores)
        return {"accuracy": sum(correct) / len(correct),
                "accuracy/per_class_mean": macro_accuracy(correct, [ex.meta["breed"] for ex in examples])}
