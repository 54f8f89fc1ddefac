"""Named limits on what a decoder accepts, so that bad input cannot make it allocate without bound."""
from dataclasses import dataclass

WIRE_VERSION = 1
MAGIC = b"LW"
MAX_RANK = 5  # images (B,C,H,W) and video (B,C,F,H,W) latents
MAX_NAME_BYTES = 255


@dataclass(frozen=True)
class Limits:
    """What one decoder accepts. Pass your own to ``decode``/``decode_message`` to tighten or widen.

    The defaults admit every latent we know of with room to spare (a 1024x1024 SD3 latent is 262k
    elements; an SVD/CogVideoX video latent a few million) while capping a forged message's
    allocation at ``max_message_elements`` * 4 bytes (1 GiB).
    """

    max_elements: int = 1 << 27  # per tensor: 134M elements, 512 MiB as float32
    max_message_elements: int = 1 << 28  # all tensors of one message together
    max_tensors: int = 64
    max_header_bytes: int = 1 << 16  # the msgpack header frame, meta included

    def __post_init__(self):
        for name in ("max_elements", "max_message_elements", "max_tensors", "max_header_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")


DEFAULT_LIMITS = Limits()
