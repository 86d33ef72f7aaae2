"""This process's peak resident memory, for tests that bound what an upstream can make the
mirror hold (the mirror runs in the test's process)."""

from __future__ import annotations


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM, the peak resident set


def peak() -> int:
    """Bytes: the peak resident set since the last reset."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")
