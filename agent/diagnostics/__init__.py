"""Diagnostics on the edge: OBD-II (SAE J1979) and UDS (ISO 14229) requests over ISO-TP to
the ECUs of a bus that has a [[diagnostics]] table (poller.py), or, with `listen = true`,
the ECUs' answers to others' requests heard (listener.py); either way the answers are
turned into signals like any decoded frame (answers.py, docs/diagnostics.md)."""
