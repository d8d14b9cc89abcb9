"""`python -m qwen_asr_worker.eval`: see `cli`."""

import sys

from .cli import main

sys.exit(main())
