"""What a bare GPU machine needs to run bench/gpu_check.py, in one folder that travels with the code.

    .venv/bin/python bench/device_bundle.py --source ../shared/data/cifar10-jpeg --out .bundle
    .venv/bin/python bench/device_bundle.py --out .bundle --check      # sizes only: fits, or exit 1

It writes OUT/cifar10-subset.tar.gz: a CIFAR-10 image folder (`train/<class>/*.jpg`, `test/<class>/*.jpg`)
of the first `--train-per-class` training images of each class (default: all 5,000) and the whole
test split, as the JPEG files themselves, gzipped: the files alone are 55 MB, but their quantisation
and Huffman tables are the same in every file, so the gzipped tar of all 60,000 is about 19 MiB.
`../shared/...` does not travel to the device, and the plain folder plus the ffcv wheel (9 MB) and the
code would not fit the 64 MiB that does. The wheels come from `../shared/tools/device-wheels.sh OUT/wheels`.
It then adds up what travels (the repository's tracked files, the tar, the wheels) and checks it is
at most BUNDLE_LIMIT_MIB, the margin under the 64 MiB the device tool carries. bench/README.md has
the command that runs on the device.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE_LIMIT_MIB = 56
DATA_FILE = "cifar10-subset.tar.gz"
DEFAULT_TRAIN_PER_CLASS = 5000  # all of CIFAR-10's: gzip shares the JPEGs' identical tables, about 19 MiB
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def write_subset(source: Path, out: Path, train_per_class: int | None) -> tuple[int, int]:
    """The tar of the subset (written to a temp name, then renamed); returns (train, test) image counts."""
    counts = {"train": 0, "test": 0}
    partial = out / f".{DATA_FILE}.tmp"
    with tarfile.open(partial, "w:gz", compresslevel=6) as tar:  # gzip: the tar headers, not the JPEGs
        for split in ("train", "test"):
            classes = sorted(p for p in (source / split).iterdir() if p.is_dir())
            if not classes:
                raise SystemExit(
                    f"device_bundle: {source / split} has no class folders: pass an image folder"
                )
            for folder in classes:
                files = _images(folder)
                if split == "train" and train_per_class is not None:
                    files = files[:train_per_class]
                for path in files:
                    tar.add(path, arcname=f"{split}/{folder.name}/{path.name}", recursive=False)
                counts[split] += len(files)
    partial.replace(out / DATA_FILE)
    return counts["train"], counts["test"]


def traveling_bytes(out: Path) -> dict[str, int]:
    """Bytes of what travels to the device: the tracked code, the data tar, the wheels."""
    tracked = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True
    ).stdout.split(b"\0")
    code = sum(
        (REPO / name.decode()).stat().st_size for name in tracked if name and (REPO / name.decode()).is_file()
    )
    data = (out / DATA_FILE).stat().st_size if (out / DATA_FILE).exists() else 0
    wheels = sum(p.stat().st_size for p in (out / "wheels").glob("*.whl"))
    return {"code": code, "data": data, "wheels": wheels}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/device_bundle.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, help="a CIFAR-10 image folder (train/, test/)")
    p.add_argument("--out", type=Path, required=True, help="the bundle folder (carried to the device)")
    p.add_argument("--train-per-class", type=int, default=DEFAULT_TRAIN_PER_CLASS, help="1..5000")
    p.add_argument("--check", action="store_true", help="only add up the sizes")
    args = p.parse_args(argv)
    if not 1 <= args.train_per_class <= 5000:
        raise SystemExit(f"device_bundle: --train-per-class must be 1..5000, got {args.train_per_class}")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.check:
        if args.source is None or not (args.source / "train").is_dir() or not (args.source / "test").is_dir():
            raise SystemExit(
                f"device_bundle: --source {args.source} is not an image folder with train/ and test/"
            )
        train, test = write_subset(args.source, args.out, args.train_per_class)
        print(f"device_bundle: {args.out / DATA_FILE}: {train} train and {test} test images")
    sizes = traveling_bytes(args.out)
    total = sum(sizes.values())
    print(
        "device_bundle: "
        + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items())
        + f"; total {total / 2**20:.1f} MiB (limit {BUNDLE_LIMIT_MIB} MiB)"
    )
    if not sizes["wheels"]:
        print(f"device_bundle: no wheels yet: run ../shared/tools/device-wheels.sh {args.out / 'wheels'}")
    return 0 if total <= BUNDLE_LIMIT_MIB * 2**20 else 1


if __name__ == "__main__":
    sys.exit(main())
