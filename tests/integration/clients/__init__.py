"""Scripts run in .venv-clients (requirements/clients.lock) against a live server: the
third-party clients whose pins conflict with the server's environment."""
