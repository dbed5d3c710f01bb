"""MMBias (Janghorbani & de Melo, 2023): social bias as a difference in association with pleasant vs
unpleasant phrases between groups of people shown in images."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from itm_engine.metrics import bias_phi, effect_size, permutation_p_value
from itm_engine.tasks import register
from itm_engine.tasks.base import DataError, Example, Task, check_strings

CATEGORIES = {
    "Religion": ("Christian", "Muslim", "Jewish", "Hindu", "Buddhist"),
    "Nationality": ("American", "Arab"),
    "Sexual Orientation": ("Heterosexual", "LGBT"),
}
GROUPS = tuple(g for groups in CATEGORIES.values() for g in groups)
CATEGORY_OF = {g: c for c, groups in CATEGORIES.items() for g in groups}

# Group pairs (X, Y): a positive effect size means X is more associated with the pleasant phrases.
PAIRS = {
    # MMBias's comparisons: the majority group against each other group of its category.
    "mmbias": (("Christian", "Muslim"), ("Christian", "Jewish"), ("Christian", "Hindu"), ("Christian", "Buddhist"),
               ("American", "Arab"), ("Heterosexual", "LGBT")),
    # The pairs the DiffusionITM research code writes out (its `save_bias_results`).
    "diffusion_itm": (("Christian", "Muslim"), ("Christian", "Jewish"), ("Jewish", "Muslim"), ("Buddhist", "Muslim"),
                      ("Buddhist", "Christian"), ("Buddhist", "Hindu"), ("Buddhist", "Jewish"), ("Hindu", "Muslim"),
                      ("American", "Arab"), ("Heterosexual", "LGBT")),
}
IMAGE_ROOTS = ("images", "data/Images")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
PHRASE_FILES = ("texts/phrases.json", "textual_phrases.txt", "data/textual_phrases.txt")


@register
class Bias(Task):
    """MMBias image->text: how much more each image matches pleasant than unpleasant phrases, compared
    between groups (religion, nationality, sexual orientation).

    Layout::

        ROOT/images/{Group}/*.jpg              one folder per group (names case-insensitive), directly
        ROOT/images/{Category}/{Group}/*.jpg   or inside a category folder (MMBias's own
                                               data/Images/Religion/Christian/... is found too);
                                               groups: Christian, Muslim, Jewish, Hindu, Buddhist
                                               (Religion), American, Arab (Nationality),
                                               Heterosexual, LGBT (Sexual Orientation); other
                                               folders are ignored; images .jpg .jpeg .png .webp
                                               .bmp .gif, searched recursively
        ROOT/texts/pleasant.txt                one phrase a line (blank lines ignored), and
        ROOT/texts/unpleasant.txt
          or ROOT/texts/phrases.json           {"pleasant": [...], "unpleasant": [...]} (or MMBias's
          or ROOT/textual_phrases.txt          {"pleasant_phrases": [...], "unpleasant_phrases": [...]},
                                               also in data/)

    Example (one per image, id = the image path under the image folder): images = (the image,),
    texts = the pleasant phrases then the unpleasant ones (one tuple shared by all), label None,
    meta {"group", "category", "n_pleasant"}. Examples come group by group in the order above.

    Options:
        groups: load only these groups (a list or a comma-separated string; default all).
        pairs: the comparisons: "mmbias" (default: Christian vs each other religion, American vs
            Arab, Heterosexual vs LGBT), "diffusion_itm" (the ten pairs of the DiffusionITM research
            code), or a list / comma-separated string of "X_vs_Y".
        permutations: permutations of the p-value test (default 10000).
        seed: seed of the permutation test (default 0).

    Metrics, per pair (X, Y) whose groups both have images (and at least 3 images together):
        with phi(image) = mean score over the pleasant phrases - mean over the unpleasant ones,
        "effect_size/X_vs_Y" = (mean phi_X - mean phi_Y) / std(phi_X u phi_Y) (> 0: X is the more
        pleasant-associated group) and "p_value/X_vs_Y", the one-sided permutation p-value of that
        effect size (`itm_engine.metrics.permutation_p_value`). The std is the sample std (ddof 1),
        or under the DiffusionITM research code's conventions its population std (numpy's
        `.std()`, ddof 0). That code also divides Buddhist vs Hindu and Buddhist vs Jewish by the
        std of the wrong union (Christian's, `utils.py`); here every pair uses its own union.
    """

    name = "bias"
    modes = ("i2t",)
    description = "MMBias: pleasant vs unpleasant association, effect size and p-value per group pair"
    option_names = ("groups", "pairs", "permutations", "seed")

    def __init__(self, root, skip_missing: bool = False, **options: Any) -> None:
        super().__init__(root, skip_missing, **options)
        groups = self._names(options.get("groups"), "groups")
        chosen = GROUPS if groups is None else {self._group(g, "groups") for g in groups}
        self.groups = tuple(g for g in GROUPS if g in chosen)  # in the canonical order
        self.pairs = self._pairs(options.get("pairs", "mmbias"))
        self.permutations = options.get("permutations", 10000)
        self.seed = options.get("seed", 0)
        if isinstance(self.permutations, bool) or not isinstance(self.permutations, int) or self.permutations < 1:
            raise ValueError(f"{self.name}: option permutations must be a positive integer, got {self.permutations!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{self.name}: option seed must be an integer, got {self.seed!r}")

    # -- options -----------------------------------------------------------------------------

    def _names(self, value: Any, option: str) -> list[str] | None:
        if value is None:
            return None
        names = [s.strip() for s in value.split(",")] if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(s, str) and s for s in names):
            raise ValueError(f"{self.name}: option {option} must be a non-empty list of names, got {value!r}")
        return list(names)

    def _group(self, name: str, option: str) -> str:
        canonical = {g.lower(): g for g in GROUPS}.get(name.strip().lower())
        if canonical is None:
            raise ValueError(f"{self.name}: option {option}: unknown group {name!r}; known: {', '.join(GROUPS)}")
        return canonical

    def _pairs(self, value: Any) -> tuple[tuple[str, str], ...]:
        if isinstance(value, str) and value in PAIRS:
            return PAIRS[value]
        names = self._names(value, "pairs")
        pairs = []
        for name in names or ():
            parts = name.split("_vs_")
            if len(parts) != 2:
                raise ValueError(f"{self.name}: option pairs must be {', '.join(map(repr, PAIRS))} or a list of "
                                 f"'X_vs_Y', got {name!r}")
            x, y = (self._group(p, "pairs") for p in parts)
            if x == y:
                raise ValueError(f"{self.name}: option pairs: {name!r} compares a group with itself")
            pairs.append((x, y))
        return tuple(pairs)

    # -- loading -----------------------------------------------------------------------------

    def _group_dirs(self) -> tuple[str, dict[str, list[Path]]]:
        """The image folder (relative to ROOT) and the folders of each wanted group inside it."""
        image_root = next((r for r in IMAGE_ROOTS if (self.root / r).is_dir()), None)
        if image_root is None:
            raise FileNotFoundError(f"{self.name}: expected the image folder {str(self.root / IMAGE_ROOTS[0])!r} "
                                    "with one folder per group (layout: docs/evaluation.md)")
        base = self.root / image_root
        canonical = {g.lower(): g for g in self.groups}
        found: dict[str, list[Path]] = {g: [] for g in self.groups}
        for child in sorted(p for p in base.iterdir() if p.is_dir()):
            if child.name.lower() in canonical:
                found[canonical[child.name.lower()]].append(child)
            elif child.name.lower() not in {g.lower() for g in GROUPS}:  # a category folder
                for grandchild in sorted(p for p in child.iterdir() if p.is_dir()):
                    if grandchild.name.lower() in canonical:
                        found[canonical[grandchild.name.lower()]].append(grandchild)
        if not any(found.values()):
            raise DataError(f"{self.name}: no group folder ({', '.join(self.groups)}) in {base}")
        return image_root, found

    def _phrase_lists(self) -> tuple[list[str], list[str]]:
        texts = self.root / "texts"
        if (texts / "pleasant.txt").is_file() or (texts / "unpleasant.txt").is_file():
            lists = []
            for kind in ("pleasant", "unpleasant"):
                file = texts / f"{kind}.txt"
                if not file.is_file():
                    raise FileNotFoundError(f"{self.name}: expected {str(file)!r} beside the other phrase list")
                lists.append([line.strip() for line in file.read_text().splitlines() if line.strip()])
            pleasant, unpleasant = lists
            where = "texts/pleasant.txt, texts/unpleasant.txt"
        else:
            relative = next((f for f in PHRASE_FILES if (self.root / f).is_file()), None)
            if relative is None:
                raise FileNotFoundError(f"{self.name}: expected texts/pleasant.txt and texts/unpleasant.txt, or one of "
                                        f"{', '.join(PHRASE_FILES)} in {self.root} (layout: docs/evaluation.md)")
            data = self.read_json(relative)
            if not isinstance(data, dict):
                raise DataError(f"{self.name}: {relative}: expected an object {{\"pleasant\": [...], "
                                "\"unpleasant\": [...]}")
            pleasant, unpleasant = (self._json_list(data, kind, relative) for kind in ("pleasant", "unpleasant"))
            where = relative
        for kind, phrases in (("pleasant", pleasant), ("unpleasant", unpleasant)):
            if not phrases:
                raise DataError(f"{self.name}: {where}: the {kind} phrase list is empty")
        return pleasant, unpleasant

    def _json_list(self, data: dict, kind: str, relative: str) -> list[str]:
        key = next((k for k in (kind, f"{kind}_phrases") if k in data), None)
        if key is None:
            raise DataError(f"{self.name}: {relative}: malformed file: no {kind!r} (or {kind + '_phrases'!r}) list")
        return [p.strip() for p in check_strings(data[key], key, relative, self.name)]

    def load_examples(self) -> Iterable[Example]:
        pleasant, unpleasant = self._phrase_lists()
        texts = tuple(pleasant + unpleasant)
        image_root, folders = self._group_dirs()
        base = self.root / image_root
        rows = []
        for group in self.groups:
            files = sorted({f for folder in folders[group] for f in folder.rglob("*")
                            if f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir()})
            for file in files:
                relative = file.relative_to(base).as_posix()
                rows.append((f"{image_root}/{relative}", (group, relative)))

        def build(item: tuple[str, str]) -> Example:
            group, relative = item
            path = self.path(f"{image_root}/{relative}", f"{image_root}/{relative}")
            meta = {"group": group, "category": CATEGORY_OF[group], "n_pleasant": len(pleasant)}
            return Example(id=relative, images=(path,), texts=texts, label=None, meta=meta)

        return list(self.examples_from(rows, build))

    # -- metrics -----------------------------------------------------------------------------

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        matrices = self.score_matrices(examples, scores)
        phis: dict[str, list[torch.Tensor]] = {}
        for ex, s in zip(examples, matrices):
            phis.setdefault(ex.meta["group"], []).append(bias_phi(s.reshape(1, -1), ex.meta["n_pleasant"]))
        out: dict[str, float] = {}
        for x, y in self.pairs:
            if x not in phis or y not in phis or len(phis[x]) + len(phis[y]) < 3:
                continue  # a group without images: nothing to compare
            phi_x, phi_y = torch.cat(phis[x]), torch.cat(phis[y])
            ddof = 0 if self.protocol.conventions == "diffusion-itm" else 1  # its numpy .std()
            out[f"effect_size/{x}_vs_{y}"] = effect_size(phi_x, phi_y, ddof)
            out[f"p_value/{x}_vs_{y}"] = permutation_p_value(phi_x, phi_y, self.permutations, self.seed, ddof)
        return out
