"""Drills that exercise the framework's reliability for real (:mod:`.chaos`: kill -9 during expansion)."""
