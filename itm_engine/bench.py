"""`itm-bench`: the engine against the research codes' own loops, side by side.

"naive" is the DiffusionITM research loop as the paper ran it (`reference.diffusion_itm_pair_scores`:
the VAE inside the draw loop, one UNet call per pair and draw), "batched" Diffusion Classifier's loop
(each image encoded once, one UNet call per pair), "pipeline" the loop that follows the model's own
diffusers pipeline (`reference.pipeline_pair_scores`, every family; one denoiser call per pair and
draw), "engine" this engine. The research loops score SD 1.x/2.x models; other families run
"pipeline" and "engine" by default. All of them run in one
process on the same workload, the same draws and the same scoring protocol (default: the
DiffusionITM research code's), with their repeats interleaved (naive, batched, engine, naive, ...)
so machine drift hits all of them; the report gives medians. The run also checks that the three
agree on the scores (exit code 1 when they do not).

    itm-bench                                   # tiny model, CPU, I2T and T2I pairs
    itm-bench --model sd21-arch --device cuda --dtype bfloat16 --workload i2t-topk --json r.json
    itm-bench --model sd3-medium-arch --device meta   # FLOPs per denoiser item only, no memory
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import PIL.Image
import PIL.ImageDraw
import torch
from torch.utils.flop_counter import FlopCounterMode

from itm_engine import extras, options, protocols
from itm_engine.models import SDComponents, load_components
from itm_engine.models.families import family_of
from itm_engine.noise import NoiseBank
from itm_engine.options import option, parse_batch_size
from itm_engine.reference import diffusion_classifier_pair_scores, diffusion_itm_pair_scores, pipeline_pair_scores
from itm_engine.scoring import DiffusionITM

METHODS = ("naive", "batched", "pipeline", "engine")
RESEARCH_METHODS = "naive,batched,engine"  # the default for SD 1.x/2.x; other families: "pipeline,engine"
PAPER_FLICKR_ITEMS = 1000 * 10 * 10  # 1000 images x top-10 captions x 10 samples
PAPER_FLICKR_MINUTES = 68  # one A6000, the paper's report
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # of the error scale

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "brown", "pink"]
RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
       "purple": (130, 50, 160), "orange": (245, 140, 30), "black": (20, 20, 20), "white": (250, 250, 250),
       "brown": (120, 75, 40), "pink": (240, 150, 190)}
SHAPES = ["circle", "square", "triangle", "ball", "box", "kite"]
SUBJECTS = ["a dog", "two children", "an old man", "a woman in a hat", "a cyclist", "a brown horse", "three birds"]
ACTIONS = ["walks past", "sits next to", "looks at", "jumps over", "plays with", "stands behind"]
PLACES = ["in a park", "on a busy street", "at the beach", "in the snow", "inside a kitchen", "near a lake"]


def make_images(n: int, size: int, seed: int) -> list[PIL.Image.Image]:
    """n distinct images: coloured shapes on a coloured background, size x size RGB."""
    rng = random.Random(seed)
    images = []
    for _ in range(n):
        image = PIL.Image.new("RGB", (size, size), RGB[rng.choice(COLOURS)])
        draw = PIL.ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 3)):
            x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
            box = (x0, y0, x0 + rng.randint(size // 8, size // 2), y0 + rng.randint(size // 8, size // 2))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=RGB[rng.choice(COLOURS)])
        images.append(image)
    return images


def make_captions(n: int, seed: int) -> list[str]:
    """n distinct, varied sentences."""
    rng = random.Random(seed)
    captions: dict[str, None] = {}
    while len(captions) < n:
        caption = (f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} a {rng.choice(COLOURS)} "
                   f"{rng.choice(SHAPES)} {rng.choice(PLACES)}")
        captions[caption] = None
    return list(captions)


@dataclass
class Workload:
    """Images, texts, the (image, text) pairs to score and the shared noise bank."""

    name: str
    mode: str
    images: list
    texts: list[str]
    pairs: list[tuple[int, int]]
    bank: NoiseBank

    @property
    def pair_draws(self) -> int:
        """Task work units: scored pairs x noise draws (what the paper's item counts count)."""
        return len(self.pairs) * len(self.bank)


def build_workloads(args: BenchConfig, components: SDComponents) -> list[Workload]:
    """The workloads of `--workload` (one per mode for "pairs"), on the protocol's shared draws."""
    protocol = args.scoring_protocol()
    seed = protocol.seed
    bank = NoiseBank.for_protocol(protocol, components.latent_shape, components.process)
    size = components.image_size
    if args.workload == "pairs":
        images, texts = make_images(args.images, size, seed), make_captions(args.texts, seed)
        pairs = [(i, j) for i in range(len(images)) for j in range(len(texts))]
        return [Workload(f"pairs-{mode}", mode, images, texts, pairs, bank) for mode in args.mode.split(",")]
    rng = random.Random(seed)
    if args.workload == "i2t-topk":  # each image with its own k candidate captions
        images, texts = make_images(args.images, size, seed), make_captions(args.images * args.topk, seed)
        pairs = [(i, i * args.topk + c) for i in range(len(images)) for c in range(args.topk)]
        return [Workload("i2t-topk", "i2t", images, texts, pairs, bank)]
    # t2i-topk: each caption with k candidate images drawn from a shared pool (null-normalised)
    images, texts = make_images(args.images, size, seed), make_captions(args.texts, seed)
    pairs = [(i, j) for j in range(len(texts)) for i in rng.sample(range(len(images)), args.topk)]
    return [Workload("t2i-topk", "t2i", images, texts, pairs, bank)]


@dataclass
class Run:
    """One timed run of one method on one workload."""

    wall_s: float
    unet_items: int
    unet_calls: int
    stage_s: dict[str, float]
    peak_memory_mb: float
    scores: torch.Tensor = field(repr=False)


class StageClock:
    """Times the VAE encoder, the first text encoder and the denoiser ("unet" stage, whatever the
    family's network) of `components` through forward hooks."""

    STAGES = {"vae": "vae.encoder", "text_encoder": "text_encoder", "unet": "unet"}

    def __init__(self, components: SDComponents) -> None:
        self.components = components
        self.device = components.device
        self.seconds: dict[str, float] = {}
        self.items = self.calls = 0

    @contextmanager
    def attached(self) -> Iterator["StageClock"]:
        handles, started = [], {}
        for stage, path in self.STAGES.items():
            module = self.components
            for attr in path.split("."):
                module = getattr(module, attr)

            def pre(mod, args, kwargs, stage=stage):
                self._sync()
                started[stage] = time.perf_counter()
                if stage == "unet":
                    latents = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
                    self.items += latents.shape[0]
                    self.calls += 1

            def post(mod, args, kwargs, output, stage=stage):
                self._sync()
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started[stage]

            handles += [module.register_forward_pre_hook(pre, with_kwargs=True),
                        module.register_forward_hook(post, with_kwargs=True)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class PeakMemory:
    """Peak CUDA memory allocated, or peak process RSS sampled every 5 ms on the CPU (MB)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0.0

    @contextmanager
    def measuring(self) -> Iterator["PeakMemory"]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            yield self
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        psutil = extras.require("psutil", "itm-bench's memory sampling")
        process, stop = psutil.Process(), threading.Event()

        def sample():
            while not stop.is_set():
                self.peak = max(self.peak, process.memory_info().rss / 2**20)
                stop.wait(0.005)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()


def method_runner(name: str, scorer: DiffusionITM) -> Callable[[Workload], torch.Tensor]:
    """A callable scoring a workload's pairs [P] with method `name`, starting from cold caches:
    "naive" the DiffusionITM research loop, "batched" Diffusion Classifier's loop, "pipeline" the
    model's diffusers pipeline loop, all under the scorer's protocol."""
    components, protocol = scorer.components, scorer.protocol
    if name == "naive":
        return lambda w: diffusion_itm_pair_scores(components, w.images, w.texts, w.pairs, w.bank, w.mode, protocol)
    if name == "batched":
        return lambda w: diffusion_classifier_pair_scores(components, w.images, w.texts, w.pairs, w.bank, w.mode,
                                                          protocol)
    if name == "pipeline":
        return lambda w: pipeline_pair_scores(components, w.images, w.texts, w.pairs, w.bank, w.mode, protocol)

    def engine(w: Workload) -> torch.Tensor:
        scorer.clear_cache()  # the engine pays its encodings in every run, like the others
        return scorer.score_pairs(w.images, w.texts, w.pairs, w.mode, noise=w.bank)

    return engine


def timed_run(name: str, runner: Callable, workload: Workload, scorer: DiffusionITM) -> Run:
    clock, memory = StageClock(scorer.components), PeakMemory(scorer.components.device)
    with clock.attached(), memory.measuring():
        start = time.perf_counter()
        scores = runner(workload)
        clock._sync()
        wall = time.perf_counter() - start
    stages = dict(clock.seconds)
    if name == "engine":
        stages["kernels"] = scorer.last_stats.seconds.get("reduction", 0.0)
    stages["host_overhead"] = max(0.0, wall - sum(stages.values()))
    return Run(wall, clock.items, clock.calls, stages, memory.peak, scores.cpu())


def unet_flops_per_item(components: SDComponents) -> int:
    """FLOPs of one denoiser item (batch 1, the family's conditioning at the pipeline's length),
    counted by torch's FlopCounterMode; on the "meta" device without computing anything."""
    family = family_of(components)
    inputs = family.example_inputs(components, 1)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        family.denoise(components, *inputs)
    return counter.get_total_flops()


def measured_peak_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """bf16 matmul TFLOP/s of an n x n x n product: the ceiling the UNet's rate is compared to."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def agreement(results: dict[str, list[Run]], scale: float) -> dict[str, float]:
    """Max |scores - naive scores| / error scale, per method (first repeat)."""
    base = results["naive"][0].scores if "naive" in results else next(iter(results.values()))[0].scores
    return {m: float((runs[0].scores - base).abs().max() / scale) for m, runs in results.items()}


def summarise(workload: Workload, results: dict[str, list[Run]], flops: int, peak_tflops: float | None) -> dict:
    """Median figures per method, speed-ups and the Flickr30K projection."""
    summary: dict = {"workload": workload.name, "mode": workload.mode, "images": len(workload.images),
                     "texts": len(workload.texts), "pairs": len(workload.pairs), "samples": len(workload.bank),
                     "pair_draws": workload.pair_draws, "methods": {}}
    for method, runs in results.items():
        wall = statistics.median(r.wall_s for r in runs)
        unet_s = statistics.median(r.stage_s.get("unet", 0.0) for r in runs)
        row = {
            "wall_s": wall, "walls_s": [r.wall_s for r in runs],
            "unet_items": runs[0].unet_items, "unet_calls": runs[0].unet_calls,
            "unet_items_per_s": runs[0].unet_items / wall,
            "pair_draws_per_s": workload.pair_draws / wall,
            "stage_s": {k: statistics.median(r.stage_s.get(k, 0.0) for r in runs) for k in runs[0].stage_s},
            "peak_memory_mb": max(r.peak_memory_mb for r in runs),
            "unet_tflops": runs[0].unet_items * flops / unet_s / 1e12 if unet_s else 0.0,
            "projected_flickr30k_s": PAPER_FLICKR_ITEMS * wall / workload.pair_draws,
        }
        if peak_tflops:
            row["fraction_of_peak"] = row["unet_tflops"] / peak_tflops
        summary["methods"][method] = row
    engine = summary["methods"].get("engine")
    if engine:
        summary["engine_speedup"] = {m: r["wall_s"] / engine["wall_s"] for m, r in summary["methods"].items()}
    return summary


def print_summary(summary: dict, agree: dict[str, float], tolerance: float) -> None:
    print(f"\n== {summary['workload']}: {summary['images']} images, {summary['texts']} texts, "
          f"{summary['pairs']} pairs x {summary['samples']} samples = {summary['pair_draws']} pair-draws ==")
    header = (f"{'method':<9}{'wall s':>9}{'UNet items':>11}{'items/s':>10}{'pair-draws/s':>13}{'VAE s':>8}"
              f"{'text s':>8}{'UNet s':>8}{'kern s':>8}{'host s':>8}{'peak MB':>9}{'TFLOP/s':>9}"
              f"{'speed-up':>9}{'vs naive':>10}")
    print(header)
    for method, row in summary["methods"].items():
        st = row["stage_s"]
        print(f"{method:<9}{row['wall_s']:>9.3f}{row['unet_items']:>11}{row['unet_items_per_s']:>10.1f}"
              f"{row['pair_draws_per_s']:>13.1f}{st.get('vae', 0):>8.3f}{st.get('text_encoder', 0):>8.3f}"
              f"{st.get('unet', 0):>8.3f}{st.get('kernels', 0):>8.3f}{st.get('host_overhead', 0):>8.3f}"
              f"{row['peak_memory_mb']:>9.0f}{row['unet_tflops']:>9.3f}"
              f"{summary.get('engine_speedup', {}).get(method, float('nan')):>8.1f}x{agree[method]:>10.1e}")
    print(f"scores agree within {tolerance:.0e} of the error scale: "
          f"{'yes' if max(agree.values()) <= tolerance else 'NO'}")
    projection = ", ".join(f"{m} {r['projected_flickr30k_s'] / 60:.1f} min" for m, r in summary["methods"].items())
    print(f"projected Flickr30K I2T run ({PAPER_FLICKR_ITEMS:,} pair-draws): {projection} "
          f"(the paper: {PAPER_FLICKR_MINUTES} min on one A6000)")


def batch_sweep(scorer: DiffusionITM, workload: Workload, sizes: list[int]) -> dict[int, float]:
    """Engine UNet items/s (UNet + kernels time) against batch size."""
    rates = {}
    for size in sizes:
        scorer.score_pairs(workload.images, workload.texts, workload.pairs, workload.mode, noise=workload.bank,
                           batch_size=size)
        rates[size] = scorer.last_stats.items_per_second
    return rates


def bare_denoiser_rate(components: SDComponents, size: int, repeats: int = 3) -> float:
    """Items/s of the denoiser alone (the family's call on random latents and conditioning, no
    caches, no noising, no reduction) at batch `size`: the median of `repeats` timed calls after
    one warm-up, synchronised on CUDA."""
    family, device = family_of(components), components.device
    inputs = family.example_inputs(components, size)
    seconds = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            family.denoise(components, *inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
    return size / statistics.median(seconds[1:])


def plot(path: str, summaries: list[dict], sweep: dict[int, float]) -> None:
    """Throughput per method per workload, and engine throughput against batch size."""
    matplotlib = extras.require("matplotlib", "itm-bench --plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(summaries))
    for k, summary in enumerate(summaries):
        methods = list(summary["methods"])
        left.bar([i + k * width for i in range(len(methods))],
                 [summary["methods"][m]["pair_draws_per_s"] for m in methods], width, label=summary["workload"])
        left.set_xticks([i + width * (len(summaries) - 1) / 2 for i in range(len(methods))], methods)
    left.set_ylabel("pair-draws / s (end to end)")
    left.set_title("throughput per method")
    left.legend()
    if sweep:
        right.plot(list(sweep), list(sweep.values()), marker="o")
        right.set_xscale("log", base=2)
    right.set_xlabel("UNet batch size")
    right.set_ylabel("engine UNet items / s")
    right.set_title("engine throughput vs batch size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def environment(device: torch.device) -> dict:
    import diffusers
    import transformers

    info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


@dataclass
class BenchConfig:
    """Options of `itm-bench` (recorded in the JSON report)."""

    model: str = option("tiny", help="diffusers folder, cached hub id, named model or built-in architecture "
                                     "(tiny, sd15-arch, tiny-sd3, sd3-medium-arch, ...: docs/models.md)")
    image_size: int | None = option(None, help="a built-in architecture at this native image side in px "
                                               "(default: its own, e.g. 1024 for sd3-medium-arch)")
    device: str = option("cpu", help="cpu, cuda, cuda:1, ...; meta: count FLOPs per denoiser item, time nothing")
    dtype: Literal["float32", "float16", "bfloat16"] = option("float32", help="model dtype")
    workload: Literal["pairs", "i2t-topk", "t2i-topk"] = option(
        "pairs", help="pairs: N images x M texts; i2t-topk: each image with its own k captions; "
                      "t2i-topk: each caption with k candidate images (null-normalised)")
    protocol: str = option("diffusion-itm", choices=tuple(protocols.PRESETS),
                           help="the scoring protocol all three methods follow (the protocol flags below override "
                                "its fields; --samples defaults to 4 here)")
    protocol_fields: dict = option(default_factory=dict, cli=False, help="the protocol fields overridden")
    mode: str = option("i2t,t2i", help="for --workload pairs: i2t, t2i or both")
    images: int = option(6, help="images in the workload")
    texts: int = option(6, help="texts in the workload (pairs, t2i-topk)")
    topk: int = option(10, help="candidates per query for the top-k protocols")
    repeats: int = option(3, help="timed repeats per method (interleaved; medians reported)")
    methods: str | None = option(None, help=f"comma-separated methods to run, of {', '.join(METHODS)} (default: "
                                            f"{RESEARCH_METHODS} for SD 1.x/2.x, pipeline,engine for other families)")
    batch_size: int | str = option(64, parse=parse_batch_size, help="engine UNet batch, or auto")
    batch_sweep: str = option("", help="engine batch sizes for the plot, e.g. 8,16,32,64")
    kernels: str | None = option(None, help="fused-op backend: reference | triton | ext | auto")
    attention: Literal["sdpa", "xformers", "math"] = option("sdpa", help="attention backend of the UNet")
    channels_last: bool = option(False, help="NHWC conv weights")
    compile: bool = option(False, help="torch.compile the UNet (fixed batch shapes)")
    cuda_graphs: bool = option(False, help="replay the compiled UNet as CUDA graphs")
    peak_tflops: float | None = option(None, help="ceiling for the FLOP rate (CUDA default: measured bf16 matmul)")
    json: str | None = option(None, identity=False, help="write every figure to this JSON file")
    plot: str | None = option(None, identity=False, help="write a PNG plot here")


    def scoring_protocol(self) -> protocols.Protocol:
        """The protocol of the run: the preset with 4 draws unless overridden, and the fields given."""
        return protocols.resolve(self.protocol, **{"samples": 4, **self.protocol_fields})


def count_flops(args: BenchConfig, dtype: torch.dtype) -> int:
    """`--device meta`: the model built without memory, its FLOPs per denoiser item printed (and
    written to --json); nothing is timed."""
    components = load_model(args, "meta", dtype)
    flops = unet_flops_per_item(components)
    print(f"itm-bench: {components.source} ({components.family}), latents {components.latent_shape}: "
          f"{flops / 1e9:,.1f} GFLOPs per denoiser item; a Flickr30K I2T run ({PAPER_FLICKR_ITEMS:,} pair-draws) "
          f"needs {PAPER_FLICKR_ITEMS * flops / 1e15:,.0f} PFLOPs")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": components.source, "family": components.family,
                                               "latent_shape": components.latent_shape,
                                               "unet_gflops_per_item": flops / 1e9}, indent=2) + "\n")
    return 0


def parse_args(argv: list[str] | None) -> BenchConfig:
    parser = options.parser("itm-bench", __doc__.splitlines()[0])
    options.add_options(parser, BenchConfig)
    options.add_options(parser.add_argument_group("protocol fields (each overrides the --protocol preset's)"),
                        protocols.Protocol, default_note="the preset's", exclude=("dtype",))
    namespace = parser.parse_args(argv)
    args = options.from_args(BenchConfig, namespace, protocol_fields=options.given(protocols.Protocol, namespace))
    try:
        args.scoring_protocol()
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    unknown = set((args.methods or "").split(",")) - set(METHODS) - {""}
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}; choose from {METHODS}")
    return args


def load_model(args: BenchConfig, device: torch.device | str, dtype: torch.dtype) -> SDComponents:
    """The model of --model (at --image-size); a model that cannot be built as asked exits 2 with
    the reason, as a bad option does."""
    try:
        return load_components(args.model, device=device, dtype=dtype, image_size=args.image_size)
    except ValueError as err:
        print(f"itm-bench: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "meta":
        return count_flops(args, dtype)
    batch_size = args.batch_size
    scorer = DiffusionITM(
        load_model(args, device, dtype), protocol=args.scoring_protocol(),
        batch_size=batch_size, kernels=args.kernels, attention=args.attention, channels_last=args.channels_last,
        compile=args.compile, cuda_graphs=args.cuda_graphs,
    )
    components = scorer.components
    methods = (args.methods or (RESEARCH_METHODS if components.family == "sd" else "pipeline,engine")).split(",")
    flops = unet_flops_per_item(components)
    peak = args.peak_tflops or (measured_peak_tflops(device) if device.type == "cuda" else None)
    print(f"itm-bench: {components.source} on {device} ({args.dtype}), latents {components.latent_shape}, "
          f"{flops / 1e9:.2f} GFLOPs per UNet item" + (f", ceiling {peak:.0f} TFLOP/s" if peak else ""))
    print(f"protocol {args.protocol}: " + ", ".join(f"{k}={v}" for k, v in scorer.protocol.as_dict().items()))

    tolerance = TOLERANCE[dtype]
    summaries, agreements, failed = [], [], False
    for workload in build_workloads(args, components):
        runners = {m: method_runner(m, scorer) for m in methods}
        warm = Workload(workload.name, workload.mode, workload.images[:1], workload.texts[:2],
                        [(0, 0), (0, 1)], workload.bank)
        for runner in runners.values():  # warm-up (and compilation) stays out of the timings
            runner(warm)
        results: dict[str, list[Run]] = {m: [] for m in methods}
        for _ in range(args.repeats):  # interleaved: A B C A B C ...
            for method, runner in runners.items():
                results[method].append(timed_run(method, runner, workload, scorer))
        # The size of the denoising errors themselves (|I2T score|): T2I scores are small
        # differences of such errors, so their rounding is measured against it.
        i2t = scorer.score_pairs(workload.images, workload.texts, workload.pairs, "i2t", noise=workload.bank)
        scale = float(i2t.abs().max())
        agree = agreement(results, scale)
        summary = summarise(workload, results, flops, peak)
        summary["agreement"] = agree
        print_summary(summary, agree, tolerance)
        failed |= max(agree.values()) > tolerance
        summaries.append(summary)
        agreements.append(agree)

    sizes = [int(b) for b in args.batch_sweep.split(",") if b]
    sweep = batch_sweep(scorer, workload, sizes) if sizes else {}
    bare: dict[str, float] = {}
    if sweep:
        print("engine UNet items/s by batch size: " + ", ".join(f"{b}: {r:.1f}" for b, r in sweep.items()))
        best = max(sweep, key=sweep.get)
        rate = bare_denoiser_rate(components, best)
        bare = {"batch_size": best, "engine_items_per_s": sweep[best], "bare_items_per_s": rate,
                "engine_vs_bare": sweep[best] / rate}
        print(f"at the best batch size {best}: engine {sweep[best]:.1f} items/s, the bare denoiser {rate:.1f}: "
              f"engine / bare = {sweep[best] / rate:.2f}")
    report = {
        "command": "itm-bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device), "model": components.source, "dtype": args.dtype,
        "options": options.identity(args), "protocol": scorer.protocol.as_dict(),
        "unet_gflops_per_item": flops / 1e9, "peak_tflops": peak, "tolerance": tolerance,
        "workloads": summaries, "batch_sweep_items_per_s": sweep, "engine_vs_bare_denoiser": bare,
        "agree": not failed,
        "total_s": time.perf_counter() - started,
    }
    for path in (args.json, args.plot):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(args.plot, summaries, sweep)
        print(f"wrote {args.plot}")
    print(f"total {report['total_s']:.1f} s")
    if failed:
        print("FAIL: the methods' scores disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
