"""lab/scenario.py: the strict loader. Bad input shall be refused before anything
starts, naming the file, the key path and what was expected."""

from __future__ import annotations

import copy
import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from lab import scenario, values
from lab.errors import LabError, ScenarioError
from lab.scenario import DiskCfg, GuestCfg, Scenario, WorkloadCfg

MIB, GIB = 1024**2, 1024**3

# A small valid scenario; each bad case below changes one thing in it.
BASE = {
    "name": "t",
    "guests": [{"name": "lin1", "disks": [{"vdev": "xvdb", "size": "1G"}]}],
    "workloads": [{"guest": "lin1", "disk": "xvdb", "runtime": "30s"}],
}
WHERE = "/some/dir/t.toml"


def _mutated(path: tuple, value: object) -> dict:
    raw = copy.deepcopy(BASE)
    node = raw
    for k in path[:-1]:
        node = node.setdefault(k, {}) if isinstance(k, str) else node[k]
    node[path[-1]] = value
    return raw


# ------------------------------------------------------------ durations, sizes
@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("500ms", 0.5), (90, 90), (1.5, 1.5), ("1h", 3600), ("2.5s", 2.5),
     (" 10 s ", 10), ("15", 15), (0, 0)],
)
def test_parse_duration_shall_convert_to_seconds(text: object, seconds: float) -> None:
    d = values.parse_duration(text)
    assert isinstance(d, values.Duration)
    assert d == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["abc", "", "5 minutes", "-3s", -1, True, None, [30], "1d"])
def test_parse_duration_shall_reject_anything_else(text: object) -> None:
    with pytest.raises(ValueError):
        values.parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [("512M", 512 * MIB), ("4G", 4 * GIB), ("1T", 1024 * GIB), ("64K", 64 * 1024), ("512MiB", 512 * MIB),
     ("2g", 2 * GIB), (4096, 4096)],
)
def test_parse_size_shall_convert_to_bytes(text: object, size: int) -> None:
    s = values.parse_size(text)
    assert isinstance(s, values.Size)
    assert s == size


@pytest.mark.parametrize("text", ["12Q", "abc", "1.5G", "512", "", 0, -5, True, 1.5, None])
def test_parse_size_shall_reject_anything_else(text: object) -> None:
    with pytest.raises(ValueError):
        values.parse_size(text)


def test_size_mib_shall_be_whole_mebibytes() -> None:
    assert scenario.Size(512 * MIB).mib == 512
    assert scenario.Size(512 * MIB + 1).mib == 512


# ------------------------------------------------------------ presets
@pytest.mark.parametrize("name", scenario.presets())
def test_every_preset_shall_load(name: str) -> None:
    sc = scenario.load(name)
    assert isinstance(sc, Scenario)
    assert sc.name == name
    assert Path(sc.source) == scenario.SCENARIO_DIR / f"{name}.toml"
    assert sc.description, "a preset shall say what it is for (`lab list` prints it)"


def test_presets_shall_list_the_toml_files_of_the_scenario_dir() -> None:
    names = scenario.presets()
    assert "default" in names
    assert names == sorted(p.stem for p in scenario.SCENARIO_DIR.glob("*.toml"))


def test_default_preset_shall_hold_what_its_toml_says() -> None:
    """Cross-check against default.toml read with tomllib directly."""
    raw = tomllib.loads((scenario.SCENARIO_DIR / "default.toml").read_text())
    sc = scenario.load("default")
    (g,) = sc.guests
    (w,) = sc.workloads
    assert g.name == raw["guests"][0]["name"] == "lin1"
    assert g.max_ring_page_order == raw["guests"][0]["max_ring_page_order"]
    assert g.disks == (DiskCfg(vdev="xvdb", size=scenario.Size(GIB)),)
    assert (w.guest, w.disk, w.rw, w.rwmixread) == ("lin1", "xvdb", "randrw", 50)
    assert (w.iodepth, w.numjobs, w.bssplit) == (raw["workloads"][0]["iodepth"], raw["workloads"][0]["numjobs"],
                                                 raw["workloads"][0]["bssplit"])
    assert w.runtime == 30
    # the preset's point: 4x a one-page, one-queue ring (32 requests) outstanding
    assert w.iodepth * w.numjobs >= 4 * 32


def test_load_of_a_missing_preset_shall_list_the_presets() -> None:
    with pytest.raises(ScenarioError) as e:
        scenario.load("no-such-preset")
    msg = str(e.value)
    assert "no-such-preset" in msg
    for name in scenario.presets():
        assert name in msg
    assert e.value.stage == "scenario"


def test_load_of_a_missing_toml_path_shall_say_no_such_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="no such file"):
        scenario.load(tmp_path / "nope.toml")


def test_load_of_invalid_toml_shall_name_the_file(tmp_path: Path) -> None:
    f = tmp_path / "broken.toml"
    f.write_text('name = "x\n')
    with pytest.raises(ScenarioError) as e:
        scenario.load(f)
    assert str(f) in str(e.value) and "not valid TOML" in str(e.value)


def test_name_shall_default_to_the_file_stem(tmp_path: Path) -> None:
    f = tmp_path / "my-case.toml"
    f.write_text('[[guests]]\nname = "lin1"\n')
    sc = scenario.load(f)
    assert sc.name == "my-case"
    assert sc.source == str(f)
    assert sc.guests[0].disks == (DiskCfg(),)


def test_scenario_errors_shall_be_lab_errors() -> None:
    """`lab` maps every LabError to ERROR (exit 4): a scenario error must be one."""
    assert issubclass(ScenarioError, LabError)


# ------------------------------------------------------------ unknown keys
def test_misspelt_key_in_a_file_shall_name_file_key_path_and_suggestion(tmp_path: Path) -> None:
    text = (scenario.SCENARIO_DIR / "default.toml").read_text().replace("iodepth = 32", "iodeph = 32")
    assert "iodeph" in text
    f = tmp_path / "typo.toml"
    f.write_text(text)
    with pytest.raises(ScenarioError) as e:
        scenario.load(f)
    msg = str(e.value)
    assert str(f) in msg
    assert "'workloads[0].iodeph'" in msg
    assert "did you mean 'iodepth'" in msg


@pytest.mark.parametrize(
    ("path", "value", "key_path", "hint"),
    [
        (("workloads", 0, "iodeph"), 4, "workloads[0].iodeph", "iodepth"),
        (("guests", 0, "disks", 0, "vdve"), "xvdc", "guests[0].disks[0].vdve", "vdev"),
        (("watchdog", "stall_windw"), "20s", "watchdog.stall_windw", "stall_window"),
        (("lab", "acel"), "tcg", "lab.acel", "accel"),
        (("descripton",), "x", "descripton", "description"),
    ],
)
def test_unknown_keys_shall_be_rejected_with_key_path_and_hint(
    path: tuple, value: object, key_path: str, hint: str
) -> None:
    with pytest.raises(ScenarioError) as e:
        scenario.from_dict(_mutated(path, value), WHERE)
    msg = str(e.value)
    assert WHERE in msg
    assert f"'{key_path}'" in msg
    assert f"did you mean '{hint}'" in msg


def test_unknown_key_far_from_any_known_one_shall_list_the_known_keys() -> None:
    with pytest.raises(ScenarioError) as e:
        scenario.from_dict(_mutated(("watchdog", "zzzzzz"), 1), WHERE)
    msg = str(e.value)
    assert "'watchdog.zzzzzz'" in msg
    assert "did you mean" not in msg
    for k in ("interval", "stall_window", "drain_window"):
        assert k in msg


def test_source_shall_not_be_settable_from_toml() -> None:
    """`source` is internal (where the scenario came from), not a user key."""
    with pytest.raises(ScenarioError, match="'source'"):
        scenario.from_dict(BASE | {"source": "elsewhere"}, WHERE)


# ------------------------------------------------------------ bad types and values
@pytest.mark.parametrize(
    ("path", "value", "key_path"),
    [
        (("workloads", 0, "runtime"), "abc", "workloads[0].runtime"),
        (("workloads", 0, "runtime"), "0s", "workloads[0].runtime"),
        (("guests", 0, "disks", 0, "size"), "12Q", "guests[0].disks[0].size"),
        (("guests", 0, "memory"), 0, "guests[0].memory"),
        (("workloads", 0, "rwmixread"), 150, "workloads[0].rwmixread"),
        (("workloads", 0, "rwmixread"), -1, "workloads[0].rwmixread"),
        (("workloads", 0, "guest"), "nobody", "workloads[0].guest"),
        (("workloads", 0, "disk"), "xvdc", "workloads[0].disk"),
        (("workloads", 0, "iodepth"), 0, "workloads[0].iodepth"),
        (("workloads", 0, "iodepth"), "32", "workloads[0].iodepth"),
        (("workloads", 0, "iodepth"), True, "workloads[0].iodepth"),
        (("workloads", 0, "numjobs"), 0, "workloads[0].numjobs"),
        (("workloads", 0, "direct"), "yes", "workloads[0].direct"),
        (("workloads", 0, "rw"), "randomrw", "workloads[0].rw"),
        (("workloads", 0, "extra"), {"verify": [1]}, "workloads[0].extra.verify"),
        (("workloads", 0, "extra"), {"verify": True}, "workloads[0].extra.verify"),
        (("workloads", 0, "extra"), "verify=crc32c", "workloads[0].extra"),
        (("name",), "bisect", "name"),
        (("name",), "Bad Name", "name"),
        (("lab", "accel"), "hvf", "lab.accel"),
        (("lab", "cpus"), 0, "lab.cpus"),
        (("lab", "cpus"), "two", "lab.cpus"),
        (("lab",), "tcg", "lab"),
        (("dom0", "memory"), "2G", "dom0.memory"),
        (("guests",), {"name": "lin1"}, "guests"),
        (("guests", 0, "memory"), "2G", "guests"),
        (("guests", 0, "name"), "Lin1", "guests[0].name"),
        (("guests", 0, "name"), "dom0", "guests[0].name"),
        (("guests", 0, "disks", 0, "vdev"), "xvda", "guests[0].disks[0].vdev"),
        (("guests", 0, "disks"), [{"vdev": "xvdb"}, {"vdev": "xvdb"}], "guests[0].disks"),
        (("guests", 0, "max_ring_page_order"), 5, "guests[0].max_ring_page_order"),
        (("guests", 0, "max_queues"), 0, "guests[0].max_queues"),
        (("guests", 0, "vcpus"), 0, "guests[0].vcpus"),
        (("watchdog", "stall_window"), "1s", "watchdog.stall_window"),
        (("deadlines", "dom0_ssh"), "soon", "deadlines.dom0_ssh"),
    ],
)
def test_bad_values_shall_raise_with_the_key_path(path: tuple, value: object, key_path: str) -> None:
    with pytest.raises(ScenarioError) as e:
        scenario.from_dict(_mutated(path, value), WHERE)
    msg = str(e.value)
    assert WHERE in msg
    assert f"key '{key_path}'" in msg


def test_bad_duration_in_a_file_shall_name_file_key_and_expectation(tmp_path: Path) -> None:
    f = tmp_path / "dur.toml"
    f.write_text((scenario.SCENARIO_DIR / "default.toml").read_text().replace('runtime = "30s"', 'runtime = "abc"'))
    with pytest.raises(ScenarioError) as e:
        scenario.load(f)
    msg = str(e.value)
    assert str(f) in msg and "'workloads[0].runtime'" in msg and "'abc'" in msg and "duration" in msg


def test_duplicate_guest_names_shall_be_refused() -> None:
    raw = copy.deepcopy(BASE)
    raw["guests"].append(copy.deepcopy(raw["guests"][0]))
    raw["lab"] = {"memory": "4G"}
    with pytest.raises(ScenarioError) as e:
        scenario.from_dict(raw, WHERE)
    assert "key 'guests[1].name'" in str(e.value)


def test_valid_base_shall_load_with_defaults_filled_in() -> None:
    """The cases above fail because of their one change, not because BASE is bad."""
    sc = scenario.from_dict(copy.deepcopy(BASE), WHERE)
    assert sc.source == WHERE
    assert sc.guests == (GuestCfg(name="lin1", disks=(DiskCfg("xvdb", scenario.Size(GIB)),)),)
    assert sc.workloads == (WorkloadCfg(guest="lin1", disk="xvdb"),)
    assert sc.guest("lin1") is sc.guests[0]


# ------------------------------------------------------------ to_toml
def _rich() -> Scenario:
    raw = {
        "name": "rich.case_2",
        "description": 'quotes "x", a backslash \\ and a tab\there',
        "lab": {"accel": "tcg", "memory": "3G", "cpus": 4, "cpu_model": "qemu64,+svm"},
        "xen": {"cmdline": "console=com1 loglvl=all"},
        "dom0": {"memory": "768M"},
        "guests": [
            {"name": "a", "memory": "300M", "max_ring_page_order": -1, "max_queues": 4,
             "disks": [{"vdev": "xvdb", "size": "2G"}, {"vdev": "xvdc", "size": 123456789}]},
            {"name": "b", "disks": []},
        ],
        "workloads": [
            {"guest": "a", "disk": "xvdc", "rw": "randread", "rwmixread": 0, "runtime": "2s",
             "direct": False, "ioengine": "io_uring", "size": "100M", "extra": {"rate_iops": 100, "verify": "crc32c"}},
            {"guest": "a", "disk": "xvdb", "runtime": "5m"},
        ],
        "watchdog": {"interval": "0.5s", "stall_window": 20, "drain_window": "1m"},
        "deadlines": {"command": 90.5},
    }
    return scenario.from_dict(raw, WHERE)


@pytest.mark.parametrize("make", [lambda: scenario.load("default"), _rich], ids=["default", "rich"])
def test_to_toml_shall_load_back_to_an_equal_scenario(make, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sc = make()
    f = tmp_path / f"{sc.name}.toml"
    f.write_text(scenario.to_toml(sc))
    back = scenario.load(f)
    assert back == dataclasses.replace(sc, source=str(f))
    assert back.source == str(f)


def test_to_toml_shall_escape_strings_toml_cannot_hold_raw(tmp_path: Path) -> None:
    """A description written as a multi-line TOML string holds newlines; the
    resolved copy in the results directory must still be valid TOML."""
    sc = dataclasses.replace(_rich(), description='line one\nline "two"\r\n\\ end\x7f\x01')
    f = tmp_path / "esc.toml"
    f.write_text(scenario.to_toml(sc))
    back = scenario.load(f)
    assert back.description == sc.description


def test_to_toml_shall_not_write_the_internal_source() -> None:
    text = scenario.to_toml(scenario.load("default"))
    assert "source" not in tomllib.loads(text)


def test_to_dict_shall_give_plain_data() -> None:
    d = scenario.to_dict(_rich())
    assert d["guests"][0]["disks"][1] == {"vdev": "xvdc", "size": 123456789}
    assert d["workloads"][0]["extra"] == {"rate_iops": "100", "verify": "crc32c"}
    assert d["workloads"][1]["runtime"] == 300
    assert isinstance(d["guests"], list)


# ------------------------------------------------------------ to_toml: round trips
def _data(sc: Scenario) -> dict:
    d = scenario.to_dict(sc)
    d.pop("source")
    return d


@pytest.mark.parametrize("name", scenario.presets())
def test_to_toml_of_every_preset_shall_load_back_to_the_same_scenario(name: str, tmp_path: Path) -> None:
    sc = scenario.load(name)
    f = tmp_path / f"{name}.toml"
    f.write_text(scenario.to_toml(sc))
    assert scenario.load(f) == dataclasses.replace(sc, source=str(f))
    assert tomllib.loads(f.read_text()) == _data(sc)


AWKWARD_TEXT = 'a """ b \'\'\' c \\ d \\" # [x] = 1 \n\r\t \x7f \x00 \u00e9 \U0001f600 \\u0041 end\\'


def test_to_toml_shall_round_trip_awkward_values_the_loader_accepts(tmp_path: Path) -> None:
    raw = copy.deepcopy(BASE) | {
        "description": AWKWARD_TEXT,
        "xen": {"cmdline": "console=com1,vga loglvl=all/all dom0_mem=512M,max:512M x=@%~^!+"},
        "backend": {"source": "/src/my tree #1/[x]'q'\"", "patches": ["/p/a b.patch", "/p/é.patch", ""]},
        "watchdog": {"interval": 0.001, "stall_window": "604800s", "drain_window": 1e-3},
        "deadlines": {"command": 1.1, "guest_ssh": 604800},
    }
    raw["guests"][0] |= {"kernel": "/k/with space/and#hash", "cmdline": ""}
    raw["guests"][0]["disks"] = [{"vdev": "xvdz", "size": "1024T"}, {"vdev": "xvdb", "size": 1}]
    raw["workloads"][0] |= {"bssplit": "4k/50:64k/,1m/100", "size": "50%", "runtime": 604800,
                            "extra": {"rate": "1m,2m", "verify_pattern": "0xdeadbeef", "rate_iops": 7, "bs": 0.5}}
    sc = scenario.from_dict(raw, WHERE)
    f = tmp_path / "awkward.toml"
    f.write_text(scenario.to_toml(sc))
    back = scenario.load(f)
    assert back == dataclasses.replace(sc, source=str(f))
    assert back.description == AWKWARD_TEXT


@pytest.mark.parametrize("key", ["x y", "a.b", "", "\"", "k\u00e9y", "[t]", "=", "1", "a\nb", "#"])
def test_to_toml_shall_quote_keys_that_are_not_bare(key: str) -> None:
    """The loader refuses such fio options; the writer must still never emit TOML
    that does not parse, or parses to something else."""
    w = WorkloadCfg(guest="lin1", disk="xvdb", extra={key: "v\n\"", "ok": "1"})
    sc = dataclasses.replace(scenario.from_dict(copy.deepcopy(BASE), WHERE), workloads=(w,))
    assert tomllib.loads(scenario.to_toml(sc)) == _data(sc)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), float("-inf")])
def test_toml_inf_and_nan_shall_not_pass_as_durations(value: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        values.parse_duration(value)
    with pytest.raises(ScenarioError, match="finite"):
        scenario.from_dict(_mutated(("watchdog", "stall_window"), value), WHERE)


def test_a_corrupt_fault_shall_need_a_verifying_ring_workload_with_persistent_grants(tmp_path: Path) -> None:
    """dm-flakey corrupts a write in the page blkback mapped; without a persistent
    grant that page is read-only and dom0 oopses (seen on 6.1): refused at load."""
    base = ('name = "t"\n[[guests]]\nname = "lin1"\n[[guests.disks]]\nvdev = "xvdb"\n'
            '[[faults]]\nkind = "corrupt"\nguest = "lin1"\ndisk = "xvdb"\n')
    p = tmp_path / "s.toml"
    for workload in ('[[workloads]]\nguest = "lin1"\n',
                     '[[workloads]]\nguest = "lin1"\ntool = "ring"\n[workloads.ring]\nop = "write"\nverify = true\n'):
        p.write_text(base + workload)
        with pytest.raises(ScenarioError, match=re.escape("faults[0].kind")) as e:
            scenario.load(p)
        assert "persistent = true" in str(e.value) and str(p) in str(e.value)
    p.write_text(base + '[[workloads]]\nguest = "lin1"\ntool = "ring"\n[workloads.ring]\nop = "write"\n'
                 'verify = true\npersistent = true\n')
    assert scenario.load(p).faults[0].kind == "corrupt"
    preset = scenario.load("silent-corruption")
    assert preset.faults[0].kind == "corrupt" and preset.workloads[0].ring.verify
