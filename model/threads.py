"""CPU threading for running the encoders: shared by the service's entry points and the benchmark's
raw encoder, which must run torch the way the service does to be its reference."""

from __future__ import annotations

# How long an idle OpenMP thread spins before it sleeps, read once by libgomp when torch loads it.
# libgomp's default (300,000 spins) keeps the encoder's idle threads busy on cores long after each call,
# taking them from decoding and the event loop; 10,000 still spans the gaps between one call's ops.
GOMP_SPIN_COUNT = "10000"


def pin_torch_threads(n: int) -> None:
    """Sets the calling thread's intra-op thread count for good. torch sets a thread's count from the
    process-wide value the first time the thread asks for it, undoing a count set before that; asking
    first makes that happen now. (The process-wide value becomes `n` too, for threads not yet started.)"""
    import torch

    torch.get_num_threads()
    torch.set_num_threads(n)
