"""A buffer that pickles out of band (a module of its own: workers import it by
name), for the tests of how large arguments and results travel."""

from __future__ import annotations

import pickle


class Blob:
    """A buffer that protocol 5 pickles out of band, as it does numpy arrays."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: int):  # type: ignore[no-untyped-def]
        if protocol >= 5:
            return (Blob, (pickle.PickleBuffer(self.data),))
        return (Blob, (bytes(self.data),))
