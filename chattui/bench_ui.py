"""How much does streaming into the UI cost? `python -m chattui.bench_ui --model DIR`

In one process, on one loaded model, in one headless app session (`run_test`), alternately:
  - engine alone: iterate the backend's stream in a plain loop in a thread, the app idle;
  - through the app: the same request sent from the chat screen, generated in the app's worker
    thread and streamed into the reply's Markdown widget.
Both use the same raw prompt, seed and sampling settings, so they generate the same tokens. The
decode speed (tokens/s after the first token, measured by the engine) of each is compared; the
app should keep at least 90% of the engine's speed. The time until the reply is fully rendered
in the UI is reported too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from engine.params import GenerationSettings

PROMPT = "Once upon a time, in a land far away,"
BUDGET = 0.10  # the most of the engine's decode speed the UI may cost


def sampling(new_tokens: int, seed: int) -> dict:
    """The conversation settings of every run, as the store keeps them."""
    # Sampling over the full vocabulary: random-weight models rarely hit eos, so runs are long.
    return {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
            "max_new_tokens": new_tokens, "seed": seed}


def engine_alone(backend, settings: dict) -> dict:
    """One reply with nothing else running, in a thread of its own as in the app (torch's CPU
    speed can differ between the main thread and others, so both sides use a non-main thread)."""
    result: dict = {}

    def run() -> None:
        started = time.perf_counter()
        reply = backend.stream(PROMPT, GenerationSettings().updated(settings), threading.Event())
        for _ in reply:
            pass
        result.update(vars(reply.result), wall_s=time.perf_counter() - started)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result


class _Preloaded:
    """The already loaded backend, handed to the app (its load() returns at once)."""

    def __init__(self, backend, info):
        self._backend = backend
        self._info = info

    def load(self, model_dir, device="auto", dtype="auto", progress=None):
        return self._info

    def stream(self, prompt, settings, cancel, **options):
        return self._backend.stream(prompt, settings, cancel, **options)


def compare(backend, info, settings: dict, rounds: int) -> tuple[list[dict], list[dict]]:
    """(engine alone, through the app) results, interleaved round by round in one headless app session.

    The engine-alone run happens while the app is open but idle, so the only difference between the
    two is the reply streaming into the chat screen."""
    from chattui.app import ChattuiApp
    from chattui.catalog import Stores
    from chattui.config import Config
    from chattui.store import Store

    alone: list[dict] = []
    app_runs: list[dict] = []

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            app = ChattuiApp(
                _Preloaded(backend, info), Store(":memory:"), Config(), model_dir=info.path,
                export_dir=tmp, bundled_dir=Path(tmp), stores=Stores.at(Path(tmp)),
            )
            async with app.run_test(size=(120, 40)):
                # Poll with plain sleeps: Pilot.pause() visits every widget and would cost more than the UI.
                while app.model is None:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.5)  # let start-up rendering settle
                chat = app.chat
                for _ in range(rounds):
                    alone.append(await asyncio.to_thread(engine_alone, backend, settings))
                    await chat.open_conversation(None)
                    conversation = chat._ensure_conversation()
                    chat.conversation = app.store.update_conversation(
                        conversation.id, mode="generate", settings=settings
                    )
                    await asyncio.sleep(0.2)
                    started, ui_cpu = time.perf_counter(), time.thread_time()
                    await chat.send(PROMPT)
                    while chat.reply is not None:  # None again once the engine is done
                        await asyncio.sleep(0.005)
                    ui_cpu_generating = time.thread_time() - ui_cpu
                    while not chat.boxes()[-1].record:  # the final full render and the commit
                        await asyncio.sleep(0.005)
                    reply = chat.messages[-1]
                    app_runs.append({
                        **reply.stats,
                        "generated_tokens": reply.generated_tokens,
                        "wall_s": time.perf_counter() - started,
                        "ui_cpu_s": ui_cpu_generating,  # the UI thread's CPU time while the reply was generated
                    })

    asyncio.run(main())
    return alone, app_runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chattui.bench_ui", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="DIR", type=Path, required=True, help="checkpoint folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--new-tokens", type=int, default=128, metavar="N", help="tokens per reply (default: 128)")
    p.add_argument("--repeat", type=int, default=5, metavar="N", help="rounds of alone + app (default: 5)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    from chattui.backend import BackendError, EngineBackend

    backend = EngineBackend()
    try:
        info = backend.load(str(args.model), args.device, args.dtype)
    except BackendError as e:
        print(f"bench_ui: error: {e}", file=sys.stderr)
        return 1
    settings = sampling(args.new_tokens, args.seed)
    engine_alone(backend, settings)  # warm-up
    alone, app = compare(backend, info, settings, args.repeat)

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    alone_tps = median(alone, "decode_tokens_per_s")
    app_tps = median(app, "decode_tokens_per_s")
    tokens = alone[0]["generated_tokens"]
    # Paired by round, so load from other processes that comes and goes cancels out as far as it can.
    ratio = statistics.median(b["decode_tokens_per_s"] / a["decode_tokens_per_s"] for a, b in zip(alone, app))
    # The UI thread's CPU time while a reply is generated, against the engine's own time for the reply:
    # about what the UI can take from the engine (it holds the GIL while it works). Steadier than the
    # speed ratio when other processes load the machine.
    ui_share = statistics.median(r["ui_cpu_s"] / a["wall_s"] for r, a in zip(app, alone))
    report = {
        "model": info.path,
        "device": info.device,
        "dtype": info.dtype,
        "generated_tokens": tokens,
        "same_tokens_in_app": all(r["generated_tokens"] == tokens for r in app),
        "engine_decode_tokens_per_s": alone_tps,
        "app_decode_tokens_per_s": app_tps,
        "ratio": ratio,
        "ui_cost": 1 - ratio,
        "ui_cpu_s_per_reply": median(app, "ui_cpu_s"),
        "ui_cpu_share": ui_share,
        "engine_wall_s": median(alone, "wall_s"),
        "app_wall_s_until_rendered": median(app, "wall_s"),
        "within_budget": 1 - ratio < BUDGET,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"model {info.name} on {info.device}/{info.dtype}, {tokens} tokens per reply, "
              f"median of {args.repeat} runs each")
        print(f"  engine alone:     {alone_tps:8.1f} tok/s decode   {report['engine_wall_s']:.2f} s per reply")
        print(f"  through the app:  {app_tps:8.1f} tok/s decode   {report['app_wall_s_until_rendered']:.2f} s "
              "per reply until fully rendered")
        verdict = "OK" if report["within_budget"] else "OVER BUDGET"
        print(f"  ratio app/engine: {ratio:.3f}  (UI costs {100 * (1 - ratio):.1f}% of decode speed; "
              f"budget {100 * BUDGET:.0f}%: {verdict})")
        print(f"  UI thread CPU:    {report['ui_cpu_s_per_reply'] * 1000:.0f} ms while a reply is generated = "
              f"{100 * ui_share:.1f}% of the engine's time for it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
