"""Training batches: plain text packed into fixed-length rows, and chat examples with loss on assistant tokens.

Both produce `engine.train.Batch` objects (labels aligned with input_ids, IGNORE_INDEX where there is no loss)
from loaders that reshuffle deterministically per epoch (`set_epoch`), which is what makes resuming exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from engine.tokenizer import ChatTokenizer
from engine.train import IGNORE_INDEX, Batch


def pack_documents(documents: Iterable[Sequence[int]], seq_len: int, separator_id: int) -> torch.Tensor:
    """Concatenate token lists, each followed by separator_id, and cut the stream into (N, seq_len) rows.

    The last partial row is dropped. Rows are causal-LM examples whose labels are the inputs themselves.
    """
    stream: list[int] = []
    for doc in documents:
        stream.extend(doc)
        stream.append(separator_id)
    rows = len(stream) // seq_len
    return torch.tensor(stream[: rows * seq_len], dtype=torch.int64).view(rows, seq_len)  # (N, seq_len)


class RowBatches:
    """Batches of rows from (input_ids, labels) tensors (N, T), reshuffled per epoch from a seed."""

    def __init__(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        batch_size: int = 8,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        self.input_ids = input_ids
        self.labels = input_ids if labels is None else labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.input_ids)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.input_ids)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield Batch(self.input_ids[idx], self.labels[idx])


# -- chat ----------------------------------------------------------------------------------------------------


@dataclass
class ChatExample:
    input_ids: list[int]
    labels: list[int]  # the token where the loss applies, IGNORE_INDEX elsewhere


def assistant_spans(tokenizer: ChatTokenizer, messages: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole conversation and the [start, end) token spans written by the assistant.

    Works for any template that renders a conversation as a growing prefix: the span of assistant message i
    runs from the end of messages[:i] rendered with the generation prompt (so the role header is not trained
    on) to the end of messages[:i+1] (so the end-of-turn token is). ValueError if a prefix's tokens are not a
    prefix of the full conversation's tokens.
    """
    ids = tokenizer.encode_chat(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.encode_chat(messages[:i], add_generation_prompt=True)
        through = tokenizer.encode_chat(messages[: i + 1], add_generation_prompt=False)
        if ids[: len(before)] != before or ids[: len(through)] != through:
            raise ValueError("the chat template does not render conversations as growing prefixes")
        spans.append((len(before), len(through)))
    return ids, spans


def chat_example(tokenizer: ChatTokenizer, messages: list[dict], max_len: int | None = None) -> ChatExample:
    """A conversation as ids with labels only on assistant tokens (truncated to max_len)."""
    ids, spans = assistant_spans(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    if max_len is not None:
        ids, labels = ids[:max_len], labels[:max_len]
    return ChatExample(ids, labels)


def pack_examples(
    examples: Sequence[ChatExample], seq_len: int, pad_id: int, shuffle_seed: int | None = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedily place whole examples into rows of seq_len (first fit), padding the rest (labels ignored).

    Returns (input_ids, labels), each (N, seq_len). Examples longer than seq_len are truncated. Packing avoids
    paying for padding; examples in one row can attend to earlier ones, which costs little for short chats.
    """
    order = list(range(len(examples)))
    if shuffle_seed is not None:
        perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(shuffle_seed))
        order = perm.tolist()
    rows: list[tuple[list[int], list[int]]] = []
    open_rows: list[int] = []  # indices of rows with room left
    for i in order:
        ex = examples[i]
        ids, labels = ex.input_ids[:seq_len], ex.labels[:seq_len]
        placed = False
        for r in open_rows:
            if len(rows[r][0]) + len(ids) <= seq_len:
                rows[r][0].extend(ids)
                rows[r][1].extend(labels)
                placed = True
                if seq_len - len(rows[r][0]) < 16:
                    open_rows.remove(r)
                break
        if not placed:
            rows.append((list(ids), list(labels)))
            open_rows.append(len(rows) - 1)
            if len(open_rows) > 64:  # bound the search; the oldest open rows are nearly full
                open_rows.pop(0)
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.int64)
    label_t = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.int64)
    for r, (ids, labels) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        label_t[r, : len(labels)] = torch.tensor(labels)
    return input_ids, label_t
