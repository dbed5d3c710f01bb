"""The test suite's own rules: what several test modules share lives in tests/fixtures/, so no test
module imports another; the old flat helpers module is gone."""
from __future__ import annotations

from pathlib import Path

from fixtures.helpers import imported_modules

TESTS = Path(__file__).parent


def test_no_test_module_imports_another_test_module():
    files = sorted(TESTS.rglob("*.py"))
    assert len(files) > 20
    for path in files:
        bad = {name for name in imported_modules(path)
               if name in ("helpers", "conftest") or any(part.startswith("test_") for part in name.split("."))}
        assert not bad, f"{path.relative_to(TESTS)} imports {sorted(bad)}: shared code belongs in tests/fixtures/"
