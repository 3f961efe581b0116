"""Rebuild the embedded data of ``data/`` from the project's shared material (maintainers only).

    python data/build_embedded.py --shared ../shared/data

Copies the meshes of ``<shared>/meshes`` whose licence (its MANIFEST.md) permits redistribution
into ``data/meshes/<category>/<stem>.ply`` (binary PLY written by trimesh; the printed totals
compare its size with the published files) and writes
``data/meshes/MANIFEST.md`` with source, licence and attribution per file; copies the BSD-3
COLMAP models (``lund_door``, ``maupertuis``) into ``data/real/``. Users never run this: the
repository ships its output. It is kept so that the provenance of every embedded file is a
command, not a claim.

The licence rule is the one of ``<shared>/README.md``: CC BY 3.0 / 4.0, MIT, MIT-0 and public
domain may be copied; a row whose licence column states no licence, GPL, LGPL, CC BY-SA, a
dataset's name only (Stanford) or a different licence of the model itself (Duck: SCEA Shared
Source) is left out, even where the repository around it is MIT.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ALLOWED = ("CC BY 3.0", "CC BY 4.0", "MIT", "public domain")  # MIT covers MIT-0
REFUSED = ("no repo licence", "GPL", "BY-SA", "Stanford", "SCEA")
REAL_MODELS = ("lund_door", "maupertuis")


def manifest_rows(path: Path) -> list[list[str]]:
    """The table rows of a mesh MANIFEST.md as [file, category, faces, source, licence, mode]."""
    rows = []
    for line in path.read_text().splitlines():
        if line.startswith("| `"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def redistributable(licence: str) -> bool:
    """Whether a MANIFEST licence cell permits copying the file into the repository."""
    return not any(r in licence for r in REFUSED) and any(a in licence for a in ALLOWED)


def build_meshes(shared: Path, out: Path) -> list[list[str]]:
    import trimesh

    kept = []
    for row in manifest_rows(shared / "meshes" / "MANIFEST.md"):
        name = row[0].strip("`")
        if not redistributable(row[4]):
            continue
        mesh = trimesh.load(shared / "meshes" / name, force="mesh")
        target = out / Path(name).parent / (Path(name).stem + ".ply")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(mesh.export(file_type="ply", encoding="binary"))
        kept.append([target.relative_to(out).as_posix(), name, *row[1:]])
    return kept


MANIFEST_HEAD = """# Embedded meshes (redistributable)

{n} triangle meshes in 8 category folders, the subset of the project's 115 shared meshes whose
licence permits redistribution (CC BY 3.0 / 4.0, MIT, MIT-0, public domain). Each file is a
**format conversion** of the published file to binary PLY (trimesh's exporter; textures,
materials and normals dropped; vertices merged as `trimesh.load(force="mesh")` does),
written by `python data/build_embedded.py --shared ../shared/data`. The geometry is otherwise
unchanged (units as published; the generator normalises the scale). Left out: files whose source
states no licence, GPL / LGPL, CC BY-SA, a dataset name without a licence (Stanford), and the glTF
Duck (its own licence is the SCEA Shared Source License, not MIT).

Attribution: each row names the work's source repository, commit and path, its licence and its
author where the source names one. Licence texts: `LICENSES/` (MIT, MIT-0, and CC-BY.txt); the Creative Commons
licences are identified by their URI, as CC BY 3.0 s. 4(b) and CC BY 4.0 s. 3(a)(1)(C) allow:
CC BY 3.0 <https://creativecommons.org/licenses/by/3.0/legalcode>, CC BY 4.0
<https://creativecommons.org/licenses/by/4.0/legalcode>. Changes made: format conversion only.

| file | converted from | category | faces | source (repository @ commit, path) | licence | mode |
|---|---|---|---|---|---|---|
"""


def write_manifest(out: Path, kept: list[list[str]]) -> None:
    lines = [MANIFEST_HEAD.format(n=len(kept))]
    for rel, src_name, cat, faces, source, licence, mode in kept:
        lines.append(f"| `{rel}` | `{src_name}` | {cat} | {faces} | {source} | {licence} | {mode} -> binary PLY |\n")
    (out / "MANIFEST.md").write_text("".join(lines))


def build_real(shared: Path, out: Path) -> None:
    for name in REAL_MODELS:
        dst = out / name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(shared / "real" / name, dst)
        for p in dst.iterdir():
            p.chmod(0o644)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared" / "data")
    args = ap.parse_args(argv)
    meshes = HERE / "meshes"
    for cat in meshes.glob("*/"):
        if cat.name != "LICENSES":
            shutil.rmtree(cat)
    kept = build_meshes(args.shared, meshes)
    write_manifest(meshes, kept)
    build_real(args.shared, HERE / "real")
    size = sum(p.stat().st_size for p in meshes.rglob("*.ply"))
    src = sum((args.shared / "meshes" / k[1]).stat().st_size for k in kept)
    print(f"{len(kept)} meshes, {size / 2**20:.1f} MiB as binary PLY ({src / 2**20:.1f} MiB as published); "
          f"real models: {', '.join(REAL_MODELS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
