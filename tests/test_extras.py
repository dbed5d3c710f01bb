"""The scorer needs none of the optional packages (accelerate, peft, psutil, matplotlib); a feature
that does fails with an ImportError naming the package and the extra that installs it."""
from __future__ import annotations

import subprocess
import sys

import pytest

from itm_engine import extras

# Run in a fresh interpreter in which the optional packages are not found (`find_spec` gives None,
# `import` raises ModuleNotFoundError), as on an install without the extras.
BLOCK = (
    "import importlib.machinery, sys\n"
    "BLOCKED = ('accelerate', 'peft', 'psutil', 'matplotlib')\n"
    "_find = importlib.machinery.PathFinder.find_spec\n"
    "def find_spec(name, path=None, target=None):\n"
    "    return None if name.split('.')[0] in BLOCKED else _find(name, path, target)\n"
    "importlib.machinery.PathFinder.find_spec = staticmethod(find_spec)\n"
)


FEATURES = {  # what a feature runs -> the start of its error message
    "DiffusionITM.from_pretrained('tiny', lora='x')":
        "scoring with a LoRA needs the optional package 'peft': pip install 'itm-engine[eval]'",
    "evaluate(EvalConfig(task='winoground', data_root='.'), Path(tempfile.mkdtemp()))":
        "itm-eval needs the optional package 'accelerate': pip install 'itm-engine[eval]'",
    "PeakMemory(torch.device('cpu')).measuring().__enter__()":
        "itm-bench's memory sampling needs the optional package 'psutil': pip install 'itm-engine[bench]'",
    "plot('x.png', [], {})":
        "itm-bench --plot needs the optional package 'matplotlib': pip install 'itm-engine[bench]'",
}


def test_the_scorer_works_without_any_extra_and_the_features_that_need_one_name_it():
    script = BLOCK + (
        "import tempfile, torch\n"
        "from pathlib import Path\n"
        "from itm_engine import DiffusionITM\n"
        "from itm_engine.clip import ClipModel\n"
        "from itm_engine.evaluate import EvalConfig, evaluate\n"
        "from itm_engine.bench import PeakMemory, plot\n"
        "scorer = DiffusionITM.from_pretrained('tiny', progress=False)\n"
        "print(tuple(scorer([torch.rand(3, 32, 32)], ['a', 'b'], samples=2).shape))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED))\n"
        f"for feature in {list(FEATURES)!r}:\n"
        "    try:\n"
        "        exec(feature)\n"
        "        print('no error')\n"
        "    except ImportError as err:\n"
        "        print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["(1, 2)", "[]"]  # scored, and not one optional package imported
    assert lines[2:] == [f"{message} (or '[all]')" for message in FEATURES.values()]


def test_require_returns_the_module_when_installed():
    assert extras.require("json", "anything", "eval").dumps([1]) == "[1]"
    with pytest.raises(ImportError, match=r"the demo's figure needs the optional package 'no_such_pkg': "
                                          r"pip install 'itm-engine\[shapes\]'"):
        extras.require("no_such_pkg", "the demo's figure", "shapes")
