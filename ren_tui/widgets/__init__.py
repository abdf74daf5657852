"""Widgets shared by the screens; each module is imported by the screens that use it."""
