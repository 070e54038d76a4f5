"""retrieval: not implemented yet (issue 4). Exits non-zero, writes nothing."""

import sys


def run():
  print("retrieval: not implemented yet (issue #4)", file=sys.stderr)
  sys.exit(3)


if __name__ == "__main__":
  run()
