"""`chattui attention`: print the attention weights of a text, as JSON or CSV."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys

from chattui.models_cli import MODEL_HELP

from chattui.terminal_text import for_stream, json_for_terminal

log = logging.getLogger("chattui")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "attention",
        help="print what every layer and head attends to in a text (JSON or CSV)",
        description="Print the attention weights softmax(QKᵀ/√d) of TEXT (one user message rendered with the chat "
        "template, unless --raw). JSON: tokens, token_ids, truncated_tokens (leading tokens left out beyond "
        "the capture cap) and attentions as [layer][head][query][key], written layer by layer; "
        "--layer and --head select one layer and/or head, and drop that dimension. CSV: one row per "
        "(layer, head, query, key) with key <= query.",
    )
    p.add_argument("--model", metavar="MODEL", help=f"{MODEL_HELP} (default: the bundled model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default: auto)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16, auto")
    p.add_argument("--raw", action="store_true", help="use TEXT as-is, without the chat template")
    p.add_argument("--layer", type=int, metavar="L", help="only this layer (0-based)")
    p.add_argument("--head", type=int, metavar="H", help="only this head (0-based)")
    p.add_argument("--format", choices=("json", "csv"), default="json", help="output format (default: json)")
    p.add_argument("text", metavar="TEXT|-", help="the text, or - to read it from stdin")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from chattui.cli import CommandError, load_engine, read_prompt

    text = read_prompt(args.text)
    engine = load_engine(args)
    if args.raw:
        ids = engine.raw_prompt(text)
    else:
        ids = engine.chat_prompt([{"role": "user", "content": text}], max_new_tokens=0).token_ids
    maps = engine.attention(ids)
    if maps.truncated:
        log.warning("warning: the text is %d tokens; only the last %d were captured (the first %d were left out)",
                    len(ids), len(maps), maps.truncated)
    layers = _select(args.layer, maps.num_layers, "--layer", CommandError)
    heads = _select(args.head, maps.num_heads, "--head", CommandError)
    if args.format == "csv":
        _write_csv(maps, layers, heads)
        return 0
    dims = ["layer", "head", "query", "key"]
    if args.head is not None:
        dims.remove("head")
    if args.layer is not None:
        dims.remove("layer")
    head = {
        "model": str(engine.model_dir),
        "tokens": maps.tokens,
        "token_ids": maps.token_ids,
        "truncated_tokens": maps.truncated,
        "num_layers": maps.num_layers,
        "num_heads": maps.num_heads,
        "layer": args.layer,
        "head": args.head,
        "dims": dims,
    }
    out = sys.stdout
    out.write(json_for_terminal(json.dumps(head, ensure_ascii=False))[:-1] + ', "attentions": ')
    _write_weights(out, maps, layers, heads, one_layer=args.layer is not None, one_head=args.head is not None)
    out.write("}\n")
    return 0


def _write_weights(out, maps, layers: list[int], heads: list[int], *, one_layer: bool, one_head: bool) -> None:
    """The nested [layer][head][query][key] lists, one row at a time: memory holds one layer's weights
    (heads, T, T), never the whole nest as Python floats. A selected layer or head drops its level."""

    def nest(items: list, write_item) -> None:
        out.write("[")
        for i, item in enumerate(items):
            if i:
                out.write(", ")
            write_item(item)
        out.write("]")

    def write_head(weights, head: int) -> None:  # weights: (heads, T, T)
        nest(range(len(maps)), lambda q: out.write(json.dumps(weights[head, q].tolist())))

    def write_layer(layer: int) -> None:
        weights = maps.layer(layer)
        if one_head:
            write_head(weights, heads[0])
        else:
            nest(heads, lambda head: write_head(weights, head))

    if one_layer:
        write_layer(layers[0])
    else:
        nest(layers, write_layer)


def _select(index: int | None, count: int, flag: str, error) -> list[int]:
    if index is None:
        return list(range(count))
    if not 0 <= index < count:
        raise error(f"{flag} {index} is out of range: the model has {count} (0..{count - 1})")
    return [index]


def _write_csv(maps, layers: list[int], heads: list[int]) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["layer", "head", "query", "key", "query_token", "key_token", "weight"])
    tokens = [for_stream(token, sys.stdout) for token in maps.tokens]  # a terminal gets no raw escapes
    for layer in layers:
        weights = maps.layer(layer)
        for head in heads:
            for q in range(len(maps)):
                for k in range(q + 1):
                    writer.writerow([layer, head, q, k, tokens[q], tokens[k], f"{weights[head, q, k]:.9g}"])
