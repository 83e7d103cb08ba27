"""Experiments on public data, outside the `app` package (which never imports them)."""
