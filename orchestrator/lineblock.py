"""Reading a block of input lines at once, when every one of them has the flow's declared layout.

``Dataflow.key_lines_by`` lets the driver route a line by its key's bytes without
parsing it. Matching each line on its own costs one call into the regex engine
per line: ~0.7 us of the ~1 us a line took the driver to match on the bench's
machine (``python -m bench.driver``), more than reading it. This module matches
a whole block of lines in one ``findall`` of the pattern anchored to line starts
and ends (``^(?:pattern)\\n`` over the block): when it finds as many keys as the
block has lines, every line matched in full, in order, one key each (a match
ends at a newline, so a match over two lines leaves fewer matches than lines).
Any other block (a bad or blank line, a CRLF line, a line over the size limit)
is read line by line as before, so the lines and their epochs, offsets, errors
and line numbers are what they would be.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import BinaryIO

# Bytes read for one block: ~2,300 of the bench's lines, about READ_CHUNK.
BLOCK_BYTES = 128 << 10
# After a block that is not all of the layout, this many chunks are read line by line
# before the next try: an input with bad lines here and there pays for few wasted blocks.
BACK_OFF_CHUNKS = 8


@dataclass(frozen=True)
class LineBlock:
    """Whole lines read at once, each of the declared layout: their text and keys."""

    lines: list[bytes]  # without their newlines
    keys: list[bytes]
    size: int  # bytes read, newlines included
    at_end: bool = False  # they are the last bytes of the file, for now


class BlockReader:
    """Reads blocks of lines that all match the flow's line pattern (else nothing)."""

    def __init__(self, pattern: re.Pattern[bytes]) -> None:
        # (a pattern is written for one line: anchored here to the block's line starts and
        # ends; its own flags are kept)
        anchored = re.compile(b"^(?:" + pattern.pattern + b")\n", pattern.flags | re.MULTILINE)
        self._findall = anchored.findall
        self._key = pattern.groupindex["key"] - 1 if pattern.groups > 1 else None
        self.skip = 0  # chunks still to read line by line before the next try

    def read(self, file: BinaryIO, offset: int, max_line_bytes: int) -> LineBlock | None:
        """The whole lines from ``offset``, if each one is of the layout and within the
        limit; the file is left after them. Else None, and the file is left at ``offset``.
        """
        if self.skip:
            self.skip -= 1
            return None
        data = file.read(BLOCK_BYTES)
        end = data.rfind(b"\n") + 1
        block = self._whole_lines(data, end, max_line_bytes)
        if block is None:
            file.seek(offset)
            if end:  # (not merely no whole line yet: the line-by-line read handles that)
                self.skip = BACK_OFF_CHUNKS
            return None
        if end < len(data):
            file.seek(offset + end)  # the start of a line not read whole
        elif len(data) < BLOCK_BYTES:  # (a short read of a file: its end)
            return replace(block, at_end=True)
        return block

    def _whole_lines(self, data: bytes, end: int, max_line_bytes: int) -> LineBlock | None:
        if not end:
            return None
        block = data[:end] if end < len(data) else data
        found = self._findall(block)
        lines = block.split(b"\n")
        lines.pop()  # (after the last newline)
        if len(found) != len(lines):
            return None
        # (a block no longer than the limit holds no line over it)
        if end > max_line_bytes and max(map(len, lines)) > max_line_bytes:
            return None
        keys = found if self._key is None else [groups[self._key] for groups in found]
        return LineBlock(lines, keys, end)
