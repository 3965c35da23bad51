"""Profile files: the six shipped profiles and their provenance, schema 2, user profiles, writing."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from cost_models import (
    SCHEMA_VERSION,
    ProfileError,
    available_profiles,
    load_profile,
    profile_to_toml,
    user_profile_dirs,
    user_profiles,
    write_profile,
)
from cost_models.profile_files import _builtin_dir
from tests._profile_fns import assert_rejected

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SHIPPED = ("h100-sxm", "h200", "a100-sxm", "a100-pcie", "l40s", "cpu-gloo")
PROVENANCE = ("datasheet", "estimate", "derived", "measured")

V2_TOML = """\
version = 2
name = "two-node"
device_type = "cuda"
source = "test fixture"

[compute]
peak_flops_per_s = { float32 = 1e13, bfloat16 = 1e14 }
compute_efficiency = 0.5
kernel_launch_seconds = 5e-6

[memory]
bytes_per_s = 1e12
capacity_nbytes = 85899345920
efficiency = 0.8

[links]
devices_per_node = 8

[links.intra_node]
latency_seconds = 3e-6
bytes_per_s = 4.5e11
call_overhead_seconds = 1e-5
algorithms = { all_reduce = "auto" }

[links.intra_node.broadcast]
bytes_per_s = 4e11

[links.inter_node]
latency_seconds = 8e-6
bytes_per_s = 5e10
call_overhead_seconds = 2e-5

[sources]
"memory.bytes_per_s" = "datasheet: made up"
"links.inter_node.bytes_per_s" = "datasheet: 400 Gb/s"
"""


def _write(tmp_path: Path, text: str, name: str = "two-node.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _numeric_paths(data: dict, prefix: tuple[str, ...] = ()) -> list[str]:
    out = []
    for key, value in data.items():
        path = (*prefix, key)
        if isinstance(value, dict):
            out += _numeric_paths(value, path)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and path != ("version",):
            out.append(".".join(path))
    return out


# ------------------------------------------------------------------------------------------
# The shipped profiles


def test_the_six_profiles_ship_in_schema_2() -> None:
    assert set(SHIPPED) <= set(available_profiles())
    for name in SHIPPED:
        data = tomllib.loads(_builtin_dir().joinpath(f"{name}.toml").read_text(encoding="utf-8"))
        assert data["version"] == SCHEMA_VERSION == 2


@pytest.mark.parametrize("name", SHIPPED)
def test_every_number_states_its_source(name: str) -> None:
    data = tomllib.loads(_builtin_dir().joinpath(f"{name}.toml").read_text(encoding="utf-8"))
    sources = load_profile(name).sources
    for path in _numeric_paths({k: v for k, v in data.items() if k != "sources"}):
        covering = [p for p in sources if path == p or path.startswith(p + ".")]
        assert covering, f"{name}: no source for {path}"
        assert sources[covering[0]].startswith(PROVENANCE), f"{name}: {path}: {sources[covering[0]]!r}"


def test_datasheet_numbers() -> None:
    h200, h100 = load_profile("h200"), load_profile("h100-sxm")
    assert h200.memory_bytes_per_s == 4.8e12 and h100.memory_bytes_per_s == 3.35e12
    assert h200.flops_per_s("bfloat16") == h100.flops_per_s("bfloat16") == 9.895e14
    a100 = load_profile("a100-sxm")
    assert a100.intra_node.bytes_per_s == 3e11  # NVLink 3: 600 GB/s bidirectional
    assert a100.inter_node.bytes_per_s == 2.5e10  # 200 Gb/s HDR per GPU
    l40s = load_profile("l40s")
    assert l40s.flops_per_s("float32") == 9.16e13 and l40s.memory_bytes_per_s == 8.64e11
    assert l40s.inter_node is None and l40s.intra_node.bytes_per_s < a100.intra_node.bytes_per_s / 10
    assert h100.devices_per_node == 8 and h100.inter_node.bytes_per_s == 5e10


@pytest.mark.parametrize("name", SHIPPED)
def test_writing_a_profile_reads_back_equal(name: str, tmp_path: Path) -> None:
    profile = load_profile(name)
    path = write_profile(profile, tmp_path / "sub" / f"{name}.toml", header="a header\nof two lines")
    assert load_profile(path) == profile
    assert path.read_text(encoding="utf-8").startswith("# a header\n# of two lines\nversion = 2\n")


# ------------------------------------------------------------------------------------------
# Schema 2


def test_version_2_fields_load(tmp_path: Path) -> None:
    profile = load_profile(_write(tmp_path, V2_TOML))
    assert profile.devices_per_node == 8
    assert profile.inter_node.bytes_per_s == 5e10
    assert profile.intra_node.algorithm("all_reduce") == "auto"
    assert profile.intra_node.alpha_beta("broadcast") == (1e-5, 3e-6, 4e11)
    assert profile.sources["links.inter_node.bytes_per_s"] == "datasheet: 400 Gb/s"
    assert load_profile(_write(tmp_path, profile_to_toml(profile), "again.toml")) == profile


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        # wrong units: a number far outside its unit's range names the unit and an example
        ("bytes_per_s = 5e10", "bytes_per_s = 50", r"field 'links\.inter_node\.bytes_per_s' must be between 1e\+06 and 1e\+14 bytes per second .*450 GB/s is 4\.5e11.*got int 50"),
        ("latency_seconds = 3e-6", "latency_seconds = 3", r"field 'links\.intra_node\.latency_seconds' must be between 0 and 0\.1 seconds .*5 us is 5e-6"),
        ("capacity_nbytes = 85899345920", "capacity_nbytes = 80", r"field 'memory\.capacity_nbytes' must be between .* bytes .*80 GiB is 85899345920"),
        ("float32 = 1e13", "float32 = 67", r"field 'compute\.peak_flops_per_s\.float32' must be between 1e\+08 and 1e\+17 FLOP/s"),
        ("bytes_per_s = 1e12", 'bytes_per_s = "1 TB/s"', r"field 'memory\.bytes_per_s' must be a number .*got str '1 TB/s'"),
        ("latency_seconds = 8e-6", "latency_us = 8", r"unknown field 'links\.inter_node\.latency_us'.*did you mean 'latency_seconds'\?"),
        # missing fields and impossible numbers
        ("call_overhead_seconds = 2e-5\n", "", r"missing required field 'links\.inter_node\.call_overhead_seconds'"),
        ("bytes_per_s = 4e11", "bytes_per_s = -4e11", r"field 'links\.intra_node\.broadcast\.bytes_per_s' must be a positive number"),
        ("devices_per_node = 8", "devices_per_node = 0", r"field 'links\.devices_per_node' must be a positive number"),
        ("[links]\ndevices_per_node = 8\n", "", r"field 'links\.inter_node' needs 'links\.devices_per_node' too"),
        ('algorithms = { all_reduce = "auto" }', 'algorithms = { all_gather = "tree" }', r"field 'links\.intra_node\.algorithms\.all_gather' must be one of \['ring', 'auto'\]"),
        ("[links.intra_node.broadcast]", "[links.intra_node.gather]", r"unknown field 'links\.intra_node\.gather'"),
        ('"memory.bytes_per_s" =', '"memory.bytes_per_sec" =', r"field 'sources' names 'memory\.bytes_per_sec', which is not a field of this profile; did you mean 'memory\.bytes_per_s'\?"),
        ("version = 2", "version = 7", r"field 'version' must be 2 .*got int 7"),
    ],
)
def test_malformed_v2_profile_names_file_and_field(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert_rejected(tmp_path, V2_TOML, old, new, message)


def test_version_1_file_cannot_use_version_2_fields(tmp_path: Path) -> None:
    path = _write(tmp_path, V2_TOML.replace("version = 2", "version = 1"))
    with pytest.raises(ProfileError, match=r"field 'links\.inter_node' needs version = 2 \(this file says version = 1\)"):
        load_profile(path)


# ------------------------------------------------------------------------------------------
# User profiles: by name from $AUTOTP_PROFILE_DIR or ~/.config/autotp/profiles


def test_user_profile_loads_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    second.mkdir()
    _write(second, V2_TOML, "two-node.toml")
    monkeypatch.setenv("AUTOTP_PROFILE_DIR", f"{first}{__import__('os').pathsep}{second}")
    assert user_profile_dirs() == [first, second]
    assert user_profiles() == ["two-node"]
    assert load_profile("two-node").name == "two-node"


def test_default_user_directory_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOTP_PROFILE_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert user_profile_dirs() == [tmp_path / "autotp" / "profiles"]
    write_profile(load_profile(_write(tmp_path, V2_TOML)), tmp_path / "autotp" / "profiles" / "mine.toml")
    assert load_profile("mine").name == "two-node"


def test_built_in_names_win_and_unknown_names_say_where_they_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOTP_PROFILE_DIR", str(tmp_path))
    _write(tmp_path, V2_TOML, "h100-sxm.toml")  # cannot shadow the built-in
    assert load_profile("h100-sxm").name == "h100-sxm"
    assert "h100-sxm" not in user_profiles()
    with pytest.raises(ProfileError, match=rf"unknown hardware profile 'nope'.*looked up in {re.escape(str(tmp_path))}.*autotp calibrate"):
        load_profile("nope")


def test_autotp_plans_with_a_user_profile_by_name_and_by_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import autotp
    from autotp.examples import build_example

    monkeypatch.setenv("AUTOTP_PROFILE_DIR", str(tmp_path))
    path = _write(tmp_path, V2_TOML)
    model, inputs = build_example("mlp", device="meta")
    by_name = autotp.plan(model, inputs, mesh_shape=(2,), hardware="two-node", training=False)
    by_path = autotp.plan(model, inputs, mesh_shape=(2,), hardware=str(path), training=False)
    assert by_name.hardware == by_path.hardware == "two-node"
    assert by_name.total_seconds == pytest.approx(by_path.total_seconds)
