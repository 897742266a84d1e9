"""The ``backmix`` command: one subcommand group per stage, each registered by its package."""
from __future__ import annotations

import argparse
import logging
import sys

from backmix.osr_data.errors import BackMixError


def build_parser() -> argparse.ArgumentParser:
    from backmix.cam_cache import cli as cache_cli
    from backmix.osr_data import cli as data_cli
    from backmix.pipeline import cli as pipeline_cli
    from backmix.trainers import cli as trainer_cli

    parser = argparse.ArgumentParser(
        prog="backmix",
        description="Train open-set recognition models with BackMix: prepare data, precompute "
                    "foreground caches, load and mix batches fast, train and evaluate.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = top.add_parser("data", help="prepare bundled data sets, convert folders").add_subparsers(
        dest="data_command", metavar="SUBCOMMAND", required=True)
    data_cli.register(data)
    pipeline_cli.register_data(data)

    cache = top.add_parser("cache", help="build and inspect foreground-map caches").add_subparsers(
        dest="cache_command", metavar="SUBCOMMAND", required=True)
    cache_cli.register(cache)
    pipeline_cli.register_cache_show(cache)

    trainer_cli.register(top)

    bench = top.add_parser("bench", help="benchmarks that print a table and write JSON").add_subparsers(
        dest="bench_command", metavar="SUBCOMMAND", required=True)
    cache_cli.register_bench(bench)
    pipeline_cli.register_bench(bench)

    pipeline_cli.register(top)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="backmix: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except BackMixError as e:
        print(f"backmix: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("backmix: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`backmix cache info | head`): stop quietly, as coreutils do.
        sys.stdout = None
        return 141
