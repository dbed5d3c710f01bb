"""Session setup. Without a GPU, Triton kernels run on the CPU through Triton's interpreter, which
must be switched on before any kernel is decorated (i.e. before `itm_engine.kernels.triton_ops`
is imported); with TRITON_INTERPRET=1 the dispatcher also offers "triton" for CPU tensors."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
