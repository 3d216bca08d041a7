"""The paged KV cache's bookkeeping: blocks, block tables and the prefix cache.

A backend holds one KV pool of `num_blocks` blocks of `block_size` positions
per layer; this module decides which block holds which positions of which
sequence. A sequence owns a block table (physical block ids in position
order); position p of the sequence lives in block table[p // block_size] at
offset p % block_size.

Prefix caching: a block whose positions are all written is *full*, and a full
block is keyed by a hash chain, hash(parent block's key, the block's token
ids), so one key names one whole prefix. A new sequence looks its prompt up
block by block and shares every cached block of its longest cached prefix
(reference counted) instead of computing it again. A block nobody references
stays cached until its memory is needed: free blocks that were never cached
are used first, then cached ones, least recently released first.

Everything here runs on the scheduler's thread (one owner), so nothing locks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np

# Positions per block. 16 keeps the waste of a sequence's last, partly
# filled block small while a block of one kv head (16 x head_dim bf16) is
# still a whole number of 512-byte rows for the attention kernels.
DEFAULT_BLOCK_SIZE = 16


def _chain_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.digest()


class SeqBlocks:
    """One sequence's blocks: its table and the keys of its leading full blocks."""

    __slots__ = ("table", "keys", "released")

    def __init__(self) -> None:
        self.table: List[int] = []
        self.keys: List[bytes] = []  # chain keys of the full blocks table[:len(keys)]
        self.released = False

    def __len__(self) -> int:
        return len(self.table)


class OutOfBlocks(Exception):
    """The pool has no free block left (the scheduler preempts and retries)."""


class KVBlockManager:
    """Allocation, reference counts and the prefix cache of one KV pool."""

    def __init__(self, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE, prefix_cache: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        self.prefix_cache = bool(prefix_cache)
        self._refs = [0] * self.num_blocks
        self._key_of: List[Optional[bytes]] = [None] * self.num_blocks
        # Never-cached free blocks (a stack: recently freed memory is reused first).
        self._free: List[int] = list(range(self.num_blocks - 1, -1, -1))
        # Cached blocks nobody references, least recently released first.
        self._idle: "OrderedDict[int, None]" = OrderedDict()
        self._cached: Dict[bytes, int] = {}
        self.lookups = 0  # prompt tokens looked up in the prefix cache
        self.hits = 0  # of those, tokens found cached
        self.evictions = 0

    # ------------------------------------------------------------------ facts

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation may take now (never used, or cached and idle)."""
        return len(self._free) + len(self._idle)

    @property
    def used_blocks(self) -> int:
        """Blocks some sequence references."""
        return self.num_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        """Blocks that hold a cached prefix (referenced or idle)."""
        return len(self._cached)

    def blocks_for(self, positions: int) -> int:
        """Blocks that cover `positions` positions."""
        return -(-int(positions) // self.block_size)

    def stats(self) -> dict:
        """Counters for metrics."""
        return {
            "kv_blocks_total": self.num_blocks,
            "kv_blocks_used": self.used_blocks,
            "kv_blocks_free": self.free_blocks,
            "kv_blocks_cached": self.cached_blocks,
            "kv_block_size": self.block_size,
            "prefix_cache_lookup_tokens": self.lookups,
            "prefix_cache_hit_tokens": self.hits,
            "prefix_cache_evictions": self.evictions,
        }

    # ------------------------------------------------------------------ sequences

    def open(self, prompt: Sequence[int]) -> "tuple[SeqBlocks, int]":
        """A new sequence for `prompt`, sharing its longest cached prefix.

        Returns the sequence and how many leading prompt positions are
        already in the cache. The last prompt token is never taken from the
        cache: it must run to produce the first logits.
        """
        seq = SeqBlocks()
        if not self.prefix_cache:
            return seq, 0
        bs = self.block_size
        usable = (len(prompt) - 1) // bs
        self.lookups += len(prompt)
        parent = b""
        for i in range(usable):
            key = _chain_key(parent, prompt[i * bs : (i + 1) * bs])
            block = self._cached.get(key)
            if block is None:
                break
            self._ref(block)
            seq.table.append(block)
            seq.keys.append(key)
            parent = key
        n = len(seq.table) * bs
        self.hits += n
        return seq, n

    def ensure(self, seq: SeqBlocks, positions: int) -> None:
        """Grow seq's table to cover `positions` positions; OutOfBlocks if the pool is short.

        On failure nothing is taken: the table keeps its old length.
        """
        need = self.blocks_for(positions) - len(seq.table)
        if need <= 0:
            return
        if need > self.free_blocks:
            raise OutOfBlocks(f"{need} KV blocks needed, {self.free_blocks} free")
        for _ in range(need):
            seq.table.append(self._take())

    def commit(self, seq: SeqBlocks, tokens: Sequence[int], written: int) -> None:
        """Record that positions [0, written) of seq hold `tokens[:written]`: full blocks become cached."""
        bs = self.block_size
        if not self.prefix_cache or written // bs <= len(seq.keys):
            return  # no block filled since the last commit
        full = min(written // bs, len(seq.table))
        parent = seq.keys[-1] if seq.keys else b""
        for i in range(len(seq.keys), full):
            key = _chain_key(parent, tokens[i * bs : (i + 1) * bs])
            block = seq.table[i]
            have = self._cached.get(key)
            if have is None and self._key_of[block] is None:
                self._cached[key] = block
                self._key_of[block] = key
            # else: another sequence cached the same prefix first; this copy
            # stays private and is freed with the sequence.
            seq.keys.append(key)
            parent = key

    def release(self, seq: SeqBlocks) -> None:
        """Drop the sequence's references; cached blocks stay reusable until evicted."""
        if seq.released:
            return
        seq.released = True
        # Release the tail first so the head of a prefix stays cached longest.
        for block in reversed(seq.table):
            self._unref(block)
        seq.table = []
        seq.keys = []

    def clear_cache(self) -> None:
        """Forget every idle cached prefix (referenced blocks stay with their sequences)."""
        for block in list(self._idle):
            self._forget(block)
            self._free.append(block)
        self._idle.clear()

    # ------------------------------------------------------------------ internals

    def _ref(self, block: int) -> None:
        if self._refs[block] == 0:
            self._idle.pop(block, None)
        self._refs[block] += 1

    def _unref(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] > 0:
            return
        if self._key_of[block] is not None:
            self._idle[block] = None
            self._idle.move_to_end(block)
        else:
            self._free.append(block)

    def _forget(self, block: int) -> None:
        key = self._key_of[block]
        if key is not None:
            self._key_of[block] = None
            if self._cached.get(key) == block:
                del self._cached[key]

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._idle.popitem(last=False)
            self._forget(block)
            self.evictions += 1
        self._refs[block] = 1
        return block
