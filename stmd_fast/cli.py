"""What the command lines of the package share: flags made from a config dataclass (its fields and the
docstrings under them, so each option is described once), and bad input ending in one line on stderr
with exit code 2."""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import re
import shlex
import signal
import sys
import textwrap
import threading
import time
import warnings
from typing import Callable

from .startup import end_finished, exit_code, second_signal_handler


class UserError(Exception):
    """Bad input found by the trainer: printed as one line, before any expensive work."""


# Every command: Inductor (train --compile, export --aoti, sample --exported X.aoti.pt2) on a machine without a
# GPU loads torch's C++ extension helper, which warns "No CUDA runtime is found, using CUDA_HOME=..." with the
# CUDA build of torch that users install: nothing is wrong on a CPU, so it is not shown.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def clipped(text: str, limit: int) -> str:
    """text cut to `limit` characters for a one-line message."""
    return text if len(text) <= limit else text[:limit - 4] + " ..."


def provenance(module: str, argv: list[str], device=None) -> dict:
    """How a result was made: the command, the versions, the device and when (the settings are beside it)."""
    from datetime import datetime, timezone

    import torch

    from . import __version__

    made = {"command": shlex.join(["python", "-m", f"stmd_fast.{module}", *argv]), "stmd_fast": __version__,
            "torch": torch.__version__, "utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if device is not None:
        made["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    return made


def stop_signals() -> tuple[int, ...]:
    """The signals that stop a run: Ctrl-C, SIGTERM (schedulers, kill) and SIGHUP (the terminal closed),
    less any the process was started to ignore: nohup's SIGHUP, and the SIGINT that a shell script's
    `command &` ignores so that a Ctrl-C meant for the script leaves the background job running."""
    return tuple(sig for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                 if signal.getsignal(sig) != signal.SIG_IGN)


def quiet_if_hung_up(signum: int) -> None:
    """After SIGHUP the terminal is gone and writing to it fails (EIO): send what is still said to /dev/null."""
    if signum != signal.SIGHUP:
        return
    for fd in (1, 2):
        if os.isatty(fd):
            to_devnull(fd)


def to_devnull(fd: int) -> None:
    """What is written to `fd` from now on goes to /dev/null (its reader is gone)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class Interrupted(KeyboardInterrupt):
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP) as a KeyboardInterrupt that knows its signal: where no loop of
    a command handles it itself (the trainer's start-up, first compile and wind-down; a whole evaluation)."""

    def __init__(self, signum: int = signal.SIGINT, at_once: bool = False):
        super().__init__(signum)
        self.signum = signum
        self.at_once = at_once
        """The same signal a second time, in a Python host: the stop under way was cut short (a command quits)."""


def interrupt_now(signum, frame):
    quiet_if_hung_up(signum)
    signal.signal(signum, second_signal_handler())  # the same signal again quits a command at once, also in the
    raise Interrupted(signum)                        # cleanup it starts (a Python host gets a KeyboardInterrupt)


@contextlib.contextmanager
def interrupt_on_stop_signals():
    """Within: a stop signal raises Interrupted (a KeyboardInterrupt carrying its signal number), so a command
    cleans up and exits 128 + signum. On the way out the caller's handlers come back (a finished command's
    aside). Off the main thread (a host's worker thread), where Python takes no handler, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, interrupt_now) for sig in stop_signals()}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            # a finished command's handler stays (startup.finished_on_stop_signals): through the unwinding after
            # it, where torch frees the run's tensors, up to run_and_exit's
            if signal.getsignal(sig) is not end_finished:
                signal.signal(sig, handler)


def restarts_repeat_it(ctx) -> str:
    """For a mistake in the input under torchrun --max-restarts N: torchrun restarts the workers after any failure,
    so each attempt left meets it again. Said, so that the repeats read as expected, with how to end them."""
    again = ctx.max_restarts - ctx.restart_count
    return (f" (torchrun restarts the workers after any failure: its {again} restart(s) left will say the same; "
            f"stop it with Ctrl-C)") if again > 0 else ""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line (an unknown flag, an invalid choice, a missing argument) ends in
    one line naming the problem and where the flags are described, not the whole usage block first.
    Subcommands' parsers are of the same class (add_subparsers takes the parent's).

    prog is required: argparse's default, the script's file name ("encode.py"), is not a command a user of
    `python -m` can run."""

    def __init__(self, *args, prog: str, **kwargs):
        # no prefixes: argparse's default takes --compile for --compile-only, silently
        super().__init__(*args, prog=prog, allow_abbrev=kwargs.pop("allow_abbrev", False), **kwargs)
        # a negative number in scientific notation (--lr -1e-3) is a value, as -0.001 is: argparse's own
        # pattern knows only digits and a point, and took it for a flag ("expected one argument")
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str):
        from .distributed import from_env  # under torchrun every rank parses the same command line: rank 0
        ctx = from_env()                    # says what is wrong, once
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help){restarts_repeat_it(ctx)}\n"
                  if ctx.is_main else None)

    def parse_known_args(self, args=None, namespace=None):
        """argparse's, then what every command shares: a leading ~ is the home folder (the shell leaves it as
        typed in --out=~/runs or in quotes, and a folder named ~ was made); an empty value (--out "" would mean
        the current folder) and a --seed torch cannot take are refused before any work."""
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            if action.dest == argparse.SUPPRESS or not hasattr(namespace, action.dest):
                continue
            value = home_expanded(getattr(namespace, action.dest))
            setattr(namespace, action.dest, value)
            name = max(action.option_strings, key=len) if action.option_strings else action.metavar or action.dest
            if value == "" or (isinstance(value, (list, tuple)) and "" in value):
                self.error(f"{name} is empty: give a value (or leave the flag out for its default)")
            if action.dest == "seed" and isinstance(value, int) and not 0 <= value < 2**63:
                self.error(f"{name} {value}: a seed is an integer in [0, 2^63)")
        return namespace, extras


def home_expanded(value):
    """A command-line value with a leading ~ (or ~user) expanded, in a list or tuple too; others unchanged."""
    if isinstance(value, str) and value.startswith("~"):
        return os.path.expanduser(value)
    if isinstance(value, (list, tuple)):
        return type(value)(home_expanded(item) for item in value)
    return value


def _ours(filename: str) -> bool:
    """Whether a warning was raised from stmd_fast's code (its data and kernels packages included)."""
    roots = [os.path.dirname(module.__file__) for name in ("stmd_fast", "stmd_fast.data", "stmd_fast.kernels")
             if (module := sys.modules.get(name)) is not None and getattr(module, "__file__", None)]
    return any(os.path.abspath(filename).startswith(root + os.sep) for root in roots)


@contextlib.contextmanager
def warnings_as_lines():
    """Within: a UserWarning of stmd_fast's (a damaged sample skipped, a checkpoint passed over) prints as one
    `warning: ...` line, like the commands' notes, not as Python's `FILE:LINE: UserWarning: ...` and the
    source line, which read like a crash. Others (torch's, diffusers') keep Python's format."""
    python_format = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None):
        if issubclass(category, UserWarning) and _ours(filename):
            return f"warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = python_format


@contextlib.contextmanager
def printable_output():
    """Within: a command's stdout and stderr write what they cannot encode as \\xNN escapes: a path whose name is
    not UTF-8 (os.walk and argv hold its bytes as surrogates) printed by a command must not stop it with a
    UnicodeEncodeError (stdout is strict under a UTF-8 locale). And a reader that went away (| head) does not
    stop it either: the rest of its output goes nowhere, and the work goes on. On the way out a Python caller
    gets its own streams back, as they were set."""
    streams = {name: getattr(sys, name) for name in ("stdout", "stderr")}
    errors = {name: getattr(stream, "errors", None) for name, stream in streams.items()}
    for name, stream in streams.items():
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
        if stream is not None and not isinstance(stream, ReaderMayLeave):
            setattr(sys, name, ReaderMayLeave(stream))
    try:
        yield
    finally:
        for name, stream in streams.items():
            if isinstance(getattr(sys, name), ReaderMayLeave) and not isinstance(stream, ReaderMayLeave):
                setattr(sys, name, stream)  # ours, still in place
            if hasattr(stream, "reconfigure") and errors[name] is not None:
                try:
                    stream.reconfigure(errors=errors[name])
                except (ValueError, OSError):  # closed meanwhile
                    pass


class ReaderMayLeave:
    """A text stream whose writes, once its pipe's reader has closed it (BrokenPipeError), go to /dev/null:
    `encode ... | head -1` stopped the encoding with a traceback at its second line."""

    def __init__(self, stream):
        self.wrapped = stream

    def __getattr__(self, name):  # the rest is the stream's (fileno, isatty, encoding, reconfigure, buffer)
        if name == "wrapped":  # not set yet (a copy in the making): no recursion
            raise AttributeError(name)
        return getattr(self.wrapped, name)

    def _again(self, operation, *args):
        try:
            return operation(*args)
        except BrokenPipeError:
            to_devnull(self.wrapped.fileno())
            return operation(*args)

    def write(self, text: str) -> int:
        return self._again(self.wrapped.write, text)

    def writelines(self, lines) -> None:
        self._again(self.wrapped.writelines, list(lines))

    def flush(self) -> None:
        self._again(self.wrapped.flush)


def several_processes() -> bool:
    """True, having said so on rank 0, if this command (which runs in one process) was launched by torchrun
    with several: each would do the whole work and write the same files (evaluate's lock took its twin for
    another command)."""
    from .distributed import from_env

    ctx = from_env()
    if ctx.launched and ctx.world_size > 1:
        if ctx.is_main:
            spec = getattr(sys.modules["__main__"], "__spec__", None)  # python -m NAME, or a script
            command = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
            print(f"error: {command} runs in one process, and torchrun started {ctx.world_size}: run it with "
                  f"{command} alone (only python -m stmd_fast.train takes torchrun)", file=sys.stderr)
        return True
    return False


def one_line_errors(*user_errors: type[BaseException], failures: tuple[type[BaseException], ...] = (),
                    alone: tuple[type[BaseException], ...] = (), torchrun: bool = False):
    """Decorator for a CLI's main(argv) -> int, which returns the exit status (argparse's usage errors and --help
    too, not a SystemExit): an exception of user_errors prints `error: ...` as one line on stderr and exits 2;
    one of failures (e.g. a diverged run) prints the same and exits 1; Ctrl-C, SIGTERM and SIGHUP print
    `interrupted` and exit 128 + the signal's number (130, 143, 129), after the command's own cleanup; anything else is a bug and keeps its traceback. Under torchrun
    every rank meets the same error and rank 0 says it: the others wait so torchrun stops them first,
    and only an error of one rank alone is still printed, after the wait, with its rank. An error of
    `alone` (e.g. the loss of another process, rank 0 maybe) is one rank's by nature: said at once. A command
    that does not take torchrun (torchrun=False) refuses to run under it with several processes."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            with printable_output():
                return guarded(argv)

        def guarded(argv: list[str] | None) -> int:
            if not torchrun and several_processes():
                return 2
            # SIGTERM and SIGHUP as Ctrl-C: the command's cleanup runs (no temporary file stays behind)
            try:
                with warnings_as_lines(), interrupt_on_stop_signals():
                    return main(argv)
            except SystemExit as done:  # argparse's usage error (said already) or --help: returned as any exit
                return exit_code(done)
            except user_errors + failures as err:
                from .distributed import from_env

                ctx = from_env()
                if not ctx.is_main and not isinstance(err, alone):
                    try:
                        time.sleep(5)
                    except KeyboardInterrupt:  # stopped while waiting: rank 0 says the error
                        return 130
                said = f"{err}{'' if isinstance(err, failures + alone) else restarts_repeat_it(ctx)}"
                print(f"error: {said}" if ctx.is_main else f"error (rank {ctx.rank}): {said}", file=sys.stderr)
                return 1 if isinstance(err, failures) else 2
            except KeyboardInterrupt as err:  # the user knows why; outputs are written whole or not at all
                print("interrupted", file=sys.stderr)
                return 128 + getattr(err, "signum", signal.SIGINT)  # the shell's code: 130 Ctrl-C, 143 SIGTERM
        return run
    return wrap


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal after it), on one line."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
            and isinstance(b.value.value, str)}


TUPLE_FLAGS = {"tuple[int, ...]": (int, "+"), "tuple[float, float]": (float, 2), "tuple[float, ...]": (float, "+"), "tuple[str, ...]": (str, "+")}
"""Tuple fields as flags that take several values: (type of each, argparse nargs)."""


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, default_text: Callable[[str], str | None],
                        skip: tuple[str, ...] = ()) -> None:
    """A flag --field-name per field of cls (fields in skip and nested configs aside): its docstring as the
    help, followed by default_text(name) when that is not None; the type from the annotation, and choices
    and metavar from the field's metadata (config.option). bool fields are switches; tuple fields take
    several values (TUPLE_FLAGS)."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.type not in ("int", "int | None", "float", "str", "str | None", "bool", *TUPLE_FLAGS):
            continue
        flag, text = f.metadata.get("flag") or "--" + f.name.replace("_", "-"), docs.get(f.name, "")
        if f.type == "bool":  # a switch with its --no- form: --resume can switch a resumable one either way
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                help=f"{text} [default: {'on' if f.default else 'off'}]")
            continue
        default = default_text(f.name)
        kind, nargs = TUPLE_FLAGS.get(f.type, ({"int": int, "int | None": int, "float": float}.get(f.type, str), None))
        kwargs = {"type": kind, "help": f"{text} [default: {default}]" if default is not None else text}
        if nargs is not None:
            kwargs["nargs"] = nargs
        if f.metadata.get("choices"):
            # a list that is empty by default takes "none" for it: --resume can then turn a --loggers off again
            kwargs["choices"] = list(f.metadata["choices"]) + (["none"] if f.default == () else [])
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        parser.add_argument(flag, dest=f.name, **kwargs)
