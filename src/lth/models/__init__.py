"""Networks of the paper. The registry is `lth.registry.MODELS`."""

from lth.models.base import PrunableModel

__all__ = ["PrunableModel"]
