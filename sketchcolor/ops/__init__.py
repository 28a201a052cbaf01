"""Public ops. Training code calls only these; ``impl`` picks the backend (default "auto")."""
from .scft_attention import scft_attention

__all__ = ["scft_attention"]
