r"""ViT-L/14@336: ViT-L/14 trained one more epoch at 336 px. 427,944,193 parameters.

The paper's run (its numbers: clip_jax/recipes.py) on img2dataset .tar shards, on a TPU
v5p-256 (128 chips, 256 pairs each), FSDP:
  python -m clip_jax.main --config=configs/vit_l14_336.py --workdir=gs://my-bucket/vit_l14_336 \
      --config.data.train.pattern='gs://my-bucket/shards/*.tar'
about 6 hours (an estimate: 4.7e20 model FLOPs at 40% of the v5p's bf16 peak). Expected:
OpenAI's weights reach 76.6% zero-shot ImageNet top-1 (the run's, by
`python -m clip_jax.evaluate --workdir=gs://my-bucket/vit_l14_336 --task=zeroshot
--dataset=tfds:imagenet2012 --data_dir=DATA_DIR`).

577 tokens per image: remat keeps the weight matmuls' outputs but not the attention scores
(an estimated 0.26 GiB of saved activations per pair; 0.76 GiB with 'dots').

The paper's run continues the ViT-L/14 run (configs/vit_l14.py) for its 33rd epoch at 336
px. clip_jax has no config key yet to start from another run's weights (with the 16x16
position embedding interpolated to 24x24), so this command starts from random weights,
which at 2e-5 for one epoch gives nothing like OpenAI's model.

The same recipe on a CPU: 3 steps of 2 built-in scenes, then zero-shot on 2 held-out ones
(measured on a 2-core VM: 11.2 min, 6.5 CPU-min, 9.9 GB peak memory):
  python -m clip_jax.main --config=configs/vit_l14_336.py:local --workdir=./vit_l14_336_local
"""

import ml_collections

from clip_jax import recipes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return recipes.get_config('ViT-L/14@336', arg, mesh=(1, -1, 1), scan_layers=True,
                            remat_policy='dots_no_batch')
