"""Run a worker script as two local processes joined by a 127.0.0.1 coordinator.

Shared by the multi-host tests: a missing peer aborts a process, so every run has a
timeout and a free port, and no process outlives its test.
"""

import json
import re
import os
import socket
import subprocess
import sys
from typing import Callable, Mapping

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_two_workers(script_text: str, tmp_path, timeout: float,
                    worker_env: Callable[[int], Mapping[str, str]] | None = None) -> list[dict]:
  """Runs `script_text` as processes 0 and 1 (4 fake CPU devices each).

  The script gets argv = [coordinator address, process id, repo dir, tests dir] and
  prints one line `RESULT <json>`; returns those results ordered by process id.
  `worker_env(process_id)` adds to a process's environment.
  """
  script = tmp_path / 'worker.py'
  script.write_text(script_text)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  address = f'127.0.0.1:{free_port()}'
  procs = [subprocess.Popen([sys.executable, str(script), address, str(i), REPO, TESTS],
                            env=dict(env, **(worker_env(i) if worker_env else {})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  results = []
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
    # stderr is merged in: a library's log line may share the RESULT line's start.
    found = re.search(r'RESULT (\{.*\})\s*$', out, re.MULTILINE)
    assert found, f'no RESULT line in the output of process {len(results)}:\n{out[-3000:]}'
    results.append(json.loads(found.group(1)))
  return results
