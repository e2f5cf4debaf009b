"""JSON schemas of the project's versioned files: profile, placement and checkpoint (the cluster
file's lives in dpkfac.core.cluster). See CONTRACTS.md. The checkpoint schema names a
"tensor" type that the executor's validator adds."""
from __future__ import annotations

PROFILE_SCHEMA_ID = "dpkfac.profile/1"
PLACEMENT_SCHEMA_ID = "dpkfac.placement/1"

_SECONDS = {"type": "number", "minimum": 0}
POSITIVE_INTEGER = {"type": "integer", "minimum": 1}
NONNEGATIVE_INTEGER = {"type": "integer", "minimum": 0}
_NAME = {"type": "string", "minLength": 1}

# What a profile was measured on and a placement trains on (the data SPEC; the shape and dtype of
# one input sample; for synthetic data its class and vocabulary sizes), and the loss SPEC.
DATA_ENTRY = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": _NAME,
        "input_shape": {"type": "array", "items": POSITIVE_INTEGER},
        "input_dtype": _NAME,
        "num_classes": {"type": ["integer", "null"], "minimum": 1},
        "vocab_size": {"type": ["integer", "null"], "minimum": 1},
    },
}
LOSS_ENTRY = _NAME

_ALPHA_BETA = {
    "type": "object",
    "required": ["alpha_s", "beta_s_per_byte"],
    "properties": {"alpha_s": _SECONDS, "beta_s_per_byte": _SECONDS,
                   "seconds": {"type": "array", "minItems": 1, "items": _SECONDS},
                   # broadcast only: the root's own seconds from the last rank's post
                   "root_seconds": {"type": "array", "minItems": 1, "items": _SECONDS}},
}

PROFILE_SCHEMA: dict = {
    "type": "object",
    "required": ["schema", "model", "batch_size", "device", "dtype", "compute_method",
                 "measured", "layers", "step", "comm"],
    "properties": {
        "schema": {"const": PROFILE_SCHEMA_ID},
        "model": _NAME,
        "batch_size": POSITIVE_INTEGER,
        "device": _NAME,
        "dtype": {"enum": ["float32", "float64", "float16", "bfloat16"]},
        "compute_method": {"enum": ["eigen", "inverse"]},
        "measured": {"type": "boolean"},
        "layers": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "kind", "dim_a", "dim_g", "grad_numel", "factor_a_s",
                             "factor_g_s", "decompose_a_s", "decompose_g_s", "precondition_s",
                             "state_bytes"],
                "properties": {
                    "name": _NAME, "kind": _NAME,
                    "dim_a": POSITIVE_INTEGER, "dim_g": POSITIVE_INTEGER,
                    "grad_numel": POSITIVE_INTEGER,
                    "factor_a_s": _SECONDS, "factor_g_s": _SECONDS,
                    "decompose_a_s": _SECONDS, "decompose_g_s": _SECONDS,
                    "precondition_s": _SECONDS, "state_bytes": NONNEGATIVE_INTEGER,
                },
            },
        },
        "step": {
            "type": "object",
            "required": ["forward_backward_s", "optimizer_s"],
            "properties": {"forward_backward_s": _SECONDS, "optimizer_s": _SECONDS,
                           "pack_s": _SECONDS, "apply_s": _SECONDS,
                           # what posting the buckets from backward adds to it (optional)
                           "backward_allreduce_s": _SECONDS,
                           # the gradient all-reduce buckets in posting order (optional)
                           "gradient_buckets": {
                               "type": "array",
                               "items": {"type": "object", "required": ["bytes", "ready_s"],
                                         "additionalProperties": False,
                                         "properties": {"bytes": NONNEGATIVE_INTEGER,
                                                        "ready_s": _SECONDS}},
                           }},
        },
        "model_grad_numel": POSITIVE_INTEGER,
        "contention": {  # kernels timed on all ranks at once vs on one alone (seconds ratio)
            "type": "object",
            "required": ["ranks", "slowdown"],
            "additionalProperties": False,
            "properties": {"ranks": POSITIVE_INTEGER,
                           "slowdown": {"type": "number", "exclusiveMinimum": 0},
                           "cores": POSITIVE_INTEGER},  # of the one host all ranks share
        },
        "data": DATA_ENTRY,
        "loss": LOSS_ENTRY,
        "other_layers": {  # trainable modules K-FAC leaves alone (plain averaged gradients)
            "type": "array",
            "items": {"type": "object", "required": ["name", "kind", "numel"],
                      "properties": {"name": {"type": "string"}, "kind": _NAME,
                                     "numel": POSITIVE_INTEGER}},
        },
        "comm": {
            "type": "object",
            "required": ["backend", "world_size", "allreduce", "broadcast"],
            "properties": {
                "source": {"type": "string"},
                "backend": {"enum": ["gloo", "nccl", "mpi"]},
                "world_size": POSITIVE_INTEGER,
                "message_bytes": {"type": "array", "minItems": 1, "items": POSITIVE_INTEGER},
                "broadcast_overlap": {"type": "number", "minimum": 1},
                "link_bytes_per_s": {"type": "number", "exclusiveMinimum": 0},
                "link_burst_s": _SECONDS,
                "link_idle_s": _SECONDS,
                "gradient_allreduce_cpu_s": _SECONDS,
                "gradient_buckets_s": _SECONDS,
                "allreduce": _ALPHA_BETA,
                "broadcast": _ALPHA_BETA,
            },
        },
    },
}

PLACEMENT_SCHEMA: dict = {
    "type": "object",
    "required": ["schema", "model", "world_size", "profile", "solver", "status", "config",
                 "assignment", "predicted"],
    "properties": {
        "schema": {"const": PLACEMENT_SCHEMA_ID},
        "model": _NAME,
        "data": DATA_ENTRY,
        "loss": LOSS_ENTRY,
        "world_size": POSITIVE_INTEGER,
        "profile": {
            "type": "object",
            "required": ["path", "sha256"],
            "properties": {"path": {"type": "string"}, "sha256": {"type": "string"}},
        },
        "solver": _NAME,
        "status": {"enum": ["optimal", "feasible", "heuristic"]},
        "config": {
            "type": "object",
            "required": ["factor_update_freq", "inv_update_freq"],
            "properties": {
                "factor_update_freq": POSITIVE_INTEGER,
                "inv_update_freq": POSITIVE_INTEGER,
                "overlap": {"type": "boolean"},
                "batch_size": POSITIVE_INTEGER,
                "compute_method": {"enum": ["eigen", "inverse"]},
            },
        },
        "assignment": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": NONNEGATIVE_INTEGER,
        },
        "precondition_split": {
            "type": "object",
            "additionalProperties": {"type": "array", "minItems": 1,
                                     "items": NONNEGATIVE_INTEGER},
        },
        "predicted": {
            "type": "object",
            "required": ["step_time_s", "second_order_s", "lower_bound_s", "per_worker"],
            "properties": {
                "step_time_s": _SECONDS,
                "second_order_s": _SECONDS,
                "lower_bound_s": _SECONDS,
                "per_worker": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["rank", "compute_s", "memory_bytes"],
                        "properties": {"rank": NONNEGATIVE_INTEGER, "compute_s": _SECONDS,
                                       "memory_bytes": NONNEGATIVE_INTEGER},
                    },
                },
            },
        },
    },
}


def placement_ranks_schema(world_size: int) -> dict:
    """The schema a placement's ranks must meet once its world_size is known: every owner in
    `assignment` and every `predicted/per_worker/*/rank` lies in 0..world_size-1."""
    rank = {"type": "integer", "minimum": 0, "maximum": world_size - 1}
    return {
        "properties": {
            "assignment": {"additionalProperties": rank},
            "predicted": {"properties": {"per_worker": {"items": {"properties": {"rank": rank}}}}},
        },
    }


CHECKPOINT_FORMAT = "dpkfac.checkpoint/2"

_TENSOR_MAP = {"type": "object", "additionalProperties": {"type": "tensor"}}

CHECKPOINT_SCHEMA: dict = {
    "type": "object",
    "required": ["format", "world_size", "step", "epoch", "batch_in_epoch", "model", "optimizer",
                 "fingerprint", "ranks"],
    "properties": {
        "format": {"const": CHECKPOINT_FORMAT},
        "world_size": POSITIVE_INTEGER,
        "step": NONNEGATIVE_INTEGER, "epoch": NONNEGATIVE_INTEGER,
        "batch_in_epoch": NONNEGATIVE_INTEGER,
        "threads": POSITIVE_INTEGER,
        "model": _TENSOR_MAP,
        "optimizer": {"type": "object", "required": ["state", "param_groups"],
                      "properties": {"state": {"type": "object"},
                                     "param_groups": {"type": "array"}}},
        "fingerprint": {"type": "object"},
        "ranks": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["preconditioner", "rng"],
                "properties": {
                    "preconditioner": {
                        "type": ["null", "object"],
                        "required": ["steps", "blocks"],
                        "properties": {"steps": NONNEGATIVE_INTEGER,
                                       "blocks": {"type": "object",
                                                  "additionalProperties": _TENSOR_MAP},
                                       "numerics": {"type": "object"}},
                    },
                    "rng": {
                        "type": "object",
                        "required": ["python", "numpy", "torch"],
                        "properties": {"torch": {"type": "tensor"},
                                       "python": {"type": "array"},
                                       "numpy": {"type": "array", "minItems": 5, "maxItems": 5},
                                       "cuda": {"type": "array",
                                                "items": {"type": "tensor"}}},
                    },
                },
            },
        },
    },
}
