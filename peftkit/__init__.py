"""peftkit: parameter-efficient fine-tuning of Hugging Face models from YAML recipes."""

__version__ = "0.1.0"
