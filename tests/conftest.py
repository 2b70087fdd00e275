"""Test-wide setup: 8 fake CPU devices so sharding is exercised on one machine.

XLA reads XLA_FLAGS when jax initialises its backend, so this must run before any
test imports jax.
"""

import os
import sys

# XLA's CPU backend compiles at LLVM -O0 here: compiling is most of a test's time on 2
# cores, and -O0 shortens it (tiny's jitted init: 9.3 s -> 3.8 s; test_masking.py:
# 200 s -> 145 s) while computing the same operations, up to float32 summation order
# (test_train_step's sharded gradients allow for it). No test times anything.
# Subprocesses inherit the flag; test_arch_configs.py runs the documented commands with
# no XLA_FLAGS at all. A level the caller set is kept.
_flags = [os.environ.get('XLA_FLAGS', ''), '--xla_force_host_platform_device_count=8']
if 'xla_backend_optimization_level' not in _flags[0]:
  _flags.append('--xla_backend_optimization_level=0')
os.environ['XLA_FLAGS'] = ' '.join(_flags).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# Many tests start `python -m clip_jax.main` and other CLIs as subprocesses, each of which
# would compile the same programs again: JAX's persistent compilation cache (compiles
# over 1 s) lets the later ones reuse them. It changes no result, only compile time.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(REPO, '.pytest_cache', 'jax_compilation_cache'))

# Loading torch's compiler stack (triton, via torch._dynamo) after tensorflow segfaults
# in this environment (torch 2.14.1, tensorflow-cpu 2.21); loaded before, both work.
# Parity tests (open_clip) and tf.data tests share one process, so load it first.
try:
  import torch._dynamo  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pass
