"""`itm-eval`: run a GDBench task end to end, resumably, on one or many processes.

    itm-eval --task winoground --data-root ~/data/winoground --model stabilityai/stable-diffusion-2-1-base \\
             --device cuda --dtype float16 --samples 10 --out runs/wino
    accelerate launch --multi_gpu --num_processes 8 -m itm_engine.cli eval --task winoground ...
                                                     # sharded over processes (gloo on CPU-only hosts)

Examples are scored in fixed chunks (every chunk on the same seeded noise bank); each finished
chunk's scores are appended to `OUT/<scorer>/scores/rank<r>.jsonl` in one write + fsync, so a
crash loses at most the chunk in flight, and `--resume` recomputes nothing already stored and
ends with exactly the results of an uninterrupted run. Processes take chunks round-robin; the
main process gathers every shard, computes the task's metrics and writes `results.json` (metrics,
config, versions, timing, counts) and `scores.jsonl` (the raw per-example score matrices).

`--resume` also checks the data: `OUT/<scorer>/fingerprint.json` records the size and modification
time of every file the task read its examples from, every image file it scores and the weight
files of a local model folder, and a resume from changed files is refused. The main process holds
a lock on `OUT/<scorer>` for the run (a second writer is refused), and metadata files are
replaced atomically (`itm_engine.storage`).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from tqdm.auto import tqdm

from itm_engine import extras, options, protocols, storage
from itm_engine.options import option, parse_batch_size
from itm_engine.tasks import Example, Task, get_task
from itm_engine.tasks.base import StoredImage, load_image_ref

SCORERS = ("diffusion", "clip")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")  # the files of a model folder fingerprinted
CHANGES_LISTED = 5  # changed files named in a refused resume's message (the rest are counted)


def parse_task_options(items: Sequence[str]) -> dict[str, Any]:
    """["split=test", "seed=1"] -> {"split": "test", "seed": 1} (values parsed as JSON when they parse)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--task-option takes KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


@dataclass
class EvalConfig:
    """Everything that determines the scores (stored with the results; `--resume` checks it)."""

    task: str = option(help="a task name (an unknown name lists the known ones)")
    data_root: str = option(help="the dataset folder, in the task's own layout (docs/evaluation.md)")
    model: str = option("tiny", help="diffusers folder, cached hub id, named model (shapes) or built-in "
                                     "architecture (tiny, sd15-arch, sd21-arch)")
    lora: str | None = option(None, metavar="DIR", help="LoRA for the UNet: a folder (diffusers safetensors or "
                                                         "the research code's .bin) or file")
    lora_scale: float = option(1.0, help="LoRA strength (0: the base model)")
    scorer: str = option("diffusion", help="diffusion, clip, or both side by side: diffusion,clip")
    mode: Literal["auto", "i2t", "t2i"] = option(
        "auto", help="auto: the modes the task's metrics are defined on; i2t/t2i: force one for all")
    protocol: str = option(protocols.DEFAULT, choices=tuple(protocols.PRESETS),
                           help="the scoring protocol preset (docs/protocols.md); its fields can be overridden one "
                                "by one with the protocol flags below")
    protocol_fields: dict = option(default_factory=dict, cli=False, help="the protocol fields overridden")
    adaptive: str | None = option(None, metavar="POLICY", help=(
        "successive elimination: SAMPLES:KEEP rounds (e.g. 2:5,10:1; cumulative samples) or auto:z=Z[,step=N] "
        "(stop a query once its lead exceeds Z standard errors; budget: the protocol's samples)"))
    candidates: str | None = option(None, help="retrieval tasks: all | clip | a candidates JSON file")
    prefilter: Literal["clip"] | None = option(None, help="CLIP top-k candidates for retrieval tasks")
    topk: int = option(10, help="candidates per query kept by the prefilter or a candidates file")
    clip_model: str = option("ViT-B-32", help="open_clip model of the prefilter and the CLIP scorer")
    clip_pretrained: str | None = option(None, help="open_clip tag from the local cache, or a checkpoint path")
    clip_config: str | None = option(None, help="folder/JSON of extra open_clip model configs")
    limit: int | None = option(None, help="only the first N examples")
    task_options: dict = option(default_factory=dict, flag="--task-option", metavar="KEY=VALUE", append=True,
                                convert=parse_task_options, help=(
                                    "a task option (see the task's docs), VALUE read as JSON when it parses; "
                                    "repeatable: --task-option split=test --task-option seed=1"))
    chunk_size: int = option(16, help="examples per scoring chunk (the unit of resume)")
    dtype: Literal["float32", "float16", "bfloat16"] | None = option(
        None, help="model dtype (none: the protocol's on CUDA, float32 on the CPU; CLIP: float32)")
    skip_missing: bool = option(False, identity=False,
                                help="skip (and count) examples whose images are missing")

    def identity(self) -> dict:
        """The fields a resumed run must share with the stored one: the configuration, with the
        protocol resolved field by field ("protocol.seed", ...)."""
        record = {k: v for k, v in options.identity(self).items() if k != "protocol_fields"}
        record.update({f"protocol.{k}": v for k, v in self.scoring_protocol().as_dict().items()})
        return record

    def scoring_protocol(self) -> protocols.Protocol:
        """The protocol: the preset with the overridden fields."""
        return protocols.resolve(self.protocol, **self.protocol_fields)


@dataclass
class EvalRun:
    """Where and how `itm-eval` runs (not part of the results' identity)."""

    out: str | None = option(None, help="output folder (none: runs/<task>)")
    resume: bool = option(False, help="continue the run stored in the output folder")
    device: str = option("auto", help="auto (accelerate's device for this process), cpu, cuda, ...")
    batch_size: int | str = option(64, parse=parse_batch_size, help="UNet work items per call, or auto")
    kernels: str | None = option(None, help="fused-op backend: reference | triton | ext | auto")
    progress: bool = option(True, help="show a progress bar")


class ScoreStore:
    """Append-only, crash-safe per-process score files: one JSON line per example.

    Each `append` writes a whole chunk with one write and an fsync. A kill during that write can
    leave the last line without its newline: opening the store repairs this process's file once
    (`_repair_tail`), so what `load_all` counts as stored is exactly what later appends keep.
    """

    def __init__(self, folder: Path, rank: int) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.file = folder / f"rank{rank}.jsonl"
        self._repair_tail()

    def load_all(self) -> dict[str, dict[str, list]]:
        """{example id: {mode: matrix as nested lists}} from every rank's file (a torn line, whose
        chunk was not finished, is skipped)."""
        stored: dict[str, dict[str, list]] = {}
        for shard in sorted(self.folder.glob("rank*.jsonl")):
            for row in storage.read_jsonl(shard):
                stored[row["id"]] = row["scores"]
        return stored

    def append(self, rows: list[dict]) -> None:
        payload = "".join(json.dumps(row) + "\n" for row in rows)
        with open(self.file, "a") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())

    def _repair_tail(self) -> None:
        """End the file at a row boundary: a last row that parses but lacks its newline gets it
        (`load_all` counts it, so it must survive the next append); a torn one is cut off. Other
        ranks' files are left to their own processes: `load_all` reads both cases the same way."""
        if not self.file.exists():
            return
        data = self.file.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:])
            complete = True
        except ValueError:  # JSONDecodeError or UnicodeDecodeError: the row was torn
            complete = False
        with open(self.file, "r+b") as handle:
            if complete:
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
            else:
                handle.truncate(start)
            handle.flush()
            os.fsync(handle.fileno())


def build_scorer(config: EvalConfig, device: torch.device, batch_size: int | str, kernels: str | None):
    """The DiffusionITM or CLIP scorer of `config` (both offer `score_pairs`)."""
    dtype = getattr(torch, config.dtype) if config.dtype else None
    if config.scorer == "clip":
        return _clip_model(config, device, dtype or torch.float32).scorer()
    from itm_engine.scoring import DiffusionITM

    return DiffusionITM.from_pretrained(config.model, device=device, dtype=dtype, lora=config.lora,
                                        lora_scale=config.lora_scale, protocol=config.scoring_protocol(),
                                        batch_size=batch_size, kernels=kernels)


def _clip_model(config: EvalConfig, device: torch.device, dtype: torch.dtype):
    from itm_engine.clip import ClipModel

    return ClipModel.from_name(
        config.clip_model, pretrained=config.clip_pretrained, device=device, dtype=dtype,
        model_config=config.clip_config,
    )


def load_task(config: EvalConfig, device: torch.device) -> tuple[Task, set[str]]:
    """The task with its options (candidate source and CLIP prefilter for retrieval tasks), its
    examples loaded, and the files it read to load them: those under the data root, and the
    candidates file (absolute paths; what `data_fingerprint` records besides the images)."""
    options: dict[str, Any] = dict(config.task_options)
    if config.candidates is not None:
        options["candidates"] = config.candidates
    if config.prefilter == "clip":
        dtype = getattr(torch, config.dtype or "float32")
        options.update(candidates="clip", prefilter=_clip_model(config, device, dtype))
    if config.candidates is not None or config.prefilter:
        options["topk"] = config.topk
    watched = [Path(config.data_root).expanduser().resolve()]
    if config.candidates not in (None, "all", "clip") and Path(config.candidates).expanduser().is_file():
        watched.append(Path(config.candidates).expanduser())
    with storage.recording_reads(*watched) as read:
        try:
            task = get_task(config.task, config.data_root, skip_missing=config.skip_missing,
                            protocol=config.scoring_protocol(), **options)
        except TypeError as err:  # a task that takes no candidate options
            raise ValueError(f"task {config.task!r} does not take --candidates/--prefilter ({err})") from None
        task.examples  # loaded now, while the files it reads are recorded
    return task, read


def data_fingerprint(config: EvalConfig, task: Task, examples: Sequence[Example], read: set[str]) -> dict:
    """{source: storage.fingerprint} of what the scores of `examples` come from: "data", the files
    the task read (`load_task`) and the image files of the examples (named relative to the data
    root; images in memory have no file), and "model", "lora", "clip" for the weight files of the
    model, LoRA and CLIP checkpoint this run scores with when they are local files or folders (a
    built-in architecture's random weights have no file)."""
    images = {ref if isinstance(ref, str) else ref.path for example in examples for ref in example.images
              if isinstance(ref, (str, StoredImage))}
    record = {"data": storage.fingerprint(sorted(read | images), task.root or config.data_root)}
    diffusion = config.scorer == "diffusion"
    clip = config.scorer == "clip" or config.prefilter == "clip"
    from itm_engine.models import ARCHITECTURES

    for source, location in (("model", config.model if diffusion and config.model not in ARCHITECTURES else None),
                             ("lora", config.lora if diffusion else None),
                             ("clip", config.clip_pretrained if clip else None)):
        path = Path(location).expanduser() if location else None
        if path is not None and path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.suffix in WEIGHT_SUFFIXES and f.is_file())
            record[source] = storage.fingerprint(files, path)
        elif path is not None and path.is_file():
            record[source] = storage.fingerprint([path], path.parent)
    return record


def example_pairs(examples: Sequence[Example]) -> tuple[list, list[str], list[tuple[int, int]], list[tuple[int, int]]]:
    """The work of scoring every image against every text of each example in one call: (images
    (read), texts, pairs (image index, text index), and per example (n_images, n_texts)); the pairs
    of an example are consecutive, image-major, so its scores reshape to [n_images, n_texts]."""
    images, texts, pairs, spans = [], [], [], []
    for example in examples:
        i0, t0 = len(images), len(texts)
        images += [load_image_ref(ref) for ref in example.images]
        texts += list(example.texts)
        pairs += [(i0 + i, t0 + j) for i in range(len(example.images)) for j in range(len(example.texts))]
        spans.append((len(example.images), len(example.texts)))
    return images, texts, pairs, spans


def score_examples(scorer, examples: Sequence[Example], modes: Sequence[str], *, adaptive: str | None = None,
                   **options: Any) -> tuple[list[dict], int, int]:
    """Score every image against every text of each example, all in one call per mode (`options`
    go to the scorer's calls: none for a scorer built with its protocol): rows {id, scores: {mode:
    [n_images][n_texts]}}, with the UNet items run and the items the full budget takes (equal unless
    `adaptive`)."""
    if adaptive:
        return _score_adaptive(scorer, examples, modes, policy=adaptive, **options)
    images, texts, pairs, spans = example_pairs(examples)
    rows: list[dict] = [{"id": example.id, "scores": {}} for example in examples]
    items = 0
    for mode in modes:
        flat = scorer.score_pairs(images, texts, pairs, mode, **options).tolist()
        items += scorer.last_stats.unet_items
        start = 0
        for row, (n_img, n_txt) in zip(rows, spans):
            row["scores"][mode] = [flat[start + i * n_txt : start + (i + 1) * n_txt] for i in range(n_img)]
            start += n_img * n_txt
    return rows, items, items


def _score_adaptive(scorer, examples: Sequence[Example], modes: Sequence[str], *, policy: str,
                    **options: Any) -> tuple[list[dict], int, int]:
    """`score_examples` with adaptive elimination (`policy`): each example is one query (its image in "i2t",
    its caption in "t2i") against its candidates; examples with the same number of candidates
    share each round's scoring calls. Rows store the ranking scores (`AdaptiveResult.ranking_scores`,
    so the task's metric ranks eliminated candidates last) under scores[mode], and the partial means
    and draws per candidate under scores["adaptive/" + mode]."""
    rows = {example.id: {"id": example.id, "scores": {}} for example in examples}
    items = full = 0
    for mode in modes:
        groups: dict[int, list[Example]] = {}
        for example in examples:
            n_query = len(example.images) if mode == "i2t" else len(example.texts)
            if n_query != 1:
                raise ValueError(f"--adaptive needs one {'image' if mode == 'i2t' else 'caption'} per example in "
                                 f"{mode} (the query); {example.id} has {n_query}")
            k = len(example.texts) if mode == "i2t" else len(example.images)
            groups.setdefault(k, []).append(example)
        for group in groups.values():
            if mode == "i2t":
                queries = [load_image_ref(e.images[0]) for e in group]
                candidates = [list(e.texts) for e in group]
            else:
                queries = [e.texts[0] for e in group]
                candidates = [[load_image_ref(ref) for ref in e.images] for e in group]
            result = scorer.score_adaptive(queries, candidates, policy, mode=mode, **options)
            items, full = items + result.unet_items, full + result.full_items
            for q, example in enumerate(group):
                ranking = result.ranking_scores[q].tolist()
                rows[example.id]["scores"][mode] = [ranking] if mode == "i2t" else [[v] for v in ranking]
                rows[example.id]["scores"][f"adaptive/{mode}"] = {"scores": result.scores[q].tolist(),
                                                                  "draws": result.draws[q].tolist()}
    return list(rows.values()), items, full


def evaluate(config: EvalConfig, out: Path, resume: bool = False, device: str = "auto",
             batch_size: int | str = 64, kernels: str | None = None, progress: bool | None = None) -> dict | None:
    """Run one task with one scorer; returns the results (on the main process; None elsewhere).
    The main process holds the lock of `out` meanwhile (storage.FolderLocked if another process does)."""
    PartialState = extras.require("accelerate", "itm-eval").PartialState

    state = PartialState(cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()))
    with storage.folder_lock(out, "itm-eval", enabled=state.is_main_process):
        return _evaluate(config, out, state, resume, device, batch_size, kernels, progress)


def _evaluate(config: EvalConfig, out: Path, state, resume: bool, device: str, batch_size: int | str,
              kernels: str | None, progress: bool | None) -> dict | None:
    """`evaluate` under the folder's lock, on accelerate's `state`."""
    torch_device = state.device if device == "auto" else torch.device(device)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    resumed = False
    if state.is_main_process:  # one process checks and writes, so the others cannot race it
        resumed = _check_config(out / "config.json", config, resume)
    state.wait_for_everyone()

    task, read = load_task(config, torch_device)
    examples = task.examples[: config.limit] if config.limit else task.examples
    if not examples:
        raise ValueError(f"task {config.task}: no examples under {config.data_root}")
    if state.is_main_process:  # the data is checked before any process scores (or reads stored scores)
        _check_fingerprint(out / "fingerprint.json", data_fingerprint(config, task, examples, read), resumed)
        if not resumed:  # written last: a folder with config.json always has its fingerprint
            storage.atomic_write_text(out / "config.json", json.dumps(config.identity(), indent=2) + "\n")
    state.wait_for_everyone()
    modes = task.modes if config.mode == "auto" else (config.mode,)
    store = ScoreStore(out / "scores", state.process_index)
    done = store.load_all() if resume else {}
    chunks = [examples[i : i + config.chunk_size] for i in range(0, len(examples), config.chunk_size)]
    mine = [c for n, c in enumerate(chunks) if n % state.num_processes == state.process_index]
    todo = [c for c in mine if not all(e.id in done and set(modes) <= set(done[e.id]) for e in c)]

    scorer = build_scorer(config, torch_device, batch_size, kernels) if todo else None
    unet_items, full_items, scored = 0, 0, 0
    bar = tqdm(total=sum(map(len, mine)), initial=sum(map(len, mine)) - sum(map(len, todo)), unit="ex",
               desc=f"{config.task} [{config.scorer}] rank {state.process_index}", disable=progress is False)
    for chunk in todo:
        rows, items, full = score_examples(scorer, chunk, modes, adaptive=config.adaptive)
        store.append(rows)
        unet_items, full_items = unet_items + items, full_items + full
        scored += len(chunk)
        bar.update(len(chunk))
        bar.set_postfix(unet_items_per_s=f"{unet_items / max(bar.format_dict['elapsed'], 1e-9):.1f}")
    bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None

    stored = store.load_all()
    missing = [e.id for e in examples if e.id not in stored]
    if missing:
        raise RuntimeError(f"{len(missing)} examples have no stored scores (e.g. {missing[0]}); rerun with --resume")
    matrices = {m: [torch.tensor(stored[e.id][m if m in stored[e.id] else config.mode]) for e in examples]
                for m in task.modes}  # a forced --mode serves every matrix the metric needs
    metrics = task.metrics(examples, matrices)
    storage.atomic_write_text(out / "scores.jsonl", "".join(
        json.dumps({"id": e.id, "meta": e.meta, "label": e.label, "scores": stored[e.id]}) + "\n" for e in examples))
    results = {
        "task": config.task, "scorer": config.scorer, "metrics": metrics, "config": asdict(config),
        "protocol": config.scoring_protocol().as_dict() if config.scorer == "diffusion" else None,
        "counts": {"examples": len(examples), "scored_now": scored, "resumed": len(examples) - scored,
                   "skipped_missing": len(task.skipped), "processes": state.num_processes},
        "skipped": task.skipped, "modes": list(modes), "unet_items_now": unet_items,
        "full_budget_items_now": full_items, **_adaptive_draws(config, examples, stored),
        "seconds": time.perf_counter() - started, "versions": versions(), "device": str(torch_device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    storage.atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results


def _adaptive_draws(config: EvalConfig, examples: Sequence[Example], stored: dict) -> dict:
    """For adaptive runs: noise draws spent on candidates over all examples (resumed ones
    included) vs the full budget (every candidate on every draw), and their ratio."""
    if not config.adaptive:
        return {}
    from itm_engine.adaptive import budget, parse_policy

    per_candidate = budget(parse_policy(config.adaptive, config.scoring_protocol().samples))
    used = full = 0
    for example in examples:
        for mode in [m for m in stored[example.id] if f"adaptive/{m}" in stored[example.id]]:
            record = stored[example.id][f"adaptive/{mode}"]
            used += sum(record["draws"])
            full += per_candidate * len(record["draws"])
    return {"adaptive": {"policy": config.adaptive, "candidate_draws": used, "full_budget_draws": full,
                         "savings": full / max(used, 1)}}


def _check_config(path: Path, config: EvalConfig, resume: bool) -> bool:
    """Refuse to mix runs: an existing output folder needs --resume and the same configuration.
    True when a stored run is resumed (`path` exists); a new run's configuration is written by
    `_evaluate` once its data is fingerprinted."""
    if not path.exists():
        return False
    if not resume:
        raise FileExistsError(f"{path.parent} already holds a run; pass --resume to continue it or choose "
                              "another --out")
    stored = storage.read_json(path)
    options.check_same_config(options.with_added_fields(stored, protocols.Protocol, "protocol."), config.identity(),
                              path)
    return True


def _check_fingerprint(path: Path, current: dict, resumed: bool) -> None:
    """Refuse to resume a run whose stored scores came from other files than `current`
    (`data_fingerprint`): ValueError naming the first changed files and their count. A new run
    records `current`, and so does a resumed run stored before fingerprints existed (warning that
    its data cannot be checked)."""
    if resumed and path.exists():
        changes = storage.fingerprint_changes(storage.read_json(path), current)
        if changes:
            listed = ", ".join(changes[:CHANGES_LISTED])
            if len(changes) > CHANGES_LISTED:
                listed += f" and {len(changes) - CHANGES_LISTED} more ({len(changes)} files changed)"
            raise ValueError(f"--resume with different data than the run stored in {path.parent}: {listed}; its "
                             "stored scores come from the files as they were: restore them, or score the new data "
                             "in another --out")
        return
    if resumed:
        warnings.warn(f"{path.parent} has no fingerprint.json (a run stored by an older itm-engine): whether its "
                      "stored scores come from the current data cannot be checked; recording the current data's "
                      "fingerprint (start over in another --out if the data changed since)", stacklevel=2)
    storage.atomic_write_text(path, json.dumps(current) + "\n")


def versions() -> dict:
    """The versions of this package and of the libraries that decide its scores."""
    import diffusers
    import transformers

    import itm_engine

    return {"itm_engine": itm_engine.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def print_table(results: list[dict]) -> None:
    """Metrics side by side, one column per scorer."""
    names = list(dict.fromkeys(k for r in results for k in r["metrics"]))
    print(f"\n{results[0]['task']}: {results[0]['counts']['examples']} examples")
    print(f"{'metric':<36}" + "".join(f"{r['scorer']:>14}" for r in results))
    for name in names:
        print(f"{name:<36}" + "".join(f"{r['metrics'].get(name, float('nan')):>14.4f}" for r in results))


def main(argv: list[str] | None = None) -> int:
    parser = options.parser("itm-eval", __doc__.splitlines()[0])
    options.add_options(parser, EvalConfig)
    options.add_options(parser.add_argument_group("protocol fields (each overrides the --protocol preset's)"),
                        protocols.Protocol, default_note="the preset's", exclude=("dtype",))
    options.add_options(parser, EvalRun)
    args = parser.parse_args(argv)
    try:
        config = options.from_args(EvalConfig, args, protocol_fields=options.given(protocols.Protocol, args))
        config.scoring_protocol()  # an invalid combination fails here, before any work
        run = options.from_args(EvalRun, args)
    except ValueError as err:
        print(f"itm-eval: error: {err}", file=sys.stderr)
        return 2
    scorers = config.scorer.split(",")
    bad = [s for s in scorers if s not in SCORERS]
    if bad:
        print(f"itm-eval: unknown scorer(s) {bad}; choose from {SCORERS}", file=sys.stderr)
        return 2
    out = Path(run.out or f"runs/{config.task}")
    config = replace(config, data_root=str(Path(config.data_root).expanduser().resolve()),
                     lora=str(Path(config.lora).expanduser().resolve()) if config.lora else None)
    results = []
    try:
        for scorer in scorers:
            diffusion = scorer == "diffusion"
            one = replace(config, scorer=scorer, lora=config.lora if diffusion else None,
                          lora_scale=config.lora_scale if diffusion else 1.0,
                          adaptive=config.adaptive if diffusion else None)
            result = evaluate(one, out / scorer, resume=run.resume, device=run.device, batch_size=run.batch_size,
                              kernels=run.kernels, progress=None if run.progress else False)
            if result is not None:
                results.append(result)
                print(f"wrote {out / scorer / 'results.json'}")
    except Exception as err:
        code = storage.report_failure("itm-eval", err, out)
        if code is None:
            raise
        return code
    if results:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
