"""awqflow.kernels: the Triton W4A16 kernels and their torch reference."""

if __name__ == "kernels":
    # Python run from the repository root (python -m ..., a Prefect worker's flow run) finds this folder as
    # the top-level package `kernels`, a name that belongs to Hugging Face's kernels package, which
    # transformers imports at start-up: load that package in this one's place.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    )
    if _spec is None:
        # not installed: look like what Python makes of a bare folder (a namespace package, no __file__),
        # which transformers takes for a shadow on sys.path, not an installed package
        del globals()["__file__"]
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
