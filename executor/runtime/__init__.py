"""The process around training and profiling: the process group and its collective helpers
(distributed), CPU speed settings (cpu_runtime), phase timers (timing), run faults (faults) and
the finiteness check (finite).

This package imports no torch itself, so `runtime.faults` stays cheap to import."""
