__version__ = "0.0.1"


def __getattr__(name):
    "`tpad.predict` (from `tpad.msbr`), imported on first use so that `import tpad` stays light."
    if name == 'predict':
        from .msbr import predict
        return predict
    raise AttributeError(f"module 'tpad' has no attribute {name!r}")
