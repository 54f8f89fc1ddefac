"""Field-level checks for what arrives from the network: each value's type, range and size, by name.

A message becomes a typed value only through these checks, so a field of the wrong type (a list where a
map belongs, NaN where a number belongs, a 2**64 seed) is refused with an error that names the field and
the value, before any work is done. msgpack hands back plain values: None, bool, int, float, str, bytes,
list and dict; bool is a subclass of int in Python, so every integer check excludes it explicitly.
"""
import math

INT64 = (-(1 << 63), (1 << 63) - 1)
MAX_SHOWN = 80  # characters of a bad value quoted in an error
MAX_FIELD_CHARS = 200  # of a field's name in an error: a hostile key can be 60 KB long


class FieldError(ValueError):
    """A field of a message that is missing, of the wrong type, out of range or too large.

    field: its dotted path (``session.scheduler_config.beta_start``); the text says what was expected."""

    def __init__(self, field, value, expected, code="refused"):
        field = field[:MAX_FIELD_CHARS]
        self.field, self.code = field, code
        shown = repr(value)
        if len(shown) > MAX_SHOWN:
            shown = shown[:MAX_SHOWN] + "..."
        super().__init__(f"field {field!r}: expected {expected}, got {type(value).__name__} {shown}")

    @classmethod
    def because(cls, field, reason, code="refused"):
        """A field whose value is well typed but does not make sense (the reason says why)."""
        e = cls.__new__(cls)
        field = field[:MAX_FIELD_CHARS]
        e.field, e.code = field, code
        ValueError.__init__(e, f"field {field!r}: {reason}")
        return e


def need_int(field, value, lo=INT64[0], hi=INT64[1], code="refused"):
    if type(value) is not int or not lo <= value <= hi:
        raise FieldError(field, value, f"an int in {lo}..{hi}", code)
    return value


def need_number(field, value, lo=-math.inf, hi=math.inf, code="refused"):
    """A finite int or float in [lo, hi], returned as a float."""
    if type(value) not in (int, float) or not math.isfinite(value) or not lo <= value <= hi:
        raise FieldError(field, value, f"a finite number in [{lo:g}, {hi:g}]", code)
    return float(value)


def need_bool(field, value):
    if type(value) is not bool:
        raise FieldError(field, value, "a bool (true or false)")
    return value


def need_str(field, value, max_chars, choices=None):
    if type(value) is not str or len(value) > max_chars:
        raise FieldError(field, value, f"a str of at most {max_chars} characters")
    if choices is not None and value not in choices:
        raise FieldError(field, value, f"one of {', '.join(choices)}")
    return value


def need_bytes(field, value, max_bytes):
    if type(value) is not bytes or len(value) > max_bytes:
        raise FieldError(field, value, f"bytes of at most {max_bytes}")
    return value


def need_list(field, value, max_items, lo_items=0):
    if type(value) is not list or not lo_items <= len(value) <= max_items:
        raise FieldError(field, value, f"a list of {lo_items}..{max_items} items")
    return value


def need_map(field, value, max_items, required=(), optional=()):
    """A str-keyed map of at most max_items; with ``required`` or ``optional`` given, exactly those keys
    (every required one, any optional one, nothing else: an unknown one is named)."""
    if type(value) is not dict or not all(type(k) is str for k in value):
        raise FieldError(field, value, f"a map of at most {max_items} str keys")
    if required or optional:
        missing = [k for k in required if k not in value]
        if missing:
            raise FieldError(f"{field}.{missing[0]}", None, "a value (the field is required)")
        extra = sorted(set(value) - set(required) - set(optional))
        if extra:
            raise FieldError(f"{field}.{extra[0]}", value[extra[0]],
                             f"no such field (known: {', '.join(dict.fromkeys(list(required) + list(optional)))})")
    if len(value) > max_items:
        raise FieldError(field, value, f"a map of at most {max_items} str keys")
    return value


def need_scalar(field, value, max_chars=256):
    """A plain msgpack scalar: None, bool, int64, finite float or a short str."""
    if value is None or type(value) is bool:
        return value
    if type(value) is int:
        return need_int(field, value)
    if type(value) is float:
        return need_number(field, value)
    if type(value) is str:
        return need_str(field, value, max_chars)
    raise FieldError(field, value, "None, a bool, an int, a finite float or a str")
