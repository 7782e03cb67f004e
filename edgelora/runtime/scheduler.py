"""Splitting requests into batches: up to max_batch_size rows, whatever their adapters."""

from __future__ import annotations

from edgelora.runtime.engine import RowRequest


def plan_batches(rows: list[RowRequest], max_batch_size: int, max_loras: int) -> list[list[int]]:
    """Row indices per batch, in request order; a batch never needs more adapters than slots."""
    batches: list[list[int]] = []
    current: list[int] = []
    adapters: set[str] = set()
    for index, row in enumerate(rows):
        needs_slot = row.adapter is not None and row.adapter not in adapters
        if current and (len(current) == max_batch_size or (needs_slot and len(adapters) == max_loras)):
            batches.append(current)
            current, adapters = [], set()
        current.append(index)
        if row.adapter is not None:
            adapters.add(row.adapter)
    if current:
        batches.append(current)
    return batches
