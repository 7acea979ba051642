"""Only the C++ extensions live here; everything else is declared in pyproject.toml."""
from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

setup(
    ext_modules=[
        Pybind11Extension(
            "genius.trie_cpp._trie",
            ["trie_cpp/trie.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        ),
        Pybind11Extension(
            "genius.models.generative_retriever._beam_attention",
            ["models/generative_retriever/beam_attention.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        ),
    ]
)
