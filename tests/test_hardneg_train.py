"""HardNeg LoRA training (`itm_engine.hardneg.train`) on the tiny model: the loss, learning, frozen
base, checkpoints, resume, 2 processes through Accelerate, and the trained LoRA scoring through
itm-eval."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from itm_engine import cli
from itm_engine.hardneg.train import TrainConfig, Trainer, hardneg_loss

from fixtures.datasets import write_clevr
from fixtures.helpers import make_images
from fixtures.models import NAME, write_clip_config

CAPTIONS = ["a red box on a table", "a small blue ball under a chair", "two green cubes left of a tree",
            "a yellow dog next to a black cat", "a white cup behind a brown bag", "an orange kite above a house"]


def write_pairs(root: Path, n: int = 4) -> Path:
    """A JSONL of n (image, caption) pairs with generated images; returns the file."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, image in enumerate(make_images(n, seed=3)):
        image.save(root / f"img{k}.png")
        lines.append(json.dumps({"image": f"img{k}.png", "caption": CAPTIONS[k % len(CAPTIONS)]}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


def config(data: Path, **overrides) -> TrainConfig:
    options = dict(data=str(data), batch_size=4, grad_accum=1, epochs=100, max_steps=4, lr=1e-3,
                   negatives="hard-text", rank=4, checkpoint_every=1000, val_every=1000)
    options.update(overrides)
    return TrainConfig(**options)


# -- the loss -------------------------------------------------------------------------------


def test_hardneg_loss_value_and_clamp_gradient():
    l_pos = torch.tensor([2.0, 2.0, 2.0], requires_grad=True)
    l_neg = torch.tensor([1.0, 3.0, 5.0], requires_grad=True)
    has_neg = torch.tensor([True, True, False])
    loss = hardneg_loss(l_pos, l_neg, factor=1.0, has_neg=has_neg)
    # example 0: 2 - 1; example 1: 2 - min(3, 2) = 0; example 2: no negative: 2
    assert loss.item() == pytest.approx((1.0 + 0.0 + 2.0) / 3)
    loss.backward()
    # the bound is detached: L_pos always has gradient 1/B; a clamped or absent negative has none
    assert l_pos.grad.tolist() == pytest.approx([1 / 3] * 3)
    assert l_neg.grad.tolist() == pytest.approx([-1 / 3, 0.0, 0.0])


def test_hardneg_loss_factor_scales_the_bound():
    l_pos, l_neg = torch.tensor([2.0]), torch.tensor([3.0])
    assert hardneg_loss(l_pos, l_neg, factor=2.0).item() == pytest.approx(-1.0)  # 3 < 4: not clamped
    assert hardneg_loss(l_pos, l_neg, factor=0.5).item() == pytest.approx(1.0)   # clamped at 1


# -- training -------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_lowers_the_loss_and_changes_only_lora_weights(tmp_path):
    trainer = Trainer(config(write_pairs(tmp_path / "data"), negatives="none", max_steps=12, lr=3e-3), tmp_path / "out")
    unet = trainer.components.unet
    base = {k: v.clone() for k, v in unet.state_dict().items() if "lora" not in k}
    lora = {k: v.clone() for k, v in unet.state_dict().items() if "lora" in k}
    assert base and lora

    epoch, indices = 0, list(range(4))  # a fixed batch with fixed draws
    t, eps = trainer.draws(epoch, indices)
    pairs = [trainer.pairs[i] for i in indices]

    def fixed_loss() -> float:
        with torch.no_grad():
            z0, cond = trainer.encode([p.image for p in pairs], [p.caption for p in pairs])
            return trainer.denoising_loss(z0, cond, t, eps).mean().item()

    before = fixed_loss()
    trainer.train()
    assert fixed_loss() < before
    after = unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # base weights bitwise unchanged
    assert any(not torch.equal(after[k], v) for k, v in lora.items())
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 13)) and all("grad_norm" in row for row in log)
    assert (tmp_path / "out" / "lora").is_dir()


@pytest.mark.slow
def test_resume_after_a_crash_reproduces_the_uninterrupted_losses(tmp_path, monkeypatch):
    data = write_pairs(tmp_path / "data", n=8)
    settings = dict(batch_size=2, grad_accum=2, max_steps=4, checkpoint_every=2, negatives="mixed", neg_prob=0.7)
    uninterrupted = Trainer(config(data, **settings), tmp_path / "a").train()

    crashing = Trainer(config(data, **settings), tmp_path / "b")
    original_log = Trainer.log

    def crash_at_step_3(self, row):
        if row["step"] == 3:
            raise RuntimeError("simulated crash")
        original_log(self, row)

    monkeypatch.setattr(Trainer, "log", crash_at_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.train()
    monkeypatch.setattr(Trainer, "log", original_log)

    resumed = Trainer(config(data, **settings), tmp_path / "b")
    resumed.resume()
    assert resumed.step == 2
    rows = resumed.train()
    assert [r["step"] for r in rows] == [3, 4]
    for got, want in zip(rows, uninterrupted[2:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)


def test_resume_refuses_a_different_configuration(tmp_path):
    data = write_pairs(tmp_path / "data")
    Trainer(config(data, max_steps=1, checkpoint_every=1), tmp_path / "out").train()
    with pytest.raises(ValueError, match="changed: lr"):
        Trainer(config(data, max_steps=1, checkpoint_every=1, lr=0.5), tmp_path / "out").resume()


@pytest.mark.slow
def test_two_processes_compute_the_single_process_gradient(tmp_path):
    data = write_pairs(tmp_path / "data")
    common = ["train", "--data", str(data), "--max-steps", "2", "--grad-accum", "1", "--negatives", "hard-text",
              "--lr", "0.001", "--checkpoint-every", "1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "itm_engine.cli", *common, "--batch-size", "4",
                    "--out", str(tmp_path / "one")], check=True, env=env, capture_output=True)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    launched = subprocess.run(
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "itm_engine.cli", *common, "--batch-size", "2",
         "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    one = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        # Batches of 2 vs 4 round differently (~1e-7); the HardNeg loss is a small difference of
        # two losses of size l_pos, so it is compared on l_pos's scale.
        assert b["l_pos"] == pytest.approx(a["l_pos"], rel=1e-5)
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5 * a["l_pos"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_itm_train_then_itm_eval_with_the_lora(tmp_path):
    data = write_pairs(tmp_path / "data")
    out = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--out", str(out), "--max-steps", "2", "--batch-size", "4",
                     "--grad-accum", "1", "--negatives", "random", "--val-data", str(data), "--val-every", "1",
                     "--val-samples", "1"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(0.0 <= row["val_accuracy"] <= 1.0 for row in log)
    root = write_clevr(tmp_path / "clevr")
    assert cli.main(["eval", "--task", "clevr", "--data-root", str(root), "--out", str(tmp_path / "eval"),
                     "--samples", "2", "--no-progress", "--lora", str(out / "lora")]) == 0
    results = json.loads((tmp_path / "eval" / "diffusion" / "results.json").read_text())
    assert results["config"]["lora"] == str(out / "lora")


@pytest.mark.slow
def test_hard_image_negatives_from_clip_neighbours(tmp_path):
    clip_config = write_clip_config(tmp_path)
    trainer = Trainer(config(write_pairs(tmp_path / "data"), negatives="hard-image", clip_neighbours=1, max_steps=1,
                             clip_model=NAME, clip_config=str(clip_config)), tmp_path / "out")
    negative = trainer.sampler.negative(0, epoch=0)
    assert negative.kind == "hard-image" and negative.image != trainer.pairs[0].image
    assert negative.caption == trainer.pairs[0].caption
    rows = trainer.train()
    assert rows[0]["loss"] < rows[0]["l_pos"]  # the negative term was subtracted


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    data = write_pairs(tmp_path / "data")
    plain = Trainer(config(data, max_steps=2), tmp_path / "plain").train()
    checkpointed = Trainer(config(data, max_steps=2, gradient_checkpointing=True), tmp_path / "ckpt").train()
    for a, b in zip(plain, checkpointed):
        assert b["l_pos"] == pytest.approx(a["l_pos"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_bf16_mixed_precision_runs_and_stays_close(tmp_path):
    """Accelerate's state is one per process: the bf16 run gets its own process."""
    data = write_pairs(tmp_path / "data")
    full = Trainer(config(data, max_steps=1), tmp_path / "fp32").train()
    subprocess.run([sys.executable, "-m", "itm_engine.cli", "train", "--data", str(data),
                    "--out", str(tmp_path / "bf16"), "--max-steps", "1", "--batch-size", "4", "--grad-accum", "1",
                    "--lr", "0.001", "--negatives", "hard-text", "--checkpoint-every", "1000", "--val-every", "1000",
                    "--epochs", "100", "--mixed-precision", "bf16"],
                   check=True, capture_output=True)
    mixed = [json.loads(line) for line in (tmp_path / "bf16" / "log.jsonl").read_text().splitlines()]
    assert math.isfinite(mixed[0]["loss"]) and mixed[0]["l_pos"] == pytest.approx(full[0]["l_pos"], rel=3e-2)


# -- resume safety: torn checkpoints, the log, the lock, a full disk ----------------------------


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--max-steps", "2", "--batch-size", "4",
            "--grad-accum", "1", "--negatives", "hard-text", "--checkpoint-every", "1", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["trainer.json", "model.safetensors"])
def test_resume_skips_a_damaged_latest_checkpoint_for_the_previous_intact_one(tmp_path, damaged):
    data = write_pairs(tmp_path / "data")
    Trainer(config(data, max_steps=2, checkpoint_every=1), tmp_path / "out").train()
    latest = tmp_path / "out" / "checkpoints" / "step-0000002"
    assert (latest / damaged).is_file()
    (latest / damaged).write_bytes((latest / damaged).read_bytes()[:10])  # torn by a crash or a full disk
    resumed = Trainer(config(data, max_steps=2, checkpoint_every=1), tmp_path / "out")
    with pytest.warns(UserWarning, match=f"skipping checkpoint {latest}"):
        resumed.resume()
    assert resumed.step == 1


def test_resume_without_an_intact_checkpoint_names_the_torn_trainer_json(tmp_path, capsys):
    data = write_pairs(tmp_path / "data")
    out = tmp_path / "out"
    assert cli.main(_train_args(data, out, "--max-steps", "1")) == 0
    state = out / "checkpoints" / "step-0000001" / "trainer.json"
    state.write_text("")
    with pytest.warns(UserWarning, match=f"{state} is not valid JSON"):
        assert cli.main(_train_args(data, out, "--max-steps", "1", "--resume")) == 2
    assert f"no intact checkpoint under {out / 'checkpoints'}" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_truncates_the_log_to_the_checkpoint(tmp_path):
    data = write_pairs(tmp_path / "data")
    out = tmp_path / "out"
    Trainer(config(data, max_steps=3, checkpoint_every=2), out).train()  # checkpoints at steps 2 and 3
    shutil.rmtree(out / "checkpoints" / "step-0000003")  # a crash after step 3 was logged, before its checkpoint
    with open(out / "log.jsonl", "a") as log:
        log.write('{"step": 4, "lo')  # and a row torn by the crash
    resumed = Trainer(config(data, max_steps=3, checkpoint_every=2), out)
    resumed.resume()
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    resumed.train()
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_second_writer_of_a_run_folder_is_refused(tmp_path, capsys):
    import fcntl

    data = write_pairs(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    # another run holding the folder's lock (flock treats each open file on its own, so this
    # process can play that run)
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert cli.main(_train_args(data, out)) == 2
    assert f"{out} is in use by another process" in capsys.readouterr().err
    assert not (out / "log.jsonl").exists() and not (out / "checkpoints").exists()


def test_a_full_disk_stops_training_with_a_message(tmp_path, capsys, monkeypatch):
    import errno

    data = write_pairs(tmp_path / "data")
    out = tmp_path / "out"

    def disk_full(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Trainer, "save_checkpoint", disk_full)
    assert cli.main(_train_args(data, out)) == 1
    err = capsys.readouterr().err
    assert f"no space left on device while writing to {out}" in err and "--resume" in err


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd3"])
def test_hardneg_lora_trains_on_sdxl_and_sd3_and_scores_from_its_folder(tmp_path, model):
    """HardNeg LoRA on the new families: SDXL's UNet (cross-attention, per-image time_ids in the
    loss) and SD3's MMDiT (its joint attention), saved in diffusers' format, loaded by the scorer."""
    from itm_engine.scoring import DiffusionITM

    data = write_pairs(tmp_path / "data")
    trainer = Trainer(config(data, model=model, negatives="mixed", neg_prob=1.0, max_steps=3, lr=3e-3),
                      tmp_path / "out")
    adapted = [name for name, _ in trainer.components.denoiser.named_modules() if name.endswith(".lora_A")]
    expected = ".attn2.to_q" if model == "tiny-sdxl" else ".attn.add_q_proj"
    assert any(expected in name for name in adapted)
    rows = trainer.train()
    assert len(rows) == 3 and all(math.isfinite(row["loss"]) for row in rows)
    lora = tmp_path / "out" / "lora"
    images = [str(p) for p in sorted(data.parent.glob("img*.png"))[:2]]
    base = DiffusionITM.from_pretrained(model, samples=2)(images, ["a cat", "a dog"])
    tuned = DiffusionITM.from_pretrained(model, lora=str(lora), samples=2)(images, ["a cat", "a dog"])
    zero = DiffusionITM.from_pretrained(model, lora=str(lora), lora_scale=0.0, samples=2)(images, ["a cat", "a dog"])
    assert not torch.equal(base, tuned) and torch.allclose(base, zero, atol=1e-6)
