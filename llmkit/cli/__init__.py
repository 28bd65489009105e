"""Thin command-line adapters over :mod:`llmkit.core`: parse, build config, call core, render."""
