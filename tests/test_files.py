"""mae.files: cleanup_on_termination (what it does to a real process is tested with the predecode
command in test_predecoded.py)."""

import signal

import pytest

from mae.files import cleanup_on_termination


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
def test_termination_handlers_are_restored_and_an_ignored_signal_stays_ignored():
    term_before = signal.getsignal(signal.SIGTERM)
    hup_before = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with cleanup_on_termination():
            assert signal.getsignal(signal.SIGTERM) is not term_before
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            with pytest.raises(SystemExit) as stopped:
                signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
            assert stopped.value.code == 128 + signal.SIGTERM  # as a shell reports a process killed by it
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # a second one cannot cut the cleanup short
        assert signal.getsignal(signal.SIGTERM) is term_before
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, hup_before)
