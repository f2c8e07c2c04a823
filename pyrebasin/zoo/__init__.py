"""Built-in models, each with a hand-written `permutation_spec()` and its `stitch_points()`: MLP, VGG,
ResNet20, Transformer, GPT (causal LM); `resolve_arch` builds one by name (or any `module:factory`) for the CLI."""
from collections.abc import Mapping

from ..io import call_factory, model_from_factory
from .gpt import GPT
from .mlp import MLP
from .resnet import ResNet20
from .transformer import Transformer
from .vgg import VGG

__all__ = ["MLP", "VGG", "ResNet20", "Transformer", "GPT", "build", "resolve_arch", "ARCHS"]

ARCHS = {"mlp": MLP, "vgg": VGG, "resnet20": ResNet20, "transformer": Transformer, "gpt": GPT}


def build(arch: str, **kwargs):
    """A zoo model by name ("mlp", "vgg", "resnet20", "transformer", "gpt")."""
    if arch not in ARCHS:
        raise ValueError(f"unknown zoo architecture {arch!r}; expected one of {sorted(ARCHS)}")
    return ARCHS[arch](**kwargs)


def resolve_arch(arch: str, kwargs: Mapping | None = None):
    """Build a model (eval mode) from a zoo name ("mlp", "vgg", "resnet20", "transformer", "gpt") or
    "module:factory" (any importable callable returning an nn.Module), called with `kwargs`."""
    if ":" in arch:
        return model_from_factory(arch, kwargs)
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}: expected a zoo name {sorted(ARCHS)} or 'module:factory'")
    return call_factory(arch, ARCHS[arch], dict(kwargs or {}))
