"""Session setup.

- The shared fixtures (tests/fixtures/: dataset writers, tiny models, helpers) are imported as
  `fixtures.<module>` from every test folder: this folder is on sys.path whatever the import mode.
- Without a GPU, Triton kernels run on the CPU through Triton's interpreter, which must be switched
  on before any kernel is decorated (i.e. before `itm_engine.kernels.triton_ops` is imported); with
  TRITON_INTERPRET=1 the dispatcher also offers "triton" for CPU tensors.
"""
import os
import sys
from pathlib import Path

import torch

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
