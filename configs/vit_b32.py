r"""ViT-B/32: ViT-Base, 32 px patches: the cheapest ViT, the usual first run. 151,277,313 parameters.

The paper's run (its numbers: clip_jax/recipes.py) on img2dataset .tar shards, on a TPU
v5p-256 (128 chips, 256 pairs each), data parallel:
  python -m clip_jax.main --config=configs/vit_b32.py --workdir=gs://my-bucket/vit_b32 \
      --config.data.train.pattern='gs://my-bucket/shards/*.tar'
about 6 hours (an estimate: 5.3e20 model FLOPs at 40% of the v5p's bf16 peak). Expected:
OpenAI's weights reach 63.3% zero-shot ImageNet top-1 (the run's, by
`python -m clip_jax.evaluate --workdir=gs://my-bucket/vit_b32 --task=zeroshot
--dataset=tfds:imagenet2012 --data_dir=DATA_DIR`).

At that pace each host must decode about 18,000 images/s (BENCHMARKS.md: ~330 per core at
256 px).

The same recipe on a CPU: 3 steps of 2 built-in scenes, then zero-shot on 2 held-out ones
(measured on a 2-core VM: 9.9 min, 2.9 CPU-min, 4.5 GB peak memory):
  python -m clip_jax.main --config=configs/vit_b32.py:local --workdir=./vit_b32_local
"""

import ml_collections

from clip_jax import recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return recipes.get_config('ViT-B/32', arg)
