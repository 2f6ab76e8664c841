"""Fuzzing (hypothesis) of what operators and other processes hand the agent: TOML configs,
marker files and restore contexts. Always a clean, keyed error; never a traceback."""

from __future__ import annotations

import contextlib
import json
import string
from pathlib import Path
from typing import Any

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamo_vllm.agent import snapshot
from dynamo_vllm.contract import config as cfg
from dynamo_vllm.contract import markers
from dynamo_vllm.contract.markers import MarkerError
from dynamo_vllm.contract.protocol import Marker

SECTION_KEYS = {name: [f.name for f in cfg.fields(cls)] for name, cls in cfg.SECTIONS.items()}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=40), st.lists(st.integers(-5, 70000), max_size=4),
                    st.lists(st.text(max_size=8), max_size=3),
                    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly real section and key names (so validation, not only the unknown-key check,
    runs), with values of any type, and now and then a stray section or key."""
    doc: dict[str, Any] = {"model": {"path": draw(st.sampled_from(["/m", "", "rel", 5]))}}
    for section in draw(st.lists(st.sampled_from(sorted(SECTION_KEYS)), max_size=6)):
        keys = draw(st.lists(st.sampled_from(SECTION_KEYS[section]), max_size=5))
        doc[section] = {key: draw(scalars) for key in keys}
    if draw(st.booleans()):
        doc["engine"] = draw(st.dictionaries(
            st.text(alphabet=string.ascii_lowercase + "_-", min_size=1, max_size=12), scalars,
            max_size=4))
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.text(min_size=1, max_size=10))] = draw(scalars)
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.sampled_from(sorted(SECTION_KEYS)))] = draw(scalars)  # not a table
    return doc


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value if v is not None]
    return value


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_any_document_loads_or_names_its_key(doc: dict[str, Any]) -> None:
    try:
        config = cfg.from_dict(doc, check_paths=False)
    except cfg.ConfigError as exc:
        assert exc.errors
        for line in exc.errors:
            assert isinstance(line, str) and ":" in line and "Traceback" not in line
        return
    assert config.workers.count >= 1 and 1 <= config.workers.base_port <= 65535


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_as_a_config_file(tmp_path_factory: Any, raw: bytes) -> None:
    path = Path(tmp_path_factory.mktemp("fuzz")) / "x.toml"
    path.write_bytes(raw)
    try:
        cfg.load(path, environ={}, check_paths=False)
    except cfg.ConfigError as exc:
        assert all(isinstance(e, str) for e in exc.errors)


@settings(max_examples=200, deadline=None)
@given(documents())
def test_toml_round_trip(tmp_path_factory: Any, doc: dict[str, Any]) -> None:
    try:
        text = tomli_w.dumps(_without_none(doc))
    except (TypeError, ValueError):
        return  # not representable in TOML (a float key order, NaN in some versions)
    path = Path(tmp_path_factory.mktemp("fuzz")) / "x.toml"
    path.write_text(text)
    try:
        cfg.load(path, environ={}, check_paths=False)
    except cfg.ConfigError as exc:
        assert all(":" in e for e in exc.errors)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.builds(lambda v: json.dumps(v).encode(),
                           st.recursive(scalars, lambda c: st.lists(c, max_size=3)
                                        | st.dictionaries(st.text(max_size=6), c, max_size=3),
                                        max_leaves=8)),
                 st.builds(lambda pid, h: json.dumps({"pid": pid, "hash": h}).encode(),
                           scalars, scalars)))
def test_markers_and_contexts_never_raise_anything_else(raw: bytes) -> None:
    for parse in (markers.parse_ready,
                  lambda b: markers.parse_restore_context(b, snapshot.ALLOWED_ENV)):
        with contextlib.suppress(MarkerError):
            parse(raw)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["file", "symlink", "fifo", "directory", "huge"]),
       content=st.binary(max_size=300), mode=st.integers(0o400, 0o777))
def test_marker_files_on_disk_are_read_or_refused(tmp_path: Path, kind: str, content: bytes,
                                                  mode: int) -> None:
    """Whatever sits at a marker's name (any bytes, any mode, a link out of the directory, a
    FIFO, a directory, a huge file): its content, or a MarkerError; never a hang, never the
    file a link points to."""
    import os
    import tempfile

    control = Path(tempfile.mkdtemp(dir=tmp_path))
    outside = control.parent / f"{control.name}.secret"
    outside.write_bytes(b"outside")
    path = control / Marker.RESTORE_CONTEXT
    if kind == "symlink":
        path.symlink_to(outside)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(content if kind == "file" else b"{" * (Marker.MAX_BYTES + 1))
        path.chmod(mode)
    try:
        raw = markers.read_marker(control, Marker.RESTORE_CONTEXT)
    except MarkerError:
        return
    assert kind == "file" and raw == content and not mode & 0o022
    with contextlib.suppress(MarkerError):
        markers.parse_restore_context(raw or b"", snapshot.ALLOWED_ENV)
