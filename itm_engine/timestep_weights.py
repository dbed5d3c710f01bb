"""Timestep weights: a pair's score as a weighted mean over its draws, by where each draw's timestep lies.

A weighting is a curve w(u) >= 0 over the normalised timestep u = t / T in [0, 1], t being a draw's
model timestep (the DDPM step, or T sigma under flow matching, so that there u = sigma), given as
knots ((u_1, w_1), ..., (u_K, w_K)) with u increasing: linear between knots, constant beyond the
first and the last. Under a weighting the score of a pair over S draws is

    sum_s w(u_s) d_s / sum_s w(u_s)        (d_s: the draw's score, -err or -(err - null err))

instead of the plain mean (no weighting: `Protocol.timestep_weights` None). A weighting is one
field of the protocol, `timestep_weights`, given as

- a named, training-free curve (`NAMED`): "logit-normal", the density of SD3's training timesteps
  (sigma logit-normal with mean 0 and scale 1, Esser et al. 2024), the weighting its loss
  effectively gives each noise level;
- a file written by `itm-train timestep-weights` (`itm_engine.fit_timestep_weights`): JSON with
  "format" `FORMAT`, the "knots" and the record of the fit (task, splits, accuracies);
- the knots themselves.

Whatever the form, the protocol holds the knots, so a run's config.json and results.json record
the weights themselves, not a path.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

Knots = tuple[tuple[float, float], ...]
FORMAT = "itm-engine timestep weights"
NAMED_KNOTS = 101  # knots of a named curve: u = 0, 0.01, ..., 1
UNIFORM: Knots = ((0.0, 1.0), (1.0, 1.0))  # the plain mean, as knots


def logit_normal(u: float, mean: float = 0.0, scale: float = 1.0) -> float:
    """The logit-normal density at u in [0, 1] (0 at the ends)."""
    if u <= 0.0 or u >= 1.0:
        return 0.0
    logit = math.log(u / (1.0 - u))
    return math.exp(-((logit - mean) ** 2) / (2 * scale**2)) / (scale * math.sqrt(2 * math.pi) * u * (1.0 - u))


NAMED = {"logit-normal": logit_normal}


def named_knots(name: str) -> Knots:
    """The knots of the named curve `name` (`NAMED`) on u = 0, 0.01, ..., 1, normalised to mean 1."""
    if name not in NAMED:
        raise ValueError(f"unknown named timestep weighting {name!r}; named: {', '.join(NAMED)} (or a weights file)")
    us = [k / (NAMED_KNOTS - 1) for k in range(NAMED_KNOTS)]
    return normalised(tuple((u, NAMED[name](u)) for u in us))


def normalised(knots: Knots) -> Knots:
    """`knots` with the weights scaled to mean 1 (the scale of a weighting changes no score)."""
    mean = sum(w for _, w in knots) / len(knots)
    return tuple((u, w / mean) for u, w in knots)


def as_knots(value: Any) -> Knots | None:
    """A weighting as its knots, checked: None (no weighting), a name of `NAMED`, a weights file
    (str or path), or a sequence of (u, w) pairs with 0 <= u <= 1 strictly increasing, w >= 0
    finite and not all 0. Raises ValueError naming what is wrong."""
    if value is None:
        return None
    if isinstance(value, os.PathLike) or isinstance(value, str):
        if str(value) in NAMED:
            return named_knots(str(value))
        return read_weights(value)[0]
    if isinstance(value, (list, tuple)) and value and all(isinstance(k, (list, tuple)) and len(k) == 2 for k in value):
        knots = tuple((_number(u, "u"), _number(w, "w")) for u, w in value)
        us, ws = [u for u, _ in knots], [w for _, w in knots]
        if us[0] < 0 or us[-1] > 1 or any(b <= a for a, b in zip(us, us[1:])):
            raise ValueError(f"timestep_weights: the knots' u must increase strictly within [0, 1], got {us}")
        if any(w < 0 for w in ws) or not any(w > 0 for w in ws):
            raise ValueError("timestep_weights: the weights must be >= 0 and not all 0")
        return knots
    raise ValueError(f"timestep_weights must be None, a named curve ({', '.join(NAMED)}), a weights file or a "
                     f"sequence of (u, w) pairs, got {value!r:.80}")


def parse_weights(text: str) -> Knots | None:
    """The command-line form of `timestep_weights`: a named curve or a weights file."""
    import argparse

    try:
        return as_knots(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"timestep_weights: knot {name} must be a finite number, got {value!r}")
    return float(value)


def weights_at(knots: Knots, u: torch.Tensor) -> torch.Tensor:
    """The curve at each draw's u = t / T, float64 [S], scaled to mean 1 over these S draws (so the
    mean of w_s d_s over them is the weighted mean); draws all of weight 0 are a ValueError.

    u: [S], e.g. a noise bank's model timesteps / T.
    """
    us = torch.tensor([k[0] for k in knots], dtype=torch.float64)
    ws = torch.tensor([k[1] for k in knots], dtype=torch.float64)
    u = u.double().clamp(float(us[0]), float(us[-1]))
    if len(us) == 1:
        w = ws.expand(len(u)).clone()
    else:
        right = torch.searchsorted(us, u, right=True).clamp(1, len(us) - 1)
        left = right - 1
        frac = ((u - us[left]) / (us[right] - us[left])).clamp(0, 1)
        w = ws[left] + frac * (ws[right] - ws[left])
    total = w.sum()
    if not total > 0:
        raise ValueError("timestep_weights give every draw of the bank weight 0 (its timesteps lie where the curve "
                         "is 0)")
    return w * len(w) / total


def save_weights(path: str | os.PathLike, knots: Knots, record: dict) -> Path:
    """Write a weights file (atomically): {"format", "knots": [[u, w], ...], **record}."""
    from itm_engine import storage

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.atomic_write_text(path, json.dumps({"format": FORMAT, "knots": [list(k) for k in knots], **record},
                                               indent=1) + "\n")
    return path


def read_weights(path: str | os.PathLike) -> tuple[Knots, dict]:
    """(knots, the whole record) of a weights file; errors name the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"timestep_weights: {str(path)!r} is neither a file nor a named curve "
                         f"({', '.join(NAMED)})")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"timestep_weights: {path}: not a JSON weights file ({err})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"timestep_weights: {path}: not a weights file of itm-train timestep-weights "
                         f"(no \"format\": {FORMAT!r})")
    try:
        knots = as_knots(record.get("knots"))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if knots is None:
        raise ValueError(f"timestep_weights: {path}: no knots")
    return knots, record
