// Placeholder until the C++ trie lands; keeps the extension build wired up.
#include <pybind11/pybind11.h>
PYBIND11_MODULE(_trie, m) { m.attr("__version__") = "0"; }
