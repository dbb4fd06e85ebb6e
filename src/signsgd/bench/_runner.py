"""Child side of :func:`signsgd.bench.netem.launch`: runs ``spawn`` inside the namespace.

Usage (internal): ``python -m signsgd.bench._runner JOB.pkl OUT.pkl``. ``JOB.pkl`` holds the
parent's ``sys.path`` then ``(fn, world_size, args, spawn_kwargs)``; ``OUT.pkl`` receives
``(True, results)``, ``(False, exception)`` or
``(False, ("WorkerError", message, failures))``.
"""

from __future__ import annotations

import pickle
import signal
import sys


def _on_term(signum: int, frame: object) -> None:
    # Unwind through spawn's finally (which terminates the workers), then exit.
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    """Run the job in ``argv[0]``, write its outcome to ``argv[1]``; return an exit code."""
    if len(argv) != 2:
        print("usage: python -m signsgd.bench._runner JOB.pkl OUT.pkl", file=sys.stderr)
        return 2
    job_path, out_path = argv
    signal.signal(signal.SIGTERM, _on_term)
    with open(job_path, "rb") as f:
        for p in reversed(pickle.load(f)):
            if p not in sys.path:
                sys.path.insert(0, p)
        fn, world_size, args, kwargs = pickle.load(f)
    from signsgd.distributed.launch import WorkerError, spawn

    try:
        outcome: tuple[bool, object] = (True, spawn(fn, world_size, args, **kwargs))
    except WorkerError as exc:  # its __init__ takes two arguments: send them
        outcome = (False, ("WorkerError", str(exc), exc.failures))
    except Exception as exc:  # noqa: BLE001 - handed to the parent, which re-raises it
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:  # noqa: BLE001
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        outcome = (False, exc)
    with open(out_path, "wb") as f:
        pickle.dump(outcome, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
