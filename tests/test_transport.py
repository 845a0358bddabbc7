"""The fast paths of the transport: framing, out-of-band buffers, shared memory for
large results, plain-pickle-first task pickling, direct dispatch to an idle worker,
and the stack dump that ends at the bootstrap frame.

None of these may change what a caller sees; these tests pin that down.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from _oob_blob import Blob
from conftest import ROOT

from pgexecutor import ProcessGroupExecutor, TaskTimeoutError
from pgexecutor import _protocol as proto

T = 60


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(256)) * (n // 256) + bytes(n % 256)


def echo_blob(blob: Blob) -> Blob:
    return blob


def bump_blob(blob: Blob) -> tuple[bool, Blob]:
    """Change the received buffer in place: it must be writable."""
    view = memoryview(blob.data).cast("B")
    writable = not view.readonly
    if writable:
        view[0] = (view[0] + 1) % 256
    return writable, blob


def make_blobs(sizes: list[int]) -> list[Blob]:
    return [Blob(bytearray(pattern(n, i))) for i, n in enumerate(sizes)]


def add(a: int, b: int) -> int:
    return a + b


def sleep_forever() -> None:
    time.sleep(1000)


# ------------------------------------------------------------------ framing


def test_frame_reader_reassembles_frames_split_anywhere():
    frames = [(proto.RESULT, 7, b"x" * 10), (proto.ERROR, 8, b""), (proto.RESULT, 9, b"y" * 300)]
    data = b"".join(proto.frame(k, i, p) for k, i, p in frames)
    for step in (1, 2, 7, 16, 17, 1000):
        reader = proto.FrameReader()
        got = []
        for pos in range(0, len(data), step):
            got += reader.feed(data[pos : pos + step])
        assert [(k, i, bytes(p)) for k, i, p in got] == frames
        assert reader.pending() == 0


def test_frame_reader_reads_a_large_frame_straight_into_its_own_buffer():
    big = pattern(3 << 20, 5)
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        reader = proto.FrameReader()
        payload = proto.frame(proto.RESULT, 1, b"small") + proto.frame(proto.RESULT, 2, big)
        got = []
        pos = 0
        while len(got) < 2:
            if pos < len(payload):
                try:
                    pos += os.write(w, payload[pos : pos + (1 << 20)])
                except BlockingIOError:
                    pass  # full: read first
            frames = reader.read_from(r)
            assert frames is not None
            got += frames
        assert bytes(got[0][2]) == b"small"
        assert isinstance(got[1][2], bytearray) and got[1][2] == big
    finally:
        os.close(r)
        os.close(w)


def test_oob_payload_round_trip_keeps_buffers_aligned_and_writable():
    blobs = make_blobs([1 << 16, 5, 1 << 17])
    out = proto.dumps_task((echo_blob, (blobs,), {}))
    assert isinstance(out, proto.OOBPayload)  # the two large buffers travel apart
    payload = b"".join(bytes(memoryview(p).cast("B")) for p in out.parts)
    assert len(payload) == out.size
    fn, (back,), kwargs = proto.loads_oob(bytearray(payload))
    assert fn is echo_blob and kwargs == {}
    assert [bytes(b.data) for b in back] == [bytes(b.data) for b in blobs]
    for b in back:
        view = memoryview(b.data)
        if view.nbytes >= proto.OOB_MIN:
            assert not view.readonly


# ------------------------------------------------------------------ large payloads


@pytest.mark.parametrize("mp_context", [None, "spawn"], ids=["fresh", "spawn"])
def test_large_buffers_both_ways(mp_context):
    # 3 MiB comes back by shared memory (fresh workers on Linux), 100 KiB by the
    # pipe, out of band; 100 bytes in the pickle itself.
    sizes = [3 << 20, 100 << 10, 100]
    with ProcessGroupExecutor(2, mp_context=mp_context) as ex:
        blobs = make_blobs(sizes)
        back = list(ex.map(echo_blob, blobs))
        assert [bytes(b.data) for b in back] == [bytes(b.data) for b in blobs]
        for big in make_blobs([3 << 20, 200 << 10]):
            writable, changed = ex.submit(bump_blob, big).result(timeout=T)
            assert writable, "a task's large argument must be writable, as after pickle"
            assert bytes(changed.data)[1:] == bytes(big.data)[1:]
            assert bytes(changed.data)[0] == (bytes(big.data)[0] + 1) % 256
            view = memoryview(changed.data)
            assert not view.readonly


def test_a_large_argument_is_not_changed_by_the_task():
    original = pattern(2 << 20, 3)
    blob = Blob(bytearray(original))
    with ProcessGroupExecutor(1) as ex:
        ex.submit(bump_blob, blob).result(timeout=T)
    assert bytes(blob.data) == original


def _fds_but_arenas() -> int:
    """Our open fds, less those of argument arenas (one per worker once it got large
    arguments, made when first needed: see test_payload_shm)."""
    if not os.path.isdir("/proc/self/fd"):
        return 0
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "pgexecutor-args" not in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


def test_many_large_results_do_not_leak_file_descriptors():
    with ProcessGroupExecutor(2) as ex:
        list(ex.map(echo_blob, make_blobs([2 << 20] * 4)))  # both workers started
        before = _fds_but_arenas()
        for _ in range(3):
            results = list(ex.map(echo_blob, make_blobs([2 << 20] * 8)))
            assert len(results) == 8
            del results
        after = _fds_but_arenas()
    assert after == before


# ------------------------------------------------------------------ task pickling


def test_functions_and_classes_of_main_still_travel_by_value(tmp_path):
    script = tmp_path / "main_script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {ROOT!r})
            from pgexecutor import ProcessGroupExecutor

            class Point:
                def __init__(self, x):
                    self.x = x

            def double(p):
                return Point(p.x * 2)

            if __name__ == "__main__":
                with ProcessGroupExecutor(2) as ex:
                    print(ex.submit(double, Point(21)).result(timeout=60).x)
                    print(list(ex.map(double, [Point(1), Point(2)], chunksize=2))[1].x)
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["42", "4"]


def test_plain_pickle_is_used_only_when_it_matches_cloudpickle():
    assert b"cloudpickle" not in proto.dumps_task((add, (1, 2), {}))
    assert b"cloudpickle" in proto.dumps_task((lambda: 1, (), {}))


# ------------------------------------------------------------------ direct dispatch


def test_sequential_submits_and_timeouts_mix():
    # Submits to an idle worker go straight to it; one with a timeout must still go
    # through the manager, which has to wake for its deadline.
    with ProcessGroupExecutor(2, kill_grace=0.2) as ex:
        for i in range(200):
            assert ex.submit(add, i, 1).result(timeout=T) == i + 1
        hung = ex.options(task_timeout=0.3).submit(sleep_forever)
        t0 = time.monotonic()
        with pytest.raises(TaskTimeoutError):
            hung.result(timeout=T)
        assert time.monotonic() - t0 < 10
        for i in range(50):
            assert ex.submit(add, i, 2).result(timeout=T) == i + 2


def test_submits_from_many_threads_all_complete():
    import threading

    with ProcessGroupExecutor(2) as ex:
        results: dict[int, list[int]] = {}

        def run(k: int) -> None:
            results[k] = [ex.submit(add, k, i).result(timeout=T) for i in range(100)]

        threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(T)
        assert results == {k: [k + i for i in range(100)] for k in range(4)}


# ------------------------------------------------------------------ stack dumps


def test_timeout_stack_dump_is_whole():
    with ProcessGroupExecutor(1, kill_grace=0.2) as ex:
        ex.submit(add, 1, 1).result(timeout=T)  # the worker has imported this module
        with pytest.raises(TaskTimeoutError) as info:
            ex.options(task_timeout=0.3).submit(sleep_forever).result(timeout=T)
    stack = info.value.stack or ""
    assert "sleep_forever" in stack
    # The dump ends with the outermost frame of the worker's main thread.
    assert stack.rstrip().endswith("in <module>"), stack


def test_a_module_registered_by_value_after_the_first_submit_travels_by_value():
    """The registry of modules pickled by value is looked up once and used in every
    submit: a module registered later (here: one no worker could import) must still
    make its functions travel by value."""
    import types

    import cloudpickle

    module = types.ModuleType("pgx_parent_only_module")
    exec("def triple(x):\n    return 3 * x\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        with ProcessGroupExecutor(max_workers=1) as ex:
            assert ex.submit(abs, -2).result(T) == 2  # the registry is looked up now
            with pytest.raises(ModuleNotFoundError):  # by reference: no worker has it
                ex.submit(module.triple, 2).result(T)
            cloudpickle.register_pickle_by_value(module)
            try:
                assert ex.submit(module.triple, 2).result(T) == 6
                assert list(ex.map(module.triple, [1, 2])) == [3, 6]
            finally:
                cloudpickle.unregister_pickle_by_value(module)
    finally:
        del sys.modules[module.__name__]
