"""Only the C++ extensions live here; everything else is declared in pyproject.toml."""
import sys

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

# The decoding kernels split their rows with OpenMP. On Linux this links libgomp, and the one torch
# ships is already loaded under that name when they are imported, so they share torch's threads
# instead of competing with its spinning workers. Elsewhere they build without it and run serially.
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []

setup(
    ext_modules=[
        Pybind11Extension(
            "genius.trie_cpp._trie",
            ["trie_cpp/trie.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        ),
        Pybind11Extension(
            "genius.models.generative_retriever._decoder_kernels",
            ["models/generative_retriever/decoder_kernels.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3", *OPENMP],
            extra_link_args=OPENMP,
        ),
    ]
)
