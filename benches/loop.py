"""The metadata loop as a script would run it: create N files of 512 bytes, stat each,
list the directory, unlink each. Prints "SECONDS s" (interpreter start-up excluded).

    python3 benches/loop.py DIR N
"""

import os
import sys
import time


def main() -> int:
    root, n = sys.argv[1], int(sys.argv[2])
    names = [os.path.join(root, "f%07d" % i) for i in range(n)]
    data = b"x" * 512
    t = time.perf_counter()
    for p in names:
        with open(p, "wb") as f:
            f.write(data)
    for p in names:
        os.lstat(p)
    listed = len(os.listdir(root))
    for p in names:
        os.unlink(p)
    el = time.perf_counter() - t
    if listed != n:
        print(f"loop.py: listed {listed} entries, expected {n}", file=sys.stderr)
        return 1
    print(f"{el:.4f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
