"""``python -m hpa_kernel`` is ``python -m hpa_kernel.submit``."""

import sys

from hpa_kernel.submit import main

sys.exit(main())
