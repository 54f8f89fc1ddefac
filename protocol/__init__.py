"""The latent wire protocol: tensors and solver state as ZeroMQ frames. Byte layout: SPEC.md.

    frames = encode(latent, codec="int8", level=3)     # [header, payload]
    latent = decode(frames)

    frames = encode_handoff(Handoff(latent=x, step_index=12, timestep=521.0, seed=7))
    handoff = decode_handoff(frames)
"""
from .errors import ProtocolError
from .handoff import Handoff, decode_handoff, encode_handoff
from .header import CODECS, TensorHeader
from .limits import DEFAULT_LIMITS, WIRE_VERSION, Limits
from .wire import Message, checksum, decode, decode_message, encode, encode_message, fingerprint, wire_bytes

__all__ = [
    "CODECS", "DEFAULT_LIMITS", "Handoff", "Limits", "Message", "ProtocolError", "TensorHeader", "WIRE_VERSION",
    "checksum", "decode", "decode_handoff", "decode_message", "encode", "encode_handoff", "encode_message",
    "fingerprint", "wire_bytes",
]
