"""blens_fast: the Backward Lens (Katz et al., 2024), fast."""
from .adapters import Adapter, get_adapter, register_adapter, supported_architectures

__version__ = "0.1.0"
