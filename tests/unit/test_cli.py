"""lab/cli.py: exit codes follow the verdicts; usage and scenario errors are ERROR
(4), never argparse's 2, which would read as HANG. No lab is started here: every
`lab run` below fails on its scenario before anything boots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lab import cli, scenario

LAB = Path(sys.executable).parent / "lab"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever happens, nothing lands in the real results/ or cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAB_CACHE", str(tmp_path / "cache"))


def _typo_file(tmp_path: Path) -> Path:
    f = tmp_path / "typo.toml"
    f.write_text((scenario.SCENARIO_DIR / "default.toml").read_text().replace("iodepth = 32", "iodeph = 32"))
    return f


def test_run_with_a_misspelt_key_shall_exit_4_naming_file_key_and_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = _typo_file(tmp_path)
    assert cli.main(["run", str(f)]) == 4
    out, err = capsys.readouterr()
    assert str(f) in err
    assert "workloads[0].iodeph" in err
    assert "did you mean 'iodepth'" in err
    assert out == ""
    assert not (tmp_path / "results").exists(), "refused before a results directory exists"


def test_run_of_an_unknown_preset_shall_exit_4_listing_the_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "no-such-preset"]) == 4
    err = capsys.readouterr().err
    assert "no-such-preset" in err and "default" in err


def test_run_of_a_missing_toml_file_shall_exit_4(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", str(tmp_path / "nope.toml")]) == 4
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["run"],
        ["frobnicate"],
        ["run", "default", "--accel", "hvf"],
        ["run", "default", "--no-such-flag"],
        ["images"],
        ["images", "destroy"],
        ["ssh"],
        ["--verbose"],
    ],
    ids=lambda a: " ".join(a) or "<none>",
)
def test_bad_usage_shall_exit_4_not_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 4
    err = capsys.readouterr().err
    assert "usage: lab" in err and "lab: error:" in err


def test_help_shall_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "run" in capsys.readouterr().out


def test_list_shall_print_every_preset_with_its_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines()]
    assert names == scenario.presets()
    assert "default" in names
    default = next(line for line in out.splitlines() if line.split()[0] == "default")
    assert scenario.load("default").description in default


@pytest.mark.parametrize("argv", [["ssh", "dom0", "--lab", "."], ["down", "."]])
def test_ssh_and_down_on_a_dir_that_is_no_kept_lab_shall_exit_4(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 4
    assert "not a kept lab" in capsys.readouterr().err


@pytest.mark.skipif(not LAB.exists(), reason="the `lab` entry point is not installed in this venv")
@pytest.mark.parametrize(
    ("args", "needle"),
    [(["run"], "usage: lab"), (["run", "typo.toml"], "workloads[0].iodeph"), (["nope"], "invalid choice")],
)
def test_the_installed_lab_command_shall_exit_4(tmp_path: Path, args: list[str], needle: str) -> None:
    _typo_file(tmp_path)
    p = subprocess.run([str(LAB), *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 4, p.stderr
    assert needle in p.stderr
