"""Fused-op benchmarks: every available backend against the PyTorch reference at realistic sizes.

    make bench-kernels                        # CPU here, CUDA where a GPU is present
    ITM_BENCH_DEVICE=cpu make bench-kernels   # force a device

Each case records in `extra_info` the bytes it must move and the achieved GB/s (for the
element-wise ops) and, on CUDA, the device-to-device copy bandwidth measured in the same run, so
`benchmarks/summarize.py` can print the fraction of it that each kernel reaches.
"""
from __future__ import annotations

import os

import pytest
import torch

from itm_engine import kernels
from itm_engine.models import ddpm_scheduler
from itm_engine.noise import ForwardProcess

DEVICE = torch.device(os.environ.get("ITM_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
# The Triton interpreter (TRITON_INTERPRET=1) is a test tool, not a backend worth timing.
BACKENDS = [
    b for b in kernels.BACKENDS if kernels.available(b, DEVICE) and not (b == "triton" and DEVICE.type == "cpu")
]
DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if DEVICE.type == "cuda" else [])

B, S, N, LATENT = 64, 10, 16, (4, 64, 64)
# The forward process of each item_error target: eps (c = 0, no latent read) and v (c != 0).
PROCESSES = {target: ForwardProcess.from_scheduler(ddpm_scheduler(kind))
             for target, kind in (("epsilon", "epsilon"), ("v", "v_prediction"))}
TOPK_SIZES = [(1000, 100_000, 768, 10)] + ([(1000, 1_000_000, 768, 10)] if DEVICE.type == "cuda" else [])


def _timed(benchmark, fn, *args, **kwargs):
    """Benchmark `fn`, synchronising CUDA so the timings cover the kernels."""

    def call():
        result = fn(*args, **kwargs)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return result

    call()  # warm-up: compilation / autotuning stay out of the timings
    return benchmark(call)


def _record_bandwidth(benchmark, nbytes: int) -> None:
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    benchmark.extra_info["gb_per_s"] = nbytes / benchmark.stats.stats.median / 1e9


@pytest.fixture(scope="module")
def latent_inputs():
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(N, *LATENT, generator=gen)
    noise = torch.randn(S, *LATENT, generator=gen)
    img_idx = torch.randint(0, N, (B,), generator=gen)
    sample_idx = torch.randint(0, S, (B,), generator=gen)
    timesteps = torch.randint(0, 1000, (B,), generator=gen)
    pred = torch.randn(B, *LATENT, generator=gen)
    return [t.to(DEVICE) for t in (latents, noise, img_idx, sample_idx, timesteps, pred)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_noisy_latents(benchmark, latent_inputs, backend, dtype):
    latents, noise, img_idx, sample_idx, timesteps, _ = latent_inputs
    latents, noise = latents.to(dtype), noise.to(dtype)
    coefficients = PROCESSES["epsilon"].coefficients(timesteps)
    out = torch.empty((B, *LATENT), dtype=dtype, device=DEVICE)
    benchmark.group = f"noisy_latents {str(dtype).split('.')[-1]}"
    _timed(benchmark, kernels.noisy_latents, latents, noise, img_idx, sample_idx, coefficients, out=out,
           backend=backend)
    _record_bandwidth(benchmark, 3 * out.numel() * out.element_size())  # gather z0, eps; write x_t


@pytest.mark.parametrize("target", ["epsilon", "v"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_item_error(benchmark, latent_inputs, backend, dtype, target):
    latents, noise, img_idx, sample_idx, timesteps, pred = latent_inputs
    pred, noise, latents = pred.to(dtype), noise.to(dtype), latents.to(dtype)
    coefficients = PROCESSES[target].coefficients(timesteps)
    latents = latents if target == "v" else None  # an eps target reads no latent
    benchmark.group = f"item_error {target} {str(dtype).split('.')[-1]}"
    _timed(benchmark, kernels.item_error, pred, noise, sample_idx, coefficients, latents, img_idx, backend=backend)
    reads = 2 + (target == "v")  # pred, eps (and z0 for v)
    _record_bandwidth(benchmark, reads * pred.numel() * pred.element_size())


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the copy-bandwidth ceiling is a GPU figure")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_copy_bandwidth_ceiling(benchmark, dtype):
    """Device-to-device copy of the same bytes as noisy_latents: the ceiling to compare with."""
    src = torch.randn(2 * B, *LATENT, device=DEVICE).to(dtype)
    dst = torch.empty_like(src)
    benchmark.group = "copy ceiling"
    _timed(benchmark, dst.copy_, src)
    _record_bandwidth(benchmark, 2 * src.numel() * src.element_size())


@pytest.mark.parametrize("sizes", TOPK_SIZES, ids=lambda s: "Q{}-G{}-D{}-k{}".format(*s))
@pytest.mark.parametrize("backend", BACKENDS + ["matmul+topk"])
def test_topk_similarity(benchmark, backend, sizes):
    q_count, g_count, dim, k = sizes
    dtype = torch.float16 if DEVICE.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(q_count, dim, generator=gen).to(DEVICE, dtype)
    gallery = torch.randn(g_count, dim, generator=gen).to(DEVICE, dtype)
    benchmark.group = f"topk_similarity Q={q_count} G={g_count} D={dim} k={k} {str(dtype).split('.')[-1]}"
    if backend == "matmul+topk":  # the plain baseline: materialises [Q, G]
        _timed(benchmark, lambda: torch.topk(queries @ gallery.T, k))
    else:
        _timed(benchmark, kernels.topk_similarity, queries, gallery, k, backend=backend)
    benchmark.extra_info["tflops"] = 2 * q_count * g_count * dim / benchmark.stats.stats.median / 1e12
