"""Functions the standard pickle cannot ship: lambdas and closures with and without
``pickler="cloudpickle"``, and a function defined in ``__main__`` after the pool
started its workers (in a real program, through ``python -c``)."""

import os
import pickle
import subprocess
import sys
import textwrap

import pytest

import executor_helpers as h
from forkexec import ForkExchangeExecutor
from interpreters import skip_or_fail

pytestmark = pytest.mark.timeout(90)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def need_cloudpickle():
    try:
        import cloudpickle  # noqa: F401
    except ImportError:
        skip_or_fail("cloudpickle is not installed (pip install 'forkexec[cloudpickle]')")


def test_a_lambda_fails_through_its_future_with_a_note_naming_the_option():
    with ForkExchangeExecutor(1) as ex:
        fut = ex.submit(lambda x: x + 1, 1)
        err = fut.exception(timeout=30)
        assert isinstance(err, (pickle.PicklingError, AttributeError, TypeError))
        notes = " ".join(getattr(err, "__notes__", ()))
        assert "pickling the function" in notes
        assert "pickler='cloudpickle'" in notes and "forkexec[cloudpickle]" in notes
        assert ex.submit(h.square, 3).result(timeout=30) == 9   # nothing else lost


def test_lambdas_and_closures_run_with_cloudpickle():
    need_cloudpickle()
    offset = 10

    def closure(x):
        return x + offset

    with ForkExchangeExecutor(2, pickler="cloudpickle") as ex:
        assert ex.submit(lambda x: x * 2, 21).result(timeout=30) == 42
        assert ex.submit(closure, 5).result(timeout=30) == 15
        assert list(ex.map(lambda x: -x, range(5))) == [0, -1, -2, -3, -4]
        assert list(ex.map(closure, range(300), chunksize=50)) == [i + 10 for i in range(300)]
        assert ex.submit_task(lambda: "timed", timeout=20).result(timeout=30) == "timed"
        assert ex.submit(h.square, 4).result(timeout=30) == 16   # by reference, as before


def test_pickler_option_errors_are_clear(monkeypatch):
    with pytest.raises(ValueError, match="^pickler must be 'pickle' or 'cloudpickle', not 'dill'$"):
        ForkExchangeExecutor(1, pickler="dill")
    monkeypatch.setitem(sys.modules, "cloudpickle", None)   # as if not installed
    with pytest.raises(ImportError, match=r"needs the cloudpickle package, which is not "
                                          r"installed: pip install 'forkexec\[cloudpickle\]'"):
        ForkExchangeExecutor(1, pickler="cloudpickle")


LATE_MAIN = textwrap.dedent("""
    import sys
    from forkexec import ForkExchangeExecutor

    def early(x):
        return x + 1

    with ForkExchangeExecutor(1, {options}) as ex:
        assert ex.submit(early, 1).result(timeout=30) == 2   # the workers start here

        def late(x):
            return x * 3
        globals()["late"] = late   # a module-level name, as if defined at the prompt
        late.__qualname__ = "late"
        try:
            print("RESULT", ex.submit(late, 5).result(timeout=30))
        except AttributeError as exc:
            print("ATTRIBUTEERROR", exc)
""")


def run_main(options):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", LATE_MAIN.format(options=options)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_function_defined_in_main_after_the_workers_started_gets_a_clear_error():
    out = run_main("")
    assert out.startswith("ATTRIBUTEERROR"), out
    assert "defined in __main__ after this executor started" in out
    assert "pickler='cloudpickle'" in out


def test_cloudpickle_ships_a_function_defined_in_main_after_the_workers_started():
    need_cloudpickle()
    assert run_main("pickler='cloudpickle'").split() == ["RESULT", "15"]
