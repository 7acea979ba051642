"""What every stage entry point shares: the ``--config/--set`` command line and run records."""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from genius.common.config import ConfigError, load_config, save_config

T = TypeVar("T")
log = logging.getLogger("genius")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose bad flag ends on one line, ``<prog>: error: <message>; see '<prog>
    --help'``, exit status 2, without argparse's usage block (subcommands' parsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        exit_user_error(self, f"{message}; see '{self.prog} --help'")


def stage_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="the stage's YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable); the YAML file is not modified")
    add_debug_flag(parser)
    return parser


class _Debug(argparse.Action):
    """``--debug``: also sets GENIUS_DEBUG, which user_errors_exit reads, and so do subprocesses
    (torchrun workers), so a command need not pass the flag on itself."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        os.environ[DEBUG_ENV] = "1"
        setattr(namespace, self.dest, True)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action=_Debug, nargs=0, default=False,
                        help=f"show the traceback of an error (also: {DEBUG_ENV}=1)")


DEBUG_ENV = "GENIUS_DEBUG"


def debugging() -> bool:
    """Whether to show tracebacks: ``--debug`` (which sets it) or GENIUS_DEBUG=1."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def parse_stage_config(cls: type[T], parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[T, argparse.Namespace]:
    """Parse the command line and the config; a config error exits with status 2 and its message."""
    args = parser.parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides), args
    except ConfigError as err:
        exit_user_error(parser, one_line(err))


def exit_user_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """End the command as argparse ends a bad flag, on one line (no usage): ``<prog>: error:
    <message>``, exit status 2."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def one_line(err: BaseException) -> str:
    """The message of a user error on one line; an OSError names its file and what to do."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:  # raised by the OS, not by us
        return f"{err.filename}: {err.strerror}; {_OS_HINTS.get(err.errno, 'check the path and try again')}"
    text = str(err).strip() or type(err).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


_OS_HINTS = {
    errno.EACCES: "check the permissions of the file or folder, or choose another path",
    errno.EPERM: "check the permissions of the file or folder, or choose another path",
    errno.EROFS: "the file system is read-only; choose an output path on a writable disk",
    errno.ENOSPC: "the disk is full; free space or choose an output path on another disk",
    errno.ENOENT: "check the path (a config's relative paths resolve against $GENIUS_ROOT or the repository, a "
                  "command-line flag's against the working folder)",
    errno.EISDIR: "a folder is where a file was expected; check the path",
    errno.ENOTDIR: "a file is where a folder was expected; check the path",
}


def out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation that failed (host or device memory), not a bug."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError: CUDA's
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)  # torch's CPU allocator


@contextlib.contextmanager
def user_errors_exit(parser: argparse.ArgumentParser):
    """Inside the block, a user mistake (a missing, unreadable or refused file, bad data, stale or
    mismatched inputs, a full or read-only disk: ValueError and its subclasses, OSError; a run
    that diverged on the config's settings: FloatingPointError, which only the project raises) ends
    the command with ``<prog>: error: <one line>`` and exit status 2 instead of a traceback;
    ``--debug`` (or GENIUS_DEBUG=1) shows the traceback. Running out of memory ends the same way,
    with what to lower. Other exceptions are bugs and keep theirs."""
    try:
        yield
    except (OSError, ValueError, FloatingPointError) as err:
        if debugging():
            raise
        exit_user_error(parser, one_line(err))
    except (MemoryError, RuntimeError) as err:
        if debugging() or not out_of_memory(err):
            raise
        exit_user_error(parser, f"out of memory ({one_line(err)[:200]}); lower the config's batch size or "
                                "model sizes, or run where more memory is free")
    except KeyboardInterrupt:
        if debugging():
            raise
        parser.exit(130, f"{parser.prog}: interrupted; re-run the same command to resume from the last checkpoint\n")


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=os.environ.get("GENIUS_LOG_LEVEL", "INFO"),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


class MetricsLog:
    """Append-only JSON-lines metrics file next to a run's outputs."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        if self.enabled:
            record = {"time": round(time.time(), 3), **record}
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=float) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def record_run(out_dir: str | os.PathLike, cfg: Any, name: str = "config.yaml") -> None:
    """Save the resolved config beside a run's outputs."""
    save_config(cfg, Path(out_dir) / name)
