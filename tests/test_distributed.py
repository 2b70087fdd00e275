"""How processes find each other: JAX's own cluster detection, fed by a GCE metadata server
on 127.0.0.1 (as on a slice made with `gcloud compute tpus tpu-vm create`), and the error
for a worker that would train alone on a multi-host slice."""

import http.server
import os
import subprocess
import sys
import threading
import time
import warnings

import pytest

from clip_jax import distributed
from localhost_workers import REPO, free_port, run_two_workers

PREFIX = '/computeMetadata/v1/instance/attributes/'
TWO_WORKERS = 't1v-n-0-w-0:0:127.0.0.1,t1v-n-0-w-1:1:127.0.0.1'   # name:id:ip, GCE's old format


class MetadataServer:
  """A GCE metadata server on 127.0.0.1: PREFIX + KEY answers `attributes[KEY]`, only to
  requests with the `Metadata-Flavor: Google` header (403 otherwise, as GCE), 404 for
  unknown keys. `address` is what GCE_METADATA_IP takes (JAX prepends http://)."""

  def __init__(self, attributes: dict[str, str]):
    self.attributes = attributes
    self.requests: list[str] = []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # pylint: disable=invalid-name
        key = self.path[len(PREFIX):] if self.path.startswith(PREFIX) else None
        if self.headers.get('Metadata-Flavor') != 'Google':
          code, body = 403, 'Missing Metadata-Flavor:Google header.'
        elif key in server.attributes:
          code, body = 200, server.attributes[key]
          server.requests.append(key)
        else:
          code, body = 404, 'Not Found'
        data = body.encode()
        self.send_response(code)
        self.send_header('Metadata-Flavor', 'Google')
        self.send_header('Content-Type', 'application/text')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def log_message(self, *args):
        pass

    self._httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.address = f'127.0.0.1:{self._httpd.server_address[1]}'
    threading.Thread(target=self._httpd.serve_forever, kwargs={'poll_interval': 0.05},
                     daemon=True).start()

  def close(self):
    self._httpd.shutdown()
    self._httpd.server_close()


def tpu_worker(worker: int, endpoints: str = TWO_WORKERS,
               accelerator: str = 'v4-16') -> dict[str, str]:
  """The attributes of a TPU VM worker, as JAX's GceTpuCluster reads them."""
  return {'agent-worker-number': str(worker), 'worker-network-endpoints': endpoints,
          'accelerator-type': accelerator,
          'tpu-env': f"ACCELERATOR_TYPE: '{accelerator}'\nWORKER_ID: '{worker}'\n"}


@pytest.fixture
def metadata():
  servers = []

  def start(attributes):
    servers.append(MetadataServer(attributes))
    return servers[-1]
  yield start
  for s in servers:
    s.close()


WORKER = r'''
import json, os, sys
sys.path[:0] = [sys.argv[3], sys.argv[4]]
import jax
# JAX sets TPU_SKIP_MDS_QUERY at import when it finds no TPU chips on PCI, the one thing a
# CPU machine cannot fake (JAX_FORCE_TPU_INIT makes it take this one for a TPU VM
# otherwise); on a TPU VM, with chips, it is never set.
os.environ.pop('TPU_SKIP_MDS_QUERY', None)
from clip_jax import distributed
assert distributed.initialize()      # no arguments, no CLIP_JAX_* variables
import numpy as np
from jax.experimental import multihost_utils
gathered = multihost_utils.process_allgather(np.array([10 * jax.process_index() + 1]))
print('RESULT ' + json.dumps(dict(
    process=jax.process_index(), processes=jax.process_count(),
    gathered=np.asarray(gathered).ravel().tolist(), describe=distributed.describe())),
    flush=True)
'''


def test_two_tpu_vm_workers_join_through_their_metadata(tmp_path, metadata):
  """The same command on both workers: JAX's GceTpuCluster reads each one's worker number
  and the slice's workers from its metadata server, and they form one job."""
  servers = [metadata(tpu_worker(i)) for i in range(2)]
  port = free_port()
  results = run_two_workers(WORKER, tmp_path, timeout=120, worker_env=lambda i: {
      'GCE_METADATA_IP': servers[i].address,
      'JAX_FORCE_TPU_INIT': '1',              # JAX's hook: take this host for a TPU VM
      'JAX_COORDINATOR_PORT': str(port),      # JAX's override of its fixed port 8482
  })
  assert [r['process'] for r in results] == [0, 1]
  assert all(r['processes'] == 2 and r['gathered'] == [1, 11] for r in results), results
  for i, r in enumerate(results):
    assert r['describe'] == (
        f"Cloud TPU VM metadata (JAX's GceTpuCluster), coordinator 127.0.0.1:{port}; "
        f'process {i} of 2: 4 local / 8 global cpu devices'), r['describe']
  for s in servers:   # each asked its own metadata server
    assert {'agent-worker-number', 'worker-network-endpoints'} <= set(s.requests)


def _clean_env(**extra) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('CLIP_JAX_', 'SLURM_', 'OMPI_', 'TPU_', 'MEGASCALE_', 'GCE_'))
         and k not in ('JAX_FORCE_TPU_INIT', 'JAX_COORDINATOR_ADDRESS')}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join([REPO, env.get('PYTHONPATH', '')]),
             **extra)
  return env


@pytest.mark.parametrize('force_tpu_init,reason', [
    (False, "JAX does not see a Cloud TPU VM (it needs libtpu, from pip install 'jax[tpu]'"),
    (True, 'TPU_SKIP_MDS_QUERY is set, so JAX does not read the TPU VM metadata'),
])
def test_a_worker_alone_on_a_multi_host_slice_stops_before_training(
    tmp_path, metadata, force_tpu_init, reason):
  """Worker 1 of a 2-host slice whose JAX does not join the slice (no libtpu; or
  JAX's metadata query skipped): the trainer stops at once, saying why and what to do."""
  server = metadata(tpu_worker(1))
  env = _clean_env(GCE_METADATA_IP=server.address)
  if force_tpu_init:
    env['JAX_FORCE_TPU_INIT'] = '1'
  workdir = tmp_path / 'run'
  start = time.time()
  result = subprocess.run(
      [sys.executable, '-m', 'clip_jax.main', '--config=configs/tiny.py', f'--workdir={workdir}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert time.time() - start < 60
  err = ' '.join(result.stderr.split())
  assert (f'the TPU VM metadata at http://{server.address} (accelerator-type v4-16, '
          'worker-network-endpoints: 2 workers, this is worker 1) says this run has 2 '
          'processes, but this process would run alone') in err, result.stderr[-3000:]
  assert reason in err
  assert (("Install jax[tpu] (launch/tpu/setup.sh does)" in err) != force_tpu_init
          and ('Unset TPU_SKIP_MDS_QUERY' in err) == force_tpu_init)
  assert 'launch/tpu/train.sh' in err and 'CLIP_JAX_NUM_PROCESSES=1 runs this one alone' in err
  assert not workdir.exists()               # nothing trained, nothing written
  assert 'initializing distributed' not in result.stderr


@pytest.fixture
def real_env(monkeypatch):
  """os.environ without cluster variables, as on a laptop; tests add their own."""
  for key in list(os.environ):
    if key.startswith(('CLIP_JAX_', 'SLURM_', 'OMPI_', 'TPU_WORKER', 'TPU_PROCESS',
                       'MEGASCALE_', 'GCE_', 'KUBERNETES_', 'JOB_COMPLETION')):
      monkeypatch.delenv(key)
  monkeypatch.setattr(distributed, '_joined', None)
  return monkeypatch


def test_single_host_slices_and_other_vms_run_alone(metadata, real_env):
  # A v4-8: one worker in the metadata.
  real_env.setenv('GCE_METADATA_IP', metadata(tpu_worker(0, '10.0.0.2', 'v4-8')).address)
  assert distributed.detect_cluster() is None
  assert distributed.initialize() is False
  assert distributed.describe().startswith(
      'single process (no multi-process cluster detected); process 0 of 1: 8 local')
  # An ordinary GCE VM: no TPU attributes (JAX's query retries a 404 for 3 s).
  real_env.setenv('GCE_METADATA_IP', metadata({}).address)
  assert distributed.initialize() is False


def test_alone_on_purpose_and_the_error_in_process(metadata, real_env):
  server = metadata(tpu_worker(0, 'host-a,host-b,host-c,host-d', 'v4-32'))   # hostname format
  real_env.setenv('GCE_METADATA_IP', server.address)
  assert distributed.detect_cluster() == 'tpu'
  assert distributed.detect_cluster({}) is None     # a given mapping: no metadata query
  with pytest.raises(distributed.ClusterError, match=r'v4-32, worker-network-endpoints: 4 '
                     r'workers, this is worker 0\) says this run has 4 processes'):
    distributed.initialize()
  server.requests.clear()
  real_env.setenv(distributed.ENV_NUM_PROCESSES, '1')
  assert distributed.initialize() is False
  assert server.requests == []                      # no detection at all
  assert distributed.describe().startswith('one process (CLIP_JAX_NUM_PROCESSES=1); process 0 of 1')


@pytest.mark.parametrize('env,evidence,why', [
    ({'TPU_WORKER_HOSTNAMES': 'a,b'}, 'TPU_WORKER_HOSTNAMES (2 host(s)) says this run has 2 '
     'processes', 'JAX does not see a Cloud TPU VM'),
    ({'TPU_PROCESS_ADDRESSES': 'a:8476,b:8476,c:8476', 'TPU_WORKER_HOSTNAMES': 'a'},
     'TPU_PROCESS_ADDRESSES (3 host(s)) says this run has 3 processes', 'libtpu'),
    ({'TPU_WORKER_HOSTNAMES': 'a,b', 'MEGASCALE_NUM_SLICES': '2'},
     'TPU_WORKER_HOSTNAMES (2 host(s)) and MEGASCALE_NUM_SLICES=2 says this run has 4', 'libtpu'),
    ({'MEGASCALE_COORDINATOR_ADDRESS': 'h'}, 'MEGASCALE_COORDINATOR_ADDRESS (a multislice run) '
     'says this run has several processes', 'libtpu'),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}, 'SLURM (4 tasks) says this run has 4',
     "JAX's SLURM detection needs SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID, which srun"),
    ({'OMPI_COMM_WORLD_SIZE': '2'}, 'Open MPI (OMPI_COMM_WORLD_SIZE=2) says this run has 2',
     'needs OMPI_MCA_orte_hnp_uri'),
])
def test_cluster_variables_jax_cannot_join_are_an_error(env, evidence, why):
  assert distributed.detect_cluster(env) in ('tpu', 'slurm', 'mpi')
  with pytest.raises(distributed.ClusterError) as error:
    distributed.initialize(env=env)
  assert evidence in str(error.value) and why in str(error.value), str(error.value)
  assert distributed.initialize(env=dict(env, **{distributed.ENV_NUM_PROCESSES: '1'})) is False


def test_jax_detection_is_used_and_trusted(real_env):
  assert distributed.find_jax_cluster() is None
  # A SLURM step of one task: JAX's SlurmCluster, one process, nothing to join.
  for key, value in dict(SLURM_JOB_ID='7', SLURM_STEP_NODELIST='node1', SLURM_NTASKS='1',
                         SLURM_PROCID='0', SLURM_LOCALID='0').items():
    real_env.setenv(key, value)
  assert distributed.find_jax_cluster().__name__ == 'SlurmCluster'
  assert distributed.initialize() is False
  assert distributed.describe().startswith(
      "single process (SLURM (JAX's SlurmCluster): 1 process); process 0 of 1")


def test_a_pod_that_is_not_an_indexed_job_is_not_asked_about(real_env):
  # A notebook or CI pod: JAX's K8sCluster would load the in-cluster config (or warn
  # that the kubernetes package is missing) and read its Job through the API.
  real_env.setenv('KUBERNETES_SERVICE_HOST', '10.0.0.1')
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert distributed.find_jax_cluster() is None
    assert distributed.initialize() is False
