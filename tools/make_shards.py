"""Write an image data set as WebDataset shards: a thin wrapper over ``python -m raypd.data.writer``.

Example: ``python tools/make_shards.py npz cifar10.npz --out shards/cifar10 --heldout 0.05``
(``--help`` lists every option).
"""

import sys

from raypd.data.writer import main

if __name__ == "__main__":
    sys.exit(main())
