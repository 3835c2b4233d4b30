"""Options that several subcommands share: the density maxima's options (export, states,
evaluate), ``--bandwidth``'s value, and ``--threads`` (every command)."""
import argparse
from typing import Optional, Union

__all__ = ["add_maxima_options", "bandwidth_value", "add_threads_option"]


def add_maxima_options(p: argparse.ArgumentParser) -> None:
    """--bandwidth, --min-height, --min-prominence, --min-significance on ``p``."""
    p.add_argument("--bandwidth", default=None, metavar="H|RULE",
                   help="KDE bandwidth on PC1: a number, or isj (default, improved "
                        "Sheather-Jones), silverman or scott")
    p.add_argument("--min-height", type=float, default=0.1,
                   help="keep maxima at least this fraction of the highest (default 0.1)")
    p.add_argument("--min-prominence", type=float, default=0.1,
                   help="keep maxima rising at least this fraction of their height above "
                        "the dip to any higher maximum (default 0.1)")
    p.add_argument("--min-significance", type=float, default=3.0,
                   help="... and by at least this many standard errors of the density "
                        "estimate (default 3; 0 keeps noise bumps)")


def bandwidth_value(text: Optional[str]) -> Union[float, str, None]:
    """``--bandwidth``: a number, a rule's name, or None."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """--threads on ``p`` (the rule when it is not given: ``base.threads``)."""
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: OMP_NUM_THREADS when set, else the usable "
                        "physical cores minus those other processes keep busy; the first "
                        "line of the output says how many and why)")
