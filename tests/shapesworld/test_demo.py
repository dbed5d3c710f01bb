"""The demo (`make demo`, `itm-shapes demo`) on a few examples: its tables, the engine-vs-naive
agreement line and the figure."""
import pytest

from itm_engine.shapesworld import cli as shapes_cli


@pytest.mark.slow
def test_demo_runs_tables_agreement_and_figure(capsys, tmp_path):
    figure, drawings = tmp_path / "demo.png", tmp_path / "drawings.png"
    assert shapes_cli.main(["demo", "--n", "2", "--samples", "2", "--figure", str(figure),
                            "--drawings", str(drawings)]) == 0
    out = capsys.readouterr().out
    assert "model: builtin:shapes" in out and "compositional split" in out
    for header in ("I2T", "T2I raw", "T2I norm", "CLIP I2T", "CLIP T2I", "chance"):
        assert header in out
    for subtask in ("recognition_color", "spatial", "complexity"):
        assert subtask in out
    assert "-> agree" in out and "DISAGREE" not in out and "speed-up" in out
    assert figure.stat().st_size > 10_000 and drawings.stat().st_size > 10_000
    assert "judged correct" in out
