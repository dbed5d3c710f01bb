"""Training data for HardNeg-DiffusionITM: image-caption pairs, hard negatives, negative sampling.

    pairs = read_pairs("coco/annotations/captions_train2014.json")      # or .jsonl / .csv / NegCLIP .tsv
    neighbours = clip_nearest_images(pairs, clip, k=3)                   # optional: CLIP hard-negative images
    sampler = NegativeSampler(pairs, kind="mixed", neg_prob=1.0, seed=0, neighbours=neighbours)
    neg = sampler.negative(index, epoch)    # Negative(kind, image, caption), or None

The training loop denoises `pairs[index].image` under `pairs[index].caption` (L_pos) and
`neg.image` under `neg.caption` (L_neg) with the same latent noise and timestep.

Hard-negative captions are made here, as in ARO / NegCLIP but without a parser or tagger download:
words are tagged with ARO's built-in lexicon (`itm_engine.tasks.aro.word_class`), relations are
found in a built-in list of spatial and action relation words, and the four ARO word-order
shuffles come from `itm_engine.tasks.aro.perturbations`. Everything is a pure function of
(caption, seed).
"""
from __future__ import annotations

import ast
import csv
import json
import operator
import os
import random
import re
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from itm_engine import kernels
from itm_engine.tasks.aro import PERTURBATIONS, perturbations, word_class
from itm_engine.tasks.base import DataError, require

if TYPE_CHECKING:
    from itm_engine.clip import ClipModel


@dataclass(frozen=True)
class TrainPair:
    """One training example.

    Attributes:
        image: absolute image path.
        caption: the matching caption.
        neg_captions: precomputed hard-negative captions (NegCLIP TSV `neg_caption`), may be empty.
        neg_images: row indices (into the same list of pairs) of hard-negative images.
    """

    image: str
    caption: str
    neg_captions: tuple[str, ...] = ()
    neg_images: tuple[int, ...] = ()


@dataclass(frozen=True)
class Negative:
    """The negative of one example for the HardNeg loss.

    Attributes:
        kind: "hard-text", "hard-image" or "random".
        image: the image to denoise under the negative: the positive's own image for text
            negatives ("hard-text", "random"), the other image for "hard-image".
        caption: the caption of the negative term (the positive's caption for "hard-image").
    """

    kind: str
    image: str
    caption: str


# -- reading pairs --------------------------------------------------------------------------------

FORMATS = {
    ".json": "COCO captions JSON",
    ".jsonl": "JSON lines of {'image', 'caption'}",
    ".csv": "CSV with an image,caption header",
    ".tsv": "NegCLIP TSV (title, filepath, neg_caption, neg_image)",
}


@dataclass
class _Row:
    where: str           # "file row i" for messages
    image: str           # as the file names it (relative to the image root, or absolute)
    caption: str
    neg_captions: tuple[str, ...] = ()
    neg_images: tuple[int, ...] = ()


def read_pairs(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
               limit: int | None = None) -> list[TrainPair]:
    """Read image-caption pairs, dispatching on the file's suffix.

    Formats:
        .json   COCO captions (`captions_train2014.json`): {"images": [{"id", "file_name"}],
                "annotations": [{"image_id", "caption"}]}; one pair per annotation, in file
                order. Images under `image_root`, default: the JSON's folder / "train2014" (or,
                for a JSON inside an "annotations" folder without a train2014 beside it, the
                folder above / "train2014", COCO's usual layout).
        .jsonl  one {"image": path, "caption": text} object per line (blank lines skipped).
        .csv    a header naming the columns `image` and `caption` (others are ignored).
        .tsv    NegCLIP's file: tab-separated with a header naming `title` (the caption),
                `filepath` (the image) and optionally `neg_caption` (a Python-literal list of
                strings) and `neg_image` (a Python-literal list of row indices into this file,
                0 = the first row after the header); other columns (e.g. a pandas index) are
                ignored. Indices equal to the row itself are dropped.
        For .jsonl/.csv/.tsv, image paths are relative to `image_root` (default: the file's
        folder); absolute paths are used as they are.

    Captions are stripped of surrounding whitespace. With `limit`, only the first `limit` pairs
    are read (and NegCLIP `neg_image` indices of rows past the limit are dropped).

    Returns:
        the pairs, in file order, with absolute image paths.
    Raises:
        FileNotFoundError: `path` is not a file, or `image_root` is not a folder.
        ValueError: unknown suffix, bad `limit`.
        DataError: a malformed row (the message names the file and row), no pairs, or image
            files that do not exist (each distinct file is checked once; the message names them).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"training data: no such file: {str(file)!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    suffix = file.suffix.lower()
    if suffix not in FORMATS:
        known = "; ".join(f"{s}: {name}" for s, name in FORMATS.items())
        raise ValueError(f"{file}: unknown training data format {suffix!r}; known: {known}")
    if image_root is not None:
        root = Path(image_root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image_root {str(root)!r} is not a folder")
    else:
        root = _coco_image_root(file) if suffix == ".json" else file.parent
    readers: dict[str, Callable[[Path, int | None], list[_Row]]] = {
        ".json": _read_coco, ".jsonl": _read_jsonl, ".csv": _read_csv, ".tsv": _read_negclip}
    rows = readers[suffix](file, limit)
    if not rows:
        raise DataError(f"{file}: no image-caption pairs")
    images = [os.path.abspath(os.path.join(root, row.image)) for row in rows]
    _check_images_exist(file, root, images, rows)
    return [TrainPair(image, row.caption, row.neg_captions, row.neg_images) for image, row in zip(images, rows)]


def _coco_image_root(file: Path) -> Path:
    folder = file.parent.absolute()
    beside = folder / "train2014"
    if not beside.is_dir() and folder.name == "annotations" and (folder.parent / "train2014").is_dir():
        return folder.parent / "train2014"
    return beside


def _read_coco(file: Path, limit: int | None) -> list[_Row]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{file}: not valid JSON ({err})") from None
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        raise DataError(f"{file}: expected a COCO captions object with 'images' and 'annotations' lists")
    names: dict[Any, str] = {}
    for i, row in enumerate(data["images"]):
        where = f"{file} images[{i}]"
        require(row, ("id", "file_name"), where)
        if row["id"] in names:
            raise DataError(f"{where}: malformed row: image id {row['id']!r} is listed twice")
        names[row["id"]] = _image_name(row["file_name"], "file_name", where)
    rows = []
    for i, row in enumerate(data["annotations"][:limit]):
        where = f"{file} annotations[{i}]"
        require(row, ("image_id", "caption"), where)
        if row["image_id"] not in names:
            raise DataError(f"{where}: malformed row: image_id {row['image_id']!r} is not in 'images'")
        rows.append(_Row(where, names[row["image_id"]], _caption(row["caption"], "caption", where)))
    return rows


def _read_jsonl(file: Path, limit: int | None) -> list[_Row]:
    rows = []
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if limit is not None and len(rows) == limit:
                break
            if not line.strip():
                continue
            where = f"{file} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed row ({err})") from None
            require(row, ("image", "caption"), where)
            image, caption = _image_name(row["image"], "image", where), _caption(row["caption"], "caption", where)
            rows.append(_Row(where, image, caption))
    return rows


def _read_csv(file: Path, limit: int | None) -> list[_Row]:
    return [_Row(where, _image_name(row["image"], "image", where), _caption(row["caption"], "caption", where))
            for where, _, row in _table_rows(file, ",", ("image", "caption"), limit)]


def _read_negclip(file: Path, limit: int | None) -> list[_Row]:
    rows = []
    for where, index, row in _table_rows(file, "\t", ("title", "filepath"), limit):
        negs = _literal_list(row.get("neg_caption"), "neg_caption", where)
        if any(not isinstance(c, str) or not c.strip() for c in negs):
            raise DataError(f"{where}: malformed row: neg_caption must be a list of non-empty strings")
        indices = _literal_list(row.get("neg_image"), "neg_image", where)
        if any(isinstance(j, bool) or not isinstance(j, int) or j < 0 for j in indices):
            raise DataError(f"{where}: malformed row: neg_image must be a list of row indices (integers >= 0)")
        rows.append(_Row(where, _image_name(row["filepath"], "filepath", where), _caption(row["title"], "title", where),
                         tuple(c.strip() for c in negs), tuple(dict.fromkeys(j for j in indices if j != index))))
    truncated = limit is not None and len(rows) == limit
    for row in rows:
        bad = [j for j in row.neg_images if j >= len(rows)]
        if bad and not truncated:
            raise DataError(f"{row.where}: malformed row: neg_image index {bad[0]} is past the last row "
                            f"({len(rows) - 1})")
        if bad:
            row.neg_images = tuple(j for j in row.neg_images if j < len(rows))
    return rows


def _table_rows(file: Path, delimiter: str, columns: tuple[str, ...],
                limit: int | None) -> Iterator[tuple[str, int, dict]]:
    """(where, data row index, {column: cell}) per row of a delimited file with a header."""
    with file.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None)
        missing = [c for c in columns if header is None or c not in header]
        if missing:
            raise DataError(f"{file}: the header must name the column(s) {', '.join(columns)}; "
                            f"missing {', '.join(missing)} (header: {header!r})")
        for index, cells in enumerate(reader):
            if limit is not None and index == limit:
                break
            where = f"{file} row {index} (line {reader.line_num})"
            if len(cells) != len(header):
                raise DataError(f"{where}: malformed row: {len(cells)} fields, the header has {len(header)}")
            yield where, index, dict(zip(header, cells))


def _literal_list(cell: str | None, column: str, where: str) -> list:
    if cell is None or not cell.strip():
        return []
    try:
        value = ast.literal_eval(cell)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise DataError(f"{where}: malformed row: {column} is not a Python-literal list: {cell[:80]!r}") from None
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: malformed row: {column} must be a list, got {type(value).__name__}")
    return list(value)


def _caption(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: malformed row: {key} must be a non-empty string, got {value!r}")
    return value.strip()


def _image_name(value: Any, key: str, where: str) -> str:
    if (not isinstance(value, str) or not value.strip() or value.endswith(("/", "\\"))
            or Path(value).name in ("", ".", "..")):
        raise DataError(f"{where}: malformed row: {key} must be an image file path, got {value!r}")
    return value.strip()


def _check_images_exist(file: Path, root: Path, images: list[str], rows: list[_Row]) -> None:
    missing: dict[str, str] = {}
    checked: set[str] = set()
    for image, row in zip(images, rows):
        if image not in checked:
            checked.add(image)
            if not os.path.isfile(image):
                missing[image] = row.where
    if missing:
        shown = "; ".join(f"{image!r} ({where})" for image, where in list(missing.items())[:5])
        more = f"; and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(f"{file}: {len(missing)} missing image file(s) (image root {str(root)!r}): {shown}{more}")


# -- hard-negative captions -----------------------------------------------------------------------

# Relation phrases (lower case, as word tuples) and the opposite each one is replaced by, or None
# for relations without one (only their arguments are swapped). Verbs before a preposition
# ("sitting on", "looking at") are not listed: the preposition is the relation and the verb is
# skipped when looking for the subject.
_RELATIONS: dict[tuple[str, ...], tuple[str, ...] | None] = {
    tuple(phrase.split()): (tuple(opposite.split()) if opposite else None)
    for phrase, opposite in (line.split("=") if "=" in line else (line, "")
                             for line in """
on top of=underneath|underneath=on top of|atop=beneath|beneath=above|on=under|under=on|over=under|
above=below|below=above|in front of=behind|behind=in front of|left of=right of|right of=left of|
left=right|right=left|inside of=outside of|outside of=inside of|inside=outside|outside=inside|
in=outside|into=out of|out of=into|near=far from|far from=near|next to=far from|close to=far from|
beside=far from|towards=away from|toward=away from|away from=towards|up=down|down=up|at|with|
against|along|across|around|through|holding|holds|riding|rides|eating|eats|chasing|chases|
carrying|carries|pulling|pulls|pushing|pushes|wearing|wears|feeding|feeds|watching|watches|
biting|bites|kicking|kicks|hitting|hits|throwing|throws|catching|catches|touching|touches|
following|follows|hugging|hugs|petting|pets|using|uses""".replace("\n", "").split("|"))
}
_LONGEST_RELATION = max(len(phrase) for phrase in _RELATIONS)
# Words that may open a noun phrase (besides adjectives and nouns).
_DETERMINERS = frozenset("""a an the this that these those some each every another both his her its their my your our
one two three four five six seven eight nine ten""".split())
_VERBS_SKIPPED = 3  # at most this many words (verbs, auxiliaries) between a subject and its relation
_SENTENCE_END = re.compile(r"[\s.!?]*$")
_AFFIXES = re.compile(r"^(.*?)(\W*)$", re.S)

HARD_NEGATIVE_KINDS = ("swap_nouns", "swap_adjectives", "swap_relation_arguments", "replace_relation",
                       *(name for name, _ in PERTURBATIONS))


def hard_negatives(caption: str, seed: int = 0) -> dict[str, str]:
    """The hard-negative captions of `caption`, by kind, in `HARD_NEGATIVE_KINDS` order.

    Kinds (each draws from `random.Random(f"{seed}|{caption body}|{kind}")`):
        swap_nouns: two different nouns trade places ("a dog chasing a cat" -> "a cat chasing a dog").
        swap_adjectives: two different adjectives trade places ("a red cup on a blue plate" ->
            "a blue cup on a red plate").
        swap_relation_arguments: the noun phrases on either side of a relation word trade places
            ("a small dog on a wooden table" -> "a wooden table on a small dog"; "a man riding a
            horse" -> "a horse riding a man").
        replace_relation: a relation is replaced by its opposite ("a dog on a table" -> "a dog
            under a table"; on/under, above/below, left/right, in front of/behind, inside/outside...).
        shuffle_nouns_and_adj, shuffle_allbut_nouns_and_adj, shuffle_within_trigrams,
        shuffle_trigrams: ARO's word-order shuffles (`itm_engine.tasks.aro.perturbations`).

    Words are whitespace-separated tokens tagged by `itm_engine.tasks.aro.word_class`; swaps move
    the words and leave punctuation attached to a position (a comma after "table" stays there),
    words inside relation phrases ("front" in "in front of") are not swapped as nouns, and the
    sentence's end (a final ".") stays at the end; after a swap, "a"/"an" are made to agree with
    the word that now follows them. A leading capitalised determiner ("A", "The")
    is lower-cased before and the first letter capitalised after.

    Returns:
        kind -> negative, only for kinds whose negative differs from the caption (up to
        whitespace) and from every earlier kind's; may be empty (e.g. one-word captions).
    """
    text = " ".join(caption.split())
    body = _SENTENCE_END.sub("", text)
    end = text[len(body):]
    tokens = body.split()
    if not tokens:
        return {}
    capital = body[0].isupper()
    if capital and _core(tokens[0]).lower() in _DETERMINERS:
        tokens[0] = tokens[0][0].lower() + tokens[0][1:]
    body_key = " ".join(tokens)

    def rng(kind: str) -> random.Random:
        return random.Random(f"{seed}|{body_key}|{kind}")

    relations = _find_relations(tokens)
    in_relation = {i for start, stop in relations for i in range(start, stop)}
    swaps = {
        "swap_nouns": _swap_words(tokens, "noun", in_relation, rng("swap_nouns")),
        "swap_adjectives": _swap_words(tokens, "adj", in_relation, rng("swap_adjectives")),
        "swap_relation_arguments": _swap_arguments(tokens, relations, in_relation, rng("swap_relation_arguments")),
        "replace_relation": _replace_relation(tokens, relations, rng("replace_relation")),
    }
    candidates = {kind: _articles(tokens, words) for kind, words in swaps.items()}
    shuffles = perturbations(body_key, body_key, seed)  # ARO's four, keyed by the caption itself
    candidates |= {name: shuffled.split() for (name, _), shuffled in zip(PERTURBATIONS, shuffles)}
    out: dict[str, str] = {}
    for kind, words in candidates.items():
        if words is None:
            continue
        negative = " ".join(words) + end
        if capital:
            negative = negative[0].upper() + negative[1:]
        if negative != text and negative not in out.values():
            out[kind] = negative
    return out


def hard_negative_captions(caption: str, seed: int) -> list[str]:
    """ARO/NegCLIP-style hard negatives of `caption`: noun swap, adjective swap, relation-argument
    swap, opposite relation, and ARO's four shuffles (see `hard_negatives`), deterministic in
    (caption, seed), each different from the caption and from the others; may be empty."""
    return list(hard_negatives(caption, seed).values())


def _core(token: str) -> str:
    return _AFFIXES.match(token).group(1)


def _affix(token: str) -> str:
    return _AFFIXES.match(token).group(2)


def _articles(original: list[str], tokens: list[str] | None) -> list[str] | None:
    """Make "a"/"an" agree with a word that a swap put after it ("a umbrella" -> "an umbrella"),
    so that a negative is not given away by its grammar."""
    if tokens is None:
        return None
    out = list(tokens)
    for i in range(len(out) - 1):
        article = _core(out[i])
        changed = i + 1 >= len(original) or out[i + 1] != original[i + 1]  # swaps may change the length
        if article.lower() in ("a", "an") and changed and _core(out[i + 1])[:1].isalpha():
            fixed = "an" if _core(out[i + 1])[0].lower() in "aeiou" else "a"
            fixed = fixed.capitalize() if article[0].isupper() else fixed
            out[i] = fixed + _affix(out[i])
    return out


def _find_relations(tokens: list[str]) -> list[tuple[int, int]]:
    """(start, stop) token spans of relation phrases, longest match first, left to right."""
    words = [_core(t).lower() for t in tokens]
    spans = []
    i = 0
    while i < len(tokens):
        for length in range(min(_LONGEST_RELATION, len(tokens) - i), 0, -1):
            phrase = tuple(words[i : i + length])
            # a phrase must not straddle punctuation ("on, top of" is not "on top of")
            if phrase in _RELATIONS and not any(_affix(t) for t in tokens[i : i + length - 1]):
                spans.append((i, i + length))
                i += length
                break
        else:
            i += 1
    return spans


def _swap_words(tokens: list[str], tag: str, excluded: set[int], rng: random.Random) -> list[str] | None:
    positions = [i for i, t in enumerate(tokens) if i not in excluded and word_class(t) == tag]
    pairs = [(i, j) for n, i in enumerate(positions) for j in positions[n + 1:]
             if _core(tokens[i]).lower() != _core(tokens[j]).lower()]
    if not pairs:
        return None
    i, j = rng.choice(pairs)
    out = list(tokens)
    out[i], out[j] = _core(tokens[j]) + _affix(tokens[i]), _core(tokens[i]) + _affix(tokens[j])
    return out


def _in_phrase(token: str) -> bool:
    """Whether a token can be part of a noun phrase: determiner, number, adjective or noun."""
    word = _core(token).lower()
    return word in _DETERMINERS or word.isdigit() or word_class(token) in ("noun", "adj")


def _subject(tokens: list[str], start: int, in_relation: set[int]) -> tuple[int, int] | None:
    """The noun phrase ending shortly before position `start` (verbs and auxiliaries between
    them skipped), not crossing punctuation or another relation."""
    def free(i: int) -> bool:
        return i not in in_relation and not _affix(tokens[i])

    end = start
    while end > 0 and start - end < _VERBS_SKIPPED and free(end - 1) and not _in_phrase(tokens[end - 1]):
        end -= 1  # "is", "sitting", "parked", ...
    if end == 0 or not free(end - 1) or word_class(tokens[end - 1]) != "noun":
        return None
    first = end - 1
    while first > 0 and free(first - 1) and _in_phrase(tokens[first - 1]):
        first -= 1
    return first, end


def _object(tokens: list[str], stop: int, in_relation: set[int]) -> tuple[int, int] | None:
    """The noun phrase starting at position `stop`, up to its last noun."""
    last = None
    i = stop
    while i < len(tokens) and i not in in_relation and _in_phrase(tokens[i]):
        if word_class(tokens[i]) == "noun":
            last = i
        if _affix(tokens[i]):
            break  # a comma ends the phrase
        i += 1
    return None if last is None else (stop, last + 1)


def _swap_arguments(tokens: list[str], relations: list[tuple[int, int]], in_relation: set[int],
                    rng: random.Random) -> list[str] | None:
    options = []
    for start, stop in relations:
        subject, obj = _subject(tokens, start, in_relation), _object(tokens, stop, in_relation)
        if subject and obj:
            a, b = tokens[slice(*subject)], tokens[slice(*obj)]
            if [_core(t).lower() for t in a] != [_core(t).lower() for t in b]:
                options.append((subject, obj))
    if not options:
        return None
    (a0, a1), (b0, b1) = rng.choice(options)
    a, b = tokens[a0:a1], tokens[b0:b1]
    # the phrases trade words; the punctuation after each phrase's last word stays in place
    a_words, b_words = a[:-1] + [_core(a[-1])], b[:-1] + [_core(b[-1])]
    b_words[-1] += _affix(a[-1])
    a_words[-1] += _affix(b[-1])
    return tokens[:a0] + b_words + tokens[a1:b0] + a_words + tokens[b1:]


def _replace_relation(tokens: list[str], relations: list[tuple[int, int]], rng: random.Random) -> list[str] | None:
    options = [(start, stop) for start, stop in relations
               if stop < len(tokens) and _RELATIONS[tuple(_core(t).lower() for t in tokens[start:stop])]]
    if not options:
        return None
    start, stop = rng.choice(options)
    opposite = list(_RELATIONS[tuple(_core(t).lower() for t in tokens[start:stop])])
    opposite[-1] += _affix(tokens[stop - 1])
    if tokens[start][:1].isupper():
        opposite[0] = opposite[0].capitalize()
    return tokens[:start] + opposite + tokens[stop:]


# -- CLIP nearest-neighbour images ----------------------------------------------------------------


def clip_nearest_images(pairs: list[TrainPair], clip: "ClipModel", k: int = 3) -> list[tuple[int, ...]]:
    """For each pair, the row indices of the k images nearest to its image in CLIP image-embedding
    space, best first (ties: the lower row first), for use as hard-negative images.

    Each distinct image file is embedded once (`clip.embed_images`); neighbours come from the
    streaming `kernels.topk_similarity` (the [n, n] similarity matrix is never built). The image
    itself, other rows with the same image file (COCO's five captions per image) and copies of it
    (files with the same pixels, hence the same embedding) are left out; a distinct image is
    named by its first row. A tuple is shorter than k only when fewer than k other images remain
    after leaving copies out.

    Returns:
        one tuple of row indices per pair, in `pairs` order.
    Raises:
        ValueError: no pairs, or k not in [1, number of distinct images - 1].
    """
    from itm_engine.clip import QUERY_CHUNK

    files = list(dict.fromkeys(pair.image for pair in pairs))
    if not files:
        raise ValueError("clip_nearest_images needs at least one pair")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < len(files):
        raise ValueError(f"k must be between 1 and the number of distinct images minus one ({len(files) - 1}), "
                         f"got {k!r}")
    first_row: dict[str, int] = {}
    for row, pair in enumerate(pairs):
        first_row.setdefault(pair.image, row)
    embeddings = clip.embed_images(files)  # [U, D], unit rows
    nearest: list[tuple[int, ...]] = []
    for start in range(0, len(files), QUERY_CHUNK):
        nearest += _nearest_others(embeddings, range(start, min(start + QUERY_CHUNK, len(files))), k)
    by_file = {file: tuple(first_row[files[u]] for u in found) for file, found in zip(files, nearest)}
    return [by_file[pair.image] for pair in pairs]


def _nearest_others(embeddings: torch.Tensor, queries: range, k: int) -> list[tuple[int, ...]]:
    """The k nearest rows of `embeddings` to each query row, leaving out rows equal to the query
    (itself and copies); asks the top-k op for more candidates while copies crowd them out."""
    found: dict[int, tuple[int, ...]] = {}
    pending, want = list(queries), k + 1
    while pending:
        want = min(want, len(embeddings))
        indices = kernels.topk_similarity(embeddings[pending], embeddings, want)[1].cpu().tolist()
        retry = []
        for q, candidates in zip(pending, indices):
            others = [c for c in candidates if c != q and not torch.equal(embeddings[c], embeddings[q])][:k]
            if len(others) < k and want < len(embeddings):
                retry.append(q)
            else:
                found[q] = tuple(others)
        pending, want = retry, 2 * want
    return [found[q] for q in queries]


# -- negative sampling ----------------------------------------------------------------------------

NEGATIVE_KINDS = ("none", "hard-text", "hard-image", "random", "mixed")
_DRAWN_KINDS = ("hard-text", "hard-image", "random")
_RANDOM_TRIES = 32  # random draws before falling back to listing the eligible pairs


class NegativeSampler:
    """Chooses each example's negative for the HardNeg loss, deterministically from (seed, epoch, index).

    Kinds:
        none: no negatives.
        hard-text: the example's image under a hard-negative caption: one of its precomputed
            `neg_captions` (those equal to the caption left out) if any, else one of
            `hard_negative_captions(caption, seed)`.
        hard-image: the example's caption with a hard-negative image: one of its `neg_images`
            rows (or, for pairs without any, of `neighbours`); rows with the example's own image
            file are left out.
        random: the example's image under the caption of a random other pair (one with another
            image file and another caption).
        mixed: one of the kinds available for the example, uniformly.

    With probability 1 - neg_prob an example gets no negative; an example for which the kind
    asked for is not available (e.g. hard-image for a pair without negative images, hard-text
    for a one-word caption) gets none either. Each call draws from
    `random.Random(f"{seed}|{epoch}|{index}")`: the same arguments give the same negative in
    any process, order or resumed run.
    """

    def __init__(self, pairs: list[TrainPair], kind: str = "mixed", neg_prob: float = 1.0, seed: int = 0, *,
                 neighbours: Sequence[Sequence[int]] | None = None) -> None:
        """
        Args:
            pairs: the training pairs (`read_pairs`).
            kind: one of `NEGATIVE_KINDS`.
            neg_prob: the probability, in [0, 1], that an example gets a negative.
            seed: the sampling seed (also the seed of the generated hard-negative captions).
            neighbours: optional hard-negative image rows per pair (e.g. `clip_nearest_images`),
                used for the pairs whose `neg_images` is empty.
        Raises:
            ValueError: unknown kind, neg_prob outside [0, 1], a non-integer seed, no pairs,
                row indices out of range, hard-image without any hard-negative image, random
                with a single image file.
        """
        if kind not in NEGATIVE_KINDS:
            raise ValueError(f"unknown negative kind {kind!r}; known kinds: {', '.join(NEGATIVE_KINDS)}")
        if isinstance(neg_prob, bool) or not isinstance(neg_prob, Real) or not 0.0 <= neg_prob <= 1.0:
            raise ValueError(f"neg_prob must be a probability in [0, 1], got {neg_prob!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.pairs = list(pairs)
        if not self.pairs:
            raise ValueError("NegativeSampler needs at least one pair")
        if neighbours is not None and len(neighbours) != len(self.pairs):
            raise ValueError(f"neighbours has {len(neighbours)} rows for {len(self.pairs)} pairs")
        self.kind = kind
        self.neg_prob = float(neg_prob)
        self.seed = seed
        self._image_rows = [self._negative_image_rows(i, neighbours) for i in range(len(self.pairs))]
        if kind == "hard-image" and not any(self._image_rows):
            raise ValueError(
                "negatives 'hard-image' need hard-negative images, but no pair has any: give neg_image row "
                "indices (the NegCLIP TSV's neg_image column), or compute CLIP nearest neighbours with "
                "clip_nearest_images(pairs, clip) and pass them as neighbours=")
        self._several_images = len({pair.image for pair in self.pairs}) > 1
        if kind == "random" and not self._several_images:
            raise ValueError("negatives 'random' need pairs with at least two different image files")

    def _negative_image_rows(self, index: int, neighbours: Sequence[Sequence[int]] | None) -> tuple[int, ...]:
        pair = self.pairs[index]
        rows = pair.neg_images or (tuple(neighbours[index]) if neighbours is not None else ())
        for j in rows:
            if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < len(self.pairs):
                raise ValueError(f"pair {index}: hard-negative image row {j!r} is not a row index "
                                 f"in [0, {len(self.pairs)})")
        return tuple(dict.fromkeys(j for j in rows if self.pairs[j].image != pair.image))

    def __len__(self) -> int:
        return len(self.pairs)

    def negative(self, index: int, epoch: int) -> Negative | None:
        """The negative of example `index` in epoch `epoch`, or None (no negative this time)."""
        index, epoch = operator.index(index), operator.index(epoch)
        if not 0 <= index < len(self.pairs):
            raise IndexError(f"index {index} out of range for {len(self.pairs)} pairs")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self.kind == "none":
            return None
        rng = random.Random(f"{self.seed}|{epoch}|{index}")
        if rng.random() >= self.neg_prob:
            return None
        kinds = rng.sample(_DRAWN_KINDS, len(_DRAWN_KINDS)) if self.kind == "mixed" else [self.kind]
        for kind in kinds:  # mixed: the first available kind in a random order = uniform over the available
            negative = self._draw(kind, index, rng)
            if negative is not None:
                return negative
        return None

    def _draw(self, kind: str, index: int, rng: random.Random) -> Negative | None:
        pair = self.pairs[index]
        if kind == "hard-text":
            captions = ([c for c in pair.neg_captions if c != pair.caption]
                        or hard_negative_captions(pair.caption, self.seed))
            return Negative(kind, pair.image, rng.choice(captions)) if captions else None
        if kind == "hard-image":
            rows = self._image_rows[index]
            return Negative(kind, self.pairs[rng.choice(rows)].image, pair.caption) if rows else None
        row = self._random_other(index, rng)
        return None if row is None else Negative(kind, pair.image, self.pairs[row].caption)

    def _random_other(self, index: int, rng: random.Random) -> int | None:
        if not self._several_images:
            return None
        pair = self.pairs[index]

        def eligible(j: int) -> bool:
            return self.pairs[j].image != pair.image and self.pairs[j].caption != pair.caption

        for _ in range(_RANDOM_TRIES):
            j = rng.randrange(len(self.pairs))
            if eligible(j):
                return j
        rows = [j for j in range(len(self.pairs)) if eligible(j)]
        return rng.choice(rows) if rows else None


__all__ = ["FORMATS", "HARD_NEGATIVE_KINDS", "NEGATIVE_KINDS", "Negative", "NegativeSampler", "TrainPair",
           "clip_nearest_images", "hard_negative_captions", "hard_negatives", "read_pairs"]
