"""Entry point: `torchrun --nproc_per_node N -m oreal.train --config configs/FILE.py [--section.option value ...]`.

Also the console script `oreal-train`. `--print-config` prints the resolved configuration and exits
without starting any process group.
"""

from __future__ import annotations

import sys

from oreal.runtime.config import ConfigError, format_config, parse_args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        command = parse_args(argv)
    except ConfigError as exc:
        print(f"oreal-train: error: {exc}", file=sys.stderr)
        return 2
    if command.print_config:
        print(f"# {command.config_path}")
        print(format_config(command.config))
        return 0
    from oreal.algorithms.oreal import run

    return run(command.config)


if __name__ == "__main__":
    sys.exit(main())
