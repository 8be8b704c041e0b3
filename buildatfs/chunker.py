"""Content-defined chunking with FastCDC, and the hashing of each chunk.

The parameters are fixed when a store is created (they decide which bytes
dedup against which), so they are kept in the store's ``meta`` database.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Final

import pyfastcdc

from buildatfs.codec import chunk_id_sync


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkerParams:
    min_size: int = 16 * 1024
    avg_size: int = 64 * 1024
    max_size: int = 256 * 1024

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ChunkerParams:
        return cls(**json.loads(raw))


DEFAULT_PARAMS: Final = ChunkerParams()


@dataclasses.dataclass(slots=True)
class Piece:
    """A chunk cut from a buffer: its place in the buffer, id, and data.

    ``data`` is a view into the buffer that was cut (no copy); take
    ``bytes(piece.data)`` to keep it beyond the buffer's use.
    """

    offset: int
    chunk_id: bytes | None  # None for an all-zero chunk, which is stored as a hole
    data: memoryview


class Chunker:
    def __init__(self, params: ChunkerParams) -> None:
        self.params = params
        self._cdc = pyfastcdc.FastCDC(
            params.avg_size, min_size=params.min_size, max_size=params.max_size
        )

    def cut_sync(self, buf: bytes | bytearray) -> list[Piece]:
        """Cut *buf* into chunks and hash each one; all-zero chunks get no id.

        The last piece ends where *buf* ends, which is a real boundary only if
        the buffer ends where the file region ends: callers that stream carry
        the last piece over into the next buffer.
        """
        pieces = []
        view = memoryview(buf)
        for cut in self._cdc.cut_buf(view):
            data = view[cut.offset : cut.offset + cut.length]
            chunk_id = None if _is_zero(data) else chunk_id_sync(data)
            pieces.append(Piece(cut.offset, chunk_id, data))
        return pieces


def _is_zero(data: memoryview) -> bool:
    return data[:1] == b"\0" and data == bytes(len(data))
