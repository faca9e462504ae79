"""RunningLoop: the per-message shortcut for ``asyncio.get_running_loop()`` is never wrong."""

from __future__ import annotations

import asyncio
import threading

import pytest

from bastion.server.storage.interfaces import RunningLoop


def test_it_is_the_running_loop_of_the_calling_thread_whatever_ran_before() -> None:
    cache = RunningLoop()

    async def which() -> bool:
        return cache.get() is asyncio.get_running_loop()

    assert asyncio.run(which())
    assert asyncio.run(which())  # a second loop on the same thread, after the first closed
    seen: list[bool] = []

    def other_thread() -> None:
        seen.append(asyncio.run(which()))

    async def while_another_thread_runs_a_loop() -> bool:
        thread = threading.Thread(target=other_thread)
        thread.start()
        await asyncio.to_thread(thread.join)
        return await which()

    assert asyncio.run(while_another_thread_runs_a_loop())
    assert seen == [True]
    with pytest.raises(RuntimeError):
        cache.get()  # no loop runs here
