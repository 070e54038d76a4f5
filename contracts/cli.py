"""What the three binaries share: one-line errors, list flags, optional extras."""

import importlib
import sys
from typing import NoReturn

from contracts.errors import ConfigError
from contracts.ray_cluster import CONNECT_TIMEOUT_SECONDS


def fail(program: str, message: str, code: int) -> NoReturn:
  """Prints `program: error: message` on stderr and exits with `code`."""
  print(f"{program}: error: {message}", file=sys.stderr)
  sys.exit(code)


def int_tuple(values: list[str], flag: str) -> tuple[int, ...]:
  """A comma-separated list flag as integers; ConfigError naming the flag otherwise."""
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise ConfigError(f"--{flag}={','.join(values)}: expected integers") from None


RAY_EXTRA = "ray"  # setup.cfg's extra for the Ray engine and launcher
ENGINES = ("default", "ray")


def define_engine_flags(default_engine: str, ray_engine: str) -> None:
  """--engine and --ray_address for a job with a Ray engine; the texts say
  what each engine does in that job."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_enum("engine", "default", list(ENGINES),
                    f"default: {default_engine}; ray: {ray_engine} (needs the `{RAY_EXTRA}` "
                    "extra).")
  flags.DEFINE_string("ray_address", "", "--engine=ray: the cluster to connect to, HOST:PORT of "
                      "its head (default: start a local one); an address that does not answer "
                      f"within {CONNECT_TIMEOUT_SECONDS:g} s is an error.")


def import_extra(flag: str, what: str, extra: str, *modules: str) -> list:
  """`modules` imported, or a ConfigError saying which extra installs them."""
  try:
    return [importlib.import_module(m) for m in modules]
  except ImportError as e:
    raise ConfigError(f"{flag} needs {what} ({e}); install it with "
                      f"pip install -e '.[{extra}]'") from None
