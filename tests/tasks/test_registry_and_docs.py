"""Checks across the tasks of itm_engine/tasks/: loading is deterministic, every task class is
documented (description, its on-disk layout), and every task module has its test module here."""
from __future__ import annotations

import pkgutil
from pathlib import Path

import pytest

import itm_engine.tasks
from itm_engine.tasks import get_task

from fixtures import datasets
from fixtures.selfbench_datasets import write_selfbench
from fixtures.spatial_datasets import write_mmvp_vlm, write_spec, write_whatsup

WRITERS = {
    "flickr30k_i2t": datasets.write_flickr30k, "flickr30k_t2i": datasets.write_flickr30k,
    "winoground": datasets.write_winoground, "imagecode": datasets.write_imagecode, "svo": datasets.write_svo,
    "vg_relation": datasets.write_vg_relation, "vg_attribution": datasets.write_vg_attribution,
    "coco_order": datasets.write_coco_order, "flickr30k_order": datasets.write_flickr30k_order,
    "clevr": datasets.write_clevr, "pets": datasets.write_pets, "bias": datasets.write_bias,
    "sugarcrepe": datasets.write_sugarcrepe, "cola": datasets.write_cola, "eqben": datasets.write_eqben,
    "vismin": datasets.write_vismin,
    "selfbench": write_selfbench,
    "whatsup": write_whatsup, "mmvp_vlm": write_mmvp_vlm, "spec": write_spec,
}


@pytest.mark.parametrize("name, writer", WRITERS.items(), ids=list(WRITERS))
def test_deterministic_and_documented(tmp_path, name, writer):
    root = writer(tmp_path / name)
    first, second = get_task(name, root), get_task(name, root)
    assert first.examples == second.examples
    cls = type(first)
    assert cls.description and "Layout" in cls.__doc__


def test_every_task_module_has_a_test_module_and_every_task_a_writer():
    modules = {m.name for m in pkgutil.iter_modules(itm_engine.tasks.__path__)} - {"base"}
    tested = {p.stem.removeprefix("test_") for p in Path(__file__).parent.glob("test_*.py")}
    assert modules <= tested, modules - tested
    tasks = itm_engine.tasks.all_tasks()
    assert {name for name, cls in tasks.items() if cls.__module__.startswith("itm_engine.tasks.")} == set(WRITERS)
