"""The npvae command line: gradcheck, train, eval, sample, plot, bench.

Exit codes: 0 success, 1 a check failed or training stopped on a non-finite
value, 2 bad usage or bad input (one line on stderr, no traceback).
"""
import argparse
import sys


class UsageError(Exception):
    """Bad input from the command line: reported in one line, exit status 2."""


def cmd_gradcheck(args):
    from . import gradcheck
    rows = gradcheck.run_all(seed=args.seed)
    print(gradcheck.format_table(rows))
    return 0 if all(r[3] for r in rows) else 1


def build_parser():
    parser = argparse.ArgumentParser(prog="npvae", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser("gradcheck", help="check every analytic gradient against finite differences",
                       description="Check every analytic gradient against central finite differences "
                                   "in float64 and print a table; exit 1 if any check fails.")
    p.add_argument("--seed", type=int, default=0, help="seed for the test points (default 0)")
    p.set_defaults(func=cmd_gradcheck)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"npvae {args.command}: error: {e}", file=sys.stderr)
        return 2
