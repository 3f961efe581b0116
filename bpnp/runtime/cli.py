"""The command-line error policy shared by ``train.py``, ``evaluate.py`` and the tools.

Bad input (a key that does not exist, a bad value, a missing or unreadable file, a checkpoint
that does not fit, a directory that cannot be written) is found before any work starts and
printed as one line ``error: <message>`` on stderr, exit code :data:`EXIT_USER_ERROR` (2); a run
that fails while running because a write fails (disk full, read-only filesystem) prints one line
and exits with :data:`EXIT_RUN_FAILED` (1). ``HYDRA_FULL_ERROR=1`` re-raises with the traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

if TYPE_CHECKING:
    import torch

__all__ = ["ConfigError", "EXIT_USER_ERROR", "EXIT_RUN_FAILED", "user_errors", "one_line", "error_message",
           "run_with_error_policy", "config_error", "resolve_device", "check_writable_dir", "check_creatable_dir",
           "console", "is_unused_run_dir", "remove_unused_run_dir", "Interrupted", "interrupt_signals", "exit_code_of_signal"]

#: Exit code for bad input or configuration, found before any work starts.
EXIT_USER_ERROR = 2
#: Exit code for a run that failed while running (disk full, a write failed).
EXIT_RUN_FAILED = 1

T = TypeVar("T")


def exit_code_of_signal(signum: int) -> int:
    """The shell's convention: 128 + the signal number (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM during a run: raised by the handlers of
    :func:`interrupt_signals` (a plain ``KeyboardInterrupt`` counts as SIGINT). Code that keeps
    partial results re-raises it with ``message`` saying what was kept; the error policy prints
    ``interrupted: <message>`` and exits with 128 + the signal number."""

    def __init__(self, signum: int = signal.SIGINT, message: str = "") -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.message = message

    @property
    def exit_code(self) -> int:
        return exit_code_of_signal(self.signum)


@contextlib.contextmanager
def interrupt_signals():
    """While inside, SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (SIGTERM
    would otherwise end the process at once, with nothing written); the previous handlers are
    restored on exit. Outside the main thread it does nothing (signals only reach that one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


class ConfigError(ValueError):
    """A setting cannot be used as given (a bad value, an unwritable directory, a device that is
    not there): the entry points print it as one ``error:`` line, exit code 2."""


_NOISE = ("full_key:", "object_type=", "reference_type=", "Config search path", "provider=",
          "Set the environment variable HYDRA_FULL_ERROR")


def one_line(exc: BaseException | str) -> str:
    """A (possibly multi-line, Hydra/OmegaConf style) error message as one line: Hydra's hints
    about HYDRA_FULL_ERROR, search paths and OmegaConf's ``full_key``/``object_type`` lines are
    dropped, a listing after a ``...:`` line is joined with commas."""
    keep = [ln.strip() for ln in str(exc).splitlines()]
    keep = [ln for ln in keep if ln and not ln.startswith(_NOISE)]
    if not keep:
        return type(exc).__name__ if isinstance(exc, BaseException) else "error"
    out, listing = keep[0], keep[0].endswith(":")
    for ln in keep[1:]:
        if listing and " " not in ln:
            out += (" " if out.endswith(":") else ", ") + ln
            continue
        listing = ln.endswith(":")
        out += (" " if out[-1] in ".:;," else "; ") + ln
    return out


def user_errors() -> tuple[type[BaseException], ...]:
    """Every exception that means "bad input": each carries a one-line message naming the file or
    key (imported here, lazily, so that this module stays cheap to import)."""
    from omegaconf.errors import OmegaConfBaseException

    from bpnp.data.bpnpnet_pickles import PickleFormatError
    from bpnp.data.cameras import UnsupportedCameraError
    from bpnp.data.colmap import ColmapFormatError
    from bpnp.data.scenes import SceneFileError
    from bpnp.models.settings import SettingError
    from bpnp.runtime.checkpoint import CheckpointError

    return (ConfigError, SettingError, CheckpointError, SceneFileError, ColmapFormatError, UnsupportedCameraError,
            PickleFormatError, FileNotFoundError, NotADirectoryError, OmegaConfBaseException)


def error_message(exc: BaseException) -> str:
    """The one line printed for ``exc`` (an OSError as ``strerror: filename``)."""
    if isinstance(exc, OSError) and exc.strerror and (len(exc.args) > 1 or exc.filename):
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    else:
        text = one_line(exc)
    return text or type(exc).__name__


def run_with_error_policy(work: Callable[[], T]) -> tuple[int, T | None]:
    """``(0, work())``, or print one ``error:`` line and return ``(exit code, None)`` for bad
    input (:func:`user_errors`, code 2) and for a failed write while running (OSError, code 1);
    an interruption (Ctrl-C, or SIGTERM under :func:`interrupt_signals`) prints one
    ``interrupted: ...`` line and returns 130 / 143."""
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"  # the traceback too, for debugging
    try:
        return 0, work()
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM under interrupt_signals(): one line, 130 / 143
        signum = getattr(exc, "signum", signal.SIGINT)
        message = getattr(exc, "message", "") or "stopped before any result was written"
        _report(f"interrupted: {message}")
        if full:
            raise
        return exit_code_of_signal(signum), None
    except user_errors() as exc:
        _report(f"error: {error_message(exc)}")
        if full:
            raise
        return EXIT_USER_ERROR, None
    except OSError as exc:  # disk full, quota, read-only filesystem... while running
        _report(f"error: I/O error: {error_message(exc)}")
        if full:
            raise
        return EXIT_RUN_FAILED, None


def _report(line: str) -> None:
    """The one error line: on stderr, and into the log files of the run (``train.log``,
    ``evaluate.log``: the root logger's file handlers Hydra set up), not on the console twice."""
    print(line, file=sys.stderr)
    record = logging.LogRecord("bpnp", logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            try:
                handler.handle(record)
            except Exception:  # the log file's disk may be the one that is full
                pass


def config_error(config_dir: str | Path, config_name: str, argv: list[str],
                 validate: Callable[[Any], None] | None = None) -> str | None:
    """Compose ``config_name`` with the command-line overrides ``argv`` (Hydra's compose API, no
    side effects) and return a one-line message if they do not compose (an unknown key such as
    ``foo.bar=1``, an unknown group option such as ``data=synthtic``, a malformed override) or if
    ``validate(cfg)`` raises :class:`ConfigError` for the composed config (a bad value), else
    None: the entry points call this before Hydra creates the run directory. Command lines with
    Hydra flags (``--multirun``, ``--cfg``, ``-h``...) are left to Hydra.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if any(a.startswith("-") for a in argv):
        return None
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            cfg = compose(config_name, overrides=list(argv), return_hydra_config=True)
        if validate is not None:
            validate(cfg)
    except ConfigError as exc:
        return one_line(exc)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        import re

        message = one_line(exc)
        detail = one_line(exc.__cause__) if exc.__cause__ is not None else ""
        m = re.match(r"Could not override '(.+?)'\. To append to your config use (\S+)", message)
        k = re.match(r"Key '(.+?)' is not in struct", detail)
        if m and k:  # the common typo: a key that does not exist
            return (f"could not override '{m.group(1)}': key '{k.group(1)}' does not exist in the config "
                    f"(to add a new key on purpose, use {m.group(2)})")
        if detail and detail not in message:
            message = f"{message}; {detail}"
        return message
    return None


def resolve_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``...; an unavailable CUDA device is a config error
    (``evaluate.py device=...``, ``python -m bpnp.solve --device ...``)."""
    import torch  # here, so that importing this module stays cheap

    try:
        device = torch.device(str(name))
    except RuntimeError as exc:
        raise ConfigError(f"device={name}: not a torch device ({exc})") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"device={name}: use cpu or cuda[:i]")
    return device


def check_writable_dir(path: str | Path, what: str) -> Path:
    """Create ``path`` if needed and write-test it; :class:`ConfigError` naming ``what``
    otherwise (checked before training, so a bad logger or checkpoint directory fails at once
    instead of losing logs: W&B silently falls back to the system temp directory)."""
    import tempfile

    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write_test_"):
            pass
    except OSError as exc:
        raise ConfigError(f"{what}={p}: not a writable directory ({exc.strerror or exc})") from exc
    return p


def check_creatable_dir(path: str | Path, what: str) -> Path:
    """That ``path`` is, or can be created as, a writable directory, with no lasting side effect:
    a probe directory is made (and removed at once) in ``path`` or in its nearest existing
    ancestor. For directories that Hydra creates before the job starts (``paths.log_dir``,
    ``hydra.run.dir``), where a failure would otherwise be Hydra's traceback.

    Raises:
        ConfigError: ``"<what>=<path>: cannot create a directory there (<reason>)"``.
    """
    import tempfile

    p = Path(path).expanduser()
    probe = p
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what}={p}: cannot create a directory there ({probe} is not a directory)")
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".bpnp_write_test_"))
    except OSError as exc:
        where = "" if probe == p else f" in {probe}"
        raise ConfigError(f"{what}={p}: cannot create a directory there ({exc.strerror or exc}{where})") from exc
    return p


# -- console and run directories -----------------------------------------------------------------------
class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (pytest swaps it per test)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def console(name: str = "bpnp") -> logging.Logger:
    """The logger the entry points print their progress with. Under Hydra its records reach the
    console and the run's log file (``train.log``, ``evaluate.log``: configs/hydra/job_logging);
    outside Hydra (in-process callers, tests) with no logging configured, they go to stdout."""
    log = logging.getLogger(name)
    if not logging.getLogger().handlers and not any(isinstance(h, _StdoutHandler) for h in log.handlers):
        log.addHandler(_StdoutHandler())
        log.setLevel(logging.INFO)
        log.propagate = False
    elif logging.getLogger().handlers:  # configured since (Hydra): go through the root's handlers
        for h in [h for h in log.handlers if isinstance(h, _StdoutHandler)]:
            log.removeHandler(h)
        log.propagate = True
        if log.level == logging.NOTSET or log.level > logging.INFO:
            log.setLevel(logging.INFO)
    return log


#: What Hydra writes into a run directory before the job starts (its config copies, the log).
_HYDRA_FILES = (".hydra", "train.log", "evaluate.log")


def is_unused_run_dir(path: str | Path) -> bool:
    """True if ``path`` does not exist or holds nothing but Hydra's own files (``.hydra/``, the
    job's log) and empty folders: a run that stopped before doing any work."""
    p = Path(path)
    if not p.is_dir():
        return True
    for child in p.rglob("*"):
        rel = child.relative_to(p)
        if rel.parts[0] in _HYDRA_FILES or child.is_dir():
            continue
        return False
    return True


def remove_unused_run_dir(path: str | Path) -> bool:
    """Delete ``path`` if :func:`is_unused_run_dir` (a run that failed on bad input leaves no
    empty run directory behind); returns whether it was deleted. Never touches a directory with
    anything else in it (a resumed run's checkpoints, logs)."""
    import shutil

    p = Path(path)
    if not p.is_dir() or not is_unused_run_dir(p):
        return False
    shutil.rmtree(p, ignore_errors=True)
    return not p.exists()
