"""`python -m defocus_mllm.encoder.diagnostics`: the `defocus-diagnose` command."""

import sys

from .cli import main

sys.exit(main())
