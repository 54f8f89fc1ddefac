"""The one exception the protocol raises."""


class ProtocolError(ValueError):
    """A tensor or message that cannot be encoded, or frames that cannot be decoded.

    Subclasses ``ValueError`` so callers can catch it plainly. The message says what was wrong and,
    where there is one, what to do about it. Decoding never raises anything else on bad input.
    """
