"""Public ops. Training code calls only these; ``impl`` picks the backend (default "auto")."""
from .correspondence_loss import correspondence_loss
from .scft_attention import scft_attention

__all__ = ["correspondence_loss", "scft_attention"]
