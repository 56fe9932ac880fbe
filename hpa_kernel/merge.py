"""The old name of ``python -m hpa_kernel.team_merge`` (the team merge by cell): it still works,
with a one-line notice. Joining ``--shard`` parts is ``python -m hpa_kernel.submit merge``."""

import sys

from hpa_kernel.team_merge import build_parser, main  # noqa: F401  (the old import path)

if __name__ == "__main__":
    print("notice: python -m hpa_kernel.merge is now python -m hpa_kernel.team_merge", file=sys.stderr)
    sys.exit(main())
