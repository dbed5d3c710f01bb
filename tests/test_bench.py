"""itm-bench end to end on a very small workload (tiny model, CPU)."""
import json

import pytest

from itm_engine import bench, cli

SMALL = ["--images", "2", "--texts", "2", "--samples", "2", "--repeats", "2", "--topk", "2"]


@pytest.mark.parametrize("workload", ["pairs", "i2t-topk", "t2i-topk"])
def test_bench_reports_every_method_and_agrees(tmp_path, capsys, workload):
    out = tmp_path / "bench.json"
    args = SMALL + ["--workload", workload, "--json", str(out)]
    if workload == "pairs":
        args += ["--plot", str(tmp_path / "bench.png"), "--batch-sweep", "1,4"]
    assert cli.main(["bench", *args]) == 0
    report = json.loads(out.read_text())
    assert report["agree"] and report["model"] == "builtin:tiny" and report["unet_gflops_per_item"] > 0
    assert {"torch", "diffusers", "device", "python"} <= set(report["environment"])
    assert report["command"].startswith("itm-bench") and report["date"]
    # the research code's protocol by default: the naive column is what the paper ran
    assert report["protocol"]["error"] == "l2" and report["protocol"]["schedule"] == "diffusion-itm"
    workloads = report["workloads"]
    assert [w["mode"] for w in workloads] == (["i2t", "t2i"] if workload == "pairs" else [workload[:3]])
    for w in workloads:
        methods = w["methods"]
        assert set(methods) == {"naive", "batched", "engine"}
        assert all(len(m["walls_s"]) == 2 for m in methods.values())
        per_pair = 2 if w["mode"] == "t2i" else 1
        assert methods["naive"]["unet_items"] == per_pair * w["pair_draws"]
        assert methods["naive"]["unet_calls"] == w["pair_draws"]  # the research loop: one call per pair and draw
        assert methods["batched"]["unet_calls"] == per_pair * w["pairs"]
        assert methods["engine"]["unet_items"] <= methods["naive"]["unet_items"]
        assert methods["engine"]["projected_flickr30k_s"] > 0
    if workload == "pairs":
        assert (tmp_path / "bench.png").stat().st_size > 1000
        assert set(report["batch_sweep_items_per_s"]) == {"1", "4"}
        bare = report["engine_vs_bare_denoiser"]  # the engine's rate against the bare UNet at the best size
        assert str(bare["batch_size"]) in report["batch_sweep_items_per_s"] and bare["bare_items_per_s"] > 0
        assert bare["engine_vs_bare"] == pytest.approx(bare["engine_items_per_s"] / bare["bare_items_per_s"])
    assert "projected Flickr30K" in capsys.readouterr().out


def test_bench_fails_when_scores_disagree(monkeypatch, capsys):
    real = bench.diffusion_classifier_pair_scores
    monkeypatch.setattr(bench, "diffusion_classifier_pair_scores", lambda *a, **k: real(*a, **k) + 0.01)
    assert bench.main(SMALL + ["--repeats", "1", "--mode", "i2t"]) == 1
    assert "disagree" in capsys.readouterr().err


def test_bench_rejects_unknown_methods():
    with pytest.raises(SystemExit):
        bench.main(["--methods", "naive,magic"])


def test_workload_captions_are_distinct_and_images_differ():
    captions = bench.make_captions(50, seed=1)
    assert len(set(captions)) == 50
    images = bench.make_images(4, 32, seed=1)
    assert len({img.tobytes() for img in images}) == 4
    assert bench.make_captions(5, seed=2) == bench.make_captions(5, seed=2)


def test_bench_runs_an_sd3_model_against_its_pipeline_loop(tmp_path):
    out = tmp_path / "sd3.json"
    assert cli.main(["bench", "--model", "tiny-sd3", *SMALL, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["agree"] and report["model"] == "builtin:tiny-sd3"
    for w in report["workloads"]:
        assert set(w["methods"]) == {"pipeline", "engine"}  # the research loops score SD 1.x/2.x only
        per_pair = 2 if w["mode"] == "t2i" else 1
        assert w["methods"]["pipeline"]["unet_calls"] == per_pair * w["pair_draws"]


def test_bench_on_meta_counts_flops_of_the_exact_architectures(tmp_path, capsys):
    """FLOPs per denoiser item of the exact architectures, counted without memory: SD 1.5 at 512 px
    ~0.80 TFLOPs, SDXL at 1024 px ~6.8, SD3-medium at 1024 px ~8.9 (the figures FLOP counters give
    for them)."""
    figures = {}
    for model in ("sd15-arch", "sdxl-arch", "sd3-medium-arch"):
        out = tmp_path / f"{model}.json"
        assert cli.main(["bench", "--model", model, "--device", "meta", "--json", str(out)]) == 0
        figures[model] = json.loads(out.read_text())["unet_gflops_per_item"]
    assert figures["sd15-arch"] == pytest.approx(803, rel=0.01)
    assert figures["sdxl-arch"] == pytest.approx(6761, rel=0.01)
    assert figures["sd3-medium-arch"] == pytest.approx(8904, rel=0.01)
    assert "GFLOPs per denoiser item" in capsys.readouterr().out


def test_bench_on_meta_counts_flops_of_flux_dev(tmp_path, capsys):
    """FLUX.1-dev at 1024 px: 4096 packed image tokens and 512 T5 tokens through 19 double and 38
    single blocks of width 3072, ~74.4 TFLOPs per denoiser item (~59.5 in the weights: 2 x ~113M
    weights a token per stream and block; ~14.9 in the attention over 4608 tokens)."""
    out = tmp_path / "flux.json"
    assert cli.main(["bench", "--model", "flux-dev-arch", "--device", "meta", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["family"] == "flux" and report["latent_shape"] == [16, 128, 128]
    assert report["unet_gflops_per_item"] == pytest.approx(74385, rel=0.01)
    assert "GFLOPs per denoiser item" in capsys.readouterr().out


def test_bench_on_meta_counts_flops_of_pixart_sigma(tmp_path, capsys):
    """PixArt-Sigma-XL-2 at 1024 px: 28 blocks of width 1152 over 4096 patch tokens and 300 T5
    tokens, ~6.63 TFLOPs per denoiser item (~237 GFLOPs a block: 4 self-attention projections
    43.5, attention 77.3, cross-attention 29, MLP 87)."""
    out = tmp_path / "pixart.json"
    assert cli.main(["bench", "--model", "pixart-sigma-arch", "--device", "meta", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["family"] == "pixart" and report["latent_shape"] == [4, 128, 128]
    assert report["unet_gflops_per_item"] == pytest.approx(6634, rel=0.01)
    assert "GFLOPs per denoiser item" in capsys.readouterr().out


def test_exact_architectures_at_another_image_size(tmp_path, capsys):
    """--image-size builds a built-in at another native size: SD3-medium at 512 px has 16 x 64 x 64
    latents and ~2.1 TFLOPs per item (the issue's counted figure); a size the VAE cannot take is
    refused with the reason."""
    out = tmp_path / "sd3-512.json"
    assert cli.main(["bench", "--model", "sd3-medium-arch", "--device", "meta", "--image-size", "512",
                     "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["latent_shape"] == [16, 64, 64] and report["unet_gflops_per_item"] == pytest.approx(2107, rel=0.01)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--model", "sd15-arch", "--device", "meta", "--image-size", "500"])
    assert exit_.value.code == 2 and "multiple of the VAE's downsampling 8" in capsys.readouterr().err
