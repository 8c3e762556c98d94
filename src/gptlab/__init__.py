"""gptlab: a GPT-style language model through its whole life."""

__version__ = "0.1.0"


class GptlabError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it (no traceback)."""
