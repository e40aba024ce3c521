"""The model layer: :class:`SCLatent`, the only code that reads or writes AnnData/MuData."""

from ._model import SCLatent

__all__ = ["SCLatent"]
