r"""RN50x4: EfficientNet-style 4x compute scaling of RN50, at 288 px. 178,300,601 parameters.

The paper's run (its numbers: clip_jax/recipes.py) on img2dataset .tar shards, on a TPU
v5p-256 (128 chips, 256 pairs each), data parallel:
  python -m clip_jax.main --config=configs/rn50x4.py --workdir=gs://my-bucket/rn50x4 \
      --config.data.train.pattern='gs://my-bucket/shards/*.tar'
about 31 hours (an estimate: 1.9e21 model FLOPs at 40% of the v5p's bf16 peak, plus a
third for the recomputation). Expected: OpenAI's weights reach 66.3% zero-shot ImageNet
top-1 (the run's, by
`python -m clip_jax.evaluate --workdir=gs://my-bucket/rn50x4 --task=zeroshot
--dataset=tfds:imagenet2012 --data_dir=DATA_DIR`).

Each bottleneck is recomputed in the backward pass (remat): an estimated 0.44 GiB of saved
activations per pair without it, 0.07 GiB with it.

The same recipe on a CPU: 3 steps of 2 built-in scenes, then zero-shot on 2 held-out ones
(measured on a 2-core VM: 8.4 min, 5.5 CPU-min, 6.4 GB peak memory):
  python -m clip_jax.main --config=configs/rn50x4.py:local --workdir=./rn50x4_local
"""

import ml_collections

from clip_jax import recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return recipes.get_config('RN50x4', arg, remat_policy='full')
