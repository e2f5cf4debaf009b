"""`dpkfac profile`: per-layer K-FAC kernel times (kernels), collective costs (collectives,
alphabeta) and the profile document that holds them (document)."""
from .document import profile_module
from .options import ProfileOptions

__all__ = ["ProfileOptions", "profile_module"]
