"""jaxpeft.faults: the JAXPEFT_FAULT points do nothing unless named, parse strictly, and fire once; and the
kill-and-resume harness (benchmarks/fault_injection.py) over 5 faults: after every kill the run resumes from its
last complete checkpoint and its final adapter equals an uninterrupted run's bit for bit."""
from __future__ import annotations

import errno
import signal
import sys
from pathlib import Path

import pytest

from jaxpeft import faults

REPO = Path(__file__).resolve().parents[1]


def test_a_fault_point_does_nothing_unless_the_environment_names_it(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.fault_point("checkpoint.begin", 2)
    monkeypatch.setenv(faults.ENV, "checkpoint.begin@4:ENOSPC")
    faults.fault_point("checkpoint.begin", 2)  # another step
    faults.fault_point("checkpoint.written", 4)  # another point


def test_an_enospc_fault_raises_a_disk_full_error_once(monkeypatch):
    monkeypatch.setattr(faults, "_fired", set())
    monkeypatch.setenv(faults.ENV, "export.written:ENOSPC")
    with pytest.raises(OSError) as e:
        faults.fault_point("export.written")
    assert e.value.errno == errno.ENOSPC
    faults.fault_point("export.written")  # fired once only


def test_a_signal_fault_signals_this_process(monkeypatch):
    monkeypatch.setattr(faults, "_fired", set())
    got = []
    old = signal.signal(signal.SIGUSR1, lambda *a: None)
    signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        monkeypatch.setenv(faults.ENV, "train.step@3:SIGTERM")
        faults.fault_point("train.step", 2)
        assert got == []
        faults.fault_point("train.step", 3)
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR1, old)


@pytest.mark.parametrize("spec", ["checkpoint.begin:SIGSEGV", "nowhere:SIGKILL", "train.step@x:SIGKILL",
                                  "train.step"])
def test_a_bad_fault_spec_is_refused_with_the_grammar(spec):
    with pytest.raises(ValueError, match=r"POINT\[@STEP\]:ACTION"):
        faults.parse(spec)


@pytest.mark.slow
def test_five_kills_at_steps_and_inside_checkpoint_and_export_writes_resume_bit_identically(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import fault_injection as harness

    kills, _ = harness.run_harness(5, seed=0, root=tmp_path)
    table = harness.table(kills)
    assert {k.point for k in kills} >= {"train.step", "checkpoint.begin", "checkpoint.written", "export.written"}
    assert {k.action for k in kills} >= {"SIGKILL", "SIGTERM"}, table
    for k in kills:
        assert k.unreadable == 0 and k.final_rc == 0 and k.identical, f"{table}\n{k.note}"
        if k.action == "SIGKILL":
            assert k.killed_rc == -signal.SIGKILL, table
        elif not k.point.startswith("export"):  # a stop signal before the last step: checkpoint, exit 75
            assert k.killed_rc == 75 and k.committed and k.committed[-1] == k.resumed_from, table
