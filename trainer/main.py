"""trainer: not implemented yet (issue 3). Exits non-zero, writes nothing."""

import sys


def run():
  print("trainer: not implemented yet (issue #3)", file=sys.stderr)
  sys.exit(3)


if __name__ == "__main__":
  run()
