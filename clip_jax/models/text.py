"""Causal text Transformer; features at the end-of-text token."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.layers import Transformer, TransformerTower, layer_norm, logical, normal


def eot_positions(tokens: jax.Array, pool: str, eot_token_id: int) -> jax.Array:
  """Index of the end-of-text token in each row.

  'argmax' is OpenAI's rule (EOT has the largest id in CLIP's BPE vocabulary);
  'eot_id' takes the first occurrence of `eot_token_id`, for vocabularies (e.g.
  SentencePiece) where EOT is not the largest id. A row without it uses its last position.
  """
  if pool == 'argmax':
    return jnp.argmax(tokens, axis=-1)
  is_eot = tokens == eot_token_id
  first = jnp.argmax(is_eot, axis=-1)
  return jnp.where(is_eot.any(axis=-1), first, tokens.shape[-1] - 1)


class TextTransformer(TransformerTower):
  """Token + position embeddings -> causal blocks -> ln_final -> features at the EOT token."""
  context_length: int
  vocab_size: int
  width: int
  layers: int
  heads: int
  output_dim: int
  text_pool: str
  eot_token_id: int

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens: int32 [B, L], L <= context_length. Returns unnormalised [B, output_dim].

    A shorter L (a CLIPA text-length stage) runs with the first L positional embeddings
    and an L x L causal mask; L == context_length is the plain model.
    """
    if tokens.shape[1] > self.context_length:
      raise ValueError(f'TextTransformer: {tokens.shape[1]} tokens per text, more than '
                       f'config.model.text.context_length {self.context_length}')
    embedding = self.param('token_embedding', logical(normal(0.02), ('vocab', 'embed')),
                           (self.vocab_size, self.width))
    x = jnp.take(embedding, tokens, axis=0).astype(self.dtype)
    pos = self.param('positional_embedding', logical(normal(0.01), (None, 'embed')),
                     (self.context_length, self.width))
    x = x + pos[: tokens.shape[1]].astype(self.dtype)
    x = Transformer(self.layers, self.heads, causal=True, activation=self.activation,
                    dtype=self.dtype, remat_policy=self.remat_policy,
                    scan_layers=self.scan_layers, attention_impl=self.attention_impl,
                    name='transformer')(x, eot_positions(tokens, self.text_pool,
                                                         self.eot_token_id))
    x = layer_norm(self.dtype, 'ln_final')(x)                   # [B, width] at EOT
    proj = self.param('text_projection', logical(normal(self.width ** -0.5), ('embed', 'proj')),
                      (self.width, self.output_dim))
    return jnp.dot(x, proj.astype(x.dtype)).astype(jnp.float32)
