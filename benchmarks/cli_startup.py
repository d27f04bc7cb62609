"""Start-up time of the ``spkft`` command line: what answers at once, and what loads the model code.

Each command runs in a fresh process, a few times in turns so that the machine's load hits all
alike; the table gives the median wall time and its ratio to ``spkft train --help`` (a command
that imports torch, torchaudio and the model), measured in the same run. ``spkft client info``
asks a loopback port where nothing listens, so it measures start-up and one refused connection.

    python benchmarks/cli_startup.py [--repeats N]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time

BASELINE = ("train", "--help")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cases() -> dict[str, tuple[str, ...]]:
    return {
        "`spkft --help`": ("--help",),
        "`spkft --version`": ("--version",),
        "`spkft trian` (a usage error)": ("trian",),
        "`spkft client info` (nothing listening)": ("client", "info", "--server", f"127.0.0.1:{free_port()}"),
        "`spkft models list`": ("models", "list"),
        "`spkft train --help` (imports torch)": BASELINE,
    }


def wall_seconds(args: tuple[str, ...]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "spkft.tui.cli", *args], capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    runs = cases()
    wall_seconds(BASELINE)  # warm the file cache, so the first case pays no more than the others
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(options.repeats):
        for name, args in runs.items():
            times[name].append(wall_seconds(args))
    baseline = statistics.median(times["`spkft train --help` (imports torch)"])
    print(f"| command | median s (of {options.repeats}) | vs `spkft train --help` |")
    print("| --- | --- | --- |")
    for name, measured in times.items():
        median = statistics.median(measured)
        print(f"| {name} | {median:.2f} | {median / baseline:.2f} |")


if __name__ == "__main__":
    main()
