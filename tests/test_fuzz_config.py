"""Fuzzing the config loader: any file gives a valid Config or one line naming the
file (and the key), never a traceback; ``zcmd check-config`` exits 0 or 2."""
from __future__ import annotations

import math

import pytest
from hypothesis import given

from tests.strategies import fuzz_settings, yaml_texts
from tests.support import run_zcmd
from zarkov import config as C

pytestmark = pytest.mark.fuzz

SCHEMA_KEYS = sorted(C.TOP_SCHEMA) + sorted(C.SECTIONS) + [
    k for schema in C.SECTION_SCHEMAS.values() for k in sorted(schema)]


def _assert_valid(cfg: C.Config) -> None:
    """What commands rely on: every key of its schema type, finite, within range."""
    sections = [(C.TOP_SCHEMA, cfg, "")] + [
        (schema, getattr(cfg, name), f"{name}.") for name, schema in C.SECTION_SCHEMAS.items()]
    for schema, section, prefix in sections:
        for key, (types, _) in schema.items():
            value = getattr(section, key)
            types = types if isinstance(types, tuple) else (types,)
            assert isinstance(value, types), (key, value)
            assert not isinstance(value, bool) or bool in types, (key, value)
            if isinstance(value, float):
                assert math.isfinite(value), (key, value)
            if prefix + key in C.POSITIVE:
                assert value > 0, (key, value)
            if key.endswith("_port"):
                assert 0 <= value <= 65535, (key, value)


@fuzz_settings(400)
@given(yaml_texts(SCHEMA_KEYS))
def test_any_file_loads_or_fails_with_one_line_naming_it(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "zarkov.yaml"
    path.write_bytes(text)
    try:
        cfg = C.load(str(path))
    except C.ConfigError as e:
        msg = str(e)
        assert msg.startswith(f"{path}: "), msg
        assert "\n" not in msg and len(msg) < 400, msg
        return
    _assert_valid(cfg)


@fuzz_settings(6)
@given(yaml_texts(SCHEMA_KEYS))
def test_check_config_exits_0_or_2_with_one_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "zarkov.yaml"
    path.write_bytes(text)
    out = run_zcmd(str(path), "check-config", "-q", timeout=60)
    assert out.returncode in (0, 2), out.stderr
    if out.returncode == 2:
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"zcmd: {path}: "), out.stderr
    else:
        assert out.stderr == "" and out.stdout == ""
