"""Handing memory back to the OS while a model is quantized layer by layer, so that RSS follows what is held.

Two Linux details keep a freed full-precision weight resident: glibc keeps freed heap pages
for reuse, and the pages of a memory-mapped checkpoint (transformers' default way to load)
stay mapped until the whole file is unmapped, which the layers left in full precision
prevent. Where these details do not apply, both functions do nothing.
"""

from __future__ import annotations

import ctypes
import mmap

from torch import Tensor

PAGE = mmap.PAGESIZE
MADV_DONTNEED = 4  # Linux: drop the pages; a file-backed page is read from the file again if touched
_PRESENT, _SWAPPED, _FILE = 1 << 63, 1 << 62, 1 << 61  # /proc/self/pagemap entry bits


def return_freed_memory() -> None:
    """Hand the heap pages that glibc keeps after a free back to the OS."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def release_file_pages(tensor: Tensor) -> None:
    """Drop ``tensor``'s pages from RSS when a mapped file backs every one of them unmodified.

    Lossless by construction: a page that was written to (or swapped, or is anonymous memory)
    makes this a no-op, and a dropped file page is read from the file again if ever touched.
    """
    if tensor.device.type != "cpu":
        return
    start = -(-tensor.data_ptr() // PAGE) * PAGE  # whole pages only: the neighbours keep theirs
    end = (tensor.data_ptr() + tensor.nbytes) // PAGE * PAGE
    if end > start and _unmodified_file_pages(start, end):
        libc = ctypes.CDLL(None)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise(start, end - start, MADV_DONTNEED)


def _unmodified_file_pages(start: int, end: int) -> bool:
    """Whether each resident page in ``[start, end)`` maps a file unmodified and none is swapped out."""
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(start // PAGE * 8)
            entries = memoryview(pagemap.read((end - start) // PAGE * 8)).cast("Q")
    except OSError:  # not Linux
        return False
    return all(not entry & _SWAPPED and (entry & _FILE or not entry & _PRESENT) for entry in entries)
