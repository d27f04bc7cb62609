"""README's demo, run as written: does fine-tuning the bundled base make it better on held-out speakers?

The commands are read from README.md (the fenced block between ``<!-- demo:begin -->`` and
``<!-- demo:end -->``) and run one by one with bash, in a new empty folder, exactly as a newcomer
would type them (the installed ``spkft`` on PATH). Then the report that ``spkft eval --baseline``
wrote is read back: the base model and the fine-tuned one, measured on the demo's test speakers,
which fine-tuning never saw. The table gives each command's wall time and the before/after
figures with the bootstrap interval and verdict; the run fails (exit 1) unless the EER is lower
with a verdict of ``better``.

    python benchmarks/demo.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- demo:begin -->\s*```bash\n(.*?)```\s*<!-- demo:end -->", re.S)
# Where README's eval command writes its report, relative to the folder the commands run in.
REPORT = Path("runs/demo/eval-test/metrics.json")


def demo_commands(readme: Path = ROOT / "README.md") -> list[str]:
    """README's demo commands, one per line, comments kept (bash ignores them)."""
    found = BLOCK.search(readme.read_text(encoding="utf-8"))
    if found is None:
        raise SystemExit(f"{readme}: no demo block between <!-- demo:begin --> and <!-- demo:end -->")
    return [line for line in found.group(1).splitlines() if line.strip()]


def run(commands: list[str], folder: Path) -> list[tuple[str, float]]:
    timings = []
    for command in commands:
        print(f"$ {command}", flush=True)
        start = time.perf_counter()
        done = subprocess.run(["bash", "-c", command], cwd=folder, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        seconds = time.perf_counter() - start
        tail = "\n".join(done.stdout.splitlines()[-25:])
        print(tail, flush=True)
        if done.returncode != 0:
            raise SystemExit(f"the command above failed with exit {done.returncode} after {seconds:.0f} s")
        timings.append((command.split("#")[0].strip(), seconds))
    return timings


def percent(value: float) -> str:
    return f"{100 * value:.2f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run in this (new) folder and keep it")
    args = parser.parse_args()
    if shutil.which("spkft") is None:
        raise SystemExit("spkft is not on PATH: activate the environment it is installed in")
    commands = demo_commands()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="spkft-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        timings = run(commands, folder)
        report = json.loads((folder / REPORT).read_text())
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)

    print("\n| command | wall time |\n| --- | --- |")
    for command, seconds in timings:
        print(f"| `{command}` | {seconds:.0f} s |")
    base, comparison = report["baseline"], report["comparison"]
    print(f"\nheld-out test speakers: {report['target_trials']} target and {report['nontarget_trials']} "
          "non-target trials\n")
    print("| metric | base model | fine-tuned | change [95 % interval] | verdict |\n| --- | --- | --- | --- | --- |")
    for key, label, shown in (("eer", "EER", percent), ("min_dcf", "minDCF (p_target 0.01)", "{:.3f}".format),
                              ("accuracy", "accuracy at the EER threshold", percent)):
        row = comparison[key]
        low, high = row["interval_95"]
        if shown is percent:
            change = f"{100 * row['delta']:+.2f} pp [{100 * low:+.2f}, {100 * high:+.2f}]"
        else:
            change = f"{row['delta']:+.3f} [{low:+.3f}, {high:+.3f}]"
        print(f"| {label} | {shown(base[key])} | {shown(report[key])} | {change} | {row['verdict']} |")
    improved = report["eer"] < base["eer"] and comparison["eer"]["verdict"] == "better"
    print(f"\nheld-out EER {percent(base['eer'])} -> {percent(report['eer'])}: "
          + ("better, beyond the noise" if improved else "NOT shown to be better"))
    sys.exit(0 if improved else 1)


if __name__ == "__main__":
    main()
