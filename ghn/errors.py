"""User errors: the one exception type the command lines print as a message alone.

A `GHNError` is a problem with the user's input (a config key, an
architecture name, a missing dataset, a corrupt checkpoint) whose message
says how to fix it. The subclasses also keep the built-in base they had
before (`ValueError`, `FileNotFoundError`, `RuntimeError`), so code that
catches those still works.

`train.py`, `eval.py` and `python -m ghn` run under `exit_on_user_error`:
a `GHNError` prints `error: <message>` on stderr and exits with status
`USER_ERROR_EXIT`, without a traceback; any other exception is a bug and
keeps its traceback (status 1).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

from absl import app, flags
from ml_collections.config_flags import config_flags as ml_config_flags

# argparse's status for a bad command line; 1 stays that of a crash (with a traceback).
USER_ERROR_EXIT = 2


class GHNError(Exception):
    """A problem with the user's input, whose message says how to fix it."""


class ConfigError(GHNError, ValueError):
    """A value no run can use: a config key or field, a flag, an architecture or dataset choice."""


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turns a `GHNError` into `error: <message>` on stderr and exit status `USER_ERROR_EXIT`."""
    try:
        yield
    except GHNError as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(USER_ERROR_EXIT) from None


def run_absl(main) -> None:
    """`absl.app.run(main)` with user errors, in flags or in `main`, as `error:` lines.

    absl prints its own flag errors ("FATAL Flags parsing error", status 1),
    lets ml_collections' errors for a misspelled `--config.key` escape as an
    AttributeError or KeyError traceback, and defers a missing config file's
    error to a traceback inside the run; all become a `ConfigError` here.
    """
    with exit_on_user_error():
        app.run(main, flags_parser=parse_flags)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing (an `app.run` flags_parser) raising `ConfigError` for bad flags,
    `--config.` override keys and config files."""
    try:
        rest = flags.FLAGS(list(argv))
    except flags.Error as e:
        raise ConfigError(f"{e} (`--helpshort` lists the flags)") from None
    except (AttributeError, KeyError, IndexError) as e:
        # Only a lookup of an override's path; the same types raised elsewhere are bugs.
        if not _raised_in(e, "ml_collections/config_flags/config_path.py"):
            raise
        raise ConfigError(_unknown_key_message(e, argv)) from None
    _check_config_files()
    return rest


def _check_config_files() -> None:
    # ml_collections defers a config file's OSError (e.g. a wrong path) to the
    # config's first use, deep inside the run; any attribute read raises it.
    for name in flags.FLAGS:
        flag = flags.FLAGS[name]
        if not ml_config_flags.is_config_flag(flag):
            continue
        try:
            getattr(flag.value, "probe_for_a_load_error", None)
        except OSError as e:
            reason = str(e).strip().splitlines()[-1].strip()
            path = ml_config_flags.get_config_filename(flag)
            raise ConfigError(f"--{name}={path} could not be loaded: {reason}") from None


def _raised_in(e: BaseException, filename: str) -> bool:
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith(filename):
            return True
        tb = tb.tb_next
    return False


def _unknown_key_message(e: BaseException, argv: Sequence[str]) -> str:
    # ml_collections wraps the KeyError (whose text is "'key'\nDid you mean ...")
    # in an AttributeError; unwrap it rather than print nested reprs.
    while e.args and isinstance(e.args[0], BaseException):
        e = e.args[0]
    text = str(e.args[0]) if e.args else str(e)
    key, _, hint = text.partition("\n")
    key = key.strip("'\"")
    overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    named = [a for a in overrides if key in a[len("--config.") :].split(".")]
    where = f"{named[0]}: " if named else ""
    hint = f" {hint}" if hint else ""
    return (
        f"{where}the config has no key {key!r}.{hint} Overrides can only change keys the "
        "config file sets; ghn/train/config.py (base_config) lists every key with its "
        "default. To add a field to a dict such as archs.ranges, set it in a config file."
    )
