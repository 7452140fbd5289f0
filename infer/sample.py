"""Sample multi-view images from a text prompt: a thin entry to ``mvdiff sample``.

python infer/sample.py --model DIR|CKPT.pt --prompt "a corgi" --output out/ [--scheduler dpm --steps 20]
"""

import sys

from mvdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
