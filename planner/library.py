"""`dpkfac.plan`: a placement document from a profile, in process. Pure: no torch, no files
written; the same pipeline and step model as `dpkfac plan`."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

from dpkfac.core.cluster import Cluster, cluster_from_dict, load_cluster
from dpkfac.core.errors import InputError
from dpkfac.core.jsonio import file_sha256, read_json
from dpkfac.core.profile import profile_from_dict
from dpkfac.core.units import parse_bytes
from planner.model.costs import PlanConfig
from planner.placement import placement_document
from planner.plan import make_plan, resolve_cluster
from planner.solve.names import auto_time_limit_s


def plan(profile: dict | str | os.PathLike, workers: int | None = None, *,
         memory_cap: int | str | None = None, cluster: dict | str | os.PathLike | None = None,
         solver: str = "best", factor_update_freq: int = 1, inv_update_freq: int = 1,
         speeds: Sequence[float] | None = None, time_limit_s: float | None = None,
         owners: str = "auto", overlap: bool = True, split: bool = True) -> dict:
    """The placement document (dpkfac.placement/1, a dict) of `profile` (a profile document or
    the path of a profile file) on `workers` ranks or on `cluster` (a cluster document or
    file). memory_cap: bytes of second-order state per worker (an int, or text such as
    "512MiB"); time_limit_s: solver budget in seconds (default as `dpkfac plan`'s); solver and
    owners as `dpkfac plan --solver/--owners`; overlap=False plans for the serial step
    (`dpkfac train --no-overlap`); split=False never splits a layer's preconditioning across
    workers (`dpkfac plan --no-split`). Bad input raises dpkfac.core.errors.InputError.

    The solvers stop at time limits, so two processes may not plan alike: under torchrun use
    dpkfac.plan_for_group, which plans on rank 0 and hands the dict to the others."""
    doc, ref = _profile_document(profile)
    prof = profile_from_dict(doc, source=f"profile {ref['path']!r}")
    cap = parse_bytes(memory_cap, what="memory_cap") if isinstance(memory_cap, str) else memory_cap
    target = resolve_cluster(workers=workers, speeds=speeds, cluster=_cluster(cluster))
    limit = time_limit_s if time_limit_s is not None else auto_time_limit_s(
        layers=len(prof.layers), workers=target.workers)
    config = PlanConfig(factor_update_freq=factor_update_freq, inv_update_freq=inv_update_freq,
                        overlap=overlap)
    solved = make_plan(profile=prof, cluster=target, config=config, method=solver,
                       memory_cap=cap, time_limit_s=limit, owners=owners, split=split)
    return placement_document(solved, profile_ref=ref, memory_cap=cap)


def _profile_document(profile: dict | str | os.PathLike) -> tuple[dict, dict]:
    """The profile document and its reference ({"path", "sha256"}) for the placement."""
    if isinstance(profile, dict):
        canonical = json.dumps(profile, sort_keys=True, separators=(",", ":")).encode()
        return profile, {"path": "<in memory>", "sha256": hashlib.sha256(canonical).hexdigest()}
    if isinstance(profile, (str, os.PathLike)):
        doc = read_json(profile, what="profile")
        return doc, {"path": str(profile), "sha256": file_sha256(profile)}
    raise InputError(f"profile: expected a profile document (dict) or a file path, got "
                     f"{type(profile).__name__}")


def _cluster(cluster: dict | str | os.PathLike | Cluster | None) -> Cluster | None:
    if cluster is None or isinstance(cluster, Cluster):
        return cluster
    if isinstance(cluster, dict):
        return cluster_from_dict(cluster)
    return load_cluster(cluster)
