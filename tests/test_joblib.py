"""forkexec.joblib: joblib.Parallel, and scikit-learn's n_jobs, on ForkExchangeExecutor.

joblib and scikit-learn are test extras: without them these tests skip, and fail under CI.
"""

import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from forkexec import RemoteTraceback, usable_cpus
from interpreters import require_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def joblib():
    joblib = require_module("joblib")
    import forkexec.joblib  # noqa: F401  (registers the backend)
    return joblib


def where(x):
    """(x squared, the name of the process that ran it)."""
    return x * x, multiprocessing.current_process().name


def fail_on(x, bad):
    if x == bad:
        raise LookupError("no item %d" % x)
    return x


def flag_from_initializer():
    return os.environ.get("FORKEXEC_TEST_FLAG")


def set_flag(value):
    os.environ["FORKEXEC_TEST_FLAG"] = value


def in_a_worker(estimator, X, y):
    """A scikit-learn scorer saying whether it ran in a forkexec worker (1.0) or not."""
    return float(multiprocessing.current_process().name.startswith("ForkExchangeWorker"))


def test_importing_registers_the_backend(joblib):
    from joblib.parallel import BACKENDS
    from forkexec.joblib import ForkExchangeBackend
    assert BACKENDS["forkexec"] is ForkExchangeBackend
    assert "forkexec" not in joblib.__file__        # forkexec/joblib.py shadows nothing


def test_results_in_order_from_forkexec_workers(joblib):
    with joblib.parallel_config(backend="forkexec", n_jobs=2):
        results = joblib.Parallel()(joblib.delayed(where)(x) for x in range(200))
    assert [value for value, _ in results] == [x * x for x in range(200)]
    assert {name.split("-")[0] for _, name in results} == {"ForkExchangeWorker"}


def test_one_job_runs_in_this_process_and_minus_one_means_every_cpu(joblib):
    from forkexec.joblib import ForkExchangeBackend
    with joblib.parallel_config(backend="forkexec", n_jobs=1):
        assert joblib.Parallel()(joblib.delayed(where)(x) for x in range(3)) == [
            (0, "MainProcess"), (1, "MainProcess"), (4, "MainProcess")]
    backend = ForkExchangeBackend()
    assert backend.effective_n_jobs(-1) == usable_cpus()
    assert backend.effective_n_jobs(None) == 1 and backend.effective_n_jobs(3) == 3
    with pytest.raises(ValueError, match=r"^n_jobs == 0 in Parallel has no meaning$"):
        backend.effective_n_jobs(0)


def test_an_exception_keeps_its_type_and_the_remote_traceback(joblib):
    with pytest.raises(LookupError, match=r"^no item 7$") as info:
        joblib.Parallel(backend="forkexec", n_jobs=2)(
            joblib.delayed(fail_on)(x, 7) for x in range(20))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fail_on" in str(info.value.__cause__)


def test_a_parallel_block_goes_on_after_a_failed_call(joblib):
    with joblib.Parallel(backend="forkexec", n_jobs=2) as parallel:
        with pytest.raises(LookupError):
            parallel(joblib.delayed(fail_on)(x, 3) for x in range(10))
        results = parallel(joblib.delayed(fail_on)(x, -1) for x in range(10))
    # joblib (1.5 and 1.6, with loky and multiprocessing too) may hand the next call a
    # late result of the aborted one: only the values are compared, not the list.
    assert set(results) == set(range(10))


@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_results_as_a_generator(joblib, return_as):
    parallel = joblib.Parallel(backend="forkexec", n_jobs=2, return_as=return_as)
    results = parallel(joblib.delayed(where)(x) for x in range(50))
    assert not isinstance(results, list)
    values = [value for value, _ in results]
    if return_as == "generator":
        assert values == [x * x for x in range(50)]
    assert sorted(values) == [x * x for x in range(50)]


@pytest.mark.filterwarnings("ignore:.*tasks have been successfully executed:UserWarning")
def test_a_generator_closed_early_leaves_nothing_running(joblib):
    results = joblib.Parallel(backend="forkexec", n_jobs=2, return_as="generator")(
        joblib.delayed(where)(x) for x in range(1000))
    value, name = next(results)
    assert value == 0 and name.startswith("ForkExchangeWorker")
    results.close()        # the autouse fixture then checks that no process is left


def test_a_timeout_stops_the_call(joblib):
    with pytest.raises(multiprocessing.TimeoutError):       # what joblib raises
        joblib.Parallel(backend="forkexec", n_jobs=2, timeout=0.5)(
            joblib.delayed(time.sleep)(60) for _ in range(2))


def test_backend_arguments_reach_the_executor(joblib):
    with joblib.parallel_config(backend="forkexec", n_jobs=2, initializer=set_flag,
                                initargs=("set by the initializer",)):
        flags = joblib.Parallel()(joblib.delayed(flag_from_initializer)() for _ in range(4))
    assert flags == ["set by the initializer"] * 4


def test_without_joblib_the_import_error_names_the_extra():
    code = "import sys; sys.modules['joblib'] = None; import forkexec.joblib"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "ImportError: forkexec.joblib needs joblib, which is not installed: "
        "pip install forkexec[joblib]")


def test_scikit_learn_cross_val_score_runs_on_forkexec(joblib):
    require_module("sklearn")
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    X, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500)
    with joblib.parallel_config(backend="forkexec"):
        ran_in_workers = cross_val_score(model, X, y, cv=3, n_jobs=2, scoring=in_a_worker)
        scores = cross_val_score(model, X, y, cv=3, n_jobs=2)
    assert list(ran_in_workers) == [1.0, 1.0, 1.0]
    assert list(scores) == list(cross_val_score(model, X, y, cv=3, n_jobs=1))
