"""The selective family: train a chosen subset of the model's own parameters (BitFit: its biases)."""

from lightning_peft.selective.callback import PARAM_TYPES, BitFit, Selective

__all__ = ["PARAM_TYPES", "BitFit", "Selective"]
