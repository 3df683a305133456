"""Checksums of adapter tensors, stored with them and checked on load: a flipped byte is an error, not a model.

safetensors files and torch checkpoints carry no checksum of their tensor bytes, so one bad byte
on a disk or in a copy would load silently as slightly (or wildly) different weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

DIGEST_KEY = "lightning_peft_sha256"


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors``, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_digest(tensors: Mapping[str, torch.Tensor], expected: str | None, source: str) -> None:
    """Raise if ``tensors`` do not have the digest recorded with them (nothing is checked when none was)."""
    if expected is not None and tensor_digest(tensors) != expected:
        raise ValueError(f"{source} is corrupt: its tensors do not match the checksum saved with them "
                         "(a damaged disk or an incomplete copy?); use another copy")
