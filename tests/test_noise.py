import diffusers
import pytest
import torch

from itm_engine.models import ddpm_scheduler
from itm_engine.noise import ForwardProcess, NoiseBank

SHAPE = (4, 8, 8)
EPSILON = ForwardProcess.from_scheduler(ddpm_scheduler("epsilon"))
FLOW = ForwardProcess.from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))


def test_same_seed_same_bank_and_different_seed_different_bank():
    a = NoiseBank.sample(5, SHAPE, seed=3)
    b = NoiseBank.sample(5, SHAPE, seed=3)
    c = NoiseBank.sample(5, SHAPE, seed=4)
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.noise, b.noise)
    assert not torch.equal(a.noise, c.noise)
    assert a.noise.shape == (5, *SHAPE) and a.noise.dtype == torch.float32
    assert a.latent_shape == SHAPE and len(a) == 5


def test_sampling_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    NoiseBank.sample(4, SHAPE, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_uniform_timesteps_cover_the_range():
    bank = NoiseBank.sample(2000, (1, 1, 1), seed=0, num_train_timesteps=1000)
    assert bank.timesteps.min() >= 0 and bank.timesteps.max() < 1000
    assert bank.timesteps.min() < 50 and bank.timesteps.max() > 950  # spread over [0, T)


def test_stratified_timesteps_are_the_strata_midpoints():
    bank = NoiseBank.sample(4, SHAPE, seed=0, schedule="stratified", num_train_timesteps=1000)
    assert bank.timesteps.tolist() == [125, 375, 625, 875]
    # The schedule is fixed; the noise still follows the seed.
    other = NoiseBank.sample(4, SHAPE, seed=1, schedule="stratified")
    assert torch.equal(bank.timesteps, other.timesteps) and not torch.equal(bank.noise, other.noise)


def test_from_tensors_round_trip_and_validation():
    t = torch.tensor([1, 500, 999])
    eps = torch.randn(3, *SHAPE)
    bank = NoiseBank.from_tensors(t, eps)
    assert torch.equal(bank.timesteps, t) and torch.equal(bank.noise, eps)
    with pytest.raises(ValueError, match="S = len"):
        NoiseBank.from_tensors(t, torch.randn(2, *SHAPE))
    with pytest.raises(ValueError, match=r"\[S, C, h, w\]"):
        NoiseBank.from_tensors(t, torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match=">= 0"):
        NoiseBank.from_tensors(torch.tensor([-1, 2, 3]), eps)


@pytest.mark.parametrize("samples", [0, -2, 1.5])
def test_bad_sample_counts(samples):
    with pytest.raises(ValueError, match="samples"):
        NoiseBank.sample(samples, SHAPE)


def test_bad_schedule():
    with pytest.raises(ValueError, match="schedule"):
        NoiseBank.sample(2, SHAPE, schedule="cosine")


def test_check_fits():
    bank = NoiseBank.sample(2, SHAPE)
    assert bank.check_fits(SHAPE, EPSILON) is bank
    with pytest.raises(ValueError, match="does not fit"):
        bank.check_fits((4, 16, 16), EPSILON)
    short = ForwardProcess("epsilon", 15, torch.arange(15.0), EPSILON.alphas_cumprod[:15])
    with pytest.raises(ValueError, match=r"timesteps do not fit the model: timesteps must lie in \[0, 15\)"):
        NoiseBank.from_tensors(torch.tensor([10, 20]), bank.noise).check_fits(SHAPE, short)


def test_a_continuous_bank_is_refused_by_a_discrete_process():
    timesteps = torch.tensor([10.0, 500.7], dtype=torch.float64)
    bank = NoiseBank.from_tensors(timesteps, torch.randn(2, *SHAPE))
    assert torch.equal(bank.timesteps, timesteps)  # kept, never truncated
    with pytest.raises(ValueError, match="a 'epsilon' model takes integer timesteps"):
        bank.check_fits(SHAPE, EPSILON)
    assert torch.equal(bank.check_fits(SHAPE, FLOW).timesteps, timesteps)


def test_a_whole_valued_bank_is_accepted_by_a_flow_process_as_float_timesteps():
    bank = NoiseBank.from_tensors(torch.tensor([10.0, 999.0]), torch.randn(2, *SHAPE))
    assert bank.timesteps.dtype == torch.long  # whole values: DDPM steps
    fitted = bank.check_fits(SHAPE, FLOW)
    assert fitted.timesteps.dtype == torch.float64 and fitted.timesteps.tolist() == [10.0, 999.0]
    assert torch.equal(fitted.noise, bank.noise)
    with pytest.raises(ValueError, match=r"flow-matching timesteps must lie in \(0, 1000\]"):
        NoiseBank.from_tensors(torch.tensor([0, 10]), bank.noise).check_fits(SHAPE, FLOW)


def test_a_bank_for_a_flow_process_holds_its_grid_timesteps():
    bank = NoiseBank.sample(4, SHAPE, seed=0, schedule="stratified", process=FLOW)
    assert bank.timesteps.dtype == torch.float64
    assert torch.equal(bank.timesteps, FLOW.grid[torch.tensor([125, 375, 625, 875])])
    assert torch.equal(bank.noise, NoiseBank.sample(4, SHAPE, seed=0, schedule="stratified").noise)
