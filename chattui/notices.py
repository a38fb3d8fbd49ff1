"""Database failures in the UI as one notice, never a crashed screen.

Textual stops a widget's message loop on an unhandled exception, so a StoreError (a locked database, a
full disk) must end the handler that met it, with a notice, and never reach Textual:
`@store_errors_as_notices` on a screen's handlers and actions, `@store_errors_noticed_by(self)` on the
callbacks they pass to dialogs.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from chattui.store import StoreError


def _guard(handler: Callable, widget_of: Callable) -> Callable:
    def report(args, error: StoreError) -> None:
        widget_of(args).notify(str(error), title="Not saved", severity="error", timeout=15, markup=False)

    if inspect.iscoroutinefunction(handler):
        @functools.wraps(handler)
        async def run_async(*args, **kwargs):
            try:
                return await handler(*args, **kwargs)
            except StoreError as e:
                report(args, e)
        return run_async

    @functools.wraps(handler)
    def run(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except StoreError as e:
            report(args, e)
    return run


def store_errors_as_notices(method: Callable) -> Callable:
    """A widget's method (sync or async): a StoreError becomes a notice from the widget."""
    return _guard(method, lambda args: args[0])


def store_errors_noticed_by(widget) -> Callable[[Callable], Callable]:
    """A callback (a dialog's result handler): a StoreError becomes a notice from widget."""
    return lambda callback: _guard(callback, lambda args: widget)
