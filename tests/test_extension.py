"""The csrc/ C++ extension's ops (torch.ops.itm_engine.*) against the PyTorch reference, on the CPU
and, where `torch.cuda.is_available()` and the extension was built with CUDA kernels, on CUDA (the
`device` fixture: the "cuda" cases are collected and skipped otherwise). Expected values are computed
on the same device (by reference.py; for top-k, by torch.topk of the full float32 product).

Tolerances, per op and input dtype (the same on both devices):
- noisy_latents: both sides compute in float32 with the same roundings (no fused multiply-add)
  and round once to the output dtype, so results agree to within one unit in the last place of
  the output dtype (fp32 and fp64: rtol 2e-7, fp16: rtol 1e-3, bf16: rtol 8e-3); in practice
  bit-exact.
- item_error: elementwise terms are identical for every input dtype (inputs are widened exactly
  to float32; the target c z0 + d eps is rounded as the reference rounds it, checked bitwise on
  one-element items); only the summation order differs (float32 pairwise vs float32 lanes +
  float64 blocks), hence rtol 1e-5 for every input dtype.
- topk_similarity: values rtol 1e-5 (float32 dot products, same BLAS); indices exactly equal.

Both sides take the same per-item coefficients (a, b, c, d) of `noise.ForwardProcess`, for the
three process kinds: epsilon, v_prediction (the same a, b; c = -b, d = a) and flow (a = 1 - sigma,
b = sigma, c = -1, d = 1; diffusers' FlowMatchEulerDiscreteScheduler with SD3's shift 3).

On CUDA: noisy_latents rounds with __fmul_rn/__fadd_rn, as PyTorch's separate CUDA multiply and
add kernels do, so the float32 results are bit-exact (same rtol as above). item_error: a per-thread
float32 sum and a fixed tree vs PyTorch's CUDA mean, rtol 1e-5. topk_similarity: half/bf16 chunks
are converted to float32 before the cuBLAS product, as `_full_topk` does; TF32 is disabled in the
cuda cases (`torch.backends.cuda.matmul.allow_tf32 = False`, set by the fixture) so both sides are
true float32 products; values rtol 1e-5 (atol 1e-5), indices exactly equal. Index range errors, and
a latent term without latents in item_error, are checked on the CPU only: the CUDA kernels check
them with device-side asserts, which leave the CUDA context unusable.
"""
from __future__ import annotations

import os

import diffusers
import pytest
import torch

from itm_engine import kernels
from itm_engine.kernels import extension, reference
from itm_engine.noise import ForwardProcess

if not extension.load():
    pytest.skip(
        "itm_engine._C was not built (ITM_BUILD_EXT=0 or a failed build): `pip install --no-build-isolation -e .`",
        allow_module_level=True,
    )

# float64 is computed in float32 too (as the reference does), so a float64 engine can use the extension.
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
RTOL = {torch.float32: 2e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 2e-7}
ITEM_SHAPES = ((4, 7, 9), (4, 64, 64))  # C*H*W = 252 (no vector width divides it) and 16384
T = 1000

if not torch.cuda.is_available():
    _NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"
elif not torch.ops.itm_engine.has_cuda():
    _NO_CUDA = "itm_engine._C was built without CUDA kernels (ITM_BUILD_CUDA=0 or no nvcc)"
else:
    _NO_CUDA = ""


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(bool(_NO_CUDA), reason=_NO_CUDA))])
def device(request, monkeypatch) -> str:
    """Each test taking `device` runs on the CPU and on CUDA; on CUDA with TF32 matmuls disabled."""
    if request.param == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    return request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _processes() -> dict[str, ForwardProcess]:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    alphas_cumprod, grid = torch.cumprod(1 - betas, 0).float(), torch.arange(T, dtype=torch.float64)
    return {
        "epsilon": ForwardProcess("epsilon", T, grid, alphas_cumprod),
        "v_prediction": ForwardProcess("v_prediction", T, grid, alphas_cumprod),
        "flow": ForwardProcess.from_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(T, shift=3.0)),
    }


PROCESSES = _processes()
KINDS = tuple(PROCESSES)


def _coefficients(timesteps: torch.Tensor, kind: str = "epsilon") -> torch.Tensor:
    """(a, b, c, d) float32 [B, 4] of the `kind` process at training-grid positions `timesteps`
    [B] (on their device)."""
    process = PROCESSES[kind]
    return process.coefficients(process.from_grid(timesteps.cpu()).to(timesteps.device))


def _items(
    n_items: int, shape: tuple[int, ...], n_latents: int, n_noise: int, dtype: torch.dtype, seed: int, device="cpu"
):
    """latents, noise, img_idx, sample_idx, timesteps (grid positions) on `device`: random (drawn on
    the CPU), with repeated indices and t in {0, T-1}."""
    g = _gen(seed)
    latents = (torch.randn(n_latents, *shape, generator=g) + 0.5).to(dtype)
    noise = (torch.randn(n_noise, *shape, generator=g) - 0.5).to(dtype)
    img_idx = torch.randint(0, n_latents, (n_items,), generator=g)
    sample_idx = torch.randint(0, n_noise, (n_items,), generator=g)
    timesteps = torch.randint(0, T, (n_items,), generator=g)
    if n_items > 2:
        img_idx[1] = img_idx[0]  # repeated latent and noise draw, with different timesteps
        sample_idx[1] = sample_idx[0]
        timesteps[:2] = torch.tensor([0, T - 1])
    return tuple(t.to(device) for t in (latents, noise, img_idx, sample_idx, timesteps))


# ---- noisy_latents --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["epsilon", "flow"])  # v_prediction has epsilon's a and b
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ITEM_SHAPES)
@pytest.mark.parametrize("n_items", [1, 7])
def test_noisy_latents_matches_reference(n_items, shape, dtype, kind, device):
    latents, noise, img_idx, sample_idx, timesteps = _items(n_items, shape, 3, 4, dtype, seed=n_items, device=device)
    coefficients = _coefficients(timesteps, kind)
    expected = reference.noisy_latents(latents, noise, img_idx, sample_idx, coefficients)

    out = torch.full((n_items, *shape), float("nan"), dtype=dtype, device=device)
    returned = extension.noisy_latents(latents, noise, img_idx, sample_idx, coefficients, out=out)
    assert returned is out
    assert not out.isnan().any(), "output buffer not fully written"
    torch.testing.assert_close(out, expected, rtol=RTOL[dtype], atol=0)

    allocated = extension.noisy_latents(latents, noise, img_idx, sample_idx, coefficients)
    assert allocated.dtype == dtype and allocated.shape == out.shape
    torch.testing.assert_close(allocated, expected, rtol=RTOL[dtype], atol=0)


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_noisy_latents_mixed_dtypes_and_strided_tensors(out_dtype, device):
    """fp16 latents, bf16 noise, any `out` dtype; non-contiguous inputs, coefficients and `out`."""
    g = _gen(1)
    latents = torch.randn(3, 9, 7, 4, generator=g).half().to(device).permute(0, 3, 2, 1)  # [3, 4, 7, 9], strided
    noise = torch.randn(5, 4, 7, 9, generator=g).bfloat16().to(device)
    img_idx, sample_idx = torch.tensor([2, 0, 2, 1, 2], device=device), torch.tensor([4, 4, 0, 3, 1], device=device)
    coefficients = _coefficients(torch.tensor([999, 0, 17, 500, 500], device=device), "flow")
    strided = torch.stack([coefficients, -coefficients], dim=2).flatten(1)[:, ::2]  # [5, 4], strides (8, 2)
    expected = torch.empty(5, 4, 7, 9, dtype=out_dtype, device=device)
    reference.noisy_latents(latents, noise, img_idx, sample_idx, coefficients, out=expected)

    out = torch.full((5, 4, 9, 7), float("nan"), dtype=out_dtype, device=device).transpose(2, 3)  # strided
    returned = extension.noisy_latents(latents, noise, img_idx, sample_idx, strided, out=out)
    assert returned is out and not out.isnan().any()
    torch.testing.assert_close(out, expected, rtol=RTOL[out_dtype], atol=0)
    wide = torch.cat([coefficients, torch.full((5, 2), float("nan"), device=device)], dim=1)  # extra columns unread
    torch.testing.assert_close(extension.noisy_latents(latents, noise, img_idx, sample_idx, wide, out=out), expected,
                               rtol=RTOL[out_dtype], atol=0)


def test_noisy_latents_rejects_bad_arguments(device):
    latents, noise, img_idx, sample_idx, timesteps = _items(3, (4, 7, 9), 2, 2, torch.float32, seed=3, device=device)
    coefficients = _coefficients(timesteps)
    if device == "cpu":  # CUDA: device-side asserts (see the module docstring)
        with pytest.raises(RuntimeError, match="img_idx.*out of range"):
            extension.noisy_latents(latents, noise, img_idx + 2, sample_idx, coefficients)
    with pytest.raises(RuntimeError, match="item shape"):
        extension.noisy_latents(latents, noise[:, :3], img_idx, sample_idx, coefficients)
    with pytest.raises(RuntimeError, match="float32, float16, bfloat16 or float64"):
        extension.noisy_latents(latents.int(), noise, img_idx, sample_idx, coefficients)
    for bad in (coefficients.double(), coefficients[:, :3], coefficients[:2], coefficients[:, 0]):
        with pytest.raises(RuntimeError, match=r"coefficients must be float32 \[B, 4\] with B = 3 items"):
            extension.noisy_latents(latents, noise, img_idx, sample_idx, bad)
    if device == "cuda":
        with pytest.raises(RuntimeError, match="coefficients is on cpu but the other inputs are on cuda"):
            extension.noisy_latents(latents, noise, img_idx, sample_idx, coefficients.cpu())


# ---- item_error -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ITEM_SHAPES)
@pytest.mark.parametrize("n_items", [1, 7])
def test_item_error_matches_reference(n_items, shape, dtype, kind, device):
    """The target c z0 + d eps of each process kind; an epsilon target without latents (d eps)."""
    latents, noise, img_idx, sample_idx, timesteps = _items(n_items, shape, 3, 4, dtype, 10 + n_items, device)
    pred = torch.randn(n_items, *shape, generator=_gen(99)).to(device, dtype)
    args = (pred, noise, sample_idx, _coefficients(timesteps, kind), None if kind == "epsilon" else latents, img_idx)

    err = extension.item_error(*args)
    assert err.dtype == torch.float32 and err.shape == (n_items,)
    assert err.isfinite().all() and (err > 0).all()
    torch.testing.assert_close(err, reference.item_error(*args), rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_item_error_terms_round_as_the_reference(kind, device):
    """One-element items: the error is one squared term, so the target c z0 + d eps (v: bitwise the
    former a eps - s z0, see test_noise_forward) must round as the reference rounds it."""
    latents, noise, img_idx, sample_idx, timesteps = _items(64, (1, 1, 1), 5, 6, torch.float32, seed=8, device=device)
    pred = torch.randn(64, 1, 1, 1, generator=_gen(8)).to(device)
    args = (pred, noise, sample_idx, _coefficients(timesteps, kind), latents, img_idx)
    assert torch.equal(extension.item_error(*args), reference.item_error(*args))


def test_item_error_strided_pred_and_argument_errors(device):
    latents, noise, img_idx, sample_idx, timesteps = _items(5, (4, 7, 9), 3, 4, torch.float32, seed=5, device=device)
    pred = torch.randn(5, 9, 7, 4, generator=_gen(6)).to(device).permute(0, 3, 2, 1)
    epsilon, flow = _coefficients(timesteps), _coefficients(timesteps, "flow")
    torch.testing.assert_close(
        extension.item_error(pred, noise, sample_idx, epsilon), reference.item_error(pred, noise, sample_idx, epsilon),
        rtol=1e-5, atol=0,
    )
    torch.testing.assert_close(  # an epsilon target with latents: c = 0, the same error
        extension.item_error(pred, noise, sample_idx, epsilon, latents, img_idx),
        reference.item_error(pred, noise, sample_idx, epsilon), rtol=1e-5, atol=0,
    )
    with pytest.raises(RuntimeError, match="latents need img_idx"):
        extension.item_error(pred, noise, sample_idx, flow, latents)
    with pytest.raises(RuntimeError, match=r"coefficients must be float32 \[B, 4\] with B = 5 items"):
        extension.item_error(pred, noise, sample_idx, flow[:, :3], latents, img_idx)
    if device == "cpu":  # CUDA: device-side asserts (see the module docstring)
        with pytest.raises(RuntimeError, match="sample_idx.*out of range"):
            extension.item_error(pred, noise, sample_idx + 4, epsilon)
        with pytest.raises(RuntimeError, match=r"coefficients\[0, 2\] = -1 but no latents were given"):
            extension.item_error(pred, noise, sample_idx, flow)


# ---- topk_similarity ------------------------------------------------------------------------


def _full_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk of the whole float32 product, with equal values ordered by index (stable sort)."""
    full = queries.float() @ gallery.float().T
    values, indices = torch.topk(full, k, dim=1)
    order = full.sort(dim=1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(values, full.gather(1, order)), "torch.topk and the stable sort disagree on values"
    return values, order


@pytest.mark.parametrize(
    ("n_queries", "n_gallery", "dim", "k", "chunk_size"),
    [
        (1, 50, 16, 5, 64),  # Q = 1, G < chunk
        (7, 1000, 33, 10, 96),  # G not a multiple of the chunk
        (5, 300, 24, 1, 64),  # k = 1
        (3, 100, 8, 100, 32),  # k = G
        (4, 200, 40, 50, 16),  # k larger than a chunk
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_matches_full_topk(n_queries, n_gallery, dim, k, chunk_size, dtype, device):
    g = _gen(n_gallery + k)
    queries = torch.randn(n_queries, dim, generator=g).to(device, dtype)
    gallery = torch.randn(n_gallery, dim, generator=g).to(device, dtype)
    values, indices = extension.topk_similarity(queries, gallery, k, chunk_size=chunk_size)
    expected_values, expected_indices = _full_topk(queries, gallery, k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64 and values.shape == (n_queries, k)
    torch.testing.assert_close(values, expected_values, rtol=1e-5, atol=1e-5)
    assert torch.equal(indices, expected_indices)


@pytest.mark.parametrize("chunk_size", [4, 7, 1000])
def test_topk_ties_lower_index_wins(chunk_size, device):
    """Duplicate gallery rows give exactly equal products (dyadic values: exact sums); the lower
    index must come first, across chunk boundaries too."""
    g = _gen(chunk_size)
    base = torch.randint(1, 5, (6, 12), generator=g) * (torch.randint(0, 2, (6, 12), generator=g) * 2 - 1) / 4
    gallery = base[torch.tensor([3, 0, 3, 5, 1, 0, 3, 2, 4, 5, 1, 3, 0, 2])].to(device)  # every row repeated
    queries = (torch.randint(1, 5, (3, 12), generator=g) / 8).to(device)
    k = gallery.shape[0]
    values, indices = extension.topk_similarity(queries, gallery, k, chunk_size=chunk_size)
    expected_values, expected_indices = _full_topk(queries, gallery, k)
    assert torch.equal(values, expected_values)
    assert torch.equal(indices, expected_indices)
    # Where a value repeats, the indices increase.
    same = values[:, 1:] == values[:, :-1]
    assert same.any() and (indices[:, 1:] > indices[:, :-1])[same].all()


def test_topk_rejects_bad_k(device):
    queries, gallery = torch.randn(2, 8, device=device), torch.randn(5, 8, device=device)
    with pytest.raises(ValueError, match="k must be between 1 and the gallery size 5"):
        extension.topk_similarity(queries, gallery, 6)
    with pytest.raises(RuntimeError, match="k must be between 1 and the gallery size 5"):  # the op checks too
        torch.ops.itm_engine.topk_similarity(queries, gallery, 0, 4)


# ---- dispatch -------------------------------------------------------------------------------


def test_dispatcher_reaches_the_extension(monkeypatch):
    monkeypatch.delenv("ITM_KERNELS", raising=False)
    assert extension.supports(torch.device("cpu"))
    if os.environ.get("ITM_BUILD_CUDA") == "1":  # set by .ci/run where nvcc exists
        assert torch.ops.itm_engine.has_cuda(), "ITM_BUILD_CUDA=1 but the extension was built without CUDA"
    latents, noise, img_idx, sample_idx, timesteps = _items(3, (4, 7, 9), 2, 2, torch.float32, seed=7)
    coefficients = _coefficients(timesteps)
    x_t = kernels.noisy_latents(latents, noise, img_idx, sample_idx, coefficients, backend="ext")
    assert kernels.last_backend["noisy_latents"] == "ext"
    torch.testing.assert_close(x_t, reference.noisy_latents(latents, noise, img_idx, sample_idx, coefficients))

    kernels.item_error(x_t, noise, sample_idx, coefficients)  # auto: the extension is the CPU's first choice
    assert kernels.last_backend["item_error"] == "ext"
    kernels.topk_similarity(torch.randn(2, 8), torch.randn(5, 8), 3, backend="ext")
    assert kernels.last_backend["topk_similarity"] == "ext"
