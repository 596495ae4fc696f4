"""Sphinx configuration: API reference from the docstrings, pages as executed MyST notebooks."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
# Example pages run on CPU at small sizes; LLVM's optimizations only cost compile time there.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "ntk_adapters"
author = "ntk_adapters contributors"
copyright = "ntk_adapters contributors, Apache-2.0"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "README.md"]
master_doc = "index"

# Every page with code cells is executed at build time; a cell that raises fails the build.
nb_execution_mode = os.environ.get("NTK_ADAPTERS_DOCS_EXECUTE", "force")
nb_execution_raise_on_error = True
nb_execution_timeout = 300
nb_execution_show_tb = True
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"show-inheritance": False}
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False


html_theme = "alabaster"
html_title = "ntk_adapters"
html_theme_options = {"description": "NTK analysis for unchanged Flax and Haiku models", "page_width": "1100px"}
