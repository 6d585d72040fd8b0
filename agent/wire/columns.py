"""The columns of a batch body as both ends treat them: each column is one segment of a
single uint64 array, stored plain, as zigzag deltas or as zigzag deltas of deltas."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from agent.wire import telemetry_pb2 as pb

PLAIN, DELTA, DELTA2 = pb.ENCODING_PLAIN, pb.ENCODING_DELTA, pb.ENCODING_DELTA2
_ONE = np.uint64(1)


def zigzag(delta: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    signed = delta.view(np.int64)
    return (delta << _ONE) ^ (signed >> np.int64(63)).view(np.uint64)


def unzigzag(value: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    return (value >> _ONE) ^ (np.uint64(0) - (value & _ONE))


def deltas(values: npt.NDArray[np.uint64], starts: npt.NDArray[np.intp]) -> npt.NDArray[np.uint64]:
    """Each value minus the one before it in its segment (the first minus zero), mod 2**64."""
    previous = np.empty_like(values)
    previous[0:1] = 0
    previous[1:] = values[:-1]
    previous[starts] = 0
    return values - previous


def segment_sums(
    values: npt.NDArray[np.uint64], starts: npt.NDArray[np.intp]
) -> npt.NDArray[np.uint64]:
    """The running sum of each segment (undoes `deltas`), mod 2**64."""
    total = np.cumsum(values, dtype=np.uint64)
    before = np.zeros(len(starts), np.uint64)
    nonzero = starts > 0
    before[nonzero] = total[starts[nonzero] - 1]
    lengths = np.diff(np.append(starts, len(values)))
    return total - np.repeat(before, lengths)


def segment_starts(lengths: npt.NDArray[np.intp]) -> npt.NDArray[np.intp]:
    """Where each segment of these lengths starts."""
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.intp)
