"""A suite's runs as Ray tasks (``suite.backend=ray``): the way to spread one suite over a
cluster's machines, behind the same interface as the process pool (``suite.execute`` consumes
an iterator of run results in completion order, so journal, resume and progress are the same).

Each run is one task of one CPU running ``runs.run_one``, the function a pool worker runs, so a
run's numbers do not depend on the backend (``tests/ray`` checks it on a two-node cluster).
What differs from the process pool:

* **Where.** ``suite.ray_address`` joins an existing cluster (every node needs servegym and the
  policies' code installed: nothing is shipped but the run's arguments and, for
  ``extra_policies``, the factory by value); without it a local instance with ``suite.jobs``
  CPUs is started on 127.0.0.1 for the suite and stopped after it.
* **Timeout.** ``suite.run_timeout_s`` is enforced the same way, by SIGALRM in the process that
  runs the task (a Ray worker runs a task on its main thread).
* **Crashes.** A worker process that dies mid-run (killed, out of memory) is recorded as that
  run's failure (error: the Ray exception's name) and the suite goes on, where a pool stops the
  suite; Ray does not retry it (``max_retries=0``) because a resumed suite retries failed runs.
* **Ctrl-C.** The runs in flight are cancelled (their workers killed); runs already finished
  are in the journal as with the pool.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from .runs import RunTask, run_one

LOCAL_NODE_IP = "127.0.0.1"
"""Where a local instance listens: a suite's own instance serves no other machine."""


def import_ray() -> Any:
    """``ray``, or an ImportError whose one line names the extra to install."""
    try:
        import ray
    except ImportError as error:
        raise ImportError(
            "suite.backend=ray needs Ray, which is not installed: pip install 'servegym[ray]'"
        ) from error
    return ray


def ray_results(tasks: Sequence[RunTask], *, address: str | None, num_cpus: int) -> Iterator[dict]:
    """Run ``tasks`` as Ray tasks; yield each result ({"row", ...} or {"failure"}) as it finishes.

    Joins the cluster at ``address`` (or the instance this process already joined), else
    starts a local instance with ``num_cpus`` CPUs and shuts it down when the iterator ends or
    is closed. Closing it early (Ctrl-C in ``suite.execute``) cancels the runs still pending."""
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        options: dict[str, Any] = {"logging_level": "WARNING", "include_dashboard": False}
        if address is None:
            options.update(num_cpus=num_cpus, _node_ip_address=LOCAL_NODE_IP)
        ray.init(address=address, **options)
        started = True
    remote_run = ray.remote(num_cpus=1, max_retries=0)(run_one)
    pending = {remote_run.remote(task): task for task in tasks}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(done[0])
            yield _result(ray, done[0], task)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def _result(ray: Any, ref: Any, task: RunTask) -> dict:
    """The run's result, or a failure record when Ray could not deliver it (its worker died)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as error:
        return {
            "failure": {
                **task.keys,
                "error": type(error).__name__,
                "message": str(error).splitlines()[0] if str(error) else "",
                "traceback": traceback.format_exc(),
            }
        }
