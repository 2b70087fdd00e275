r"""RN50x16: 16x compute scaling of RN50, at 384 px. 290,979,217 parameters.

The paper's run (its numbers: clip_jax/recipes.py) on img2dataset .tar shards, on a TPU
v5p-256 (128 chips, 256 pairs each), FSDP:
  python -m clip_jax.main --config=configs/rn50x16.py --workdir=gs://my-bucket/rn50x16 \
      --config.data.train.pattern='gs://my-bucket/shards/*.tar'
about 4 days (an estimate: 6.1e21 model FLOPs at 40% of the v5p's bf16 peak, plus a third
for the recomputation). Expected: OpenAI's weights reach 70.7% zero-shot ImageNet top-1
(the run's, by
`python -m clip_jax.evaluate --workdir=gs://my-bucket/rn50x16 --task=zeroshot
--dataset=tfds:imagenet2012 --data_dir=DATA_DIR`).

FSDP shards the 4.7 GB of float32 parameters and Adam moments; each bottleneck is
recomputed in the backward pass (an estimated 1.2 GiB of saved activations per pair
without remat, 0.19 GiB with it).

The same recipe on a CPU: 3 steps of 2 built-in scenes, then zero-shot on 2 held-out ones
(measured on a 2-core VM: 9.4 min, 9.2 CPU-min, 10.4 GB peak memory):
  python -m clip_jax.main --config=configs/rn50x16.py:local --workdir=./rn50x16_local
"""

import ml_collections

from clip_jax import recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return recipes.get_config('RN50x16', arg, mesh=(1, -1, 1), remat_policy='full')
