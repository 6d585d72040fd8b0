"""What the tests and the benchmarks share: the repository's real logs and DBC files,
mosquitto and the agent run as real processes, and what those processes leave behind read
back. The benchmarks import this package, never `tests`."""

from pathlib import Path

#: The checkout: the tests and benchmarks run its agent, and read its files.
REPO = Path(__file__).resolve().parents[1]
