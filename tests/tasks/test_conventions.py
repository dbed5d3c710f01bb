"""Where a benchmark's reference code made a choice, the tasks follow the protocol's conventions:
the DiffusionITM research code's (McGill-NLP/diffusion-itm) or Diffusion Classifier's prompts,
splits, files and statistics, and the formats they read (Winoground as the Hugging Face dataset
ships it)."""
from __future__ import annotations

import json

import PIL.Image
import pytest
import torch

from itm_engine.protocols import PRESETS, Protocol
from itm_engine.tasks import get_task
from itm_engine.tasks.base import ZipMember, load_image_ref
from itm_engine.tasks.pets import DIFFUSION_CLASSIFIER_PROMPTS, DIFFUSION_ITM_CLASSES

from fixtures import datasets

ITM = PRESETS["diffusion-itm"]
DC = PRESETS["diffusion-classifier"]


def test_pets_prompts_per_conventions(tmp_path):
    root = datasets.write_pets(tmp_path)
    engine = get_task("pets", root)
    assert engine.examples[0].texts == ("a photo of a abyssinian, a type of pet.",
                                        "a photo of a american bulldog, a type of pet.",
                                        "a photo of a bengal, a type of pet.")
    itm = get_task("pets", root, protocol=ITM)
    texts = itm.examples[0].texts
    assert len(texts) == 37 and texts[0] == "a photo of a american pit bull terrier"  # classes.txt order
    assert texts[itm.examples[0].label] == "a photo of a abyssinian"
    assert [ex.label for ex in itm.examples] == [DIFFUSION_ITM_CLASSES.index(b) for b in
                                                 ["abyssinian"] * 3 + ["american bulldog", "bengal"]]
    dc = get_task("pets", root, protocol=DC)
    assert dc.split == "test" and [ex.id for ex in dc.examples] == ["Bengal_3", "Abyssinian_12", "american_bulldog_10"]
    texts = dc.examples[0].texts
    assert texts[dc.examples[0].label] == "a photo of a Bengal cat, a type of pet."
    assert texts[1] == "a photo of a American Bulldog, a type of pet."  # the CSV's own irregular prompt
    assert len(DIFFUSION_CLASSIFIER_PROMPTS) == 37


def test_argmax_first_ties_follow_the_class_order(tmp_path):
    root = datasets.write_pets(tmp_path)
    itm = get_task("pets", root, protocol=ITM)
    tied = [torch.ones(1, 37) for _ in itm.examples]  # every class ties: the first class wins
    assert itm.metrics(itm.examples, {"i2t": tied})["accuracy"] == 0.0
    strict = get_task("pets", root, protocol=ITM.replace(ties="strict"))
    scores = [torch.zeros(1, 37).index_fill_(1, torch.tensor([ex.label, 36]), 1.0) for ex in strict.examples]
    # the label ties with class 36, which comes later: right under argmax-first, wrong under strict
    assert itm.metrics(itm.examples, {"i2t": scores})["accuracy"] == 1.0
    assert strict.metrics(strict.examples, {"i2t": scores})["accuracy"] == 0.0


def test_bias_standard_deviation_per_conventions(tmp_path):
    root = datasets.write_bias(tmp_path)
    engine, itm = get_task("bias", root), get_task("bias", root, protocol=ITM)
    gen = torch.Generator().manual_seed(0)
    scores = [torch.randn(1, 5, generator=gen) for _ in engine.examples]
    sample = engine.metrics(engine.examples, {"i2t": scores})
    population = itm.metrics(itm.examples, {"i2t": scores})
    key = next(k for k in sample if k.startswith("effect_size/"))
    x, y = key.split("/")[1].split("_vs_")
    n = sum(ex.meta["group"] in (x, y) for ex in engine.examples)
    # numpy's .std() (ddof 0) is the sample std scaled by sqrt((n - 1) / n): the effect size by its inverse
    assert population[key] == pytest.approx(sample[key] * ((n - 1) / n) ** -0.5, rel=1e-9)


def test_winoground_as_hugging_face_ships_it(tmp_path):
    hf = get_task("winoground", datasets.write_winoground_hf(tmp_path / "hf"))
    plain = get_task("winoground", datasets.write_winoground(tmp_path / "plain"))
    assert [(e.id, e.texts, e.meta) for e in hf.examples] == [(e.id, e.texts, e.meta) for e in plain.examples]
    member = hf.examples[1].images[0]
    assert isinstance(member, ZipMember) and member.member == "images/ex_1_img_0.png"
    with PIL.Image.open(plain.examples[1].images[0]) as expected:
        assert load_image_ref(member).tobytes() == expected.convert(load_image_ref(member).mode).tobytes()


def test_winoground_zip_missing_image_is_reported_or_skipped(tmp_path):
    root = datasets.write_winoground_hf(tmp_path)
    rows = (root / "data" / "examples.jsonl").read_text().splitlines()
    broken = json.loads(rows[0]) | {"image_1": "ex_9_img_1"}
    (root / "data" / "examples.jsonl").write_text("\n".join([json.dumps(broken), *rows[1:]]) + "\n")
    with pytest.raises(ValueError, match="images.zip has no image ex_9_img_1.png"):
        get_task("winoground", root).examples
    skipping = get_task("winoground", root, skip_missing=True)
    assert [e.id for e in skipping.examples] == ["1", "2"] and len(skipping.skipped) == 1


def test_flickr30k_order_reads_the_research_codes_validation_file(tmp_path):
    root = datasets.write_flickr30k_val_blip(tmp_path)
    itm = get_task("flickr30k_order", root, protocol=ITM)
    assert [e.id for e in itm.examples] == ["1002.jpg#0", "1002.jpg#1"]
    assert itm.examples[1].texts[0] == "someone is cycling home"
    assert [e.id for e in get_task("flickr30k_order", root).examples][0] == "1000092795.jpg#0"  # test split


class Prefilter:
    """The CLIP prefilter's interface, ranking by a fixed order: the last candidates first."""

    def topk_texts(self, images, texts, k):
        return torch.tensor([[len(texts) - 1 - j for j in range(k)]] * len(images))

    def topk_images(self, texts, images, k):
        return torch.tensor([[len(images) - 1 - j for j in range(k)]] * len(texts))


def flickr_val(tmp_path):
    root = datasets.write_flickr30k(tmp_path)
    data = json.loads((root / "dataset_flickr30k.json").read_text())
    for row in data["images"]:
        row["split"] = "val" if row["split"] == "test" else row["split"]
    (root / "dataset_flickr30k.json").write_text(json.dumps(data))
    return root


def test_flickr30k_paper_protocol_image_to_text(tmp_path):
    root = flickr_val(tmp_path)
    task = get_task("flickr30k_i2t", root, protocol=ITM, candidates="clip", prefilter=Prefilter(), topk=3)
    assert task.split == "val"
    pool = ["a red square", "red", "a green square", "green", "a blue square"]
    for ex, (own, _) in zip(task.examples, [({"a red square", "red"}, 0), ({"a green square", "green"}, 0),
                                           ({"a blue square", "green"}, 0)]):
        assert ex.texts[0] in own and ex.label == [0] and len(ex.texts) == 3
        assert not own & set(ex.texts[1:])  # none of the image's other captions among the negatives
        assert list(ex.texts[1:]) == [c for c in reversed(pool) if c not in own][:2]


def test_flickr30k_paper_protocol_text_to_image_and_candidate_files(tmp_path):
    root = flickr_val(tmp_path)
    task = get_task("flickr30k_t2i", root, protocol=ITM, candidates="clip", prefilter=Prefilter(), topk=2,
                    save_candidates="val_top2.json")
    examples = task.examples
    assert [e.texts[0] for e in examples] == ["a red square", "a green square", "a blue square"]  # one per image
    assert all(e.label == [0] and len(e.images) == 2 for e in examples)
    assert [datasets.file_names(e.images) for e in examples] == [["100.jpg", "300.jpg"], ["200.jpg", "300.jpg"],
                                                                ["300.jpg", "200.jpg"]]
    saved = json.loads((root / "val_top2.json").read_text())
    assert saved["a red square"] == ["flickr30k-images/100.jpg", "flickr30k-images/300.jpg"]
    again = get_task("flickr30k_t2i", root, candidates="val_top2.json", split="val")  # the saved file reads back
    assert [(e.texts, datasets.file_names(e.images)) for e in again.examples] == \
        [(e.texts, datasets.file_names(e.images)) for e in examples]
    # the research code's own file, one entry per caption: it scores every 5th
    entries = {f"caption {k}": ["flickr30k-images/100.jpg", "flickr30k-images/200.jpg"] for k in range(10)}
    (root / "val_top10_RN50x64.json").write_text(json.dumps(entries))
    data = json.loads((root / "dataset_flickr30k.json").read_text())
    data["images"][0]["sentences"] += [{"raw": c} for c in entries]
    (root / "dataset_flickr30k.json").write_text(json.dumps(data))
    research = get_task("flickr30k_t2i", root, protocol=ITM, candidates="val_top10_RN50x64.json")
    assert [e.texts[0] for e in research.examples] == ["caption 0", "caption 5"]
    assert len(get_task("flickr30k_t2i", root, protocol=Protocol(), candidates="val_top10_RN50x64.json",
                        split="val").examples) == 10
