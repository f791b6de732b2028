"""awqflow: activation-aware weight quantization as a Prefect pipeline."""

__version__ = "0.1.0"
