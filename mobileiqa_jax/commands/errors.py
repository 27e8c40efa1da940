"""What every command (launch/, `mobileiqa <command>`) shares: readable errors, quiet logs.

`cli.run(main)` replaces `absl.app.run(main)`:

- a user's mistake (a bad flag value, a missing path, a folder that is not a checkpoint, a
  state dict of the other model, a workdir that cannot be written, a data set that is not
  prepared) prints ONE line, `<command>: error: <message>`, on stderr and exits non-zero
  (2 for flags and usage, 1 otherwise), without a traceback. Such mistakes reach here as
  `ValueError` (bad values, `ConversionError`, a refused resume), `OSError` (missing,
  unwritable or existing paths, `MissingDataError`, a missing bucket or refused credentials:
  `storage.BucketError`), `ImportError` (an optional dependency the input needs), absl flag
  errors, `app.UsageError`, and the storage clients' own errors (`storage.client_error`);
- anything else is a bug and keeps its traceback;
- with `quiet=True` (predict, convert, export, evaluate, explain) absl/orbax INFO lines and
  Python warnings are hidden, so stderr holds the progress bar and the errors;
- with `quiet="libraries"` (train) the project's own log lines stay (its record of the run:
  mesh, data, checkpoints, evaluations, summary) and the libraries' INFO lines (orbax's save
  internals, jax's compile notes) and their logged tracebacks are hidden; their warnings stay;
- `--verbose`, or an explicit absl `--verbosity`, shows the library logs and the traceback.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
from typing import Any, Callable, Sequence
import warnings

from absl import app
from absl import flags
from absl import logging

_VERBOSE = flags.DEFINE_boolean(
    "verbose", False, "Show library logs (absl/orbax INFO lines) and the traceback of an error.")

# What a user's mistake raises (see the module docstring); KeyError is left out because its
# message is only the key's repr.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)


# The name errors start with, set by `console.run_command` ("predict.py", "mobileiqa predict");
# None: the script's file name.
program_name: str | None = None


def _prog() -> str:
  if program_name:
    return program_name
  return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "mobileiqa_jax"


def one_line(message: Any) -> str:
  """A message on one line (multi-line errors, such as the converter's key lists, joined)."""
  return " ".join(str(message).split())


def _message(error: Any) -> str:
  if isinstance(error, OSError) and error.filename and error.strerror:
    # "[Errno 20] Not a directory: 'x'" -> "x: not a directory", with the path first.
    return f"{error.filename}: {error.strerror[:1].lower()}{error.strerror[1:]}"
  return str(error)


def fail(message: Any, status: int = 1) -> None:
  """Prints `<command>: error: <message>` on one stderr line and exits with `status`."""
  message = _message(message)
  sys.stderr.write(f"{_prog()}: error: {one_line(message)}\n")
  sys.stderr.flush()
  # os._exit would skip flushing; SystemExit with a non-string code prints nothing more.
  raise SystemExit(status)


def verbose() -> bool:
  """--verbose, or absl's --verbosity given on the command line."""
  return bool(_VERBOSE.value) or flags.FLAGS["verbosity"].present > 0


def _config_error(error: BaseException, argv: Sequence[str]) -> str | None:
  """A config file's or override's error as one readable line, or None when it is not one.

  ml_collections reports a field that does not exist as a KeyError wrapped in an
  AttributeError (with its "Did you mean" suggestion), and a config file that fails to load
  as a flag error whose text holds the whole traceback: the user needs the last line.
  """
  text = str(error)
  if isinstance(error, (AttributeError, KeyError)):
    # str(KeyError) quotes and escapes its message: unwrap it.
    text = text.strip("'\"").replace("\\n", "; ").replace("\\'", "'")
    quoted = re.match(r"'([^']+)'", text)
    field = quoted.group(1) if quoted else ""
    override = next((a.split("=", 1)[0] for a in argv
                     if a.startswith("--config.") and field and f".{field}" in a.split("=")[0]),
                    None)
    where = f"{override}: " if override else ""
    return f"{where}no config field {text}"
  if "Error whilst parsing config file" in text and "Traceback" in text:
    last = [line.strip() for line in text.splitlines() if line.strip()]
    flag = text.split(": Error whilst parsing config file", 1)[0]
    return f"{flag}: {last[-1] if last else text}"
  return None


def _parse_flags(argv: Sequence[str]) -> list[str]:
  try:
    return flags.FLAGS(list(argv))
  except (flags.Error, AttributeError, KeyError) as e:
    if "--verbose" in argv:
      raise
    message = _config_error(e, argv)
    if message is None and not isinstance(e, flags.Error):
      raise
    fail(message or f"{e} (run with --helpshort for the flags)", status=2)
  return []  # unreachable


def quiet_logs() -> None:
  """Hides INFO logs (absl, orbax, the package) and Python warnings for this process."""
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger().setLevel(std_logging.WARNING)
  warnings.simplefilter("ignore")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _ProjectLogsOnly(std_logging.Filter):
  """Passes the project's log records, and the libraries' warnings without tracebacks."""

  def __init__(self, own_dirs: Sequence[str]):
    super().__init__()
    self._own = tuple(os.path.join(os.path.abspath(d), "") for d in own_dirs)

  def filter(self, record: std_logging.LogRecord) -> bool:
    if os.path.abspath(record.pathname).startswith(self._own):
      return True
    # A library's logged traceback (orbax logs a failed save's) duplicates the error the
    # project reports itself in one line.
    return record.levelno >= std_logging.WARNING and not record.exc_info


def project_logs_only() -> std_logging.Filter:
  """The filter of `quiet_library_logs`: the package's and launch/'s records at any level."""
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # mobileiqa_jax/
  launch = os.path.join(os.path.dirname(package), "launch")
  return _ProjectLogsOnly([package, launch, os.path.dirname(os.path.abspath(sys.argv[0]))])


def quiet_library_logs() -> None:
  """Hides the libraries' INFO logs, keeping this package's and launch/'s (any level)."""
  only = project_logs_only()
  handlers = {logging.get_absl_handler(), *std_logging.getLogger().handlers}
  for handler in handlers:
    handler.addFilter(only)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run(main: Callable[[list[str]], Any], *, quiet: bool | str = True,
        user_errors: tuple[type[BaseException], ...] = ()) -> None:
  """`absl.app.run(main)` with one-line user errors and (when `quiet`) no INFO logs.

  Args:
    main: the command; gets the positional arguments (argv[0] first) and returns an exit
      status (None is 0).
    quiet: unless --verbose: True hides absl/orbax INFO lines and warnings; "libraries"
      hides only the libraries' INFO lines (the command's own log stays).
    user_errors: more exception types that mean a user's mistake for this command.
  """
  caught = (app.UsageError, *USER_ERRORS, *user_errors)

  def wrapped(argv: list[str]) -> Any:
    if quiet == "libraries" and not verbose():
      quiet_library_logs()
    elif quiet and not verbose():
      quiet_logs()
    try:
      return main(argv)
    except caught as e:  # pylint: disable=catching-non-exception
      if verbose():
        raise
      fail(e, status=2 if isinstance(e, app.UsageError) else 1)
    except Exception as e:  # pylint: disable=broad-except
      # A bucket's client (gcsfs, s3fs, google-auth, botocore) raises its own types: refused
      # credentials or an unreachable store are the user's to fix, not a bug.
      from mobileiqa_jax import storage  # pylint: disable=g-import-not-at-top
      problem = storage.client_error(e)
      if problem is None or verbose():
        raise
      fail(problem)
    return None  # unreachable

  app.run(wrapped, flags_parser=_parse_flags)
