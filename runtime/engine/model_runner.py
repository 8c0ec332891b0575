"""Turns scheduled work into ForwardBatches over the paged KV pool and runs the model."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.engine.request import Req
from runtime.models.forward_batch import ForwardBatch, KVPool


def page_slots(pages: list[int], start: int, end: int, page_size: int) -> torch.Tensor:
    """KV-pool slots of token positions [start, end) of a request holding `pages`."""
    idx = torch.arange(start, end)
    table = torch.tensor(pages, dtype=torch.long)
    return table[idx // page_size] * page_size + idx % page_size


def block_tables(tables: list[list[int]]) -> torch.Tensor:
    """Page tables as one [B, max_pages] tensor, padded with -1."""
    width = max(len(t) for t in tables)
    return torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.long)


@dataclass(frozen=True)
class Chunk:
    """Compute KV for tokens [start, end) of `req`; sample a token if `end` reaches the sequence end."""

    req: Req
    start: int
    end: int

    @property
    def samples(self) -> bool:
        return self.end == self.req.seq_len

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def generated(self) -> bool:
        """A decode step: the token fed is one the model generated (a one-token prompt chunk is not)."""
        return self.start >= self.req.prompt_len

    def prompt_logprob_rows(self) -> range:
        """Rows whose logits score the next prompt token at or after the requested start."""
        covered = self.req.prompt_logprobs_covered
        if covered is None:
            return range(0)
        first = max(self.start, covered - 1)
        return range(first, max(first, min(self.end, self.req.prompt_len - 1)))


@dataclass
class ChunkLogits:
    sample: torch.Tensor | None  # [V] logits for the next token
    prompt: torch.Tensor | None  # [rows, V] logits scoring prompt tokens
    prompt_rows: range


class ModelRunner:
    def __init__(self, model, kv: KVPool, image_token_id: int) -> None:
        self.model, self.kv, self.image_token_id = model, kv, image_token_id
        self.page_size = kv.page_size

    @torch.inference_mode()
    def encode(self, pixel_values: list[torch.Tensor], grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        pixels = pixel_values[0] if len(pixel_values) == 1 else torch.cat(pixel_values)  # one image: no copy
        pixels = pixels.to(self.model.dtype)
        return self.model.encode(pixels, torch.tensor(grids, dtype=torch.long))

    @torch.inference_mode()
    def run(self, chunks: list[Chunk], is_decode: bool) -> list[ChunkLogits]:
        batch, row_spans = self._build(chunks, is_decode)
        fn = self.model.decode if is_decode else self.model.prefill
        logits = fn(batch, self.kv)
        out, i = [], 0
        for chunk, (n_prompt, has_sample) in zip(chunks, row_spans):
            prompt = logits[i:i + n_prompt] if n_prompt else None
            sample = logits[i + n_prompt] if has_sample else None
            out.append(ChunkLogits(sample, prompt, chunk.prompt_logprob_rows()))
            i += n_prompt + int(has_sample)
        return out

    def _build(self, chunks: list[Chunk], is_decode: bool) -> tuple[ForwardBatch, list[tuple[int, bool]]]:
        if is_decode:
            return self._build_decode(chunks), [(0, True)] * len(chunks)
        ids, pos, slots, logit_rows, spans, embeds, image_rows = [], [], [], [], [], [], []
        offset = 0
        for c in chunks:
            ids.extend(c.req.token_ids(c.start, c.end))
            pos.append(c.req.position_slice(c.start, c.end))
            slots.append(self._slots(c.req.pages, c.start, c.end))
            rows = [offset + r - c.start for r in c.prompt_logprob_rows()]
            if c.samples:
                rows.append(offset + c.end - 1 - c.start)
            logit_rows.extend(rows)
            spans.append((len(c.prompt_logprob_rows()), c.samples))
            if not is_decode:
                rows, emb = self._image_rows(c)
                image_rows.append(rows + offset)
                embeds.extend(emb)
            offset += c.num_tokens
        batch = ForwardBatch(
            is_decode=is_decode,
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.cat(pos, dim=1),
            extend_lens=[c.num_tokens for c in chunks],
            seq_lens=[c.end for c in chunks],
            block_tables=block_tables([c.req.pages for c in chunks]),
            out_slots=torch.cat(slots),
            logits_indices=torch.tensor(logit_rows, dtype=torch.long),
            image_embeds=torch.cat(embeds) if embeds else None,
            image_rows=torch.cat(image_rows) if image_rows else torch.zeros(0, dtype=torch.long),
            num_decode=_leading_single_tokens(chunks),
        )
        return batch, spans

    def _build_decode(self, chunks: list[Chunk]) -> ForwardBatch:
        """One new token per sequence, built from Python ints: no per-request tensor ops."""
        ps, ids, pos, slots = self.page_size, [], [], []
        for c in chunks:
            req, i = c.req, c.start
            ids.append(req.token_ids(i, i + 1)[0])
            pos.append([i + req.rope_delta] * 3 if i >= req.prompt_len else req.positions[:, i].tolist())
            slots.append(req.pages[i // ps] * ps + i % ps)
        n = len(chunks)
        return ForwardBatch(
            is_decode=True, input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(pos, dtype=torch.long).T.contiguous(),
            extend_lens=[1] * n, seq_lens=[c.end for c in chunks],
            block_tables=block_tables([c.req.pages for c in chunks]),
            out_slots=torch.tensor(slots, dtype=torch.long), logits_indices=torch.arange(n),
            image_embeds=None, image_rows=torch.zeros(0, dtype=torch.long))

    def _slots(self, pages: list[int], start: int, end: int) -> torch.Tensor:
        return page_slots(pages, start, end, self.page_size)

    def _image_rows(self, c: Chunk) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Chunk-relative rows of prompt image tokens, and their embeddings (generated tokens are text)."""
        mm = c.req.mm_embeds()
        if mm is None or c.start >= c.req.prompt_len:
            return torch.zeros(0, dtype=torch.long), []
        prompt = torch.tensor(c.req.msg.input_ids[:min(c.end, c.req.prompt_len)])
        is_img = prompt == self.image_token_id
        before = int(is_img[:c.start].sum())
        rows = is_img[c.start:].nonzero().squeeze(1)
        return rows, ([mm[before:before + len(rows)]] if len(rows) else [])


def _leading_single_tokens(chunks: list[Chunk]) -> int:
    """How many chunks at the front add one token each: their attention takes the decode path."""
    n = 0
    while n < len(chunks) and chunks[n].num_tokens == 1:
        n += 1
    return n
