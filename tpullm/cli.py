"""What every command-line entry point shares: `run(main)` in place of absl's `app.run(main)`.

- A user error (`tpullm.errors.USER_ERRORS`, absl's UsageError, a flag that does not parse, a
  config key that does not exist) prints one line, `<command>: error: <message>`, and exits 1
  without a traceback; any other exception keeps its traceback.
- Library logs (Orbax, jax, grain: Python logging under absl's handler) are shown from WARNING
  up, unless absl's `--verbosity` is given (`--verbosity=0` shows INFO again).
- `run(main, compilation_cache=True)` adds `--compilation_cache_dir` and turns on jax's
  persistent compilation cache, so a second run of the same config skips compiling.
"""

import os
import re
import sys

from absl import app, flags, logging

from tpullm import config as config_lib
from tpullm.errors import USER_ERRORS

# Computations that compile faster than this are not written to the cache (jax's default is
# 1 s, which on CPU skips the init and eval steps whose compilation a short run still waits for).
MIN_CACHED_COMPILE_SECONDS = 0.2
CACHE_OFF = ("", "none", "off")


def default_cache_dir() -> str:
    """$JAX_COMPILATION_CACHE_DIR, else tpullm/jax under the user's cache directory."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(cache_home, "tpullm", "jax")


def enable_compilation_cache(directory: str | None = None) -> str | None:
    """Turns on jax's persistent compilation cache in `directory` (default `default_cache_dir()`;
    "none" turns it off); returns the directory used, or None."""
    import jax

    directory = default_cache_dir() if directory is None else directory
    if directory.lower() in CACHE_OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    directory = os.path.expanduser(directory)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_CACHED_COMPILE_SECONDS)
    return directory


def program() -> str:
    """The command's name as typed: `tpullm.train` for `python -m tpullm.train`."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec.name if spec else os.path.basename(sys.argv[0])


def one_line(message: str) -> str:
    """A message as one line. ml_collections puts the traceback of a config file that raised into
    its flag error: that becomes the exception's last line and the innermost frame's file:line."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if "Traceback (most recent call last):" not in lines:
        return " ".join(lines)
    frames = re.findall(r'File "([^"]+)", line (\d+)', str(message))
    where = f" ({frames[-1][0]}:{frames[-1][1]})" if frames else ""
    header = lines[0].removesuffix("Error whilst parsing config file:").rstrip(" :")
    return f"{header}: {lines[-1]}{where}"


def fail(message) -> None:
    """One line on stderr, exit status 1."""
    print(f"{program()}: error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(1)


def config_flag_names() -> list[str]:
    """The flags holding an ml_collections config (config_flags.DEFINE_config_file / _dict)."""
    return [
        name
        for name in flags.FLAGS
        if flags.FLAGS[name].name == name and flags.FLAGS[name].parser.flag_type() == "config object"
    ]


def check_config_files(argv: list[str]) -> None:
    """ml_collections defers a config file that fails to load until its first use; fail now instead."""
    for name in config_flag_names():
        try:
            getattr(flags.FLAGS[name].value, "keys", None)
        except OSError as e:
            fail(f"--{name}={_config_argument(name, argv)}: {str(e).splitlines()[-1].strip()}")


def config_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """(config flag, dotted key) of every `--<flag>.<key>=...` override in argv."""
    found = []
    for arg in argv[1:]:
        match = re.match(r"--?(?:no)?(\w+)\.([\w.]+)(=|$)", arg)
        if match and match.group(1) in config_flag_names():
            found.append((match.group(1), match.group(2)))
    return found


def _config_argument(name: str, argv: list[str]):
    """The value given to --<name> in argv (a config file path), else the flag's default."""
    for i, arg in enumerate(argv):
        if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith((f"--{name}=", f"-{name}=")):
            return arg.split("=", 1)[1]
    return flags.FLAGS[name].default


def unknown_override(argv: list[str]) -> str | None:
    """The message for the first override in argv naming a key its config does not have."""
    for name, key in config_overrides(argv):
        config = flags.FLAGS[name].parser.parse(_config_argument(name, argv))
        message = config_lib.unknown_key(config, key, prefix=name)
        if message:
            return message
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with one-line errors: a bad value or unknown flag, or an override of a
    config key that does not exist (ml_collections raises AttributeError or KeyError for it)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{one_line(e)} (--helpfull lists the flags)")
    except (AttributeError, KeyError):
        message = unknown_override(argv)
        if message is None:
            raise
        fail(message)


def quiet_library_logs() -> None:
    """Python logging (absl's handler on the root logger: Orbax, jax, grain) from WARNING up,
    unless --verbosity was given."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def run(main, compilation_cache: bool = False) -> None:
    """absl's app.run(main) with one-line user errors, quiet library logs and, if asked, the
    persistent compilation cache."""
    if compilation_cache:
        flags.DEFINE_string(
            "compilation_cache_dir",
            None,
            "jax's persistent compilation cache (default $JAX_COMPILATION_CACHE_DIR, else "
            "~/.cache/tpullm/jax); 'none' turns it off.",
        )

    def checked_main(argv):
        check_config_files(sys.argv)
        quiet_library_logs()
        if compilation_cache:
            enable_compilation_cache(flags.FLAGS.compilation_cache_dir)
        try:
            return main(argv)
        except (*USER_ERRORS, app.UsageError) as e:
            fail(e)

    app.run(checked_main, flags_parser=parse_flags)
