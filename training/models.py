"""twin-models: the model store (BENTOML_HOME) as a registry.

twin-models list
twin-models show NAME:VERSION|NAME:latest|NAME:production
twin-models promote NAME:VERSION --stage production
twin-models verify NAME:VERSION        (exit 1 when a file was tampered with)
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from twin_ml import registry

    ap = argparse.ArgumentParser(
        prog="twin-models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="stored twin-ml models, newest first")
    for cmd, help_ in (
        ("show", "the verified model card"),
        ("verify", "recompute every file's sha256"),
    ):
        sub.add_parser(cmd, help=help_).add_argument(
            "ref", help="NAME:VERSION, NAME:latest or NAME:<stage>"
        )
    pr = sub.add_parser("promote", help="point NAME:<stage> at a version")
    pr.add_argument("ref")
    pr.add_argument("--stage", required=True, choices=registry.STAGES)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "list":
            rows = registry.list_models()
            print(f"{'tag':<48} {'system':<16} {'kind':<9} {'stages':<20} created")
            for r in rows:
                stages = ",".join(r["stages"]) or "-"
                print(
                    f"{r['tag']:<48} {r['system']:<16} {r['kind']:<9} {stages:<20} {r['created']}"
                )
        elif args.cmd == "show":
            print(json.dumps(registry.show(args.ref), indent=2))
        elif args.cmd == "verify":
            card = registry.verify(args.ref)
            print(f"ok: {args.ref}: {len(card.files or {})} files match their sha256")
        elif args.cmd == "promote":
            print(
                f"{registry.promote(args.ref, args.stage)} -> {args.ref.split(':')[0]}:{args.stage}"
            )
    except (registry.RegistryError, OSError) as e:  # OSError: e.g. a full disk while promoting
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
