"""Progress bars for long work: tqdm on a terminal; in a log file (stderr not a TTY) one plain line per
update at most every LOG_INTERVAL seconds, without the carriage-return frames a terminal bar is made of."""
import sys

from tqdm.auto import tqdm

LOG_INTERVAL = 30.0  # seconds between two lines of a bar written into a log file


class _Lines:
    """A file for tqdm that writes each frame as one line (tqdm redraws with a carriage return)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


class _LogBar(tqdm):
    """A bar for a log file: a new postfix waits for the next timed update instead of drawing a line."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s="", refresh=True):
        super().set_postfix_str(s, refresh=False)


def progress_bar(iterable=None, **kwargs):
    """tqdm(iterable, **kwargs), written as plain lines when stderr is not a terminal."""
    stream = sys.stderr
    if not kwargs.get("disable") and not (hasattr(stream, "isatty") and stream.isatty()):
        kwargs = {"mininterval": LOG_INTERVAL, **kwargs, "file": _Lines(stream), "dynamic_ncols": False,
                  "ncols": 100, "leave": True}
        return _LogBar(iterable, **kwargs)
    return tqdm(iterable, **kwargs)
