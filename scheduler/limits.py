"""Named limits on what one cloud worker accepts from its edges, so that no client can make it allocate,
queue or compute without bound. Every limit is a daemon flag (``latentwire cloud --max-...``)."""
from dataclasses import dataclass, fields

from latentwire.protocol import Limits

MAX_MESSAGE_TENSORS = 6  # the latent, an upscaler's image, a solver state of at most 4 (PLMS: ets.0..2, sample)


@dataclass(frozen=True)
class ServingLimits:
    """Defaults admit a 1024x1024 SD3 session's messages (a 262k-element latent plus solver state, well
    under 8 MiB even as fp32) and a 1000-step schedule, and keep one worker's queue short enough that the
    last request in it still starts within a few minutes of CPU model calls."""

    max_message_bytes: int = 64 << 20  # a whole request's frames; checked before anything is decoded
    max_tensor_elements: int = 1 << 24  # per tensor: 16M elements (a 4x1024x4096 video latent)
    max_sessions: int = 256  # requests queued or running on this worker, from everyone
    max_sessions_per_client: int = 16  # ... from one client (its CURVE key, else its connection)
    max_steps_per_session: int = 1000  # a plan's schedule length
    max_deadline_s: float = 3600.0  # the longest deadline a request may ask for (and the default)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"ServingLimits.{f.name} must be a positive number, got {value!r}")

    def protocol(self):
        """The wire decoder's limits for these: a message holds a latent, an upscaler's image and a solver
        state (PLMS's is the largest: three previous outputs and a sample)."""
        return Limits(max_elements=self.max_tensor_elements,
                      max_message_elements=MAX_MESSAGE_TENSORS * self.max_tensor_elements,
                      max_tensors=MAX_MESSAGE_TENSORS)


DEFAULT_SERVING_LIMITS = ServingLimits()
