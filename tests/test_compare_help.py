"""`cyclegan compare --help` tells a user that the comparison is seed-aware, and how."""
from __future__ import annotations

import re
import subprocess

from helpers import VENV_BIN


def test_compare_help_explains_what_it_does_with_seeds():
    out = subprocess.run([str(VENV_BIN / "cyclegan"), "compare", "--help"], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    text = " ".join(out.split())  # argparse wraps lines at the terminal width
    assert "Runs that differ only in `seed` are repeats of one setting" in text
    for phrase in ("n (the runs)", "the mean, the standard deviation", "95% interval of the mean",
                   "95% interval (Welch)", "exceeding the seed spread"):
        assert phrase in text, phrase
    # The options are still there, with the new default metrics.
    assert re.search(r"--param PARAM.*--metric METRIC.*--source", text)
    assert "cleanfid_A2B cleanfid_B2A" in text
