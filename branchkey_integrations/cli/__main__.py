"""``python -m branchkey_integrations.cli``: the ``branchkey-local`` command."""

import sys

from . import main

sys.exit(main())
