"""Generate options: one registry (registry.py) from which the request schema, docs/options.md
and the routing are generated, and one resolve step (resolve.py). Pure Python, no torch; it
imports nothing from app/api."""
