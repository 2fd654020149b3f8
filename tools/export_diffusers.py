"""Export a distilled student as a diffusers pipeline directory: a thin wrapper over ``raypd export``.

Example: ``python tools/export_diffusers.py --checkpoint runs/x/round-02-1steps --out student-1step``
(``--help`` lists every option; see raypd/hf/export.py for how the pipeline reproduces raypd's sampler).
"""

import sys

from raypd.hf.export import main

if __name__ == "__main__":
    sys.exit(main())
