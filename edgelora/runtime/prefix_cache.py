"""Automatic prefix caching: the KV of prompt blocks kept after a prefill, copied into the next row
whose prompt starts the same way under the same adapter and tenant.

**Design: a block store the rows copy from, not paged KV.** KV rows are contiguous per-row buffers
that the graph writes in place and attention reads whole (``kv_cache.py``); mapping shared pages
into a row would need an attention kernel that reads a block table, which ONNX Runtime's CPU
kernels do not have. So a prefill's full prompt blocks are copied out into the store once, and a
hit copies them back into the new row, which then prefills only the rest. The cost, per cached
token: layers x 2 x KV heads x head dim x 4 bytes (24 KiB for the 0.5B bench model) copied in on
a hit and out once when first stored — a 1,000-token prefix is ~24 MB, a few milliseconds, against
seconds of prefill on a CPU — plus the store's memory, bounded by ``max_bytes`` (LRU).

**Keys.** A hash chain over blocks of ``block_tokens`` token ids: block i's key digests block i-1's
key and block i's ids, and the chain starts from a namespace: the tenant's salt and the adapter
identity — each member's name *and version* with its weight (a mix), or the base. The same ids
under another adapter, another version of one, another mix weight or another tenant never share a
key (llama.cpp #26207 and vLLM #42125 served KV computed under another adapter). A block is only
reachable through its whole chain, so a hit is always a prefix.

Only prompt tokens are cached (not generated ones): a prompt's KV comes from a prefill either way,
so a hit feeds the rest of the prompt exactly as a cold prefill of it would.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from edgelora.runtime.adapter_cache import AdapterRef

Namespace = tuple  # (salt, ((name, version, weight), ...)): what a prompt's KV depends on besides its ids


def namespace_of(salt: str | None, adapters: tuple[tuple[AdapterRef, float], ...]) -> Namespace:
    """What a row's KV depends on besides its ids: the tenant's salt and its adapter versions with weights."""
    return (salt or "", tuple((ref.name, ref.version, float(weight)) for ref, weight in adapters))


def chain_keys(namespace: Namespace, prompt: list[int], block_tokens: int) -> list[bytes]:
    """The key of every full block of ``prompt`` (block i's key covers tokens 0..(i+1) * block_tokens)."""
    digest = hashlib.sha256(repr(namespace).encode())
    keys = []
    for start in range(0, len(prompt) - block_tokens + 1, block_tokens):
        digest = hashlib.sha256(digest.digest() + np.asarray(prompt[start:start + block_tokens], np.int64).tobytes())
        keys.append(digest.digest())
    return keys


@dataclass
class PrefixStats:
    """Counters for metrics and tests (tokens, so a hit's size shows, not only that it happened)."""

    queries: int = 0  # requests looked up
    hits: int = 0  # requests that found at least one block
    query_tokens: int = 0  # prompt tokens of the requests looked up
    hit_tokens: int = 0  # prompt tokens served from the cache (not prefilled)
    stored_blocks: int = 0
    evicted_blocks: int = 0
    dropped_blocks: int = 0  # dropped because their adapter version left (replaced or unloaded)


@dataclass
class _Block:
    data: np.ndarray  # [2 x layers, kv_heads, block_tokens, head_dim]: layer 0 key, layer 0 value, ...
    refs: tuple[AdapterRef, ...]  # the adapter versions of its namespace (dropped with them)


@dataclass
class PrefixCache:
    """Blocks of prompt KV by chain key, least recently used first, within ``max_bytes``."""

    block_tokens: int
    max_bytes: int
    stats: PrefixStats = field(default_factory=PrefixStats)

    def __post_init__(self) -> None:
        if self.block_tokens < 1 or self.max_bytes < 1:
            raise ValueError("a prefix cache needs block_tokens >= 1 and max_bytes >= 1")
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()
        self._by_ref: dict[AdapterRef, set[bytes]] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def _usable(self, keys: list[bytes], prompt_len: int) -> list[bytes]:
        """The leading cached keys, leaving at least the prompt's last token to prefill (its logits give
        the first output token)."""
        found = []
        for key in keys[:max(0, (prompt_len - 1) // self.block_tokens)]:
            if key not in self._blocks:
                break
            found.append(key)
        return found

    def peek(self, keys: list[bytes], prompt_len: int) -> int:
        """Prompt tokens a lookup would find now (nothing counted, nothing touched)."""
        return len(self._usable(keys, prompt_len)) * self.block_tokens

    def lookup(self, keys: list[bytes], prompt_len: int) -> list[np.ndarray]:
        """The leading cached blocks of a prompt (``_usable``); counted in the stats, and the blocks become
        the most recently used."""
        found = self._usable(keys, prompt_len)
        for key in reversed(found):  # parents most recent: LRU evicts a chain from its tail
            self._blocks.move_to_end(key)
        self.stats.queries += 1
        self.stats.query_tokens += prompt_len
        if found:
            self.stats.hits += 1
            self.stats.hit_tokens += len(found) * self.block_tokens
        return [self._blocks[key].data for key in found]

    def missing_from(self, keys: list[bytes]) -> int:
        """Index of the first block not cached (len(keys) when all are)."""
        for index, key in enumerate(keys):
            if key not in self._blocks:
                return index
        return len(keys)

    def insert(self, key: bytes, data: np.ndarray, refs: tuple[AdapterRef, ...]) -> None:
        """Keep one block (a copy the caller made) unless it is larger than the whole budget."""
        if key in self._blocks or data.nbytes > self.max_bytes:
            return
        while self._blocks and self.bytes + data.nbytes > self.max_bytes:
            oldest = next(iter(self._blocks))
            self._remove(oldest)
            self.stats.evicted_blocks += 1
        self._blocks[key] = _Block(data, refs)
        self.bytes += data.nbytes
        for ref in refs:
            self._by_ref.setdefault(ref, set()).add(key)
        self.stats.stored_blocks += 1

    def drop(self, ref: AdapterRef) -> int:
        """Forget every block computed under this adapter version (it was replaced or unloaded)."""
        keys = [key for key in self._by_ref.pop(ref, set()) if key in self._blocks]
        for key in keys:
            self._remove(key)
        self.stats.dropped_blocks += len(keys)
        return len(keys)

    def clear(self) -> None:
        for key in list(self._blocks):
            self._remove(key)

    def _remove(self, key: bytes) -> None:
        block = self._blocks.pop(key)
        self.bytes -= block.data.nbytes
        for ref in block.refs:
            held = self._by_ref.get(ref)
            if held is not None:
                held.discard(key)
                if not held:
                    del self._by_ref[ref]
