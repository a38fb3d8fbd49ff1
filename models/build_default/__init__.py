"""Rebuild the bundled default model (models/default/) from public, redistributable data.

`python -m models.build_default all` fetches the data into a cache folder, builds the corpus, trains the
tokenizer, pre-trains, chat-tunes, picks sampling defaults and writes the model card. See README.md there.
"""
