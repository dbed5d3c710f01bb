"""Build script. Metadata lives in pyproject.toml; this file exists for the C++/CUDA
extension in csrc/ (added by the fused-kernels work), which needs setuptools' ext_modules."""
from setuptools import setup

setup()
