"""Only the C++ extensions live here; everything else is declared in pyproject.toml."""
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup
from setuptools.errors import CompileError, LinkError

# The decoding kernels split their rows with OpenMP, and _fp_env sets the subnormal mode of each
# OpenMP thread. On Linux this links libgomp, and the one torch ships is already loaded under that
# name when they are imported, so they share torch's threads instead of competing with its
# spinning workers. Elsewhere, or with a compiler that cannot build OpenMP (clang without libomp),
# they build without it: the kernels run serially, and _fp_env sets the calling thread alone.
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []


class BuildWithOptionalOpenMP(build_ext):
    def build_extension(self, ext):
        if OPENMP and "-fopenmp" in ext.extra_compile_args:
            try:
                return super().build_extension(ext)
            except (CompileError, LinkError):
                print(f"warning: {ext.name} does not build with OpenMP here; building it serial", file=sys.stderr)
                ext.extra_compile_args = [a for a in ext.extra_compile_args if a not in OPENMP]
                ext.extra_link_args = [a for a in ext.extra_link_args if a not in OPENMP]
        return super().build_extension(ext)


def with_openmp(name: str, source: str) -> Pybind11Extension:
    return Pybind11Extension(name, [source], cxx_std=17, extra_compile_args=["-O3", *OPENMP], extra_link_args=OPENMP)


setup(
    cmdclass={"build_ext": BuildWithOptionalOpenMP},
    ext_modules=[
        Pybind11Extension(
            "genius.trie_cpp._trie",
            ["trie_cpp/trie.cpp"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        ),
        with_openmp("genius.common._fp_env", "common/fp_env.cpp"),
        with_openmp("genius.models.generative_retriever._decoder_kernels",
                    "models/generative_retriever/decoder_kernels.cpp"),
    ],
)
