r"""RN50: ModifiedResNet-50 (attention pool), 1024-d embedding. 102,007,137 parameters.

The paper's run (its numbers: clip_jax/recipes.py) on img2dataset .tar shards, on a TPU
v5p-256 (128 chips, 256 pairs each), data parallel:
  python -m clip_jax.main --config=configs/rn50.py --workdir=gs://my-bucket/rn50 \
      --config.data.train.pattern='gs://my-bucket/shards/*.tar'
about 8 hours (an estimate: 6.6e20 model FLOPs at 40% of the v5p's bf16 peak). Expected:
OpenAI's weights reach 59.8% zero-shot ImageNet top-1 (the run's, by
`python -m clip_jax.evaluate --workdir=gs://my-bucket/rn50 --task=zeroshot
--dataset=tfds:imagenet2012 --data_dir=DATA_DIR`).

The same recipe on a CPU: 3 steps of 2 built-in scenes, then zero-shot on 2 held-out ones
(measured on a 2-core VM: 7.9 min, 3.9 CPU-min, 4.3 GB peak memory):
  python -m clip_jax.main --config=configs/rn50.py:local --workdir=./rn50_local
"""

import ml_collections

from clip_jax import recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return recipes.get_config('RN50', arg)
