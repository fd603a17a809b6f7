"""Integrations with model libraries; each imports its library only when imported itself."""
