"""contracts/ray_cluster.py: the bounded connection every Ray engine uses.

Only 127.0.0.0/8 is ever contacted. 127.0.0.2, because Ray rewrites
127.0.0.1 and localhost into the machine's own address."""

import contextlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from contracts import ray_cluster
from contracts.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.2"


def free_port() -> int:
  with socket.socket() as s:
    s.bind((HOST, 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def listener(mode: str):
  """An address where something listens: "silent" accepts and never replies;
  "backlog" never accepts (its queue full); "http" replies as an HTTP/1 server
  does. Yields HOST:PORT."""
  server = socket.socket()
  server.bind((HOST, 0))
  server.listen(0 if mode == "backlog" else 8)
  held = []
  stop = threading.Event()
  thread = None
  if mode == "backlog":  # fill the accept queue, so the next connection waits
    for _ in range(2):
      filler = socket.socket()
      filler.setblocking(False)
      filler.connect_ex(server.getsockname())
      held.append(filler)
  else:
    def serve():
      server.settimeout(0.1)
      while not stop.is_set():
        try:
          connection, _ = server.accept()
        except socket.timeout:
          continue
        held.append(connection)
        if mode == "http":
          connection.recv(1024)
          connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
          connection.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
  try:
    yield f"{HOST}:{server.getsockname()[1]}"
  finally:
    stop.set()
    if thread is not None:
      thread.join()
    for s in held:
      s.close()
    server.close()


class FakeRay:
  """Records ray.init instead of starting Ray."""

  def __init__(self, initialized: bool = False, error: Exception | None = None):
    self.initialized, self.error, self.calls = initialized, error, []

  def is_initialized(self):
    return self.initialized

  def init(self, **kwargs):
    self.calls.append(kwargs)
    if self.error:
      raise self.error


def test_a_refused_connection_is_one_error_at_once():
  address = f"{HOST}:{free_port()}"
  started = time.monotonic()
  with pytest.raises(ConfigError, match=rf"^--ray_address={address}: connection refused: no Ray "
                                        r"cluster listens there"):
    ray_cluster.probe(address, timeout_s=5)
  assert time.monotonic() - started < 2


@pytest.mark.parametrize("mode,says", [
    ("silent", "connected, but nothing answered within 1 s"),
    ("backlog", "(no connection|connected, but nothing answered) within 1 s"),
    ("http", "something answers there, but not a Ray cluster")])
def test_an_address_that_is_not_a_ray_cluster_is_one_error_within_the_bound(mode, says):
  with listener(mode) as address:
    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"^--ray_address={address}: {says}"):
      ray_cluster.probe(address, timeout_s=1)
    # Bound: the connect step and the answer step, 1 s each.
    assert time.monotonic() - started < 3


def test_connect_probes_before_ray_init_and_converts_its_failures():
  fake = FakeRay()
  with pytest.raises(ConfigError, match="connection refused"):
    ray_cluster.connect(fake, f"{HOST}:{free_port()}", timeout_s=1)
  assert fake.calls == []  # never reached ray.init
  ray_cluster.connect(fake, "", include_dashboard=False)  # a local Ray: no probe
  assert fake.calls == [{"address": None, "include_dashboard": False}]
  ray_cluster.connect(FakeRay(initialized=True), f"{HOST}:{free_port()}")  # already connected
  failing = FakeRay(error=ConnectionError("Could not find any running Ray instance.\nmore"))
  with pytest.raises(ConfigError, match=r"^--flag=auto: cannot connect to the Ray cluster "
                                        r"\(Could not find any running Ray instance.\)$"):
    ray_cluster.connect(failing, "auto", flag="--flag")


@pytest.mark.parametrize("address", ["10.0.0.1", "10.0.0.1:port", ":6379", "host:70000"])
def test_an_address_that_is_not_host_port_is_refused_without_connecting(address):
  with pytest.raises(ConfigError, match=rf"^--ray_address={address}: expected HOST:PORT"):
    ray_cluster.probe(address)


@pytest.mark.slow
def test_every_job_with_a_ray_engine_uses_the_bounded_connection(tmp_path, tiny_windows, tiny_data,
                                                                 tiny_export):
  """preprocess, retrieval and trainer, each through its binary: a refused
  address ends in one line at once; a silent one (preprocess) within the bound."""
  pytest.importorskip("ray")
  bound = ray_cluster.CONNECT_TIMEOUT_SECONDS
  (tmp_path / "log.csv").write_text("user,item,ts\n1,2,3\n")
  commands = {
      "preprocess": ["--engine=ray", "--source=csv", f"--input={tmp_path / 'log.csv'}",
                     "--user_col=user", "--item_col=item", f"--output_dir={tmp_path / 'p'}"],
      # A real model: retrieval checks its flags, data and model before connecting.
      "retrieval": ["--engine=ray", f"--data_dir={tiny_data.data_dir}",
                    f"--model_dir={tiny_export}", f"--output_dir={tmp_path / 'r'}"],
      "trainer": ["--launcher=ray", "--strategy=multi_worker",
                  f"--data_dir={tiny_windows.data_dir}", f"--model_dir={tmp_path / 'm'}"],
  }
  refused = f"{HOST}:{free_port()}"

  def run(program: str, address: str) -> tuple[str, float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", f"{program}.main", *commands[program],
         f"--ray_address={address}"],
        capture_output=True, text=True, cwd=ROOT, timeout=bound + 90)
    assert done.returncode == 2, (program, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, (program, done.stderr[-3000:])
    return done.stderr.strip().splitlines()[-1], time.monotonic() - started

  for program in commands:
    line, _ = run(program, refused)
    assert line.startswith(f"{program}: error: --ray_address={refused}: connection refused"), \
        line
  with listener("silent") as silent:
    line, seconds = run("preprocess", silent)
  assert line.startswith(f"preprocess: error: --ray_address={silent}: connected, but nothing "
                         f"answered within {bound:g} s"), line
  assert bound <= seconds < bound + 30
  assert not (tmp_path / "p").exists() and not (tmp_path / "r").exists()
