"""Reading inputs in chunks of lines: files, ``.gz`` files, directories and stdin (``-``)."""

from __future__ import annotations

import gzip
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import numpy as np

from smtpguard.core.errors import InputError
from smtpguard.ingest.columns import block_lines

SNIFF_BYTES = 64 * 1024


@dataclass
class Source:
    name: str
    path: Path | None  # None for stdin
    size: int  # bytes on disk (compressed size for .gz), 0 when unknown


def expand(paths: Sequence[str]) -> list[Source]:
    """Files named, and the files under directories named (sorted), in order."""
    out: list[Source] = []
    for p in paths:
        if p == "-":
            out.append(Source("<stdin>", None, 0))
            continue
        path = Path(p)
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
            if not files:
                raise InputError(f"directory {path} holds no files")
            out.extend(Source(str(f), f, f.stat().st_size) for f in files)
        elif path.is_file():
            out.append(Source(str(path), path, path.stat().st_size))
        elif path.is_fifo() or path.is_char_device():  # named pipes, <(zcat ...), /dev/stdin
            out.append(Source(str(path), path, 0))
        else:
            raise InputError(f"input {p} not found")
    return out


def _open_binary(src: Source) -> IO[bytes]:
    if src.path is None:
        return sys.stdin.buffer
    fh = open(src.path, "rb")
    # peek, not read and seek back: pipes cannot seek
    if fh.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=fh)  # type: ignore[return-value]
    return fh


class Opened:
    """An opened input: its first bytes for format detection, then its lines in chunks."""

    def __init__(self, src: Source):
        self.src = src
        self._raw = _open_binary(src)
        self._fh = io.BufferedReader(self._raw, buffer_size=1 << 20) if not isinstance(self._raw, io.BufferedReader) else self._raw
        try:
            self.head: bytes = self._fh.peek(SNIFF_BYTES)[:SNIFF_BYTES]
        except (OSError, EOFError) as e:
            raise InputError(f"cannot read {src.name}: {e}") from None

    @property
    def binary(self) -> IO[bytes]:
        """The input as a (decompressed) binary stream, for stream formats."""
        return self._fh

    def position(self) -> int:
        """Bytes consumed from disk so far (compressed bytes for .gz), for progress bars."""
        try:
            if isinstance(self._raw, gzip.GzipFile):
                return self._raw.fileobj.tell()  # type: ignore[union-attr]
            return self._raw.tell()
        except (OSError, ValueError, AttributeError):
            return 0

    def chunks(self, chunk_lines: int) -> Iterator[tuple[list[str], int]]:
        """Yield (lines, number of the first line); lines keep no newline. The chunks of :meth:`blocks`,
        decoded (undecodable bytes become U+FFFD)."""
        for data, line_no, crlf in self.blocks(chunk_lines):
            yield block_lines(data, crlf), line_no

    def blocks(self, chunk_lines: int) -> Iterator[tuple[memoryview, int, bool]]:
        """Chunks of at most ``chunk_lines`` lines, undecoded: yield (bytes of the chunk's lines
        joined by ``\n``, number of the first line, whether its lines end in a CR to strip: the
        first bytes read with them hold one)."""
        line_no = 1
        pending = b""
        block = max(1 << 20, chunk_lines * 100)
        try:
            while True:
                data = self._fh.read(block)
                if not data:
                    break
                data = pending + data
                cut = data.rfind(b"\n")
                if cut < 0:
                    pending = data
                    continue
                pending = data[cut + 1:]
                crlf = b"\r" in data[:200]
                body = memoryview(data)[:cut]
                nl = np.flatnonzero(np.frombuffer(body, dtype=np.uint8) == 10)
                nlines = nl.size + 1
                for i in range(0, nlines, chunk_lines):
                    j = min(i + chunk_lines, nlines)
                    a = 0 if i == 0 else int(nl[i - 1]) + 1
                    b = cut if j == nlines else int(nl[j - 1])
                    yield body[a:b], line_no, crlf
                    line_no += j - i
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise InputError(f"reading {self.src.name} failed at line {line_no}: {e}") from None
        if pending:
            yield memoryview(pending), line_no, True

    def close(self) -> None:
        if self.src.path is not None:
            self._fh.close()


def read_batches(paths: Sequence[str], fmt: str, smtp_ports: Sequence[int] | None, chunk_lines: int,
                 progress: "Progress | None" = None) -> Iterator[tuple[Source, "Batch"]]:
    """Parse every input with its format (``auto`` sniffs each file) and yield batches in input order."""
    from . import registry

    sources = expand(paths)
    if progress is not None:
        progress.set_total(sum(s.size for s in sources))
    done_bytes = 0
    # one parser per stream format for the whole call: NetFlow templates from one file decode the next
    stream_parsers: dict[str, Any] = {}
    for src in sources:
        opened = Opened(src)
        try:
            f = registry.detect(opened.head, src.name) if fmt == "auto" else registry.get(fmt)
            if f.kind == "stream":
                parser = stream_parsers.get(f.name) or stream_parsers.setdefault(f.name, f.make_parser(src.name, smtp_ports))
                batches: Iterator[Batch] = parser.parse_stream(opened.binary, src.name)
            else:
                parser = f.make_parser(src.name, smtp_ports)
                if hasattr(parser, "parse_block"):  # reads undecoded blocks (see AwsVpcParser.parse_block)
                    batches = (parser.parse_block(data, first, crlf) for data, first, crlf in opened.blocks(chunk_lines))
                else:
                    batches = (parser.parse_lines(lines, first) for lines, first in opened.chunks(chunk_lines))
            for batch in batches:
                if progress is not None:
                    progress.update(done_bytes + opened.position(), batch)
                yield src, batch
            done_bytes += src.size
        finally:
            opened.close()
    for parser in stream_parsers.values():
        close = getattr(parser, "close", None)
        if close is not None:
            # data still waiting for a template becomes counted template misses (dead letters)
            yield sources[-1], close()


class Progress:
    """A progress bar on stderr when it is a terminal (bytes read, records per second); silent when piped."""

    def __init__(self, desc: str, enabled: bool | None = None):
        from tqdm import tqdm

        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.bar = tqdm(total=0, unit="B", unit_scale=True, desc=desc, disable=not self.enabled, file=sys.stderr,
                        dynamic_ncols=True, smoothing=0.1)
        self.kept = 0
        self.read = 0

    def set_total(self, total: int) -> None:
        self.bar.total = total or None
        self.bar.refresh()

    def update(self, position: int, batch: "Batch") -> None:
        self.kept += batch.records.num_rows
        self.read += batch.read
        if self.enabled:
            self.bar.update(max(0, position - self.bar.n))
            self.bar.set_postfix(lines=f"{self.read:,}", smtp=f"{self.kept:,}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def step_bar(desc: str, total: int | None, unit: str, enabled: bool | None = None):
    """A tqdm bar for jobs counted in steps (scenarios, model stages): rate and ETA on a terminal,
    silent when stderr is piped. Use as a context manager; ``update(n)`` per finished step."""
    from tqdm import tqdm

    on = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(total=total, unit=unit, desc=desc, disable=not on, file=sys.stderr, dynamic_ncols=True)


from .base import Batch  # noqa: E402  (type used above only in annotations)
