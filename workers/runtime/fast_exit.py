"""End a worker child once its orderly shutdown is over, without the interpreter's teardown.

After Celery's warm shutdown has returned (in-flight jobs finished, their results, statuses and acks
written, prefetched messages handed back to the broker) and the runtime's own threads are stopped, nothing
is left to persist, yet a child that imported torch (and vLLM) spends a second or more in interpreter
teardown: module and object finalisation of a few hundred modules. A node's stop, and every test that
stops one, waits for it (bench/worker_stop.py, bench/RESULTS.md).

`exit_without_teardown` does the part of Python's own exit sequence that has effects outside the process,
in the same order, then `os._exit`:
1. join every non-daemon thread and run `threading`'s exit hooks (a ThreadPoolExecutor's join);
2. run the `atexit` handlers: `logging.shutdown` (handlers flushed and closed), the OpenTelemetry SDK's
   span flush, multiprocessing's joins;
3. flush stdout and stderr.
What is skipped is freeing memory and running finalisers of objects still alive: sockets and files are
closed by the kernel at exit, and prometheus-client's multiprocess files are shared mmaps already written.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading


def exit_code(code: object) -> int:
    """The status `sys.exit(code)` would give: None -> 0, an int as is, anything else printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


def exit_without_teardown(code: object = 0) -> None:
    """Exit now with `code` (as `sys.exit` takes it) after joining threads, atexit handlers and a flush.

    Call it from the main thread only, once nothing else of the orderly shutdown is left to do."""
    status = exit_code(code)
    # Python's finalisation calls threading._shutdown first: non-daemon threads joined, the exit hooks of
    # concurrent.futures run. Private, but the interpreter itself looks it up by this name in every version.
    shutdown_threads = getattr(threading, "_shutdown", None)
    if shutdown_threads is not None:
        shutdown_threads()
    else:  # pragma: no cover - an interpreter without it: join what we can see
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    os._exit(status)
