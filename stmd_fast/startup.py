"""What a command does before its imports: torch and the rest take seconds (more on a loaded machine), and a
Ctrl-C, SIGTERM or hang-up in them printed a traceback from deep inside torch. Imports nothing heavy.

Each command (python -m stmd_fast.X, the bench scripts of the package's code) calls stop_quietly_while_importing() first, then
imports_done() before main(), whose one_line_errors handles the signals from there on, and exits through
run_and_exit(main)."""
from __future__ import annotations

import atexit
import ctypes
import os
import signal
import sys
import threading
import types

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
AS_COMMAND = False
"""Whether this process is a command (imports_done ran in its __main__), not a Python host calling main() or the
API: a command's second stop signal quits the process at once; a host's is a KeyboardInterrupt, so a notebook
kernel outlives it."""


def stop_quietly_while_importing(said: str = "interrupted") -> None:
    """Until imports_done(): a stop signal prints `said` and exits 128 + its number (130 for Ctrl-C, 143 for
    SIGTERM, 129 for SIGHUP). A signal ignored from the start stays ignored (nohup's SIGHUP)."""
    def stop(signum, frame):
        try:  # after a hang-up the terminal may be gone
            sys.stderr.write(said + "\n")
        except OSError:
            pass
        os._exit(128 + signum)

    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, stop)


def imports_done() -> None:
    """Python's own handlers back (Ctrl-C a KeyboardInterrupt, the others the default), except where ignored."""
    global AS_COMMAND
    AS_COMMAND = True
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)


def finished_on_stop_signals() -> None:
    """In a command whose work is done and said ("done: ..."), up to its exit: a stop signal ends the process at
    once with exit 0, as run_and_exit does from main()'s return on. The rest of the way (tearing down, closing)
    saves nothing, and a signal there raised an interrupt inside whatever ran, an object's __del__ say, whose
    traceback was printed for a run that had finished. A Python host keeps its interrupt."""
    if AS_COMMAND and threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) != signal.SIG_IGN:
                signal.signal(signum, end_finished)


def end_finished(signum, frame) -> None:
    """finished_on_stop_signals' handler."""
    _flushed_exit(0)


def run_and_exit(main) -> None:
    """A command's main() and its exit. Once main() is over (returned, or exited through argparse's usage error),
    its work is done or its error said, and the interpreter's shutdown (a second or more: atexit, torch's
    cleanup) has nothing left to stop: a stop signal there killed the process silently (a job scheduler read a
    stopped job) or printed a traceback from an atexit callback. From then on a stop signal ends the process at
    once with main()'s exit status (a shutdown that hangs still ends by Ctrl-C).

    Python puts the default handlers back before it frees its modules (torch's teardown, most of that second),
    so a signal there still killed the process. So when the command is the whole process (python -m, a script),
    its shutdown is done here: what the interpreter's exit does first (wait for the threads, run the atexit
    callbacks: loggers, compile workers) with the handlers in place, then os._exit. Under a host (a profiler,
    runpy from a notebook or a script), the command exits with SystemExit, which the host may catch."""
    code = 1  # a bug's traceback: Python's exit status for it
    try:
        code = main() or 0  # None: sys.exit's 0
    except SystemExit as done:  # a bench script's argparse usage error (said already) or --help
        code = exit_code(done)
    finally:
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) != signal.SIG_IGN:
                signal.signal(signum, lambda signum, frame: _flushed_exit(code))
    if not _whole_process(sys._getframe(1)):
        sys.exit(code)
    threading._shutdown()  # as the interpreter's exit: thread pools told to stop, then their threads joined
    atexit._run_exitfuncs()
    _flushed_exit(code)


def exit_code(done: SystemExit) -> int:
    """The status a SystemExit ends the process with (a message in it is said on stderr, as the interpreter does)."""
    if isinstance(done.code, str):
        print(done.code, file=sys.stderr)
    return done.code if isinstance(done.code, int) else int(done.code is not None)


def _whole_process(command: types.FrameType) -> bool:
    """Whether the command's module frame is the process's own: nothing outside it but python -m's runpy."""
    outer = command.f_back
    while outer is not None and outer.f_globals.get("__name__") == "runpy":  # (frozen: no file name to compare)
        outer = outer.f_back
    return outer is None


def _flushed_exit(code: int) -> None:
    """Python's buffered output and C's (a native library's printf to a pipe), then the end of the process."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or gone terminal, a write this signal interrupted
            pass
    try:
        ctypes.CDLL(None).fflush(None)
    except Exception:  # noqa: BLE001 - no C library to ask (Windows)
        pass
    os._exit(code)


def second_signal_handler():
    """What the same stop signal does the second time: quit at once in a command (whatever its cleanup is doing);
    in a Python host, raise at once an Interrupted (a KeyboardInterrupt) marked at_once, which main() says."""
    return signal.SIG_DFL if AS_COMMAND else _interrupt_at_once


def _interrupt_at_once(signum, frame):
    from .cli import Interrupted

    raise Interrupted(signum, at_once=True)
