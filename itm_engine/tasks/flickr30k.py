"""Flickr30K retrieval on the Karpathy split, image->text and text->image, over all candidates, a
CLIP top-k prefilter, or a precomputed candidates file."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from itm_engine.metrics import recall_at_k
from itm_engine.tasks import register
from itm_engine.tasks.base import DataError, Example, Task, check_list, check_string, check_strings, require

KARPATHY_JSON = "dataset_flickr30k.json"
IMAGE_DIRS = ("flickr30k-images", "images")
KS = (1, 5, 10)


def karpathy_captions(sentences: Any, where: str, task: str) -> list[str]:
    """The captions of a row of a Karpathy split file: its "sentences", a non-empty list of
    {"raw": caption} objects, checked (the row `where` of `task`; sentence j is "where sentences[j]")."""
    captions = []
    for j, sentence in enumerate(check_list(sentences, "sentences", where, task, of="{'raw': caption} objects")):
        require(sentence, ("raw",), f"{where} sentences[{j}]", task)
        captions.append(check_string(sentence["raw"], "raw", f"{where} sentences[{j}]", task))
    return captions


@dataclass(frozen=True)
class _Row:
    """One image of the split: where it is described, its file name and its captions."""

    where: str
    filename: str
    captions: tuple[str, ...]


class _Flickr30K(Task):
    """Layout (shared by `flickr30k_i2t` and `flickr30k_t2i`)::

        ROOT/dataset_flickr30k.json      Karpathy split: {"images": [{"filename": "1000092795.jpg",
                                         "split": "test", "sentences": [{"raw": "..."}, ...]}, ...]}
        ROOT/flickr30k-images/*.jpg      the images (or ROOT/images/, or option image_dir)

    Options:
        split: the Karpathy split to evaluate (default "test": 1,000 images, 5 captions each;
            "val" under the DiffusionITM research code's conventions).
        image_dir: the image folder, relative to ROOT (default flickr30k-images/, else images/).
        candidates: "all" (default: every caption / every image of the split), "clip" (the top-k
            of option `prefilter`, an object with `topk_texts(images, texts, k)` and
            `topk_images(texts, images, k)` returning LongTensor indices [n_queries, k]), or the
            path (absolute, or relative to ROOT) of a candidates JSON file in the research code's
            format: {image path: [captions]} for image->text, {caption: [image paths]} for
            text->image. Image paths in it are matched by file name against image_dir; they may
            be relative or absolute but must not point outside ROOT.
        topk: k of the CLIP prefilter (default 10); with a candidates file, keep only the first
            topk candidates of each list (default: all of them); not used with "all".
        save_candidates: write the candidates of every query to this JSON file (absolute, or
            relative to ROOT), in the research code's format (see `candidates`; image paths
            relative to ROOT), so a prefiltered run can be repeated or shared.

    The paper's protocol (the DiffusionITM research code's conventions, `Protocol.conventions`):
    the validation split; with CLIP candidates, the ground truth forced to index 0 and the other
    k - 1 the prefilter's best *wrong* candidates: image->text, the image's first caption and no
    other of its captions among the negatives; text->image, one query per image (its first
    caption: 1,014 queries on val) against its image and 9 others. Read from the research code's
    own files (val_top10_RN50x64_text.json / val_top10_RN50x64.json), text->image takes every
    5th entry, as that code does.
    Ground truth: an image's captions are the `sentences` of its row; a caption's image is the row
    it comes from (with a candidates file, whose captions are keys, every split image carrying
    that exact caption counts). With "all", identical captions of different images appear once
    among the image->text candidates, so a duplicate never ties with the correct one. A query
    whose correct candidates the prefilter or the file left out stays in, with an empty label
    (it can never be retrieved). Metrics: R@1, R@5, R@10.
    """

    direction: str = ""  # "i2t" or "t2i", set by the registered subclasses
    option_names = ("split", "image_dir", "candidates", "prefilter", "topk", "save_candidates")

    def __init__(self, root, skip_missing: bool = False, **options: Any) -> None:
        super().__init__(root, skip_missing, **options)
        self.paper = self.protocol.conventions == "diffusion-itm"  # the paper's query and candidate sets
        self.split = options.get("split", "val" if self.paper else "test")
        self.save_candidates = options.get("save_candidates")
        if self.save_candidates is not None and not isinstance(self.save_candidates, (str, Path)):
            raise ValueError(f"{self.name}: option save_candidates must be a file path, got {self.save_candidates!r}")
        if not isinstance(self.split, str) or not self.split:
            raise ValueError(f"{self.name}: option split must be a split name such as 'test', got {self.split!r}")
        self.image_dir = self.image_folder(options.get("image_dir"), IMAGE_DIRS)
        self.candidates, self.candidates_file = self._candidates(options.get("candidates", "all"))
        self.prefilter = options.get("prefilter")
        method = "topk_texts" if self.direction == "i2t" else "topk_images"
        if self.candidates == "clip":
            if not callable(getattr(self.prefilter, method, None)):
                raise ValueError(f"{self.name}: candidates='clip' needs option prefilter, "
                                 f"an object with a {method}() method")
        elif self.prefilter is not None:
            raise ValueError(f"{self.name}: option prefilter is only used with candidates='clip'")
        topk = options.get("topk")
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
            raise ValueError(f"{self.name}: option topk must be a positive integer, got {topk!r}")
        self.topk = {"all": None, "clip": topk or 10, "file": topk}[self.candidates]

    def _candidates(self, value: Any) -> tuple[str, Path | None]:
        if value in ("all", "clip"):
            return value, None
        if isinstance(value, (str, Path)):
            for file in (self.root / Path(value).expanduser(), Path(value).expanduser()):
                if file.is_file():
                    return "file", file.resolve()
        raise ValueError(f"{self.name}: option candidates must be 'all', 'clip' or the path of a candidates "
                         f"JSON file, got {value!r} (no such file)")

    # -- the split ----------------------------------------------------------------------------

    def _rows(self) -> list[_Row]:
        """The images of the chosen split, in file order, validated (files not checked)."""
        data = self.read_json(KARPATHY_JSON)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DataError(f"{self.name}: {KARPATHY_JSON}: expected an object with an 'images' list")
        rows, splits = [], set()
        for i, row in enumerate(data["images"]):
            where = f"{KARPATHY_JSON} images[{i}]"
            require(row, ("split",), where, self.name)
            splits.add(check_string(row["split"], "split", where, self.name))
            if row["split"] != self.split:
                continue
            require(row, ("filename", "sentences"), where, self.name)
            filename = check_string(row["filename"], "filename", where, self.name)
            captions = karpathy_captions(row["sentences"], where, self.name)
            rows.append(_Row(f"{where} ({filename})", filename, tuple(captions)))
        if not rows:
            raise ValueError(f"{self.name}: no images of split {self.split!r} in {KARPATHY_JSON}; "
                             f"splits there: {', '.join(sorted(splits)) or 'none'}")
        names = [r.filename for r in rows]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise DataError(f"{self.name}: {KARPATHY_JSON}: image {dup!r} is listed twice in split {self.split!r}")
        return rows

    def _image(self, filename: str, where: str) -> str:
        return self.path(Path(self.image_dir) / filename, where)

    def _present(self, rows: list[_Row]) -> tuple[list[_Row], list[str]]:
        """The rows whose image exists (the others stop the run or are skipped) and their paths."""
        pairs = list(self.examples_from(((r.where, r) for r in rows), lambda r: (r, self._image(r.filename, r.where))))
        return [r for r, _ in pairs], [p for _, p in pairs]

    # -- candidates ---------------------------------------------------------------------------

    def _prefilter(self, method: str, queries: list[str], pool: list[str], k: int | None = None) -> list[list[int]]:
        """Indices into `pool` of each query's top-k (default `topk`) candidates, from the CLIP prefilter."""
        if not queries:  # every image skipped as missing
            return []
        k = min(k or self.topk, len(pool))
        top = torch.as_tensor(getattr(self.prefilter, method)(queries, pool, k))
        if top.dim() != 2 or top.shape[0] != len(queries) or top.shape[1] != k:
            raise ValueError(f"{self.name}: prefilter.{method} returned shape {tuple(top.shape)}, "
                             f"expected [{len(queries)}, {k}]")
        if top.dtype.is_floating_point or top.numel() and (top.min() < 0 or top.max() >= len(pool)):
            raise ValueError(f"{self.name}: prefilter.{method} must return integer indices in [0, {len(pool)})")
        return top.tolist()

    def _file_entries(self) -> list[tuple[str, str, list]]:
        """(where, key, candidates) for each entry of the candidates file, in file order."""
        file = self.candidates_file
        data = self.read_json(str(file))
        if not isinstance(data, dict):
            raise DataError(f"{self.name}: {file}: expected a JSON object {{query: [candidates]}}")
        entries = []
        for key, values in data.items():
            where = f"{file.name} [{key!r}]"
            values = check_strings(values, "candidates", where, self.name)
            entries.append((where, key, values[: self.topk] if self.topk else values))
        return entries

    def _saved(self, examples: list[Example]) -> list[Example]:
        """`examples`, after writing their candidates to option save_candidates (if given)."""
        if self.save_candidates is not None:
            target = self.root / Path(self.save_candidates).expanduser()
            relative = lambda p: Path(p).relative_to(self.root).as_posix()  # noqa: E731
            if self.direction == "i2t":
                data = {relative(ex.images[0]): list(ex.texts) for ex in examples}
            else:
                data = {ex.texts[0]: [relative(p) for p in ex.images] for ex in examples}
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(data, indent=1) + "\n")
        return examples

    def _file_name(self, value: str, where: str) -> str:
        """The file name of an image path from a candidates file; refuses paths outside the root
        (`real_path`)."""
        if self.real_path(value) is None:
            raise DataError(f"{self.name}: {where}: image path {value!r} resolves outside the data root {self.root}")
        return Path(value).name


@register
class Flickr30KI2T(_Flickr30K):
    __doc__ = ("Flickr30K image->text retrieval: one image, its candidate captions; label = the indices "
               "of the image's own captions among them.\n\n    " + _Flickr30K.__doc__)

    name = "flickr30k_i2t"
    modes = ("i2t",)
    description = "Flickr30K (Karpathy test split) image->text retrieval, R@1/5/10"
    direction = "i2t"

    def load_examples(self) -> Iterable[Example]:
        rows = self._rows()
        if self.candidates == "file":
            by_name = {r.filename: r for r in rows}

            def build(entry):
                where, key, captions = entry
                name = self._file_name(key, where)
                if name not in by_name:
                    raise DataError(f"{self.name}: {where}: image {name!r} is not in split {self.split!r} "
                                    f"of {KARPATHY_JSON}")
                row = by_name[name]
                return self._example(row, self._image(name, where), tuple(captions))

            return self._saved(list(self.examples_from(((e[0], e) for e in self._file_entries()), build)))

        rows, paths = self._present(rows)
        pool = list(dict.fromkeys(c for r in rows for c in r.captions))  # unique captions, in order
        if self.candidates == "all":
            texts = tuple(pool)
            return self._saved([self._example(r, p, texts) for r, p in zip(rows, paths)])
        if self.paper:  # its first caption, then the best wrong ones (none of its own captions)
            most_own = max((len(set(r.captions)) for r in rows), default=0)
            top = self._prefilter("topk_texts", paths, pool, self.topk - 1 + most_own)
            wrong = [[pool[i] for i in idx if pool[i] not in r.captions][: self.topk - 1] for r, idx in zip(rows, top)]
            return self._saved([self._example(r, p, (r.captions[0], *negatives))
                                for r, p, negatives in zip(rows, paths, wrong)])
        top = self._prefilter("topk_texts", paths, pool)
        return self._saved([self._example(r, p, tuple(pool[i] for i in idx)) for r, p, idx in zip(rows, paths, top)])

    def _example(self, row: _Row, path: str, texts: tuple[str, ...]) -> Example:
        own = set(row.captions)
        return Example(id=row.filename, images=(path,), texts=texts,
                       label=[i for i, t in enumerate(texts) if t in own])

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        return _recall(self.name, examples, scores["i2t"], lambda ex: len(ex.texts), self.protocol.ties)


@register
class Flickr30KT2I(_Flickr30K):
    __doc__ = ("Flickr30K text->image retrieval: one caption, its candidate images; label = the index "
               "of the caption's image among them.\n\n    " + _Flickr30K.__doc__)

    name = "flickr30k_t2i"
    modes = ("t2i",)
    description = "Flickr30K (Karpathy test split) text->image retrieval, R@1/5/10"
    direction = "t2i"

    def load_examples(self) -> Iterable[Example]:
        rows = self._rows()
        if self.candidates == "file":
            sources: dict[str, list[tuple[_Row, int]]] = {}
            for row in rows:
                for j, caption in enumerate(row.captions):
                    sources.setdefault(caption, []).append((row, j))

            def build(entry):
                where, caption, values = entry
                if caption not in sources:
                    raise DataError(f"{self.name}: {where}: caption is not in split {self.split!r} of {KARPATHY_JSON}")
                names = [self._file_name(v, where) for v in values]
                images = tuple(self._image(n, f"{where} item {i}") for i, n in enumerate(names))
                own = {row.filename for row, _ in sources[caption]}
                row, j = sources[caption][0]
                return Example(id=f"{row.filename}#{j}", images=images, texts=(caption,),
                               label=[i for i, n in enumerate(names) if n in own])

            entries = self._file_entries()
            if self.paper:  # the research code reads every 5th caption of its file
                entries = entries[::5]
            return self._saved(list(self.examples_from(((e[0], e) for e in entries), build)))

        rows, paths = self._present(rows)
        if self.paper:  # one query per image, its first caption
            queries = [(n, 0, r.captions[0]) for n, r in enumerate(rows)]
        else:
            queries = [(n, j, c) for n, r in enumerate(rows) for j, c in enumerate(r.captions)]
        if self.candidates == "all":
            images = tuple(paths)
            return self._saved([Example(id=f"{rows[n].filename}#{j}", images=images, texts=(c,), label=[n])
                                for n, j, c in queries])
        if self.paper:  # its image, then the best other ones
            top = self._prefilter("topk_images", [c for _, _, c in queries], paths, self.topk)
            others = [[paths[i] for i in idx if i != n][: self.topk - 1] for (n, _, _), idx in zip(queries, top)]
            return self._saved([Example(id=f"{rows[n].filename}#{j}", images=(paths[n], *rest), texts=(c,), label=[0])
                                for (n, j, c), rest in zip(queries, others)])
        top = self._prefilter("topk_images", [c for _, _, c in queries], paths)
        return self._saved([Example(id=f"{rows[n].filename}#{j}", images=tuple(paths[i] for i in idx), texts=(c,),
                                    label=[k for k, i in enumerate(idx) if i == n])
                            for (n, j, c), idx in zip(queries, top)])

    def metrics(self, examples: Sequence[Example], scores: dict[str, Sequence[torch.Tensor]]) -> dict[str, float]:
        return _recall(self.name, examples, scores["t2i"], lambda ex: len(ex.images), self.protocol.ties)


def _recall(task: str, examples: Sequence[Example], matrices: Sequence[torch.Tensor], n_candidates,
            ties: str = "strict") -> dict[str, float]:
    """R@1/5/10 from each example's [1, k] (i2t) or [k, 1] (t2i) score matrix.

    Candidate counts may differ between examples (a candidates file): the score vectors are padded
    with -inf to one width of at least max(KS) columns; a padded slot never ties with or beats a
    real score, and the width keeps a query without positives (rank = width + 1) out of every R@k.
    """
    if len(matrices) != len(examples) or not examples:
        raise ValueError(f"{task}: {len(matrices)} score matrices for {len(examples)} examples")
    vectors = []
    for ex, s in zip(examples, matrices):
        if s.numel() != n_candidates(ex):
            raise ValueError(f"{task}: example {ex.id!r} has {n_candidates(ex)} candidates but {s.numel()} scores")
        vectors.append(s.reshape(-1).double())
    width = max(max(KS), max(len(v) for v in vectors))
    padded = torch.full((len(vectors), width), -math.inf, dtype=torch.float64)
    for n, v in enumerate(vectors):
        padded[n, : len(v)] = v
    return recall_at_k(padded, [ex.label for ex in examples], KS, ties)
