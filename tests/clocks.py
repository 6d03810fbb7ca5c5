"""A `gateway` process whose wall clock is off: libfaketime (the PyPI package ships the
library) preloaded into that process alone, its offset read from a file at most once a
second, so a test can step the clock while the process runs. The monotonic clock is left
alone, as a real step of the wall clock (NTP, `date -s`) leaves it."""

from __future__ import annotations

from pathlib import Path

import libfaketime


def faked_clock_env(offset_file: Path, offset: str = "+0") -> dict[str, str]:
    """The environment that starts a process with its wall clock `offset` off (libfaketime's
    syntax: "+800d", "-2d", "-30"); write another offset to `offset_file` to step it."""
    offset_file.write_text(offset + "\n")
    _, env = libfaketime.get_reload_information()
    # re-read the file at most once a second: libfaketime re-reads it once the second has
    # moved on by more than FAKETIME_CACHE_DURATION, so 0 is once a second (1 was every 2 s)
    env.pop("FAKETIME_NO_CACHE", None)
    return {**env, "DONT_FAKE_MONOTONIC": "1", "FAKETIME_CACHE_DURATION": "0",
            "FAKETIME_TIMESTAMP_FILE": str(offset_file)}


def step(offset_file: Path, offset: str) -> None:
    """Step the faked clock to `offset` from the real one."""
    offset_file.write_text(offset + "\n")
