"""Evaluation: zero-shot classification, retrieval, linear probes, benchmark suites
(`python -m clip_jax.evaluate`).

The building blocks take plain callables and numpy arrays, so they work with any
encoder; `run_evaluations` wires them to a Flax CLIP module on a device mesh.
"""

from clip_jax.evaluate.datasets import EvalData, image_folder, open_dataset
from clip_jax.evaluate.features import TowerEncoder, encode_arrays, extract_features, host_batches
from clip_jax.evaluate.linear_probe import linear_probe
from clip_jax.evaluate.retrieval import retrieval_recall
from clip_jax.evaluate.run import (evaluate_linear_probe, evaluate_retrieval, evaluate_zeroshot,
                                   markdown_table, run_evaluations)
from clip_jax.evaluate.suite import SUITES, load_suite, run_suite
from clip_jax.evaluate.templates import TEMPLATE_SETS, get_templates
from clip_jax.evaluate.wds import read_layout, wds_dataset
from clip_jax.evaluate.zeroshot import (params_fingerprint, zeroshot_accuracy,
                                        zeroshot_classifier)

__all__ = ['EvalData', 'SUITES', 'TEMPLATE_SETS', 'TowerEncoder', 'encode_arrays',
           'evaluate_linear_probe', 'evaluate_retrieval', 'evaluate_zeroshot', 'extract_features',
           'get_templates', 'host_batches', 'image_folder', 'linear_probe', 'load_suite',
           'markdown_table', 'open_dataset', 'params_fingerprint', 'read_layout',
           'retrieval_recall', 'run_evaluations', 'run_suite', 'wds_dataset',
           'zeroshot_accuracy', 'zeroshot_classifier']
