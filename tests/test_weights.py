"""`fer weights`: downloads from a local mirror (an http.server on 127.0.0.1, or file://), verified,
atomic and idempotent; a clear one-message failure offline; and the loader finds what was stored.

The CLIP half goes through open_clip's real download code: a registry entry for the tiny test
architecture points at the local server, the way the real entries point at their hosts."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import socket
import subprocess
import threading
from functools import partial
from pathlib import Path

import open_clip
import pytest
import torch

from cli.main import main
from model import registry as presets
from model.registry import Preset, ProjectionRelease
from model.weights import download
from model.weights import store as weights
from tests.support import TINY_MODEL

MIRROR_SETTING = "FER_WEIGHTS_MIRROR"

TAG = "fer-test"
PRESET = "tiny-exp-clip"
PLAIN_PRESET = "tiny-clip"
PROJECTION_FILE = "ExpCLIP_tiny_model.pth"


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]
    truncate: bool = False
    send_length: bool = True  # False: no Content-Length, the body ends when the connection closes

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if not self.truncate and self.send_length:
            return super().do_GET()
        body = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        if self.send_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.truncate:
            body = body[: len(body) // 2]  # then the connection closes: an interrupted download
        self.wfile.write(body)


@pytest.fixture
def mirror(tmp_path, tiny_clip_path, official_projection_path):
    """A local server holding the tiny CLIP checkpoint and an official-format projection."""
    root = tmp_path / "mirror"
    root.mkdir()
    shutil.copy(tiny_clip_path, root / "tiny-clip.pt")
    shutil.copy(official_projection_path, root / PROJECTION_FILE)
    handler = type("Handler", (_Handler,), {"requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.root, server.handler = root, handler
    server.url = f"http://127.0.0.1:{server.server_port}"
    yield server
    server.shutdown()
    server.server_close()


def _dead_url() -> str:
    """A local address where nothing listens: connection refused, as with no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def tiny_presets(monkeypatch, mirror, official_projection_path):
    """Presets like the real ones, on the tiny architecture, whose CLIP tag the local mirror serves."""
    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED,
        TINY_MODEL,
        {TAG.replace("-", "_"): {"url": f"{mirror.url}/tiny-clip.pt", "hf_hub": ""}},
    )
    release = ProjectionRelease(PROJECTION_FILE, weights.git_blob_sha1(official_projection_path))
    monkeypatch.setitem(
        presets.PRESETS, PRESET, Preset(PRESET, TINY_MODEL, TAG, release, "exp-clip", "tiny Exp-CLIP")
    )
    monkeypatch.setitem(
        presets.PRESETS, PLAIN_PRESET, Preset(PLAIN_PRESET, TINY_MODEL, TAG, None, "clip", "tiny CLIP")
    )
    monkeypatch.setenv(MIRROR_SETTING, mirror.url)
    return mirror


def _download(weights_dir: Path, *names: str) -> int:
    return main(["weights", "download", *names, "--dir", str(weights_dir)])


def _clip_file(weights_dir: Path) -> Path:
    return weights_dir / "clip" / f"{TINY_MODEL}__{TAG}.pt"


def _leftovers(weights_dir: Path) -> list[Path]:
    return [p for p in weights_dir.rglob("*") if ".partial" in p.name or ".download-" in p.name]


def test_git_blob_sha1_is_gits_own_id(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"\x00exp-clip\n" * 1000)
    if shutil.which("git") is None:
        expected = hashlib.sha1(b"blob 10000\0" + path.read_bytes()).hexdigest()
    else:
        expected = subprocess.run(
            ["git", "hash-object", str(path)], capture_output=True, text=True, check=True
        ).stdout.strip()
    assert weights.git_blob_sha1(path) == expected


def test_download_stores_verified_files_where_the_loader_looks(tiny_presets, tmp_path):
    weights_dir = tmp_path / "weights"
    assert _download(weights_dir, PRESET) == 0

    clip_file, projection = _clip_file(weights_dir), (weights_dir / PROJECTION_FILE)
    assert presets.find_clip_checkpoint(weights_dir, TINY_MODEL, TAG) == clip_file
    assert clip_file.read_bytes() == (tiny_presets.root / "tiny-clip.pt").read_bytes()
    assert projection.read_bytes() == (tiny_presets.root / PROJECTION_FILE).read_bytes()
    manifest = json.loads((weights_dir / weights.MANIFEST_NAME).read_text())
    assert manifest[f"clip/{clip_file.name}"]["sha256"] == weights.sha256_file(clip_file)
    assert manifest[PROJECTION_FILE]["sha256"] == weights.sha256_file(projection)
    assert _leftovers(weights_dir) == []


def test_engine_loads_the_downloaded_preset_with_no_other_configuration(tiny_presets, tmp_path, monkeypatch):
    from model.engine import create_engine
    from model.settings import ModelSettings

    for key in ("FER_CLIP_MODEL", "FER_CLIP_WEIGHTS", "FER_PROJECTION", "FER_PREPROCESS"):
        monkeypatch.delenv(key, raising=False)
    weights_dir = tmp_path / "weights"
    assert _download(weights_dir, PRESET) == 0

    engine = create_engine(ModelSettings(preset=PRESET, weights_dir=weights_dir, device="cpu"))
    served = torch.load(tiny_presets.root / PROJECTION_FILE, weights_only=True)
    assert engine.name == PRESET
    assert torch.equal(engine.projection, next(iter(served.values())))
    state = torch.load(tiny_presets.root / "tiny-clip.pt", weights_only=True)
    name, tensor = next((k, v) for k, v in state.items() if v.ndim == 2)
    assert torch.equal(engine.clip.state_dict()[name], tensor)


def test_second_download_is_a_no_op_without_network(tiny_presets, tmp_path, monkeypatch, capsys):
    weights_dir = tmp_path / "weights"
    assert _download(weights_dir, PRESET) == 0
    served = len(tiny_presets.handler.requests)
    assert served == 2

    monkeypatch.setenv(MIRROR_SETTING, _dead_url())
    monkeypatch.setattr(open_clip, "download_pretrained", _fail_if_called)
    capsys.readouterr()
    assert _download(weights_dir, PRESET) == 0
    assert len(tiny_presets.handler.requests) == served
    assert capsys.readouterr().out.count("already present") == 2


def _fail_if_called(*args, **kwargs):
    raise AssertionError("a present, verified file was downloaded again")


def _assert_refused_and_nothing_stored(weights_dir: Path, capsys, message: str) -> None:
    """`fer weights download` of the projection fails with `message`, and leaves no file, no partial
    and no manifest entry behind."""
    assert _download(weights_dir, PRESET) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (weights_dir / PROJECTION_FILE).exists()
    assert _leftovers(weights_dir) == []
    assert PROJECTION_FILE not in json.loads((weights_dir / weights.MANIFEST_NAME).read_text())


def test_a_corrupt_projection_is_rejected_and_nothing_is_stored(tiny_presets, tmp_path, capsys):
    data = bytearray((tiny_presets.root / PROJECTION_FILE).read_bytes())
    data[-20] ^= 0xFF
    (tiny_presets.root / PROJECTION_FILE).write_bytes(bytes(data))
    weights_dir = tmp_path / "weights"

    _assert_refused_and_nothing_stored(weights_dir, capsys, "does not match the official release")


def test_an_interrupted_download_never_looks_complete(tiny_presets, tmp_path, capsys):
    weights_dir = tmp_path / "weights"
    assert _download(weights_dir, PLAIN_PRESET) == 0  # CLIP in place; the projection is what breaks
    target = weights_dir / PROJECTION_FILE
    target.with_name(target.name + ".partial").write_bytes(b"stale half of an earlier try")
    tiny_presets.handler.truncate = True

    assert _download(weights_dir, PRESET) == 1
    assert "closed after" in capsys.readouterr().err
    assert not target.exists()
    assert _leftovers(weights_dir) == []
    assert main(["weights", "list", "--dir", str(weights_dir)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if PROJECTION_FILE in line)
    assert row.split()[-1] == "missing"


@pytest.mark.parametrize("send_length", [True, False], ids=["content-length", "no-length"])
def test_an_oversized_projection_is_stopped_and_nothing_is_stored(
    tiny_presets, tmp_path, monkeypatch, capsys, send_length
):
    """A mirror sending more than any official projection is cut off at the cap, whether or not it
    announces its size, and leaves no partial file behind."""
    weights_dir = tmp_path / "weights"
    assert _download(weights_dir, PLAIN_PRESET) == 0  # CLIP in place; only the projection is fetched
    size = (tiny_presets.root / PROJECTION_FILE).stat().st_size
    monkeypatch.setattr(download, "MAX_PROJECTION_BYTES", size // 2)
    monkeypatch.setattr(download, "CHUNK", 256)  # several blocks below the cap, so streaming is cut mid-way
    tiny_presets.handler.send_length = send_length

    _assert_refused_and_nothing_stored(weights_dir, capsys, "larger than any official projection")

    monkeypatch.setattr(download, "MAX_PROJECTION_BYTES", size)  # exactly the cap is still accepted
    assert _download(weights_dir, PRESET) == 0
    assert (weights_dir / PROJECTION_FILE).stat().st_size == size


def test_a_present_file_that_does_not_verify_is_replaced(tiny_presets, tmp_path):
    weights_dir = tmp_path / "weights"
    target = weights_dir / PROJECTION_FILE
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the release")

    assert _download(weights_dir, PRESET) == 0
    assert target.read_bytes() == (tiny_presets.root / PROJECTION_FILE).read_bytes()


def test_offline_is_one_clear_message(tiny_presets, tmp_path, monkeypatch, capsys):
    dead = _dead_url()
    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED[TINY_MODEL], TAG.replace("-", "_"), {"url": f"{dead}/x.pt"}
    )
    weights_dir = tmp_path / "weights"

    assert _download(weights_dir, PRESET) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "failed: no network connection" in err
    assert "machine with internet access" in err and "`fer weights list`" in err
    assert f"fer weights download {PRESET}" in err
    assert list(weights_dir.rglob("*.pt")) == [] and _leftovers(weights_dir) == []


def test_offline_projection_names_the_mirror_variable(tiny_presets, tmp_path, monkeypatch, capsys):
    weights_dir = tmp_path / "weights"
    assert _download(weights_dir, PLAIN_PRESET) == 0
    monkeypatch.setenv(MIRROR_SETTING, _dead_url())

    assert _download(weights_dir, PRESET) == 1
    err = capsys.readouterr().err
    assert "projection" in err and "no network connection" in err and MIRROR_SETTING in err


def test_mirror_may_be_a_file_url_and_an_option(tiny_presets, tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_SETTING, _dead_url())  # the option wins over the variable
    weights_dir = tmp_path / "weights"
    args = ["weights", "download", PRESET, "--dir", str(weights_dir), "--mirror", tiny_presets.root.as_uri()]
    assert main(args) == 0
    assert (weights_dir / PROJECTION_FILE).is_file()


def test_plain_clip_presets_fetch_only_clip_and_demo_fetches_nothing(tiny_presets, tmp_path):
    weights_dir = tmp_path / "weights"
    assert _download(weights_dir, PLAIN_PRESET) == 0
    assert _clip_file(weights_dir).is_file()
    assert not (weights_dir / PROJECTION_FILE).exists()
    assert tiny_presets.handler.requests == ["/tiny-clip.pt"]

    demo_dir = tmp_path / "demo"
    assert _download(demo_dir, "demo") == 0
    assert not demo_dir.exists() or not any(demo_dir.iterdir())


def test_list_shows_every_preset_and_what_is_present(tiny_presets, tmp_path, capsys):
    weights_dir = tmp_path / "weights"
    assert _download(weights_dir, PRESET) == 0
    capsys.readouterr()

    assert main(["weights", "list", "--dir", str(weights_dir)]) == 0
    out = capsys.readouterr().out
    for name in presets.PRESETS:
        assert name in out
    size = (weights_dir / PROJECTION_FILE).stat().st_size / 1024
    assert f"{PROJECTION_FILE}  present {size:.1f} KiB" in out or f"present {size / 1024:.1f} MiB" in out
    assert "clip/ViT-B-32__openai.safetensors" in out  # what to copy in by hand, by name
    assert f"clip/{_clip_file(weights_dir).name}" in out


def test_verify_passes_then_catches_tampering(tiny_presets, tmp_path, capsys):
    weights_dir = tmp_path / "weights"
    assert _download(weights_dir, PRESET) == 0
    assert main(["weights", "verify", "--dir", str(weights_dir)]) == 0

    clip_file = _clip_file(weights_dir)
    data = bytearray(clip_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    clip_file.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["weights", "verify", "--dir", str(weights_dir)]) == 1
    out = capsys.readouterr().out
    assert f"BAD  {clip_file}" in out and f"ok   {weights_dir / PROJECTION_FILE}" in out

    assert _download(weights_dir, PRESET) == 0  # a file that does not verify is fetched again
    assert main(["weights", "verify", "--dir", str(weights_dir)]) == 0


def test_hub_downloads_are_held_to_the_hubs_sha256(tiny_presets, tmp_path, monkeypatch, capsys):
    """The hub cache names an LFS blob by its content's sha256; a blob that disagrees is not stored."""
    content = (tiny_presets.root / "tiny-clip.pt").read_bytes()

    def fake_hub_download(cfg, cache_dir, name):
        blobs = Path(cache_dir) / "models--org--repo" / "blobs"
        snapshot = Path(cache_dir) / "models--org--repo" / "snapshots" / "abc"
        blobs.mkdir(parents=True)
        snapshot.mkdir(parents=True)
        (blobs / name).write_bytes(content)
        (snapshot / "open_clip_model.safetensors").symlink_to(blobs / name)
        return str(snapshot / "open_clip_model.safetensors")

    weights_dir = tmp_path / "weights"
    monkeypatch.setattr(
        open_clip, "download_pretrained", lambda cfg, cache_dir: fake_hub_download(cfg, cache_dir, "0" * 64)
    )
    assert _download(weights_dir, PLAIN_PRESET) == 1
    assert "do not match the hub's checksum" in capsys.readouterr().err
    assert presets.find_clip_checkpoint(weights_dir, TINY_MODEL, TAG) is None

    good = hashlib.sha256(content).hexdigest()
    monkeypatch.setattr(
        open_clip, "download_pretrained", lambda cfg, cache_dir: fake_hub_download(cfg, cache_dir, good)
    )
    assert _download(weights_dir, PLAIN_PRESET) == 0
    stored = presets.find_clip_checkpoint(weights_dir, TINY_MODEL, TAG)
    assert stored.name == f"{TINY_MODEL}__{TAG}.safetensors" and not stored.is_symlink()
    assert stored.read_bytes() == content and _leftovers(weights_dir) == []
    manifest = json.loads((weights_dir / weights.MANIFEST_NAME).read_text())
    assert manifest[stored.relative_to(weights_dir).as_posix()]["sha256"] == good  # the verified digest


def test_real_presets_point_at_the_pinned_official_files():
    files = {f.kind: f for f in weights.preset_files("exp-clip-b32")}
    assert files["projection"].url == presets.PRESETS["exp-clip-b32"].projection.url()
    assert presets.EXP_CLIP_COMMIT in files["projection"].url
    assert files["clip"].relpath == "clip/ViT-B-32__openai.safetensors"
    assert [f.kind for f in weights.preset_files("clip-l14")] == ["clip"]
    assert weights.preset_files("demo") == []
    mirrored = weights.preset_files("exp-clip-l14", "file:///srv/fer/")
    assert mirrored[1].url == "file:///srv/fer/ExpCLIP_L14_model.pth"
    assert mirrored[1].blob_sha1 == presets.PRESETS["exp-clip-l14"].projection.blob_sha1


def test_an_unreachable_hub_fails_at_once_and_leaves_no_folder(tiny_presets, tmp_path, monkeypatch, capsys):
    """The hub client retries a dead network for about a minute a file; the host is tried once first."""
    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED[TINY_MODEL],
        TAG.replace("-", "_"),
        {"hf_hub": "org/repo/", "url": ""},
    )
    monkeypatch.setattr(download, "hub_endpoint", _dead_url)
    called = []
    monkeypatch.setattr(open_clip, "download_pretrained", lambda *a, **k: called.append(a) or "")
    weights_dir = tmp_path / "fresh" / "weights"

    assert _download(weights_dir, PLAIN_PRESET) == 1
    err = capsys.readouterr().err
    assert "from hf-hub:org/repo/ failed: no network connection" in err and "Traceback" not in err
    assert called == []  # the hub client never started its retries
    assert not (tmp_path / "fresh").exists()  # no empty weights/ or weights/clip/ left behind


def test_a_failed_projection_download_leaves_no_folder(tiny_presets, tmp_path):
    (projection,) = [f for f in weights.preset_files(PRESET, _dead_url()) if f.kind == "projection"]
    weights_dir = tmp_path / "weights"
    with pytest.raises(download.WeightsDownloadError, match="failed: no network connection"):
        download.ensure(projection, weights_dir, PRESET)
    assert not weights_dir.exists()
