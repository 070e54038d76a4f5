"""The one way the jobs' Ray engines connect to Ray: bounded, one-line errors.

`ray.init(address=HOST:PORT)` retries for minutes when nothing answers there
(a refused connection and a listener that never replies both take over 2.5
minutes in Ray 2.60, then end in a traceback). So before `ray.init` the
address is probed: a TCP connection, then the HTTP/2 preface that every
gRPC server (a Ray head's GCS, a Ray Client server) answers with a SETTINGS
frame at once. Each step is bounded by CONNECT_TIMEOUT_SECONDS; what fails
is a ConfigError naming the flag. Only the probe touches the network before
`ray.init`; without an address a local Ray is started, unprobed.
"""

import logging
import os
import socket
import time

from contracts.errors import ConfigError

# How long an address may take to accept a connection and to answer the
# probe; a live head answers within milliseconds.
CONNECT_TIMEOUT_SECONDS = 20.0
# Addresses ray.init resolves itself (a local cluster), not HOST:PORT.
_NAMED_ADDRESSES = ("auto", "local")
_CLIENT_SCHEME = "ray://"
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HTTP2_EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, type 4, no flags
_HTTP2_FRAME_HEADER_BYTES = 9
_HTTP2_SETTINGS = 4


def host_and_port(address: str, flag: str) -> tuple[str, int]:
  """HOST:PORT (or ray://HOST:PORT, [IPv6]:PORT) -> (host, port); a ConfigError otherwise."""
  bare = address[len(_CLIENT_SCHEME):] if address.startswith(_CLIENT_SCHEME) else address
  host, _, port = bare.rpartition(":")
  host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f"{flag}={address}: expected HOST:PORT (e.g. 10.0.0.1:6379, the head's "
                      f"address), {_CLIENT_SCHEME}HOST:PORT or {' or '.join(_NAMED_ADDRESSES)}")
  return host, int(port)


def probe(address: str, flag: str = "--ray_address",
          timeout_s: float = CONNECT_TIMEOUT_SECONDS) -> None:
  """Returns when a gRPC server answers at `address` within `timeout_s` per
  step; a ConfigError naming `flag` and what failed otherwise."""
  host, port = host_and_port(address, flag)
  bound = f"within {timeout_s:g} s (contracts/ray_cluster.py CONNECT_TIMEOUT_SECONDS)"
  try:
    connection = socket.create_connection((host, port), timeout=timeout_s)
  except ConnectionRefusedError:
    raise ConfigError(f"{flag}={address}: connection refused: no Ray cluster listens there "
                      "(is the head started, with `ray start --head`, on this port?)") from None
  except socket.timeout:
    raise ConfigError(f"{flag}={address}: no connection {bound}: the host does not answer "
                      "(down, or a firewall drops the traffic)") from None
  except socket.gaierror as e:
    raise ConfigError(f"{flag}={address}: unknown host {host!r} ({e.strerror})") from None
  except OSError as e:
    raise ConfigError(f"{flag}={address}: cannot connect ({e.strerror or e})") from None
  with connection:
    deadline = time.monotonic() + timeout_s
    reply = b""
    try:
      connection.sendall(_HTTP2_PREFACE + _HTTP2_EMPTY_SETTINGS)
      while len(reply) < _HTTP2_FRAME_HEADER_BYTES:
        connection.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = connection.recv(64)
        if not chunk:
          break
        reply += chunk
    except socket.timeout:
      raise ConfigError(f"{flag}={address}: connected, but nothing answered {bound}: not a "
                        "Ray cluster's address, or one that hangs") from None
    except OSError as e:
      raise ConfigError(f"{flag}={address}: the connection failed ({e.strerror or e}): "
                        "not a Ray cluster's address?") from None
  if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
    return  # a TLS server answers the plain preface with an alert or a close: it answered
  if len(reply) < _HTTP2_FRAME_HEADER_BYTES or reply[3] != _HTTP2_SETTINGS:
    raise ConfigError(f"{flag}={address}: something answers there, but not a Ray cluster "
                      f"(no gRPC reply; it sent {reply[:16]!r}); give the head's GCS port "
                      "(6379 unless `ray start --port` said otherwise)")


def connect(ray, address: str = "", flag: str = "--ray_address",
            timeout_s: float = CONNECT_TIMEOUT_SECONDS, **init_kwargs) -> None:
  """`ray.init` on `address` (empty: start a local Ray) unless Ray is already
  initialized, the address probed first; a failed connection is a
  ConfigError naming `flag`."""
  if ray.is_initialized():
    return
  if address and address not in _NAMED_ADDRESSES:
    probe(address, flag, timeout_s)
  try:
    ray.init(address=address or None, **init_kwargs)
  except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
    if not address:
      raise
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"{flag}={address}: cannot connect to the Ray cluster ({reason})") from None


class _DropErrors(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def quiet_data_errors() -> None:
  """Keeps Ray Data's error records (a failed task's traceback, twice) off
  the console; its log file in the Ray session keeps them. The exception
  itself still reaches the driver, which reports it (a DataError as one
  line), so the console holds no traceback the job did not raise."""
  for handler in logging.getLogger("ray.data").handlers:
    if isinstance(handler, logging.StreamHandler) and not any(
        isinstance(f, _DropErrors) for f in handler.filters):
      handler.addFilter(_DropErrors())
