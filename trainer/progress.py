"""Progress of a long loop: a live bar on a terminal, plain periodic lines in a log.

tqdm redraws its bar with carriage returns; into a file or `kubectl logs` each redraw is a frame
glued to the last on one endless line. Off a terminal the loop prints a plain line every
`every_s` seconds instead (and at its last step), with the same figures."""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

PLAIN_EVERY_S = 30.0


class PlainProgress:
    """tqdm's face (iterate, `set_postfix`) writing `desc: step i/n (p%) k=v ...` lines every
    `every_s` seconds and after the last step."""

    def __init__(self, steps: range, desc: str, disable: bool = False, every_s: float = PLAIN_EVERY_S,
                 stream: TextIO | None = None):
        self.steps, self.desc, self.disable, self.every_s = steps, desc, disable, every_s
        self.stream = stream or sys.stderr
        self.step: int | None = None
        self.last_print = time.monotonic()

    def __iter__(self) -> Iterator[int]:
        for step in self.steps:
            self.step = step
            yield step

    def set_postfix(self, postfix: dict[str, str]) -> None:
        """Called after each step with its figures; prints them when a line is due."""
        now = time.monotonic()
        last = self.step is not None and self.step + 1 >= self.steps.stop
        if self.disable or not (last or now - self.last_print >= self.every_s):
            return
        self.last_print = now
        done, total = self.step + 1, self.steps.stop
        figures = " ".join(f"{k}={v}" for k, v in postfix.items())
        print(f"{self.desc}: step {done}/{total} ({100 * done // max(1, total)}%) {figures}",
              file=self.stream, flush=True)


def progress(steps: range, desc: str, disable: bool = False, stream: TextIO | None = None) -> Iterable[int]:
    """A tqdm bar over `steps` when `stream` (stderr) is a terminal, else a PlainProgress."""
    stream = stream or sys.stderr
    if stream.isatty():
        from tqdm import tqdm

        return tqdm(steps, disable=disable, desc=desc, dynamic_ncols=True, file=stream)
    return PlainProgress(steps, desc, disable=disable, stream=stream)
