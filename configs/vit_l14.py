r"""ViT-L/14: ViT-Large with 14 px patches, OpenAI's best 224 px model. 427,616,513 parameters.

The paper's run (its numbers: clip_jax/recipes.py) on img2dataset .tar shards, on a TPU
v5p-256 (128 chips, 256 pairs each), FSDP:
  python -m clip_jax.main --config=configs/vit_l14.py --workdir=gs://my-bucket/vit_l14 \
      --config.data.train.pattern='gs://my-bucket/shards/*.tar'
about 3.3 days (an estimate: 6.7e21 model FLOPs at 40% of the v5p's bf16 peak). Expected:
OpenAI's weights reach 75.5% zero-shot ImageNet top-1 (the run's, by
`python -m clip_jax.evaluate --workdir=gs://my-bucket/vit_l14 --task=zeroshot
--dataset=tfds:imagenet2012 --data_dir=DATA_DIR`).

FSDP shards the 6.8 GB of float32 state; the scanned stack compiles one block; remat keeps
only matmul outputs (an estimated 0.6 GiB of saved activations per pair without it, 0.23
GiB with it). The paper: 12 days on 256 V100s.

The same recipe on a CPU: 3 steps of 2 built-in scenes, then zero-shot on 2 held-out ones
(measured on a 2-core VM: 4.2 min, 4.2 CPU-min, 9.8 GB peak memory):
  python -m clip_jax.main --config=configs/vit_l14.py:local --workdir=./vit_l14_local
"""

import ml_collections

from clip_jax import recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return recipes.get_config('ViT-L/14', arg, mesh=(1, -1, 1), scan_layers=True,
                            remat_policy='dots')
