"""What the three binaries share: one-line errors and list flags."""

import sys
from typing import NoReturn

from contracts.errors import ConfigError


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
