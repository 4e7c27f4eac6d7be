"""Networks of the paper. The registry is `lth.registry.MODELS`."""

from lth.core.models.base import PrunableModel

__all__ = ["PrunableModel"]
