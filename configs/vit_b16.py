r"""ViT-B/16: ViT-Base with 16 px patches: 4x the image FLOPs of B/32. 149,620,737 parameters.

The paper's run (its numbers: clip_jax/recipes.py) on img2dataset .tar shards, on a TPU
v5p-256 (128 chips, 256 pairs each), data parallel:
  python -m clip_jax.main --config=configs/vit_b16.py --workdir=gs://my-bucket/vit_b16 \
      --config.data.train.pattern='gs://my-bucket/shards/*.tar'
about 17 hours (an estimate: 1.5e21 model FLOPs at 40% of the v5p's bf16 peak). Expected:
OpenAI's weights reach 68.3% zero-shot ImageNet top-1 (the run's, by
`python -m clip_jax.evaluate --workdir=gs://my-bucket/vit_b16 --task=zeroshot
--dataset=tfds:imagenet2012 --data_dir=DATA_DIR`).

The same recipe on a CPU: 3 steps of 2 built-in scenes, then zero-shot on 2 held-out ones
(measured on a 2-core VM: 3.8 min, 3.3 CPU-min, 4.7 GB peak memory):
  python -m clip_jax.main --config=configs/vit_b16.py:local --workdir=./vit_b16_local
"""

import ml_collections

from clip_jax import recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return recipes.get_config('ViT-B/16', arg)
