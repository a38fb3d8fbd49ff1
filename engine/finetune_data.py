"""Fine-tuning data: JSONL files checked line by line, rendered with the model's chat template, batched.

Each file holds one format, detected from its first record:
- chat:        {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}
- instruction: {"instruction": "...", "input": "..." (optional), "output": "..."}
- text:        {"text": "..."}

Chat and instruction records are rendered with the model's chat template (an instruction becomes one user
message, instruction and input separated by a blank line, answered by the output) and train on the
assistant's tokens only (`engine.train_data.chat_example`); text records train on every token and end with
the tokenizer's end-of-sequence token. Everything is validated before training starts; a bad record stops
with `file:line: what was expected` (DataError).

Examples longer than max_seq_len are cut to it and counted; an example left with no token to train on is
dropped and counted. Batches pad each example to the longest in its batch; under DistributedDataParallel
each process takes its slice of every global batch, so the global batch is the same for any process count.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.errors import EngineError, TemplateError
from engine.tokenizer import ChatTokenizer
from engine.train import IGNORE_INDEX, Batch
from engine.train_data import ChatExample, chat_example

log = logging.getLogger(__name__)

FORMATS = ("chat", "instruction", "text")
ROLES = ("system", "user", "assistant", "tool")
_SHAPES = {
    "chat": '{"messages": [{"role": ..., "content": ...}, ...]}',
    "instruction": '{"instruction": ..., "input": ..., "output": ...}',
    "text": '{"text": ...}',
}


class DataError(EngineError):
    """A data file that cannot be trained on; the message starts with `file:line:`."""


class DataCancelled(Exception):
    """prepare_data's should_stop said stop (Ctrl-C or a cancel while the data was being prepared)."""


@dataclass
class Record:
    path: Path
    line: int  # 1-based line in the file
    format: str  # one of FORMATS
    messages: list[dict] | None = None  # chat and instruction records, as chat messages
    text: str | None = None  # text records

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Example(ChatExample):
    source: str = ""  # file:line of the record
    full_length: int = 0  # tokens before truncation
    prompt: str = ""  # chat records: the user message the first reply answers (for sample replies)


@dataclass
class FileSummary:
    path: str
    format: str
    records: int


@dataclass
class DataReport:
    """What the data turned into; written to progress.jsonl and shown by the fine-tune screen."""

    files: list[FileSummary]
    val_files: list[FileSummary]
    train_examples: int
    val_examples: int
    max_seq_len: int
    truncated: int  # examples longer than max_seq_len (cut to it)
    dropped: int  # examples with no token left to train on after truncation (left out)
    train_target_tokens: int  # tokens with a loss, per epoch
    val_target_tokens: int
    length_min: int  # example lengths in tokens before truncation (train and validation)
    length_mean: float
    length_max: int
    length_histogram: list[tuple[int, int, int]] = field(default_factory=list)  # (from, to, count), to exclusive

    def to_dict(self) -> dict:
        return asdict(self)


# -- reading and validation ----------------------------------------------------------------------------------


def _type_name(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _detect(obj: dict, where: str) -> str:
    if "messages" in obj:
        return "chat"
    if "instruction" in obj:
        return "instruction"
    if "text" in obj:
        return "text"
    keys = ", ".join(sorted(obj)) or "none"
    raise DataError(
        f"{where}: unknown record format (keys: {keys}); expected a chat record {_SHAPES['chat']}, "
        f"an instruction record {_SHAPES['instruction']} or a text record {_SHAPES['text']}"
    )


def _string(obj: dict, key: str, where: str, required: bool = True, what: str = "") -> str | None:
    label = f"{what}{key}" if what else repr(key)
    if key not in obj:
        if required:
            raise DataError(f"{where}: missing {label} (expected a string)")
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {label} must be a string, found {_type_name(value)}")
    return value


def _chat_messages(obj: dict, where: str) -> list[dict]:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        found = "an empty list" if messages == [] else _type_name(messages)
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects, found {found}")
    out = []
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: {at} must be an object {{\"role\", \"content\"}}, found {_type_name(message)}")
        role = _string(message, "role", where, what=f"{at}.")
        if role not in ROLES:
            raise DataError(f"{where}: {at}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        _string(message, "content", where, what=f"{at}.")
        out.append(message)  # other keys (name, tool_calls, ...) go to the template as they are
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant message (a chat record needs at least one assistant turn to train on)")
    return out


def parse_record(obj: object, path: Path, line: int, expected_format: str | None, first_line: int) -> Record:
    """One JSON value as a Record, or DataError naming path:line and what was expected."""
    where = f"{path}:{line}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, found {_type_name(obj)}")
    fmt = _detect(obj, where)
    if expected_format is not None and fmt != expected_format:
        raise DataError(
            f"{where}: {fmt} record in a file of {expected_format} records (line {first_line} is {expected_format}); "
            f"mixed formats: use one format per file, e.g. {_SHAPES[expected_format]}"
        )
    if fmt == "chat":
        return Record(path, line, fmt, messages=_chat_messages(obj, where))
    if fmt == "instruction":
        instruction = _string(obj, "instruction", where)
        given = _string(obj, "input", where, required=False)
        output = _string(obj, "output", where)
        prompt = f"{instruction}\n\n{given}" if given else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        return Record(path, line, fmt, messages=messages)
    text = _string(obj, "text", where)
    if not text:
        raise DataError(f"{where}: 'text' is empty (expected the text to train on)")
    return Record(path, line, fmt, text=text)


def read_jsonl(path: str | Path) -> tuple[str, list[Record]]:
    """(format, records) of one JSONL file, every line checked; blank lines are skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: file not found" if not path.exists() else f"{path}: not a file")
    records: list[Record] = []
    fmt: str | None = None
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark
            if not line.strip():
                continue
            line = line.rstrip("\r\n")  # else an error at the line's end is reported at column 1 of the next
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{number}: malformed JSON at column {e.pos + 1} ({e.msg}); expected one JSON object per line"
                ) from None
            record = parse_record(obj, path, number, fmt, records[0].line if records else number)
            fmt = record.format
            records.append(record)
    if not records:
        raise DataError(f"{path}:1: empty file; expected JSON lines, one record per line, e.g. {_SHAPES['chat']}")
    return fmt, records


# -- rendering -----------------------------------------------------------------------------------------------


def render_record(record: Record, tokenizer: ChatTokenizer) -> Example:
    """Token ids and labels of one record, untruncated (DataError with file:line if the template fails)."""
    if record.format == "text":
        ids = tokenizer.encode(record.text, add_special_tokens=True)
        eos = tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return Example(ids, list(ids), source=record.where, full_length=len(ids))
    try:
        example = chat_example(tokenizer, record.messages)
    except TemplateError as e:
        raise DataError(f"{record.where}: {e}") from None
    except ValueError as e:  # the template does not render conversations as growing prefixes
        raise DataError(f"{record.where}: cannot find the assistant's tokens: {e}") from None
    first_reply = next((i for i, m in enumerate(record.messages) if m["role"] == "assistant"), len(record.messages))
    asked = [m["content"] for m in record.messages[:first_reply] if m["role"] == "user"]
    return Example(example.input_ids, example.labels, source=record.where, full_length=len(example.input_ids),
                   prompt=asked[-1] if asked else "")


def _trainable(example: Example) -> bool:
    return any(label != IGNORE_INDEX for label in example.labels[1:])


@dataclass
class PreparedData:
    train: list[Example]
    val: list[Example]
    report: DataReport


def _histogram(lengths: list[int], bins: int = 10) -> list[tuple[int, int, int]]:
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths) + 1
    width = max(1, math.ceil((hi - lo) / bins))
    counts = [0] * math.ceil((hi - lo) / width)
    for n in lengths:
        counts[(n - lo) // width] += 1
    return [(lo + i * width, lo + (i + 1) * width, c) for i, c in enumerate(counts)]


def split_validation(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices): a seeded random `fraction` of n records (at least one) held out."""
    if not 0 < fraction < 1:
        raise DataError(f"the validation fraction must be between 0 and 1, got {fraction}")
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise DataError(f"a validation fraction of {fraction} leaves no training records out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def prepare_data(
    tokenizer: ChatTokenizer,
    train_files: Sequence[str | Path],
    max_seq_len: int,
    val_files: Sequence[str | Path] = (),
    val_fraction: float | None = None,
    seed: int = 0,
    should_stop: Callable[[], bool] = lambda: False,
) -> PreparedData:
    """Read, check and tokenize the data; split validation (val_files, or a seeded val_fraction of the records).

    Raises DataError on the first bad record, or when nothing is left to train on; DataCancelled as soon as
    should_stop() (polled before every record) is true.
    """
    if not train_files:
        raise DataError("no training data file given")
    if val_files and val_fraction:
        raise DataError("give either validation files or a validation fraction, not both")
    summaries, records = [], []
    for path in train_files:
        fmt, recs = read_jsonl(path)
        summaries.append(FileSummary(str(path), fmt, len(recs)))
        records += recs
    val_summaries, val_records = [], []
    for path in val_files:
        fmt, recs = read_jsonl(path)
        val_summaries.append(FileSummary(str(path), fmt, len(recs)))
        val_records += recs
    if val_fraction:
        train_idx, val_idx = split_validation(len(records), val_fraction, seed)
        records, val_records = [records[i] for i in train_idx], [records[i] for i in val_idx]

    truncated = dropped = 0
    lengths: list[int] = []

    def render_all(recs: list[Record]) -> list[Example]:
        nonlocal truncated, dropped
        out = []
        for record in recs:
            if should_stop():
                raise DataCancelled(f"stopped before {record.where}")
            example = render_record(record, tokenizer)
            lengths.append(example.full_length)
            if example.full_length > max_seq_len:
                truncated += 1
                example.input_ids = example.input_ids[:max_seq_len]
                example.labels = example.labels[:max_seq_len]
            if not _trainable(example):
                dropped += 1
                log.warning("%s: no token left to train on after truncation to %d; left out", example.source, max_seq_len)
                continue
            out.append(example)
        return out

    train = render_all(records)
    val = render_all(val_records)
    if not train:
        raise DataError(
            f"{train_files[0]}: no training example has a token to train on within --max-seq-len {max_seq_len} "
            "(every assistant reply starts beyond it)"
        )
    report = DataReport(
        files=summaries,
        val_files=val_summaries,
        train_examples=len(train),
        val_examples=len(val),
        max_seq_len=max_seq_len,
        truncated=truncated,
        dropped=dropped,
        train_target_tokens=sum(_targets(e) for e in train),
        val_target_tokens=sum(_targets(e) for e in val),
        length_min=min(lengths),
        length_mean=sum(lengths) / len(lengths),
        length_max=max(lengths),
        length_histogram=_histogram(lengths),
    )
    return PreparedData(train, val, report)


def _targets(example: Example) -> int:
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


def inspect_data(model_dir: str | Path, files: Sequence[str | Path], max_seq_len: int) -> DataReport:
    """The data report for files with a model's tokenizer, without training (the fine-tune form's preview)."""
    tokenizer = ChatTokenizer.load(Path(model_dir))
    return prepare_data(tokenizer, files, max_seq_len).report


# -- batches -------------------------------------------------------------------------------------------------


class ExampleBatches:
    """Batches of examples padded to the longest in the batch, reshuffled per epoch from a seed.

    batch_size is the global batch; with world_size > 1 each rank yields its batch_size / world_size slice
    of every global batch (ranks 0, 1, ... in order), so any number of processes trains on the same batches.
    """

    def __init__(
        self,
        examples: Sequence[ChatExample],
        batch_size: int,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.examples = examples
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.examples)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.examples)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(n))
        local = self.batch_size // self.world_size
        for i in range(len(self)):
            start = i * self.batch_size + self.rank * local
            chosen = [self.examples[j] for j in order[start : start + local]]
            if chosen:
                yield collate(chosen, self.pad_id)

    def target_tokens(self) -> int:
        return sum(_targets(e) for e in self.examples)


def collate(examples: Sequence[ChatExample], pad_id: int) -> Batch:
    """Right-padded (B, T) input_ids and labels (IGNORE_INDEX on padding), T the longest example."""
    T = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.int64)  # (B, T)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.int64)  # (B, T)
    for row, e in enumerate(examples):
        input_ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.int64)
        labels[row, : len(e.labels)] = torch.tensor(e.labels, dtype=torch.int64)
    return Batch(input_ids, labels)


def pad_token_id(tokenizer: ChatTokenizer) -> int:
    """The pad token's id, else the end-of-sequence token's, else 0 (padding is never trained on)."""
    for token in (tokenizer.pad_token, tokenizer.eos_token):
        if token is not None and (i := tokenizer._tokenizer.token_to_id(token)) is not None:
            return i
    return 0
