"""ftkit: fine-tune Hugging Face causal LMs from one YAML recipe."""

__version__ = "0.1.0"
