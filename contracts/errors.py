"""Errors for bad input, reported to users as one line naming what is wrong."""


class DataError(ValueError):
  """Input data (a file, a column, a row) or a data directory is unusable.

  The message names the file and, where one exists, the column and row, so the
  user can fix the input without reading a traceback.
  """


class ConfigError(ValueError):
  """Flags that contradict each other or the data; the message names the flag."""
