"""The cluster description: `--workers N` (a flat cluster of identical workers) or a JSON file
(schema dpkfac.cluster/1): nodes x GPUs per node, intra- and inter-node links, per-worker speed
and memory. The planner turns it into a topology
(planner.model.topology). Bandwidths in bytes per second, latencies in seconds,
memory in bytes (or a string with a unit, e.g. "80GiB").

Example:
    {"schema": "dpkfac.cluster/1", "nodes": 16, "gpus_per_node": 4,
     "intra_node": {"bandwidth_bytes_per_s": 2.0e11, "latency_s": 3e-6},
     "inter_node": {"bandwidth_bytes_per_s": 1.25e10, "latency_s": 8e-6},
     "worker": {"speed": 1.0, "memory_bytes": "16GiB"},
     "workers": [{"rank": 5, "speed": 0.7}]}
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import InputError
from .jsonio import read_json, validate
from .units import parse_bytes

CLUSTER_SCHEMA_ID = "dpkfac.cluster/1"

_POSITIVE = {"type": "number", "exclusiveMinimum": 0}
_MEMORY = {"oneOf": [{"type": "integer", "minimum": 0},
                     {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*[a-zA-Z]*\s*$"}]}
_LINK = {"type": "object", "required": ["bandwidth_bytes_per_s", "latency_s"],
         "additionalProperties": False,
         "properties": {"bandwidth_bytes_per_s": _POSITIVE,
                        "latency_s": {"type": "number", "minimum": 0}}}
_WORKER = {"type": "object", "additionalProperties": False,
           "properties": {"speed": _POSITIVE, "memory_bytes": _MEMORY}}

CLUSTER_SCHEMA: dict = {
    "type": "object",
    "required": ["schema", "nodes", "gpus_per_node", "intra_node"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": CLUSTER_SCHEMA_ID},
        "name": {"type": "string"},
        "nodes": {"type": "integer", "minimum": 1},
        "gpus_per_node": {"type": "integer", "minimum": 1},
        "intra_node": _LINK,
        "inter_node": _LINK,
        "worker": _WORKER,
        "workers": {"type": "array", "items": {
            "type": "object", "required": ["rank"], "additionalProperties": False,
            "properties": {"rank": {"type": "integer", "minimum": 0}, "speed": _POSITIVE,
                           "memory_bytes": _MEMORY}}},
    },
}


@dataclass(frozen=True)
class Link:
    """A link: bandwidth in bytes per second, latency in seconds."""
    bandwidth_bytes_per_s: float
    latency_s: float


@dataclass(frozen=True)
class Cluster:
    """Workers (ranks, node-major: rank r on node r // gpus_per_node), their relative speeds and
    memory (bytes, None: unknown), and the links between them (None for a flat cluster whose
    collectives come from the profile)."""
    workers: int
    gpus_per_node: int
    speeds: tuple[float, ...]
    memory_bytes: tuple[int | None, ...]
    intra_node: Link | None = None
    inter_node: Link | None = None
    source: str = "--workers"

    @property
    def nodes(self) -> int:
        """Number of nodes."""
        return -(-self.workers // self.gpus_per_node)

    def node_of(self, rank: int) -> int:
        """The node that rank `rank` sits on."""
        return rank // self.gpus_per_node


def flat_cluster(*, workers: int, speeds: Sequence[float] | None = None) -> Cluster:
    """`--workers N`: one node of N workers, network from the profile."""
    return Cluster(workers=workers, gpus_per_node=workers,
                   speeds=tuple(speeds) if speeds is not None else (1.0,) * workers,
                   memory_bytes=(None,) * workers)


def cluster_from_dict(doc: Any, *, source: str = "cluster") -> Cluster:
    """Validate a parsed cluster document and build a Cluster; InputError naming the field."""
    if isinstance(doc, dict) and doc.get("schema") not in (None, CLUSTER_SCHEMA_ID):
        raise InputError(f"{source}: field schema: expected {CLUSTER_SCHEMA_ID!r}, "
                         f"got {doc.get('schema')!r}")
    validate(doc, CLUSTER_SCHEMA, source=source)
    nodes, per_node = doc["nodes"], doc["gpus_per_node"]
    workers = nodes * per_node
    if nodes > 1 and "inter_node" not in doc:
        raise InputError(f"{source}: field inter_node: required when nodes > 1 "
                         f"(bandwidth_bytes_per_s and latency_s of the links between nodes)")
    default = doc.get("worker", {})
    speeds = [float(default.get("speed", 1.0))] * workers
    memory = [_memory(default, f"{source}: field worker/memory_bytes")] * workers
    seen: set[int] = set()
    for i, entry in enumerate(doc.get("workers", [])):
        rank = entry["rank"]
        if rank >= workers:
            raise InputError(f"{source}: field workers/{i}/rank: rank {rank} is out of range "
                             f"for {nodes} nodes x {per_node} GPUs (expected 0..{workers - 1})")
        if rank in seen:
            raise InputError(f"{source}: field workers/{i}/rank: rank {rank} appears twice")
        seen.add(rank)
        if "speed" in entry:
            speeds[rank] = float(entry["speed"])
        if "memory_bytes" in entry:
            memory[rank] = _memory(entry, f"{source}: field workers/{i}/memory_bytes")
    inter = doc.get("inter_node")
    return Cluster(workers=workers, gpus_per_node=per_node, speeds=tuple(speeds),
                   memory_bytes=tuple(memory), intra_node=Link(**doc["intra_node"]),
                   inter_node=Link(**inter) if inter else None, source=source)


def load_cluster(path: str | os.PathLike) -> Cluster:
    """Read and validate a cluster file."""
    where = f"cluster {str(path)!r}"
    return cluster_from_dict(read_json(path, what="cluster"), source=where)


def _memory(entry: dict, where: str) -> int | None:
    value = entry.get("memory_bytes")
    if value is None or isinstance(value, int):
        return value
    return parse_bytes(value, what=where)
