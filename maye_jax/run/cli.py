"""How every command-line tool starts and ends: its flags parsed with every mistake reported as
one line (an unknown `--config.` key names the closest option, a config file that does not
load says why), `--help` listing every option of a run (generated from
maye_jax/config/options.py), a user error as one line per problem (no traceback) and exit
status 1; a run stopped by a signal says how to resume and exits 128 + the signal (130 for
Ctrl-C, 143 for SIGTERM), never printing a summary that looks finished.

    if __name__ == "__main__":
        run_cli("train", main, config_flag=True)
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from maye_jax.errors import RunAborted, RunStopped, UserError

HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


def report_errors(name: str, main: Callable[[list[str]], int], argv: list[str]) -> int:
    """`main(argv)`'s exit status, or the status of the error it raised (printed first)."""
    try:
        return main(argv)
    except RunStopped as stopped:
        print(f"{name}: {stopped}", file=sys.stderr)
        return 128 + int(stopped.signum)
    except RunAborted as aborted:
        print(
            f"{name}: {aborted}; continue from the last checkpoint with --config.resume=True",
            file=sys.stderr,
        )
        return 128 + int(aborted.signum)
    except UserError as error:
        for line in str(error).splitlines():
            print(f"{name}: error: {line}", file=sys.stderr)
        return 1


def config_problems(argv: Sequence[str]) -> list[str]:
    """What is wrong with the `--config` arguments of `argv`, checked before the config file
    loads (ml_collections would raise with a traceback): a config file that does not exist, and
    every `--config.<key>` that names no declared option, with the closest declared key."""
    from maye_jax.config.options import SECTIONS, all_options

    known = [option.key for option in all_options()]
    problems = []
    for arg in argv:
        if arg.startswith(("--config=", "-config=")):
            path = arg.split("=", 1)[1].split(":", 1)[0]  # FILE[:ARGUMENT]
            if not Path(path).is_file():
                problems.append(f"--config={path}: no such file")
        match = _OVERRIDE.match(arg)
        if match is None or match.group(1) in known or match.group(1) in SECTIONS:
            continue
        key = match.group(1)
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"; did you mean --config.{close[0]}?" if close else ""
        problems.append(f"--config.{key}: unknown option{hint} (--help lists every option)")
    return problems


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (absl and ml_collections messages span several). A
    message that carries a traceback (ml_collections' for a config file that raised) keeps its
    first line, the exception it ends with and where in the file it was raised."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        head = (
            lines[0].split(": Traceback", 1)[0].removesuffix("Traceback (most recent call last):")
        )
        frames = [line for line in lines if line.startswith("File ")]
        where = f" ({frames[-1].removeprefix('File ')})" if frames else ""
        return f"{head.rstrip(': ')}: {lines[-1]}{where}"
    return " ".join(" ".join(lines).split()) or type(error).__name__


def help_text(name: str, *, config_flag: bool, full: bool) -> str:
    """The tool's usage (its module doc), its flags, and with `config_flag` every option of a
    run: `key  type  default  allowed  meaning`, one per line."""
    from absl import flags

    main = sys.modules.get("__main__")
    parts = [(main.__doc__ or f"python -m maye_jax.{name}").strip()]
    own = flags.FLAGS.get_help() if full else flags.FLAGS.main_module_help()
    if own.strip():
        parts.append("flags:\n" + own.rstrip())
    if config_flag:
        from maye_jax.config.options import option_lines

        parts.append(
            "options (--config.<key>=VALUE; None turns an optional one off; a tuple takes "
            "a,b,c):\n" + "\n".join("  " + line for line in option_lines())
        )
    return "\n\n".join(parts) + "\n"


def parse_flags(name: str, argv: list[str], *, config_flag: bool) -> list[str]:
    """absl's flag parsing of `argv` (the arguments left for `main`), where `--help` prints
    `help_text` and exits 0, and a flag that does not parse, an unknown `--config.` key or a
    config file that does not load is one line `<name>: error: ...` and exit status 1."""
    from absl import flags

    if any(arg in HELP_FLAGS for arg in argv[1:]):
        sys.stdout.write(help_text(name, config_flag=config_flag, full="--helpfull" in argv))
        sys.exit(0)
    problems = config_problems(argv[1:]) if config_flag else []
    if not problems:
        try:
            parsed = flags.FLAGS(argv)
            if config_flag and flags.FLAGS.config is not None:
                flags.FLAGS.config.keys()  # a config file that failed to load raises here
            return parsed
        except flags.Error as error:
            problems = [_one_line(error)]
        except Exception as error:  # the config file raised when loaded
            problems = [f"--config: {type(error).__name__}: {_one_line(error)}"]
    for problem in problems:
        print(f"{name}: error: {problem}", file=sys.stderr)
    sys.exit(1)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a line is logged (a tool run in-process under
    a test's capture, or with its stderr redirected, logs where its errors go)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_cli_logging() -> None:
    """maye_jax's INFO lines with timestamps on stderr; everything else (absl, Orbax, JAX) from
    WARNING up.

    Under absl's app.run the root logger already has absl's handler (so `basicConfig` does
    nothing) at absl's verbosity (WARNING hides INFO): maye_jax gets a handler of its own."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    for noisy in ("orbax", "jax", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ours = logging.getLogger("maye_jax")
    if not any(isinstance(h, _StderrHandler) for h in ours.handlers):  # one, however often
        handler = _StderrHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s maye_jax %(levelname)s %(message)s"))
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


def run_cli(name: str, main: Callable[[list[str]], int], *, config_flag: bool = False) -> None:
    """absl's app.run of `main`, with the flags parsed by `parse_flags`, logging set up and
    errors reported by `report_errors`."""
    from absl import app

    if config_flag:
        from maye_jax.config.flags import define_config_flag

        define_config_flag()

    def entry(argv):
        setup_cli_logging()
        sys.exit(report_errors(name, main, argv))

    app.run(entry, flags_parser=lambda argv: parse_flags(name, argv, config_flag=config_flag))
