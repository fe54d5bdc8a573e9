"""`sdpo-fast serve`: an OpenAI-compatible chat service that learns each user's preferences from their follow-ups
(SQLite store, FastAPI app, background per-user learner)."""
from .store import Store, turn_key

__all__ = ["Store", "turn_key"]
