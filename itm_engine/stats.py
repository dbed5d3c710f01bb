"""Run statistics: what a scoring call did and where its time went (`scorer.last_stats`)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch


@dataclass
class RunStats:
    """Counters and per-stage seconds of one scoring call.

    Stages: "preprocess" (image decoding/resizing), "vae", "text_encoder", "unet",
    "reduction" (noisy latents + per-item error), "total".
    """

    unet_items: int = 0
    padded_items: int = 0  # extra rows run to keep batch shapes fixed (compile), results dropped
    unet_calls: int = 0
    images_encoded: int = 0
    texts_encoded: int = 0
    texts_reloaded: int = 0  # captions read back from the text cache's spill folder instead of encoded
    batch_size: int = 0
    kernels: dict[str, str] = field(default_factory=dict)  # fused op -> backend that ran it
    seconds: dict[str, float] = field(default_factory=dict)
    full_items: int | None = None  # adaptive runs: the UNet items of scoring every candidate on every draw
    evicted: int = 0  # cache entries evicted to keep the caches' byte budgets
    cache_bytes: dict[str, int] = field(default_factory=dict)  # cache ("latent", "text") -> bytes held after the call
    _events: list = field(default_factory=list, repr=False)  # (stage, start, end) CUDA events not yet read

    def add(self, other: "RunStats") -> None:
        """Accumulate another call's counters and seconds into this one (batch size: the largest)."""
        other.settle()
        for name in ("unet_items", "padded_items", "unet_calls", "images_encoded", "texts_encoded", "texts_reloaded",
                     "evicted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.batch_size = max(self.batch_size, other.batch_size)
        self.kernels.update(other.kernels)
        self.cache_bytes.update(other.cache_bytes)
        for stage, seconds in other.seconds.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextmanager
    def timer(self, stage: str, device: torch.device | None = None) -> Iterator[None]:
        """Add the time of the block to `seconds[stage]`: its wall time, or for work queued on a
        CUDA `device` the GPU time between two CUDA events on the current stream, read by `settle`
        (the host never waits for the device here, so it keeps queueing work ahead)."""
        if device is not None and device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((stage, start, end))
            return
        start_time = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start_time

    def settle(self) -> None:
        """Add the CUDA-event timings recorded so far to `seconds` (one wait for the last event)."""
        if not self._events:
            return
        self._events[-1][2].synchronize()
        for stage, start, end in self._events:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + start.elapsed_time(end) / 1000.0
        self._events.clear()

    @property
    def items_per_second(self) -> float:
        """UNet work items per second of UNet + reduction time."""
        self.settle()
        busy = self.seconds.get("unet", 0.0) + self.seconds.get("reduction", 0.0)
        return self.unet_items / busy if busy > 0 else 0.0

    def as_dict(self) -> dict:
        """A JSON-ready copy, with items_per_second."""
        self.settle()
        return {
            "unet_items": self.unet_items,
            "padded_items": self.padded_items,
            "unet_calls": self.unet_calls,
            "images_encoded": self.images_encoded,
            "texts_encoded": self.texts_encoded,
            "texts_reloaded": self.texts_reloaded,
            "batch_size": self.batch_size,
            "kernels": dict(self.kernels),
            "seconds": dict(self.seconds),
            "items_per_second": self.items_per_second,
            "full_items": self.full_items,
            "evicted": self.evicted,
            "cache_bytes": dict(self.cache_bytes),
        }
