"""Text (and/or posed views) -> 3D asset: a thin entry to ``mvdiff text-to-3d``.

python infer/text_to_3d.py --model DIR --prompt "a corgi" --output out/ --config infer/configs/text_to_3d.yaml
python infer/text_to_3d.py --ref-views SAMPLE_DIR --sds-weight 0 --output out/ --config infer/configs/reconstruct_cpu.yaml
"""

import sys

from mvdiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["text-to-3d", *sys.argv[1:]]))
