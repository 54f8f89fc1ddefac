"""Device and link profiles: what one model call costs on named hardware, and what a named link carries.

Profiles are JSON files shipped under ``scheduler/cost/data/`` (``devices/NAME.json``, ``links/NAME.json``;
the file name is the profile's name), in the format of ``data/README.md``. Every figure either cites its
source or is null and listed in ``missing``; a loaded profile is a frozen dataclass whose every field was
checked (type, range, the null rule). Wherever a profile is named, a path to a JSON file works too.

    cloud = load_device("sd-v1-5@a100")          # package data
    edge = load_device("/tmp/here.json")          # a file (`latentwire profile --out` writes one)
    link = load_link("lte")
    list_profiles() -> {"devices": [...], "links": [...]}

No torch here: listing and loading profiles is what `latentwire cost --list` does.
"""
import json
import math
import os
import re
from dataclasses import dataclass, field, replace

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
KINDS = ("cloud", "edge", "any")
DTYPES = ("float32", "float16", "bfloat16", "float8", "int8", "int4")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")  # MODEL@HARDWARE, a file name too
MAX_SECONDS = 3600.0  # one model call; an hour is past any profile's figure, so a larger one is a typo
MAX_MBIT_S = 1e6  # 1 Tbit/s
MAX_RTT_MS = 10_000.0
MAX_LATENT_DIM = 1 << 16
MAX_RESOLUTION = 1 << 14
MAX_BATCH = 4096
MAX_TEXT_CHARS = 4096  # of a source, a derivation or a note

# figures that may be null (no public source: then listed in "missing"); the optional ones may be absent
DEVICE_FIGURES = ("unet_step_s", "unet_step_s_batch", "text_encode_s", "vae_decode_s", "fused_step_s", "forward_s")
DEVICE_OPTIONAL = ("unet_step_s_batch", "fused_step_s", "forward_s")
DEVICE_META = ("name", "model", "hardware", "kind", "resolution", "dtype", "latent_shape")
DEVICE_NOTES = ("sources", "derived", "missing", "notes")
LINK_FIGURES = ("up_mbit_s", "down_mbit_s", "rtt_ms")
LINK_NOTES = ("sources", "missing", "notes")
FIX = "measure it with `latentwire profile --model FOLDER --out FILE` and give that file's path"


class ProfileError(ValueError):
    """A profile file that cannot be used: the text names the file, the field and what to do."""

    def __init__(self, where, field, problem, fix=None):
        self.where, self.field = where, field
        text = f"profile {where}: field {field!r}: {problem}" if field else f"profile {where}: {problem}"
        super().__init__(text + (f"; {fix}" if fix else ""))


@dataclass(frozen=True)
class DeviceProfile:
    """One model on one piece of hardware. Times in seconds: unet_step_s is one denoising step with
    classifier-free guidance (the model on cond + uncond) for one image; unet_step_s_batch {B: seconds per
    forward of B images}; None: no figure (listed in ``missing``)."""

    name: str
    model: str
    hardware: str
    kind: str
    resolution: int
    dtype: str
    latent_shape: tuple
    unet_step_s: float = None
    text_encode_s: float = None
    vae_decode_s: float = None
    fused_step_s: float = 0.0
    unet_step_s_batch: dict = None  # {int B: float seconds}
    forward_s: float = None  # one pass of a model with no denoising loop (a lightweight SR), input resolution px
    sources: dict = field(default_factory=dict, compare=False)
    derived: dict = field(default_factory=dict, compare=False)
    missing: tuple = ()
    notes: str = ""
    path: str = field(default="", compare=False)  # the file it was loaded from

    def need(self, name):
        """The figure ``name``, or a ProfileError naming this profile, the field and the fix if it is null."""
        value = getattr(self, name)
        if value is None:
            raise ProfileError(f"{self.name!r} ({self.path or 'built in code'})", name,
                               "is null (no public figure), but this prediction needs it", FIX)
        return value


@dataclass(frozen=True)
class LinkProfile:
    """A network link: bandwidth each way in Mbit/s (10^6 bit/s), round-trip time in ms."""

    name: str
    up_mbit_s: float
    down_mbit_s: float
    rtt_ms: float
    sources: dict = field(default_factory=dict, compare=False)
    missing: tuple = ()
    notes: str = ""
    path: str = field(default="", compare=False)

    def need(self, name):
        value = getattr(self, name)
        if value is None:
            raise ProfileError(f"{self.name!r} ({self.path or 'built in code'})", name,
                               "is null (no public figure), but this prediction needs it",
                               "measure the link (bench/) and give a link file's path")
        return value


ASSUMABLE = ("unet_step_s", "text_encode_s", "vae_decode_s", "fused_step_s")


def assume(profile, figure, seconds):
    """``profile`` with ``figure`` set to ``seconds`` on the caller's word: a what-if for a figure no source
    gives (or one to vary), marked ASSUMED in its sources and dropped from ``missing``. -> DeviceProfile."""
    if not isinstance(profile, DeviceProfile):
        raise ProfileError(repr(profile), None, f"assume: expected a DeviceProfile, got {type(profile).__name__}")
    if figure not in ASSUMABLE:
        raise ProfileError(f"{profile.name!r}", figure, "cannot be assumed", f"assume one of {', '.join(ASSUMABLE)}")
    if type(seconds) not in (int, float) or not 0 <= seconds <= MAX_SECONDS:
        raise ProfileError(f"{profile.name!r}", figure, f"assumed value {seconds!r} is not a number of seconds in "
                           f"[0, {MAX_SECONDS:g}]")
    was = getattr(profile, figure)
    sources = {**profile.sources, figure: f"ASSUMED by the caller: {seconds:g} s (the profile has "
                                          f"{'no figure' if was is None else f'{was:g} s'})"}
    return replace(profile, **{figure: float(seconds)}, sources=sources,
                   missing=tuple(m for m in profile.missing if m != figure))


def apply_assumptions(items, cloud, edge):
    """``--assume SIDE.FIGURE=SECONDS`` items, each applied with ``assume`` -> (cloud, edge, {SIDE.FIGURE: s}).
    A malformed item is a ProfileError that says the form."""
    profiles, assumed = {"cloud": cloud, "edge": edge}, {}
    for item in items:
        key, _, value = str(item).partition("=")
        side, _, figure = key.partition(".")
        try:
            seconds = float(value)
        except ValueError:
            seconds = None
        if side not in profiles or figure not in ASSUMABLE or seconds is None:
            raise ProfileError(f"--assume {item!r}", None, "not SIDE.FIGURE=SECONDS",
                               f"SIDE cloud or edge, FIGURE one of {', '.join(ASSUMABLE)} "
                               "(e.g. cloud.text_encode_s=0.005)")
        profiles[side] = assume(profiles[side], figure, seconds)
        assumed[key] = seconds
    return profiles["cloud"], profiles["edge"], assumed


# -- loading --------------------------------------------------------------------------------------------

def load_device(name_or_path):
    """A DeviceProfile: a name from the package data (``list_profiles()["devices"]``) or a JSON file's path."""
    path, d = _read(name_or_path, "devices")
    return device_from_plain(d, path)


def load_link(name_or_path):
    """A LinkProfile: a name from the package data (``list_profiles()["links"]``) or a JSON file's path."""
    path, d = _read(name_or_path, "links")
    return link_from_plain(d, path)


def list_profiles():
    """{"devices": [names], "links": [names]}: the profiles shipped with the package, sorted."""
    out = {}
    for kind in ("devices", "links"):
        folder = os.path.join(DATA, kind)
        names = os.listdir(folder) if os.path.isdir(folder) else []
        out[kind] = sorted(n[:-len(".json")] for n in names if n.endswith(".json"))
    return out


def _read(name_or_path, kind):
    """(path, parsed JSON object) of a profile named or given by path."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ProfileError(repr(name_or_path), None, f"expected a profile name or a path, got "
                                                     f"{type(name_or_path).__name__}")
    text = os.fspath(name_or_path)
    looks_like_path = text.endswith(".json") or os.sep in text or (os.altsep or os.sep) in text
    if looks_like_path:
        path = text
    else:
        path = os.path.join(DATA, kind, text + ".json")
        if not os.path.isfile(path):
            known = list_profiles()[kind]
            raise ProfileError(repr(text), None, f"no {kind[:-1]} profile of that name",
                               f"give one of {', '.join(known) or '(none shipped)'} (`latentwire cost --list`), "
                               "or a path to a .json file")
    if not os.path.isfile(path):
        raise ProfileError(path, None, "no such file", "give the path of a profile .json file")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f, parse_constant=_no_constant)
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(path, None, f"cannot read it ({type(e).__name__}: {e})") from None
    except ValueError as e:
        raise ProfileError(path, None, f"not valid JSON ({e})", "fix the file's syntax") from None
    if not isinstance(d, dict):
        raise ProfileError(path, None, f"expected a JSON object, got {type(d).__name__}")
    if not looks_like_path and d.get("name") != text:
        raise ProfileError(path, "name", f"{d.get('name')!r} differs from the file's name {text!r}",
                           "name the file NAME.json after its profile")
    return path, d


def _no_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


def device_from_plain(d, where="<object>"):
    """A DeviceProfile from parsed JSON, every field checked (ProfileError names the field)."""
    c = _Checker(where, d, DEVICE_META + DEVICE_FIGURES + DEVICE_NOTES,
                 required=DEVICE_META + tuple(f for f in DEVICE_FIGURES if f not in DEVICE_OPTIONAL) + ("sources",))
    missing = c.missing(DEVICE_FIGURES)
    shape = c.value("latent_shape")
    if (type(shape) is not list or len(shape) not in (3, 4)
            or any(type(v) is not int or not 1 <= v <= MAX_LATENT_DIM for v in shape)):
        raise ProfileError(where, "latent_shape", f"expected (C, H, W) or (F, C, H, W): 3 or 4 ints in "
                                                  f"1..{MAX_LATENT_DIM}, got {shape!r}")
    figures = {f: c.seconds(f, missing, lo_open=f != "fused_step_s")  # a sampler update may be free; a model call not
               for f in DEVICE_FIGURES if f != "unet_step_s_batch"}
    if figures["fused_step_s"] is None and "fused_step_s" not in d:
        figures["fused_step_s"] = 0.0  # absent: the sampler update is taken as free (the schema's default)
    batch = c.value("unet_step_s_batch", None)
    if batch is None:
        if "unet_step_s_batch" in d and "unet_step_s_batch" not in missing:
            raise ProfileError(where, "unet_step_s_batch", "is null but not listed in \"missing\"",
                               "list it there, or give the figures")
    else:
        if type(batch) is not dict or not batch:
            raise ProfileError(where, "unet_step_s_batch", f"expected a non-empty object {{\"B\": seconds}}, got "
                                                           f"{batch!r}")
        parsed = {}
        for key, value in batch.items():
            if not re.fullmatch(r"[1-9][0-9]{0,3}", key) or int(key) > MAX_BATCH:
                raise ProfileError(where, f"unet_step_s_batch.{key}", f"the batch size must be an int in "
                                                                      f"1..{MAX_BATCH} written as a string")
            parsed[int(key)] = _seconds(where, f"unet_step_s_batch.{key}", value)
        batch = dict(sorted(parsed.items()))
        if "unet_step_s_batch" in missing:
            raise ProfileError(where, "missing", "lists unet_step_s_batch, which has figures",
                               "drop it from \"missing\"")
    c.cited(DEVICE_FIGURES, {**figures, "unet_step_s_batch": batch})
    derived = c.texts("derived", DEVICE_FIGURES)
    return DeviceProfile(
        name=c.name(), model=c.text("model", 64), hardware=c.text("hardware", 64),
        kind=c.text("kind", 8, KINDS), resolution=c.int("resolution", 1, MAX_RESOLUTION),
        dtype=c.text("dtype", 16, DTYPES), latent_shape=tuple(shape), unet_step_s_batch=batch,
        sources=c.texts("sources", DEVICE_FIGURES), derived=derived, missing=tuple(missing),
        notes=c.note(), path=str(where), **figures)


def link_from_plain(d, where="<object>"):
    """A LinkProfile from parsed JSON, every field checked (ProfileError names the field)."""
    c = _Checker(where, d, ("name",) + LINK_FIGURES + LINK_NOTES, required=("name",) + LINK_FIGURES + ("sources",))
    missing = c.missing(LINK_FIGURES)
    figures = {}
    for f, hi in (("up_mbit_s", MAX_MBIT_S), ("down_mbit_s", MAX_MBIT_S), ("rtt_ms", MAX_RTT_MS)):
        value = c.value(f)
        if value is None:
            c.null_ok(f, missing)
        elif f == "rtt_ms":
            value = c.number(f, 0.0, hi)
        else:
            value = c.number(f, 0.0, hi, lo_open=True)
        figures[f] = value
    c.cited(LINK_FIGURES, figures)
    return LinkProfile(name=c.name(), sources=c.texts("sources", LINK_FIGURES), missing=tuple(missing),
                       notes=c.note(), path=str(where), **figures)


class _Checker:
    """Checks of one profile object's fields; each failure is a ProfileError naming the file and field."""

    def __init__(self, where, d, known, required):
        self.where, self.d = where, d
        if not isinstance(d, dict):
            raise ProfileError(where, None, f"expected a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ProfileError(where, unknown[0], "is not a field of this profile format",
                               f"use only {', '.join(known)} (scheduler/cost/data/README.md)")
        absent = [k for k in required if k not in d]
        if absent:
            raise ProfileError(where, absent[0], "is required but absent",
                               "add it (null, and listed in \"missing\", if no source gives it)"
                               if absent[0] in DEVICE_FIGURES + LINK_FIGURES else "add it")

    def value(self, name, default=None):
        return self.d.get(name, default)

    def _bad(self, name, expected):
        shown = repr(self.d.get(name))[:80]
        raise ProfileError(self.where, name, f"expected {expected}, got {shown}")

    def text(self, name, max_chars, choices=None):
        v = self.d.get(name)
        if type(v) is not str or not v or len(v) > max_chars:
            self._bad(name, f"a non-empty string of at most {max_chars} characters")
        if choices is not None and v not in choices:
            self._bad(name, f"one of {', '.join(choices)}")
        return v

    def name(self):
        v = self.d.get("name")
        if type(v) is not str or not NAME_PATTERN.fullmatch(v):
            self._bad("name", "a name of 1-64 letters, digits and . _ @ + - (MODEL@HARDWARE)")
        return v

    def int(self, name, lo, hi):
        v = self.d.get(name)
        if type(v) is not int or not lo <= v <= hi:
            self._bad(name, f"an int in {lo}..{hi}")
        return v

    def number(self, name, lo, hi, lo_open=False):
        v = self.d.get(name)
        ok = type(v) in (int, float) and math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
        if not ok:
            self._bad(name, f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
        return float(v)

    def seconds(self, name, missing, lo_open=True):
        v = self.d.get(name)
        if v is None:
            if name in self.d:
                self.null_ok(name, missing)
            return None
        if name in missing:
            raise ProfileError(self.where, "missing", f"lists {name}, which has a figure", "drop it from \"missing\"")
        return self.number(name, 0.0, MAX_SECONDS, lo_open=lo_open)

    def null_ok(self, name, missing):
        if name not in missing:
            raise ProfileError(self.where, name, "is null but not listed in \"missing\"",
                               "list it there (no public figure), or give the figure")

    def missing(self, figures):
        v = self.d.get("missing", [])
        if type(v) is not list or any(type(f) is not str for f in v):
            self._bad("missing", "a list of field names")
        for f in v:
            if f not in figures:
                raise ProfileError(self.where, "missing", f"lists {f!r}, which is not a figure of this format",
                                   f"list only some of {', '.join(figures)}")
            if f in self.d and self.d[f] is not None and f != "unet_step_s_batch":
                raise ProfileError(self.where, "missing", f"lists {f}, which has a figure", "drop it from \"missing\"")
        if len(set(v)) != len(v):
            self._bad("missing", "each field listed once")
        return v

    def texts(self, name, figures):
        v = self.d.get(name, {})
        if type(v) is not dict:
            self._bad(name, "an object {field: text}")
        for k, text in v.items():
            if k not in figures:
                raise ProfileError(self.where, f"{name}.{k}", "is not a figure of this format",
                                   f"give {name} only for {', '.join(figures)}")
            if type(text) is not str or not text.strip() or len(text) > MAX_TEXT_CHARS:
                raise ProfileError(self.where, f"{name}.{k}", f"expected a non-empty string of at most "
                                                              f"{MAX_TEXT_CHARS} characters")
        return dict(v)

    def cited(self, figures, values):
        """Every figure given carries its source."""
        sources = self.texts("sources", figures)
        for f in figures:
            if values.get(f) is not None and f in self.d and f not in sources:
                raise ProfileError(self.where, f"sources.{f}", f"{f} has a figure but no source",
                                   "cite where it comes from (title, URL or table; or 'measured here by ...')")

    def note(self):
        v = self.d.get("notes", "")
        if type(v) is not str or len(v) > MAX_TEXT_CHARS:
            self._bad("notes", f"a string of at most {MAX_TEXT_CHARS} characters")
        return v


def _seconds(where, name, value):
    if type(value) not in (int, float) or not math.isfinite(value) or not 0 < value <= MAX_SECONDS:
        raise ProfileError(where, name, f"expected a finite number of seconds in (0, {MAX_SECONDS:g}], got "
                                        f"{value!r}")
    return float(value)
