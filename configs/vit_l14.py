r"""ViT-L/14: ViT-Large with 14 px patches, OpenAI's best 224 px model. 427,616,513 parameters (OpenAI's count, checked by tests).

Run (TPU pod or GPU cluster; data from img2dataset shards):
  python -m clip_jax.main --config=configs/vit_l14.py --workdir=gs://BUCKET/vit_l14 \
      --config.data.train.pattern='gs://BUCKET/shards/{00000..41407}.tar'

The paper's recipe: global batch 32,768, 32 epochs of 400M pairs (about 390k steps),
peak learning rate 4e-4, AdamW (0.9, 0.98), weight decay 0.2, 2,000 warmup steps,
cosine decay, mixed precision. OpenAI's released weights reach 75.5% zero-shot
ImageNet top-1 (`python -m clip_jax.evaluate`); a LAION-400M run of this recipe
lands a few points below or above depending on the data.
"""

from clip_jax import config as base


def get_config():
  return base.get_config('ViT-L/14', scan_layers=True, remat_policy='dots')
