"""Options that several subcommands share: the density maxima's options (export, states,
evaluate), ``--bandwidth``'s value, ``--threads`` (every command); which options the user
wrote (``given_options``) and the one-line warning for those that do nothing in the chosen
mode (``warn_inert``)."""
import argparse
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

__all__ = ["add_maxima_options", "bandwidth_value", "add_threads_option", "given_options",
           "warn_inert", "MAXIMA_OPTIONS"]

MAXIMA_OPTIONS = ("bandwidth", "min_height", "min_prominence", "min_significance")


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


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Dict[str, str]:
    """{dest: option string} of the options written in ``argv`` (the words after the
    subcommand) for the subcommand ``parser``, abbreviations resolved as argparse does."""
    table = parser._option_string_actions          # argparse's own map, option -> action
    given = {}
    for word in argv:
        if not word.startswith("-") or word in ("-", "--"):
            continue
        opt = word.split("=", 1)[0]
        action = table.get(opt)
        if action is None and opt.startswith("--"):
            hits = {a for o, a in table.items() if o.startswith(opt)}
            action = hits.pop() if len(hits) == 1 else None
        if action is not None and action.dest not in given:
            given[action.dest] = max(action.option_strings, key=len)
    return given


def warn_inert(args: argparse.Namespace, rules: Iterable[Tuple[str, bool, str]]) -> None:
    """For each (dest, applies, why) of ``rules`` whose option the user wrote
    (``args.given``) but which does not apply: one line ``nmaem: warning: <option> does
    nothing <why>``."""
    from ..base.errors import warning
    given = getattr(args, "given", {}) or {}
    for dest, applies, why in rules:
        if dest in given and not applies:
            warning("%s does nothing %s" % (given[dest], why))


def add_threads_option(p: argparse.ArgumentParser) -> None:
    """--threads on ``p`` (the rule when it is not given: ``base.threads``)."""
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: OMP_NUM_THREADS when set, else the usable "
                        "physical cores minus those other processes keep busy; the first "
                        "line of the output says how many and why)")
