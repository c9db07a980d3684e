"""The installed set is the lock's, and a known-bad combination stops every entry point in one line, exit 2."""
import os
import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from trainers import versions

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"


def locked() -> dict[str, Requirement]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            pins[canonicalize_name(requirement.name)] = requirement
    return pins


def test_the_lock_pins_every_package_exactly_and_leaves_torch_to_the_makefile():
    pins = locked()
    assert {"diffusers", "transformers", "peft", "accelerate", "safetensors", "pip"} <= set(pins)
    assert "torch" not in pins and not any(name.startswith("nvidia-") for name in pins)
    for name, requirement in pins.items():
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"{name} is not pinned exactly: {requirement}"


@pytest.mark.skipif(os.environ.get("DIFFTUNE_UNLOCKED") == "1", reason="a drift check runs unlocked on purpose")
def test_installed_versions_equal_the_lock():
    """`make install` installs through the lock; a drifted package would change what the suite tests."""
    drifted = []
    for name, requirement in locked().items():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            drifted.append(f"{name}: locked {requirement.specifier}, not installed")
            continue
        if Version(have) not in requirement.specifier:
            drifted.append(f"{name}: locked {requirement.specifier}, installed {have}")
    assert not drifted, "reinstall with `make install` (the venv differs from constraints.txt): " + "; ".join(drifted)


def test_pyproject_admits_the_locked_versions():
    """`pip install difftune` elsewhere must be able to resolve to what we tested."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked()
    for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name in pins:
            (pin,) = pins[name].specifier
            assert requirement.specifier.contains(pin.version, prereleases=True), (line, pin.version)


FAKE_BAD = {"transformers": "5.25.0", "peft": "0.21.2"}


@pytest.fixture
def bad_versions(monkeypatch):
    real = versions.installed_version
    monkeypatch.setattr(versions, "installed_version", lambda name: FAKE_BAD.get(name) or real(name))


def assert_one_line_naming_both(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in ("transformers 5.25.0", "peft 0.21.2", "peft >= 0.22", "fix:"):
        assert word in lines[0], (word, lines[0])


def test_train_refuses_a_known_bad_combination_in_one_line(bad_versions, capsys, tmp_path):
    from launch.cli import run_cli
    from launch.train import main

    called = []
    assert run_cli(lambda: called.append(1) or main(["does-not-matter.yaml"])) == 2
    assert not called  # refused before the entry point ran
    assert_one_line_naming_both(capsys.readouterr().err)


def test_sample_and_prepare_refuse_it_too(bad_versions, capsys, tmp_path):
    from datasets_prep.__main__ import main as prep_main
    from launch.sample import main as sample_main

    assert sample_main(["--pipeline", str(tmp_path), "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "g.png")]) == 2
    assert_one_line_naming_both(capsys.readouterr().err)
    assert prep_main(["inspect", str(tmp_path)]) == 2
    assert_one_line_naming_both(capsys.readouterr().err)


@pytest.mark.parametrize("fake, bad", [
    ({"transformers": "5.23.0", "peft": "0.21.2"}, False),   # below the break
    ({"transformers": "5.24.0", "peft": "0.21.2"}, True),    # at it
    ({"transformers": "5.25.0rc1", "peft": "0.21.2"}, True),  # a pre-release of a bad version
    ({"transformers": "5.25.0", "peft": "0.22.0"}, False),   # the fix
    ({"transformers": "5.25.0", "peft": None}, False),       # no peft: nothing to break
])
def test_the_rule_matches_exactly_the_bad_range(fake, bad):
    assert bool(versions.problems(lambda name: fake.get(name))) is bad


def test_the_real_environment_passes_the_guard():
    assert versions.problems() == []
    assert re.match(r"\d+\.\d+", versions.installed_version("transformers"))
