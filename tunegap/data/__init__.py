"""Data in and out of training: validated loaders, token rendering and the shipped support task."""

from tunegap.data.loaders import DataError, LoadReport, load_corpus, load_preferences, load_sft
from tunegap.data.render import (IGNORE_INDEX, Example, RenderStats, render_conversation, tokenize_corpus,
                                 tokenize_prompt, tokenize_sft)

__all__ = [
    "DataError", "LoadReport", "load_sft", "load_preferences", "load_corpus",
    "IGNORE_INDEX", "Example", "RenderStats", "render_conversation", "tokenize_sft", "tokenize_corpus",
    "tokenize_prompt",
]
