"""The ShapesWorld lab's shared fixture: data roots written by the generator, one per split."""
from __future__ import annotations

import json

import pytest

from itm_engine.shapesworld.world import write_shapesworld


@pytest.fixture(scope="package")
def splits(tmp_path_factory) -> dict[str, dict]:
    """{split: {"root": the data root, **its examples.json}} for train, test and compositional:
    12 examples per subtask, seed 0, 48 px. Tests must not change the files they hold."""
    base = tmp_path_factory.mktemp("shapes")
    out = {}
    for split in ("train", "test", "compositional"):
        root = write_shapesworld(base / split, split=split, n=12, seed=0, size=48)
        out[split] = {"root": root, **json.loads((root / "examples.json").read_text())}
    return out
