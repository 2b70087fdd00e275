"""A real GCS protocol server on 127.0.0.1 for the tests, and a fault-injecting proxy.

`GcsEmulator` runs the `gcp-storage-emulator` package (the GCS JSON API over HTTP,
objects in memory) as a subprocess on a free port and stops it afterwards. `env()` is
what a clip_jax process needs to talk to it, each library with the setting it honours:

  STORAGE_EMULATOR_HOST      gcsfs (epath's backend for gs://) and google-cloud-storage
                             (tensorboardX's gs:// writer)
  TENSORSTORE_GCS_HTTP_URL   tensorstore (orbax's array writer)
  FSSPEC_GCS_TOKEN=anon      anonymous credentials for gcsfs
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false   gcsfs would first ask the emulator, over gRPC,
                             for the bucket's layout (zonal / hierarchical); the emulator
                             has no gRPC API and each ask would take 60 s to time out.

One gap of the emulator is closed where it starts: real GCS sends an object's generation
in the `x-goog-generation` header of every download ("Response headers", cloud.google.com/
storage/docs/json_api/v1/objects/get); the emulator (2026.7.19) sends it only in the JSON
metadata, and tensorstore, which orbax writes checkpoints with, cannot read an OCDBT
manifest back without it ("Malformed StorageGeneration"). `_SERVER` adds the header.

`FaultyProxy` forwards every request to the emulator unchanged, except object
downloads it has been told to fail (HTTP status codes, a given number of times or for
good): faults of the real protocol, between a real client and a real server.

The test process itself talks to the emulator with plain HTTP (`list_objects`,
`download`, `upload`), so its checks do not depend on the clients under test.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

BUCKET = 'clip-jax-test'

# The emulator's command line, with downloads answering x-goog-generation as GCS does.
_SERVER = """
import sys
from gcp_storage_emulator.handlers import objects
_download = objects.download

def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    response['x-goog-generation'] = obj['generation']
    response['x-goog-metageneration'] = obj['metageneration']
  except Exception:  # NotFound: the handler answers 404 itself
    pass
  return _download(request, response, storage, *args, **kwargs)

objects.download = download   # before the server module builds its routes from it
from gcp_storage_emulator.__main__ import main
sys.exit(main())
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen | None = None, timeout: float = 60) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if process is not None and process.poll() is not None:
      raise RuntimeError(f'the GCS emulator exited with {process.returncode}')
    try:
      with urllib.request.urlopen(url, timeout=2):
        return
    except OSError:
      time.sleep(0.2)
  raise TimeoutError(f'nothing answered at {url} within {timeout}s')


class GcsEmulator:
  """`with GcsEmulator() as gcs:` a fresh in-memory GCS with one bucket, `gcs.bucket`."""

  def __init__(self, bucket: str = BUCKET):
    self.bucket = bucket
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self._process: subprocess.Popen | None = None

  def __enter__(self) -> 'GcsEmulator':
    self._process = subprocess.Popen(
        [sys.executable, '-c', _SERVER, 'start', '--host', '127.0.0.1',
         '--port', str(self.port), '--default-bucket', self.bucket, '--in-memory'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(f'{self.url}/storage/v1/b/{self.bucket}', self._process)
    return self

  def __exit__(self, *exc) -> None:
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._process.kill()

  def env(self, endpoint: str | None = None) -> dict[str, str]:
    """Environment for a clip_jax process; gcsfs and google-cloud-storage go to `endpoint`
    (e.g. a FaultyProxy's url), tensorstore straight to the emulator."""
    endpoint = endpoint or self.url
    return dict(STORAGE_EMULATOR_HOST=endpoint, TENSORSTORE_GCS_HTTP_URL=self.url,
                FSSPEC_GCS_TOKEN='anon', GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false',
                GOOGLE_CLOUD_PROJECT='clip-jax-test', NO_GCE_CHECK='true')

  # --- plain-HTTP access for the test's own checks --------------------------------------

  def list_objects(self, prefix: str = '', bucket: str | None = None) -> list[str]:
    names, token = [], ''
    while True:
      query = urllib.parse.urlencode(dict(prefix=prefix, **({'pageToken': token} if token else {})))
      with urllib.request.urlopen(
          f'{self.url}/storage/v1/b/{bucket or self.bucket}/o?{query}') as r:
        page = json.load(r)
      names += [item['name'] for item in page.get('items', [])]
      token = page.get('nextPageToken', '')
      if not token:
        return sorted(names)

  def download(self, name: str, bucket: str | None = None) -> bytes:
    quoted = urllib.parse.quote(name, safe='')
    with urllib.request.urlopen(
        f'{self.url}/download/storage/v1/b/{bucket or self.bucket}/o/{quoted}?alt=media') as r:
      return r.read()

  def upload(self, name: str, data: bytes, bucket: str | None = None) -> None:
    query = urllib.parse.urlencode(dict(uploadType='media', name=name))
    request = urllib.request.Request(
        f'{self.url}/upload/storage/v1/b/{bucket or self.bucket}/o?{query}', data=data,
        method='POST', headers={'Content-Type': 'application/octet-stream'})
    with urllib.request.urlopen(request) as r:
      r.read()


class LoopbackServer:
  """An http.server on 127.0.0.1 served from a thread; `with` starts and stops it.
  Subclasses build their server and hand it to `_serve`; `url` has no trailing slash."""

  def _serve(self, server: http.server.HTTPServer) -> None:
    self._server = server
    self.url = f'http://127.0.0.1:{server.server_address[1]}'
    self._thread = threading.Thread(target=server.serve_forever, daemon=True)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._server.shutdown()
    self._server.server_close()


class FaultyProxy(LoopbackServer):
  """A reverse proxy to `upstream` that fails chosen object downloads.

  `fail(name, [503, 404], from_byte=N)`: the next two downloads (GETs with alt=media) of
  object `name` that ask for bytes from offset N on are answered 503, then 404; reads
  before N pass. `fail(name, forever=404, from_byte=N)` fails every such download from
  then on. `injected` lists what was failed.
  """

  _HOP_BY_HOP = {'connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'te',
                 'trailer', 'upgrade', 'host', 'content-length'}

  def __init__(self, upstream: str):
    self.upstream = urllib.parse.urlparse(upstream)
    self.injected: list[tuple[str, int]] = []
    self._rules: dict[str, dict] = {}
    self._lock = threading.Lock()
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'

      def log_message(self, *args):
        pass

      def _body(self) -> bytes:
        if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
          chunks = []
          while True:
            size = int(self.rfile.readline().split(b';')[0].strip(), 16)
            chunk = self.rfile.read(size)
            self.rfile.readline()
            if not size:
              return b''.join(chunks)
            chunks.append(chunk)
        return self.rfile.read(int(self.headers.get('Content-Length') or 0))

      def _handle(self) -> None:
        body = self._body()
        status = proxy._fault(self.command, self.path, self.headers.get('Range', ''))
        if status:
          payload = json.dumps({'error': {'code': status, 'message': 'injected fault'}}).encode()
          self.send_response(status)
          self.send_header('Content-Type', 'application/json')
          self.send_header('Content-Length', str(len(payload)))
          self.end_headers()
          self.wfile.write(payload)
          return
        connection = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port,
                                                timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in proxy._HOP_BY_HOP}
        headers['Host'] = proxy.upstream.netloc
        connection.request(self.command, self.path, body=body or None, headers=headers)
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        self.send_response(response.status)
        for key, value in response.getheaders():
          if key.lower() not in proxy._HOP_BY_HOP:
            self.send_header(key, value)
        self.send_header('Content-Length', str(len(payload)))
        self.end_headers()
        if self.command != 'HEAD':
          self.wfile.write(payload)

      do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

    class Server(http.server.ThreadingHTTPServer):
      daemon_threads = True

      def handle_error(self, request, client_address):
        pass   # a client that hangs up (a killed run, a closed keep-alive) is no news

    self._serve(Server(('127.0.0.1', 0), Handler))

  def fail(self, name: str, statuses: tuple[int, ...] = (), *, from_byte: int = 0,
           forever: int = 0) -> None:
    with self._lock:
      self._rules[name] = dict(from_byte=from_byte, statuses=list(statuses), forever=forever)

  def clear(self) -> None:
    with self._lock:
      self._rules.clear()

  def _fault(self, method: str, path: str, byte_range: str) -> int:
    parsed = urllib.parse.urlparse(path)
    if method != 'GET' or 'alt=media' not in parsed.query or '/o/' not in parsed.path:
      return 0
    name = urllib.parse.unquote(parsed.path.split('/o/', 1)[1])
    match = re.match(r'bytes=(\d+)-', byte_range.strip())
    start = int(match.group(1)) if match else 0
    with self._lock:
      rule = self._rules.get(name)
      if rule is None or start < rule['from_byte']:
        return 0
      status = rule['statuses'].pop(0) if rule['statuses'] else rule['forever']
      if status:
        self.injected.append((name, status))
      return status


def run(args: list[str], env: dict[str, str], cwd: str, timeout: float = 600,
        check: bool = True) -> subprocess.CompletedProcess:
  """A clip_jax command (python -m ...) against the emulator, as a user runs it."""
  full_env = dict(os.environ, **env)
  result = subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
  if check and result.returncode:
    raise AssertionError(f'{" ".join(args)} exited {result.returncode}:\n'
                         f'{result.stdout[-3000:]}\n{result.stderr[-5000:]}')
  return result
