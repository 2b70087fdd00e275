r"""RN101: ModifiedResNet-101 image tower, 512-d embedding. 119,688,033 parameters.

The paper's run (its numbers: clip_jax/recipes.py) on img2dataset .tar shards, on a TPU
v5p-256 (128 chips, 256 pairs each), data parallel:
  python -m clip_jax.main --config=configs/rn101.py --workdir=gs://my-bucket/rn101 \
      --config.data.train.pattern='gs://my-bucket/shards/*.tar'
about 11 hours (an estimate: 9.5e20 model FLOPs at 40% of the v5p's bf16 peak). Expected:
OpenAI's weights reach 62.3% zero-shot ImageNet top-1 (the run's, by
`python -m clip_jax.evaluate --workdir=gs://my-bucket/rn101 --task=zeroshot
--dataset=tfds:imagenet2012 --data_dir=DATA_DIR`).

The same recipe on a CPU: 3 steps of 2 built-in scenes, then zero-shot on 2 held-out ones
(measured on a 2-core VM: 5.0 min, 4.3 CPU-min, 5.0 GB peak memory):
  python -m clip_jax.main --config=configs/rn101.py:local --workdir=./rn101_local
"""

import ml_collections

from clip_jax import recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return recipes.get_config('RN101', arg)
