"""The house rules a newcomer can rely on: the scorer core never imports the ShapesWorld lab, the
version is written once, the README stays a README and its links resolve."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import itm_engine

from fixtures.helpers import imported_modules

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "itm_engine"
LAB = "itm_engine.shapesworld"
# everything but the lab and the console entry layer (cli.py names the lab's command by its module
# path, as it names the others', to dispatch `python -m itm_engine.cli shapes`)
CORE = sorted(p for p in PACKAGE.rglob("*.py") if "shapesworld" not in p.parts and p != PACKAGE / "cli.py")


def test_no_core_module_imports_the_lab():
    assert len(CORE) > 30 and any(p.name == "scoring.py" for p in CORE)
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.startswith(LAB))
                 for p in CORE}
    assert {k: v for k, v in offenders.items() if v} == {}
    mentions = [str(p.relative_to(ROOT)) for p in CORE if "shapesworld" in p.read_text()]
    assert mentions == [], "the core names the lab only through the plugin entry point (pyproject.toml)"


def test_scoring_runs_without_the_lab_and_the_named_model_comes_through_the_plugin():
    script = (
        "import sys, torch\n"
        "from itm_engine import DiffusionITM\n"
        "scorer = DiffusionITM.from_pretrained('tiny', progress=False)\n"
        "scores = scorer([torch.rand(3, 32, 32)], ['a red square', 'a blue circle'], samples=2)\n"
        f"assert {LAB!r} not in sys.modules, 'scoring imported the lab'\n"
        "shapes = DiffusionITM.from_pretrained('shapes', progress=False)\n"
        f"assert {LAB!r} in sys.modules\n"
        "print('ok', tuple(scores.shape), shapes.components.latent_shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "(1,", "2)", "(8,", "8,", "8)"]


def test_the_version_is_written_once():
    import importlib.metadata

    assert importlib.metadata.version("itm-engine") == itm_engine.__version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version\s*=\s*"', pyproject, re.M) is None and 'dynamic = ["version"]' in pyproject
    written = [p for p in ROOT.glob("*.py")] + list(PACKAGE.rglob("*.py"))
    assert [str(p.relative_to(ROOT)) for p in written if "__version__ =" in p.read_text()] == ["itm_engine/__init__.py"]


def test_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) <= 10_000
    docs = list((ROOT / "docs").glob("*.md"))
    assert docs, "the README's longer material lives in docs/"
    for page in [ROOT / "README.md", *docs]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_docs_do_not_narrate_the_work():
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks" / "results").glob("*.md")]
    pattern = re.compile(r"\b(session|not yet (run|measured)|this VM|bars? of the issue)\b", re.I)
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in pages for m in pattern.finditer(p.read_text())]
    assert found == []
