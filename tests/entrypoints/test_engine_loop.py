"""The engine thread's adapter lifecycle as Ray's multiplexer drives it (no Ray needed).

An eviction (``release_adapter``) while a row decodes with the adapter must wait for that row; a
re-add of the same version during the wait (the loader again, or a request carrying the adapter's
folder and version) must succeed without reading the files again; after the rows finish, an
evicted adapter is really gone.
"""

from __future__ import annotations

import asyncio

import pytest

from edgelora.entrypoints.server import ServeOptions, engine_settings
from edgelora.entrypoints.server.engine_loop import EngineLoop, UnknownAdapter
from edgelora.entrypoints.server.metrics import ServerMetrics
from edgelora.runtime.sampling import SamplingParams
from edgelora.runtime.scheduler import GenerationRequest

PROMPT = [5, 6, 7, 8]


def _long(adapter: str, tokens: int = 120) -> GenerationRequest:
    return GenerationRequest(PROMPT, adapter, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))


async def _finish(stream) -> list:
    updates = []
    while not (updates and updates[-1].finished):
        item = await asyncio.wait_for(stream.queue.get(), 60)
        assert not isinstance(item, Exception), item
        updates.append(item)
    return updates


async def _lifecycle(onnx_dir, folder) -> None:
    engine = EngineLoop(engine_settings(ServeOptions(onnx_dir=onnx_dir, max_loras=2, max_lora_rank=16,
                                                        max_cpu_loras=2, threads=1), {}),
                        ServerMetrics())
    await asyncio.to_thread(engine.start)
    engine.bind_loop(asyncio.get_running_loop())
    try:
        version = (await engine.load_adapter("a1", folder, read=True)).version
        running = await engine.submit("r1", _long("a1"), "a1", 0.0)
        await running.queue.get()  # its row decodes now
        engine.release_adapter("a1", version)  # Ray evicts it
        # a request carrying the folder and version registers it again in the same step: r1 holds those
        # bytes, so it is a re-add from memory, not a new load
        again = await engine.submit("r2", _long("a1", 4), "a1", 0.0, adapter_folder=folder, adapter_version=version)
        assert not again.loaded_adapter
        assert (await engine.load_adapter("a1", folder, read=True, version=version)).previous == version
        assert len(await _finish(running)) >= 1 and (await _finish(again))[-1].completion_tokens == 4
        later = await engine.submit("r3", _long("a1", 2), "a1", 0.0)  # the removal was cancelled
        await _finish(later)

        busy = await engine.submit("r4", _long("a1"), "a1", 0.0)
        await busy.queue.get()
        engine.release_adapter("a1", "0" * 16)  # an eviction of another version: a no-op
        engine.release_adapter("a1", version)
        with pytest.raises(UnknownAdapter):  # gone for new requests at once
            await engine.submit("r5", _long("a1", 2), "a1", 0.0)
        assert (await _finish(busy))[-1].finish_reason == "length"  # its row finished all the same
        back = await engine.submit("r6", _long("a1", 2), "a1", 0.0, adapter_folder=folder, adapter_version=version)
        assert back.loaded_adapter  # it had really been removed once the row was done
        await _finish(back)
        engine.release_adapter("not-there")  # a no-op, not an error
        await _finish(await engine.submit("r7", _long(None, 2), "base", 0.0))
    finally:
        engine.stop()


def test_eviction_waits_for_rows_and_a_re_add_during_the_wait_succeeds(exported_samples):
    sample = exported_samples["qwen2"]
    asyncio.run(_lifecycle(sample.onnx_dir, sample.processed["a1"]))
