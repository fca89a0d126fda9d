"""Chat templates shipped with the project."""

from pathlib import Path

_DIR = Path(__file__).parent


def falcon_h1_chat_template() -> str:
    """Falcon-H1's ChatML template (leading BOS; `<|im_start|>role\\n…<|im_end|>\\n`) with `{% generation %}`
    markers around each assistant reply *and* its `<|im_end|>`, so assistant-only loss trains the model to stop.
    For real checkpoints prefer the template in the checkpoint's tokenizer_config; use this one when it lacks
    the markers."""
    return (_DIR / "falcon_h1_chat.jinja").read_text(encoding="utf-8").rstrip("\n")
