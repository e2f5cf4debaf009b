"""The profile file (schema dpkfac.profile/1) as plain frozen data."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import InputError
from .jsonio import read_json, validate
from .schemas import PROFILE_SCHEMA, PROFILE_SCHEMA_ID


@dataclass(frozen=True)
class LayerCost:
    """Measured costs of one K-FAC layer on its owner. Times in seconds, sizes in elements/bytes."""
    name: str
    kind: str
    dim_a: int
    dim_g: int
    grad_numel: int
    factor_a_s: float
    factor_g_s: float
    decompose_a_s: float
    decompose_g_s: float
    precondition_s: float
    state_bytes: int

    @property
    def factor_s(self) -> float:
        """One construction of both factors, seconds."""
        return self.factor_a_s + self.factor_g_s

    @property
    def decompose_s(self) -> float:
        """One decomposition of both factors, seconds."""
        return self.decompose_a_s + self.decompose_g_s


@dataclass(frozen=True)
class AlphaBeta:
    """Hockney cost of one collective: alpha_s + nbytes * beta_s_per_byte seconds."""
    alpha_s: float
    beta_s_per_byte: float

    def time(self, nbytes: float) -> float:
        """Seconds to move `nbytes` bytes in one call."""
        return self.alpha_s + nbytes * self.beta_s_per_byte


@dataclass(frozen=True)
class CommCosts:
    """Collective costs measured (or assumed) at `world_size` ranks."""
    backend: str
    world_size: int
    allreduce: AlphaBeta
    broadcast: AlphaBeta


@dataclass(frozen=True)
class Profile:
    """One model's measured K-FAC costs at one per-worker batch size."""
    model: str
    batch_size: int
    device: str
    dtype: str
    compute_method: str
    measured: bool
    layers: tuple[LayerCost, ...]
    forward_backward_s: float
    optimizer_s: float
    comm: CommCosts
    pack_s: float = 0.0   # local part of the gradient all-reduce (flatten, average, copy back)
    apply_s: float = 0.0  # KL clip and writing the preconditioned gradients back, every rank
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def dtype_bytes(self) -> int:
        """Bytes per element of the profiled dtype."""
        return {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}[self.dtype]

    @property
    def grad_bytes(self) -> int:
        """Bytes of all K-FAC layers' gradients (what each broadcast round moves in total)."""
        return sum(layer.grad_numel for layer in self.layers) * self.dtype_bytes

    @property
    def model_grad_bytes(self) -> int:
        """Bytes of the whole model's gradient (what the gradient all-reduce moves)."""
        return int(self.extra.get("model_grad_numel", sum(l.grad_numel for l in self.layers))) * self.dtype_bytes


_KNOWN_KEYS = {"schema", "model", "batch_size", "device", "dtype", "compute_method", "measured",
               "layers", "step", "comm"}


def profile_from_dict(doc: Any, *, source: str = "profile") -> Profile:
    """Validate a parsed profile document and build a Profile."""
    if isinstance(doc, dict) and doc.get("schema") not in (None, PROFILE_SCHEMA_ID):
        raise InputError(f"{source}: field schema: expected {PROFILE_SCHEMA_ID!r}, "
                         f"got {doc.get('schema')!r}")
    validate(doc, PROFILE_SCHEMA, source=source)
    names = [layer["name"] for layer in doc["layers"]]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"{source}: field layers: duplicate layer name {dupes[0]!r}")
    layers = tuple(LayerCost(**{k: layer[k] for k in LayerCost.__dataclass_fields__})
                   for layer in doc["layers"])
    comm = doc["comm"]
    return Profile(
        model=doc["model"], batch_size=doc["batch_size"], device=doc["device"],
        dtype=doc["dtype"], compute_method=doc["compute_method"], measured=doc["measured"],
        layers=layers, forward_backward_s=doc["step"]["forward_backward_s"],
        optimizer_s=doc["step"]["optimizer_s"],
        pack_s=doc["step"].get("pack_s", 0.0), apply_s=doc["step"].get("apply_s", 0.0),
        comm=CommCosts(backend=comm["backend"], world_size=comm["world_size"],
                       allreduce=AlphaBeta(**_alpha_beta(comm["allreduce"])),
                       broadcast=AlphaBeta(**_alpha_beta(comm["broadcast"]))),
        extra={k: v for k, v in doc.items() if k not in _KNOWN_KEYS},
    )


def _alpha_beta(d: dict) -> dict:
    return {"alpha_s": d["alpha_s"], "beta_s_per_byte": d["beta_s_per_byte"]}


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and validate a profile file."""
    return profile_from_dict(read_json(path, what="profile"), source=f"profile {str(path)!r}")


def profile_to_dict(profile: Profile) -> dict:
    """The file form of a Profile (schema dpkfac.profile/1)."""
    doc = {
        "schema": PROFILE_SCHEMA_ID,
        "model": profile.model, "batch_size": profile.batch_size, "device": profile.device,
        "dtype": profile.dtype, "compute_method": profile.compute_method,
        "measured": profile.measured,
        "layers": [asdict(layer) for layer in profile.layers],
        "step": {"forward_backward_s": profile.forward_backward_s,
                 "optimizer_s": profile.optimizer_s, "pack_s": profile.pack_s,
                 "apply_s": profile.apply_s},
        "comm": {"backend": profile.comm.backend, "world_size": profile.comm.world_size,
                 "allreduce": asdict(profile.comm.allreduce),
                 "broadcast": asdict(profile.comm.broadcast)},
    }
    doc.update(profile.extra)
    return doc
