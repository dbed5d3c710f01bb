from itm_engine import demo


def test_demo_runs_and_engine_agrees_with_naive(capsys):
    assert demo.main(["--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("-> agree") == 2 and "DISAGREE" not in out
    assert "[t2i] naive :   64 UNet items" in out and "[t2i] engine:   40 UNet items" in out
