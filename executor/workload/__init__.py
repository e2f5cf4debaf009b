"""What a run trains: the model (models: the zoo or a user's), its data (data, loaders), its
loss (loss), a user's `package.module:callable` (callables), the checks that they fit one
another (checks), and all of it built for a run (prepared)."""
from .checks import check_workload
from .data import DataSplit, data_entry, load_data
from .loss import DEFAULT_LOSS, cross_entropy, load_loss
from .prepared import Workload, prepare_workload

__all__ = ["DEFAULT_LOSS", "DataSplit", "check_workload", "cross_entropy", "data_entry",
           "load_data", "load_loss", "prepare_workload", "Workload"]
