"""The model runner: owns the weights, the paged KV pool and the CUDA graphs, and runs one step's forward.

It knows nothing of requests or scheduling: a step is a list of ``Chunk``s (which tokens of which sequence
to compute, into which blocks), and the result is the float32 logits of the chunks that sample. Per step
the host builds the metadata as lists, moves it to the device in one non-blocking copy per tensor, and the
only synchronisation is the caller reading the sampled tokens.

The KV pool holds ``num_blocks`` blocks for the block manager plus one *null block* (index ``num_blocks``)
that padded rows of a CUDA-graph batch write into and attend to, so no kernel needs a padding special case.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import EngineConfig, EngineError, RuntimeOptions
from .model import AttentionMeta, LlamaModel
from .weights import load_weights

log = logging.getLogger(__name__)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# The CPU's default KV pool (RuntimeOptions.kv_cache_mib=None), before it is raised to hold one full sequence.
_CPU_KV_DEFAULT_BYTES = 64 << 20


@dataclass(frozen=True)
class Chunk:
    """Compute ``token_ids[start:start + length]`` of a sequence whose KV for ``[0, start)`` is cached.

    Attributes:
        token_ids: the sequence's tokens (prompt + generated) as known now.
        start, length: the slice to compute.
        block_table: the sequence's KV blocks, covering at least ``start + length`` tokens.
        samples: whether the last computed token's logits are wanted (the chunk reaches the end).
    """

    token_ids: list[int]
    start: int
    length: int
    block_table: list[int]
    samples: bool


@dataclass(frozen=True)
class LoadReport:
    seconds: float
    weight_bytes: int
    num_blocks: int
    kv_cache_bytes: int
    graph_batch_sizes: tuple[int, ...]


def graph_ladder(max_batch_size: int) -> list[int]:
    """Decode batch sizes to capture: 1, 2, 4, 8, then every 16 up to the limit (and the limit itself)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size] + list(range(16, max_batch_size, 16))
    return sorted(set(sizes + [max_batch_size]))


class ModelRunner:
    """Weights + KV pool + CUDA graphs of one engine on one device."""

    def __init__(self, directory: Path, config: EngineConfig, options: RuntimeOptions, device: str):
        start = time.perf_counter()
        self.config, self.options, self.device = config, options, torch.device(device)
        self.limits = options.limits(config.limits)
        self.dtype = _DTYPES[config.dtype]
        self.tokens_per_block = config.limits.tokens_per_block
        self.max_blocks = math.ceil(config.limits.max_seq_len / self.tokens_per_block)
        weights = load_weights(directory, device)
        self.weight_bytes = sum(t.numel() * t.element_size() for t in weights.values())
        self.model = LlamaModel(config, weights)
        m = config.model
        self.kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype == "fp8_e4m3" else self.dtype
        self.block_bytes = 2 * m.num_layers * self.tokens_per_block * m.num_kv_heads * m.head_dim * \
            torch.empty((), dtype=self.kv_dtype).element_size()
        self.num_blocks = self._num_blocks()
        self.kv_caches = self._allocate(self.num_blocks + 1)
        self.null_block = self.num_blocks
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if self.device.type == "cuda" and not options.enforce_eager:
            self._capture()
        self.report = LoadReport(time.perf_counter() - start, self.weight_bytes, self.num_blocks,
                                 self.block_bytes * (self.num_blocks + 1), tuple(sorted(self.graphs)))

    def _allocate(self, blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        m = self.config.model
        shape = (blocks, self.tokens_per_block, m.num_kv_heads, m.head_dim)
        return [(torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
                 torch.zeros(shape, dtype=self.kv_dtype, device=self.device)) for _ in range(m.num_layers)]

    def _num_blocks(self) -> int:
        """Blocks for the pool: every sequence at full length at most; ``kv_cache_mib`` if set, else on CUDA a
        share of the free memory after the weights and the activation peak of a dummy forward of
        ``max_num_tokens`` tokens."""
        most = self.limits.max_batch_size * self.max_blocks
        mib = self.options.kv_cache_mib
        if self.device.type == "cpu":
            budget = (max(_CPU_KV_DEFAULT_BYTES, self.max_blocks * self.block_bytes) if mib is None
                      else int(mib * (1 << 20)))
        else:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self._dummy_forward()
            peak = torch.cuda.max_memory_allocated() - base
            torch.cuda.empty_cache()
            room = torch.cuda.mem_get_info()[0] - peak
            budget = int(self.options.kv_cache_memory_fraction * room) if mib is None else int(mib * (1 << 20))
            if budget > room:
                raise EngineError(f"kv_cache_mib {mib:g} does not fit: {room >> 20} MiB are free after the weights "
                                  "and the activation peak")
        blocks = min(most, budget // self.block_bytes)
        if blocks < self.max_blocks:
            raise EngineError(f"the KV-cache budget ({budget >> 20} MiB) holds {blocks} blocks, fewer than one "
                              f"sequence of max_seq_len {self.config.limits.max_seq_len} needs ({self.max_blocks})")
        return blocks

    @torch.inference_mode()
    def _dummy_forward(self) -> None:
        """One worst-case step (``max_num_tokens`` prefill tokens, ``max_batch_size`` logits rows) on a
        provisional cache, to measure the activation peak."""
        tpb, remaining = self.tokens_per_block, self.limits.max_num_tokens
        seq_len = min(remaining, self.config.limits.max_seq_len)
        chunks, used = [], 0
        while remaining:
            length = min(seq_len, remaining)
            table = list(range(used, used + math.ceil(length / tpb)))
            used += len(table)
            chunks.append(Chunk([0] * length, 0, length, table, True))
            remaining -= length
        self.null_block = used
        input_ids, meta, _ = self._prepare(chunks)
        hidden = self.model.forward(input_ids, meta, self._allocate(used + 1))
        rows = hidden[-1:].expand(self.limits.max_batch_size, -1)
        self.model.logits(rows)
        torch.cuda.synchronize()

    def _prepare(self, chunks: list[Chunk]) -> tuple[torch.Tensor, AttentionMeta, torch.Tensor]:
        """(input_ids [T], metadata, logits row indices [S]) on the device."""
        tpb = self.tokens_per_block
        ids, pos, slots, lens, qsl, rows = [], [], [], [], [0], []
        width = max(len(c.block_table) for c in chunks)
        tables = []
        for c in chunks:
            end = c.start + c.length
            ids += c.token_ids[c.start:end]
            pos += range(c.start, end)
            slots += [c.block_table[p // tpb] * tpb + p % tpb for p in range(c.start, end)]
            lens.append(end)
            qsl.append(qsl[-1] + c.length)
            tables.append(c.block_table + [self.null_block] * (width - len(c.block_table)))
            if c.samples:
                rows.append(qsl[-1] - 1)

        def dev(x, dtype):
            t = torch.tensor(x, dtype=dtype)
            return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

        meta = AttentionMeta(dev(pos, torch.int64), dev(slots, torch.int64), dev(tables, torch.int32),
                             dev(lens, torch.int32), dev(qsl, torch.int32))
        return dev(ids, torch.int64), meta, dev(rows, torch.int64)

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        """float32 logits [sampling chunks, vocab] of one step, in chunk order."""
        bs = len(chunks)
        if self.graphs and all(c.length == 1 and c.samples for c in chunks) and bs <= max(self.graphs):
            return self.model.logits(self._replay(chunks))
        input_ids, meta, rows = self._prepare(chunks)
        hidden = self.model.forward(input_ids, meta, self.kv_caches)
        return self.model.logits(hidden[rows])

    def _replay(self, chunks: list[Chunk]) -> torch.Tensor:
        bs = len(chunks)
        graph_bs = next(b for b in sorted(self.graphs) if b >= bs)
        input_ids, meta, _ = self._prepare(chunks)
        s = self._static
        s["input_ids"][:bs].copy_(input_ids)
        s["positions"][:bs].copy_(meta.positions)
        s["slot_mapping"][:bs].copy_(meta.slot_mapping)
        s["context_lens"][:bs].copy_(meta.context_lens)
        s["block_tables"][:bs].fill_(self.null_block)
        s["block_tables"][:bs, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        s["slot_mapping"][bs:graph_bs].fill_(self.null_block * self.tokens_per_block)
        s["context_lens"][bs:graph_bs].fill_(1)
        s["block_tables"][bs:graph_bs].fill_(self.null_block)
        self.graphs[graph_bs].replay()
        return s["hidden"][:bs]

    @torch.inference_mode()
    def _capture(self) -> None:
        """Capture one decode graph per ladder size, largest first so smaller ones reuse its memory pool."""
        n = self.limits.max_batch_size
        dev = self.device
        s = self._static = {
            "input_ids": torch.zeros(n, dtype=torch.int64, device=dev),
            "positions": torch.zeros(n, dtype=torch.int64, device=dev),
            "slot_mapping": torch.full((n,), self.null_block * self.tokens_per_block, dtype=torch.int64, device=dev),
            "context_lens": torch.ones(n, dtype=torch.int32, device=dev),
            "block_tables": torch.full((n, self.max_blocks), self.null_block, dtype=torch.int32, device=dev),
            "query_start_loc": torch.arange(n + 1, dtype=torch.int32, device=dev),
            "hidden": torch.zeros(n, self.config.model.hidden_size, dtype=self.dtype, device=dev),
        }
        pool = None
        try:
            for bs in reversed(graph_ladder(n)):
                meta = AttentionMeta(s["positions"][:bs], s["slot_mapping"][:bs], s["block_tables"][:bs],
                                     s["context_lens"][:bs], s["query_start_loc"][: bs + 1])
                s["hidden"][:bs] = self.model.forward(s["input_ids"][:bs], meta, self.kv_caches)  # warm-up
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    s["hidden"][:bs] = self.model.forward(s["input_ids"][:bs], meta, self.kv_caches)
                pool = pool or graph.pool()
                self.graphs[bs] = graph
        except RuntimeError as e:  # a kernel that synchronises with the host cannot be captured
            log.warning("CUDA-graph capture failed (%s); decoding eagerly", str(e).splitlines()[0])
            self.graphs = {}
            torch.cuda.synchronize()
