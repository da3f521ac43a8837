"""The `--ray` options of the offline commands (`fer train extract|run`, `fer eval`, `fer eval-retrieval`):
their work on a Ray cluster's GPUs through Ray Data (model.cluster), with the same results."""

from __future__ import annotations

import argparse


def add_ray_options(p: argparse.ArgumentParser, gpus_default: str) -> None:
    group = p.add_argument_group("Ray (the `ray` extra: pip install -e '.[ray]')")
    group.add_argument(
        "--ray",
        action="store_true",
        help="run on a Ray cluster (Ray Data actor pools); same results as without it",
    )
    group.add_argument(
        "--ray-address",
        default=None,
        help="the cluster to join, e.g. auto on one of its nodes (default: RAY_ADDRESS, else a one-node "
        "cluster on this machine)",
    )
    group.add_argument(
        "--ray-actors", type=int, default=1, help="actors per model stage, each with its model (default 1)"
    )
    group.add_argument(
        "--ray-gpus",
        type=float,
        default=None,
        help=f"GPUs per model actor (default when the cluster has GPUs: {gpus_default}; else 0)",
    )
    group.add_argument(
        "--ray-cpus",
        type=float,
        default=1.0,
        help="CPUs per model actor; its torch threads follow them (default 1)",
    )
    group.add_argument(
        "--ray-decoders",
        type=int,
        default=None,
        help="CPU actors that decode the inputs (default: 2 per model actor)",
    )


def ray_options(args: argparse.Namespace):
    """The command's RayOptions (model.cluster), or None without --ray."""
    if not args.ray:
        return None
    from model.cluster import RayOptions

    return RayOptions(
        address=args.ray_address,
        actors=args.ray_actors,
        gpus_per_actor=args.ray_gpus,
        cpus_per_actor=args.ray_cpus,
        decoders=args.ray_decoders,
    )
