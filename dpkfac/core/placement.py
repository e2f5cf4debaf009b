"""The placement file (schema dpkfac.placement/1): reading it and checking it against a model.

Writing one is the planner's (planner.placement); the executor only reads. No torch, no solver.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from .errors import InputError
from .jsonio import read_json, validate
from .schemas import PLACEMENT_SCHEMA, PLACEMENT_SCHEMA_ID, placement_ranks_schema


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


def owners_by_layer(placement: dict, layer_names: Sequence[str], *,
                    source: Any = "placement") -> tuple[int, ...]:
    """Owner rank of each of `layer_names`, in that order; InputError naming the first layer
    the placement does not assign."""
    assignment = placement["assignment"]
    missing = [name for name in layer_names if name not in assignment]
    if missing:
        raise InputError(f"{source}: field assignment: no owner for layer {missing[0]!r} "
                         "(placement and profile are for different models)")
    return tuple(int(assignment[name]) for name in layer_names)


def precondition_split(placement: dict, *, dims_g: dict[str, int] | None = None,
                       source: Any = "placement") -> dict[str, tuple[int, ...]]:
    """The placement's `precondition_split`: layer -> rows of its G side each rank
    preconditions (index = rank), in model order of the file; {} when it has none.

    InputError unless every split layer is assigned, every list has world_size entries with at
    least one row, and (with `dims_g`: layer -> dim_g) the rows add up to the layer's dim_g."""
    split = placement.get("precondition_split") or {}
    world = placement["world_size"]
    rows_of: dict[str, tuple[int, ...]] = {}
    for name, rows in split.items():
        where = f"{source}: field precondition_split/{name}"
        if name not in placement["assignment"]:
            raise InputError(f"{where}: layer {name!r} is not in the assignment")
        if len(rows) != world:
            raise InputError(f"{where}: expected {world} row counts (one per rank), "
                             f"got {len(rows)}")
        if dims_g is not None and sum(rows) != dims_g[name]:
            raise InputError(f"{where}: rows add up to {sum(rows)}, the layer's G side has "
                             f"{dims_g[name]}")
        if sum(rows) == 0:
            raise InputError(f"{where}: no rows")
        rows_of[name] = tuple(int(r) for r in rows)
    return rows_of
