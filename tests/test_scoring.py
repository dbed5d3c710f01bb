"""The engine against the naive reference loop, and the scorer's contract (tiny model, CPU, fp32)."""
import pytest
import torch

from itm_engine import DiffusionITM
from itm_engine.models import build_random_components, load_components, save_random_model
from itm_engine.reference import diffusion_classifier_pair_scores, diffusion_itm_scores

from fixtures.helpers import count_unet_items, make_images, max_rel_diff

TEXTS = ["a red circle", "a blue square on the left", "", "two green triangles"]


@pytest.fixture(scope="module")
def scorers():
    """One tiny scorer per prediction type (built once for the module)."""
    return {
        pred: DiffusionITM(build_random_components("tiny", seed=0, prediction_type=pred), batch_size=64)
        for pred in ("epsilon", "v_prediction")
    }


def error_scale(scorer, images, bank) -> torch.Tensor:
    """The size of the denoising errors (max |I2T score|), the scale fp32 rounding is relative to.

    A T2I score is a difference of two errors of size ~1 that can be ~1e-3 apart on a random
    model, so its fp32 rounding (~1e-7 of the errors) is measured against the errors' scale.
    """
    return scorer(images, TEXTS, mode="i2t", noise=bank).abs().max()


@pytest.fixture(scope="module")
def images():
    return make_images(3)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("schedule", ["uniform", "stratified"])
@pytest.mark.parametrize("mode", ["i2t", "t2i"])
def test_engine_matches_naive_reference(scorers, images, prediction, schedule, mode):
    """Relative difference <= 1e-5 of the error scale (see `error_scale`); the float64 test
    below compares the scores themselves."""
    scorer = scorers[prediction]
    bank = scorer.noise_bank(samples=3, seed=1, schedule=schedule)
    engine = scorer(images, TEXTS, mode=mode, noise=bank)
    naive = diffusion_itm_scores(scorer.components, images, TEXTS, bank, mode=mode, protocol=scorer.protocol)
    assert engine.shape == (len(images), len(TEXTS))
    assert max_rel_diff(engine, naive, scale=error_scale(scorer, images, bank)) <= 1e-5
    assert not torch.equal(engine[:, 0], engine[:, 1])  # the texts matter


@pytest.mark.parametrize("mode", ["i2t", "t2i"])
def test_engine_matches_naive_reference_in_float64(images, mode):
    """The formula itself, free of rounding: float64 throughout, and the reference kernels, whose
    float32 error reduction sums in the same order as Diffusion Classifier's F.mse_loss, and whose
    x_t is computed as its loop does, sqrt(abar) z0 + sqrt(1 - abar) eps (the fused backends are
    checked against the reference in their own tests; the DiffusionITM loop's Euler form of x_t
    rounds differently, within 1e-6)."""
    scorer = DiffusionITM(load_components("tiny", dtype=torch.float64), kernels="reference")
    bank = scorer.noise_bank(samples=2, seed=7)
    engine = scorer(images, TEXTS, mode=mode, noise=bank)
    pairs = [(i, j) for i in range(len(images)) for j in range(len(TEXTS))]
    loop = diffusion_classifier_pair_scores(scorer.components, images, TEXTS, pairs, bank, mode,
                                            scorer.protocol).view(len(images), len(TEXTS))
    assert max_rel_diff(engine, loop) <= 1e-9
    literal = diffusion_itm_scores(scorer.components, images, TEXTS, bank, mode=mode, protocol=scorer.protocol)
    scale = diffusion_itm_scores(scorer.components, images, TEXTS, bank, mode="i2t", protocol=scorer.protocol)
    assert max_rel_diff(engine, literal, scale.abs().max()) <= 1e-6


def test_v_prediction_target_changes_the_scores(scorers, images):
    bank = scorers["epsilon"].noise_bank(samples=2, seed=0)
    eps = scorers["epsilon"](images, TEXTS, noise=bank)
    v = scorers["v_prediction"](images, TEXTS, noise=bank)
    assert max_rel_diff(eps, v) > 1e-3


@pytest.mark.parametrize("mode", ["i2t", "t2i"])
def test_scores_do_not_depend_on_batch_size(scorers, images, mode):
    scorer = scorers["epsilon"]
    bank = scorer.noise_bank(samples=3)
    results = [scorer(images, TEXTS, mode=mode, noise=bank, batch_size=b) for b in (1, 7, 64)]
    assert scorer.last_stats.unet_calls == 1  # 64 covers everything in one call
    for other in results[1:]:
        assert max_rel_diff(other, results[0], scale=error_scale(scorer, images, bank)) <= 1e-5


def test_a_permutation_of_inputs_permutes_the_scores(scorers, images):
    scorer = scorers["epsilon"]
    base = scorer(images, TEXTS, mode="t2i", samples=3, seed=5)
    img_perm, txt_perm = [2, 0, 1], [3, 1, 0, 2]
    permuted = scorer([images[i] for i in img_perm], [TEXTS[j] for j in txt_perm], mode="t2i", samples=3, seed=5)
    scale = error_scale(scorer, images, scorer.noise_bank(3, seed=5))
    assert max_rel_diff(permuted, base[img_perm][:, txt_perm], scale=scale) <= 1e-5


def test_seed_reproducibility(scorers, images):
    scorer = scorers["epsilon"]
    first = scorer(images, TEXTS, samples=2, seed=11)
    scorer.clear_cache()
    second = scorer(images, TEXTS, samples=2, seed=11)
    other = scorer(images, TEXTS, samples=2, seed=12)
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


def test_unet_item_counts_engine_vs_naive(scorers, images):
    scorer = scorers["epsilon"]
    n_img, n_txt, samples = len(images), len(TEXTS) - 1, 2
    texts = [t for t in TEXTS if t]  # distinct, non-empty captions
    bank = scorer.noise_bank(samples)
    with count_unet_items(scorer.components.unet) as counted:
        scorer(images, texts, mode="t2i", noise=bank)
    assert counted.items == n_img * n_txt * samples + n_img * samples
    assert scorer.last_stats.unet_items == counted.items
    with count_unet_items(scorer.components.unet) as counted:
        scorer(images, texts, mode="i2t", noise=bank)
    assert counted.items == n_img * n_txt * samples
    with count_unet_items(scorer.components.unet) as counted:
        diffusion_itm_scores(scorer.components, images, texts, bank, mode="t2i", protocol=scorer.protocol)
    assert counted.items == 2 * n_img * n_txt * samples
    assert counted.calls == n_img * n_txt * samples  # one call per pair and draw: [null; text], a batch of 2


def test_duplicate_inputs_are_evaluated_once(scorers, images):
    scorer = scorers["epsilon"]
    bank = scorer.noise_bank(2)
    copy = images[0].copy()  # a different object with equal pixels
    with count_unet_items(scorer.components.unet) as counted:
        scores = scorer([images[0], copy, images[1]], ["a dog", "a dog", "a cat"], noise=bank)
    assert counted.items == 2 * 2 * len(bank)
    assert torch.equal(scores[0], scores[1]) and torch.equal(scores[:, 0], scores[:, 1])


@pytest.mark.parametrize("mode", ["i2t", "t2i"])
def test_per_query_candidates_match_the_full_matrix(scorers, images, mode):
    scorer = scorers["epsilon"]
    bank = scorer.noise_bank(3, seed=2)
    full = scorer(images, TEXTS, mode=mode, noise=bank)  # [n_img, n_txt]
    if mode == "i2t":  # each image with its own 2 candidate captions
        picks = [[0, 1], [3, 2], [1, 3]]
        got = scorer.score_candidates(images, [[TEXTS[j] for j in row] for row in picks], mode="i2t", noise=bank)
        expected = torch.stack([full[q, row] for q, row in enumerate(picks)])
    else:  # each caption with its own 2 candidate images
        picks = [[0, 2], [1, 0], [2, 1], [0, 1]]
        got = scorer.score_candidates(TEXTS, [[images[i] for i in row] for row in picks], mode="t2i", noise=bank)
        expected = torch.stack([full[row, q] for q, row in enumerate(picks)])
    assert got.shape == expected.shape
    assert max_rel_diff(got, expected, scale=error_scale(scorer, images, bank)) <= 1e-5


def test_per_query_runs_only_the_listed_pairs(scorers, images):
    scorer = scorers["epsilon"]
    bank = scorer.noise_bank(2)
    with count_unet_items(scorer.components.unet) as counted:
        scorer.score_candidates(images, [["x", "y"], ["z", "w"], ["x", "q"]], mode="i2t", noise=bank)
    assert counted.items == 3 * 2 * len(bank)


def test_saved_and_reloaded_model_scores_identically(tmp_path, images):
    in_memory = DiffusionITM(build_random_components("tiny", seed=4))
    folder = save_random_model("tiny", tmp_path / "tiny", seed=4)
    reloaded = DiffusionITM.from_pretrained(folder)
    bank = in_memory.noise_bank(2, seed=3)
    for mode in ("i2t", "t2i"):
        assert torch.equal(in_memory(images, TEXTS, mode=mode, noise=bank),
                           reloaded(images, TEXTS, mode=mode, noise=bank))


def test_sampled_latents_are_reproducible_and_differ_from_the_mean(images):
    components = load_components("tiny")
    mean = DiffusionITM(components)
    sampled = DiffusionITM(components, latent="sample")
    bank = mean.noise_bank(2)
    a = sampled(images, TEXTS, noise=bank)
    sampled.clear_cache()
    assert torch.equal(a, sampled(images, TEXTS, noise=bank))
    assert not torch.allclose(a, mean(images, TEXTS, noise=bank))


def test_last_stats_report_the_work(scorers, images):
    scorer = scorers["epsilon"]
    scorer.clear_cache()
    scorer(images, TEXTS, mode="t2i", samples=2, batch_size=5)
    stats = scorer.last_stats
    assert stats.images_encoded == len(images)
    assert stats.texts_encoded == len(TEXTS)  # "" is among TEXTS: the null prompt is shared with it
    assert stats.unet_items == len(images) * len(TEXTS) * 2
    assert stats.unet_calls == -(-stats.unet_items // 5)
    assert all(stats.seconds[k] > 0 for k in ("vae", "text_encoder", "unet", "reduction", "total"))
    assert stats.items_per_second > 0
    # Cached on the second call: nothing is re-encoded.
    scorer(images, TEXTS, mode="t2i", samples=2)
    assert scorer.last_stats.images_encoded == 0 and scorer.last_stats.texts_encoded == 0


class _OutOfMemoryAbove(torch.nn.Module):
    """Wraps a UNet and raises a CUDA-style OOM for batches larger than `limit`."""

    def __init__(self, unet, limit):
        super().__init__()
        self.unet, self.limit, self.sizes = unet, limit, []

    def forward(self, x, t, encoder_hidden_states):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states)

    @property
    def config(self):
        return self.unet.config

    @property
    def device(self):
        return self.unet.device

    @property
    def dtype(self):
        return self.unet.dtype


def test_out_of_memory_halves_the_batch_instead_of_crashing(images):
    components = build_random_components("tiny", seed=0)
    scorer = DiffusionITM(components, batch_size=16)
    bank = scorer.noise_bank(3)
    expected = scorer(images, TEXTS, noise=bank)
    wrapped = _OutOfMemoryAbove(components.unet, limit=5)
    components.unet = wrapped
    with pytest.warns(UserWarning, match="batch size reduced") as record:
        got = scorer(images, TEXTS, noise=bank)
    assert [str(w.message)[-1] for w in record] == ["8", "4"]
    assert max_rel_diff(got, expected) <= 1e-5
    assert wrapped.sizes[:3] == [16, 8, 4] and max(wrapped.sizes[3:]) == 4
    assert scorer.executor.batch_size == 4


@pytest.mark.parametrize("mode", ["i2t", "t2i"])
def test_batched_baseline_matches_engine_and_runs_one_call_per_pair(scorers, images, mode):
    scorer = scorers["v_prediction"]
    bank = scorer.noise_bank(3, seed=4)
    pairs = [(0, 1), (2, 3), (1, 0), (0, 3)]
    engine = scorer.score_pairs(images, TEXTS, pairs, mode=mode, noise=bank)
    with count_unet_items(scorer.components.unet) as counted:
        batched = diffusion_classifier_pair_scores(scorer.components, images, TEXTS, pairs, bank, mode=mode,
                                                   protocol=scorer.protocol)
    per_pair = 2 if mode == "t2i" else 1
    assert counted.calls == per_pair * len(pairs) and counted.items == per_pair * len(pairs) * len(bank)
    assert max_rel_diff(batched, engine, scale=error_scale(scorer, images, bank)) <= 1e-5


def test_score_pairs_checks_its_indices(scorers, images):
    scorer = scorers["epsilon"]
    with pytest.raises(ValueError, match=r"pairs\[1\] names text 9, but there are 4"):
        scorer.score_pairs(images, TEXTS, [(0, 0), (1, 9)], samples=1)
    with pytest.raises(ValueError, match="pairs is empty"):
        scorer.score_pairs(images, TEXTS, [], samples=1)


def test_stage_timers_on_cuda_record_events_and_settle_once(monkeypatch):
    """On CUDA a stage timer records two events and never synchronises; `settle` waits once for the
    last event and adds every recorded interval (a fake event class stands in for the device)."""
    from itm_engine.stats import RunStats

    waits = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.time = None

        def record(self):
            self.time = 0.0

        def synchronize(self):
            waits.append(self)

        def elapsed_time(self, end):
            return 250.0  # milliseconds

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: pytest.fail("a timer synchronised CUDA"))
    stats = RunStats()
    for _ in range(4):
        with stats.timer("unet", torch.device("cuda")):
            pass
    assert stats.seconds == {} and len(waits) == 0
    stats.settle()
    assert stats.seconds == {"unet": pytest.approx(1.0)} and len(waits) == 1
    stats.settle()  # nothing left to read
    assert stats.seconds == {"unet": pytest.approx(1.0)} and len(waits) == 1


def test_offloaded_text_encoders_visit_the_device_only_while_new_captions_encode(images, monkeypatch):
    """offload_text_encoders: every text encoder moves to the model's device before a call's new
    captions are encoded and back to the CPU after; a call with cached captions moves nothing; the
    scores are those of a scorer that never moves them."""
    from itm_engine.models import build_random_components

    components = build_random_components("tiny-sd3")
    moves = []
    for encoder in components.text_encoders:
        def recorded(*args, _real=encoder.to, **kwargs):
            moves.append(str(args[0] if args else kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(encoder, "to", recorded)
    scorer = DiffusionITM(components, samples=2, offload_text_encoders=True)
    assert moves == ["cpu"] * 3  # the three encoders, parked
    moves.clear()
    scores = scorer(images, ["a cat", "a dog"])
    assert moves == [str(components.device)] * 3 + ["cpu"] * 3
    moves.clear()
    assert torch.equal(scorer(images, ["a dog"]), scores[:, 1:])
    assert moves == []  # cached captions: the encoders stay where they are
    plain = DiffusionITM(build_random_components("tiny-sd3"), samples=2)
    assert torch.equal(plain(images, ["a cat", "a dog"]), scores)


def test_text_cache_spills_evicted_captions_to_disk_and_reads_them_back(images, tmp_path):
    """text_spill_dir: a caption the byte budget evicts is written to the folder and read back on
    its next use instead of being encoded again, with equal scores; a file recording another model
    or another caption is not used."""
    from itm_engine.models import build_random_components

    components = build_random_components("tiny-sd3")
    one_caption = sum(v[0].numel() * v[0].element_size()
                      for v in DiffusionITM(components).text_cache.get(["x"])[0].values())
    scorer = DiffusionITM(components, samples=2, cache_bytes=one_caption, text_spill_dir=tmp_path / "spill")
    first = scorer(images, ["a cat"])
    scorer(images, ["a dog"])  # evicts "a cat" to disk
    assert len(list((tmp_path / "spill").glob("*.safetensors"))) >= 1
    again = scorer(images, ["a cat"])
    assert scorer.last_stats.texts_encoded == 0 and scorer.last_stats.texts_reloaded == 1
    assert torch.equal(again, first)
    # another model's scorer on the same folder encodes its captions itself
    other = DiffusionITM(build_random_components("tiny-sdxl"), samples=2, cache_bytes=one_caption,
                         text_spill_dir=tmp_path / "spill")
    other(images, ["a cat"])
    assert other.last_stats.texts_encoded == 1 and other.last_stats.texts_reloaded == 0
