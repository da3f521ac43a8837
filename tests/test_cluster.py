"""The `--ray` options without a cluster: parsing, checks, paths for workers, and what a machine without
the `ray` extra gets (tests/test_ray.py runs them on a cluster)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cli.cluster import ray_options
from cli.main import build_parser, main
from model.cluster import INSTALL_HINT, RayOptions, chunk_ranges, for_workers
from model.settings import ModelSettings


def test_the_ray_options_of_each_offline_command():
    parser = build_parser()
    common = {
        ("train", "extract"): ["--images", "faces", "--cache", "c"],
        ("train", "run"): ["--images", "faces", "--cache", "c", "--out", "w.safetensors"],
        ("eval",): ["--data", "d", "--out", "o"],
        ("eval-retrieval",): ["--data", "d.csv", "--out", "o"],
    }
    for command, args in common.items():
        assert ray_options(parser.parse_args([*command, *args])) is None
        flags = [
            "--ray",
            "--ray-address",
            "auto",
            "--ray-actors",
            "3",
            "--ray-gpus",
            "0.5",
            "--ray-decoders",
            "4",
        ]
        options = ray_options(parser.parse_args([*command, *args, *flags]))
        assert options == RayOptions(address="auto", actors=3, gpus_per_actor=0.5, decoders=4)
        assert options.decode_actors == 4 and RayOptions(actors=3).decode_actors == 6


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"actors": 0}, "--ray-actors"),
        ({"gpus_per_actor": -1}, "--ray-gpus"),
        ({"cpus_per_actor": 0}, "--ray-cpus"),
        ({"decoders": 0}, "--ray-decoders"),
    ],
)
def test_impossible_ray_options_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        RayOptions(**fields)


def test_the_jobs_cut_their_inputs_as_the_single_process_commands_do():
    assert chunk_ranges(4, 11, 3) == [(4, 7), (7, 10), (10, 11)]
    assert chunk_ranges(0, 0, 3) == []
    with pytest.raises(ValueError, match="at least 1"):
        chunk_ranges(0, 4, 0)


def test_relative_paths_reach_the_workers_as_absolute_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pth").write_bytes(b"x")
    settings = ModelSettings(weights_dir="weights", projection="w.pth", clip_weights="openai")
    moved = for_workers(settings)
    assert moved.weights_dir == tmp_path / "weights" and moved.projection == str(tmp_path / "w.pth")
    assert moved.clip_weights == "openai"  # a tag, not a path


def test_without_the_ray_extra_ray_is_one_line_that_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` raises ImportError
    assert main(["eval", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--ray"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"fer: error: {INSTALL_HINT}"


def test_nothing_but_the_ray_modules_imports_ray():
    code = (
        "import sys, cli.main, cli.cluster, model.cluster, service.app, model.train.extract, "
        "model.evaluate.run; cli.main.build_parser(); assert 'ray' not in sys.modules, 'ray imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert result.returncode == 0, result.stderr
