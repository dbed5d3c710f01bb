"""Triton kernels against the PyTorch reference, on the GPU or, without one, on the CPU through
Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py). Awkward sizes, fresh random
non-zero inputs, buffers poisoned before every run.

Tolerances, per dtype:
- noisy_latents: fp32 output within 1e-6 relative (the same fp32 formula, no FMA contraction);
  fp16/bf16 output within one unit in the last place of that dtype (the interpreter rounds
  fp32 -> bf16 by truncation, a GPU to nearest even).
- item_error: 1e-5 relative for every input dtype (inputs upcast exactly; only the fp32
  summation order differs, and on a GPU the target c z0 + d eps may be one fused multiply-add).

Both sides take the same per-item coefficients (a, b, c, d) of `noise.ForwardProcess`, for the
three process kinds: epsilon, v_prediction and flow (diffusers' FlowMatchEulerDiscreteScheduler
with SD3's shift 3: c = -1, d = 1).
- topk_similarity: values 1e-5 relative (fp32 accumulation, another order); indices exact.
"""
import diffusers
import pytest
import torch

from itm_engine import kernels
from itm_engine.kernels import reference
from itm_engine.noise import ForwardProcess

triton_ops = pytest.importorskip("itm_engine.kernels.triton_ops")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not triton_ops.supports(DEVICE), reason="Triton cannot run here (no GPU, and TRITON_INTERPRET is not 1)"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OUT_RTOL = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# (B, latent shape, N, S): B=1; 4x7x9 = 252 elements (not a multiple of any block); 4x64x64 (split reduction).
LATENT_CASES = [(1, (4, 7, 9), 2, 3), (7, (4, 7, 9), 3, 4), (3, (4, 64, 64), 2, 2)]
T = 1000
_ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0).float()
PROCESSES = {
    "epsilon": ForwardProcess("epsilon", T, torch.arange(T, dtype=torch.float64), _ALPHAS_CUMPROD),
    "v_prediction": ForwardProcess("v_prediction", T, torch.arange(T, dtype=torch.float64), _ALPHAS_CUMPROD),
    "flow": ForwardProcess.from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(T, shift=3.0)),
}


def randn(*shape: int, dtype: torch.dtype = torch.float32, gen: torch.Generator) -> torch.Tensor:
    """Standard normal values pushed away from zero (never exactly 0), cast to dtype, on DEVICE."""
    x = torch.randn(*shape, generator=gen)
    return (x + x.sign() * 0.1).to(device=DEVICE, dtype=dtype)


def work_items(b: int, shape: tuple[int, ...], n: int, s: int, dtype: torch.dtype, seed: int,
               kind: str = "epsilon") -> dict:
    """Random latents, noise and work items with repeated indices (item 0's indices reappear), and
    their coefficients float32 [b, 4] under the `kind` process at random training-grid positions."""
    gen = torch.Generator().manual_seed(seed)
    img_idx, sample_idx = torch.randint(0, n, (b,), generator=gen), torch.randint(0, s, (b,), generator=gen)
    positions = torch.randint(0, T, (b,), generator=gen)
    if b > 2:
        img_idx[-1], sample_idx[-1], positions[-1] = img_idx[0], sample_idx[0], positions[0]
    process = PROCESSES[kind]
    return {
        "latents": randn(n, *shape, dtype=dtype, gen=gen),
        "noise": randn(s, *shape, dtype=dtype, gen=gen),
        "img_idx": img_idx.to(DEVICE),
        "sample_idx": sample_idx.to(DEVICE),
        "coefficients": process.coefficients(process.from_grid(positions)).to(DEVICE),
    }


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Make every torch.empty poisoned: NaN for floats, the largest value for integers (a key that
    would win any top-k), so a buffer the kernels leave partly unwritten shows."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else torch.iinfo(out.dtype).max)

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.mark.parametrize("kind", ["epsilon", "flow"])  # v_prediction has epsilon's a and b
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, shape, n, s", LATENT_CASES)
def test_noisy_latents_matches_reference(b, shape, n, s, dtype, kind):
    items = work_items(b, shape, n, s, dtype, seed=b, kind=kind)
    want = reference.noisy_latents(**items)
    out = torch.full((b, *shape), float("nan"), dtype=dtype, device=DEVICE)
    got = triton_ops.noisy_latents(**items, out=out)
    assert got is out
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), rtol=OUT_RTOL[dtype], atol=1e-6)


def test_noisy_latents_allocates_the_latents_dtype(poisoned_empty):
    items = work_items(2, (4, 7, 9), 2, 2, torch.bfloat16, seed=11)
    got = triton_ops.noisy_latents(**items)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 4, 7, 9) and not got.isnan().any()
    torch.testing.assert_close(got.float(), reference.noisy_latents(**items).float(), rtol=2.0**-7, atol=1e-6)


def test_noisy_latents_into_a_buffer_of_another_dtype_and_layout():
    """fp32 latents into an fp16 channels-last buffer, int32 indices, strided coefficients: out's
    dtype wins, out is returned."""
    items = work_items(5, (4, 7, 9), 3, 3, torch.float32, seed=12, kind="flow")
    items.update({key: items[key].int() for key in ("img_idx", "sample_idx")})
    coefficients = items["coefficients"]
    items["coefficients"] = torch.stack([coefficients, -coefficients], dim=2).flatten(1)[:, ::2]  # strides (8, 2)
    out = torch.full((5, 4, 7, 9), float("nan"), dtype=torch.float16, device=DEVICE)
    out = out.to(memory_format=torch.channels_last)
    want = reference.noisy_latents(**items, out=torch.empty_like(out))
    got = triton_ops.noisy_latents(**items, out=out)
    assert got is out and not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), rtol=2.0**-10, atol=1e-6)


def error_args(pred: torch.Tensor, items: dict, with_latents: bool) -> tuple:
    """item_error's arguments; the latents only `with_latents` (else the target is d eps)."""
    latents = items["latents"] if with_latents else None
    return pred, items["noise"], items["sample_idx"], items["coefficients"], latents, items["img_idx"]


@pytest.mark.parametrize("kind", list(PROCESSES))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, shape, n, s", LATENT_CASES)
def test_item_error_matches_reference(b, shape, n, s, dtype, kind, poisoned_empty):
    """The target c z0 + d eps of each process kind; an epsilon target without latents (d eps)."""
    items = work_items(b, shape, n, s, dtype, seed=100 + b, kind=kind)
    pred = randn(b, *shape, dtype=dtype, gen=torch.Generator().manual_seed(b))
    args = error_args(pred, items, with_latents=kind != "epsilon")
    got = triton_ops.item_error(*args)
    want = reference.item_error(*args)
    assert got.dtype == torch.float32 and got.shape == (b,)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", ["epsilon", "flow"])
def test_item_error_reads_a_channels_last_prediction_in_place(kind, poisoned_empty):
    """A channels-last UNet returns NHWC predictions: read with their strides, no NCHW copy."""
    items = work_items(3, (4, 7, 9), 2, 3, torch.float16, seed=21, kind=kind)
    pred = randn(3, 4, 7, 9, dtype=torch.float16, gen=torch.Generator().manual_seed(21))
    pred = pred.to(memory_format=torch.channels_last)
    args = error_args(pred, items, with_latents=kind != "epsilon")
    torch.testing.assert_close(triton_ops.item_error(*args), reference.item_error(*args), rtol=1e-5, atol=0)


def test_item_error_of_an_item_does_not_depend_on_its_batch():
    """Bitwise: the split reduction depends on C*H*W only, never on the batch size."""
    items = work_items(4, (4, 64, 64), 2, 2, torch.float16, seed=7, kind="v_prediction")
    pred = randn(4, 4, 64, 64, dtype=torch.float16, gen=torch.Generator().manual_seed(7))

    def errors(rows: slice) -> torch.Tensor:
        return triton_ops.item_error(
            pred[rows], items["noise"], items["sample_idx"][rows], items["coefficients"][rows], items["latents"],
            items["img_idx"][rows],
        )

    assert torch.equal(errors(slice(None))[2:3], errors(slice(2, 3)))


def test_item_error_rejects_bad_arguments_like_the_reference():
    items = work_items(2, (4, 7, 9), 2, 2, torch.float32, seed=3, kind="flow")
    pred = randn(2, 4, 7, 9, gen=torch.Generator().manual_seed(3))
    noise, sample_idx, coefficients = items["noise"], items["sample_idx"], items["coefficients"]
    for module in (reference, triton_ops):
        with pytest.raises(ValueError, match="latents need img_idx"):
            module.item_error(pred, noise, sample_idx, coefficients, items["latents"])
        for bad in (coefficients.double(), coefficients[:, :3], coefficients[:1]):
            with pytest.raises(ValueError, match=r"coefficients must be float32 \[B, 4\] with B = 2"):
                module.item_error(pred, noise, sample_idx, bad, items["latents"], items["img_idx"])
            with pytest.raises(ValueError, match=r"coefficients must be float32 \[B, 4\] with B = 2"):
                module.noisy_latents(items["latents"], noise, items["img_idx"], sample_idx, bad)
    # Without latents: the reference refuses a latent term; Triton does not read c (no device sync).
    with pytest.raises(ValueError, match="needs latents and img_idx"):
        reference.item_error(pred, noise, sample_idx, coefficients)
    eps_only = coefficients * torch.tensor([1.0, 1.0, 0.0, 1.0], device=DEVICE)
    torch.testing.assert_close(triton_ops.item_error(pred, noise, sample_idx, coefficients),
                               reference.item_error(pred, noise, sample_idx, eps_only), rtol=1e-5, atol=0)


def full_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: top-k of the whole [Q, G] fp32 product, ties to the lower index (stable sort)."""
    scores = queries.float() @ gallery.float().T
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), order


# (Q, G, D, k, chunk_size); block is 128 gallery rows x 32 dims.
TOPK_CASES = [
    (1, 50, 24, 1, 65536),  # Q=1, G < block, D < block, k=1
    (1, 50, 24, 50, 65536),  # k = G
    (5, 300, 100, 7, 128),  # G not a multiple of the block or the chunk; D over several blocks
    (5, 300, 40, 300, 100),  # k = G > block (every key kept), chunk not a multiple of the block
    (70, 1000, 64, 10, 65536),  # the large case: two query blocks, eight gallery blocks
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q, g, d, k, chunk", TOPK_CASES)
def test_topk_similarity_matches_the_full_product(q, g, d, k, chunk, dtype, poisoned_empty):
    gen = torch.Generator().manual_seed(q + g + d + k)
    queries, gallery = randn(q, d, dtype=dtype, gen=gen), randn(g, d, dtype=dtype, gen=gen)
    values, indices = triton_ops.topk_similarity(queries, gallery, k, chunk_size=chunk)
    want_values, want_indices = full_topk(queries, gallery, k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64 and values.shape == (q, k)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values, rtol=1e-5, atol=1e-5 * want_values.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_similarity_breaks_ties_by_lower_index(dtype, poisoned_empty):
    """Integer embeddings: every score is exact in every dtype, and duplicated gallery rows (across
    blocks and chunks) tie exactly, so the order of equal scores is fully determined."""
    gen = torch.Generator().manual_seed(5)
    levels = torch.tensor([-2.0, -1.0, 1.0, 2.0])
    rows = levels[torch.randint(0, 4, (40, 16), generator=gen)]
    gallery = rows[torch.randint(0, 40, (300,), generator=gen)].to(device=DEVICE, dtype=dtype)
    queries = levels[torch.randint(0, 4, (6, 16), generator=gen)].to(device=DEVICE, dtype=dtype)
    queries[0] = gallery[250]  # its best rows are all the copies of row 250, the first copy first
    values, indices = triton_ops.topk_similarity(queries, gallery, 30, chunk_size=100)
    want_values, want_indices = full_topk(queries, gallery, 30)
    assert torch.equal(indices, want_indices) and torch.equal(values, want_values)
    assert (values[:, :-1] == values[:, 1:]).any()  # the case really has ties
    assert torch.equal(indices, reference.topk_similarity(queries, gallery, 30, chunk_size=100)[1])


def test_topk_similarity_rejects_k_outside_the_gallery():
    queries, gallery = torch.ones(2, 8, device=DEVICE), torch.ones(5, 8, device=DEVICE)
    for k in (6, 0):
        with pytest.raises(ValueError, match="k must be between 1 and the gallery size 5"):
            kernels.topk_similarity(queries, gallery, k, backend="triton")


def test_the_dispatcher_reaches_the_triton_ops():
    items = work_items(3, (4, 7, 9), 2, 2, torch.float32, seed=9)
    x_t = kernels.noisy_latents(**items, backend="triton")
    kernels.item_error(x_t, items["noise"], items["sample_idx"], items["coefficients"], backend="triton")
    kernels.topk_similarity(x_t.flatten(1), items["latents"].flatten(1), 2, backend="triton")
    assert {op: kernels.last_backend[op] for op in kernels.OPS} == dict.fromkeys(kernels.OPS, "triton")
