"""Two processes on localhost (4 fake CPU devices each) extract features together: every
example of an eval set that does not fill the last global batch is counted exactly once,
in global order, on both hosts."""

import numpy as np

from localhost_workers import run_two_workers

WORKER = r'''
import json, sys
sys.path[:0] = [sys.argv[3]]
from clip_jax import distributed
assert distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                              process_id=int(sys.argv[2]))
import jax
import numpy as np
from clip_jax.evaluate.features import extract_features, host_batches
from clip_jax.evaluate.zeroshot import zeroshot_accuracy
from clip_jax.sharding import make_mesh


def encode(variables, inputs):     # a linear "tower": enough to check rows and order
  return inputs @ variables['w']


def inputs_of(indices):
  return np.stack([np.sin(np.arange(6) * (i + 1.0)) for i in indices]).astype(np.float32)


num = 21                           # global batch 8 (4 per host): 3 batches, the last short
loaded = []
def load_rows(indices):
  loaded.extend(int(i) for i in indices)
  return {'x': inputs_of(indices), 'label': (indices % 3).astype(np.int32),
          'index': indices.astype(np.int32)}

mesh = make_mesh((-1, 1, 1))
weights = {'w': np.linspace(-1, 1, 6 * 5, dtype=np.float32).reshape(6, 5)}
batches = list(host_batches(num, 8, mesh, load_rows))
out = extract_features(encode, weights, iter(batches), mesh, input_key='x', normalize=False)
want = inputs_of(np.arange(num)) @ weights['w']
print('RESULT ' + json.dumps(dict(
    process=jax.process_index(), devices=jax.device_count(), batches=len(batches),
    loaded=loaded, index=out['index'].tolist(), label=out['label'].tolist(),
    max_error=float(np.abs(out['features'] - want).max()))), flush=True)
'''


def test_two_hosts_count_every_example_once_in_global_order(tmp_path):
  results = run_two_workers(WORKER, tmp_path, timeout=300)
  results.sort(key=lambda r: r['process'])
  # Each host read only its own rows, the two together every row once.
  assert sorted(results[0]['loaded'] + results[1]['loaded']) == list(range(21))
  assert not set(results[0]['loaded']) & set(results[1]['loaded'])
  for r in results:
    assert r['devices'] == 8 and r['batches'] == 3
    assert r['index'] == list(range(21))                 # once each, in global order
    assert r['label'] == [i % 3 for i in range(21)]      # labels travel with their rows
    assert r['max_error'] < 1e-5
  np.testing.assert_array_equal(results[0]['index'], results[1]['index'])
