"""Packaging of crem-hf. Tool settings (ruff, pytest) live in pyproject.toml."""

from setuptools import find_packages, setup

# The transformers range the test suite runs against: the Qwen2-VL internals CREM builds on (the `cache=` keyword,
# `get_rope_index`, the language_model key layout) changed between minor releases before.
TRANSFORMERS = "transformers>=5.24.0,<5.25"

setup(
    name="crem-hf",
    version="0.1.0",
    description="CREM: one Qwen2-VL model for multimodal embeddings and (compressed) generation, for Transformers.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"crem_hf": ["model_card_template.md", "st_module.py", "backbone_configs/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        TRANSFORMERS,
        "tokenizers>=0.22",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "pillow>=10.0",
        "numpy>=1.26",
        "tqdm>=4.66",
    ],
    extras_require={
        "train": ["peft>=0.17", "accelerate>=1.10", "datasets>=4.0"],
        "eval": ["datasets>=4.0", "matplotlib>=3.8", "scikit-learn>=1.5", "scikit-image>=0.24"],
        "hub": ["sentence-transformers>=6.0"],
        "demo": ["gradio>=6.0", "matplotlib>=3.8", "scikit-learn>=1.5", "lancedb>=0.40"],
        "mteb": ["mteb>=2.26,<3"],
        "memory": ["lancedb>=0.40"],
        "dev": [
            "lancedb>=0.40",
            "moto[server]>=5.0",
            "boto3>=1.34",
            "sentence-transformers>=6.0",
            "mteb>=2.26,<3",
            "peft>=0.17",
            "accelerate>=1.10",
            "datasets>=4.0",
            "pytest>=8.0",
            "ruff>=0.6",
            "scikit-learn>=1.5",
            "scikit-image>=0.24",
            "matplotlib>=3.8",
            "gradio>=6.0",
            "playwright>=1.50",
        ],
    },
    entry_points={
        "console_scripts": [
            "crem-quickstart=crem_hf.quickstart:main",
            "crem-eval=crem_hf.evaluation.cli:main",
            "crem-export=crem_hf.hub:main",
            "crem-demo=crem_hf.demo.app:main",
            "crem-memory=crem_hf.memory.cli:main",
        ]
    },
)
