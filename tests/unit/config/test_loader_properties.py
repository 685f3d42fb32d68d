"""Property tests of the config parser: any override either loads with the value it names or raises ConfigError
naming the key -- never another exception, never a silently different value."""
from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from elas_megatron.config import Config, ConfigError, load_config

SECTIONS = {f.name: [g.name for g in dataclasses.fields(f.type if isinstance(f.type, type) else
                                                        type(getattr(Config(), f.name)))]
            for f in dataclasses.fields(Config)}
keys = st.sampled_from([f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks])
raw_values = st.one_of(st.integers(-5, 5000).map(str), st.floats(-1e3, 1e3, allow_nan=False).map(repr),
                       st.sampled_from(["true", "false", "null", "elas", "cola", "dense", "[a, b]", "[]", "", "x y",
                                        "1e-3", "{a: 1}", "nan", "inf"]),
                       st.text(alphabet="abc123.-_[], ", max_size=12))


@settings(max_examples=400, deadline=None)
@given(keys, raw_values)
def test_override_loads_or_names_the_key(key, raw):
    try:
        cfg = load_config(None, [f"{key}={raw}"])
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message
        assert key.split(".")[1] in message or key.split(".")[0] in message or "model." in message \
            or "train." in message or "parallel." in message, message
        return
    section, name = key.split(".")
    assert hasattr(getattr(cfg, section), name)


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=20).filter(lambda s: "=" not in s))
def test_malformed_overrides_are_config_errors(text):
    try:
        load_config(None, [text])
    except ConfigError:
        return
    raise AssertionError(f"{text!r} was accepted")
