r"""tiny: a 2-layer, 64-wide ViT/text CLIP that trains on a laptop CPU in minutes.

This is the embedded default of `python -m clip_jax.main` (no flags needed):
  python -m clip_jax.main --config=configs/tiny.py --workdir=./workdir
Same code paths as the big models (ViT tower, causal text tower, all-gather loss),
so it is what the tests and the quickstart run.
"""

from clip_jax import config as base


def get_config():
  return base.get_config('tiny')
