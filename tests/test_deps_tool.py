"""tools/deps.py: the lock it writes, the drift table and the failures it reads (no install: the suite's venv
is what the lock describes; `make test-latest` does the real run)."""
import datetime
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import deps  # noqa: E402


def test_the_lock_round_trips_and_leaves_out_torch_and_cuda_wheels(tmp_path):
    pins = {"diffusers": "0.42.1", "peft": "0.21.2"}
    text = deps.render_lock(pins, "torch==2.13.0", datetime.date(2026, 12, 6))
    assert "2026-12-06" in text and text.splitlines()[-2:] == ["diffusers==0.42.1", "peft==0.21.2"]
    path = tmp_path / "constraints.txt"
    path.write_text(text)
    assert deps.read_lock(path) == pins
    assert not deps.lockable("torch") and not deps.lockable("nvidia-cudnn-cu12") and not deps.lockable("triton")
    assert deps.lockable("Pillow") and deps.canonical("typing_extensions") == "typing-extensions"


def test_the_committed_lock_reads_as_it_is_written():
    pins = deps.read_lock()
    assert pins["transformers"] and "torch" not in pins


def test_drift_rows_name_what_moved_appeared_and_went():
    rows = deps.drift_rows({"a": "1", "b": "1", "c": "1"}, {"a": "1", "b": "2", "d": "1"})
    assert rows == [("b", "1", "2", "moved"), ("c", "1", "-", "gone"), ("d", "-", "1", "new")]
    assert deps.markdown_table(rows).splitlines()[2] == "| b | 1 | 2 | moved |"


def test_failed_tests_are_read_from_junit(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuites><testsuite><testcase classname="tests.test_a" name="test_ok"/>'
                     '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
                     '<testcase classname="tests.test_b" name="test_err"><error message="y"/></testcase>'
                     '</testsuite></testsuites>')
    assert deps.failed_tests(junit) == ["tests.test_a::test_bad", "tests.test_b::test_err"]
    assert deps.failed_tests(tmp_path / "absent.xml") == []


def test_the_caps_are_read_from_pyproject():
    caps = deps.capped()
    assert caps["transformers"].endswith("<5.24") and "torch" not in caps and "pyyaml" not in caps
