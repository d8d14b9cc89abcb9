"""The gate between forward passes and a load's default-dtype switch, on its own (the servicer-level races are in
test_hardening)."""

from __future__ import annotations

import threading

from qwen_asr_worker.torch_state import ForwardGate


def test_a_loader_waits_for_running_passes_and_keeps_new_ones_out() -> None:
    gate = ForwardGate()
    in_pass, finish_pass, held, second_started = (threading.Event() for _ in range(4))
    order: list[str] = []

    def forward() -> None:
        with gate.shared():
            in_pass.set()
            finish_pass.wait(10)
            order.append("first pass done")

    def loader() -> None:
        gate.hold()
        order.append("loader holds")
        held.set()
        second_started.wait(0.3)  # a pass that started now would be a violation
        order.append("loader releases")
        gate.release()

    def second() -> None:
        with gate.shared():
            second_started.set()
            order.append("second pass runs")

    first = threading.Thread(target=forward)
    first.start()
    assert in_pass.wait(10)
    load = threading.Thread(target=loader)
    load.start()
    assert not held.wait(0.2)  # the running pass keeps the loader waiting
    late = threading.Thread(target=second)
    late.start()
    assert not second_started.wait(0.2)  # a waiting loader keeps new passes out
    finish_pass.set()
    for thread in (first, load, late):
        thread.join(10)
    assert order == ["first pass done", "loader holds", "loader releases", "second pass runs"]
    assert not gate.held


def test_hold_is_per_thread_and_idempotent() -> None:
    gate = ForwardGate()
    gate.hold()
    gate.hold()  # a nested from_config inside from_pretrained: no self-deadlock
    assert gate.held
    other = threading.Thread(target=gate.release)  # another thread cannot release it
    other.start()
    other.join(10)
    assert gate.held
    gate.release()
    assert not gate.held
    gate.release()  # releasing when not held is harmless
    with gate.shared():
        pass
