"""twin-models: the model store (BENTOML_HOME) as a registry.

twin-models list
twin-models show NAME:VERSION|NAME:latest|NAME:production
twin-models promote NAME:VERSION --stage production
twin-models verify NAME:VERSION        (exit 1 when a file was tampered with)
twin-models bento NAME:VERSION|NAME:latest|NAME:<stage> [--name N] [--version V]
                                       [--bentofile bentofile.yaml]
    a Bento of the service carrying that model (resolved to one version and verified first):
    `bentoml serve <tag>`, `bentoml containerize <tag>`; prints the Bento's tag last
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# the project's bentofile (beside training/ in a checkout, or an editable install)
BENTOFILE = Path(__file__).resolve().parents[1] / "bentofile.yaml"


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
    bt = sub.add_parser("bento", help="build a Bento of the service with this model inside")
    bt.add_argument("ref", help="NAME:VERSION, NAME:latest or NAME:<stage>")
    bt.add_argument("--name", help="the Bento's name (default: the model's)")
    bt.add_argument("--version", help="the Bento's version (default: BentoML's, new per build)")
    bt.add_argument(
        "--bentofile",
        type=Path,
        default=BENTOFILE,
        help="the build file; its folder is the build context (default: %(default)s)",
    )
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
        elif args.cmd == "bento":
            print(bento(args.ref, args.bentofile, name=args.name, version=args.version))
    except (registry.RegistryError, OSError) as e:  # OSError: e.g. a full disk while promoting
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def bento(ref: str, bentofile: Path, name: str | None = None, version: str | None = None) -> str:
    """Build a Bento of serving/service.py carrying the stored model `ref` (a stage or `latest`
    resolved to its version here, the model verified first); its tag. `bentofile`'s folder is
    the build context. BentoML's own errors (a bad bentofile, a bad name) are RegistryErrors."""
    from twin_ml import registry

    if not Path(bentofile).is_file():
        raise registry.RegistryError(
            f"--bentofile {bentofile}: no such file (the project's bentofile.yaml, or your own)"
        )
    bm = registry.resolve(ref)  # once: NAME:latest / NAME:<stage> may move meanwhile
    registry.verify(str(bm.tag))  # that very version, every file's sha256
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        built = bentoml.bentos.build_bentofile(
            str(bentofile),
            build_ctx=str(Path(bentofile).resolve().parent),
            name=name or bm.tag.name,
            version=version,
            args={"model": str(bm.tag)},
        )
    except BentoMLException as e:
        raise registry.RegistryError(f"building the Bento of {bm.tag} failed: {e}") from None
    print(f"{built.tag} carries {bm.tag}: bentoml serve {built.tag}", file=sys.stderr)
    return str(built.tag)


if __name__ == "__main__":
    sys.exit(main())
