"""`itm-train timestep-weights`: learn a timestep weighting from a few labelled examples of a task.

    itm-train timestep-weights --task shapes --data-root DIR --train 40 --val 40 --out weights.json

The task's examples are split once by `--split-seed` into train (`--train` examples), validation
(`--val`) and test (all the others), and never mixed: every example's per-draw scores
(`DiffusionITM.draw_scores`, [candidates, S]) are computed once; each candidate weighting is fitted
on the train split by minimising the cross-entropy of the correct candidate with

    logits_c = tau * sum_s w(u_s) d_{c,s} / sum_s w(u_s)        (d = -error; tau > 0 learnt with it)

and the validation split alone chooses among them (accuracy, then loss); the test split is only
reported. Candidate weightings (`--curves`, each at every `--l2`):

- "per-timestep": one positive weight per draw position of the protocol's schedule (which must be
  the same for every query: a shared bank of a fixed schedule);
- "polyD": log w(u) a polynomial of degree D in 2u - 1 (a smooth curve that also weights timesteps
  between and beyond the fitted ones);

and the plain mean ("uniform"), so a fit that does not beat uniform on validation is not taken. The
file (`itm_engine.timestep_weights`: "knots", the record of the fit with the split sizes and ids,
and train / validation / test accuracy of uniform, the chosen weighting and the named training-free
curves) is what `--timestep-weights FILE` and `timestep_weights=FILE` apply.
"""
from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from typing import Sequence

import torch

from itm_engine import options, protocols
from itm_engine.evaluate import EvalConfig, build_scorer, example_pairs, load_task
from itm_engine.options import option
from itm_engine.protocols import Protocol
from itm_engine.tasks.base import Example
from itm_engine.timestep_weights import NAMED, UNIFORM, Knots, named_knots, normalised, save_weights, weights_at

CURVE_KNOTS = 101  # knots a smooth curve is written with: u = 0, 0.01, ..., 1


@dataclass
class FitConfig:
    """Options of the fit (the task, model and protocol come from itm-eval's options)."""

    out: str = option(help="the weights file to write (JSON)")
    train: int = option(help="labelled examples to fit on")
    val: int = option(help="labelled examples that choose among the fitted weightings")
    split_seed: int = option(0, help="seed of the train / validation / test split of the task's examples")
    curves: tuple[str, ...] = option(("per-timestep", "poly2", "poly4"),
                                     help="weightings to fit: per-timestep and/or polyD (D = degree)")
    l2: tuple[float, ...] = option((0.0, 0.01, 0.1), help="L2 penalties on the log weights, each tried")
    steps: int = option(400, help="full-batch Adam steps per fit")


@dataclass
class LabelledDraws:
    """Per-draw scores of labelled examples, padded to the largest candidate count.

    Attributes:
        scores: float64 [N, C, S], d = -error per candidate and draw (padding: 0).
        mask: bool [N, C], True for real candidates.
        labels: long [N], the index of each example's correct candidate.
        u: float64 [S], t / T of each draw.
        ids: the examples' ids.
    """

    scores: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    u: torch.Tensor
    ids: list[str]

    def subset(self, index: Sequence[int]) -> LabelledDraws:
        index_t = torch.as_tensor(list(index), dtype=torch.long)
        return LabelledDraws(self.scores[index_t], self.mask[index_t], self.labels[index_t], self.u,
                             [self.ids[i] for i in index])


def labelled_draws(scorer, examples: Sequence[Example], mode: str, protocol: Protocol) -> LabelledDraws:
    """Score every image against every text of each example under `protocol` (no weighting, one
    shared bank) in one `draw_scores` call; the candidates of an example are its flattened
    [n_images, n_texts] matrix and `label` indexes it (as `Task.correct` reads it)."""
    if protocol.noise != "shared":
        raise ValueError("timestep weights are fitted on one shared bank of draws (protocol noise 'shared'): the "
                         "weight of each draw position must mean the same timestep for every query")
    protocol = protocol.replace(timestep_weights=None)
    sizes = [len(example.images) * len(example.texts) for example in examples]
    for example, size in zip(examples, sizes):
        if isinstance(example.label, bool) or not isinstance(example.label, int) or not 0 <= example.label < size:
            raise ValueError(f"example {example.id!r} names no correct candidate (label {example.label!r}): timestep "
                             "weights are fitted on tasks whose examples have one")
    images, texts, pairs, _ = example_pairs(examples)
    flat = scorer.draw_scores(images, texts, pairs, mode, protocol=protocol).double()  # [P, S]
    bank = scorer.noise_bank(protocol=protocol)
    C = max(sizes)
    scores = torch.zeros(len(examples), C, flat.shape[1], dtype=torch.float64)
    mask = torch.zeros(len(examples), C, dtype=torch.bool)
    for n, chunk in enumerate(flat.split(sizes)):
        scores[n, : len(chunk)], mask[n, : len(chunk)] = chunk, True
    u = bank.timesteps.double() / scorer.components.process.num_train_timesteps
    return LabelledDraws(scores, mask, torch.tensor([e.label for e in examples]), u, [e.id for e in examples])


def split_indices(n: int, train: int, val: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    """(train, validation, test) indices of n examples: a permutation by `seed`, cut in that order;
    the test split is every example left and must not be empty."""
    for name, size in (("train", train), ("val", val)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"--{name} must be a positive integer, got {size!r}")
    if train + val >= n:
        raise ValueError(f"--train {train} + --val {val} leave no test examples out of {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:train]), sorted(order[train:train + val]), sorted(order[train + val:])


def accuracy(draws: LabelledDraws, weights: torch.Tensor | None, ties: str) -> float:
    """Fraction of examples whose correct candidate wins the weighted mean over draws (`weights`
    [S] or None: the plain mean) under the tie policy (`metrics.is_correct`)."""
    from itm_engine.metrics import is_correct

    scores = draws.scores.mean(-1) if weights is None else (draws.scores * weights).sum(-1) / weights.sum()
    return sum(is_correct(s[m], int(y), ties) for s, m, y in zip(scores, draws.mask, draws.labels)) / len(draws.ids)


def _basis(curve: str, u: torch.Tensor) -> torch.Tensor | None:
    """[len(u), D] polynomial features (2u - 1)^1..D of "polyD" (D = 0 for "uniform": no
    parameter, the plain mean); None for "per-timestep"."""
    if curve == "per-timestep":
        return None
    if curve == "uniform":
        return torch.zeros(len(u), 0, dtype=torch.float64)
    degree = curve.removeprefix("poly")
    if not curve.startswith("poly") or not degree.isdigit() or int(degree) < 1:
        raise ValueError(f"unknown curve {curve!r}: per-timestep or polyD (D >= 1)")
    x = 2 * u - 1
    return torch.stack([x**k for k in range(1, int(degree) + 1)], dim=1)


def fit(draws: LabelledDraws, curve: str, l2: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one weighting on `draws`: (log weights at the draws' u, mean 1 [S]; log tau)."""
    basis = _basis(curve, draws.u)
    params = torch.zeros(draws.u.shape[0] if basis is None else basis.shape[1], dtype=torch.float64,
                         requires_grad=True)
    spread = draws.scores.mean(-1)[draws.mask].std().clamp_min(1e-12)
    log_tau = torch.tensor(math.log(1.0 / float(spread)), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([params, log_tau], lr=0.05)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = _loss(draws, _log_weights(params, basis), log_tau) + l2 * (params**2).mean()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return _log_weights(params, basis), log_tau.detach()


def _log_weights(params: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    log_w = params if basis is None else basis @ params
    return log_w - torch.logsumexp(log_w, 0) + math.log(len(log_w))  # weights of mean 1


def _loss(draws: LabelledDraws, log_w: torch.Tensor, log_tau: torch.Tensor) -> torch.Tensor:
    logits = log_tau.exp() * (draws.scores * log_w.exp()).mean(-1)
    logits = logits.masked_fill(~draws.mask, -math.inf)
    return torch.nn.functional.cross_entropy(logits, draws.labels)


def curve_knots(curve: str, log_w: torch.Tensor, params_u: torch.Tensor) -> Knots:
    """The knots of a fitted weighting: at the draws' u for "per-timestep"; for "polyD", the
    polynomial through the fitted log weights re-evaluated on u = 0, 0.01, ..., 1."""
    if curve == "per-timestep":
        return normalised(tuple((float(u), float(w)) for u, w in zip(params_u, log_w.exp())))
    basis = _basis(curve, params_u)
    coefficients = torch.linalg.lstsq(basis, (log_w - log_w.mean()).unsqueeze(1)).solution.squeeze(1)
    grid = torch.linspace(0, 1, CURVE_KNOTS, dtype=torch.float64)
    return normalised(tuple((float(u), float(w)) for u, w in zip(grid, (_basis(curve, grid) @ coefficients).exp())))


def fit_weights(draws: LabelledDraws, train: Sequence[int], val: Sequence[int], test: Sequence[int],
                config: FitConfig, ties: str) -> tuple[Knots | None, dict]:
    """Fit every (curve, l2) on `train`, choose by `val` (uniform included); (the chosen knots,
    None for uniform; the record: candidates, choice, and every weighting's accuracy per split,
    `test` reported only, and left out when empty). Uniform is fitted too (its temperature alone),
    so that its validation loss is comparable."""
    splits = {"train": draws.subset(train), "val": draws.subset(val)}
    if test:
        splits["test"] = draws.subset(test)
    weights_of: dict[str, torch.Tensor | None] = {}
    candidates = []
    for curve, l2 in [("uniform", 0.0)] + [(c, l2) for c in config.curves for l2 in config.l2]:
        log_w, log_tau = fit(splits["train"], curve, l2, config.steps)
        knots = None if curve == "uniform" else curve_knots(curve, log_w, draws.u)
        name = "uniform" if curve == "uniform" else f"{curve}, l2 {l2:g}"
        weights_of[name] = None if knots is None else weights_at(knots, draws.u)
        log_val = torch.zeros_like(draws.u) if knots is None else weights_of[name].log()
        with torch.no_grad():
            val_loss = float(_loss(splits["val"], log_val, log_tau))
        candidates.append({"weighting": name, "knots": knots,
                           "train_accuracy": accuracy(splits["train"], weights_of[name], ties),
                           "val_accuracy": accuracy(splits["val"], weights_of[name], ties), "val_loss": val_loss})
    # validation accuracy, then validation loss (uniform's with its own fitted temperature)
    best = max(candidates, key=lambda c: (c["val_accuracy"], -c["val_loss"]))
    for name in NAMED:
        weights_of[name] = weights_at(named_knots(name), draws.u)
    table = {name: {split: accuracy(part, weights, ties) for split, part in splits.items()}
             for name, weights in {"uniform": None, "chosen": weights_of[best["weighting"]],
                                   **{n: weights_of[n] for n in NAMED}}.items()}
    record = {"chosen": best["weighting"], "accuracy": table,
              "candidates": [{k: v for k, v in c.items() if k != "knots"} for c in candidates],
              "sizes": {split: len(part.ids) for split, part in splits.items()},
              "ids": {split: part.ids for split, part in splits.items() if split != "test"}}
    return best.get("knots"), record


def main(argv: list[str] | None = None) -> int:
    """`itm-train timestep-weights [options]`."""
    parser = options.parser("itm-train timestep-weights", __doc__.splitlines()[0])
    options.add_options(parser, FitConfig)
    options.add_options(parser, EvalConfig, exclude=("scorer", "adaptive", "candidates", "prefilter", "topk",
                                                     "clip_model", "clip_pretrained", "clip_config", "chunk_size",
                                                     "skip_missing"))
    options.add_options(parser.add_argument_group("protocol fields (each overrides the --protocol preset's)"),
                        protocols.Protocol, default_note="the preset's", exclude=("dtype", "timestep_weights"))
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    parser.add_argument("--batch-size", default=64, type=options.parse_batch_size, help="UNet work items per call")
    args = parser.parse_args(argv)
    try:
        fit_config = options.from_args(FitConfig, args)
        config = options.from_args(EvalConfig, args, protocol_fields=options.given(protocols.Protocol, args))
        protocol = config.scoring_protocol()
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              "cpu" if args.device == "auto" else args.device)
        task, _ = load_task(config, device)
        mode = task.modes[0] if config.mode == "auto" else config.mode
        examples = task.examples[: config.limit] if config.limit else task.examples
        train, val, test = split_indices(len(examples), fit_config.train, fit_config.val, fit_config.split_seed)
        scorer = build_scorer(config, device, args.batch_size, None)
        draws = labelled_draws(scorer, examples, mode, protocol)
        knots, record = fit_weights(draws, train, val, test, fit_config, protocol.ties)
    except (ValueError, FileNotFoundError) as err:
        print(f"itm-train timestep-weights: error: {err}", file=sys.stderr)
        return 2
    record = {"task": config.task, "task_options": config.task_options, "mode": mode, "model": config.model,
              "protocol": {k: v for k, v in protocol.as_dict().items() if k != "timestep_weights"},
              "split_seed": fit_config.split_seed, "command": " ".join(["itm-train timestep-weights", *sys.argv[2:]]),
              **record}
    save_weights(fit_config.out, knots or UNIFORM, record)  # uniform chosen: the file applies the plain mean
    _print_summary(record, fit_config.out)
    return 0


def _print_summary(record: dict, out: str) -> None:
    sizes = record["sizes"]
    print(f"split: train {sizes['train']}, val {sizes['val']}, test {sizes['test']} examples; chosen by val: "
          f"{record['chosen']}")
    print(f"{'weighting':<16}" + "".join(f"{split:>8}" for split in ("train", "val", "test")))
    for name, row in record["accuracy"].items():
        print(f"{name:<16}" + "".join(f"{100 * row[split]:7.1f}%" for split in ("train", "val", "test")))
    print(f"wrote {out}")
