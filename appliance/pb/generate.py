"""Generate (or check) the protobuf modules of appliance.pb from proto/.

Run as `python -m appliance.pb.generate [--check] OUTDIR`.
"""

from __future__ import annotations

import filecmp
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
# Imports in the generated code read `from appliance.pb import ...`.
VIRTUAL = "appliance/pb"


def generate(outdir: pathlib.Path) -> list[str]:
    from grpc_tools import protoc  # build-time dependency only

    protos = sorted(p.name for p in PROTO_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{VIRTUAL}={PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[f"{VIRTUAL}/{p}" for p in protos],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        made = sorted((pathlib.Path(tmp) / VIRTUAL).iterdir())
        names = []
        for f in made:
            target = outdir / f.name
            target.write_bytes(f.read_bytes())
            names.append(f.name)
    return names


def main(argv: list[str]) -> int:
    check = "--check" in argv
    args = [a for a in argv if a != "--check"]
    outdir = pathlib.Path(args[0] if args else ROOT / VIRTUAL)
    if not check:
        for name in generate(outdir):
            print(f"wrote {outdir / name}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        names = generate(pathlib.Path(tmp))
        stale = [n for n in names if not (outdir / n).exists() or not filecmp.cmp(outdir / n, pathlib.Path(tmp) / n, shallow=False)]
    if stale:
        print(f"generated protobuf code is stale: {', '.join(stale)}; run `make proto`", file=sys.stderr)
        return 1
    print(f"appliance/pb is current with proto/ ({len(names)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
