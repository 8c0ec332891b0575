"""DSL backends. `Runtime` (in-process engine) and `OpenAI` (any OpenAI-compatible server) load lazily."""
from epdlang.backends.base import Backend

__all__ = ["Backend"]
