"""mimjepa: MIM-JEPA pretraining with the SCOTT sparse convolutional tokenizer."""

__version__ = "0.1.0"
