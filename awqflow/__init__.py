"""awqflow: activation-aware weight quantization as a Prefect pipeline."""

__version__ = "0.1.0"


def __getattr__(name):
    # the API pulls in torch and transformers: import it only when asked for
    if name == "AWQModel":
        from awqflow.api import AWQModel

        return AWQModel
    raise AttributeError(name)
