"""The placement file (schema dpkfac.placement/1): making it, reading it, checking it."""
from __future__ import annotations

import os
from typing import Any, Sequence

from .costmodel import PlanConfig, layer_state_bytes, layer_works_s, predict
from .errors import InputError
from .jsonio import file_sha256, read_json, validate
from .profile import Profile
from .schemas import PLACEMENT_SCHEMA, PLACEMENT_SCHEMA_ID, placement_ranks_schema
from .solvers import solve


def make_placement(*, profile: Profile, profile_path: str | os.PathLike, workers: int,
                   method: str = "best", config: PlanConfig, memory_cap: int | None = None,
                   time_limit_s: float = 10.0, speeds: Sequence[float] | None = None) -> dict:
    """Solve the placement of `profile` on `workers` ranks and return the placement document.

    memory_cap: bytes of second-order state allowed per worker (None: no cap).
    time_limit_s: seconds the ILP may run. speeds: relative worker speeds (default all 1.0).
    Predicted times are seconds per step, memory in bytes (CONTRACTS.md).
    """
    solution = solve(method, work=layer_works_s(profile, config=config), workers=workers,
                     speeds=speeds, memory=layer_state_bytes(profile), memory_cap=memory_cap,
                     time_limit_s=time_limit_s)
    pred = predict(profile, owners=solution.owners, workers=workers, config=config,
                   speeds=speeds, compute_bound_s=solution.lower_bound_s)
    per_worker = [
        {"rank": rank, "compute_s": pred.compute_s[rank], "memory_bytes": pred.memory_bytes[rank],
         "layers": pred.layers_owned[rank], "broadcast_bytes": pred.broadcast_bytes[rank],
         "comm_bytes": pred.comm_bytes[rank]}
        for rank in range(workers)
    ]
    return {
        "schema": PLACEMENT_SCHEMA_ID,
        "model": profile.model,
        "world_size": workers,
        "profile": {"path": str(profile_path), "sha256": file_sha256(profile_path)},
        "solver": solution.method,
        "status": solution.status,
        "config": {"factor_update_freq": config.factor_update_freq,
                   "inv_update_freq": config.inv_update_freq,
                   "batch_size": profile.batch_size,
                   "compute_method": profile.compute_method},
        "assignment": {layer.name: owner for layer, owner in zip(profile.layers, solution.owners)},
        "predicted": {
            "step_time_s": pred.step_time_s,
            "second_order_s": pred.second_order_s,
            "lower_bound_s": pred.lower_bound_s,
            "compute_makespan_s": pred.compute_makespan_s,
            "broadcast_s": pred.broadcast_s,
            "allreduce_s": pred.allreduce_s,
            "forward_backward_s": profile.forward_backward_s,
            "optimizer_s": profile.optimizer_s,
            "comm_bytes_per_step": max(pred.comm_bytes),
            "per_worker": per_worker,
        },
        "planner": {
            "requested_solver": method,
            "solve_time_s": solution.solve_time_s,
            "time_limit_s": time_limit_s,
            "memory_cap_bytes": memory_cap,
            "speeds": list(speeds) if speeds is not None else [1.0] * workers,
        },
    }


def load_placement(source: str | os.PathLike | dict) -> dict:
    """Read (unless given a dict) and check a placement document; return it.

    Checks the schema, then (with a schema made for its world_size) that every assigned rank and
    per-worker rank is < world_size, then that no per-worker rank appears twice.
    Raises InputError naming the file, the field and what was expected.
    """
    if isinstance(source, dict):
        doc, where = source, "placement"
    else:
        doc, where = read_json(source, what="placement"), f"placement {str(source)!r}"
    if not isinstance(doc, dict):
        raise InputError(f"{where}: (top level): expected a JSON object, got {type(doc).__name__}")
    if doc.get("schema") != PLACEMENT_SCHEMA_ID and "schema" in doc:
        raise InputError(f"{where}: field schema: expected {PLACEMENT_SCHEMA_ID!r}, "
                         f"got {doc.get('schema')!r}")
    validate(doc, PLACEMENT_SCHEMA, source=where)
    world = doc["world_size"]
    validate(doc, placement_ranks_schema(world), source=where,
             explain=lambda rank: f"rank {rank!r} is out of range for world_size {world} "
                                  f"(expected 0..{world - 1})")
    seen: set[int] = set()
    for i, entry in enumerate(doc["predicted"]["per_worker"]):
        rank = entry["rank"]
        if rank in seen:
            raise InputError(f"{where}: field predicted/per_worker/{i}/rank: rank {rank} "
                             f"appears twice")
        seen.add(rank)
    return doc


def check_placement_matches(placement: dict, *, layer_names: Sequence[str],
                            world_size: int | None, source: Any = "placement") -> None:
    """InputError unless the placement assigns exactly `layer_names` and has `world_size`.

    world_size None skips the world-size check. `source` names the placement in messages.
    """
    assigned = set(placement["assignment"])
    wanted = set(layer_names)
    missing = [n for n in layer_names if n not in assigned]
    unknown = [n for n in placement["assignment"] if n not in wanted]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model layer(s) not in the placement: {_few(missing)}")
        if unknown:
            parts.append(f"{len(unknown)} placement layer(s) not in the model: {_few(unknown)}")
        raise InputError(f"{source}: field assignment: does not match the model's K-FAC layers "
                         f"({'; '.join(parts)})")
    if world_size is not None and placement["world_size"] != world_size:
        raise InputError(f"{source}: field world_size: the placement is for "
                         f"{placement['world_size']} workers but this run has {world_size}")


def _few(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
