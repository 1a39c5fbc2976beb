"""BlockManager: the paged KV cache's bookkeeping (which block holds which tokens of which sequence).

The pool has `num_blocks` blocks of `tokens_per_block` token slots. Every block is in exactly one state:
- used: referenced by at least one live sequence's block table (`ref_count` = number of such tables);
- cached: no table references it, but it holds a full, computed block whose content is registered by
  hash, so a later request with the same prefix can take it instead of recomputing; evicted LRU-first;
- free: no content worth keeping.
Prefix caching keys a full block by sha256(parent block's key + its token ids), so equal keys mean an
equal whole prefix, not just an equal block. No torch here; the runner writes K/V where tables point.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter, OrderedDict

from quantlab.engine.sequence import Sequence


def block_key(parent: bytes, token_ids: list[int]) -> bytes:
    """The prefix-cache key of a full block: deterministic across runs and machines (little-endian int64)."""
    return hashlib.sha256(parent + struct.pack(f"<{len(token_ids)}q", *token_ids)).digest()


class BlockManager:
    """Allocates, grows, shares and frees per-sequence block tables; counts prefix-cache hits in tokens."""

    def __init__(self, num_blocks: int, tokens_per_block: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or tokens_per_block < 1:
            raise ValueError(f"num_blocks and tokens_per_block must be >= 1 (got {num_blocks}, {tokens_per_block})")
        self.num_blocks = num_blocks
        self.tokens_per_block = tokens_per_block
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._key_of: list[bytes | None] = [None] * num_blocks   # the key a block is registered under
        self._block_of: dict[bytes, int] = {}                    # key -> block (used or cached)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()     # LRU first
        self._seqs: dict[str, Sequence] = {}                     # sequences holding blocks
        self._keys: dict[str, list[bytes]] = {}                  # keys of each one's full computed blocks
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take: free ones plus cached ones it may evict."""
        return len(self._free) + len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of the pool referenced by live sequences (0..1)."""
        return (self.num_blocks - self.num_free_blocks) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_block)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of `seq`, longest first match; nothing is taken yet.

        The last token is never matched: its logits are needed, so at least one token is computed.
        """
        if not self.enable_prefix_caching:
            return []
        matched, key = [], b""
        for i in range((seq.num_tokens - 1) // self.tokens_per_block):
            key = block_key(key, seq.token_ids[i * self.tokens_per_block:(i + 1) * self.tokens_per_block])
            block = self._block_of.get(key)
            if block is None:
                break
            matched.append(block)
        return matched

    def can_allocate(self, matched: list[int], num_tokens: int) -> bool:
        """Whether `allocate(seq, matched, num_tokens)` would succeed (cached matches cost a block each)."""
        cost = sum(self.ref_counts[b] == 0 for b in matched) + self.blocks_for(num_tokens) - len(matched)
        return cost <= self.num_free_blocks

    def allocate(self, seq: Sequence, matched: list[int], num_tokens: int) -> None:
        """Give a sequence without blocks its table: the matched prefix shared, then fresh blocks up to
        `num_tokens` slots. Sets `num_computed_tokens` and `num_cached_tokens` to the matched length."""
        assert not seq.block_table and seq.request_id not in self._seqs, f"{seq!r} already holds blocks"
        assert self.can_allocate(matched, num_tokens), f"not enough blocks for {num_tokens} tokens of {seq!r}"
        for block in matched:
            if self.ref_counts[block] == 0:
                del self._cached[block]
            self.ref_counts[block] += 1
        seq.block_table = list(matched)
        self._seqs[seq.request_id] = seq
        self._keys[seq.request_id] = [self._key_of[b] for b in matched]
        seq.num_computed_tokens = seq.num_cached_tokens = len(matched) * self.tokens_per_block
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += seq.num_cached_tokens
        self.grow(seq, num_tokens)

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Extend the table to hold `num_tokens` slots; False (and nothing changed) if the pool is short."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:  # the common decode step: the last block still has room
            return True
        if need > self.num_free_blocks:
            return False
        seq.block_table.extend(self._take() for _ in range(need))
        return True

    def cache_computed(self, seq: Sequence) -> None:
        """Register the blocks that became full and computed, so later requests can share them.

        A block whose key another block already holds stays private (both hold the same K/V).
        """
        if not self.enable_prefix_caching:
            return
        keys = self._keys[seq.request_id]
        for i in range(len(keys), seq.num_computed_tokens // self.tokens_per_block):
            tokens = seq.token_ids[i * self.tokens_per_block:(i + 1) * self.tokens_per_block]
            keys.append(block_key(keys[-1] if keys else b"", tokens))
            block = seq.block_table[i]
            if keys[-1] not in self._block_of and self._key_of[block] is None:
                self._block_of[keys[-1]] = block
                self._key_of[block] = keys[-1]

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq`; registered blocks become cached, the tail end first in LRU order
        (a block is useless without its parents, so children are evicted before them)."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                (self._cached if self._key_of[block] is not None else self._free)[block] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._seqs.pop(seq.request_id, None)
        self._keys.pop(seq.request_id, None)

    def _take(self) -> int:
        if self._free:
            block, _ = self._free.popitem(last=False)
        else:
            block, _ = self._cached.popitem(last=False)
            del self._block_of[self._key_of[block]]
            self._key_of[block] = None
        self.ref_counts[block] = 1
        return block

    def check_integrity(self) -> None:
        """Raise AssertionError unless every block is in exactly one state and ref counts match the tables."""
        refs = Counter(b for seq in self._seqs.values() for b in seq.block_table)
        used = {b for b in range(self.num_blocks) if self.ref_counts[b] > 0}
        free, cached = set(self._free), set(self._cached)
        assert len(free) + len(cached) + len(used) == self.num_blocks, (
            f"free {len(free)} + cached {len(cached)} + used {len(used)} != total {self.num_blocks}")
        assert not (free & cached or free & used or cached & used), "a block is in two states"
        for block in range(self.num_blocks):
            assert self.ref_counts[block] == refs[block], (
                f"block {block}: ref count {self.ref_counts[block]} but {refs[block]} tables hold it")
        for key, block in self._block_of.items():
            assert self._key_of[block] == key and block not in free, f"block {block}: stale prefix-cache entry"
        assert all(self._key_of[b] is not None for b in cached), "a cached block has no prefix-cache entry"
        assert all(self._key_of[b] is None for b in free), "a free block still has a prefix-cache entry"
        for seq in self._seqs.values():
            assert len(seq.block_table) * self.tokens_per_block >= seq.num_computed_tokens, (
                f"{seq!r}: computed tokens outside its blocks")
