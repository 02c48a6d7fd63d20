"""The CLI's progress bar: ``rich`` on stderr, only when it is a terminal, and only once a run
has lasted ``delay`` seconds (short runs print nothing; piped output never has a bar).

A ``ProgressBar`` is the ``progress(done, total, label)`` callback of ``SimArgs`` (workloads call
it after each phase) and of ``tdpmmu.sweep`` (after each point). The bar is transient: it is
erased when the run ends, so stderr keeps only what the run itself printed.
"""

import contextlib
import threading
import time
from types import TracebackType
from typing import IO, Any

__all__ = ["DELAY_S", "ProgressBar", "wants_bar"]

#: Seconds a run must last before its bar appears.
DELAY_S = 2.0


def wants_bar(stream: IO[str] | Any, enabled: bool) -> bool:
    """Whether a run reporting to ``stream`` gets a progress bar at all.

    Args:
        stream: where the bar would be drawn (the CLI's ``sys.stderr``).
        enabled: the user's ``--progress`` (True) / ``--no-progress`` (False).

    Returns:
        bool: ``enabled`` and ``stream.isatty()`` (False when the stream has no ``isatty`` or
        it fails, e.g. a closed stream). Never raises.
    """
    if not enabled:
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


class ProgressBar:
    """A lazily started, transient ``rich`` progress bar fed by ``progress(done, total, label)``.

    ``with ProgressBar(sys.stderr, enabled, title) as bar: workload(..., progress=bar)``. When
    ``wants_bar(stream, enabled)`` is False it does nothing at all. Otherwise a timer thread
    draws the bar ``delay`` seconds after ``__enter__`` (an indeterminate bar until the first
    call says how many steps there are); every call updates it; ``__exit__`` erases it.

    Args:
        stream: the text stream to draw on (a terminal), e.g. ``sys.stderr``.
        enabled: False draws nothing (``--no-progress``).
        title: what runs, shown before the step's label, e.g. ``"dirty_log_perf_test"``.
        delay: seconds before the bar appears, >= 0, or None (default) for ``DELAY_S``.
    """

    def __init__(
        self, stream: IO[str] | Any, enabled: bool, title: str, delay: float | None = None
    ) -> None:
        self.stream = stream
        self.title = title
        self.delay = DELAY_S if delay is None else delay
        #: The bar is drawn at all (a terminal and not ``--no-progress``).
        self.active = wants_bar(stream, enabled)
        self._lock = threading.Lock()
        self._state: tuple[int, int | None, str] = (0, None, "")
        self._progress: Any = None
        self._task: Any = None
        self._timer: threading.Timer | None = None
        self._closed = False
        self._start = time.perf_counter()

    @property
    def shown(self) -> bool:
        """Whether the bar has been drawn (the run has lasted ``delay`` seconds)."""
        return self._progress is not None

    def __enter__(self) -> "ProgressBar":
        """Start the clock (and the timer that draws the bar after ``delay``); returns self."""
        self._start = time.perf_counter()
        if self.active:
            self._timer = threading.Timer(self.delay, self._show)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __call__(self, done: int, total: int, label: str) -> None:
        """Report that ``done`` of ``total`` steps are finished, the last one ``label``.

        Args:
            done: steps finished, >= 0.
            total: steps in all (>= ``done``; 0 when not known).
            label: what the last step was, e.g. ``"Populating memory"``.

        Returns:
            None. Never raises (a bar that cannot draw is dropped).
        """
        if not self.active:
            return
        with self._lock:
            self._state = (done, total if total > 0 else None, label)
            show = self._progress is None and time.perf_counter() - self._start >= self.delay
        if show:
            self._show()
        else:
            self._update()

    def _show(self) -> None:
        with self._lock:
            if self._progress is not None or self._closed:
                return
            try:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )

                console = Console(file=self.stream, force_terminal=True, stderr=True)
                progress = Progress(
                    TextColumn("[bold]{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    TextColumn("{task.fields[step]}"),
                    console=console,
                    transient=True,
                )
                done, total, label = self._state
                self._task = progress.add_task(self.title, total=total, completed=done, step=label)
                progress.start()
                self._progress = progress
            except Exception:
                self.active = False

    def _update(self) -> None:
        with self._lock:
            if self._progress is None:
                return
            done, total, label = self._state
            try:
                self._progress.update(self._task, completed=done, total=total, step=label)
                self._progress.refresh()
            except Exception:
                self.active = False

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Cancel the timer and erase the bar (exceptions propagate; returns None)."""
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._closed = True
            progress, self._progress = self._progress, None
        if progress is not None:
            with contextlib.suppress(Exception):  # a bar must never break a run
                progress.stop()
