"""Diagnostics on the edge, the asking part: OBD-II (SAE J1979) and UDS (ISO 14229)
requests over ISO-TP to the ECUs of a bus that has a [[diagnostics]] table, their answers
turned into signals like any decoded frame (docs/diagnostics.md)."""
