"""The rehearsal's rank log, for the message of a failing multi-process test."""
from pathlib import Path


def log_tail(path, lines: int = 400) -> str:
    """The last ``lines`` of the ranks' own log (recoveries, give-ups), without gloo's socket noise."""
    try:
        got = [l for l in Path(path).read_text(errors="replace").splitlines() if "socket.cpp" not in l]
    except OSError:
        return ""
    return "\nrank log tail:\n" + "\n".join(got[-lines:])
