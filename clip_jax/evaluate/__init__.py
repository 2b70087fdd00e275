"""Evaluation: zero-shot classification, retrieval, linear probes (`python -m clip_jax.evaluate`).

The building blocks take plain callables and numpy arrays, so they work with any
encoder; `run_evaluations` wires them to a Flax CLIP module on a device mesh.
"""

from clip_jax.evaluate.datasets import EvalData, image_folder, open_dataset
from clip_jax.evaluate.features import TowerEncoder, encode_arrays, extract_features, host_batches
from clip_jax.evaluate.linear_probe import linear_probe
from clip_jax.evaluate.retrieval import retrieval_recall
from clip_jax.evaluate.run import (evaluate_linear_probe, evaluate_retrieval, evaluate_zeroshot,
                                   markdown_table, run_evaluations)
from clip_jax.evaluate.templates import TEMPLATE_SETS, get_templates
from clip_jax.evaluate.zeroshot import (params_fingerprint, zeroshot_accuracy,
                                        zeroshot_classifier)

__all__ = ['EvalData', 'TEMPLATE_SETS', 'TowerEncoder', 'encode_arrays', 'evaluate_linear_probe',
           'evaluate_retrieval', 'evaluate_zeroshot', 'extract_features', 'get_templates',
           'host_batches', 'image_folder', 'linear_probe', 'markdown_table', 'open_dataset',
           'params_fingerprint', 'retrieval_recall', 'run_evaluations', 'zeroshot_accuracy',
           'zeroshot_classifier']
