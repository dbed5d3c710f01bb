"""The ShapesWorld generator (`itm_engine.shapesworld.world`): seeded, splits disjoint, captions true
to the pixels and to the scene, one-attribute negatives, hard-negative captions, the writers and
`itm-shapes write`. The `splits` fixture (written data roots) is in conftest.py."""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from itm_engine.shapesworld import cli as shapes_cli
from itm_engine.shapesworld import world
from itm_engine.shapesworld.world import (
    ALL_SUBTASKS,
    COLORS,
    COMPLEXITY,
    HELD_OUT_COMBOS,
    RELATIONS,
    SHAPES,
    SIZES,
    write_shapesworld,
)

PROBED = {"recognition_color": "color", "recognition_shape": "shape", "binding_color_shape": "color",
          "binding_shape_color": "shape", "pair_binding_color": "color", "pair_binding_size": "size",
          "spatial": "position"}
VOCAB = {"color": set(COLORS), "shape": set(SHAPES), "size": set(SIZES),
         "position": {w for r in RELATIONS for w in r.split()}}


def digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "images").iterdir())}


def combos(objects) -> set[tuple[str, str]]:
    return {(o["color"], o["shape"]) for o in objects}


def test_the_same_seed_writes_the_same_files_and_another_seed_does_not(tmp_path, splits):
    again = write_shapesworld(tmp_path / "a", split="test", n=12, seed=0, size=48)
    assert (again / "examples.json").read_text() == (splits["test"]["root"] / "examples.json").read_text()
    assert digests(again) == digests(splits["test"]["root"])
    other = write_shapesworld(tmp_path / "b", split="test", n=12, seed=1, size=48)
    assert digests(other) != digests(again)


def test_train_and_held_out_splits_share_no_image(splits):
    train = set(digests(splits["train"]["root"]).values())
    for split in ("test", "compositional"):
        assert not train & set(digests(splits[split]["root"]).values())
    # structurally, not by luck: every scene, negatives included, sits in its split's placement buckets
    for split, buckets in (("train", range(7)), ("test", range(8, 9)), ("compositional", range(9, 10))):
        for ex in splits[split]["examples"]:
            for objects in [ex["objects"], *(n["objects"] for n in ex["negatives"])]:
                assert world.bucket(tuple(world.Obj(**o) for o in objects)) in buckets


def test_compositional_split_uses_only_held_out_combos_and_train_never_does(splits):
    seen = set()
    for ex in splits["compositional"]["examples"]:
        assert combos(ex["objects"]) <= HELD_OUT_COMBOS
        seen |= combos(ex["objects"])
    assert len(seen) > 3
    for ex in splits["train"]["examples"]:
        for objects in [ex["objects"], *(n["objects"] for n in ex["negatives"])]:
            assert not combos(objects) & HELD_OUT_COMBOS
        assert not any(f"{c} {s}" in text or f"{s} that is {c}" in text for c, s in HELD_OUT_COMBOS
                       for text in [ex["caption"], *(n["caption"] for n in ex["negatives"])])


def test_captions_match_the_drawn_pixels(splits):
    root = splits["test"]["root"]
    for ex in splits["test"]["examples"]:
        image = PIL.Image.open(root / ex["image"]).convert("RGB")
        array = np.asarray(image)
        pixels = Counter(map(tuple, array.reshape(-1, 3).tolist()))
        pixels.pop(world.BACKGROUND)
        drawn = {rgb for rgb, _ in pixels.most_common()}
        assert drawn == {COLORS[o["color"]] for o in ex["objects"]}  # no anti-aliasing: exact colours only
        if ex["subtask"].startswith("recognition"):
            colour, shape = ex["caption"].split()[2:]
            assert pixels.most_common(1)[0][0] == COLORS[colour] and shape == ex["objects"][0]["shape"]
        if ex["subtask"] == "pair_binding_size":  # the caption's large object covers more pixels
            words = ex["caption"].split()
            large, small = (words[2], words[7]) if words[1] == "large" else (words[7], words[2])
            assert pixels[COLORS[large]] > pixels[COLORS[small]]
        if ex["subtask"] == "spatial":  # the caption's relation holds between the colours' centroids
            a, b = (ex["objects"][0]["color"], ex["objects"][1]["color"])
            (ay, ax), (by, bx) = (np.argwhere((array == COLORS[c]).all(-1)).mean(0) for c in (a, b))
            relation = next(r for r in RELATIONS if f" {r} " in ex["caption"])
            holds = {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[relation]
            assert holds and (abs(ax - bx) > abs(ay - by)) == relation.endswith(" of")


def test_each_negative_differs_from_the_positive_in_exactly_the_probed_attribute(splits):
    for split in ("train", "test", "compositional"):
        for ex in splits[split]["examples"]:
            if ex["subtask"] == COMPLEXITY:
                continue
            probed = PROBED[ex["subtask"]]
            for neg in ex["negatives"]:
                pos_words, neg_words = ex["caption"].split(), neg["caption"].split()
                changed = [(p, n) for p, n in zip(pos_words, neg_words) if p != n]
                assert len(pos_words) == len(neg_words) and changed
                assert all(p in VOCAB[probed] and n in VOCAB[probed] for p, n in changed), (ex, neg)
                for p, n in zip(ex["objects"], neg["objects"]):  # the scenes too
                    keys = {"position": ("x", "y")}.get(probed, (probed,))
                    same = {k: v for k, v in n.items() if k not in keys}
                    assert {k: v for k, v in p.items() if k not in keys} == same
        assert {ex["subtask"] for ex in splits[split]["examples"]} == set(ALL_SUBTASKS)


def test_complexity_pairs_two_objects_with_one_of_them_alone(splits):
    for split in ("train", "test", "compositional"):
        rows = [ex for ex in splits[split]["examples"] if ex["subtask"] == COMPLEXITY]
        assert len(rows) == 12
        for ex in rows:
            (neg,) = ex["negatives"]
            one, two = sorted((ex["objects"], neg["objects"]), key=len)
            assert len(one) == 1 and len(two) == 2 and one[0] in two  # the same object, in the same place
            for row in (ex, neg):  # captions in the recognition / binding forms of their scenes
                objs = row["objects"]
                expected = (f"a {objs[0]['size']} {objs[0]['color']} {objs[0]['shape']}" if len(objs) == 1 else
                            f"a {objs[0]['color']} {objs[0]['shape']} and a {objs[1]['color']} {objs[1]['shape']}")
                assert row["caption"] == expected
        assert {len(ex["objects"]) for ex in rows} == {1, 2}  # the positive is the simpler image or not


def test_recognition_negatives_cover_every_other_value_outside_train(splits):
    for ex in splits["test"]["examples"]:
        if ex["subtask"] == "recognition_color":
            assert len(ex["negatives"]) == len(COLORS) - 1
        if ex["subtask"] == "recognition_shape":
            assert len(ex["negatives"]) == len(SHAPES) - 1


def test_training_captions_are_true_of_their_scene():
    rng = random.Random(0)
    for _ in range(20):
        scene, _ = world.sample_example(rng, "spatial", "train")
        forms = world.training_captions(scene)
        a, b = scene
        assert set(forms) - {"position"} == {"binding", "pair", "spatial"}
        for text in forms.get("position", []):  # absolute places agree with the relation
            first = scene[0] if text.startswith(f"a {a.color} {a.shape}") else scene[1]
            assert world.place(first) in text.split(" and ")[0]
        if world.relation(a, b) == "left of" and "position" in forms:
            assert forms["position"][0].split(" and ")[0].endswith("on the left") or "at the" in forms["position"][0]
        assert forms["spatial"] == [f"a {a.color} {a.shape} {world.relation(a, b)} a {b.color} {b.shape}",
                                    f"a {b.color} {b.shape} {world.relation(b, a)} a {a.color} {a.shape}"]
        converse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        assert world.relation(b, a) == converse[world.relation(a, b)]
    one, _ = world.sample_example(rng, "recognition_shape", "train")
    assert world.training_captions(one)["recognition"] == [world.caption(one, "recognition_color")]
    o = world.Obj("red", "circle", "small", 10, 30)
    assert world.training_captions((o,))["position"] == ["a small red circle on the left"]
    assert world.place(world.Obj("red", "circle", "small", 33, 60)) == "at the bottom"
    assert world.place(world.Obj("red", "circle", "small", 33, 36)) is None
    assert "position" not in world.training_captions((world.Obj("red", "circle", "small", 33, 36),))


def test_image_size_is_an_option(tmp_path):
    root = write_shapesworld(tmp_path, n=1, size=32, subtasks=("spatial",))
    assert PIL.Image.open(next((root / "images").iterdir())).size == (32, 32)
    with pytest.raises(ValueError, match="unknown split"):
        write_shapesworld(tmp_path, split="nope")
    with pytest.raises(ValueError, match="unknown split"):
        world.sample_example(random.Random(0), "spatial", "nope")


def test_cli_writes_a_data_root(tmp_path, capsys):
    assert shapes_cli.main(["write", "--out", str(tmp_path), "--n", "1", "--split", "val", "--size", "32"]) == 0
    data = json.loads((tmp_path / "examples.json").read_text())
    assert data["split"] == "val" and data["size"] == 32 and len(data["examples"]) == len(ALL_SUBTASKS)
    assert "wrote 8 val examples" in capsys.readouterr().out


def test_negclip_tsv_reads_as_hardneg_training_data(splits):
    from itm_engine.hardneg.data import read_pairs

    path = world.write_negclip_tsv(splits["train"]["root"])
    pairs = read_pairs(path)
    examples = splits["train"]["examples"]
    assert len(pairs) == sum(1 + len(ex["negatives"]) for ex in examples)
    row = 0
    for ex in examples:
        positive = pairs[row]
        assert positive.caption == ex["caption"] and positive.image.endswith(ex["image"])
        assert list(positive.neg_captions) == [n["caption"] for n in ex["negatives"]]
        assert [pairs[j].caption for j in positive.neg_images] == [n["caption"] for n in ex["negatives"]]
        for j in positive.neg_images:
            assert pairs[j].neg_images == (row,) and pairs[j].neg_captions == (ex["caption"],)
        row += 1 + len(ex["negatives"])


def test_hard_negative_captions_describe_the_swapped_scenes():
    """Pretraining's hard negatives: the caption of the swapped-position scene when the caption says
    where things are, else of the swapped-colour or swapped-size scene (the pair subtasks'
    negatives); for one object without a place, of another shape (recognition_shape's negatives)."""
    rng = random.Random(0)
    for _ in range(30):
        scene, (flipped,) = world.sample_example(rng, "spatial", "train")
        assert world.hard_negative_caption(world.caption(scene, "spatial"), rng) == world.caption(flipped, "spatial")
        sized, (resized,) = world.sample_example(rng, "pair_binding_size", "train")  # sizes differ
        recolored = world._negatives(sized, "pair_binding_color")[0]
        drawn = {world.hard_negative_caption(world.caption(sized, "pair_binding_size"), rng) for _ in range(40)}
        held_out = any((o.color, o.shape) in HELD_OUT_COMBOS for o in recolored)  # never named, even as a negative
        assert drawn == {world.caption(resized, "pair_binding_size")} | \
            (set() if held_out else {world.caption(recolored, "pair_binding_size")})
    named = {world.hard_negative_caption(caption, rng) for _ in range(300)
             for caption in world.training_captions(world.sample_example(rng, "spatial")[0])["binding"]}
    assert named - {None} and not any(f"{c} {s}" in n or f"{s} that is {c}" in n
                                      for n in named - {None} for c, s in HELD_OUT_COMBOS)
    scenes = [world.sample_example(rng, "binding_color_shape")[0] for _ in range(20)]
    for forms in (world.training_captions(s) for s in scenes):
        for caption in forms.get("position", []):
            negative = world.hard_negative_caption(caption, rng)
            assert negative != caption and len(negative.split()) == len(caption.split())
    for _ in range(30):  # one object: the other-shape scene of recognition_shape, never a held-out combination
        scene, negatives = world.sample_example(rng, "recognition_shape", "train")
        drawn = {world.hard_negative_caption(world.caption(scene, "recognition_color"), rng) for _ in range(60)}
        assert drawn == {c for c in (world.caption(n, "recognition_color") for n in negatives)
                         if not world._names_held_out_combo(c.split())}
    assert world.hard_negative_caption("", rng) is None
    assert world.hard_negative_caption("a small red circle on the left", rng) == "a small red circle on the right"
    assert world.hard_negative_caption("a red circle at the top", rng) == "a red circle at the bottom"


def test_nearest_shape_negatives_name_the_shape_nearest_in_pixels():
    """`nearest_share` of the one-object negatives name `NEAREST_SHAPE`, the shape nearest the true
    one in a small object's pixels at 32 px under the varied renderer (measured here), unless that
    names a held-out combination; the rest any other shape; captions with a place keep their flip."""
    from itm_engine.cache import resize_image

    rng = random.Random(3)
    distance = np.zeros((len(world.SHAPES), len(world.SHAPES)))
    for k in range(60):
        color, x, y = rng.choice(list(world.COLORS)), rng.randint(12, 52), rng.randint(12, 52)
        style = world.style_for("varied", f"nearest:{k}")
        pixels = np.stack([np.asarray(resize_image(world.render((world.Obj(color, shape, "small", x, y),), 64, style),
                                                   32), dtype=np.float64) for shape in world.SHAPES])
        distance += np.linalg.norm((pixels[:, None] - pixels[None]).reshape(len(world.SHAPES), len(world.SHAPES), -1),
                                   axis=-1)
    np.fill_diagonal(distance, np.inf)
    assert {shape: world.SHAPES[int(distance[i].argmin())] for i, shape in enumerate(world.SHAPES)} \
        == world.NEAREST_SHAPE
    drawn = Counter(world.hard_negative_caption("a small red cross", rng, nearest_share=0.5) for _ in range(2000))
    assert set(drawn) == {f"a small red {s}" for s in world.SHAPES
                          if s != "cross" and ("red", s) not in HELD_OUT_COMBOS}
    assert 0.59 < drawn["a small red diamond"] / 2000 < 0.74  # 1/2 + 1/2 x 1/3 (red triangle is held out)
    assert {world.hard_negative_caption("a small red cross", rng, nearest_share=1.0) for _ in range(50)} \
        == {"a small red diamond"}
    held_out = {world.hard_negative_caption("a small orange cross", rng, nearest_share=1.0) for _ in range(200)}
    assert held_out == {"a small orange circle", "a small orange square", "a small orange triangle"}
    assert world.hard_negative_caption("a small red cross on the left", rng, 1.0) == "a small red cross on the right"


def test_later_object_side_names_the_second_object_and_the_converse_relation():
    """For the layout objective: in every spatial caption, the word positions of the second-named
    object's colour and shape, and the relation of that object to the first (the scene's own
    `relation`, read the other way); None for the other grammar forms."""
    rng = random.Random(1)
    seen = set()
    for _ in range(60):
        scene, _ = world.sample_example(rng, "spatial", "train")
        text = world.caption(scene, "spatial")
        positions, side = world.later_object_side(text)
        words = text.split()
        assert [words[i] for i in positions] == [scene[1].color, scene[1].shape]
        assert world.RELATIONS[side] == world.relation(scene[1], scene[0])
        seen.add(side)
        for form, captions in world.training_captions(scene).items():
            assert all((world.later_object_side(c) is None) == (form != "spatial") for c in captions)
    assert seen == {0, 1, 2, 3}
    assert world.later_object_side("a red circle left of a blue") is None
    assert world.later_object_side("a red circle on the left of a blue square") is None


def test_draw_scenes_are_the_examples_the_writer_writes(splits):
    """`draw_scenes(Draw(...))` gives the scenes of `write_shapesworld` with the same draw, in order."""
    drawn = world.draw_scenes(world.Draw("test", n=12, seed=0, size=48))
    written = [(ex["subtask"], ex["objects"], [neg["objects"] for neg in ex["negatives"]])
               for ex in splits["test"]["examples"]]
    assert [(subtask, [asdict(o) for o in scene], [[asdict(o) for o in neg] for neg in negatives])
            for subtask, scene, negatives in drawn] == written



def test_the_varied_renderer_varies_exactly_the_nuisances():
    """Background grey, colour shades, object sizes and anti-aliased edges vary within their
    bounds; the scene (what the caption says) does not."""
    rng = random.Random(0)
    scene = (world.Obj("red", "square", "large", 20, 32), world.Obj("blue", "circle", "small", 46, 32))
    exact = np.asarray(world.render(scene), dtype=int)
    greys, areas = set(), []
    for k in range(40):
        style = world.varied_style(rng)
        image = np.asarray(world.render(scene, style=style), dtype=int)
        assert world.VARIED_GREYS[0] <= style.background <= world.VARIED_GREYS[1]
        assert (image[0, 0] == style.background).all()
        greys.add(style.background)
        for obj, shade, scale in zip(scene, style.shades, style.scales):
            assert all(abs(d) <= world.VARIED_SHADE for d in shade) and abs(scale - 1) <= world.VARIED_SCALE
            centre = image[obj.y, obj.x]
            expected = np.clip(np.add(COLORS[obj.color], shade), 0, 255)
            assert np.abs(centre - expected).max() <= 1  # an object's inside: its shaded colour
        colours = {tuple(p) for p in image.reshape(-1, 3)}
        assert len(colours) > 3  # anti-aliased edges blend object and background
        red = np.abs(image - image[32, 20]).sum(-1) <= 3
        areas.append(red.sum() / (np.abs(exact - exact[32, 20]).sum(-1) == 0).sum())
        # the objects stay where the scene puts them: the caption's relation holds
        assert np.argwhere(red)[:, 1].mean() < 32
    assert len(greys) > 10 and min(areas) < 0.9 and max(areas) > 1.1  # sizes vary both ways (up to +-12%)


def test_a_style_key_always_gives_the_same_style_and_exact_is_the_plain_renderer():
    assert world.style_for("varied", "test:0:spatial_00001") == world.style_for("varied", "test:0:spatial_00001")
    assert world.style_for("varied", "test:0:spatial_00001") != world.style_for("varied", "test:0:spatial_00002")
    assert world.style_for("exact", "anything") == world.EXACT
    with pytest.raises(ValueError, match="style must be one of"):
        world.style_for("shiny", "x")
    with pytest.raises(ValueError, match="style must be one of"):
        world.Draw("test", 2, style="shiny")
