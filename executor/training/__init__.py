"""`dpkfac train`: the configuration and its checks (config), the run fingerprint (fingerprint),
the loop and its step (loop), checkpoint files (checkpoints) and exact resume (resume), the
per-step metrics log and progress bar (metrics), and the run summary (summary)."""
from .config import TrainConfig
from .loop import run_training

__all__ = ["TrainConfig", "run_training"]
