"""The built-in model kinds, handed to the serving core (which names none of them).

A new kind is a package implementing `tandem.serving.kinds.Kind` plus one line here.
"""

from __future__ import annotations

from tandem.diffusion.kind import DiffusionKind
from tandem.llm.kind import LLMKind
from tandem.serving.kinds import Kinds
from tandem.serving.tensor_kind import TensorKind

__all__ = ["builtin_kinds"]


def builtin_kinds() -> Kinds:
    """Every kind this build serves, by the `kind:` name tandem.yaml uses."""
    kinds: Kinds = {}
    for kind in (TensorKind(), LLMKind(), DiffusionKind()):
        kinds[kind.name] = kind
    return kinds
