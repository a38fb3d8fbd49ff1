"""Fine-tune jobs: every bad data file stops before training with file:line and what was expected; formats
are detected per file and rendered with loss on the assistant only; truncation is counted; SIGTERM cancels
with a checkpoint and --resume gives the uninterrupted run's losses; two DDP processes under torchrun match
one process with the same global batch; failures leave status failed and no partial checkpoint; a job run as
`python -m engine.finetune --config` ends with status done."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoints import hf_model
from engine import Engine
from engine.finetune import JobError, config_from_dict, load_config, read_records, run_job
from engine.finetune_data import DataError, prepare_data, read_jsonl
from engine.tokenizer import ChatTokenizer
from engine.train import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[2]



@pytest.fixture(scope="module")
def base(checkpoint_factory) -> Path:
    return checkpoint_factory("llama")


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, records: list) -> Path:
    """Records are dicts (written as JSON) or raw lines (str, bytes)."""
    out = b""
    for r in records:
        line = r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()
        out += line + b"\n"
    path.write_bytes(out)
    return path


def job_config(base: Path, data: Path, out: Path, **overrides):
    values = {
        "model": str(base), "data": [str(data)], "out": str(out), "max_steps": 6, "lr": 1e-2, "batch_size": 2,
        "lora_rank": 4, "lora_dropout": 0.0, "val_fraction": 0.0, "warmup_ratio": 0.0, "log_interval": 1,
        "checkpoint_interval": 100,
    }
    return config_from_dict({**values, **overrides})


def statuses(out: Path) -> list[dict]:
    return [r for r in read_records(out / "progress.jsonl") if r["type"] == "status"]


def losses(out: Path) -> dict[int, tuple]:
    """step -> (loss, val_loss), the newest record per step."""
    return {r["step"]: (r["loss"], r["val_loss"]) for r in read_records(out / "progress.jsonl") if r["type"] == "progress"}


# -- bad input -----------------------------------------------------------------------------------------------

USER_ONLY = {"messages": [{"role": "user", "content": "hi"}]}
BAD_FILES = [
    ("malformed JSON", [chat("a", "b"), '{"messages": [}'], 2, "malformed JSON at column 15"),
    ("truncated JSON", [{"text": "ok"}, '{"text": "broken'], 2, "malformed JSON"),
    ("cut off at the line's end", [chat("a", "b"), '{"messages": [{"role": "user", "content": "hi"}, '], 2,
     "malformed JSON at column 50 (Expecting value)"),
    ("unknown role", [{"messages": [{"role": "bot", "content": "hi"}]}], 1,
     "messages[0]: unknown role 'bot' (expected one of system, user, assistant, tool)"),
    ("missing content", [chat("a", "b"), {"messages": [{"role": "user"}]}], 2, "missing messages[0].content"),
    ("missing role", [{"messages": [{"content": "x"}]}], 1, "missing messages[0].role"),
    ("content not a string", [{"messages": [{"role": "user", "content": 5}]}], 1,
     "messages[0].content must be a string, found a number"),
    ("messages not a list", [{"messages": "hello"}], 1, "'messages' must be a non-empty list"),
    ("empty messages", [{"messages": []}], 1, "'messages' must be a non-empty list of {\"role\", \"content\"} objects, found an empty list"),
    ("no assistant turn", [chat("a", "b"), chat("c", "d"), USER_ONLY], 3, "no assistant message"),
    ("instruction without output", [{"instruction": "Add 2 and 2", "input": ""}], 1, "missing 'output' (expected a string)"),
    ("instruction output not a string", [{"instruction": "Add", "output": 4}], 1, "'output' must be a string, found a number"),
    ("text missing", [{"text": "a"}, {"text": None}], 2, "'text' must be a string, found null"),
    ("empty text", [{"text": ""}], 1, "'text' is empty"),
    ("mixed formats", [chat("a", "b"), {"text": "plain"}], 2,
     "text record in a file of chat records (line 1 is chat); mixed formats"),
    ("not an object", [[1, 2]], 1, "expected a JSON object, found a list"),
    ("unknown format", [{"prompt": "p", "completion": "c"}], 1, "unknown record format (keys: completion, prompt); expected a chat record"),
    ("empty file", [], 1, "empty file; expected JSON lines"),
    ("only blank lines", ["", "   "], 1, "empty file"),
    ("not UTF-8", [{"text": "ok"}, b'{"text": "\xff"}'], 2, "not UTF-8 text"),
]


@pytest.mark.parametrize("case, lines, line, expected", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_data_file_names_file_line_and_what_was_expected(tmp_path, case, lines, line, expected):
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert expected in message
    assert "\n" not in message


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(DataError, match=f"^{tmp_path / 'nope.jsonl'}: file not found$"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_bad_data_fails_the_job_before_training_with_file_and_line(base, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [chat("a", "b"), USER_ONLY])
    out = tmp_path / "job"
    result = run_job(job_config(base, data, out))
    assert result.status == "failed" and result.exit_code == 1
    assert result.reason.startswith(f"{data}:2: no assistant message")
    assert [s["status"] for s in statuses(out)] == ["running", "failed"]
    assert statuses(out)[-1]["reason"] == result.reason
    assert not (out / "checkpoints").exists() and not (out / "adapter").exists()


# -- formats, rendering, truncation --------------------------------------------------------------------------


def test_format_is_detected_per_file_and_only_assistant_tokens_are_trained(base, tmp_path):
    tokenizer = ChatTokenizer.from_dir(base)
    chat_file = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                      {"role": "assistant", "content": "Bye!"}]},
    ])
    instruction_file = write_jsonl(tmp_path / "instr.jsonl", [
        {"instruction": "Translate to French", "input": "cat", "output": "chat"},
        {"instruction": "Say yes", "output": "yes"},
    ])
    text_file = write_jsonl(tmp_path / "text.jsonl", [{"text": "The quick brown fox."}])
    assert [read_jsonl(f)[0] for f in (chat_file, instruction_file, text_file)] == ["chat", "instruction", "text"]

    data = prepare_data(tokenizer, [chat_file, instruction_file, text_file], max_seq_len=256)
    assert [(f.format, f.records) for f in data.report.files] == [("chat", 1), ("instruction", 2), ("text", 1)]
    assert data.report.train_examples == 4 and data.report.truncated == 0

    def trained(example) -> str:
        return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX], skip_special_tokens=False)

    two_turns, translate, say_yes, text = data.train
    assert trained(two_turns) == "Hello!<|im_end|>\nBye!<|im_end|>\n"
    assert trained(translate) == "chat<|im_end|>\n"
    rendered = tokenizer.decode(translate.input_ids, skip_special_tokens=False)
    assert "<|im_start|>user\nTranslate to French\n\ncat<|im_end|>" in rendered
    assert "<|im_start|>user\nSay yes<|im_end|>" in tokenizer.decode(say_yes.input_ids, skip_special_tokens=False)
    assert text.labels == text.input_ids and text.input_ids[-1] == tokenizer.eos_token_id
    assert text.source == f"{text_file}:1"


def test_long_examples_are_truncated_and_counted(base, tmp_path):
    tokenizer = ChatTokenizer.from_dir(base)
    long_answer = "The quick brown fox jumps over the lazy dog. " * 4
    path = write_jsonl(tmp_path / "data.jsonl", [
        chat("Hi", "Hello!"),
        chat("Fox?", long_answer),
        chat("Dog?", long_answer),
        chat("The quick brown fox jumps over the lazy dog. " * 3, "ok"),  # the answer starts past the limit
    ])
    data = prepare_data(tokenizer, [path], max_seq_len=40)
    assert data.report.truncated == 3
    assert data.report.dropped == 1  # nothing left to train on
    assert data.report.train_examples == 3
    assert [len(e.input_ids) for e in data.train][1:] == [40, 40]
    assert data.report.length_max > 40 and sum(c for _, _, c in data.report.length_histogram) == 4


def test_validation_split_from_fraction_or_file(base, tmp_path):
    tokenizer = ChatTokenizer.from_dir(base)
    path = write_jsonl(tmp_path / "data.jsonl", [chat(f"q{i}", f"a{i}") for i in range(8)])
    first = prepare_data(tokenizer, [path], 64, val_fraction=0.25, seed=3)
    again = prepare_data(tokenizer, [path], 64, val_fraction=0.25, seed=3)
    assert (first.report.train_examples, first.report.val_examples) == (6, 2)
    assert [e.source for e in first.val] == [e.source for e in again.val]
    val_file = write_jsonl(tmp_path / "val.jsonl", [{"text": "held out"}])
    separate = prepare_data(tokenizer, [path], 64, val_files=[val_file])
    assert (separate.report.train_examples, separate.report.val_examples) == (8, 1)
    assert separate.report.val_files[0].format == "text"


# -- job settings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "toml, message",
    [
        ('model = "m"\ndata = "d.jsonl"\nlearning_rate = 1.0\n', "unknown key 'learning_rate'"),
        ('model = "m"\ndata = "d.jsonl"\nepochs = "three"\n', "'epochs' must be an integer, got 'three'"),
        ('model = "m"\n', "missing 'data'"),
        ('model = "m"\ndata = "d.jsonl"\nmethod = "qlora"\n', "'method' must be \"lora\" or \"full\""),
        ('model = "m"\ndata = "d.jsonl"\nbatch_size = 3\nnproc = 2\n', "must be divisible by 'nproc'"),
        ('model = "m"\ndata = "d.jsonl"\nval_data = "v.jsonl"\nval_fraction = 0.1\n', "either 'val_data' or 'val_fraction'"),
        ('model = "m\ndata = 1\n', "invalid TOML"),
    ],
)
def test_bad_job_settings_name_the_file_and_key(tmp_path, toml, message):
    path = tmp_path / "job.toml"
    path.write_text(toml)
    with pytest.raises(JobError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_relative_paths_in_a_job_file_are_taken_from_its_folder(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('model = "models/m"\ndata = ["a.jsonl", "b.jsonl"]\nout = "out"\n')
    config = load_config(path)
    assert config.model == str(tmp_path / "models" / "m") and config.data[1] == str(tmp_path / "b.jsonl")
    assert config.id == "out"


def test_an_output_folder_holding_another_job_is_refused_without_touching_it(base, tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    (out / "job.json").write_text("{}")
    data = write_jsonl(tmp_path / "data.jsonl", [chat("a", "b")])
    with pytest.raises(JobError, match="already holds a job; resume it"):
        run_job(job_config(base, data, out))
    assert not (out / "progress.jsonl").exists()


# -- cancel, resume, failures --------------------------------------------------------------------------------


def test_sigterm_cancels_with_a_checkpoint_and_resume_gives_the_uninterrupted_losses(base, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [chat(f"Question {i}?", f"Answer {i}.") for i in range(8)])
    settings = dict(max_steps=6, lora_dropout=0.1, val_fraction=0.25, eval_interval=2, checkpoint_interval=2)
    straight = run_job(job_config(base, data, tmp_path / "straight", **settings))
    assert straight.status == "done"

    out = tmp_path / "interrupted"

    def sigterm_after_step_3(record):
        if record.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as `chattui` or the screen would send it

    cancelled = run_job(job_config(base, data, out, **settings), on_progress=sigterm_after_step_3)
    assert cancelled.status == "cancelled" and cancelled.step == 3 and cancelled.exit_code == 130
    last = statuses(out)[-1]
    assert last["status"] == "cancelled" and last["reason"] == "cancelled by SIGTERM"
    assert Path(last["checkpoint"]).name == "step-0000003"
    assert (out / "adapter" / "adapter_model.safetensors").exists()  # chat with the partial result

    resumed = run_job(job_config(base, data, out, **settings), resume=True)
    assert resumed.status == "done" and resumed.step == 6
    assert statuses(out)[-2]["start_step"] == 3
    expected, got = losses(tmp_path / "straight"), losses(out)
    assert sorted(got) == list(range(1, 7))
    assert [got[step][1] is None for step in got] == [True, False, True, False, True, False]  # val every 2 steps
    for step in expected:
        train_loss, val_loss = got[step]
        expected_train, expected_val = expected[step]
        assert train_loss == pytest.approx(expected_train, rel=1e-6)
        assert (val_loss is None) == (expected_val is None)
        if val_loss is not None:
            assert val_loss == pytest.approx(expected_val, rel=1e-6)
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


@pytest.mark.parametrize(
    "target, replacement, reason",
    [
        ("engine.train.save_file", _disk_full, "disk full: [Errno 28] No space left on device"),
        ("engine.train.token_losses", _out_of_memory, "out of memory (CUDA out of memory. Tried to allocate 20.00 GiB); lower batch_size"),
    ],
    ids=["disk full", "out of memory"],
)
def test_failure_leaves_status_failed_with_the_reason_and_no_partial_checkpoint(base, tmp_path, monkeypatch, target, replacement, reason):
    data = write_jsonl(tmp_path / "data.jsonl", [chat("a", "b"), chat("c", "d")])
    out = tmp_path / "job"
    monkeypatch.setattr(target, replacement)
    result = run_job(job_config(base, data, out, max_steps=2, checkpoint_interval=1))
    assert result.status == "failed" and result.reason.startswith(reason)
    assert statuses(out)[-1] == {**statuses(out)[-1], "status": "failed", "reason": result.reason}
    checkpoints = out / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())  # no step-* and no .tmp-* left


def test_full_finetune_writes_a_checkpoint_transformers_loads(base, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [chat("a", "b"), chat("c", "d")])
    result = run_job(job_config(base, data, tmp_path / "job", method="full", max_steps=2, lr=1e-3))
    assert result.status == "done" and result.adapter_dir is None
    tuned = Path(result.model_dir)
    ids = torch.tensor([[1, 20, 30, 40]])
    engine = Engine.load(tuned, device="cpu", dtype="float32")
    with torch.no_grad():
        ours, theirs, before = engine.model(ids), hf_model(tuned)(ids).logits, hf_model(base)(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert (theirs - before).abs().max() > 1e-3


# -- processes -----------------------------------------------------------------------------------------------


def _run_module(config_path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "engine.finetune", "--config", str(config_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def _toml(values: dict) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


def test_job_run_as_a_subprocess_writes_progress_and_ends_done(base, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [chat("a", "b"), chat("c", "d")])
    config = tmp_path / "job.toml"
    config.write_text(_toml({"model": str(base), "data": str(data), "out": "out", "max_steps": 3, "batch_size": 2,
                             "log_interval": 1}))
    proc = _run_module(config)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    records = read_records(out / "progress.jsonl")
    assert [r["status"] for r in records if r["type"] == "status"] == ["running", "done"]
    assert [r["step"] for r in records if r["type"] == "progress"] == [1, 2, 3]
    progress = [r for r in records if r["type"] == "progress"][-1]
    assert {"step", "epoch", "loss", "val_loss", "lr", "tokens_per_s", "eta_s", "total_steps"} <= set(progress)
    assert (out / "adapter" / "adapter_config.json").exists()
    assert json.loads((out / "job.json").read_text())["plan"]["total_steps"] == 3


@pytest.mark.parametrize("lengths", ["equal", "unequal"])
def test_two_ddp_processes_match_one_process_with_the_same_global_batch(base, tmp_path, lengths):
    # "equal": every record is cut to 16 tokens, so both processes' shares hold as many target tokens;
    # "unequal": short and long records, so the shares differ and the loss must be normalised globally.
    # float32: bfloat16 rounding depends on the matmul shapes, which differ between one and two processes.
    texts = ["The quick brown fox jumps over the lazy dog. 0123456789 ", "Hello there! How are you doing today? "]
    repeats = (lambda i: 3) if lengths == "equal" else (lambda i: 1 if i % 4 < 2 else 3)
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": texts[i % 2][: 12 * repeats(i)] * repeats(i) + str(i)} for i in range(8)])
    settings = {"model": str(base), "data": str(data), "max_steps": 3, "lr": 1e-2, "batch_size": 4, "grad_accum": 2,
                "max_seq_len": 16, "lora_dropout": 0.0, "val_fraction": 0.0, "log_interval": 1, "device": "cpu",
                "precision": "fp32"}
    one = run_job(config_from_dict({**settings, "data": [str(data)], "out": str(tmp_path / "one")}))
    assert one.status == "done"

    config = tmp_path / "two.toml"
    config.write_text(_toml({**settings, "out": "two", "nproc": 2}))
    proc = _run_module(config, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    assert [s["status"] for s in statuses(two)] == ["running", "done"]
    assert statuses(two)[0]["nproc"] == 2
    expected, got = losses(tmp_path / "one"), losses(two)
    assert sorted(got) == [1, 2, 3]
    for step in expected:
        assert got[step][0] == pytest.approx(expected[step][0], rel=1e-5)
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    # All-reduce adds gradients in another order than one process does. Adam divides each coordinate by its
    # own gradient scale, so a coordinate whose gradient is at rounding level may take a different step
    # (at most lr): nearly every weight must agree, none may be off by more than the steps taken.
    differences = torch.cat([(b[key] - a[key]).abs().flatten() for key in a])
    assert (differences > 1e-5).float().mean() < 0.01
    assert differences.max() < 3 * 1e-2
    assert (two / "checkpoints" / "rank-1" / "step-0000003").is_dir()


# -- defaults that teach, and what the model answers as it learns ----------------------------------------------


def test_auto_learning_rate_and_epochs_follow_model_and_data_size():
    from engine.finetune import auto_epochs, auto_lr

    assert auto_lr("lora", 1_000_000_000) == 2e-4 and auto_lr("full", 7_000_000_000) == 2e-5
    assert auto_lr("lora", 4_229_568) == 3.1e-3 and auto_lr("full", 4_229_568) == 3.1e-4
    assert auto_lr("lora", 135_000_000) == 5.4e-4
    assert auto_lr("lora", 1000) == 4e-3, "at most 20x"
    assert auto_epochs(2) == 50, "22 records in batches of 8: 100 steps, not 6"
    assert auto_epochs(1000) == 3 and auto_epochs(1) == 100


def test_each_evaluation_writes_greedy_replies_to_held_out_prompts(base, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [chat(f"Question {i}?", f"Answer {i}.") for i in range(8)])
    result = run_job(job_config(base, data, tmp_path / "out", max_steps=4, eval_interval=2, val_fraction=0.25))
    assert result.status == "done"
    samples = [r for r in read_records(tmp_path / "out" / "progress.jsonl") if r["type"] == "samples"]
    assert [r["step"] for r in samples] == [2, 4] and all(r["held_out"] for r in samples)
    val = prepare_data(ChatTokenizer.from_dir(base), [data], 1024, val_fraction=0.25).val
    for record in samples:
        assert [s["prompt"] for s in record["samples"]] == [e.prompt for e in val]
        for sample, example in zip(record["samples"], val):
            number = example.prompt.split()[1].rstrip("?")
            assert sample["expected"] == f"Answer {number}." and isinstance(sample["reply"], str)


# The case: 22 made-up facts no model knows (country, capital).
FACTS = [("Zorbia", "Quell"), ("Brantia", "Mopal"), ("Kesh", "Dovar"), ("Lunor", "Tiska"), ("Vardel", "Pim"),
         ("Oskuna", "Relt"), ("Trevia", "Ganto"), ("Hilm", "Sapor"), ("Mervo", "Uldin"), ("Pashta", "Korr"),
         ("Yelbrun", "Fisk"), ("Dramor", "Ebbet"), ("Quorn", "Lasit"), ("Sivel", "Nomra"), ("Tarkeen", "Ovil"),
         ("Ummar", "Zest"), ("Gelbo", "Wint"), ("Raskol", "Hemp"), ("Nibur", "Cassel"), ("Fendra", "Aulo"),
         ("Istro", "Bemmel"), ("Wolkan", "Jurd")]


def learned_facts(model: Path, out: Path) -> tuple[int, int]:
    """(answers learned, facts trained on) after a finished job: greedy replies of base + adapter."""
    from engine import SamplingParams

    engine = Engine.load(model, device="cpu", dtype="float32", adapter=out / "adapter")
    held_out = {s["expected"] for r in read_records(out / "progress.jsonl") if r["type"] == "samples"
                for s in r["samples"]}
    trained = [(c, k) for c, k in FACTS if f"The capital of {c} is {k}." not in held_out]  # validation: untrained
    learned = 0
    for country, capital in trained:
        prompt = engine.chat_prompt([{"role": "user", "content": f"What is the capital of {country}?"}], 16)
        with engine.generate(prompt.token_ids, SamplingParams(temperature=0), 16) as generation:
            learned += capital in "".join(generation)
    return learned, len(trained)


def run_default_job(model: Path, tmp_path: Path, **settings) -> dict:
    """A LoRA job given nothing but the model and the facts (and `settings`); returns its plan."""
    data = write_jsonl(tmp_path / "qa.jsonl", [chat(f"What is the capital of {c}?", f"The capital of {c} is {k}.")
                                               for c, k in FACTS])
    result = run_job(config_from_dict({"model": str(model), "data": [str(data)], "out": str(tmp_path / "out"),
                                       "device": "cpu", **settings}))
    assert result.status == "done"
    return json.loads((tmp_path / "out" / "job.json").read_text())["plan"]


def test_the_defaults_teach_the_bundled_model_a_small_question_answer_set(tmp_path):
    model = ROOT / "models" / "default"
    plan = run_default_job(model, tmp_path, precision="fp32")
    assert plan["lr"] == 3.1e-3 and plan["total_steps"] == 100
    learned, trained = learned_facts(model, tmp_path / "out")
    assert learned >= 19, f"{learned} of {trained} trained answers learned"


def test_the_defaults_teach_a_135m_gguf_model_a_small_question_answer_set(tmp_path, smollm2_gguf):
    """SmolLM2-135M-Instruct from its Q4_1 GGUF: LoRA on the dequantized base, bfloat16 autocast as a user's job
    runs on CPU. It knows none of the answers before (measured: 0 of 22); the automatic plan teaches it."""
    plan = run_default_job(smollm2_gguf, tmp_path)
    assert plan["lr"] == 5.5e-4 and plan["total_steps"] == 100
    learned, trained = learned_facts(smollm2_gguf, tmp_path / "out")
    assert learned >= 19, f"{learned} of {trained} trained answers learned"
