"""Put on PYTHONPATH by run_cpython_futures_suite.py for the Python processes CPython's
tests start (``python -c "from concurrent.futures import <executor_type.__name__>"``):
``concurrent.futures.ForkExchangeExecutor`` resolves to forkexec's executor, lazily."""

import os

if os.environ.get("FORKEXEC_CPYTHON_SUITE"):
    import concurrent.futures as _cf

    _original_getattr = _cf.__getattr__

    def __getattr__(name, _original=_original_getattr):
        if name == "ForkExchangeExecutor":
            from forkexec import ForkExchangeExecutor
            return ForkExchangeExecutor
        return _original(name)

    _cf.__getattr__ = __getattr__
