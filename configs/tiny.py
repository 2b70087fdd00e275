r"""tiny: a 2-layer, 64-wide ViT/text CLIP that trains on a laptop CPU in minutes.

This is the embedded default of `python -m clip_jax.main` (no flags needed):
  python -m clip_jax.main --config=configs/tiny.py --workdir=./workdir
It draws the built-in scenes (clip_jax.data.builtin: shapes x colours with captions;
six colour/shape pairs never shown in training), trains for 300 steps of 256 pairs,
then evaluates on new images (clip_jax.evaluate.datasets: builtin_seen, builtin_captions,
builtin): zero-shot top-1 on seen pairs, text->image Recall@1 on captions in unseen
phrasings, and last the headline, zero-shot top-1 on the held-out pairs among all 36
with prompts such as 'a photo of a red circle.', each next to chance.
Same code paths as the big models (ViT tower, causal text tower, all-gather loss,
tf.data over TFRecord shards, orbax checkpoints).
"""

from clip_jax import config as base


def get_config():
  config = base.get_config('tiny')
  config.batch_size = 256
  config.total_steps = 300
  config.builtin.enabled = True
  # A short run: little warmup, a high peak, light decay.
  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 30
  config.optim.end_lr_factor = 0.05
  config.optim.weight_decay = 0.1
  config.data.shuffle_buffer = 2000
  config.data.cycle_length = 8
  config.eval.zeroshot = 'builtin_seen,builtin'
  config.eval.retrieval = 'builtin_captions'
  config.checkpoint.every_steps = 100
  config.log.every_steps = 25
  return config
