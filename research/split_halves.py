"""Split an ImageFolder split into two halves of symlinks, alternating within each class (sorted
file names: even -> ``search``, odd -> ``test``), so a policy is searched on one half and every
method judged on the other. No image is copied.

    python research/split_halves.py ../shared/data/tinyimagenet-dev20/val runs/gps/data
"""

from __future__ import annotations

import argparse
import os


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="an ImageFolder split: SOURCE/<class>/<image>")
    p.add_argument("out", help="writes OUT/search/<class>/ and OUT/test/<class>/ (symlinks)")
    args = p.parse_args(argv)
    counts = {"search": 0, "test": 0}
    for cls in sorted(os.listdir(args.source)):
        folder = os.path.join(args.source, cls)
        if not os.path.isdir(folder):
            continue
        for i, name in enumerate(sorted(os.listdir(folder))):
            half = "search" if i % 2 == 0 else "test"
            os.makedirs(os.path.join(args.out, half, cls), exist_ok=True)
            link = os.path.join(args.out, half, cls, name)
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(os.path.join(folder, name)), link)
            counts[half] += 1
    print(f"{args.out}: search {counts['search']} images, test {counts['test']}")


if __name__ == "__main__":
    main()
