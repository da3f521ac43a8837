"""The OpenVINO backend (FER_BACKEND=openvino): CLIP's image and text towers converted to OpenVINO and
run on the CPU, behind the two calls the engine makes of the torch module, `encode_image` and
`encode_text`. The image tower is converted with the engine's normaliser in front of it, so it takes the
uint8 pixels: a one-image request then runs no torch work before the call it waits on. Everything after
the towers (W, pooling, scoring) stays the engine's torch code.

Converting is slow beside reading a converted model, so the converted towers are saved in the cache
folder under a key made of the weights, the architecture, the normalisation and the OpenVINO release; a
restart reads them. What is saved is the float32 conversion whatever the precision, which is chosen
when compiling, so float32 and bfloat16 starts share one folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.clip import LoadedClip, Normaliser

log = logging.getLogger(__name__)

TOWERS = ("image", "text")
CACHE_FORMAT = "2"  # part of the key: a change in what is saved makes older folders unused
EXAMPLE_BATCH = 2  # torch.export specialises a dimension whose example size is 0 or 1
# OpenVINO's names of the precisions the CPU runs them in, by FER_DTYPE's.
PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16"}
KEY_CHARS = 24  # hex digits of the weights' hash that name a folder
# The folder of a save not yet renamed, `.<key>-<pid>-<thread>`, or a damaged folder it set aside.
UNFINISHED = re.compile(rf"\.[0-9a-f]{{{KEY_CHARS}}}-(?P<pid>\d+)-\d+(-damaged)?")
# An unfinished save's folder is removed when nothing in it changed for this long and its process is
# gone, or for the longer time whatever its process id says: a save writes without pauses, and a
# process id may be another machine's (a shared volume) or taken again by another process.
LEFTOVER_S, ABANDONED_S = 60, 600
# How a start's log tells a cached start from a conversion; the benchmark reads the services' logs for it.
READ_FROM_CACHE = "OpenVINO encoders read from the cache"
CONVERTING = "converting the CLIP encoders for OpenVINO"


class _Tower(torch.nn.Module):
    """One of the CLIP module's encode calls, as a module's forward: what torch.export takes. The image
    tower's starts at the uint8 pixels, with the normaliser."""

    def __init__(self, clip: torch.nn.Module, tower: str, normaliser: Normaliser):
        super().__init__()
        self.clip, self.tower, self.normaliser = clip, tower, normaliser

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tower == "image":
            return self.clip.encode_image(self.normaliser(x))
        return self.clip.encode_text(x)


def example_inputs(clip: LoadedClip) -> dict[str, torch.Tensor]:
    """Each tower's input, of the shape and type the engine passes it."""
    size = clip.preprocess.image_size
    return {
        "image": torch.zeros(EXAMPLE_BATCH, 3, size, size, dtype=torch.uint8),
        "text": clip.tokenizer(["a photo of a face"] * EXAMPLE_BATCH),
    }


def convert_towers(clip: LoadedClip, normaliser: Normaliser) -> dict:
    """Both towers of the float32 torch module as OpenVINO models, batch dimension dynamic.

    Through torch.export rather than `openvino.convert_model`'s own tracing: its trace check fails on
    open_clip's modules (the graphs of two traces differ in name mangling only), and torch.jit.trace is
    deprecated. No ONNX file in between, which would need the onnx packages."""
    import openvino as ov

    models = {}
    for tower, example in example_inputs(clip).items():
        batch = torch.export.Dim("batch")
        try:
            exported = torch.export.export(
                _Tower(clip.model, tower, normaliser), (example,), dynamic_shapes=({0: batch},)
            )
            model = ov.convert_model(exported)
        except Exception as exc:
            raise RuntimeError(
                f"OpenVINO cannot convert this CLIP model's {tower} encoder ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}): use FER_BACKEND=torch"
            ) from exc
        # Only the batch varies: fixed image and token sizes let OpenVINO plan every other shape once.
        model.reshape({model.input(0): ov.PartialShape([-1, *example.shape[1:]])})
        models[tower] = model
    return models


def weights_key(clip: LoadedClip, normaliser: Normaliser) -> str:
    """What the converted towers depend on: every weight, the module's structure (its repr names the
    activations, which the weights do not show), the normalisation converted in front of the image tower
    and the OpenVINO release. Not the precision, which is applied when compiling the float32 conversion."""
    import openvino as ov

    digest = hashlib.sha256()
    for part in (CACHE_FORMAT, ov.__version__, repr(clip.model), repr(normaliser)):
        digest.update(part.encode() + b"\0")
    for name, tensor in clip.model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:KEY_CHARS]


def cached_towers(clip: LoadedClip, normaliser: Normaliser, cache: Path | None) -> dict:
    """The converted towers: read from `cache` when a start before converted the same weights, else
    converted now and saved there (None: not saved). A damaged folder is converted again and replaced."""
    folder = None if cache is None else Path(cache) / weights_key(clip, normaliser)
    damaged = None  # which folder this start found damaged, to replace it and no other
    if folder is not None and (found := _identity(folder)) is not None:
        try:
            models = _read(folder)
        except (RuntimeError, OSError) as exc:  # OpenVINO raises RuntimeError for a cut or garbled file
            log.warning(  # the reason last: OpenVINO's may take several lines
                "cannot read the cached OpenVINO encoders in %s, converting them again to replace it: %s",
                folder,
                exc,
            )
            damaged = found
        else:
            log.info("%s, %s", READ_FROM_CACHE, folder)
            return models
    log.info("%s (once for these weights)", CONVERTING)
    models = convert_towers(clip, normaliser)
    if folder is not None:
        _save(models, folder, damaged)
    return models


def _read(folder: Path) -> dict:
    import openvino as ov

    names = [f"{tower}{suffix}" for tower in TOWERS for suffix in (".xml", ".bin")]
    if missing := [name for name in names if not (folder / name).is_file()]:
        raise FileNotFoundError(f"missing {', '.join(missing)}")
    return {tower: ov.Core().read_model(folder / f"{tower}.xml") for tower in TOWERS}


def _identity(path: Path) -> tuple | None:
    """Which folder is at `path` now (None: none), to tell the damaged one from another start's copy."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino, found.st_mtime_ns


def _save(models: dict, folder: Path, damaged: tuple | None = None) -> None:
    """Saved whole or not at all: written into a new folder beside, then renamed, so that a crash or a
    second process converting at the same time never leaves a folder another start would half-read.
    A folder that cannot be written costs the next start a conversion, not this one its model.
    `damaged`: the identity of the folder found damaged at `folder`, which the new one replaces."""
    import openvino as ov

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_unfinished(folder.parent)
        partial = folder.parent / f".{folder.name}-{os.getpid()}-{threading.get_ident()}"
        partial.mkdir()  # not mkdtemp, whose folder only its owner may read: the umask decides
    except OSError as exc:
        log.warning("the OpenVINO encoders are not cached: %s: %s", folder.parent, exc.strerror or exc)
        return
    try:
        for tower, model in models.items():
            # float32 weights as converted: the default would round them to float16.
            ov.save_model(model, partial / f"{tower}.xml", compress_to_fp16=False)
        if _rename_into(partial, folder, damaged):
            log.info("OpenVINO encoders cached in %s", folder)
    except OSError as exc:  # a full disk, a folder that cannot be written
        log.warning("the OpenVINO encoders are not cached: %s: %s", folder, exc.strerror or exc)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _remove_unfinished(cache: Path) -> None:
    """Removes the folders of saves that ended before their rename (a crash, a kill), which nothing
    else would: each is about the size of the weights. A cache that cannot be listed keeps them."""
    try:
        paths = list(cache.iterdir())
    except OSError:
        return
    for path in paths:
        match = UNFINISHED.fullmatch(path.name)
        if match is None or not path.is_dir():
            continue
        untouched = time.time() - _last_change(path)
        if untouched > ABANDONED_S or (untouched > LEFTOVER_S and not _running(int(match["pid"]))):
            log.info("removing %s, left by a save of the OpenVINO encoders that did not finish", path)
            shutil.rmtree(path, ignore_errors=True)


def _last_change(folder: Path) -> float:
    try:
        return max(path.stat().st_mtime for path in (folder, *folder.iterdir()))
    except OSError:  # renamed or removed meanwhile, by the save it belongs to
        return time.time()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: sends nothing, says whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # another user's process
        return True
    return True


def _rename_into(partial: Path, folder: Path, damaged: tuple | None) -> bool:
    """Renames the saved copy to `folder`; False when another start's copy got there first, which is
    kept (a third start may be reading it). The damaged folder, if still there, is renamed aside first
    and removed: a rename does not replace a folder with files."""
    aside = partial.with_name(f"{partial.name}-damaged")
    try:
        if damaged is not None and _identity(folder) == damaged:
            with contextlib.suppress(FileNotFoundError):  # another start set it aside first
                os.rename(folder, aside)
        try:
            os.rename(partial, folder)
        except OSError:
            if _identity(folder) in (None, damaged):  # nothing there, or the damaged one kept: a failure
                raise
            return False
        return True
    finally:
        shutil.rmtree(aside, ignore_errors=True)


@dataclass
class _Compiled:
    model: object  # openvino.CompiledModel
    requests: threading.local  # one infer request per calling thread: a request runs one call at a time


class OpenVinoClip:
    """The converted towers behind the torch module's two encode calls (torch tensors in and out).

    Compiled at the first call, for that thread's torch thread count: the service makes its encoder calls
    in a thread set to FER_DEVICE_THREADS, so OpenVINO uses the cores torch would have used there."""

    def __init__(self, models: dict, precision: torch.dtype):
        self.models = models
        self.precision = PRECISIONS[precision]
        self._compiled: dict[str, _Compiled] = {}
        self._lock = threading.Lock()

    normalises = True  # encode_image takes the uint8 pixels (model.engine.Encoders)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [N, 3, S, S] -> CLIP image embedding [N, D], float32."""
        return self._infer("image", pixels)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [N, L] -> CLIP text embedding [N, D], float32."""
        return self._infer("text", tokens.long())

    def _infer(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        compiled = self._compiled.get(tower) or self._compile(tower)
        request = getattr(compiled.requests, "request", None)
        if request is None:
            request = compiled.requests.request = compiled.model.create_infer_request()
        request.infer([x.cpu().contiguous().numpy()], share_inputs=True)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    def _compile(self, tower: str) -> _Compiled:
        import openvino as ov

        with self._lock:
            if tower not in self._compiled:
                config = {
                    "INFERENCE_PRECISION_HINT": self.precision,
                    "PERFORMANCE_HINT": "LATENCY",  # one call at a time, on every thread it is given
                    "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                }
                # The compiled model holds the weights it runs with: the converted one is let go.
                model = ov.Core().compile_model(self.models.pop(tower), "CPU", config)
                runs = model.get_property("INFERENCE_PRECISION_HINT").to_string()
                if runs != self.precision:
                    log.warning("OpenVINO runs the %s encoder in %s, not %s", tower, runs, self.precision)
                self._compiled[tower] = _Compiled(model, threading.local())
            return self._compiled[tower]


def openvino_clip(
    clip: LoadedClip, normaliser: Normaliser, precision: torch.dtype, cache: Path | None
) -> OpenVinoClip:
    """The loaded float32 CLIP as OpenVINO towers running in `precision` (float32 or bfloat16), the
    image tower behind `normaliser`."""
    if precision not in PRECISIONS:
        raise RuntimeError(f"FER_BACKEND=openvino runs float32 or bfloat16, not {precision}")
    return OpenVinoClip(cached_towers(clip, normaliser, cache), precision)
