"""Rebuild the bundled default model (models/default/) from public, redistributable data.

`python -m models.build_default all` fetches the data into a cache folder, builds the corpus, trains the
tokenizer, pre-trains, chat-tunes, picks sampling defaults and writes the model card. See README.md there.

A recipe, not an architecture: it trains with the engine (engine.train, engine.tokenizer). It lives beside
the model it builds; the architecture files (models/*.py) never import the engine, and nothing in models/
imports this package (tests/models/test_registry.py checks the first).
"""
