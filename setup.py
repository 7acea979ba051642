"""Only the C++ extension lives here; everything else is declared in pyproject.toml."""
from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

setup(
    ext_modules=[
        Pybind11Extension(
            "genius.trie_cpp._trie",
            ["trie_cpp/trie.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ]
)
