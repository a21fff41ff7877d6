"""``token-scaler <command> [options]``: one console script, one subcommand per job."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from token_scaler.errors import ConfigError

# command -> (module with a ``main(argv) -> int``, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "demo.run",
        "see it work: scaler, sidecars, a simulated model server and a load burst",
    ),
    "serve": ("scaler.server", "run the KEDA external scaler (gRPC + debug HTTP)"),
    "sidecar": ("sidecar.server", "run the token-metering proxy beside a model server"),
    "gateway": (
        "gateway.server",
        "run the OpenAI-compatible entry point: holds requests at zero replicas, routes by tokens",
    ),
    "simulate": ("tuning.simulate", "replay a request trace through simulated autoscaling policies"),
    "profile": ("tuning.profile", "measure a model server's token capacity under rising load"),
    "synthesize": ("tuning.synthesize", "write a trace of days of traffic (daily + weekly envelope, bursts)"),
    "cost": (
        "billing.cli",
        "cost per 1k tokens from a billing export and token counts (reporting only, never for scaling)",
    ),
}


def usage() -> str:
    lines = ["usage: token-scaler <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "token-scaler <command> --help shows a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] == "--version":
        from token_scaler import __version__

        print(__version__)
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"token-scaler: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(command[0])
    try:
        code: int = module.main(args[1:])
    except ConfigError as exc:
        print(f"token-scaler {args[0]}: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
