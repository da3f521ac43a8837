"""What a server process sets once, before it builds the app: called by the process's entry point
(`fer serve`, the ASGI module attribute `service.app:app`, a Ray replica), never by `create_app`."""

from __future__ import annotations

import torch

from model.threads import pin_torch_threads
from service.settings import ServiceSettings


def configure_process(settings: ServiceSettings) -> ServiceSettings:
    """The settings with their thread counts resolved, and this thread (the event loop's) on one torch
    thread. The CPUs torch sees (OMP_NUM_THREADS where a scheduler such as Ray sets it, else the cores)
    go to the encoder; decoding gets as many threads, each on one torch thread (see service.batcher)."""
    cpus = torch.get_num_threads()  # before this thread is pinned below
    pin_torch_threads(1)
    return settings.model_copy(
        update={
            "device_threads": settings.device_threads or cpus,
            "decode_workers": settings.decode_workers or cpus,
            "video_decode_workers": settings.video_decode_workers or max(1, cpus // 2),
        }
    )
