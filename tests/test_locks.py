"""contracts/locks.py: one holder at a time, released however the holder ends."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from contracts import locks
from contracts.errors import DataError


def test_a_second_holder_is_refused_with_the_first_named(tmp_path):
  directory = tmp_path / "out"
  with locks.exclusive(directory, "job") as lock_path:
    assert lock_path == directory / locks.LOCK_FILE
    with pytest.raises(locks.DirectoryLocked,
                       match=rf"{directory} is in use by another job \(pid {os.getpid()} on "):
      with locks.exclusive(directory, "job"):
        pass
  with locks.exclusive(directory, "job"):  # released at the end of the block
    pass


def test_released_when_the_holder_is_killed_9(tmp_path):
  directory = tmp_path / "out"
  holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import time
      from contracts import locks
      with locks.exclusive({str(directory)!r}, "job"):
        print("held", flush=True)
        time.sleep(120)
      """)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(locks.DirectoryLocked, match=f"pid {holder.pid} "):
      with locks.exclusive(directory, "job"):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with locks.exclusive(directory, "job"):  # the kernel dropped the dead holder's lock
    pass


def test_a_directory_that_cannot_be_created_is_a_data_error(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(DataError, match=f"{blocker / 'out'}: cannot create or lock it"):
    with locks.exclusive(blocker / "out", "job"):
      pass
