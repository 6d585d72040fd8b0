"""`make bench`: every benchmark, printed as markdown tables for BENCHMARKS.md."""

from __future__ import annotations

import platform

import numpy as np

from agent.memory import keep_freed_memory
from bench import candump_reader, collect, command, decoder, pipeline, socketcan

keep_freed_memory()  # as the agent's own entry point does
print(f"Python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}\n")
print("## Decoder against cantools, same frames\n")
print(decoder.run(), "\n", flush=True)
print("## SocketCAN reader against python-can's message path\n")
print(socketcan.run(), "\n", flush=True)
print("## candump reader against python-can\n")
print(candump_reader.run(), "\n", flush=True)
print("## The whole decode command against a python-can + cantools loop\n")
print(command.run(), "\n", flush=True)
print("## The agent end to end\n")
print(pipeline.run(), flush=True)
print("\n## Collection rules\n")
print(collect.run(), flush=True)
