"""What a server process sets once, before it builds the app: called by the process's entry point
(`fer serve`, the ASGI module attribute `service.app:app`, a Ray replica), never by `create_app`."""

from __future__ import annotations

import torch

from model.threads import pin_torch_threads
from service.settings import ServiceSettings


def configure_process(settings: ServiceSettings, cpus: int | None = None) -> ServiceSettings:
    """The settings with their thread counts resolved, and this thread (the event loop's) on one torch
    thread. `cpus` (default: the CPUs torch sees, OMP_NUM_THREADS where a scheduler sets it) go to the
    encoder; decoding gets as many threads, each on one torch thread, because every thread that runs torch
    on several threads keeps an OpenMP team of its own and more teams than cores slow every encoder op."""
    cpus = cpus or torch.get_num_threads()  # before this thread is pinned below
    pin_torch_threads(1)
    return settings.with_threads(cpus)
