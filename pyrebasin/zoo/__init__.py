"""Built-in models, each with a hand-written `permutation_spec()`: MLP, VGG, ResNet20, Transformer."""
from .mlp import MLP
from .resnet import ResNet20
from .transformer import Transformer
from .vgg import VGG

__all__ = ["MLP", "VGG", "ResNet20", "Transformer", "build", "ARCHS"]

ARCHS = {"mlp": MLP, "vgg": VGG, "resnet20": ResNet20, "transformer": Transformer}


def build(arch: str, **kwargs):
    """A zoo model by name ("mlp", "vgg", "resnet20", "transformer")."""
    if arch not in ARCHS:
        raise ValueError(f"unknown zoo architecture {arch!r}; expected one of {sorted(ARCHS)}")
    return ARCHS[arch](**kwargs)
