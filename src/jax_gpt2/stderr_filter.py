r"""A helper process that passes bytes from its stdin to stderr as they come, except jaxlib's
coordination-service log records: they are dropped, and the fatal one becomes `line` (then the
rest, the C++ stack trace, is dropped too). absl writes each record in one write, most in one
line; a gRPC failure's record goes on over more lines ("Additional GRPC error information ...",
":UNKNOWN:Error received from peer ..."), which arrive in the same read as the record and are
dropped with it, up to the next record, progress bar (a line ending in \r) or line of ours.
Records of the preemption barrier, which the service tears down as it fails, go too.

Run as a program by its path (launch.one_line_fatal_reports): it must start in milliseconds and
outlive the process whose stderr it reads, so it imports nothing of the package (nor JAX).
Usage: python stderr_filter.py MARK LINE
"""

import os
import re
import signal
import sys


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C ends the command; this must outlive it to pass on its last words
    mark, line = sys.argv[1].encode(), sys.argv[2].encode() + b"\n"
    record = re.compile(rb"[IWEF]\d{4} ")  # absl's prefix: level, then the date
    ours = re.compile(rb"jax-gpt2 ")  # this tool's own lines
    dropped_record = re.compile(rb"coordination|preemption", re.IGNORECASE)
    line_end = re.compile(rb"[\r\n]")  # progress bars end their lines with \r
    held, last = b"", b"\n"  # last: the last byte passed on (the line starts on a fresh line)
    while chunk := os.read(0, 1 << 16):
        held += chunk
        out = []
        dropping = False  # in the lines that go on a dropped record (within this read)
        while True:
            found = line_end.search(held)
            end = found.end() if found else 0
            if not record.match(held):
                end = end or len(held)  # text (progress bars too) passes on at once
            elif not end:
                break  # part of a record: wait for its end
            piece, held = held[:end], held[end:]
            if mark in piece:
                passed = b"".join(out)
                fresh = (passed or last)[-1:] == b"\n"
                os.write(2, passed + (b"" if fresh else b"\n") + line)
                while os.read(0, 1 << 16):
                    pass
                sys.exit(0)
            if record.match(piece):
                dropping = dropped_record.search(piece) is not None
            elif dropping and (piece.endswith(b"\r") or ours.match(piece)):
                dropping = False
            if not dropping:
                out.append(piece)
            if not held:
                break
        passed = b"".join(out)
        os.write(2, passed)
        last = passed[-1:] or last
    os.write(2, held)


if __name__ == "__main__":
    main()
